//! [`SqliteStore`]: keys in an embedded SQLite database file (feature `sqlite`); its docs say how.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::sql_common::{
    LimitColumns, RawRecord, from_unix_micros, is_sqlite_busy, map_sqlx_error, micros,
    networks_text, pool_key, to_unix_micros,
};
use super::{
    ChainLevels, ChainSpend, CreditAdjustment, FormatSecrets, KeyChange, KeyLimits, KeyRecord,
    KeyStore, KeyUpdate, ListQuery, MAX_DELEGATION_DEPTH, Rotation, StoreError, StoreErrorKind,
    StoredSecret,
};
use crate::key::{FormatSecret, KeyDigest, KeyId, MAX_SECRET_VERSION};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};

/// The columns of `api_keys`, in the order [`decode`] reads them.
macro_rules! columns {
    () => {
        "id, name, owner, account, scopes, digest, digest_scheme, masked_key, created_at, \
         expires_at, revoked_at, last_used_at, created_by, rotated_at, previous_digest, \
         previous_digest_scheme, previous_valid_until, rate_limit, rate_period_seconds, \
         credits_remaining, credits_refill_interval, credits_refill_amount, credits_set_at, \
         allowed_networks"
    };
}

/// The usage-limit columns of `api_keys` and `api_key_pools`, in the order [`decode_limits`]
/// reads them.
macro_rules! limit_columns {
    () => {
        "rate_limit, rate_period_seconds, credits_remaining, credits_refill_interval, \
         credits_refill_amount, credits_set_at"
    };
}

/// The recursive CTE `tree(id)`: every descendant of the key `?1` (its subtree without itself).
/// Shared by the cascades and [`KeyStore::descendants`].
macro_rules! descendant_tree {
    () => {
        "WITH RECURSIVE tree(id) AS ( \
            SELECT id FROM api_keys WHERE created_by = ?1 \
            UNION SELECT k.id FROM api_keys AS k JOIN tree ON k.created_by = tree.id) "
    };
}

/// The recursive CTE `chain(cid, parent, depth)`: the key `{seed}` at depth 1 and its creators
/// up to depth `?2` ([`MAX_DELEGATION_DEPTH`]); it stops where a creator is gone. Shared by
/// [`KeyStore::ancestors`] and [`KeyStore::budget_above`].
macro_rules! ancestor_chain {
    ($seed:literal) => {
        concat!(
            "WITH RECURSIVE chain(cid, parent, depth) AS ( \
                SELECT id, created_by, 1 FROM api_keys WHERE id = ",
            $seed,
            " UNION ALL SELECT k.id, k.created_by, c.depth + 1 FROM api_keys AS k \
                JOIN chain AS c ON k.id = c.parent WHERE c.depth < ?2) "
        )
    };
}

/// How many times [`SqliteStore::connect_with`] tries a file database that answers "busy".
const START_ATTEMPTS: u64 = 10;

/// The schema's migrations, in order. Versions are never renumbered or edited once released.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "api_keys and api_key_digests",
        r#"
CREATE TABLE api_keys (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT NOT NULL,
    scopes TEXT NOT NULL,
    digest BLOB NOT NULL CHECK (length(digest) = 32),
    digest_scheme INTEGER NOT NULL,
    masked_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    created_by TEXT,
    rotated_at INTEGER,
    previous_digest BLOB CHECK (length(previous_digest) = 32),
    previous_digest_scheme INTEGER,
    previous_valid_until INTEGER,
    CHECK ((previous_digest IS NULL) = (previous_digest_scheme IS NULL)
       AND (previous_digest IS NULL) = (previous_valid_until IS NULL))
) STRICT;
CREATE UNIQUE INDEX api_keys_digest_key ON api_keys (digest);
CREATE UNIQUE INDEX api_keys_previous_digest_key ON api_keys (previous_digest)
    WHERE previous_digest IS NOT NULL;
