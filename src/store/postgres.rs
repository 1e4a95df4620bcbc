//! [`PostgresStore`]: keys in PostgreSQL (feature `postgres`); its docs say how.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::sql_common::{
    LimitColumns, RawRecord, is_pg_retryable, map_sqlx_error, micros, networks_text, pool_key,
};
use super::{
    ChainLevels, ChainSpend, CreditAdjustment, FormatSecrets, KeyChange, KeyLimits, KeyRecord,
    KeyStore, KeyUpdate, ListQuery, MAX_DELEGATION_DEPTH, Rotation, StoreError, StoreErrorKind,
    StoredSecret,
};
use crate::key::{FormatSecret, KeyDigest, KeyId, MAX_SECRET_VERSION};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};

/// A schema or channel name that is not a plain PostgreSQL identifier: 1 to 63 bytes of ASCII
/// letters, digits, `_` or `$`, not starting with a digit or `$`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidIdentifier {
    what: &'static str,
}

impl fmt::Display for InvalidIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid PostgreSQL {} name: use 1 to 63 ASCII letters, digits, `_` or `$`, \
             not starting with a digit or `$`",
            self.what
        )
    }
}

impl std::error::Error for InvalidIdentifier {}

/// Checks a name for use as a (quoted) identifier; `what` names it in the error.
pub(crate) fn check_identifier(name: &str, what: &'static str) -> Result<(), InvalidIdentifier> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$');
    if ok {
        Ok(())
    } else {
        Err(InvalidIdentifier { what })
    }
}

/// A stable 64-bit advisory lock key for `parts` (the same in every instance and every version).
fn lock_key(parts: &[&str]) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(b"tower-api-keys");
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    i64::from_be_bytes(first)
}

const COLUMNS: &str = "id, name, owner, account, scopes, digest, digest_scheme, masked_key, \
    created_at, expires_at, revoked_at, last_used_at, created_by, rotated_at, previous_digest, \
    previous_digest_scheme, previous_valid_until, rate_limit, rate_period_seconds, \
    credits_remaining, credits_refill_interval, credits_refill_amount, credits_set_at, \
    allowed_networks";

/// The usage-limit columns of `api_keys` and `api_key_pools`, in the order [`decode_limits`]
/// reads them.
const LIMIT_COLUMNS: &str = "rate_limit, rate_period_seconds, credits_remaining, \
    credits_refill_interval, credits_refill_amount, credits_set_at";

/// How many times a chain spend or refund runs again after PostgreSQL chose it as a deadlock
/// victim (its row locks crossed a cascade's) or failed it for serialization.
const CHAIN_ATTEMPTS: u32 = 3;

