//! The shared cache: a [`moka::sync::Cache`] from digest to [`CacheEntry`], and an index from key
//! id to the digests cached for it.
//!
//! - Lifetimes are per entry ([`Lifetimes`], moka's [`Expiry`]): a known key lives until its
//!   `cached_until` (the TTL from the store read, capped at the key's own expiry); an unknown digest
//!   for the negative TTL.
//! - Eviction is moka's: TinyLFU admission (a newcomer only displaces an entry that is used less
//!   often), so a flood of one-off digests cannot push out keys that are in use.
//! - The index lets [`Cache::remove_key`] forget all digests of one key without scanning the cache.
//!   Only known keys are indexed (an unknown digest has no id). An index item is dropped when its
//!   entry leaves moka (eviction listener), but only if it still names that very entry (a `Weak`
//!   to it): an entry that was replaced in the meantime keeps its item.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::notification::RemovalCause;

use super::{CacheEntry, ResolvedKey};
use crate::clock::now_unix_nanos;
use crate::key::{KeyDigest, KeyId};

/// Per-entry lifetimes for moka.
struct Lifetimes {
    negative_ttl: Duration,
}

impl Lifetimes {
    fn of(&self, entry: &CacheEntry) -> Duration {
        match entry {
            CacheEntry::Known(key) => {
                let left = key.cached_until.saturating_sub(now_unix_nanos());
                Duration::from_nanos(u64::try_from(left).unwrap_or(0))
            }
            CacheEntry::Unknown { .. } => self.negative_ttl,
        }
    }
}

impl Expiry<KeyDigest, CacheEntry> for Lifetimes {
    fn expire_after_create(
        &self,
        _: &KeyDigest,
        entry: &CacheEntry,
        _: Instant,
    ) -> Option<Duration> {
        Some(self.of(entry))
    }

    /// A replaced entry gets the new answer's lifetime, not what was left of the old one's.
    fn expire_after_update(
        &self,
        _: &KeyDigest,
        entry: &CacheEntry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(entry))
    }
}

/// The digests cached for one key: almost always one (two during a rotation grace period).
enum Digests {
    One(KeyDigest, Weak<ResolvedKey>),
    Many(Vec<(KeyDigest, Weak<ResolvedKey>)>),
}

impl Digests {
    fn digests(&self) -> Vec<KeyDigest> {
        match self {
            Self::One(digest, _) => vec![*digest],
            Self::Many(items) => items.iter().map(|(digest, _)| *digest).collect(),
        }
    }

    fn put(&mut self, digest: KeyDigest, key: Weak<ResolvedKey>) {
        match self {
            Self::One(d, k) if *d == digest => *k = key,
            Self::One(d, k) => {
                *self = Self::Many(vec![(*d, k.clone()), (digest, key)]);
            }
            Self::Many(items) => match items.iter_mut().find(|(d, _)| *d == digest) {
                Some(item) => item.1 = key,
                None => items.push((digest, key)),
            },
        }
    }

    /// Drops the item for `digest` if it names `key`; `true` when nothing is left.
    fn forget(&mut self, digest: &KeyDigest, key: &Weak<ResolvedKey>) -> bool {
        match self {
            Self::One(d, k) => d == digest && Weak::ptr_eq(k, key),
            Self::Many(items) => {
                items.retain(|(d, k)| !(d == digest && Weak::ptr_eq(k, key)));
                items.is_empty()
            }
        }
    }
}

type Index = Mutex<HashMap<KeyId, Digests>>;

fn lock(index: &Index) -> std::sync::MutexGuard<'_, HashMap<KeyId, Digests>> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// moka plus the key-id index.
pub(super) struct Cache {
    entries: moka::sync::Cache<KeyDigest, CacheEntry>,
    index: Arc<Index>,
}

