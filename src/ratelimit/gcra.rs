//! The generic cell rate algorithm (GCRA) of one budget level in memory: the level's theoretical
//! arrival time (TAT) in one atomic word. A decision over one level is one compare-and-swap
//! ([`Gcra::decide`]); a decision over a whole chain of levels locks each level (a bit of the same
//! word), checks every level, and only then commits any (`memory.rs`).
//!
//! Self-contained (std only): `benches/ratelimit.rs` includes this very file to compare it with
//! `governor` in one run.

use std::sync::atomic::{AtomicU64, Ordering};

/// The bit of [`Gcra::state`] set while a chain decision holds the level.
const LOCKED: u64 = 1 << 63;

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
    /// `emission × limit` (saturated): how far ahead of now the TAT may be.
    tau: u64,
    /// `1 / emission`, for what is left without a division ([`Gcra::remaining`]).
    per_emission: f64,
    limit: u32,
    /// Theoretical arrival time, in nanoseconds of the owner's clock (0: full), below [`LOCKED`];
    /// with [`LOCKED`] set while a chain decision holds the level.
    state: AtomicU64,
}

/// A level locked for a decision: check, then (every level having fit) commit. Unlocked when
/// dropped.
pub(crate) struct Held<'a> {
    gcra: &'a Gcra,
    tat: u64,
}

impl Gcra {
    /// A full level of `limit` units, one refilled every `emission` nanoseconds (at least 1).
    pub(crate) fn new(emission: u64, limit: u32) -> Self {
        Self::at(emission, limit, 0)
    }

    fn at(emission: u64, limit: u32, tat: u64) -> Self {
        let emission = emission.max(1);
        Self {
            emission,
            tau: emission.saturating_mul(limit.into()),
            per_emission: 1.0 / emission as f64,
            limit,
            state: AtomicU64::new(tat & !LOCKED),
        }
    }

    /// A level of `limit` units that goes on from `previous`'s state: the same theoretical arrival
    /// time, now spent at the new rate. A level whose limit changes (a key tightening its own, a
    /// creator re-limiting a delegate, the master key re-limiting anything) keeps the window in
    /// progress instead of starting full: changing a limit never buys a fresh burst (what the
    /// Redis script does too, keeping one TAT per level whatever its limit).
    pub(crate) fn succeeding(emission: u64, limit: u32, previous: &Gcra) -> Self {
        let tat = previous.lock().tat;
        Self::at(emission, limit, tat)
    }

    /// Whether `cost` units fit at `now` on a level whose TAT is `tat`. A cost above the limit
    /// never fits.
    fn step(&self, tat: u64, now: u64, cost: u32) -> Step {
        let now = now.min(LOCKED - 1);
        let tat = tat.max(now);
        // Kept below the lock bit: 2^63 ns is 292 years.
        let new_tat = tat
            .saturating_add(self.emission.saturating_mul(cost.into()))
            .min(LOCKED - 1);
        if cost > self.limit || new_tat - now > self.tau {
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

    /// Decides `cost` units at `now` on this level alone, and spends them if they fit: one
    /// compare-and-swap (waiting while a chain decision holds the level).
    pub(crate) fn decide(&self, now: u64, cost: u32) -> Step {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & LOCKED != 0 {
                std::hint::spin_loop();
                state = self.state.load(Ordering::Acquire);
                continue;
            }
            let step = self.step(state, now, cost);
            let Step::Fits { new_tat, .. } = step else {
                return step;
            };
            match self.state.compare_exchange_weak(
                state,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return step,
                Err(now_state) => state = now_state,
            }
        }
    }

    /// The level, locked, if nobody holds it now.
    pub(crate) fn try_lock(&self) -> Option<Held<'_>> {
        let state = self.state.load(Ordering::Relaxed);
        if state & LOCKED != 0 {
            return None;
        }
        self.state
            .compare_exchange(state, state | LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Held {
                gcra: self,
                tat: state,
            })
    }

