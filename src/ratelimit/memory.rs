//! One instance: rate-limit state in memory, a GCRA per budget level, decided over a whole chain
//! of levels at once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::bucket::Bucket;
use super::decision::{RateChain, RateOutcome};
use super::front;
use super::gcra::{Gcra, Held, Step};
use crate::limits::{BudgetId, BudgetLevel, RateLimit};

/// Budget levels whose rate-limit state [`MemoryRates::new`] keeps: 1,000,000 (about 100 MB at
/// most).
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// Ids of `MemoryRates` (for the per-thread fronts), unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Rate-limit state in memory: one GCRA bucket (a theoretical arrival time under a lock) per budget
/// level ([`BudgetId`]: a key, an ancestor, a pool) in a bounded `moka` cache (least recently and
/// frequently used levels go first when it is full). An evicted level starts again with a full
/// bucket, which it has anyway after a period of no use: the bound only matters under more active
/// levels than it holds. Cheap to clone; clones share the state.
///
/// A request is decided over every level of its chain at once: the levels are locked in chain
/// order (the key, its ancestors nearest first, the account pool, the owner pool: one order for
/// every chain of a tree), every level is checked, and only if all admit is the cost spent at each;
/// a refused request changes no level.
#[derive(Clone)]
pub struct MemoryRates {
    id: u64,
    buckets: moka::sync::Cache<BudgetId, Arc<Bucket>>,
    clock: quanta::Clock,
    /// The clock's raw reading when this state was made.
    origin: u64,
}

impl fmt::Debug for MemoryRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRates")
            .field("levels", &self.buckets.entry_count())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryRates {
    fn default() -> Self {
        Self::new()
    }
}

/// A clock for tests that moves only when told to; made by [`MemoryRates::with_manual_clock`].
#[derive(Clone)]
pub struct ManualClock(Arc<quanta::Mock>);

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock")
            .field(&Duration::from_nanos(self.0.value()))
            .finish()
    }
}

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.increment(by);
    }
}

/// One walk down a chain (see [`MemoryRates::walk`]).
enum Walk {
    /// Every level admitted and was spent at; the most constraining level's outcome, if any.
    Admitted(Option<RateChain>),
    /// This level refused; nothing was spent anywhere.
    Refused(RateChain),
    /// A level was held by another decision (a chain in another order, or a level twice in one
    /// chain): nothing was spent; try again.
    Busy,
}

impl MemoryRates {
    /// Keeps the state of at most [`DEFAULT_MAX_KEYS`] levels.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// Keeps the state of at most `max_keys` levels (least recently and frequently used go first).
    pub fn with_max_keys(max_keys: u64) -> Self {
        Self::with_clock(max_keys, quanta::Clock::new())
    }

    /// Like [`with_max_keys`](Self::with_max_keys), on a clock that moves only when the returned
    /// [`ManualClock`] is advanced: for tests.
    pub fn with_manual_clock(max_keys: u64) -> (Self, ManualClock) {
        let (clock, mock) = quanta::Clock::mock();
        (Self::with_clock(max_keys, clock), ManualClock(mock))
    }

