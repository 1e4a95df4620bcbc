//! The resolver's bounded cache: digest → [`CacheEntry`], with a deadline per entry.
//!
//! Built for this one job instead of a general-purpose cache, because a general one costs more than
//! everything else a cached key needs (measured with moka 0.12: ~300 bytes and ~230 ns per entry and
//! hit; here ~70 bytes and one uncontended lock):
//!
//! - **Shards**: up to 64 `Mutex`es, picked by the digest's first byte; no lock is held across an
//!   await or while calling out. The per-thread front ([`super::front`]) answers most hits without
//!   touching a shard.
//! - **Slots**: each shard keeps entries in a `Vec` of slots (digest, entry, deadline, a
//!   "referenced" bit) and an index of slot numbers (`hashbrown::HashTable<u32>`, keyed by a
//!   SipHash of the digest with a per-process random key, so crafted keys cannot pile into one
//!   bucket).
//! - **Eviction**: CLOCK (second chance), an LRU approximation: when a shard is full, a hand sweeps
//!   the slots, clearing "referenced" bits and evicting the first expired or unreferenced entry.
//! - **Expiry**: every entry carries its own deadline (Unix nanoseconds on the coarse wall clock,
//!   [`crate::clock`]); an expired entry is never returned and its slot is reused first.

use std::hash::BuildHasher;
use std::sync::Mutex;

use hashbrown::HashTable;

use super::CacheEntry;

/// Most shards; small caches get fewer, so the capacity bound stays close.
const MAX_SHARDS: usize = 64;

struct Slot {
    digest: [u8; 32],
    entry: CacheEntry,
    /// Unix nanoseconds after which the entry is gone.
    deadline: i64,
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    index: HashTable<u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    hand: usize,
}

pub(super) struct Table {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    hasher: std::hash::RandomState,
}

impl Table {
    /// A table holding at most about `capacity` entries (at most `capacity + shards - 1`).
    pub(super) fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let shards = (capacity / 64).clamp(1, MAX_SHARDS).next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            shard_capacity: capacity.div_ceil(shards).min(u32::MAX as usize),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[usize::from(digest[0]) & (self.shards.len() - 1)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hash(&self, digest: &[u8; 32]) -> u64 {
        self.hasher.hash_one(digest)
    }

    /// The live entry for `digest` at `now`, marked as recently used.
    pub(super) fn get(&self, digest: &[u8; 32], now: i64) -> Option<CacheEntry> {
        let hash = self.hash(digest);
        let mut shard = self.shard(digest);
        let at = shard.find(hash, digest)?;
        match shard.slots[at].as_mut() {
            Some(slot) if slot.deadline > now => {
                slot.referenced = true;
                Some(slot.entry.clone())
            }
            _ => {
                shard.remove_at(hash, at);
                None
            }
        }
    }

    /// Puts `entry` for `digest` until `deadline`, replacing an earlier entry, evicting one if full.
    pub(super) fn insert(&self, digest: &[u8; 32], entry: CacheEntry, deadline: i64, now: i64) {
        let hash = self.hash(digest);
        let mut shard = self.shard(digest);
        let slot = Slot {
            digest: *digest,
            entry,
            deadline,
            referenced: false,
        };
        if let Some(at) = shard.find(hash, digest) {
            shard.slots[at] = Some(slot);
            return;
        }
        let at = match shard.free.pop() {
            Some(at) => at as usize,
            None if shard.slots.len() < self.shard_capacity => {
                shard.slots.push(None);
                shard.slots.len() - 1
            }
            None => {
                let victim = shard.victim(now);
                let victim_hash = self.hash(&shard.slots[victim].as_ref().expect("full").digest);
                shard.remove_at(victim_hash, victim);
                shard.free.pop().expect("just freed") as usize
            }
        };
        shard.slots[at] = Some(slot);
        let Shard { index, slots, .. } = &mut *shard;
        index.insert_unique(hash, at as u32, |&i| {
            let slot = slots[i as usize].as_ref();
            self.hasher
                .hash_one(slot.expect("indexed slots are full").digest)
        });
    }

    /// Forgets `digest`.
    pub(super) fn remove(&self, digest: &[u8; 32]) {
        let hash = self.hash(digest);
        let mut shard = self.shard(digest);
        if let Some(at) = shard.find(hash, digest) {
            shard.remove_at(hash, at);
        }
    }

    /// Forgets every entry `forget` picks (a full scan: for rare events such as a revocation).
    pub(super) fn remove_if(&self, forget: impl Fn(&CacheEntry) -> bool) {
        for shard in &*self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let doomed: Vec<usize> = (0..shard.slots.len())
                .filter(|&at| shard.slots[at].as_ref().is_some_and(|s| forget(&s.entry)))
                .collect();
            for at in doomed {
                let hash = self.hash(&shard.slots[at].as_ref().expect("just seen").digest);
                shard.remove_at(hash, at);
            }
        }
    }

    /// Forgets everything.
    pub(super) fn clear(&self) {
        for shard in &*self.shards {
            *shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Shard::default();
        }
    }

    /// Entries held, expired ones included until their slot is reused.
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).index.len())
            .sum()
    }
}

