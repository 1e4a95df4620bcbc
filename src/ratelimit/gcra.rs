//! The generic cell rate algorithm (GCRA) of one budget level in memory: the level's theoretical
//! arrival time (TAT) under a lock, checked and committed in two steps so that a decision over a
//! whole chain of levels can check every level before it commits any (`memory.rs`).
//!
//! Self-contained (std only): `benches/ratelimit.rs` includes this very file to compare it with
//! `governor` in one run.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// What one level says about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// It fits: commit `new_tat` to spend it; `until_full` nanoseconds after it, the level is
    /// full again.
    Fits { new_tat: u64, until_full: u64 },
    /// It does not fit now; the level is full again in `until_full` nanoseconds as it stays.
    Refused { until_full: u64 },
}

/// One level's GCRA: `limit` units at most at once, refilled one per `emission` nanoseconds.
#[derive(Debug)]
pub(crate) struct Gcra {
    emission: u64,
    limit: u32,
    /// Theoretical arrival time, in nanoseconds of the owner's clock; 0: full.
    tat: Mutex<u64>,
}

/// A level locked for a decision: check, then (every level having fit) commit.
pub(crate) struct Held<'a> {
    gcra: &'a Gcra,
    tat: MutexGuard<'a, u64>,
}

impl Gcra {
    /// A full level of `limit` units, one refilled every `emission` nanoseconds (at least 1).
    pub(crate) fn new(emission: u64, limit: u32) -> Self {
        Self {
            emission: emission.max(1),
            limit,
            tat: Mutex::new(0),
        }
    }

    /// A level of `limit` units that goes on from `previous`'s state: the same theoretical arrival
    /// time, now spent at the new rate. A level whose limit changes (a key tightening its own, a
    /// creator re-limiting a delegate, the master key re-limiting anything) keeps the window in
    /// progress instead of starting full: changing a limit never buys a fresh burst (what the
    /// Redis script does too, keeping one TAT per level whatever its limit).
    pub(crate) fn succeeding(emission: u64, limit: u32, previous: &Gcra) -> Self {
        let tat = *previous.tat.lock().unwrap_or_else(PoisonError::into_inner);
        Self {
            emission: emission.max(1),
            limit,
            tat: Mutex::new(tat),
        }
    }

    /// The emission interval, in nanoseconds.
    pub(crate) fn emission(&self) -> u64 {
        self.emission
    }

    /// The level, locked (waiting for it).
    pub(crate) fn lock(&self) -> Held<'_> {
        Held {
            gcra: self,
            tat: self.tat.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// The level, locked, if nobody holds it now.
    pub(crate) fn try_lock(&self) -> Option<Held<'_>> {
        let tat = match self.tat.try_lock() {
            Ok(tat) => tat,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Held { gcra: self, tat })
    }
}

impl Held<'_> {
    /// Whether `cost` units fit at `now` (nothing changes). A cost above the limit never fits.
    pub(crate) fn check(&self, now: u64, cost: u32) -> Step {
        let Gcra {
            emission, limit, ..
        } = *self.gcra;
        let tat = (*self.tat).max(now);
        let tau = emission.saturating_mul(limit.into());
        let new_tat = tat.saturating_add(emission.saturating_mul(cost.into()));
        if cost > limit || new_tat - now > tau {
            Step::Refused {
                until_full: tat - now,
            }
        } else {
            Step::Fits {
                new_tat,
                until_full: new_tat - now,
            }
        }
    }

    /// Spends what [`check`](Self::check) found to fit.
    pub(crate) fn commit(&mut self, new_tat: u64) {
        *self.tat = new_tat;
    }
}

/// Units left when the level is full again in `until_full` nanoseconds.
pub(crate) fn remaining(emission: u64, limit: u32, until_full: u64) -> u32 {
    let tau = emission.saturating_mul(limit.into());
    let left = tau.saturating_sub(until_full) / emission.max(1);
    u32::try_from(left).unwrap_or(u32::MAX)
}

/// Nanoseconds until `cost` units fit, for a level full again in `until_full` nanoseconds.
pub(crate) fn retry_after(emission: u64, limit: u32, cost: u32, until_full: u64) -> u64 {
    let tau = emission.saturating_mul(limit.into());
    until_full
        .saturating_add(emission.saturating_mul(cost.into()))
        .saturating_sub(tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_changed_limit_goes_on_from_the_window_in_progress() {
        // 10 units an hour, all spent: tightening to 5 (or loosening to 20) an hour gives nothing
        // more until time refills it.
        let hour = 3_600 * SECOND;
        let old = Gcra::new(hour / 10, 10);
        let mut held = old.lock();
        let Step::Fits { new_tat, .. } = held.check(0, 10) else {
            panic!("a full level takes its limit");
        };
        held.commit(new_tat);
        drop(held);
        for limit in [5, 20] {
            let new = Gcra::succeeding(hour / u64::from(limit), limit, &old);
            assert!(
                matches!(new.lock().check(SECOND, 1), Step::Refused { .. }),
                "{limit}"
            );
            // An emission interval of the new limit later, one unit fits again.
            let later = hour + hour / u64::from(limit);
            assert!(
                matches!(new.lock().check(later, 1), Step::Fits { .. }),
                "{limit}"
            );
        }
    }

    #[test]
    fn a_burst_then_one_per_emission() {
        // 3 units, one every 20 s.
        let gcra = Gcra::new(20 * SECOND, 3);
        let mut now = 5 * SECOND;
        for used in 1..=3u64 {
            let mut held = gcra.lock();
            let Step::Fits {
                new_tat,
                until_full,
            } = held.check(now, 1)
            else {
                panic!("unit {used} fits")
            };
            assert_eq!(until_full, used * 20 * SECOND);
            assert_eq!(remaining(gcra.emission(), 3, until_full), 3 - used as u32);
            held.commit(new_tat);
        }
        let held = gcra.lock();
        let Step::Refused { until_full } = held.check(now, 1) else {
            panic!("empty")
        };
        assert_eq!(until_full, 60 * SECOND);
        assert_eq!(retry_after(gcra.emission(), 3, 1, until_full), 20 * SECOND);
        assert_eq!(retry_after(gcra.emission(), 3, 2, until_full), 40 * SECOND);
        drop(held);
        // A check without a commit changed nothing; 20 s later one unit is back.
        now += 20 * SECOND;
        assert!(matches!(gcra.lock().check(now, 1), Step::Fits { .. }));
        assert!(matches!(gcra.lock().check(now, 2), Step::Refused { .. }));
        // A cost above the limit never fits, even on a full level.
        assert!(matches!(
            gcra.lock().check(now + 3600 * SECOND, 4),
            Step::Refused { .. }
        ));
    }

    #[test]
    fn a_held_level_cannot_be_taken_twice() {
        let gcra = Gcra::new(1, 1);
        let held = gcra.lock();
        assert!(gcra.try_lock().is_none());
        drop(held);
        assert!(gcra.try_lock().is_some());
    }

    #[test]
    fn extremes_saturate() {
        let gcra = Gcra::new(u64::MAX, u32::MAX);
        let held = gcra.lock();
        // No overflow anywhere, whatever the numbers.
        let _ = held.check(u64::MAX, u32::MAX);
        let _ = held.check(0, u32::MAX);
        assert_eq!(remaining(u64::MAX, u32::MAX, 0), 1);
        assert_eq!(retry_after(u64::MAX, u32::MAX, 1, u64::MAX), 0);
    }
}
