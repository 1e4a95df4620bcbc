//! [`GateStore`]: a memory store whose digest lookups can be held mid-way, after reading the
//! record and before answering, until the test releases them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tower_api_keys::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use tower_api_keys::key::{KeyDigest, KeyId};
use tower_api_keys::store::{KeyChange, KeyLimits, ListQuery, Rotation};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore, StoreError};
use tower_api_keys::usage::UsageBucket;

pub struct GateStore {
    pub inner: MemoryStore,
    to_hold: AtomicU64,
    held: AtomicU64,
    gate: Semaphore,
    lookups: AtomicU64,
}

impl Default for GateStore {
    fn default() -> Self {
        Self {
            inner: MemoryStore::new(),
            to_hold: AtomicU64::new(0),
            held: AtomicU64::new(0),
            gate: Semaphore::new(0),
            lookups: AtomicU64::new(0),
        }
    }
}

impl GateStore {
    /// The next `n` lookups read the store, then wait for [`release`](Self::release).
    pub fn hold_next(&self, n: u64) {
        self.to_hold.fetch_add(n, Ordering::SeqCst);
    }

    /// Waits (at most 10 s) until `n` lookups are held.
    pub async fn wait_held(&self, n: u64) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.held.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("lookups reached the gate");
    }

    /// Lets `n` held lookups answer (with what they read before they were held).
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Digest lookups so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl KeyStore for GateStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = self.inner.find_by_digest(digest).await;
        let hold = self
            .to_hold
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if hold {
            self.held.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        answer
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(query).await
    }
    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.inner.count_active(owner, account, now).await
    }
    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner.insert(record, limits, now).await
    }
    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.revoke(id, at).await
    }
    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.delete(id, at).await
    }
    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.replace_secret(id, rotation).await
    }
    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        self.inner.insert_with(record, limits, now, journal).await
    }
    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.revoke_with(id, at, journal).await
    }
    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.delete_with(id, at, journal).await
    }
    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.inner.replace_secret_with(id, rotation, journal).await
    }
    async fn update_with(
        &self,
        id: &KeyId,
        update: &tower_api_keys::store::KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update_with(id, update, journal).await
    }
    async fn set_pool_with(
        &self,
        pool: &tower_api_keys::limits::PoolId,
        limits: Option<tower_api_keys::limits::UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        self.inner
            .set_pool_with(pool, limits, if_absent, journal)
            .await
    }
    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.append_events(events).await
    }
    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.events(query).await
    }
    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        self.inner.chain_state(owner).await
    }
    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.inner.chain_events(owner, after_seq, limit).await
    }
    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        self.inner.record_usage(buckets).await
    }
    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.inner.usage(key_id, from, to).await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.inner.record_last_used(uses).await
    }
}