/// The schema's migrations, in order. Versions are never renumbered or edited once released.
fn migrations(s: &str) -> [(i32, &'static str, String); 5] {
    [
        (
            1,
            "api_keys and api_key_digests",
            format!(
                r#"
CREATE TABLE {s}.api_keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT NOT NULL,
    scopes TEXT[] NOT NULL,
    digest BYTEA NOT NULL CHECK (octet_length(digest) = 32),
    digest_scheme INTEGER NOT NULL,
    masked_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    created_by TEXT,
    rotated_at TIMESTAMPTZ,
    previous_digest BYTEA CHECK (octet_length(previous_digest) = 32),
    previous_digest_scheme INTEGER,
    previous_valid_until TIMESTAMPTZ,
    CHECK ((previous_digest IS NULL) = (previous_digest_scheme IS NULL)
       AND (previous_digest IS NULL) = (previous_valid_until IS NULL))
);
CREATE UNIQUE INDEX api_keys_digest_key ON {s}.api_keys (digest);
CREATE UNIQUE INDEX api_keys_previous_digest_key ON {s}.api_keys (previous_digest)
    WHERE previous_digest IS NOT NULL;
CREATE INDEX api_keys_owner_id_idx ON {s}.api_keys (owner, id);
CREATE INDEX api_keys_account_idx ON {s}.api_keys (account);
CREATE TABLE {s}.api_key_digests (
    digest BYTEA PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL REFERENCES {s}.api_keys (id) ON DELETE CASCADE
);
CREATE INDEX api_key_digests_key_id_idx ON {s}.api_key_digests (key_id);
"#
            ),
        ),
        (
            2,
            "api_keys.created_by index (cascading revocation)",
            format!(
                "CREATE INDEX api_keys_created_by_idx ON {s}.api_keys (created_by) \
                 WHERE created_by IS NOT NULL;"
            ),
        ),
        (
            3,
            "api_key_format and api_key_format_secrets (keyed key format)",
            format!(
                r#"
CREATE TABLE {s}.api_key_format (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    legacy_keys BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE {s}.api_key_format_secrets (
    version INTEGER PRIMARY KEY CHECK (version BETWEEN 1 AND 61),
    secret BYTEA NOT NULL CHECK (octet_length(secret) >= 32),
    created_at TIMESTAMPTZ NOT NULL,
    retired_at TIMESTAMPTZ
);
"#
            ),
        ),
        (
            4,
            "per-key rate limits and credits",
            // Existing keys get NULLs: no limit.
            format!(
                r#"
ALTER TABLE {s}.api_keys
    ADD COLUMN rate_limit BIGINT,
    ADD COLUMN rate_period_seconds BIGINT,
    ADD COLUMN credits_remaining BIGINT,
    ADD COLUMN credits_refill_interval TEXT,
    ADD COLUMN credits_refill_amount BIGINT,
    ADD COLUMN credits_set_at TIMESTAMPTZ;
"#
            ),
        ),
        (
            5,
            "allowed networks and shared pools (containment)",
            // Existing keys get NULL: usable from anywhere. A pool is an owner's (`kind` 'owner',
            // `account` '') or one account's; its limit columns are those of `api_keys`.
            format!(
                r#"
ALTER TABLE {s}.api_keys ADD COLUMN allowed_networks TEXT;
CREATE TABLE {s}.api_key_pools (
    owner TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL CHECK (kind IN ('owner', 'account')),
    account TEXT COLLATE "C" NOT NULL,
    rate_limit BIGINT,
    rate_period_seconds BIGINT,
    credits_remaining BIGINT,
    credits_refill_interval TEXT,
    credits_refill_amount BIGINT,
    credits_set_at TIMESTAMPTZ,
    CHECK (kind = 'account' OR account = ''),
    PRIMARY KEY (owner, kind, account)
);
"#
            ),
        ),
    ]
}

/// Every statement, with the schema spliced in once (the schema name is a checked identifier).
struct Sql {
    schema: String,
    quoted: String,
    find_by_digest: Arc<str>,
    get: Arc<str>,
    get_for_update: Arc<str>,
    list: Arc<str>,
    exists: Arc<str>,
    creator_active: Arc<str>,
    revoke_descendants: Arc<str>,
    count_owner: Arc<str>,
    count_account: Arc<str>,
    count_active: Arc<str>,
    insert: Arc<str>,
    insert_digests: Arc<str>,
    revoke: Arc<str>,
    delete: Arc<str>,
    drop_digests: Arc<str>,
    rotate: Arc<str>,
    last_used: Arc<str>,
    write_limits: Arc<str>,
    ancestors: Arc<str>,
    descendants: Arc<str>,
    budget_above: Arc<str>,
    pool: Arc<str>,
    pool_insert: Arc<str>,
    pool_upsert: Arc<str>,
    pool_delete: Arc<str>,
    lock_key_credits: Arc<str>,
    lock_pool_credits: Arc<str>,
    write_key_credits: Arc<str>,
    write_pool_credits: Arc<str>,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let sql = |text: String| -> Arc<str> { text.into() };
        // Every descendant of the key `$1`: shared by the cascades and `descendants`.
        let tree = format!(
            "WITH RECURSIVE tree(id) AS ( \
                SELECT id FROM {s}.api_keys WHERE created_by = $1 \
                UNION SELECT k.id FROM {s}.api_keys AS k JOIN tree ON k.created_by = tree.id) "
        );
        // The key `seed` at depth 1 and its creators up to depth `$2`; stops at a creator that
        // is gone. Shared by `ancestors` and `budget_above`.
        let chain = |seed: &str| {
            format!(
                "WITH RECURSIVE chain(cid, parent, depth) AS ( \
                    SELECT id, created_by, 1 FROM {s}.api_keys WHERE id = {seed} \
                    UNION ALL SELECT k.id, k.created_by, c.depth + 1 FROM {s}.api_keys AS k \
                    JOIN chain AS c ON k.id = c.parent WHERE c.depth < $2) "
            )
        };
        let pool_upsert_tail = "DO UPDATE SET rate_limit = excluded.rate_limit, \
            rate_period_seconds = excluded.rate_period_seconds, \
            credits_remaining = excluded.credits_remaining, \
            credits_refill_interval = excluded.credits_refill_interval, \
            credits_refill_amount = excluded.credits_refill_amount, \
            credits_set_at = excluded.credits_set_at";
        let pool_insert = |tail: &str| {
            format!(
                "INSERT INTO {s}.api_key_pools (owner, kind, account, {LIMIT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (owner, kind, account) {tail}"
            )
        };
        Self {
            ancestors: sql(format!(
                "{}SELECT {COLUMNS} FROM chain JOIN {s}.api_keys AS k ON k.id = chain.cid \
                 ORDER BY chain.depth",
                chain(&format!(
                    "(SELECT created_by FROM {s}.api_keys WHERE id = $1)"
                ))
            )),
            descendants: sql(format!(
                "{tree}SELECT {COLUMNS} FROM {s}.api_keys WHERE id IN (SELECT id FROM tree)"
            )),
            // The ancestors (depth 1 up), then the account pool, then the owner pool.
            budget_above: sql(format!(
                "{}SELECT 'key', chain.cid, chain.depth, {LIMIT_COLUMNS} \
                 FROM chain JOIN {s}.api_keys AS k ON k.id = chain.cid \
                 UNION ALL SELECT kind, account, \
                   CASE kind WHEN 'account' THEN $2 + 1 ELSE $2 + 2 END, {LIMIT_COLUMNS} \
                 FROM {s}.api_key_pools WHERE owner = $3 AND (kind = 'owner' OR account = $4) \
                 ORDER BY 3",
                chain("$1")
            )),
            pool: sql(format!(
                "SELECT {LIMIT_COLUMNS} FROM {s}.api_key_pools \
                 WHERE owner = $1 AND kind = $2 AND account = $3"
            )),
            pool_insert: sql(pool_insert("DO NOTHING")),
            pool_upsert: sql(pool_insert(pool_upsert_tail)),
            pool_delete: sql(format!(
                "DELETE FROM {s}.api_key_pools WHERE owner = $1 AND kind = $2 AND account = $3"
            )),
            // Rows locked in one order (keys by id, then pools by their key), so that concurrent
            // chains never wait on each other in a cycle. Credits are not key columns: NO KEY
            // UPDATE leaves digest inserts referencing the key alone.
            lock_key_credits: sql(format!(
                "SELECT k.id, {LIMIT_COLUMNS} FROM {s}.api_keys AS k WHERE k.id = ANY($1) \
                 ORDER BY k.id FOR NO KEY UPDATE OF k"
            )),
            lock_pool_credits: sql(format!(
                "SELECT p.owner, p.kind, p.account, {LIMIT_COLUMNS} FROM {s}.api_key_pools AS p \
                 JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS u(owner, kind, account) \
                   ON p.owner = u.owner AND p.kind = u.kind AND p.account = u.account \
                 ORDER BY p.owner, p.kind, p.account FOR NO KEY UPDATE OF p"
            )),
            write_key_credits: sql(format!(
                "UPDATE {s}.api_keys AS k SET credits_remaining = u.remaining, credits_set_at = u.set_at \
                 FROM UNNEST($1::text[], $2::bigint[], $3::timestamptz[]) AS u(id, remaining, set_at) \
                 WHERE k.id = u.id"
            )),
            write_pool_credits: sql(format!(
                "UPDATE {s}.api_key_pools AS p SET credits_remaining = u.remaining, credits_set_at = u.set_at \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[]) \
                   AS u(owner, kind, account, remaining, set_at) \
                 WHERE p.owner = u.owner AND p.kind = u.kind AND p.account = u.account"
            )),
            find_by_digest: sql(format!(
                // Two unique-index lookups: an `OR` with `LIMIT 1` may be planned as a sequential
                // scan (cheap for a hit near the start, slow for every miss) before statistics exist.
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE digest = $1 \
                 UNION ALL SELECT {COLUMNS} FROM {s}.api_keys WHERE previous_digest = $1 LIMIT 1"
            )),
            get: sql(format!("SELECT {COLUMNS} FROM {s}.api_keys WHERE id = $1")),
            get_for_update: sql(format!(
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE id = $1 FOR UPDATE"
            )),
            list: sql(format!(
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE owner = $1 AND ($2::text IS NULL OR id < $2) \
                 AND ($4::text IS NULL OR account = $4) ORDER BY id DESC LIMIT $3"
            )),
            exists: sql(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.api_keys WHERE id = $1) \
                 OR EXISTS (SELECT 1 FROM {s}.api_key_digests WHERE digest = ANY($2))"
            )),
            // FOR SHARE: a concurrent revocation (an UPDATE) of the creator waits for this insert
            // to commit, or this insert waits for it and then sees the creator revoked.
            creator_active: sql(format!(
                "SELECT 1 FROM {s}.api_keys WHERE id = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2) FOR SHARE"
            )),
            revoke_descendants: sql(format!(
                "{tree}UPDATE {s}.api_keys SET revoked_at = $2 \
                 WHERE revoked_at IS NULL AND id IN (SELECT id FROM tree) RETURNING {COLUMNS}"
            )),
            count_owner: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE owner = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2)"
            )),
            count_account: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE account = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2)"
            )),
            count_active: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE owner = $1 \
                 AND ($2::text IS NULL OR account = $2) AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $3)"
            )),
            insert: sql(format!(
                "INSERT INTO {s}.api_keys ({COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18, $19, $20, $21, $22, $23, $24)"
            )),
            insert_digests: sql(format!(
                "INSERT INTO {s}.api_key_digests (digest, key_id) SELECT d, $2 FROM UNNEST($1::bytea[]) AS t(d)"
            )),
            revoke: sql(format!(
                "UPDATE {s}.api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING {COLUMNS}"
            )),
            delete: sql(format!(
                "DELETE FROM {s}.api_keys WHERE id = $1 RETURNING {COLUMNS}"
            )),
            drop_digests: sql(format!(
                "DELETE FROM {s}.api_key_digests WHERE key_id = $1 AND NOT (digest = ANY($2::bytea[]))"
            )),
            rotate: sql(format!(
                "UPDATE {s}.api_keys SET digest = $2, digest_scheme = $3, masked_key = $4, rotated_at = $5, \
                 previous_digest = $6, previous_digest_scheme = $7, previous_valid_until = $8 \
                 WHERE id = $1 RETURNING {COLUMNS}"
            )),
            last_used: sql(format!(
                "UPDATE {s}.api_keys AS k SET last_used_at = u.at \
                 FROM (SELECT id, max(at) AS at FROM UNNEST($1::text[], $2::timestamptz[]) AS t(id, at) \
                       GROUP BY id) AS u \
                 WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)"
            )),
            write_limits: sql(format!(
                "UPDATE {s}.api_keys SET name = $2, rate_limit = $3, rate_period_seconds = $4, \
                 credits_remaining = $5, credits_refill_interval = $6, credits_refill_amount = $7, \
                 credits_set_at = $8 WHERE id = $1"
            )),
            schema: schema.to_owned(),
            quoted: s,
        }
    }
}