CREATE INDEX api_keys_owner_id_idx ON api_keys (owner, id);
CREATE INDEX api_keys_account_idx ON api_keys (account);
CREATE TABLE api_key_digests (
    digest BLOB NOT NULL PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE
) STRICT;
CREATE INDEX api_key_digests_key_id_idx ON api_key_digests (key_id);
"#,
    ),
    (
        2,
        "api_keys.created_by index (cascading revocation)",
        "CREATE INDEX api_keys_created_by_idx ON api_keys (created_by) WHERE created_by IS NOT NULL;",
    ),
    (
        3,
        "api_key_format and api_key_format_secrets (keyed key format)",
        r#"
CREATE TABLE api_key_format (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    legacy_keys INTEGER NOT NULL CHECK (legacy_keys IN (0, 1)),
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE api_key_format_secrets (
    version INTEGER NOT NULL PRIMARY KEY CHECK (version BETWEEN 1 AND 61),
    secret BLOB NOT NULL CHECK (length(secret) >= 32),
    created_at INTEGER NOT NULL,
    retired_at INTEGER
) STRICT;
"#,
    ),
    (
        4,
        "per-key rate limits and credits",
        // Existing keys get NULLs: no limit.
        r#"
ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN rate_period_seconds INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_remaining INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_refill_interval TEXT;
ALTER TABLE api_keys ADD COLUMN credits_refill_amount INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_set_at INTEGER;
"#,
    ),
    (
        5,
        "allowed networks and shared pools (containment)",
        // Existing keys get NULL: usable from anywhere. A pool is an owner's (`kind` 'owner',
        // `account` '') or one account's; its limit columns are those of `api_keys`.
        r#"
ALTER TABLE api_keys ADD COLUMN allowed_networks TEXT;
CREATE TABLE api_key_pools (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('owner', 'account')),
    account TEXT NOT NULL,
    rate_limit INTEGER,
    rate_period_seconds INTEGER,
    credits_remaining INTEGER,
    credits_refill_interval TEXT,
    credits_refill_amount INTEGER,
    credits_set_at INTEGER,
    CHECK (kind = 'account' OR account = ''),
    PRIMARY KEY (owner, kind, account)
) STRICT;
"#,
    ),
];

fn decode(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let time = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
        row.try_get::<Option<i64>, _>(i)
            .map_err(map_sqlx_error)?
            .map(from_unix_micros)
            .transpose()
    };
    let text = |i: usize| row.try_get::<String, _>(i).map_err(map_sqlx_error);
    let scopes: Vec<String> =
        serde_json::from_str(&text(4)?).map_err(|e| StoreError::new(StoreErrorKind::Corrupt, e))?;
    let created_at = time(8)?.ok_or_else(|| StoreError::from_kind(StoreErrorKind::Corrupt))?;
    let raw = RawRecord {
        id: text(0)?,
        name: text(1)?,
        owner: text(2)?,
        account: text(3)?,
        scopes,
        digest: row.try_get(5).map_err(map_sqlx_error)?,
        digest_scheme: row.try_get(6).map_err(map_sqlx_error)?,
        masked_key: text(7)?,
        created_at,
        expires_at: time(9)?,
        revoked_at: time(10)?,
        last_used_at: time(11)?,
        created_by: row.try_get(12).map_err(map_sqlx_error)?,
        rotated_at: time(13)?,
        previous_digest: row.try_get(14).map_err(map_sqlx_error)?,
        previous_digest_scheme: row.try_get(15).map_err(map_sqlx_error)?,
        previous_valid_until: time(16)?,
        limits: decode_limits(row, 17)?,
        allowed_networks: row.try_get(23).map_err(map_sqlx_error)?,
    };
    raw.into_record()
}