    fn with_clock(max_keys: u64, clock: quanta::Clock) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            buckets: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                // Whatever the cause, a bucket out of the cache is no longer the level's bucket.
                .eviction_listener(|_, bucket: Arc<Bucket>, _| {
                    bucket.retired.store(true, Ordering::Release);
                })
                .build(),
            origin: clock.raw(),
            clock,
        }
    }

    /// Levels with state right now (approximate, as moka counts).
    pub fn key_count(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }

    /// Nanoseconds since this state was made.
    fn now(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }

    /// The level's bucket at `limit`: this thread's front, else the cache (one bucket per level,
    /// replaced when the level's limit changed, going on from the old one's window).
    fn bucket(&self, key: &BudgetId, limit: RateLimit) -> Arc<Bucket> {
        if let Some(bucket) = front::get(self.id, key, limit) {
            return bucket;
        }
        self.cached(key, limit)
    }

    /// The level's bucket at `limit` from the cache (made, or remade for a changed limit, if
    /// need be), put in this thread's front.
    fn cached(&self, key: &BudgetId, limit: RateLimit) -> Arc<Bucket> {
        if let Some(bucket) = self.buckets.get(key)
            && bucket.limit == limit
        {
            front::fill(self.id, key, &bucket);
            return bucket;
        }
        // New, or the level's limit changed: one bucket for the new limit, made under the level's
        // lock (concurrent first requests must not each make their own).
        let bucket = self
            .buckets
            .entry_by_ref(key)
            .and_upsert_with(|entry| match entry {
                Some(entry) if entry.value().limit == limit => entry.into_value(),
                // A changed limit goes on from the window in progress: no fresh burst.
                Some(entry) => Arc::new(Bucket::succeeding(limit, entry.value())),
                None => Arc::new(Bucket::new(limit)),
            })
            .into_value();
        front::fill(self.id, key, &bucket);
        bucket
    }

    /// Decides `cost` units over every level of `levels` that has a rate limit, all or nothing;
    /// `None` when none has one. A cost above some level's whole limit never passes: the first
    /// such level refuses it, whatever the state. Otherwise the first level (in chain order) that
    /// has too little left refuses it.
    pub(crate) fn check(&self, levels: &[BudgetLevel], cost: u32) -> Option<RateChain> {
        // The one rate-limited level, if there is only one (most chains).
        let mut single = None;
        let mut rated = 0;
        for (level, budget) in levels.iter().enumerate() {
            if let Some(limit) = budget.limits.rate_limit {
                rated += 1;
                single = Some((level, limit));
                if cost > limit.limit {
                    return Some(RateChain {
                        level,
                        outcome: RateOutcome::never(limit),
                    });
                }
            }
        }
        match (rated, single) {
            (0, _) | (_, None) => return None,
            (1, Some((level, limit))) => return Some(self.check_one(levels, level, limit, cost)),
            _ => {}
        }
        let now = self.now();
        for attempt in 0u32.. {
            match self.walk(levels, 0, true, now, cost) {
                Walk::Admitted(best) => return best,
                Walk::Refused(refused) => return Some(refused),
                Walk::Busy if attempt == 16 && has_duplicates(levels) => {
                    // A level twice in one chain (never from the resolver): count it once.
                    let mut unique: Vec<BudgetLevel> = Vec::with_capacity(levels.len());
                    for level in levels {
                        if !unique.iter().any(|u| u.id == level.id) {
                            unique.push(level.clone());
                        }
                    }
                    return self.check(&unique, cost);
                }
                Walk::Busy if attempt < 4 => std::hint::spin_loop(),
                Walk::Busy => std::thread::yield_now(),
            }
        }
        unreachable!("the loop returns")
    }

    /// Decides `cost` units on the one rate-limited level of a chain: one compare-and-swap on its
    /// bucket, found in this thread's front without taking a reference to it.
    fn check_one(
        &self,
        levels: &[BudgetLevel],
        level: usize,
        limit: RateLimit,
        cost: u32,
    ) -> RateChain {
        let id = &levels[level].id;
        let decide = |bucket: &Arc<Bucket>| {
            let gcra = &bucket.gcra;
            outcome(gcra, gcra.decide(self.now(), cost), cost)
        };
        let outcome = match front::with(self.id, id, limit, decide) {
            Ok(outcome) => outcome,
            Err(decide) => decide(&self.cached(id, limit)),
        };
        RateChain { level, outcome }
    }

    /// Locks the rate-limited levels of `levels[from..]` one after the other (the first of the
    /// chain waits for its lock; the next ones only try theirs briefly, so chains in inconsistent
    /// orders cannot deadlock), checks each, and if all fit commits each on the way back.
    /// `first`: no level above in the walk is held.
    fn walk(&self, levels: &[BudgetLevel], from: usize, first: bool, now: u64, cost: u32) -> Walk {
        let Some((offset, limit)) = levels[from..]
            .iter()
            .enumerate()
            .find_map(|(i, level)| level.limits.rate_limit.map(|limit| (i, limit)))
        else {
            return Walk::Admitted(None);
        };
        let level = from + offset;
        let bucket = self.bucket(&levels[level].id, limit);
        let mut lock: Held<'_> = if first {
            bucket.gcra.lock()
        } else {
            match try_lock_briefly(&bucket) {
                Some(lock) => lock,
                None => return Walk::Busy,
            }
        };
        match lock.check(now, cost) {
            step @ Step::Refused { .. } => Walk::Refused(RateChain {
                level,
                outcome: outcome(&bucket.gcra, step, cost),
            }),
            step @ Step::Fits { new_tat, .. } => {
                match self.walk(levels, level + 1, false, now, cost) {
                    Walk::Admitted(below) => {
                        lock.commit(new_tat);
                        let mine = RateChain {
                            level,
                            outcome: outcome(&bucket.gcra, step, cost),
                        };
                        Walk::Admitted(Some(match below {
                            Some(below) if tighter(&below.outcome, &mine.outcome) => below,
                            _ => mine,
                        }))
                    }
                    other => other,
                }
            }
        }
    }
}