impl Cache {
    pub(super) fn new(max_capacity: u64, negative_ttl: Duration) -> Self {
        let index = Arc::<Index>::default();
        let listener_index = Arc::downgrade(&index);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_capacity)
            .expire_after(Lifetimes { negative_ttl })
            .eviction_listener(move |digest: Arc<KeyDigest>, entry, cause| {
                // Replacements were indexed by `insert` already; `forget` would keep them anyway.
                if cause == RemovalCause::Replaced {
                    return;
                }
                if let (CacheEntry::Known(key), Some(index)) = (entry, listener_index.upgrade()) {
                    let id = key.principal.key_id();
                    let mut index = lock(&index);
                    if let Some(digests) = index.get_mut(id)
                        && digests.forget(&digest, &Arc::downgrade(&key))
                    {
                        index.remove(id);
                    }
                }
            })
            .build();
        Self { entries, index }
    }

    pub(super) fn get(&self, digest: &KeyDigest) -> Option<CacheEntry> {
        self.entries.get(digest)
    }

    /// Caches an answer (indexing a known key by its id first, so that a `remove_key` that follows
    /// finds it).
    pub(super) fn insert(&self, digest: KeyDigest, entry: CacheEntry) {
        if let CacheEntry::Known(key) = &entry {
            let weak = Arc::downgrade(key);
            lock(&self.index)
                .entry(key.principal.key_id().clone())
                .and_modify(|digests| digests.put(digest, weak.clone()))
                .or_insert(Digests::One(digest, weak));
        }
        self.entries.insert(digest, entry);
    }

    pub(super) fn remove(&self, digest: &KeyDigest) {
        self.entries.invalidate(digest);
    }

    /// Forgets every cached digest of `id`: one index lookup, no scan.
    pub(super) fn remove_key(&self, id: &KeyId) {
        let digests = lock(&self.index).remove(id).map(|d| d.digests());
        for digest in digests.iter().flatten() {
            self.entries.invalidate(digest);
        }
    }

    pub(super) fn clear(&self) {
        lock(&self.index).clear();
        self.entries.invalidate_all();
    }

    /// Entries held (moka's count, after its pending maintenance has run).
    pub(super) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Keys in the id index (for tests: it must not outgrow the cache).
    #[cfg(test)]
    pub(super) fn indexed_keys(&self) -> usize {
        lock(&self.index).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(id: &KeyId, cached_until: i64) -> CacheEntry {
        CacheEntry::Known(Arc::new(ResolvedKey::for_test(id.clone(), cached_until)))
    }

    /// The index follows the cache: removing a key removes all its digests, evicted entries leave
    /// the index, a replaced entry keeps its item.
    #[test]
    fn the_index_follows_the_cache() {
        let cache = Cache::new(1000, Duration::from_secs(5));
        let far = i64::MAX;
        let (a, b) = (KeyId::new("key_a"), KeyId::new("key_b"));
        let (a1, a2, b1) = (
            KeyDigest::of("a1"),
            KeyDigest::of("a2"),
            KeyDigest::of("b1"),
        );
        cache.insert(a1, known(&a, far));
        cache.insert(a2, known(&a, far));
        cache.insert(b1, known(&b, far));
        // A replacement of a1 (a fresh read): the index must still find it.
        cache.insert(a1, known(&a, far));
        cache.entries.run_pending_tasks();
        assert_eq!(cache.indexed_keys(), 2);
        cache.remove_key(&a);
        assert!(cache.get(&a1).is_none() && cache.get(&a2).is_none());
        assert!(cache.get(&b1).is_some());
        // A digest removed on its own leaves the index once moka reports it.
        cache.remove(&b1);
        cache.entries.run_pending_tasks();
        assert_eq!(cache.indexed_keys(), 0);
        // Unknown digests are not indexed.
        cache.insert(KeyDigest::of("u"), CacheEntry::Unknown { read_at: 0 });
        assert_eq!(cache.indexed_keys(), 0);
    }

    /// An entry whose `cached_until` has passed is gone, and the negative TTL applies to unknowns.
    #[test]
    fn lifetimes_are_per_entry() {
        let cache = Cache::new(1000, Duration::from_millis(30));
        let id = KeyId::new("key_a");
        let soon = now_unix_nanos() + 30_000_000;
        cache.insert(KeyDigest::of("short"), known(&id, soon));
        cache.insert(KeyDigest::of("long"), known(&id, i64::MAX));
        cache.insert(KeyDigest::of("unknown"), CacheEntry::Unknown { read_at: 0 });
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&KeyDigest::of("short")).is_none());
        assert!(cache.get(&KeyDigest::of("unknown")).is_none());
        assert!(cache.get(&KeyDigest::of("long")).is_some());
    }
}