/// The six [`limit_columns`] starting at column `at`.
fn decode_limits(row: &SqliteRow, at: usize) -> Result<LimitColumns, StoreError> {
    let get = |i: usize| {
        row.try_get::<Option<i64>, _>(at + i)
            .map_err(map_sqlx_error)
    };
    Ok(LimitColumns {
        rate_limit: get(0)?,
        rate_period_seconds: get(1)?,
        credits_remaining: get(2)?,
        credits_refill_interval: row.try_get(at + 3).map_err(map_sqlx_error)?,
        credits_refill_amount: get(4)?,
        credits_set_at: get(5)?.map(from_unix_micros).transpose()?,
    })
}

fn decode_opt(row: Option<SqliteRow>) -> Result<Option<KeyRecord>, StoreError> {
    row.as_ref().map(decode).transpose()
}

/// A [`KeyStore`] in a SQLite database: persistent, embedded, for one host.
///
/// Cheap to clone (clones share the pool). Several stores (or processes) may open the same file;
/// limits stay exact because checked writes are serialised by SQLite.
///
/// ```no_run
/// use tower_api_keys::resolver::CachedResolver;
/// use tower_api_keys::store::SqliteStore;
///
/// # async fn run() -> Result<(), tower_api_keys::store::StoreError> {
/// // `mode=rwc` creates the file if missing; the schema is migrated at start-up.
/// let store = SqliteStore::connect("sqlite://keys.db?mode=rwc").await?;
/// let resolver = CachedResolver::new(store.clone());
/// # let _ = resolver;
/// # Ok(())
/// # }
/// ```
///
/// # Layout
/// - `api_keys` (a `STRICT` table): digests are 32-byte `BLOB`s next to their scheme version
///   (`digest_scheme`, and `previous_digest_scheme` for a rotation grace period); scopes are a JSON
///   array of strings in the set's sorted order; timestamps are `INTEGER` microseconds since the Unix
///   epoch (UTC). No plaintext secret is stored.
/// - `api_key_digests`: every digest currently identifying a key, primary-keyed on the digest.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Writes that check before they write (limits, conflicts, rotation) run in `BEGIN IMMEDIATE`
///   transactions, which SQLite serialises across every connection and process using the file:
///   concurrent inserts never overshoot a limit.
/// - Timestamps are floored to the microsecond when written and when compared, like
///   `PostgresStore`.
/// - File databases are switched to WAL mode by [`SqliteStore::connect`], so readers do not wait for
///   writers. Busy connections wait up to 5 s (sqlx's `busy_timeout`) before failing.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database at `url` (e.g. `sqlite://keys.db?mode=rwc` to create it if missing),
    /// switches a file database to WAL mode and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url).map_err(map_sqlx_error)?;
        Self::connect_with(options).await
    }

    /// Like [`connect`](Self::connect), with parsed options. A `:memory:` database gets a single
    /// connection that is never closed (see [`in_memory`](Self::in_memory)).
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let in_memory = options.get_filename().as_os_str() == ":memory:"
            || options
                .get_filename()
                .to_str()
                .is_some_and(|f| f.starts_with("file:sqlx-in-memory-"));
        if in_memory {
            let pool = Self::memory_pool_options()
                .connect_with(options)
                .await
                .map_err(map_sqlx_error)?;
            return Self::from_pool(pool).await;
        }
        let options = options.journal_mode(SqliteJournalMode::Wal);
        // Instances starting together on a new file contend for the lock that switches it to WAL,
        // and SQLite answers some of those contentions "busy" at once, without waiting: retry.
        let mut attempt = 1;
        loop {
            let started = async {
                let pool = SqlitePoolOptions::new()
                    .connect_with(options.clone())
                    .await
                    .map_err(map_sqlx_error)?;
                Self::from_pool(pool).await
            };
            match started.await {
                Err(error) if attempt < START_ATTEMPTS && is_sqlite_busy(&error) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// A private in-memory database, gone when the store (and its clones) are dropped. Handy for
    /// tests; use [`MemoryStore`](super::MemoryStore) when persistence does not matter at all.
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(map_sqlx_error)?;
        let pool = Self::memory_pool_options()
            .connect_with(options)
            .await
            .map_err(map_sqlx_error)?;
        Self::from_pool(pool).await
    }

    /// One connection, kept open: an in-memory database lives only as long as a connection to it.
    fn memory_pool_options() -> SqlitePoolOptions {
        SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    }

    /// Uses an existing pool and runs the migrations.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        let store = Self {
            pool,
            migrated: Arc::new(OnceCell::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Brings the schema up to date (constructors already call it). Idempotent, and safe when
    /// several processes open the same file at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| self.run_migrations())
            .await
            .map(|_| ())
    }

    async fn run_migrations(&self) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS api_key_migrations (
                version INTEGER NOT NULL PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at INTEGER NOT NULL
            ) STRICT",
        )
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM api_key_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        for &(version, description, sql) in MIGRATIONS {
            if version <= current {
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            sqlx::query(
                "INSERT INTO api_key_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            )
            .bind(version)
            .bind(description)
            .bind(to_unix_micros(OffsetDateTime::now_utc()))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            tracing::info!(version, "API key store migrated");
        }
        tx.commit().await.map_err(map_sqlx_error)
    }

    /// A transaction holding SQLite's write lock from its first statement.
    async fn begin_immediate(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_sqlx_error)
    }

    async fn register_digests<'a>(
        conn: &mut SqliteConnection,
        id: &KeyId,
        digests: impl Iterator<Item = &'a KeyDigest>,
    ) -> Result<(), StoreError> {
        for digest in digests {
            sqlx::query("INSERT INTO api_key_digests (digest, key_id) VALUES (?1, ?2)")
                .bind(&digest.as_bytes()[..])
                .bind(id.as_str())
                .execute(&mut *conn)
                .await
                .map_err(map_sqlx_error)?;
        }
        Ok(())
    }

    /// The record `id`, read on `conn` (inside the caller's transaction). `None`: no such key.
    async fn fetch(
        conn: &mut SqliteConnection,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    /// Revokes, at `at`, every descendant of `root` not revoked yet; returns those it revoked.
    /// Runs inside the caller's `BEGIN IMMEDIATE` transaction, so no insert interleaves.
    async fn revoke_descendants(
        conn: &mut SqliteConnection,
        root: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            descendant_tree!(),
            "UPDATE api_keys SET revoked_at = ?2 \
             WHERE revoked_at IS NULL AND id IN (SELECT id FROM tree) RETURNING ",
            columns!(),
            ""
        ))
        .bind(root.as_str())
        .bind(to_unix_micros(at))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }
}