    /// The level, locked (waiting for it).
    pub(crate) fn lock(&self) -> Held<'_> {
        let mut spins = 0u32;
        loop {
            if let Some(held) = self.try_lock() {
                return held;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Units left when the level is full again in `until_full` nanoseconds: `(tau - until_full) /
    /// emission` rounded down, by a multiplication with the reciprocal and one correction (exact:
    /// the quotient is at most the limit, below 2^32, so the float is off by less than one).
    pub(crate) fn remaining(&self, until_full: u64) -> u32 {
        let left = self.tau.saturating_sub(until_full);
        let mut units = ((left as f64) * self.per_emission) as u64;
        let used = units.saturating_mul(self.emission);
        if used > left {
            units -= 1;
        } else if left - used >= self.emission {
            units += 1;
        }
        u32::try_from(units).unwrap_or(u32::MAX)
    }

    /// Nanoseconds until `cost` units fit, when the level is full again in `until_full`
    /// nanoseconds.
    pub(crate) fn retry_after(&self, cost: u32, until_full: u64) -> u64 {
        retry_after(self.emission, self.limit, cost, until_full)
    }
}

impl Held<'_> {
    /// Whether `cost` units fit at `now` (nothing changes). A cost above the limit never fits.
    pub(crate) fn check(&self, now: u64, cost: u32) -> Step {
        self.gcra.step(self.tat, now, cost)
    }

    /// Spends what [`check`](Self::check) found to fit (written when the level is unlocked).
    pub(crate) fn commit(&mut self, new_tat: u64) {
        self.tat = new_tat & !LOCKED;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gcra.state.store(self.tat, Ordering::Release);
    }
}

/// Units left when the level is full again in `until_full` nanoseconds, by a division (what
/// [`Gcra::remaining`] is checked against; `benches/ratelimit.rs` uses it too).
#[allow(dead_code)]
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
            assert_eq!(gcra.remaining(until_full), 3 - used as u32);
            held.commit(new_tat);
        }
        let held = gcra.lock();
        let Step::Refused { until_full } = held.check(now, 1) else {
            panic!("empty")
        };
        assert_eq!(until_full, 60 * SECOND);
        assert_eq!(gcra.retry_after(1, until_full), 20 * SECOND);
        assert_eq!(gcra.retry_after(2, until_full), 40 * SECOND);
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

    /// What is left, by the reciprocal, is the quotient a division gives, for any emission
    /// interval, limit and time until full.
    #[test]
    fn remaining_without_a_division_is_exact() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases = vec![
            (1, 1, 0),
            (1, u32::MAX, 0),
            (u64::MAX, u32::MAX, 0),
            (u64::MAX, 1, 1),
            (3, 3, 4),
            (1_000_000_000, 1_000_000_000, 999_999_999),
        ];
        for _ in 0..200_000 {
            let emission = match next() % 4 {
                0 => next() % 1_000 + 1,
                1 => next() % 1_000_000_000_000 + 1,
                2 => next() >> (next() % 64),
                _ => 31_622_400_000_000_000 / (next() % 1_000_000_000 + 1),
            }
            .max(1);
            let limit = match next() % 3 {
                0 => (next() % 100 + 1) as u32,
                1 => next() as u32,
                _ => u32::MAX - (next() % 3) as u32,
            };
            let tau = emission.saturating_mul(limit.into());
            let until_full = match next() % 3 {
                0 => tau.saturating_sub(next() % (emission.saturating_mul(3))),
                1 => next() % tau.max(1),
                _ => (next() % u64::from(limit).max(1)).saturating_mul(emission),
            };
            cases.push((emission, limit, until_full));
        }
        for (emission, limit, until_full) in cases {
            let gcra = Gcra::new(emission, limit);
            assert_eq!(
                gcra.remaining(until_full),
                remaining(emission, limit, until_full),
                "{emission} {limit} {until_full}"
            );
        }
    }

    #[test]
    fn a_level_alone_decides_in_one_step() {
        let gcra = Gcra::new(20 * SECOND, 3);
        for used in 1..=3u64 {
            assert_eq!(
                gcra.decide(5 * SECOND, 1),
                Step::Fits {
                    new_tat: 5 * SECOND + used * 20 * SECOND,
                    until_full: used * 20 * SECOND
                }
            );
        }
        assert_eq!(
            gcra.decide(5 * SECOND, 1),
            Step::Refused {
                until_full: 60 * SECOND
            }
        );
        // A held level waits; a refusal spends nothing.
        let held = gcra.lock();
        assert!(gcra.try_lock().is_none());
        drop(held);
        assert!(matches!(gcra.decide(25 * SECOND, 1), Step::Fits { .. }));
        assert!(matches!(gcra.decide(25 * SECOND, 1), Step::Refused { .. }));
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
