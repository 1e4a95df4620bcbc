//! Credits counted in memory, per budget level, spent over a whole chain of levels at once.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};

use time::OffsetDateTime;

use super::decision::Spend;
use super::memory::has_duplicates;
use crate::limits::{BudgetId, BudgetLevel, Credits};

/// One level's credits: the settings they were seeded from, and what is left.
struct Cell {
    seed: Credits,
    state: Credits,
}

/// Credits counted in memory: an exact decrement per budget level ([`BudgetId`]: a key, an
/// ancestor, a pool) under a per-level lock, seeded from the level's settings (carried by the
/// principal's [`Budget`](crate::limits::Budget)) the first time the level is seen and again
/// whenever they change (an update sets `set_at`). A request spends at every level of its chain
/// that has credits, all or nothing: the levels are locked in chain order, and if any has less than
/// the cost nothing is spent anywhere. What was spent is not written anywhere: after a restart
/// every level starts again from its record. Use it for one instance; a fleet needs a shared
/// counter. Cheap to clone; clones share the state.
///
/// It is not bounded: it holds one entry (about 200 bytes) for every level with credits it has
/// seen, since forgetting one would hand its spent credits back. For many such keys, or a fleet,
/// count them in the store ([`StoreCredits`](super::StoreCredits)).
#[derive(Clone, Default)]
pub struct MemoryCredits {
    cells: Arc<RwLock<HashMap<BudgetId, Arc<Mutex<Cell>>>>>,
}

impl fmt::Debug for MemoryCredits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCredits").finish_non_exhaustive()
    }
}

/// One walk down a chain (see [`MemoryCredits::walk`]).
enum Walk {
    /// Spent everywhere; the level with the least left, if any.
    Spent(Option<(usize, u64)>),
    /// This level had too little: nothing spent.
    Exhausted(usize, u64),
    /// A level was held by another spend: nothing spent; try again.
    Busy,
}

impl MemoryCredits {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn cell(&self, id: &BudgetId, seed: &Credits) -> Arc<Mutex<Cell>> {
        if let Some(cell) = self
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
        {
            return cell.clone();
        }
        self.cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Cell {
                    seed: *seed,
                    state: *seed,
                }))
            })
            .clone()
    }

    /// What is left at level `id` at `now`, if it has been seen.
    pub fn remaining(&self, id: &BudgetId, now: OffsetDateTime) -> Option<u64> {
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        let cell = cells
            .get(id)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(cell.state.current(now))
    }

    /// Spends `cost` at every level of `levels` that has credits, or nowhere.
    pub(crate) fn spend(&self, levels: &[BudgetLevel], cost: u32, now: OffsetDateTime) -> Spend {
        for attempt in 0u32.. {
            match self.walk(levels, 0, true, cost, now) {
                Walk::Spent(Some((level, remaining))) => return Spend::Spent { level, remaining },
                Walk::Spent(None) => return Spend::NotCounted,
                Walk::Exhausted(level, remaining) => return Spend::Exhausted { level, remaining },
                Walk::Busy if attempt == 16 && has_duplicates(levels) => {
                    // A level twice in one chain (never from the resolver): count it once.
                    let mut unique: Vec<BudgetLevel> = Vec::with_capacity(levels.len());
                    for level in levels {
                        if !unique.iter().any(|u| u.id == level.id) {
                            unique.push(level.clone());
                        }
                    }
                    return self.spend(&unique, cost, now);
                }
                Walk::Busy if attempt < 4 => std::hint::spin_loop(),
                Walk::Busy => std::thread::yield_now(),
            }
        }
        unreachable!("the loop returns")
    }

    /// Locks the levels with credits of `levels[from..]` in chain order (the first waits, the next
    /// ones only try briefly: chains in inconsistent orders cannot deadlock), checks each, and if
    /// all have enough spends at each on the way back.
    fn walk(
        &self,
        levels: &[BudgetLevel],
        from: usize,
        first: bool,
        cost: u32,
        now: OffsetDateTime,
    ) -> Walk {
        let Some((offset, seed)) = levels[from..]
            .iter()
            .enumerate()
            .find_map(|(i, level)| level.limits.credits.as_ref().map(|c| (i, c)))
        else {
            return Walk::Spent(None);
        };
        let level = from + offset;
        let cell = self.cell(&levels[level].id, seed);
        let mut cell = match lock(&cell, first) {
            Some(cell) => cell,
            None => return Walk::Busy,
        };
        if cell.seed != *seed {
            // The level's credits were changed (or refilled by the store): start from them.
            cell.seed = *seed;
            cell.state = *seed;
        }
        cell.state = cell.state.refreshed(now);
        let Some(left) = cell.state.remaining.checked_sub(cost.into()) else {
            return Walk::Exhausted(level, cell.state.remaining);
        };
        match self.walk(levels, level + 1, false, cost, now) {
            Walk::Spent(below) => {
                cell.state.remaining = left;
                Walk::Spent(Some(match below {
                    Some(below) if below.1 < left => below,
                    _ => (level, left),
                }))
            }
            other => other,
        }
    }

    /// Gives `cost` back at every level of `levels` that has credits (a refused request spends
    /// nothing), unless a refill since the spend already restored the level.
    pub(crate) fn refund(&self, levels: &[BudgetLevel], cost: u32, now: OffsetDateTime) {
        let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
        for (i, level) in levels.iter().enumerate() {
            if level.limits.credits.is_none() || levels[..i].iter().any(|l| l.id == level.id) {
                continue;
            }
            if let Some(cell) = cells.get(&level.id) {
                let mut cell = cell.lock().unwrap_or_else(PoisonError::into_inner);
                if cell.state.set_at <= now {
                    cell.state.remaining = cell.state.remaining.saturating_add(cost.into());
                }
            }
        }
    }
}