fn query(
    sql: &Arc<str>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

fn decode(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let raw = (|| -> Result<RawRecord, sqlx::Error> {
        Ok(RawRecord {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            owner: row.try_get(2)?,
            account: row.try_get(3)?,
            scopes: row.try_get(4)?,
            digest: row.try_get(5)?,
            digest_scheme: i64::from(row.try_get::<i32, _>(6)?),
            masked_key: row.try_get(7)?,
            created_at: row.try_get(8)?,
            expires_at: row.try_get(9)?,
            revoked_at: row.try_get(10)?,
            last_used_at: row.try_get(11)?,
            created_by: row.try_get(12)?,
            rotated_at: row.try_get(13)?,
            previous_digest: row.try_get(14)?,
            previous_digest_scheme: row.try_get::<Option<i32>, _>(15)?.map(i64::from),
            previous_valid_until: row.try_get(16)?,
            limits: decode_limits(row, 17)?,
            allowed_networks: row.try_get(23)?,
        })
    })()
    .map_err(map_sqlx_error)?;
    raw.into_record()
}

/// The [`LIMIT_COLUMNS`] starting at column `at`.
fn decode_limits(row: &PgRow, at: usize) -> Result<LimitColumns, sqlx::Error> {
    Ok(LimitColumns {
        rate_limit: row.try_get(at)?,
        rate_period_seconds: row.try_get(at + 1)?,
        credits_remaining: row.try_get(at + 2)?,
        credits_refill_interval: row.try_get(at + 3)?,
        credits_refill_amount: row.try_get(at + 4)?,
        credits_set_at: row.try_get(at + 5)?,
    })
}

/// The limits read at column `at` of `row`, validated.
fn limits_at(row: &PgRow, at: usize) -> Result<UsageLimits, StoreError> {
    decode_limits(row, at)
        .map_err(map_sqlx_error)?
        .into_limits()
}

fn decode_opt(row: Option<PgRow>) -> Result<Option<KeyRecord>, StoreError> {
    row.as_ref().map(decode).transpose()
}

/// Configures a [`PostgresStore`]; see [`PostgresStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct PostgresStoreBuilder {
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            schema: PostgresStore::DEFAULT_SCHEMA.to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema holding the tables (default [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)); created if missing. Several
    /// independent key sets can share a database by using different schemas.
    pub fn schema(mut self, schema: &str) -> Result<Self, InvalidIdentifier> {
        check_identifier(schema, "schema")?;
        self.schema = schema.to_owned();
        Ok(self)
    }

    /// Most connections the pool opens (default 10). Ignored by [`from_pool`](Self::from_pool).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long an operation waits for a connection before failing with
    /// [`StoreErrorKind::Unavailable`] (default 5 s); a refused connection is retried until then.
    /// Ignored by [`from_pool`](Self::from_pool).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
    }

    fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
        url.parse::<PgConnectOptions>().map_err(map_sqlx_error)
    }

    /// Connects to `url` and runs the migrations; fails if the database cannot be reached.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        self.connect_with(Self::options(url)?).await
    }

    /// Like [`connect`](Self::connect), with parsed connection options.
    pub async fn connect_with(
        self,
        options: PgConnectOptions,
    ) -> Result<PostgresStore, StoreError> {
        let store = self.connect_lazy_with(options);
        store.migrate().await?;
        Ok(store)
    }

    /// A store that connects on first use (no I/O here); the migrations run before the first
    /// operation. Until the database can be reached, every operation fails with
    /// [`StoreErrorKind::Unavailable`]: a service can start while its database is down.
    pub fn connect_lazy(self, url: &str) -> Result<PostgresStore, StoreError> {
        Ok(self.connect_lazy_with(Self::options(url)?))
    }

    /// Like [`connect_lazy`](Self::connect_lazy), with parsed connection options.
    pub fn connect_lazy_with(self, options: PgConnectOptions) -> PostgresStore {
        let pool = self.pool_options().connect_lazy_with(options);
        PostgresStore::new(pool, &self.schema)
    }

    /// Uses an existing pool and runs the migrations.
    pub async fn from_pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::new(pool, &self.schema);
        store.migrate().await?;
        Ok(store)
    }
}

