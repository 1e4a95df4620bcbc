//! [`GateStore`]: a memory store whose digest lookups can be held mid-way, after reading the
//! record and before answering, until the test releases them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tower_api_keys::key::{KeyDigest, KeyId};
use tower_api_keys::store::{KeyChange, KeyLimits, ListQuery, Rotation};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore, StoreError};

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
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.inner.record_last_used(uses).await
    }
}