fn scopes_json(record: &KeyRecord) -> String {
    serde_json::Value::from(record.scopes.to_strings()).to_string()
}

#[async_trait::async_trait]
impl KeyStore for SqliteStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        // Two unique-index lookups, whatever the planner's statistics say.
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE digest = ?1 UNION ALL SELECT ",
            columns!(),
            " FROM api_keys WHERE previous_digest = ?1 LIMIT 1"
        ))
        .bind(&digest.as_bytes()[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE owner = ?1 AND (?2 IS NULL OR id < ?2) \
             AND (?4 IS NULL OR account = ?4) ORDER BY id DESC LIMIT ?3"
        ))
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
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE owner = ?1 AND (?2 IS NULL OR account = ?2) \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)",
        )
        .bind(owner)
        .bind(account)
        .bind(to_unix_micros(now))
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
        let now = to_unix_micros(now);
        let mut tx = self.begin_immediate().await?;
        let mut conflict: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1)")
                .bind(record.id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        for digest in record.digests() {
            conflict |= sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM api_key_digests WHERE digest = ?1)",
            )
            .bind(&digest.as_bytes()[..])
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        }
        if conflict {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        if let Some(creator) = &record.created_by {
            let active: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2))",
            )
            .bind(creator.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            if !active {
                return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
            }
        }
        for (limit, sql, value, scope) in [
            (
                limits.per_owner,
                "SELECT count(*) FROM api_keys WHERE owner = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2)",
                &record.owner,
                "owner",
            ),
            (
                limits.per_account,
                "SELECT count(*) FROM api_keys WHERE account = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2)",
                &record.account,
                "account",
            ),
        ] {
            let Some(limit) = limit else { continue };
            let active: i64 = sqlx::query_scalar(sql)
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
        sqlx::query(concat!(
            "INSERT INTO api_keys (",
            columns!(),
            ") VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
        ))
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(record.owner.as_str())
        .bind(record.account.as_str())
        .bind(scopes_json(record))
        .bind(&record.digest.as_bytes()[..])
        .bind(i64::from(record.digest_scheme.version()))
        .bind(record.masked_key.as_str())
        .bind(to_unix_micros(record.created_at))
        .bind(record.expires_at.map(to_unix_micros))
        .bind(record.revoked_at.map(to_unix_micros))
        .bind(record.last_used_at.map(to_unix_micros))
        .bind(record.created_by.as_ref().map(KeyId::as_str))
        .bind(record.rotated_at.map(to_unix_micros))
        .bind(previous.map(|p| p.digest.as_bytes().to_vec()))
        .bind(previous.map(|p| i64::from(p.digest_scheme.version())))
        .bind(previous.map(|p| to_unix_micros(p.valid_until)))
        .bind(limits_columns.rate_limit)
        .bind(limits_columns.rate_period_seconds)
        .bind(limits_columns.credits_remaining)
        .bind(limits_columns.credits_refill_interval)
        .bind(limits_columns.credits_refill_amount)
        .bind(limits_columns.credits_set_at.map(to_unix_micros))
        .bind(networks_text(record.allowed_networks.as_ref()))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        Self::register_digests(&mut tx, &record.id, record.digests()).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let Some(before) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.as_str())
        .bind(to_unix_micros(at))
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = Self::revoke_descendants(&mut tx, id, at).await?;
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
        let mut tx = self.begin_immediate().await?;
        // Explicitly, rather than through ON DELETE CASCADE: a pool may have foreign keys off.
        sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let row = sqlx::query(concat!(
            "DELETE FROM api_keys WHERE id = ?1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let Some(before) = decode_opt(row)? else {
            return Ok(None);
        };
        let revoked_descendants = Self::revoke_descendants(&mut tx, id, at).await?;
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
        let mut tx = self.begin_immediate().await?;
        let Some(old) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        if old.revoked_at.is_some() {
            return Err(StoreError::from_kind(StoreErrorKind::Revoked));
        }
        // Registering the new digest first fails on any digest in use, this key's included.
        Self::register_digests(&mut tx, id, std::iter::once(&rotation.digest)).await?;
        let previous = rotation
            .previous_valid_until
            .map(|until| (old.digest, old.digest_scheme, to_unix_micros(until)));
        for digest in old.digests() {
            if previous.as_ref().is_some_and(|(kept, _, _)| kept == digest) {
                continue;
            }
            sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1 AND digest = ?2")
                .bind(id.as_str())
                .bind(&digest.as_bytes()[..])
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        let row = sqlx::query(concat!("UPDATE api_keys SET digest = ?2, digest_scheme = ?3, masked_key = ?4, rotated_at = ?5, \
             previous_digest = ?6, previous_digest_scheme = ?7, previous_valid_until = ?8 \
             WHERE id = ?1 RETURNING ", columns!(), ""))
        .bind(id.as_str())
        .bind(&rotation.digest.as_bytes()[..])
        .bind(i64::from(rotation.digest_scheme.version()))
        .bind(rotation.masked_key.as_str())
        .bind(to_unix_micros(rotation.rotated_at))
        .bind(previous.map(|(d, _, _)| d.as_bytes().to_vec()))
        .bind(previous.map(|(_, s, _)| i64::from(s.version())))
        .bind(previous.map(|(_, _, until)| until))
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = if rotation.revoke_descendants {
            Self::revoke_descendants(&mut tx, id, rotation.rotated_at).await?
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
        let batch: Vec<serde_json::Value> = uses
            .iter()
            .map(|(id, at)| serde_json::json!([id.as_str(), to_unix_micros(*at)]))
            .collect();
        sqlx::query(
            "UPDATE api_keys SET last_used_at = u.at \
             FROM (SELECT json_extract(value, '$[0]') AS id, max(json_extract(value, '$[1]')) AS at \
                   FROM json_each(?1) GROUP BY 1) AS u \
             WHERE api_keys.id = u.id \
               AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < u.at)",
        )
        .bind(serde_json::Value::from(batch).to_string())
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
        let now = to_unix_micros(now);
        // Insert-if-absent, then read, in one write transaction: SQLite serialises them across
        // processes, and whichever instance comes first writes the row every other one reads.
        let mut tx = self.begin_immediate().await?;
        sqlx::query(
            "INSERT INTO api_key_format (id, legacy_keys, created_at) \
             SELECT 1, EXISTS (SELECT 1 FROM api_keys), ?1 WHERE true ON CONFLICT (id) DO NOTHING",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(
            "INSERT INTO api_key_format_secrets (version, secret, created_at) \
             SELECT 1, ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM api_key_format_secrets) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(initial.expose_secret())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let legacy: i64 = sqlx::query_scalar("SELECT legacy_keys FROM api_key_format WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let rows = sqlx::query(
            "SELECT version, secret, created_at, retired_at FROM api_key_format_secrets \
             ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        let secrets = rows
            .iter()
            .map(|row| {
                let time = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
                    row.try_get::<Option<i64>, _>(i)
                        .map_err(map_sqlx_error)?
                        .map(from_unix_micros)
                        .transpose()
                };
                StoredSecret::from_row(
                    row.try_get(0).map_err(map_sqlx_error)?,
                    row.try_get(1).map_err(map_sqlx_error)?,
                    time(2)?.ok_or_else(|| StoreError::from_kind(StoreErrorKind::Corrupt))?,
                    time(3)?,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(FormatSecrets {
            secrets,
            legacy_keys: legacy != 0,
        })
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(version), 0) + 1 FROM api_key_format_secrets")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        let version = u8::try_from(version)
            .ok()
            .filter(|v| *v <= MAX_SECRET_VERSION)
            .ok_or_else(|| {
                StoreError::new(StoreErrorKind::Conflict, "every secret version is used")
            })?;
        sqlx::query(
            "INSERT INTO api_key_format_secrets (version, secret, created_at) VALUES (?1, ?2, ?3)",
        )
        .bind(i64::from(version))
        .bind(secret.expose_secret())
        .bind(to_unix_micros(now))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(version)
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_key_format_secrets SET retired_at = ?2 \
             WHERE version = ?1 AND retired_at IS NULL AND EXISTS (\
               SELECT 1 FROM api_key_format_secrets WHERE version <> ?1 AND retired_at IS NULL)",
        )
        .bind(i64::from(version))
        .bind(to_unix_micros(now))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_key_format (id, legacy_keys, created_at) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET legacy_keys = excluded.legacy_keys",
        )
        .bind(i64::from(accept))
        .bind(to_unix_micros(now))
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
        let mut tx = self.begin_immediate().await?;
        let Some(mut record) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        update.apply(&mut record);
        if let Some(credits) = record.limits.credits.as_mut() {
            credits.set_at = micros(credits.set_at);
        }
        Self::write_limits(&mut tx, &record).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(record))
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        // BEGIN IMMEDIATE serialises every writer of the file: read, apply the rule, write.
        let mut tx = self.begin_immediate().await?;
        let Some(mut record) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        let Some(credits) = record.limits.credits.as_mut() else {
            return Ok(None);
        };
        let before = *credits;
        let outcome = super::adjust(credits, delta, micros(now));
        if *credits != before {
            Self::write_limits(&mut tx, &record).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(outcome))
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            ancestor_chain!("(SELECT created_by FROM api_keys WHERE id = ?1)"),
            "SELECT ",
            columns!(),
            " FROM chain JOIN api_keys ON api_keys.id = chain.cid ORDER BY chain.depth"
        ))
        .bind(id.as_str())
        .bind(MAX_DELEGATION_DEPTH as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            descendant_tree!(),
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id IN (SELECT id FROM tree)"
        ))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        // One statement: the ancestors (depth 1 up), then the account pool, then the owner pool.
        let rows = sqlx::query(concat!(
            ancestor_chain!("?1"),
            "SELECT 'key', cid, depth, ",
            limit_columns!(),
            " FROM chain JOIN api_keys ON api_keys.id = chain.cid \
             UNION ALL SELECT kind, account, CASE kind WHEN 'account' THEN ?2 + 1 ELSE ?2 + 2 END, ",
            limit_columns!(),
            " FROM api_key_pools WHERE owner = ?3 AND (kind = 'owner' OR account = ?4) \
             ORDER BY 3"
        ))
        .bind(record.created_by.as_ref().map(KeyId::as_str))
        .bind(MAX_DELEGATION_DEPTH as i64)
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
            let limits = decode_limits(row, 3)?.into_limits()?;
            if !limits.is_unlimited() {
                levels.push(BudgetLevel { id, limits });
            }
        }
        Ok(levels)
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        Self::read_pool(&mut conn, pool).await
    }

    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        let (owner, kind, account) = pool_key(pool);
        let Some(limits) = limits else {
            if if_absent {
                // Removing only what is absent removes nothing.
                return Ok(false);
            }
            let done = sqlx::query(
                "DELETE FROM api_key_pools WHERE owner = ?1 AND kind = ?2 AND account = ?3",
            )
            .bind(owner)
            .bind(kind)
            .bind(account)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
            return Ok(done.rows_affected() == 1);
        };
        let columns = LimitColumns::of(&limits);
        let sql = if if_absent {
            concat!(
                "INSERT INTO api_key_pools (owner, kind, account, ",
                limit_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (owner, kind, account) DO NOTHING"
            )
        } else {
            concat!(
                "INSERT INTO api_key_pools (owner, kind, account, ",
                limit_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (owner, kind, account) DO UPDATE SET \
                 rate_limit = excluded.rate_limit, \
                 rate_period_seconds = excluded.rate_period_seconds, \
                 credits_remaining = excluded.credits_remaining, \
                 credits_refill_interval = excluded.credits_refill_interval, \
                 credits_refill_amount = excluded.credits_refill_amount, \
                 credits_set_at = excluded.credits_set_at"
            )
        };
        let done = sqlx::query(sql)
            .bind(owner)
            .bind(kind)
            .bind(account)
            .bind(columns.rate_limit)
            .bind(columns.rate_period_seconds)
            .bind(columns.credits_remaining)
            .bind(columns.credits_refill_interval)
            .bind(columns.credits_refill_amount)
            .bind(columns.credits_set_at.map(to_unix_micros))
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
        // BEGIN IMMEDIATE serialises every writer of the file: read every level, decide, write.
        let mut tx = self.begin_immediate().await?;
        let mut credits = Self::read_credits(&mut tx, &levels).await?;
        let before = credits.clone();
        let outcome = levels.spend(&mut credits, cost, now);
        Self::write_credits(&mut tx, &levels, &before, &credits).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        let mut tx = self.begin_immediate().await?;
        let mut credits = Self::read_credits(&mut tx, &levels).await?;
        let before = credits.clone();
        levels.refund(&mut credits, cost, now);
        Self::write_credits(&mut tx, &levels, &before, &credits).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }
}

