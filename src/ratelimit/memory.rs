//! One instance: rate-limit state and credits in memory.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, QuantaClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use time::OffsetDateTime;

use super::bucket::Bucket;
use super::{RateOutcome, Spend, front};
use crate::key::KeyId;
use crate::quota::{Credits, RateLimit};

/// Keys whose rate-limit state [`MemoryRates::new`] keeps: 1,000,000 (about 100 MB at most).
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// Ids of `MemoryRates` (for the per-thread fronts), unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Rate-limit state in memory: one `governor` GCRA limiter per key (quotas differ per key) in a
/// bounded `moka` cache keyed by key id (least recently and frequently used keys go first when
/// it is full). An evicted key starts again with a full bucket, which it has anyway after a period
/// of no use: the bound only matters under more active keys than it holds. Cheap to clone; clones
/// share the state.
#[derive(Clone)]
pub struct MemoryRates {
    id: u64,
    buckets: moka::sync::Cache<KeyId, Arc<Bucket>>,
    clock: QuantaClock,
}

impl fmt::Debug for MemoryRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRates")
            .field("keys", &self.buckets.entry_count())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryRates {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRates {
    /// Keeps the state of at most [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// Keeps the state of at most `max_keys` keys (least recently and frequently used go first).
    pub fn with_max_keys(max_keys: u64) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buckets: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                // Whatever the cause, a bucket out of the cache is no longer the key's bucket.
                .eviction_listener(|_, bucket: Arc<Bucket>, _| {
                    bucket.retired.store(true, Ordering::Release);
                })
                .build(),
            clock: QuantaClock::default(),
        }
    }

    /// Keys with state right now (approximate, as moka counts).
    pub fn key_count(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }

    fn bucket(&self, key: &KeyId, limit: RateLimit) -> Arc<Bucket> {
        let make = || {
            let quota = Quota::with_period(Duration::from_nanos(limit.emission_nanos()))
                .expect("the emission interval is at least 1 ns")
                .allow_burst(NonZeroU32::new(limit.limit).unwrap_or(NonZeroU32::MIN));
            Arc::new(Bucket {
                limit,
                gcra: RateLimiter::direct_with_clock(quota, self.clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
                retired: AtomicBool::new(false),
            })
        };
        if let Some(bucket) = self.buckets.get(key)
            && bucket.limit == limit
        {
            front::fill(self.id, key, &bucket);
            return bucket;
        }
        // New, or the key's limit changed: one bucket for the new quota, made under the key's lock
        // (concurrent first requests of a key must not each make their own).
        let bucket = self
            .buckets
            .entry_by_ref(key)
            .and_upsert_with(|entry| match entry {
                Some(entry) if entry.value().limit == limit => entry.into_value(),
                _ => make(),
            })
            .into_value();
        front::fill(self.id, key, &bucket);
        bucket
    }

    pub(crate) fn check(&self, key: &KeyId, limit: RateLimit, cost: u32) -> RateOutcome {
        let emission = Duration::from_nanos(limit.emission_nanos());
        let full = |remaining: u32| emission * limit.limit.saturating_sub(remaining);
        if limit.limit == 0 {
            return RateOutcome::never(limit);
        }
        let cost = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
        let step = |bucket: &Bucket| bucket.gcra.check_n(cost);
        let step = match front::with(self.id, key, limit, step) {
            Some(step) => step,
            None => step(&self.bucket(key, limit)),
        };
        match step {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                RateOutcome {
                    allowed: true,
                    remaining,
                    reset: full(remaining),
                    retry_after: Duration::ZERO,
                }
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                // `wait` is until the missing units have refilled: what is left now is the cost
                // less those, and the bucket is full once the rest of the limit has refilled too.
                let missing = wait.as_nanos().div_ceil(u128::from(limit.emission_nanos()));
                let missing = u32::try_from(missing).unwrap_or(u32::MAX);
                RateOutcome {
                    allowed: false,
                    remaining: cost.get().saturating_sub(missing),
                    reset: wait + emission * (limit.limit - cost.get()),
                    retry_after: wait,
                }
            }
            // The cost is above the key's whole limit: it can never pass.
            Err(_) => RateOutcome::never(limit),
        }
    }
}

