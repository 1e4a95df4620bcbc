//! [`PostgresStore`] and its [`KeyStore`] implementation.

use std::fmt;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::audit;
use super::sql::{COLUMNS, Sql, decode, decode_opt, limits_at, lock_key, migrations, query};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId, MAX_SECRET_VERSION};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};
use crate::store::credits::{ChainLevels, ChainSpend, CreditAdjustment};
use crate::store::error::{StoreError, StoreErrorKind};
use crate::store::format::{FormatSecrets, StoredSecret};
use crate::store::key_store::KeyStore;
use crate::store::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::store::record::{KeyChange, KeyRecord, MAX_DELEGATION_DEPTH};
use crate::store::sql_common::{
    LimitColumns, is_pg_retryable, map_sqlx_error, micros, networks_text, pool_key,
};
use crate::usage::UsageBucket;

/// How many times a chain spend or refund runs again after PostgreSQL chose it as a deadlock
/// victim (its row locks crossed a cascade's) or failed it for serialization.
const CHAIN_ATTEMPTS: u32 = 3;

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
/// - `api_key_pools`: the shared pools ([`KeyStore::set_pool`]), keyed by owner, `kind` (`owner`
///   or `account`) and account (empty for an owner's pool), with the usage-limit columns of
///   `api_keys`. A key's `allowed_networks` is a nullable `TEXT` of CIDR blocks separated by spaces.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Migrations run at start-up in one transaction holding a transaction-level advisory lock, so
///   instances starting together apply them once; they are idempotent.
/// - [`KeyStore::insert`] takes a transaction-level advisory lock per owner (and per account) before
///   counting active keys, so concurrent inserts from any number of instances never overshoot a limit.
/// - [`KeyStore::spend_credits`] locks every level's row (keys by id, then pools) in that one order
///   in one transaction, so concurrent chains never deadlock on each other and never overspend;
///   a chain PostgreSQL picks as a deadlock victim against a cascade is run again (it kept nothing).
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
    pub(super) pool: PgPool,
    pub(super) sql: Arc<Sql>,
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

    pub(super) fn new(pool: PgPool, schema: &str) -> Self {
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

    /// The schema's name quoted for SQL (a checked identifier), for the webhooks' statements
    /// (`webhooks::postgres`), which read and write this store's tables.
    #[cfg(feature = "webhooks")]
    pub(crate) fn quoted_schema(&self) -> &str {
        &self.sql.quoted
    }

    /// Seals `events` onto their owners' chains and writes them on `conn`, inside the caller's
    /// transaction, with their outbox rows: how the webhooks' changes write their events.
    #[cfg(feature = "webhooks")]
    pub(crate) async fn append_in(
        &self,
        conn: &mut sqlx::PgConnection,
        events: Vec<EventDraft>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        audit::append(conn, &self.sql.quoted, events).await
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

    async fn sweep(&self, q: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let sql: Arc<str> = format!(
            "SELECT {COLUMNS} FROM {s}.api_keys WHERE revoked_at IS NULL \
               AND (expires_at IS NULL OR expires_at > $1) \
               AND (expires_at <= $2 OR coalesce(last_used_at, created_at) <= $3) \
               AND ($4::text IS NULL OR id > $4) ORDER BY id LIMIT $5"
        )
        .into();
        let rows = query(&sql)
            .bind(micros(q.now))
            .bind(micros(q.expiring_before))
            .bind(micros(q.idle_before))
            .bind(q.after.as_ref().map(KeyId::as_str))
            .bind(i64::from(q.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let sql: Arc<str> = format!(
            "INSERT INTO {s}.api_key_notices (key_id, notice, noticed_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING"
        )
        .into();
        let done = query(&sql)
            .bind(id.as_str())
            .bind(notice)
            .bind(micros(at))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let s = &self.sql.quoted;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let done = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_notices (key_id, notice, noticed_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING"
        )))
        .bind(id.as_str())
        .bind(notice)
        .bind(micros(at))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let fresh = done.rows_affected() == 1;
        if fresh {
            audit::append(&mut tx, s, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(fresh)
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
        self.insert_with(record, limits, now, &Journal::none())
            .await
    }

    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
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
        audit::append(&mut tx, &self.sql.quoted, journal.events().to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.revoke_with(id, at, &Journal::none()).await
    }

    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
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
        let change = KeyChange {
            before,
            after,
            revoked_descendants,
        };
        audit::append(&mut tx, &self.sql.quoted, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
    }

    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.delete_with(id, at, &Journal::none()).await
    }

    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
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
        let change = KeyChange {
            before,
            after: None,
            revoked_descendants,
        };
        audit::append(&mut tx, &self.sql.quoted, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
    }

    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.replace_secret_with(id, rotation, &Journal::none())
            .await
    }

    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
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
        let change = KeyChange {
            before: old,
            after,
            revoked_descendants,
        };
        audit::append(&mut tx, &self.sql.quoted, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
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
        self.update_with(id, update, &Journal::none()).await
    }

    async fn update_with(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let Some(mut record) = self.lock_row(&mut tx, id).await? else {
            return Ok(None);
        };
        let before = record.clone();
        update.apply(&mut record);
        if let Some(credits) = record.limits.credits.as_mut() {
            credits.set_at = micros(credits.set_at);
        }
        self.write_limits(&mut tx, &record).await?;
        let change = KeyChange {
            before,
            after: Some(record),
            revoked_descendants: Vec::new(),
        };
        audit::append(&mut tx, &self.sql.quoted, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(change.after)
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
        let outcome = crate::store::credits::adjust(credits, delta, micros(now));
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
        self.set_pool_with(pool, limits, if_absent, &Journal::none())
            .await
    }

    async fn set_pool_with(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let wrote = self.write_pool(&mut tx, pool, limits, if_absent).await?;
        if wrote {
            audit::append(&mut tx, &self.sql.quoted, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(wrote)
    }

    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let sealed = audit::append(&mut tx, &self.sql.quoted, events.to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(sealed)
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::events(&mut conn, &self.sql.quoted, query).await
    }

    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_state(&mut conn, &self.sql.quoted, owner).await
    }

    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_events(&mut conn, &self.sql.quoted, owner, after_seq, limit).await
    }

    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let removed = audit::purge_events(&mut tx, &self.sql.quoted, before).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(removed)
    }

    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        if buckets.is_empty() {
            return Ok(());
        }
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::record_usage(&mut conn, &self.sql.quoted, buckets).await
    }

    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::usage(&mut conn, &self.sql.quoted, key_id, from, to).await
    }

    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::purge_usage(&mut conn, &self.sql.quoted, before).await
    }

    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.migrate().await?;
        super::overview::usage_by_key(&self.pool, &self.sql.quoted, owner, from, to).await
    }

    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<crate::store::overview::OwnerSummary>, StoreError> {
        self.migrate().await?;
        super::overview::owners(&self.pool, &self.sql.quoted, now, limit).await
    }
    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        if levels.is_empty() {
            // Nothing to count: no transaction (and, in SQLite, no write lock).
            return Ok(ChainSpend::Spent {
                remaining: Vec::new(),
            });
        }
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
        if levels.is_empty() {
            return Ok(());
        }
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        self.chain_transaction(&levels, |credits| levels.refund(credits, cost, now))
            .await
    }
}

impl PostgresStore {
    /// Writes or removes a pool on `conn` (inside the caller's transaction); whether it wrote.
    async fn write_pool(
        &self,
        conn: &mut sqlx::PgConnection,
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
            let done = query(&self.sql.pool_delete)
                .bind(owner)
                .bind(kind)
                .bind(account)
                .execute(&mut *conn)
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
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }
}