/// A [`KeyStore`] in PostgreSQL: persistent and shared by every instance of a service.
///
/// Cheap to clone (clones share the pool).
///
/// ```no_run
/// use tower_api_keys::resolver::CachedResolver;
/// use tower_api_keys::store::PostgresStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Connects and brings the schema up to date (versioned migrations under an advisory lock).
/// let store = PostgresStore::connect("postgres://app@db.internal/app").await?;
/// let resolver = CachedResolver::new(store.clone());
///
/// // Or in a dedicated schema, with a smaller pool:
/// let store = PostgresStore::builder()
///     .schema("billing_keys")?
///     .max_connections(4)
///     .connect("postgres://app@db.internal/app")
///     .await?;
/// # let _ = (resolver, store);
/// # Ok(())
/// # }
/// ```
///
/// # Layout
/// Everything lives in one schema (default `tower_api_keys`, created if missing):
/// - `api_keys`: one row per key. Digests are `BYTEA` (32 bytes) next to their scheme version
///   (`digest_scheme`, and `previous_digest_scheme` for a rotation grace period); scopes are a
///   `TEXT[]` in the set's sorted order; timestamps are `TIMESTAMPTZ`. No plaintext secret is stored.
/// - `api_key_digests`: every digest currently identifying a key (current and grace-period previous),
///   primary-keyed on the digest, so that a digest identifies at most one key across both columns.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Migrations run at start-up in one transaction holding a transaction-level advisory lock, so
///   instances starting together apply them once; they are idempotent.
/// - [`KeyStore::insert`] takes a transaction-level advisory lock per owner (and per account) before
///   counting active keys, so concurrent inserts from any number of instances never overshoot a limit.
/// - Timestamps keep PostgreSQL's microsecond precision: they are floored to the microsecond when
///   written and when compared (see [`KeyStore`]'s contract; records read back equal the inserted ones
///   when their times are whole microseconds).
/// - Connection failures are [`StoreErrorKind::Unavailable`], duplicates
///   [`StoreErrorKind::Conflict`], unreadable rows (an unknown digest scheme, a bad scope)
///   [`StoreErrorKind::Corrupt`]. Errors never quote the offending values.
///
/// TLS: enable one of sqlx's TLS features (e.g. `sqlx = { version = "0.9", features =
/// ["tls-rustls"] }`) in your own `Cargo.toml`; feature unification applies it here.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Sql>,
    migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The schema used when none is configured.
    pub const DEFAULT_SCHEMA: &str = "tower_api_keys";

    /// Connects to `url` with default settings (schema [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Uses an existing pool (schema [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)) and runs the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        Self::builder().from_pool(pool).await
    }

    /// A builder: schema, pool size, timeouts, lazy connection.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    fn new(pool: PgPool, schema: &str) -> Self {
        Self {
            pool,
            sql: Arc::new(Sql::new(schema)),
            migrated: Arc::new(OnceCell::new()),
        }
    }

    /// The connection pool (e.g. to share it with [`PgInvalidator`](crate::invalidate::PgInvalidator)).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// Brings the schema up to date. Runs once per store (again only after a failure); constructors
    /// other than the lazy ones already call it. Safe to run from several instances at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| self.run_migrations())
            .await
            .map(|_| ())
    }

    async fn run_migrations(&self) -> Result<(), StoreError> {
        let schema = &self.sql.schema;
        let s = &self.sql.quoted;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key(&["migrate", schema]))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        // Check first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when it exists.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {s}")))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {s}.api_key_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let current: i32 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COALESCE(max(version), 0) FROM {s}.api_key_migrations"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        for (version, description, sql) in migrations(s) {
            if version <= current {
                continue;
            }
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {s}.api_key_migrations (version, description) VALUES ($1, $2)"
            )))
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            tracing::info!(schema = %schema, version, "API key store migrated");
        }
        tx.commit().await.map_err(map_sqlx_error)
    }

    /// Writes the name and usage-limit columns of `record`.
    async fn write_limits(
        &self,
        conn: &mut sqlx::PgConnection,
        record: &KeyRecord,
    ) -> Result<(), StoreError> {
        let columns = LimitColumns::of(&record.limits);
        query(&self.sql.write_limits)
            .bind(record.id.as_str())
            .bind(record.name.as_str())
            .bind(columns.rate_limit)
            .bind(columns.rate_period_seconds)
            .bind(columns.credits_remaining)
            .bind(columns.credits_refill_interval)
            .bind(columns.credits_refill_amount)
            .bind(columns.credits_set_at)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        Ok(())
    }

    async fn lock(tx: &mut sqlx::PgConnection, parts: &[&str]) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key(parts))
            .execute(tx)
            .await
            .map(|_| ())
            .map_err(map_sqlx_error)
    }

    /// The key `id`, its row locked `FOR UPDATE` until `tx` ends. `None`: no such key.
    async fn lock_row(
        &self,
        tx: &mut sqlx::PgConnection,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row = query(&self.sql.get_for_update)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    /// Starts a cascade (revoke, delete, rotate ending the descendants) on key `id`: takes the
    /// per-owner cascade lock, so that two cascades over overlapping trees run one after the other
    /// instead of deadlocking on each other's rows, then locks the key's row. `None`: no such key.
    async fn begin_cascade(
        &self,
        tx: &mut sqlx::PgConnection,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row = query(&self.sql.get)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let Some(unlocked) = decode_opt(row)? else {
            return Ok(None);
        };
        // A key's owner never changes, so the lock read above is the lock of the row read below.
        Self::lock(tx, &["cascade", &self.sql.schema, &unlocked.owner]).await?;
        self.lock_row(tx, id).await
    }

    /// Revokes, at `at`, every descendant of `root` not revoked yet; returns those it revoked.
    ///
    /// Repeated until a pass revokes nothing. Under READ COMMITTED each pass sees what committed
    /// before it started; a delegated insert holds its creator `FOR SHARE`, so a pass revoking that
    /// creator waits for the insert to commit, and the next pass sees the new child. The last, empty
    /// pass starts once every key of the tree is revoked (by this transaction, which holds their rows
    /// until it commits, or by a committed one): from then on, an insert under any of them fails.
    async fn revoke_descendants(
        &self,
        tx: &mut sqlx::PgConnection,
        root: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let mut revoked = Vec::new();
        loop {
            let rows = query(&self.sql.revoke_descendants)
                .bind(root.as_str())
                .bind(micros(at))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            if rows.is_empty() {
                return Ok(revoked);
            }
            for row in &rows {
                revoked.push(decode(row)?);
            }
        }
    }
}

