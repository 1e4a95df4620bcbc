//! [`PostgresStore`]'s [`KeyStore`] implementation: each method brings the schema up to date, opens
//! what it needs (a connection, or a transaction: `store.rs`), runs the statements of `reads`,
//! `keys`, `credits`, `formats` or `audit` on it, writes the change's events in the same
//! transaction, and commits.

use time::OffsetDateTime;

use super::sql::query;
use super::store::PostgresStore;
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
use crate::store::sql_common::{map_sqlx_error, micros};
use crate::store::usage::UsageBucket;

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
