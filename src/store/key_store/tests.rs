//! The defaults of [`KeyStore`]: what a store with only the required methods gets.

use super::super::defaults::count_by_listing;
use super::*;
use crate::key::{DigestScheme, KeyDigest};
use crate::limits::{BudgetId, Credits, PoolId, UsageLimits};
use crate::scope::ScopeSet;
use crate::store::usage::UsageBucket;
use crate::store::{
    ChainSpend, KeyChange, KeyLimits, KeyUpdate, MAX_DELEGATION_DEPTH, MemoryStore, Rotation,
    StoreErrorKind,
};

/// The default pages through `list` (pages of 500): it counts across pages, per account, and
/// agrees with `MemoryStore`'s own count.
#[tokio::test]
async fn the_default_count_pages_through_the_listing() {
    let store = MemoryStore::new();
    let now = OffsetDateTime::now_utc();
    let format = crate::key::KeyFormat::default();
    for i in 0..1203 {
        let key = format.generate();
        let record = KeyRecord {
            id: KeyId::new(format!("key_{i:05}")),
            name: String::new(),
            owner: "o".into(),
            account: ["a1", "a2", "a3"][i % 3].into(),
            scopes: ScopeSet::default(),
            digest: key.digest(),
            digest_scheme: DigestScheme::default(),
            masked_key: format.mask(&key).unwrap(),
            created_at: now,
            expires_at: None,
            revoked_at: (i % 5 == 0).then_some(now),
            last_used_at: None,
            created_by: None,
            rotated_at: None,
            previous: None,
            limits: UsageLimits::default(),
            allowed_networks: None,
        };
        store
            .insert(&record, KeyLimits::default(), now)
            .await
            .unwrap();
    }
    for account in [None, Some("a1"), Some("a2"), Some("a3"), Some("a4")] {
        let default = count_by_listing(&store, "o", account, now).await.unwrap();
        let own = store.count_active("o", account, now).await.unwrap();
        assert_eq!(default, own, "{account:?}");
    }
    // 1203 keys, one in five revoked (0, 5, ..., 1200: 241).
    assert_eq!(count_by_listing(&store, "o", None, now).await.unwrap(), 962);
    assert_eq!(count_by_listing(&store, "p", None, now).await.unwrap(), 0);
}

/// A store with only the required methods (forwarded to a `MemoryStore`): what a custom store
/// gets from the defaults.
struct Minimal(MemoryStore);

#[async_trait::async_trait]
impl KeyStore for Minimal {
    async fn find_by_digest(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.0.find_by_digest(d).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.0.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.0.list(query).await
    }
    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.0.insert(record, limits, now).await
    }
    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.0.revoke(id, at).await
    }
    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.0.delete(id, at).await
    }
    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.0.replace_secret(id, rotation).await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.0.record_last_used(uses).await
    }
    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        self.0.record_usage(buckets).await
    }
    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        self.0.usage(key_id, from, to).await
    }
}