impl PostgresStore {
    /// Runs `chain` (a spend or refund of several levels) in its own transaction, again when
    /// PostgreSQL rolled it back as a deadlock victim or for serialization: nothing of a
    /// rolled-back attempt was kept, so running it again spends once.
    async fn chain_transaction<T>(
        &self,
        levels: &ChainLevels,
        rule: impl Fn(&mut [Option<Credits>]) -> T,
    ) -> Result<T, StoreError> {
        self.migrate().await?;
        let mut attempt = 1;
        loop {
            match self.chain_attempt(levels, &rule).await {
                Err(error) if attempt < CHAIN_ATTEMPTS && is_pg_retryable(&error) => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One attempt of [`chain_transaction`](Self::chain_transaction): lock every level's row in
    /// one order, apply `rule`, write the levels it changed, commit.
    async fn chain_attempt<T>(
        &self,
        levels: &ChainLevels,
        rule: &impl Fn(&mut [Option<Credits>]) -> T,
    ) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let key_ids: Vec<&str> = levels.keys().map(KeyId::as_str).collect();
        let mut keys = std::collections::HashMap::new();
        if !key_ids.is_empty() {
            let rows = query(&self.sql.lock_key_credits)
                .bind(&key_ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            for row in &rows {
                let id: String = row.try_get(0).map_err(map_sqlx_error)?;
                keys.insert(id, limits_at(row, 1)?.credits);
            }
        }
        let pool_keys: Vec<(&str, &str, &str)> = levels.pools().map(pool_key).collect();
        let mut pools = std::collections::HashMap::new();
        if !pool_keys.is_empty() {
            let rows = query(&self.sql.lock_pool_credits)
                .bind(pool_keys.iter().map(|k| k.0).collect::<Vec<_>>())
                .bind(pool_keys.iter().map(|k| k.1).collect::<Vec<_>>())
                .bind(pool_keys.iter().map(|k| k.2).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            for row in &rows {
                let key: (String, String, String) = (
                    row.try_get(0).map_err(map_sqlx_error)?,
                    row.try_get(1).map_err(map_sqlx_error)?,
                    row.try_get(2).map_err(map_sqlx_error)?,
                );
                pools.insert(key, limits_at(row, 3)?.credits);
            }
        }
        let before: Vec<Option<Credits>> = levels
            .unique
            .iter()
            .map(|level| match level {
                BudgetId::Key(id) => keys.get(id.as_str()).copied().flatten(),
                BudgetId::Pool(pool) => {
                    let (owner, kind, account) = pool_key(pool);
                    pools
                        .get(&(owner.to_owned(), kind.to_owned(), account.to_owned()))
                        .copied()
                        .flatten()
                }
            })
            .collect();
        let mut after = before.clone();
        let outcome = rule(&mut after);
        let (mut key_writes, mut pool_writes) = (CreditWrites::default(), CreditWrites::default());
        for ((level, old), new) in levels.unique.iter().zip(&before).zip(&after) {
            let Some(new) = new.filter(|new| Some(*new) != *old) else {
                continue;
            };
            match level {
                BudgetId::Key(id) => key_writes.push(id.as_str(), "", "", new),
                BudgetId::Pool(pool) => {
                    let (owner, kind, account) = pool_key(pool);
                    pool_writes.push(owner, kind, account, new);
                }
            }
        }
        if !key_writes.remaining.is_empty() {
            query(&self.sql.write_key_credits)
                .bind(&key_writes.owner)
                .bind(&key_writes.remaining)
                .bind(&key_writes.set_at)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        if !pool_writes.remaining.is_empty() {
            query(&self.sql.write_pool_credits)
                .bind(&pool_writes.owner)
                .bind(&pool_writes.kind)
                .bind(&pool_writes.account)
                .bind(&pool_writes.remaining)
                .bind(&pool_writes.set_at)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }
}

/// The credit columns of the levels one chain changed, as arrays for one `UNNEST` update each
/// (`owner` holds the key id for keys).
#[derive(Default)]
struct CreditWrites<'a> {
    owner: Vec<&'a str>,
    kind: Vec<&'a str>,
    account: Vec<&'a str>,
    remaining: Vec<i64>,
    set_at: Vec<OffsetDateTime>,
}

impl<'a> CreditWrites<'a> {
    fn push(&mut self, owner: &'a str, kind: &'a str, account: &'a str, credits: Credits) {
        let columns = LimitColumns::of(&UsageLimits {
            rate_limit: None,
            credits: Some(credits),
        });
        self.owner.push(owner);
        self.kind.push(kind);
        self.account.push(account);
        self.remaining
            .push(columns.credits_remaining.unwrap_or_default());
        self.set_at.push(micros(credits.set_at));
    }
}

fn digest_list<'a>(digests: impl Iterator<Item = &'a KeyDigest>) -> Vec<Vec<u8>> {
    digests.map(|d| d.as_bytes().to_vec()).collect()
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        let row = query(&self.sql.find_by_digest)
            .bind(&digest.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        let row = query(&self.sql.get)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        let rows = query(&self.sql.list)
            .bind(q.owner.as_str())
            .bind(q.before.as_ref().map(KeyId::as_str))
            .bind(i64::from(q.limit))
            .bind(q.account.as_deref())
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.migrate().await?;
        let active: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.count_active)))
            .bind(owner)
            .bind(account)
            .bind(micros(now))
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        Ok(active.max(0) as u64)
    }

    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.migrate().await?;
        let schema = self.sql.schema.as_str();
        let now = micros(now);
        let digests = digest_list(record.digests());
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        // Lock order is always owner, then account, so two inserts never wait on each other in a
        // cycle. The locks are held until commit; the counts below see every earlier holder's insert.
        if limits.per_owner.is_some() {
            Self::lock(&mut tx, &["owner", schema, &record.owner]).await?;
        }
        if limits.per_account.is_some() {
            Self::lock(&mut tx, &["account", schema, &record.account]).await?;
        }
        let exists: bool = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.exists)))
            .bind(record.id.as_str())
            .bind(&digests)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        if exists {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        if let Some(creator) = &record.created_by {
            let active = query(&self.sql.creator_active)
                .bind(creator.as_str())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            if active.is_none() {
                return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
            }
        }
        for (limit, sql, value, scope) in [
            (
                limits.per_owner,
                &self.sql.count_owner,
                &record.owner,
                "owner",
            ),
            (
                limits.per_account,
                &self.sql.count_account,
                &record.account,
                "account",
            ),
        ] {
            let Some(limit) = limit else { continue };
            let active: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(sql)))
                .bind(value.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            if active >= i64::from(limit) {
                return Err(StoreError::from_kind(StoreErrorKind::LimitReached {
                    limit,
                    scope,
                }));
            }
        }
        let previous = record.previous.as_ref();
        let limits_columns = LimitColumns::of(&record.limits);
        query(&self.sql.insert)
            .bind(record.id.as_str())
            .bind(record.name.as_str())
            .bind(record.owner.as_str())
            .bind(record.account.as_str())
            .bind(record.scopes.to_strings())
            .bind(&record.digest.as_bytes()[..])
            .bind(i32::from(record.digest_scheme.version()))
            .bind(record.masked_key.as_str())
            .bind(micros(record.created_at))
            .bind(record.expires_at.map(micros))
            .bind(record.revoked_at.map(micros))
            .bind(record.last_used_at.map(micros))
            .bind(record.created_by.as_ref().map(KeyId::as_str))
            .bind(record.rotated_at.map(micros))
            .bind(previous.map(|p| p.digest.as_bytes().to_vec()))
            .bind(previous.map(|p| i32::from(p.digest_scheme.version())))
            .bind(previous.map(|p| micros(p.valid_until)))
            .bind(limits_columns.rate_limit)
            .bind(limits_columns.rate_period_seconds)
            .bind(limits_columns.credits_remaining)
            .bind(limits_columns.credits_refill_interval)
            .bind(limits_columns.credits_refill_amount)
            .bind(limits_columns.credits_set_at)
            .bind(networks_text(record.allowed_networks.as_ref()))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        query(&self.sql.insert_digests)
            .bind(&digests)
            .bind(record.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let Some(before) = self.begin_cascade(&mut tx, id).await? else {
            return Ok(None);
        };
        let row = query(&self.sql.revoke)
            .bind(id.as_str())
            .bind(micros(at))
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = self.revoke_descendants(&mut tx, id, at).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(KeyChange {
            before,
            after,
            revoked_descendants,
        }))
    }

    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        if self.begin_cascade(&mut tx, id).await?.is_none() {
            return Ok(None);
        }
        // `api_key_digests` rows go with it (ON DELETE CASCADE).
        let row = query(&self.sql.delete)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let Some(before) = decode_opt(row)? else {
            return Ok(None);
        };
        let revoked_descendants = self.revoke_descendants(&mut tx, id, at).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(KeyChange {
            before,
            after: None,
            revoked_descendants,
        }))
    }

    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let old = if rotation.revoke_descendants {
            self.begin_cascade(&mut tx, id).await?
        } else {
            self.lock_row(&mut tx, id).await?
        };
        let Some(old) = old else {
            return Ok(None);
        };
        if old.revoked_at.is_some() {
            return Err(StoreError::from_kind(StoreErrorKind::Revoked));
        }
        // Registering the new digest first fails on any digest in use, this key's included.
        query(&self.sql.insert_digests)
            .bind(vec![rotation.digest.as_bytes().to_vec()])
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let previous = rotation
            .previous_valid_until
            .map(|until| (old.digest, old.digest_scheme, micros(until)));
        let keep = digest_list(
            std::iter::once(&rotation.digest).chain(previous.as_ref().map(|(d, _, _)| d)),
        );
        query(&self.sql.drop_digests)
            .bind(id.as_str())
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let row = query(&self.sql.rotate)
            .bind(id.as_str())
            .bind(&rotation.digest.as_bytes()[..])
            .bind(i32::from(rotation.digest_scheme.version()))
            .bind(rotation.masked_key.as_str())
            .bind(micros(rotation.rotated_at))
            .bind(previous.map(|(d, _, _)| d.as_bytes().to_vec()))
            .bind(previous.map(|(_, s, _)| i32::from(s.version())))
            .bind(previous.map(|(_, _, until)| until))
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = if rotation.revoke_descendants {
            self.revoke_descendants(&mut tx, id, rotation.rotated_at)
                .await?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(KeyChange {
            before: old,
            after,
            revoked_descendants,
        }))
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        self.migrate().await?;
        let ids: Vec<&str> = uses.iter().map(|(id, _)| id.as_str()).collect();
        let times: Vec<OffsetDateTime> = uses.iter().map(|(_, at)| micros(*at)).collect();
        query(&self.sql.last_used)
            .bind(ids)
            .bind(times)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_sqlx_error)
    }

    async fn format_secrets(
        &self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let now = micros(now);
        // Insert-if-absent, then read. Instances starting together race on the primary keys: the
        // losers' inserts wait for the winner's and do nothing, and every SELECT sees the winner's rows.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_format (id, legacy_keys, created_at) \
             SELECT 1, EXISTS (SELECT 1 FROM {s}.api_keys), $1 ON CONFLICT (id) DO NOTHING"
        )))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_format_secrets (version, secret, created_at) \
             SELECT 1, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM {s}.api_key_format_secrets) \
             ON CONFLICT (version) DO NOTHING"
        )))
        .bind(initial.expose_secret())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        let legacy_keys: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT legacy_keys FROM {s}.api_key_format WHERE id = 1"
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT version, secret, created_at, retired_at FROM {s}.api_key_format_secrets \
             ORDER BY version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        let secrets = rows
            .iter()
            .map(|row| {
                let version: i32 = row.try_get(0).map_err(map_sqlx_error)?;
                StoredSecret::from_row(
                    i64::from(version),
                    row.try_get(1).map_err(map_sqlx_error)?,
                    row.try_get(2).map_err(map_sqlx_error)?,
                    row.try_get(3).map_err(map_sqlx_error)?,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(FormatSecrets {
            secrets,
            legacy_keys,
        })
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let version: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_format_secrets (version, secret, created_at) \
             SELECT COALESCE(max(version), 0) + 1, $1, $2 FROM {s}.api_key_format_secrets \
             HAVING COALESCE(max(version), 0) < $3 RETURNING version"
        )))
        .bind(secret.expose_secret())
        .bind(micros(now))
        .bind(i32::from(MAX_SECRET_VERSION))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        version.and_then(|v| u8::try_from(v).ok()).ok_or_else(|| {
            StoreError::new(StoreErrorKind::Conflict, "every secret version is used")
        })
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        // Serialised, so that two retirements cannot each leave the other's version as the last one.
        Self::lock(&mut tx, &["format_secrets", &self.sql.schema]).await?;
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_format_secrets SET retired_at = $2 \
             WHERE version = $1 AND retired_at IS NULL AND EXISTS (\
               SELECT 1 FROM {s}.api_key_format_secrets WHERE version <> $1 AND retired_at IS NULL)"
        )))
        .bind(i32::from(version))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_format (id, legacy_keys, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET legacy_keys = excluded.legacy_keys"
        )))
        .bind(accept)
        .bind(micros(now))
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(map_sqlx_error)
    }

    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let Some(mut record) = self.lock_row(&mut tx, id).await? else {
            return Ok(None);
        };
        update.apply(&mut record);
        if let Some(credits) = record.limits.credits.as_mut() {
            credits.set_at = micros(credits.set_at);
        }
        self.write_limits(&mut tx, &record).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(record))
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        self.migrate().await?;
        // The row lock serialises every adjustment of this key across every instance.
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let Some(mut record) = self.lock_row(&mut tx, id).await? else {
            return Ok(None);
        };
        let Some(credits) = record.limits.credits.as_mut() else {
            return Ok(None);
        };
        let before = *credits;
        let outcome = super::adjust(credits, delta, micros(now));
        if *credits != before {
            self.write_limits(&mut tx, &record).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(outcome))
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        let rows = query(&self.sql.ancestors)
            .bind(id.as_str())
            .bind(MAX_DELEGATION_DEPTH as i32)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        let rows = query(&self.sql.descendants)
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        self.migrate().await?;
        let rows = query(&self.sql.budget_above)
            .bind(record.created_by.as_ref().map(KeyId::as_str))
            .bind(MAX_DELEGATION_DEPTH as i32)
            .bind(record.owner.as_str())
            .bind(record.account.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        let owner: Arc<str> = record.owner.as_str().into();
        let mut levels = Vec::with_capacity(rows.len());
        for row in &rows {
            let kind: String = row.try_get(0).map_err(map_sqlx_error)?;
            let name: String = row.try_get(1).map_err(map_sqlx_error)?;
            let id = match kind.as_str() {
                "key" => BudgetId::Key(KeyId::new(name)),
                "account" => BudgetId::Pool(PoolId::account(owner.clone(), name)),
                _ => BudgetId::Pool(PoolId::owner(owner.clone())),
            };
            let limits = limits_at(row, 3)?;
            if !limits.is_unlimited() {
                levels.push(BudgetLevel { id, limits });
            }
        }
        Ok(levels)
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        self.migrate().await?;
        let (owner, kind, account) = pool_key(pool);
        let row = query(&self.sql.pool)
            .bind(owner)
            .bind(kind)
            .bind(account)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        row.map(|row| limits_at(&row, 0)).transpose()
    }

    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let (owner, kind, account) = pool_key(pool);
        let Some(limits) = limits else {
            if if_absent {
                // Removing only what is absent removes nothing.
                return Ok(false);
            }
            let done = query(&self.sql.pool_delete)
                .bind(owner)
                .bind(kind)
                .bind(account)
                .execute(&self.pool)
                .await
                .map_err(map_sqlx_error)?;
            return Ok(done.rows_affected() == 1);
        };
        let columns = LimitColumns::of(&limits);
        // Insert-if-absent on the primary key: racing instances wait for the first insert and
        // then do nothing.
        let sql = if if_absent {
            &self.sql.pool_insert
        } else {
            &self.sql.pool_upsert
        };
        let done = query(sql)
            .bind(owner)
            .bind(kind)
            .bind(account)
            .bind(columns.rate_limit)
            .bind(columns.rate_period_seconds)
            .bind(columns.credits_remaining)
            .bind(columns.credits_refill_interval)
            .bind(columns.credits_refill_amount)
            .bind(columns.credits_set_at)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        self.chain_transaction(&levels, |credits| levels.spend(credits, cost, now))
            .await
    }

    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        self.chain_transaction(&levels, |credits| levels.refund(credits, cost, now))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        for good in ["a", "tower_api_keys", "_x1", "T$1", &"a".repeat(63)] {
            assert!(check_identifier(good, "schema").is_ok(), "{good}");
        }
        for bad in ["", "1a", "$a", "a-b", "a\"b", "a b", "é", &"a".repeat(64)] {
            assert!(check_identifier(bad, "schema").is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_keys_are_stable_and_unambiguous() {
        assert_eq!(
            lock_key(&["owner", "s", "o"]),
            lock_key(&["owner", "s", "o"])
        );
        assert_ne!(
            lock_key(&["owner", "s", "ab"]),
            lock_key(&["owner", "sa", "b"])
        );
        assert_ne!(
            lock_key(&["owner", "s", "x"]),
            lock_key(&["account", "s", "x"])
        );
    }
}