impl Shard {
    fn find(&self, hash: u64, digest: &[u8; 32]) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| {
                slots[i as usize]
                    .as_ref()
                    .is_some_and(|s| s.digest == *digest)
            })
            .map(|&i| i as usize)
    }

    fn remove_at(&mut self, hash: u64, at: usize) {
        if let Ok(entry) = self.index.find_entry(hash, |&i| i as usize == at) {
            entry.remove();
        }
        self.slots[at] = None;
        self.free.push(at as u32);
    }

    /// The slot to evict from a full shard: the first expired or unreferenced one after the hand,
    /// clearing "referenced" bits on the way (second chance).
    fn victim(&mut self, now: i64) -> usize {
        let len = self.slots.len();
        // Two sweeps at most: the first clears every bit it passes.
        for _ in 0..=2 * len {
            self.hand = (self.hand + 1) % len;
            if let Some(slot) = self.slots[self.hand].as_mut() {
                if slot.deadline <= now || !slot.referenced {
                    return self.hand;
                }
                slot.referenced = false;
            }
        }
        self.hand
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn digest(i: u32) -> [u8; 32] {
        crate::key::KeyDigest::of(&format!("key {i}"))
            .as_bytes()
            .to_owned()
    }

    const NOW: i64 = 1_000;
    const LATER: i64 = i64::MAX;

    #[test]
    fn holds_what_it_is_given_until_the_deadline() {
        let table = Table::new(100);
        table.insert(&digest(1), CacheEntry::Unknown, 2_000, NOW);
        assert!(table.get(&digest(1), 1_999).is_some());
        assert!(table.get(&digest(2), NOW).is_none());
        assert!(
            table.get(&digest(1), 2_000).is_none(),
            "returned at its deadline"
        );
        assert_eq!(table.len(), 0, "an expired entry found by `get` is dropped");
    }

    #[test]
    fn stays_within_its_capacity_and_keeps_used_entries() {
        for capacity in [1u64, 7, 64, 1000, 5000] {
            let table = Table::new(capacity);
            let bound = capacity as usize + table.shards.len() - 1;
            let hot: Vec<_> = (0..capacity.min(8) as u32).map(digest).collect();
            for d in &hot {
                table.insert(d, CacheEntry::Unknown, LATER, NOW);
            }
            for i in 100..100 + 4 * capacity as u32 {
                // Hot entries are read between inserts: CLOCK gives them a second chance.
                for d in &hot {
                    let _ = table.get(d, NOW);
                }
                table.insert(&digest(i), CacheEntry::Unknown, LATER, NOW);
                assert!(
                    table.len() <= bound,
                    "capacity {capacity}: {} entries",
                    table.len()
                );
            }
            if capacity >= 64 {
                let kept = hot.iter().filter(|d| table.get(d, NOW).is_some()).count();
                assert_eq!(kept, hot.len(), "capacity {capacity}: hot entries evicted");
            }
        }
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let table = Table::new(1);
        table.insert(&digest(1), CacheEntry::Unknown, LATER, NOW);
        let _ = table.get(&digest(1), NOW);
        table.insert(&digest(2), CacheEntry::Unknown, 1_500, NOW);
        table.insert(&digest(3), CacheEntry::Unknown, LATER, 2_000);
        assert!(table.get(&digest(3), 2_000).is_some());
    }

    #[test]
    fn replaces_removes_and_clears() {
        let table = Table::new(1000);
        let digests: Vec<_> = (0..500).map(digest).collect();
        for d in &digests {
            table.insert(d, CacheEntry::Unknown, LATER, NOW);
        }
        // Replacing keeps one entry per digest.
        for d in &digests {
            table.insert(d, CacheEntry::Unknown, LATER, NOW);
        }
        assert_eq!(table.len(), 500);
        for d in &digests[..100] {
            table.remove(d);
        }
        assert_eq!(table.len(), 400);
        let kept: HashSet<_> = digests[100..].iter().collect();
        for d in &digests {
            assert_eq!(table.get(d, NOW).is_some(), kept.contains(d));
        }
        table.remove_if(|_| true);
        assert_eq!(table.len(), 0);
        for d in &digests {
            table.insert(d, CacheEntry::Unknown, LATER, NOW);
        }
        table.clear();
        assert_eq!(table.len(), 0);
        assert!(table.get(&digests[0], NOW).is_none());
    }

    /// Threads inserting, reading and removing at once: the index and the slots stay consistent.
    #[test]
    fn consistent_under_concurrency() {
        let table = std::sync::Arc::new(Table::new(256));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let d = digest(i % 700 + t * 50);
                        match i % 3 {
                            0 => table.insert(&d, CacheEntry::Unknown, LATER, NOW),
                            1 => drop(table.get(&d, NOW)),
                            _ => table.remove(&d),
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for shard in &*table.shards {
            let shard = shard.lock().unwrap();
            let full = shard.slots.iter().filter(|s| s.is_some()).count();
            assert_eq!(shard.index.len(), full);
            assert_eq!(shard.free.len() + full, shard.slots.len());
            for (at, slot) in shard.slots.iter().enumerate() {
                if let Some(slot) = slot {
                    assert_eq!(shard.find(table.hash(&slot.digest), &slot.digest), Some(at));
                }
            }
        }
    }
}
