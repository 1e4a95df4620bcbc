//! [`PostgresStore`] and its [`KeyStore`] implementation: each method brings the schema up to
//! date, opens what it needs (a connection, or a transaction), runs the statements of `reads`,
//! `keys`, `credits`, `formats` or `audit` on it, writes the change's events in the same
//! transaction, and commits; a chain of credits is run again when PostgreSQL rolled it back.

use std::fmt;
use std::sync::Arc;

use sqlx::Transaction;
use sqlx::postgres::{PgPool, Postgres};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::sql::{Sql, query};
use super::{audit, credits, formats, keys, reads};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId};
use crate::limits::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};
use crate::store::credits::{ChainLevels, ChainSpend, CreditAdjustment};
use crate::store::StoreError;
use crate::store::format::FormatSecrets;
use crate::store::key_store::KeyStore;
use crate::store::overview::OwnerSummary;
use crate::store::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::record::{KeyChange, KeyRecord};
use crate::store::sql_common::{is_pg_retryable, map_sqlx_error, micros};
use crate::store::usage::UsageBucket;

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
/// - Connection failures are
///   [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable), duplicates
///   [`StoreErrorKind::Conflict`](crate::store::StoreErrorKind::Conflict), unreadable rows (an
///   unknown digest scheme, a bad scope)
///   [`StoreErrorKind::Corrupt`](crate::store::StoreErrorKind::Corrupt). Errors never quote the
///   offending values.
///
/// TLS: enable one of sqlx's TLS features (e.g. `sqlx = { version = "0.9", features =
/// ["tls-rustls"] }`) in your own `Cargo.toml`; feature unification applies it here.
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
    pub(super) sql: Arc<Sql>,
    pub(super) migrated: Arc<OnceCell<()>>,
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

    /// The connection pool (e.g. to share it with [`PostgresInvalidator`](crate::invalidate::PostgresInvalidator)).
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

    /// One attempt of [`chain_transaction`](Self::chain_transaction), in a transaction of its own.
    async fn chain_attempt<T>(
        &self,
        levels: &ChainLevels,
        rule: &impl Fn(&mut [Option<Credits>]) -> T,
    ) -> Result<T, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = credits::chain(&mut tx, &self.sql, levels, rule).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(map_sqlx_error)
    }

    /// Writes `change`'s events (`journal`) on `tx` when there is a change, and commits.
    async fn commit_change(
        &self,
        mut tx: Transaction<'static, Postgres>,
        change: Option<KeyChange>,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        if let Some(change) = &change {
            audit::append(&mut tx, &self.sql.quoted, journal.for_change(change)).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(change)
    }
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::find_by_digest(&self.pool, &self.sql, digest).await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::get(&self.pool, &self.sql, id).await
    }

    async fn sweep(&self, query: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::sweep(&self.pool, &self.sql, query).await
    }

    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        keys::record_notice(&mut conn, &self.sql, id, notice, at).await
    }

    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let mut tx = self.begin().await?;
        let fresh = keys::record_notice(&mut tx, &self.sql, id, notice, at).await?;
        if fresh {
            audit::append(&mut tx, &self.sql.quoted, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(fresh)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::list(&self.pool, &self.sql, query).await
    }

    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.migrate().await?;
        reads::count_active(&self.pool, &self.sql, owner, account, now).await
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
        let mut tx = self.begin().await?;
        keys::insert(&mut tx, &self.sql, record, limits, now).await?;
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
        let mut tx = self.begin().await?;
        let change = keys::revoke(&mut tx, &self.sql, id, at).await?;
        self.commit_change(tx, change, journal).await
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
        let mut tx = self.begin().await?;
        let change = keys::delete(&mut tx, &self.sql, id, at).await?;
        self.commit_change(tx, change, journal).await
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
        let mut tx = self.begin().await?;
        let change = keys::replace_secret(&mut tx, &self.sql, id, rotation).await?;
        self.commit_change(tx, change, journal).await
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
        formats::load(&self.pool, &self.sql, initial, now).await
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        self.migrate().await?;
        formats::add(&self.pool, &self.sql, secret, now).await
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.migrate().await?;
        let mut tx = self.begin().await?;
        let retired = formats::retire(&mut tx, &self.sql, version, now).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(retired)
    }

    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        self.migrate().await?;
        formats::set_legacy_keys(&self.pool, &self.sql, accept, now).await
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
        let mut tx = self.begin().await?;
        let change = keys::update(&mut tx, &self.sql, id, update).await?;
        let change = self.commit_change(tx, change, journal).await?;
        Ok(change.and_then(|change| change.after))
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        self.migrate().await?;
        let mut tx = self.begin().await?;
        let outcome = credits::adjust(&mut tx, &self.sql, id, delta, now).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::ancestors(&self.pool, &self.sql, id).await
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.migrate().await?;
        reads::descendants(&self.pool, &self.sql, id).await
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        self.migrate().await?;
        reads::budget_above(&self.pool, &self.sql, record).await
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        self.migrate().await?;
        credits::read_pool(&self.pool, &self.sql, pool).await
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
        let mut tx = self.begin().await?;
        let wrote = credits::write_pool(&mut tx, &self.sql, pool, limits, if_absent).await?;
        if wrote {
            audit::append(&mut tx, &self.sql.quoted, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(wrote)
    }

    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        self.migrate().await?;
        let mut tx = self.begin().await?;
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
        let mut tx = self.begin().await?;
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
    ) -> Result<Vec<OwnerSummary>, StoreError> {
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
            // Nothing to count: no transaction.
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