impl SqliteStore {
    /// The limits of `pool`, read on `conn`; `None` when no pool is set.
    async fn read_pool(
        conn: &mut SqliteConnection,
        pool: &PoolId,
    ) -> Result<Option<UsageLimits>, StoreError> {
        let (owner, kind, account) = pool_key(pool);
        let row = sqlx::query(concat!(
            "SELECT ",
            limit_columns!(),
            " FROM api_key_pools WHERE owner = ?1 AND kind = ?2 AND account = ?3"
        ))
        .bind(owner)
        .bind(kind)
        .bind(account)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        row.map(|row| decode_limits(&row, 0)?.into_limits())
            .transpose()
    }

    /// The credits of every level of `levels` (`None`: unknown, or without credits), inside the
    /// caller's transaction.
    async fn read_credits(
        conn: &mut SqliteConnection,
        levels: &ChainLevels,
    ) -> Result<Vec<Option<Credits>>, StoreError> {
        let mut credits = Vec::with_capacity(levels.unique.len());
        for level in &levels.unique {
            let limits = match level {
                BudgetId::Key(id) => {
                    let row = sqlx::query(concat!(
                        "SELECT ",
                        limit_columns!(),
                        " FROM api_keys WHERE id = ?1"
                    ))
                    .bind(id.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(map_sqlx_error)?;
                    row.map(|row| decode_limits(&row, 0)?.into_limits())
                        .transpose()?
                }
                BudgetId::Pool(pool) => Self::read_pool(conn, pool).await?,
            };
            credits.push(limits.and_then(|l| l.credits));
        }
        Ok(credits)
    }

    /// Writes `remaining` and `set_at` of every level whose credits changed from `before`.
    async fn write_credits(
        conn: &mut SqliteConnection,
        levels: &ChainLevels,
        before: &[Option<Credits>],
        after: &[Option<Credits>],
    ) -> Result<(), StoreError> {
        for ((level, old), new) in levels.unique.iter().zip(before).zip(after) {
            let Some(new) = new.filter(|new| Some(*new) != *old) else {
                continue;
            };
            let remaining = LimitColumns::of(&UsageLimits {
                rate_limit: None,
                credits: Some(new),
            });
            let query = match level {
                BudgetId::Key(id) => sqlx::query(
                    "UPDATE api_keys SET credits_remaining = ?1, credits_set_at = ?2 WHERE id = ?3",
                )
                .bind(remaining.credits_remaining)
                .bind(remaining.credits_set_at.map(to_unix_micros))
                .bind(id.as_str()),
                BudgetId::Pool(pool) => {
                    let (owner, kind, account) = pool_key(pool);
                    sqlx::query(
                        "UPDATE api_key_pools SET credits_remaining = ?1, credits_set_at = ?2 \
                         WHERE owner = ?3 AND kind = ?4 AND account = ?5",
                    )
                    .bind(remaining.credits_remaining)
                    .bind(remaining.credits_set_at.map(to_unix_micros))
                    .bind(owner)
                    .bind(kind)
                    .bind(account)
                }
            };
            query.execute(&mut *conn).await.map_err(map_sqlx_error)?;
        }
        Ok(())
    }

    /// Writes the name and usage-limit columns of `record`.
    async fn write_limits(
        conn: &mut SqliteConnection,
        record: &KeyRecord,
    ) -> Result<(), StoreError> {
        let columns = LimitColumns::of(&record.limits);
        sqlx::query(
            "UPDATE api_keys SET name = ?2, rate_limit = ?3, rate_period_seconds = ?4, \
             credits_remaining = ?5, credits_refill_interval = ?6, credits_refill_amount = ?7, \
             credits_set_at = ?8 WHERE id = ?1",
        )
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(columns.rate_limit)
        .bind(columns.rate_period_seconds)
        .bind(columns.credits_remaining)
        .bind(columns.credits_refill_interval)
        .bind(columns.credits_refill_amount)
        .bind(columns.credits_set_at.map(to_unix_micros))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        Ok(())
    }
}