/// The cell's lock: waited for when `wait`, else a few tries.
fn lock(cell: &Mutex<Cell>, wait: bool) -> Option<MutexGuard<'_, Cell>> {
    if wait {
        return Some(cell.lock().unwrap_or_else(PoisonError::into_inner));
    }
    for _ in 0..32 {
        match cell.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => std::hint::spin_loop(),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;
    use crate::limits::{PoolId, RefillInterval, UsageLimits};
    use time::macros::datetime;

    fn level(id: BudgetId, credits: Option<Credits>) -> BudgetLevel {
        BudgetLevel {
            id,
            limits: UsageLimits {
                rate_limit: None,
                credits,
            },
        }
    }

    fn key(id: &str) -> BudgetId {
        BudgetId::Key(KeyId::new(id))
    }

    #[test]
    fn credits_are_exact_and_refill() {
        let ledger = MemoryCredits::new();
        let day = datetime!(2026-03-04 10:00 UTC);
        let seed = Credits::new(5).refill(RefillInterval::Daily, 7).set_at(day);
        let chain = [level(key("key_a"), Some(seed))];
        let spent = |remaining| Spend::Spent {
            level: 0,
            remaining,
        };
        assert_eq!(ledger.spend(&chain, 2, day), spent(3));
        assert_eq!(
            ledger.spend(&chain, 4, day),
            Spend::Exhausted {
                level: 0,
                remaining: 3
            }
        );
        assert_eq!(ledger.spend(&chain, 3, day), spent(0));
        ledger.refund(&chain, 1, day);
        assert_eq!(ledger.remaining(&key("key_a"), day), Some(1));
        let tomorrow = datetime!(2026-03-05 0:00 UTC);
        assert_eq!(ledger.remaining(&key("key_a"), tomorrow), Some(7));
        assert_eq!(ledger.spend(&chain, 1, tomorrow), spent(6));
        // An update of the record (new set_at) starts again from it.
        let later = tomorrow + time::Duration::HOUR;
        let updated = [level(key("key_a"), Some(Credits::new(100).set_at(later)))];
        assert_eq!(ledger.spend(&updated, 1, later), spent(99));
    }

    #[test]
    fn a_chain_spends_everywhere_or_nowhere() {
        let ledger = MemoryCredits::new();
        let now = datetime!(2026-03-04 10:00 UTC);
        let seeded = |n| Some(Credits::new(n).set_at(now));
        let pool = BudgetId::Pool(PoolId::account("team", "acct"));
        let chain = |child: &str, own| {
            vec![
                level(key(child), own),
                level(key("key_parent"), seeded(5)),
                level(pool.clone(), seeded(100)),
            ]
        };
        // The parent has the least left: it is the level reported.
        assert_eq!(
            ledger.spend(&chain("key_a", seeded(10)), 2, now),
            Spend::Spent {
                level: 1,
                remaining: 3
            }
        );
        assert_eq!(
            ledger.spend(&chain("key_b", None), 3, now),
            Spend::Spent {
                level: 1,
                remaining: 0
            }
        );
        // The parent is out: a's request is refused and a's own credits and the pool's are untouched.
        assert_eq!(
            ledger.spend(&chain("key_a", seeded(10)), 1, now),
            Spend::Exhausted {
                level: 1,
                remaining: 0
            }
        );
        assert_eq!(ledger.remaining(&key("key_a"), now), Some(8));
        assert_eq!(ledger.remaining(&pool, now), Some(95));
        // A refund gives back at every level with credits.
        ledger.refund(&chain("key_a", seeded(10)), 2, now);
        assert_eq!(ledger.remaining(&key("key_a"), now), Some(10));
        assert_eq!(ledger.remaining(&key("key_parent"), now), Some(2));
        assert_eq!(ledger.remaining(&pool, now), Some(97));
        // No level with credits: nothing counted.
        assert_eq!(
            ledger.spend(&[level(key("key_c"), None)], 1, now),
            Spend::NotCounted
        );
        // A level twice counts once.
        let twice = [
            level(key("key_d"), seeded(1)),
            level(key("key_d"), seeded(1)),
        ];
        assert!(matches!(ledger.spend(&twice, 1, now), Spend::Spent { .. }));
        assert!(matches!(
            ledger.spend(&twice, 1, now),
            Spend::Exhausted { .. }
        ));
    }
}