/// The defaults answer like `MemoryStore`'s own methods for ancestry, and `Unsupported` (not
/// `Unavailable`, which would read as an outage) for what a custom store cannot do.
#[tokio::test]
async fn the_defaults_agree_with_memory_and_refuse_what_they_cannot_do() {
    let minimal = Minimal(MemoryStore::new());
    let now = OffsetDateTime::now_utc();
    let format = crate::key::KeyFormat::default();
    // key_00 -> key_01 -> ... -> key_11, and key_00 -> key_20.
    let parents = (0..12)
        .map(|i| (i, (i > 0).then(|| i - 1)))
        .chain([(20, Some(0))]);
    for (i, parent) in parents {
        let key = format.generate();
        let record = KeyRecord {
            id: KeyId::new(format!("key_{i:02}")),
            name: String::new(),
            owner: "o".into(),
            account: "a".into(),
            scopes: ScopeSet::default(),
            digest: key.digest(),
            digest_scheme: DigestScheme::default(),
            masked_key: format.mask(&key).unwrap(),
            created_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            created_by: parent.map(|p: i32| KeyId::new(format!("key_{p:02}"))),
            rotated_at: None,
            previous: None,
            limits: UsageLimits {
                rate_limit: None,
                credits: Some(Credits::new(10).set_at(now)),
            },
            allowed_networks: None,
        };
        minimal
            .insert(&record, KeyLimits::default(), now)
            .await
            .unwrap();
    }
    let ids = |records: Vec<KeyRecord>| -> Vec<String> {
        let mut ids: Vec<String> = records.into_iter().map(|r| r.id.to_string()).collect();
        ids.sort();
        ids
    };
    for id in ["key_11", "key_05", "key_00", "key_20", "key_99"] {
        let id = KeyId::new(id);
        let walked = minimal.ancestors(&id).await.unwrap();
        assert_eq!(walked, minimal.0.ancestors(&id).await.unwrap(), "{id}");
        assert!(walked.len() <= MAX_DELEGATION_DEPTH);
        assert_eq!(
            ids(minimal.descendants(&id).await.unwrap()),
            ids(minimal.0.descendants(&id).await.unwrap()),
            "{id}"
        );
        if let Some(record) = minimal.get(&id).await.unwrap() {
            assert_eq!(
                minimal.budget_above(&record).await.unwrap(),
                minimal.0.budget_above(&record).await.unwrap(),
                "{id}"
            );
        }
    }
    assert_eq!(
        minimal
            .ancestors(&KeyId::new("key_11"))
            .await
            .unwrap()
            .len(),
        MAX_DELEGATION_DEPTH
    );
    assert_eq!(
        minimal
            .descendants(&KeyId::new("key_00"))
            .await
            .unwrap()
            .len(),
        12
    );
    let unsupported = |e: StoreError| assert_eq!(e.kind(), StoreErrorKind::Unsupported);
    let id = KeyId::new("key_03");
    unsupported(
        minimal
            .update(&id, &KeyUpdate::default())
            .await
            .unwrap_err(),
    );
    unsupported(minimal.adjust_credits(&id, -1, now).await.unwrap_err());
    let pool = PoolId::owner("o");
    assert_eq!(minimal.pool(&pool).await.unwrap(), None);
    unsupported(
        minimal
            .set_pool(&pool, Some(UsageLimits::NONE), false)
            .await
            .unwrap_err(),
    );
    let two = [BudgetId::Key(id.clone()), BudgetId::Pool(pool)];
    unsupported(minimal.spend_credits(&two, 1, now).await.unwrap_err());
    unsupported(minimal.refund_credits(&two, 1, now).await.unwrap_err());
    assert_eq!(
        minimal.spend_credits(&[], 1, now).await.unwrap(),
        ChainSpend::Spent {
            remaining: Vec::new()
        }
    );
    unsupported(minimal.owners(now, 10).await.unwrap_err());
    // Usage per key by listing: the same sums as the memory store's own.
    let hour = crate::store::usage::hour_of(now);
    let bucket = |id: &str, hours_ago: i64, n: u64| UsageBucket {
        key_id: KeyId::new(id),
        hour: hour - time::Duration::hours(hours_ago),
        counts: [n, 1, 0, 0, 0, 0, 0],
        last_ip: None,
    };
    minimal
        .record_usage(&[
            bucket("key_00", 1, 2),
            bucket("key_00", 2, 3),
            bucket("key_05", 1, 4),
            bucket("key_05", 200, 9),
        ])
        .await
        .unwrap();
    let from = now - time::Duration::days(7);
    let mut by_listing = minimal.usage_by_key("o", from, now).await.unwrap();
    let mut own = minimal.0.usage_by_key("o", from, now).await.unwrap();
    by_listing.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    own.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(by_listing, own);
    assert_eq!(
        own.iter()
            .map(|b| (b.key_id.to_string(), b.counts[0], b.counts[1]))
            .collect::<Vec<_>>(),
        [("key_00".to_owned(), 5, 2), ("key_05".to_owned(), 4, 1)]
    );
    assert!(
        minimal
            .usage_by_key("nobody", from, now)
            .await
            .unwrap()
            .is_empty()
    );
}