/// What a level's step means for the request: what is left, when the level is full again and when
/// this cost would pass.
fn outcome(gcra: &Gcra, step: Step, cost: u32) -> RateOutcome {
    match step {
        Step::Fits { until_full, .. } => RateOutcome {
            allowed: true,
            remaining: gcra.remaining(until_full),
            reset: Duration::from_nanos(until_full),
            retry_after: Duration::ZERO,
        },
        Step::Refused { until_full } => RateOutcome {
            allowed: false,
            remaining: gcra.remaining(until_full),
            reset: Duration::from_nanos(until_full),
            retry_after: Duration::from_nanos(gcra.retry_after(cost, until_full)),
        },
    }
}

/// The lock of a level below the first of a walk: a few tries, then give up (the walk restarts).
fn try_lock_briefly(bucket: &Bucket) -> Option<Held<'_>> {
    for _ in 0..32 {
        if let Some(lock) = bucket.gcra.try_lock() {
            return Some(lock);
        }
        std::hint::spin_loop();
    }
    None
}

/// Whether `a` constrains more than `b`: less left, or as little left and longer until full.
fn tighter(a: &RateOutcome, b: &RateOutcome) -> bool {
    (a.remaining, std::cmp::Reverse(a.reset)) < (b.remaining, std::cmp::Reverse(b.reset))
}

