//! The credit rules every store follows: [`adjust`] (one key,
//! [`KeyStore::adjust_credits`](super::KeyStore::adjust_credits)) and [`ChainLevels`] (a chain of
//! levels, [`KeyStore::spend_credits`](super::KeyStore::spend_credits) and
//! [`KeyStore::refund_credits`](super::KeyStore::refund_credits)), with what they answer
//! ([`CreditAdjustment`], [`ChainSpend`]).

use time::OffsetDateTime;

use crate::key::KeyId;
use crate::limits::{BudgetId, Credits, PoolId};

/// What [`KeyStore::spend_credits`](super::KeyStore::spend_credits) did, all levels at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainSpend {
    /// Spent at every level that counts credits; what each level has left (`None`: that level
    /// has no credits in the store, and was not counted), in the order asked.
    Spent {
        /// Left per level.
        remaining: Vec<Option<u64>>,
    },
    /// Level `level` had less than the cost: nothing was spent anywhere (due refills were still
    /// applied).
    Insufficient {
        /// Which level (an index into the levels asked).
        level: usize,
        /// What it has left.
        remaining: u64,
    },
}

/// What [`KeyStore::adjust_credits`](super::KeyStore::adjust_credits) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreditAdjustment {
    /// Applied; this is what is left.
    Applied {
        /// Credits left.
        remaining: u64,
    },
    /// A spend larger than what is left: nothing was spent (a due refill was still applied).
    Insufficient {
        /// Credits left.
        remaining: u64,
    },
}

/// Applies a due refill at `now`, then `delta` (a spend when negative, refused if larger than what
/// is left): the one rule every store follows in
/// [`KeyStore::adjust_credits`](super::KeyStore::adjust_credits).
pub fn adjust(credits: &mut Credits, delta: i64, now: OffsetDateTime) -> CreditAdjustment {
    *credits = credits.refreshed(now);
    let magnitude = delta.unsigned_abs();
    if delta < 0 {
        match credits.remaining.checked_sub(magnitude) {
            Some(left) => credits.remaining = left,
            None => {
                return CreditAdjustment::Insufficient {
                    remaining: credits.remaining,
                };
            }
        }
    } else {
        credits.remaining = credits
            .remaining
            .saturating_add(magnitude)
            .min(crate::limits::MAX_CREDITS);
    }
    CreditAdjustment::Applied {
        remaining: credits.remaining,
    }
}

/// The levels of one [`KeyStore::spend_credits`](super::KeyStore::spend_credits) or
/// [`KeyStore::refund_credits`](super::KeyStore::refund_credits) call, each counted once: `unique`
/// is sorted (the order the SQL stores lock rows in, so that concurrent chains never wait on each
/// other in a cycle) and deduplicated; `positions` maps every level asked to its entry in `unique`.
#[derive(Debug)]
pub(crate) struct ChainLevels {
    pub(crate) unique: Vec<BudgetId>,
    positions: Vec<usize>,
}

impl ChainLevels {
    pub(crate) fn new(levels: &[BudgetId]) -> Self {
        let mut unique = levels.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let positions = levels
            .iter()
            .map(|level| unique.binary_search(level).unwrap_or_default())
            .collect();
        Self { unique, positions }
    }

    /// The keys among the levels, in lock order (what PostgreSQL locks first).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &KeyId> {
        self.unique.iter().filter_map(|level| match level {
            BudgetId::Key(id) => Some(id),
            BudgetId::Pool(_) => None,
        })
    }

    /// The pools among the levels, in lock order.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn pools(&self) -> impl Iterator<Item = &PoolId> {
        self.unique.iter().filter_map(|level| match level {
            BudgetId::Pool(pool) => Some(pool),
            BudgetId::Key(_) => None,
        })
    }

    /// The all-or-nothing rule of [`KeyStore::spend_credits`](super::KeyStore::spend_credits) on
    /// `credits` (one entry per `unique` level, `None` where it has none): due refills are applied
    /// everywhere, then `cost` is spent at every level that has credits if each has at least
    /// `cost`, else nowhere.
    pub(crate) fn spend(
        &self,
        credits: &mut [Option<Credits>],
        cost: u64,
        now: OffsetDateTime,
    ) -> ChainSpend {
        for c in credits.iter_mut().flatten() {
            *c = c.refreshed(now);
        }
        for (level, &at) in self.positions.iter().enumerate() {
            if let Some(c) = &credits[at]
                && c.remaining < cost
            {
                return ChainSpend::Insufficient {
                    level,
                    remaining: c.remaining,
                };
            }
        }
        for c in credits.iter_mut().flatten() {
            c.remaining -= cost;
        }
        ChainSpend::Spent {
            remaining: self
                .positions
                .iter()
                .map(|&at| credits[at].map(|c| c.remaining))
                .collect(),
        }
    }

    /// [`KeyStore::refund_credits`](super::KeyStore::refund_credits)'s rule on `credits`: due
    /// refills applied, then `cost` given back at every level that has credits, saturating at
    /// [`MAX_CREDITS`](crate::limits::MAX_CREDITS).
    pub(crate) fn refund(&self, credits: &mut [Option<Credits>], cost: u64, now: OffsetDateTime) {
        let delta = i64::try_from(cost).unwrap_or(i64::MAX);
        for c in credits.iter_mut().flatten() {
            adjust(c, delta, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels are counted once each and judged in the order asked.
    #[test]
    fn chain_levels_count_each_level_once() {
        let now = OffsetDateTime::now_utc();
        let (a, b) = (
            BudgetId::Key(KeyId::new("b")),
            BudgetId::Key(KeyId::new("a")),
        );
        let pool = BudgetId::Pool(PoolId::owner("o"));
        let levels = ChainLevels::new(&[pool.clone(), a.clone(), b.clone(), a.clone()]);
        assert_eq!(
            levels.unique,
            [b.clone(), a.clone(), pool.clone()],
            "lock order"
        );
        assert_eq!(levels.keys().count(), 2);
        assert_eq!(levels.pools().count(), 1);
        // unique: b (none), a (3), pool (5)
        let mut credits = [
            None,
            Some(Credits::new(3).set_at(now)),
            Some(Credits::new(5).set_at(now)),
        ];
        assert_eq!(
            levels.spend(&mut credits, 2, now),
            ChainSpend::Spent {
                remaining: vec![Some(3), Some(1), None, Some(1)],
            }
        );
        assert_eq!(
            levels.spend(&mut credits, 2, now),
            ChainSpend::Insufficient {
                level: 1,
                remaining: 1,
            }
        );
        assert_eq!(credits[1].unwrap().remaining, 1, "nothing spent");
        assert_eq!(credits[2].unwrap().remaining, 3, "nothing spent");
        levels.refund(&mut credits, u64::MAX, now);
        assert_eq!(credits[1].unwrap().remaining, crate::limits::MAX_CREDITS);
        assert_eq!(credits[0], None);
    }
}