/// One key's credits: the settings they were seeded from, and what is left.
struct Cell {
    seed: Credits,
    state: Credits,
}

/// Credits counted in memory: an exact decrement per key under a per-key lock, seeded from the
/// key's record (via its principal) the first time the key is seen and again whenever the record's
/// credits change (an update sets `set_at`). What was spent is not written anywhere: after a
/// restart every key starts again from its record. Use it for one instance; a fleet needs a shared
/// counter. Cheap to clone; clones share the state.
///
/// It is not bounded: it holds one entry (about 200 bytes) for every key with credits it has seen,
/// since forgetting one would hand its spent credits back. For many such keys, or a fleet, count
/// them in the store ([`StoreCredits`](super::StoreCredits)).
#[derive(Clone, Default)]
pub struct MemoryCredits {
    cells: Arc<RwLock<HashMap<KeyId, Arc<Mutex<Cell>>>>>,
}

impl fmt::Debug for MemoryCredits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCredits").finish_non_exhaustive()
    }
}

impl MemoryCredits {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn cell(&self, key: &KeyId, seed: &Credits) -> Arc<Mutex<Cell>> {
        if let Some(cell) = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return cell.clone();
        }
        self.cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Cell {
                    seed: *seed,
                    state: *seed,
                }))
            })
            .clone()
    }

    /// What is left for `key` at `now`, if it has been seen.
    pub fn remaining(&self, key: &KeyId, now: OffsetDateTime) -> Option<u64> {
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        let cell = cells
            .get(key)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(cell.state.current(now))
    }

    pub(crate) fn spend(
        &self,
        key: &KeyId,
        seed: &Credits,
        cost: u32,
        now: OffsetDateTime,
    ) -> Spend {
        let cell = self.cell(key, seed);
        let mut cell = cell.lock().unwrap_or_else(PoisonError::into_inner);
        if cell.seed != *seed {
            // The record's credits were changed (or refilled by the store): start from them.
            cell.seed = *seed;
            cell.state = *seed;
        }
        cell.state = cell.state.refreshed(now);
        let cost = u64::from(cost);
        match cell.state.remaining.checked_sub(cost) {
            Some(left) => {
                cell.state.remaining = left;
                Spend::Spent { remaining: left }
            }
            None => Spend::Exhausted {
                remaining: cell.state.remaining,
            },
        }
    }

    pub(crate) fn refund(&self, key: &KeyId, cost: u32, now: OffsetDateTime) {
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(cell) = cells.get(key) {
            let mut cell = cell.lock().unwrap_or_else(PoisonError::into_inner);
            // A refill since the spend already restored everything.
            if cell.state.set_at <= now {
                cell.state.remaining = cell.state.remaining.saturating_add(cost.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::RefillInterval;
    use time::macros::datetime;

    #[test]
    fn buckets_burst_then_refuse_with_a_wait() {
        let rates = MemoryRates::new();
        let key = KeyId::new("key_a");
        let limit = RateLimit::new(3, 60);
        let outcomes: Vec<_> = (0..4).map(|_| rates.check(&key, limit, 1)).collect();
        assert_eq!(
            outcomes.iter().map(|o| o.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(outcomes[0].remaining, 2);
        assert_eq!(outcomes[2].remaining, 0);
        let refused = outcomes[3];
        assert!(refused.retry_after > Duration::from_secs(19));
        assert!(refused.retry_after <= Duration::from_secs(20));
        // Another key is independent; a cost above the limit never passes.
        assert!(rates.check(&KeyId::new("key_b"), limit, 3).allowed);
        assert!(!rates.check(&KeyId::new("key_c"), limit, 4).allowed);
    }

    #[test]
    fn a_changed_limit_gets_a_new_bucket() {
        let rates = MemoryRates::new();
        let key = KeyId::new("key_a");
        assert!(rates.check(&key, RateLimit::new(1, 60), 1).allowed);
        assert!(!rates.check(&key, RateLimit::new(1, 60), 1).allowed);
        assert!(rates.check(&key, RateLimit::new(5, 60), 1).allowed);
    }

    #[test]
    fn the_key_bound_holds() {
        let rates = MemoryRates::with_max_keys(100);
        for i in 0..10_000 {
            rates.check(&KeyId::new(format!("key_{i}")), RateLimit::new(10, 60), 1);
        }
        assert!(rates.key_count() <= 100, "{}", rates.key_count());
    }

    #[test]
    fn the_front_stops_using_a_bucket_that_left_the_cache() {
        let rates = MemoryRates::new();
        let key = KeyId::new("key_front");
        let limit = RateLimit::new(1, 60);
        assert!(rates.check(&key, limit, 1).allowed);
        // Served by this thread's front: the same (now empty) bucket.
        assert!(!rates.check(&key, limit, 1).allowed);
        let old = rates.buckets.get(&key).expect("cached");
        rates.buckets.invalidate(&key);
        rates.buckets.run_pending_tasks();
        assert!(old.retired.load(Ordering::Acquire));
        // A new bucket, as without the front (not the retired one the front still holds).
        assert!(rates.check(&key, limit, 1).allowed);
        let new = rates.buckets.get(&key).expect("cached again");
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(!rates.check(&key, limit, 1).allowed);
        // A changed limit replaces the bucket in the cache, which retires the old one.
        assert!(rates.check(&key, RateLimit::new(2, 60), 1).allowed);
        rates.buckets.run_pending_tasks();
        assert!(new.retired.load(Ordering::Acquire));
        // Another `MemoryRates` never answers from this one's front.
        assert!(MemoryRates::new().check(&key, limit, 1).allowed);
    }

    #[test]
    fn fronts_hold_only_the_cached_bucket_or_a_retired_one() {
        let rates = MemoryRates::with_max_keys(50);
        let limit = RateLimit::new(1_000, 60);
        for round in 0..20 {
            for i in 0..500 {
                rates.check(
                    &KeyId::new(format!("key_{}", (i * 7 + round) % 500)),
                    limit,
                    1,
                );
            }
        }
        rates.buckets.run_pending_tasks();
        let mut seen = 0;
        front::each(rates.id, |key, bucket| {
            seen += 1;
            let current = rates.buckets.get(key);
            assert!(
                bucket.retired.load(Ordering::Acquire)
                    || current.is_some_and(|current| std::ptr::eq(&*current, bucket)),
                "a live front bucket that is not the cache's"
            );
        });
        assert!(seen > 0);
    }

    #[test]
    fn threads_share_one_bucket_per_key() {
        let rates = MemoryRates::new();
        let key = KeyId::new("key_shared");
        let limit = RateLimit::new(1_000, 86_400);
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        if rates.check(&key, limit, 1).allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    }

    #[test]
    fn credits_are_exact_and_refill() {
        let ledger = MemoryCredits::new();
        let key = KeyId::new("key_a");
        let day = datetime!(2026-03-04 10:00 UTC);
        let seed = Credits::new(5).refill(RefillInterval::Daily, 7).set_at(day);
        assert_eq!(
            ledger.spend(&key, &seed, 2, day),
            Spend::Spent { remaining: 3 }
        );
        assert_eq!(
            ledger.spend(&key, &seed, 4, day),
            Spend::Exhausted { remaining: 3 }
        );
        assert_eq!(
            ledger.spend(&key, &seed, 3, day),
            Spend::Spent { remaining: 0 }
        );
        ledger.refund(&key, 1, day);
        assert_eq!(ledger.remaining(&key, day), Some(1));
        let tomorrow = datetime!(2026-03-05 0:00 UTC);
        assert_eq!(ledger.remaining(&key, tomorrow), Some(7));
        assert_eq!(
            ledger.spend(&key, &seed, 1, tomorrow),
            Spend::Spent { remaining: 6 }
        );
        // An update of the record (new set_at) starts again from it.
        let updated = Credits::new(100).set_at(tomorrow + time::Duration::HOUR);
        assert_eq!(
            ledger.spend(&key, &updated, 1, tomorrow + time::Duration::HOUR),
            Spend::Spent { remaining: 99 }
        );
    }
}
