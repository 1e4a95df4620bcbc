//! The store wrapper and the key records every test and bench uses (the benches include this file
//! by path: it depends on nothing but the crate and its dependencies).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tower_api_keys::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat, KeyId};
use tower_api_keys::limits::{BudgetId, BudgetLevel, PoolId, UsageLimits};
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{
    ChainSpend, CreditAdjustment, KeyChange, KeyLimits, KeyUpdate, ListQuery, Rotation,
};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore, StoreError};
use tower_api_keys::usage::UsageBucket;

/// A store that forwards every call to another one, counts digest lookups, and can be made slow,
/// failing or hanging.
pub struct TestStore {
    inner: Arc<dyn KeyStore>,
    /// Digest lookups so far.
    pub lookups: AtomicU64,
    /// Every call fails as the store being unreachable.
    pub failing: AtomicBool,
    /// Digest lookups hang (for an hour).
    pub hanging: AtomicBool,
    latency: Option<Duration>,
}

impl TestStore {
    /// A [`MemoryStore`] whose digest lookups take 20 ms, so that concurrent requests pile up
    /// behind one.
    pub fn new() -> Arc<Self> {
        Self::with_latency(
            Arc::new(MemoryStore::new()),
            Some(Duration::from_millis(20)),
        )
    }

    /// `inner`, counted.
    pub fn wrap(inner: Arc<dyn KeyStore>) -> Arc<Self> {
        Self::with_latency(inner, None)
    }

    /// `inner`, counted, each digest lookup first sleeping `latency` (a store across a network).
    pub fn with_latency(inner: Arc<dyn KeyStore>, latency: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            lookups: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            latency,
        })
    }

    /// Digest lookups so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("connection refused (test)"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl KeyStore for TestStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if let Some(latency) = self.latency {
            tokio::time::sleep(latency).await;
        }
        if self.hanging.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.check()?;
        self.inner.find_by_digest(digest).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.list(query).await
    }
    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.count_active(owner, account, now).await
    }
    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert(record, limits, now).await
    }
    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.revoke(id, at).await
    }
    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.delete(id, at).await
    }
    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.replace_secret(id, rotation).await
    }
    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert_with(record, limits, now, journal).await
    }
    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.revoke_with(id, at, journal).await
    }
    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.delete_with(id, at, journal).await
    }
    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.check()?;
        self.inner.replace_secret_with(id, rotation, journal).await
    }
    async fn update_with(
        &self,
        id: &KeyId,
        update: &tower_api_keys::store::KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.update_with(id, update, journal).await
    }
    async fn set_pool_with(
        &self,
        pool: &tower_api_keys::limits::PoolId,
        limits: Option<tower_api_keys::limits::UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner
            .set_pool_with(pool, limits, if_absent, journal)
            .await
    }
    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        self.check()?;
        self.inner.append_events(events).await
    }
    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.check()?;
        self.inner.events(query).await
    }
    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        self.check()?;
        self.inner.chain_state(owner).await
    }
    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.check()?;
        self.inner.chain_events(owner, after_seq, limit).await
    }
    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.record_usage(buckets).await
    }
    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.check()?;
        self.inner.usage(key_id, from, to).await
    }
    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.check()?;
        self.inner.usage_by_key(owner, from, to).await
    }
    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<tower_api_keys::store::OwnerSummary>, StoreError> {
        self.check()?;
        self.inner.owners(now, limit).await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.record_last_used(uses).await
    }
    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.update(id, update).await
    }
    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        self.check()?;
        self.inner.adjust_credits(id, delta, now).await
    }
    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.ancestors(id).await
    }
    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.descendants(id).await
    }
    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        self.check()?;
        self.inner.budget_above(record).await
    }
    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        self.check()?;
        self.inner.pool(pool).await
    }
    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.set_pool(pool, limits, if_absent).await
    }
    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        self.check()?;
        self.inner.spend_credits(levels, cost, now).await
    }
    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.refund_credits(levels, cost, now).await
    }
}

/// A fresh record for `key` with `scopes`, owned by `owner` (account `<owner>-account`).
pub fn record(format: &KeyFormat, key: &ApiKey, owner: &str, scopes: &str) -> KeyRecord {
    KeyRecord {
        id: KeyId::generate(),
        name: format!("{owner} test key"),
        owner: owner.to_owned(),
        account: format!("{owner}-account"),
        scopes: scopes.parse::<ScopeSet>().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(key).unwrap(),
        created_at: OffsetDateTime::now_utc(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    }
}
