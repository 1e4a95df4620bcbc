//! A store behind an `Arc` is a store: every method forwards to the shared one, so that
//! `Arc<SqliteStore>`, `Arc<dyn KeyStore>` and the like can be handed to the resolver as they are.
//! Each default method is forwarded too, so that an implementation's own version is the one used.

use std::sync::Arc;

use time::OffsetDateTime;

use super::StoreError;
use super::credits::{ChainSpend, CreditAdjustment};
use super::format::FormatSecrets;
use super::key_store::KeyStore;
use super::overview::OwnerSummary;
use super::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId};
use crate::limits::{BudgetId, BudgetLevel, PoolId, UsageLimits};
use crate::record::{KeyChange, KeyRecord};
use crate::store::usage::UsageBucket;

#[async_trait::async_trait]
impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        (**self).find_by_digest(digest).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        (**self).get(id).await
    }
    async fn sweep(&self, query: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).sweep(query).await
    }
    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        (**self).record_notice(id, notice, at).await
    }
    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        (**self).record_notice_with(id, notice, at, journal).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).list(query).await
    }
    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        (**self).count_active(owner, account, now).await
    }
    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        (**self).insert(record, limits, now).await
    }
    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).revoke(id, at).await
    }
    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).delete(id, at).await
    }
    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).replace_secret(id, rotation).await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        (**self).record_last_used(uses).await
    }
    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        (**self).insert_with(record, limits, now, journal).await
    }
    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).revoke_with(id, at, journal).await
    }
    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).delete_with(id, at, journal).await
    }
    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        (**self).replace_secret_with(id, rotation, journal).await
    }
    async fn update_with(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        (**self).update_with(id, update, journal).await
    }
    async fn set_pool_with(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        (**self)
            .set_pool_with(pool, limits, if_absent, journal)
            .await
    }
    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        (**self).append_events(events).await
    }
    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        (**self).events(query).await
    }
    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        (**self).chain_state(owner).await
    }
    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        (**self).chain_events(owner, after_seq, limit).await
    }
    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        (**self).purge_events(before).await
    }
    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        (**self).record_usage(buckets).await
    }
    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        (**self).usage(key_id, from, to).await
    }
    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        (**self).purge_usage(before).await
    }
    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        (**self).usage_by_key(owner, from, to).await
    }
    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<OwnerSummary>, StoreError> {
        (**self).owners(now, limit).await
    }
    async fn format_secrets(
        &self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, StoreError> {
        (**self).format_secrets(initial, now).await
    }
    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        (**self).add_format_secret(secret, now).await
    }
    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        (**self).retire_format_secret(version, now).await
    }
    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        (**self).set_legacy_keys(accept, now).await
    }

    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        (**self).update(id, update).await
    }
    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        (**self).adjust_credits(id, delta, now).await
    }
    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).ancestors(id).await
    }
    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).descendants(id).await
    }
    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        (**self).pool(pool).await
    }
    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        (**self).budget_above(record).await
    }
    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        (**self).set_pool(pool, limits, if_absent).await
    }
    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        (**self).spend_credits(levels, cost, now).await
    }
    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        (**self).refund_credits(levels, cost, now).await
    }
}