/// Whether some level appears twice.
pub(super) fn has_duplicates(levels: &[BudgetLevel]) -> bool {
    levels
        .iter()
        .enumerate()
        .any(|(i, level)| levels[..i].iter().any(|l| l.id == level.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;
    use crate::limits::{PoolId, UsageLimits};

    fn level(id: &str, limit: Option<RateLimit>) -> BudgetLevel {
        BudgetLevel {
            id: BudgetId::Key(KeyId::new(id)),
            limits: UsageLimits {
                rate_limit: limit,
                credits: None,
            },
        }
    }

    fn one(id: &str, limit: RateLimit) -> Vec<BudgetLevel> {
        vec![level(id, Some(limit))]
    }

    fn allowed(rates: &MemoryRates, levels: &[BudgetLevel], cost: u32) -> bool {
        rates
            .check(levels, cost)
            .expect("rate-limited")
            .outcome
            .allowed
    }

    #[test]
    fn buckets_burst_then_refuse_with_a_wait() {
        let rates = MemoryRates::new();
        let key = one("key_a", RateLimit::new(3, 60));
        let outcomes: Vec<_> = (0..4)
            .map(|_| rates.check(&key, 1).unwrap().outcome)
            .collect();
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
        assert!(allowed(&rates, &one("key_b", RateLimit::new(3, 60)), 3));
        assert!(!allowed(&rates, &one("key_c", RateLimit::new(3, 60)), 4));
        assert!(rates.check(&[level("key_d", None)], 1).is_none());
    }

    #[test]
    fn time_refills_on_the_manual_clock() {
        let (rates, clock) = MemoryRates::with_manual_clock(100);
        let key = one("key_a", RateLimit::new(2, 10));
        assert!(allowed(&rates, &key, 2));
        assert!(!allowed(&rates, &key, 1));
        clock.advance(Duration::from_millis(4_999));
        assert!(!allowed(&rates, &key, 1));
        clock.advance(Duration::from_millis(1));
        assert!(allowed(&rates, &key, 1));
        assert!(!allowed(&rates, &key, 1));
    }

    #[test]
    fn a_chain_admits_only_when_every_level_does_and_a_refusal_spends_nothing() {
        let rates = MemoryRates::new();
        let parent = level("key_parent", Some(RateLimit::new(3, 3600)));
        let pool = BudgetLevel {
            id: BudgetId::Pool(PoolId::owner("team")),
            limits: UsageLimits {
                rate_limit: Some(RateLimit::new(100, 3600)),
                credits: None,
            },
        };
        let child = |name: &str| {
            vec![
                level(name, Some(RateLimit::new(2, 3600))),
                level("key_unlimited_between", None),
                parent.clone(),
                pool.clone(),
            ]
        };
        let (a, b) = (child("key_a"), child("key_b"));
        // The parent's 3 bind both children; the headers describe the parent once it is tightest.
        let first = rates.check(&a, 1).unwrap();
        assert!(first.outcome.allowed);
        assert_eq!((first.level, first.outcome.remaining), (0, 1));
        // b's level and the parent both have 1 left: the parent is full again later.
        let second = rates.check(&b, 1).unwrap();
        assert_eq!((second.level, second.outcome.remaining), (2, 1));
        let third = rates.check(&b, 1).unwrap();
        assert!(third.outcome.allowed);
        assert_eq!(third.outcome.remaining, 0);
        // The parent refuses a's second request: a's own level, which had room, is not spent.
        let refused = rates.check(&a, 1).unwrap();
        assert!(!refused.outcome.allowed);
        assert_eq!(refused.level, 2);
        let own = rates.check(&[level("key_a", Some(RateLimit::new(2, 3600)))], 1);
        assert_eq!(own.unwrap().outcome.remaining, 0, "a's level still had 1");
        // The pool counted the three admitted requests only.
        let pool_left = rates.check(std::slice::from_ref(&pool), 1).unwrap();
        assert_eq!(pool_left.outcome.remaining, 100 - 4);
        // A cost above a level's whole limit is refused by the first such level, with no state
        // read or changed.
        let never = rates.check(&child("key_c"), 4).unwrap();
        assert_eq!((never.level, never.outcome.allowed), (0, false));
        assert_eq!(never.outcome.retry_after, Duration::from_secs(3600));
    }

    #[test]
    fn a_level_twice_in_a_chain_counts_once_and_does_not_hang() {
        let rates = MemoryRates::new();
        let same = level("key_same", Some(RateLimit::new(2, 3600)));
        let chain = vec![same.clone(), same];
        assert!(allowed(&rates, &chain, 1));
        assert!(allowed(&rates, &chain, 1));
        assert!(!allowed(&rates, &chain, 1));
    }

    #[test]
    fn chains_in_opposite_orders_do_not_deadlock_and_stay_exact() {
        let rates = MemoryRates::new();
        let x = level("key_x", Some(RateLimit::new(3_000, 86_400)));
        let y = level("key_y", Some(RateLimit::new(1_000_000, 86_400)));
        let forward = vec![x.clone(), y.clone()];
        let backward = vec![y, x];
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let chain = if t % 2 == 0 { &forward } else { &backward };
                let (rates, admitted) = (&rates, &admitted);
                scope.spawn(move || {
                    for _ in 0..2_000 {
                        if allowed(rates, chain, 1) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 3_000);
    }

    #[test]
    fn a_changed_limit_goes_on_from_the_window_in_progress() {
        let rates = MemoryRates::new();
        assert!(allowed(&rates, &one("key_a", RateLimit::new(2, 60)), 2));
        assert!(!allowed(&rates, &one("key_a", RateLimit::new(2, 60)), 1));
        // Neither tightening nor loosening the limit buys a fresh burst: the window is spent.
        assert!(!allowed(&rates, &one("key_a", RateLimit::new(1, 60)), 1));
        assert!(!allowed(&rates, &one("key_a", RateLimit::new(5, 60)), 1));
        // A level that had room keeps the share of its window it had left: half of 4, then half
        // of 2.
        assert!(allowed(&rates, &one("key_b", RateLimit::new(4, 60)), 2));
        assert!(allowed(&rates, &one("key_b", RateLimit::new(2, 60)), 1));
        assert!(!allowed(&rates, &one("key_b", RateLimit::new(2, 60)), 1));
    }

    #[test]
    fn the_key_bound_holds() {
        let rates = MemoryRates::with_max_keys(100);
        for i in 0..10_000 {
            rates.check(&one(&format!("key_{i}"), RateLimit::new(10, 60)), 1);
        }
        assert!(rates.key_count() <= 100, "{}", rates.key_count());
    }

    #[test]
    fn the_front_stops_using_a_bucket_that_left_the_cache() {
        let rates = MemoryRates::new();
        let id = BudgetId::Key(KeyId::new("key_front"));
        let limit = RateLimit::new(1, 60);
        let key = one("key_front", limit);
        assert!(allowed(&rates, &key, 1));
        // Served by this thread's front: the same (now empty) bucket.
        assert!(!allowed(&rates, &key, 1));
        let old = rates.buckets.get(&id).expect("cached");
        rates.buckets.invalidate(&id);
        rates.buckets.run_pending_tasks();
        assert!(old.retired.load(Ordering::Acquire));
        // A new bucket, as without the front (not the retired one the front still holds).
        assert!(allowed(&rates, &key, 1));
        let new = rates.buckets.get(&id).expect("cached again");
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(!allowed(&rates, &key, 1));
        // A changed limit replaces the bucket in the cache (going on from its window: still
        // spent), which retires the old one.
        assert!(!allowed(
            &rates,
            &one("key_front", RateLimit::new(2, 60)),
            1
        ));
        rates.buckets.run_pending_tasks();
        assert!(new.retired.load(Ordering::Acquire));
        // Another `MemoryRates` never answers from this one's front.
        assert!(allowed(&MemoryRates::new(), &key, 1));
    }

    #[test]
    fn fronts_hold_only_the_cached_bucket_or_a_retired_one() {
        let rates = MemoryRates::with_max_keys(50);
        let limit = RateLimit::new(1_000, 60);
        for round in 0..20 {
            for i in 0..500 {
                rates.check(&one(&format!("key_{}", (i * 7 + round) % 500), limit), 1);
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
    fn threads_share_one_bucket_per_level() {
        let rates = MemoryRates::new();
        let key = one("key_shared", RateLimit::new(1_000, 86_400));
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        if allowed(&rates, &key, 1) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    }
}
