//! The shared cache: a [`moka::sync::Cache`] from digest to [`CacheEntry`].
//!
//! - Lifetimes are per entry ([`Lifetimes`], moka's [`Expiry`]): a known key lives until its
//!   `cached_until` (the TTL from the store read, capped at the key's own expiry); an unknown digest
//!   for the negative TTL.
//! - Eviction is moka's: TinyLFU admission (a newcomer only displaces an entry that is used less
//!   often), so a flood of one-off digests cannot push out keys that are in use.
//! - Forgetting a key: every invalidation the crate makes ([`Invalidation`](crate::invalidate::Invalidation),
//!   from key management or a broadcast) names all the key's digests, and those are removed one by
//!   one. Only a direct [`remove_key`](Cache::remove_key) by id alone registers a moka invalidation
//!   predicate, which reads no longer pass at once and moka's maintenance applies to the entries
//!   later (a scan, but only on that call). A key-id index was measured instead (`benches/memory.rs`,
//!   BENCHMARKS.md): at 1,000,000 keys it cost ~95 bytes per key (a hash table entry and its
//!   slack), which put the cache over its memory budget for a path the crate itself never takes.
//!   The predicate support costs ~24 bytes per key.

use std::time::{Duration, Instant};

use moka::Expiry;

use super::CacheEntry;
use crate::clock::now_unix_nanos;
use crate::key::{KeyDigest, KeyId};

/// Per-entry lifetimes for moka.
struct Lifetimes {
    negative_time_to_live: Duration,
}

impl Lifetimes {
    fn of(&self, entry: &CacheEntry) -> Duration {
        match entry {
            CacheEntry::Known(key) => {
                let left = key.cached_until.saturating_sub(now_unix_nanos());
                Duration::from_nanos(u64::try_from(left).unwrap_or(0))
            }
            CacheEntry::Unknown { .. } => self.negative_time_to_live,
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

pub(super) struct Cache {
    entries: moka::sync::Cache<KeyDigest, CacheEntry>,
}

impl Cache {
    pub(super) fn new(max_capacity: u64, negative_time_to_live: Duration) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_capacity)
            .expire_after(Lifetimes {
                negative_time_to_live,
            })
            .support_invalidation_closures()
            .build();
        Self { entries }
    }

    pub(super) fn get(&self, digest: &KeyDigest) -> Option<CacheEntry> {
        self.entries.get(digest)
    }

    pub(super) fn insert(&self, digest: KeyDigest, entry: CacheEntry) {
        self.entries.insert(digest, entry);
    }

    pub(super) fn remove(&self, digest: &KeyDigest) {
        self.entries.invalidate(digest);
    }

    /// Forgets every cached digest of `id`: from now on no read returns one (see the module docs).
    pub(super) fn remove_key(&self, id: &KeyId) {
        let id = id.clone();
        let registered = self.entries.invalidate_entries_if(move |_, entry| {
            matches!(entry, CacheEntry::Known(key) if key.principal.key_id() == &id)
        });
        if registered.is_err() {
            // Only possible without `support_invalidation_closures`, which `new` always sets; fail
            // safe all the same.
            self.clear();
        }
    }

    pub(super) fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Entries held (moka's count, after its pending maintenance has run).
    pub(super) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::ResolvedKey;
    use std::sync::Arc;

    fn known(id: &KeyId, cached_until: i64) -> CacheEntry {
        CacheEntry::Known(Arc::new(ResolvedKey::for_test(id.clone(), cached_until)))
    }

    /// Removing a key by id removes all its digests and nothing else.
    #[test]
    fn remove_key_forgets_all_its_digests() {
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
        cache.insert(KeyDigest::of("u"), CacheEntry::Unknown { read_at: 0 });
        cache.remove_key(&a);
        assert!(cache.get(&a1).is_none() && cache.get(&a2).is_none());
        assert!(cache.get(&b1).is_some());
        assert!(cache.get(&KeyDigest::of("u")).is_some());
        assert_eq!(cache.len(), 2);
        // A later answer for the key is cached again.
        cache.insert(a1, known(&a, far));
        assert!(cache.get(&a1).is_some());
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
