//! Shared helpers for the behaviour tests: a store wrapper that counts and breaks, key factories.
#![allow(dead_code)]

pub mod gate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat, KeyId};
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{
    CreditAdjustment, KeyChange, KeyLimits, KeyUpdate, ListQuery, Rotation,
};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore, StoreError};

pub const MASTER: &str = "master-key-for-tests-0123456789";

/// A store that counts digest lookups and can be made to fail or hang.
#[derive(Default)]
pub struct TestStore {
    pub inner: MemoryStore,
    pub lookups: AtomicU64,
    pub failing: AtomicBool,
    pub hanging: AtomicBool,
}

impl TestStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

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
        // Give concurrent requests time to pile up behind this lookup.
        tokio::time::sleep(Duration::from_millis(20)).await;
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
}

/// A fresh record for `key` with `scopes`, owned by `owner`.
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
    }
}

/// Generates a key with `scopes`, stores it, and returns the plaintext and its record.
pub async fn issue(store: &dyn KeyStore, format: &KeyFormat, scopes: &str) -> (ApiKey, KeyRecord) {
    issue_with(store, format, scopes, |_| {}).await
}

pub async fn issue_with(
    store: &dyn KeyStore,
    format: &KeyFormat,
    scopes: &str,
    edit: impl FnOnce(&mut KeyRecord),
) -> (ApiKey, KeyRecord) {
    let key = format.generate();
    let mut rec = record(format, &key, "team-a", scopes);
    edit(&mut rec);
    store
        .insert(&rec, KeyLimits::default(), OffsetDateTime::now_utc())
        .await
        .unwrap();
    (key, rec)
}

/// Reads a response's JSON body.
pub async fn json_body(response: http::Response<axum::body::Body>) -> serde_json::Value {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// The `error_detail.code` of an error response.
pub async fn error_code(response: http::Response<axum::body::Body>) -> String {
    json_body(response).await["error_detail"]["code"]
        .as_str()
        .expect("error_detail.code")
        .to_owned()
}
