//! [`SqliteStore`] and its [`KeyStore`] implementation: each method opens what it needs (a
//! connection, or a `BEGIN IMMEDIATE` transaction for what checks before it writes), runs the
//! statements of `reads`, `keys`, `credits`, `formats` or `audit` on it, writes the change's
//! events in the same transaction, and commits.

use std::fmt;
use std::sync::Arc;

#[cfg(feature = "webhooks")]
use sqlx::SqliteConnection;
use sqlx::sqlite::SqlitePool;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{audit, credits, formats, keys, reads};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId};
use crate::limits::{BudgetId, BudgetLevel, PoolId, UsageLimits};
use crate::record::{KeyChange, KeyRecord};
use crate::store::StoreError;
use crate::store::credits::{ChainLevels, ChainSpend, CreditAdjustment};
use crate::store::format::FormatSecrets;
use crate::store::key_store::KeyStore;
use crate::store::overview::OwnerSummary;
use crate::store::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::store::sql_common::{map_sqlx_error, micros, to_unix_micros};
use crate::store::usage::UsageBucket;

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
/// - `api_key_pools`: the shared pools ([`KeyStore::set_pool`]), keyed by owner, `kind` (`owner`
///   or `account`) and account (empty for an owner's pool), with the usage-limit columns of
///   `api_keys`. A key's `allowed_networks` is a nullable `TEXT` of CIDR blocks separated by spaces.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Writes that check before they write (limits, conflicts, rotation) run in `BEGIN IMMEDIATE`
///   transactions, which SQLite serialises across every connection and process using the file:
///   concurrent inserts never overshoot a limit.
/// - [`KeyStore::spend_credits`] and [`KeyStore::refund_credits`] read and write every level of a
///   chain in one `BEGIN IMMEDIATE` transaction: all or nothing, never more than there is.
/// - Timestamps are floored to the microsecond when written and when compared, like
///   `PostgresStore`.
/// - File databases are switched to WAL mode by [`SqliteStore::connect`], so readers do not wait for
///   writers. Busy connections wait up to 5 s (sqlx's `busy_timeout`) before failing.
#[derive(Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    pub(super) migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Seals `events` onto their owners' chains and writes them on `conn`, inside the caller's
    /// transaction, with their outbox rows: how the webhooks' changes write their events.
    #[cfg(feature = "webhooks")]
    pub(crate) async fn append_in(
        conn: &mut SqliteConnection,
        events: Vec<EventDraft>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        audit::append(conn, events).await
    }

    /// A transaction holding SQLite's write lock from its first statement.
    pub(crate) async fn begin_immediate(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_sqlx_error)
    }

    /// Writes `change`'s events (`journal`) on `tx` when there is a change, and commits.
    async fn commit_change(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        change: Option<KeyChange>,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        if let Some(change) = &change {
            audit::append(&mut tx, journal.for_change(change)).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(change)
    }
}

#[async_trait::async_trait]
impl KeyStore for SqliteStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        reads::find_by_digest(&self.pool, digest).await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        reads::get(&self.pool, id).await
    }

    async fn sweep(&self, query: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        reads::sweep(&self.pool, query).await
    }

    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        keys::record_notice(&mut conn, id, notice, at).await
    }

    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let fresh = keys::record_notice(&mut tx, id, notice, at).await?;
        if fresh {
            audit::append(&mut tx, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(fresh)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        reads::list(&self.pool, query).await
    }

    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        reads::count_active(&self.pool, owner, account, now).await
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
        let mut tx = self.begin_immediate().await?;
        keys::insert(&mut tx, record, limits, now).await?;
        audit::append(&mut tx, journal.events().to_vec()).await?;
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
        let mut tx = self.begin_immediate().await?;
        let change = keys::revoke(&mut tx, id, at).await?;
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
        let mut tx = self.begin_immediate().await?;
        let change = keys::delete(&mut tx, id, at).await?;
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
        let mut tx = self.begin_immediate().await?;
        let change = keys::replace_secret(&mut tx, id, rotation).await?;
        self.commit_change(tx, change, journal).await
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
        let mut tx = self.begin_immediate().await?;
        let secrets = formats::load(&mut tx, initial, now).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(secrets)
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let version = formats::add(&mut tx, secret, now).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(version)
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        formats::retire(&self.pool, version, now).await
    }

    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        formats::set_legacy_keys(&self.pool, accept, now).await
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
        let mut tx = self.begin_immediate().await?;
        let change = keys::update(&mut tx, id, update).await?;
        let change = self.commit_change(tx, change, journal).await?;
        Ok(change.and_then(|change| change.after))
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let outcome = credits::adjust(&mut tx, id, delta, now).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        reads::ancestors(&self.pool, id).await
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        reads::descendants(&self.pool, id).await
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        reads::budget_above(&self.pool, record).await
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        credits::read_pool(&mut conn, pool).await
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
        let mut tx = self.begin_immediate().await?;
        let wrote = credits::write_pool(&mut tx, pool, limits, if_absent).await?;
        if wrote {
            audit::append(&mut tx, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(wrote)
    }

    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let sealed = audit::append(&mut tx, events.to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(sealed)
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::events(&mut conn, query).await
    }

    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_state(&mut conn, owner).await
    }

    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_events(&mut conn, owner, after_seq, limit).await
    }

    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let removed = audit::purge_events(&mut tx, before).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(removed)
    }

    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        audit::record_usage(&mut tx, buckets).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::usage(&mut conn, key_id, from, to).await
    }

    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM api_key_usage WHERE hour < ?1")
            .bind(before.unix_timestamp())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        Ok(done.rows_affected())
    }

    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        super::overview::usage_by_key(&self.pool, owner, from, to).await
    }

    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<OwnerSummary>, StoreError> {
        super::overview::owners(&self.pool, now, limit).await
    }

    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        if levels.is_empty() {
            // Nothing to count: no transaction (and no write lock).
            return Ok(ChainSpend::Spent {
                remaining: Vec::new(),
            });
        }
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        let mut tx = self.begin_immediate().await?;
        let outcome = credits::chain(&mut tx, &levels, |c| levels.spend(c, cost, now)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
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
        let mut tx = self.begin_immediate().await?;
        credits::chain(&mut tx, &levels, |c| levels.refund(c, cost, now)).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }
}
