//! A small per-thread front for [`MemoryRates`](super::MemoryRates)' moka cache: a key's bucket
//! without moka's per-read bookkeeping (clock read, frequency sketch, read recording), which is most
//! of what a request of a rate-limited key costs (`benches/ratelimit.rs`, BENCHMARKS.md).
//!
//! Each thread holds a direct-mapped table of [`SLOTS`] buckets, each one the very `Arc` the cache
//! held when the slot was filled (never a bucket of its own, so all threads share one bucket per
//! key). A slot answers only while all of these hold:
//!
//! - it belongs to the same `MemoryRates` (by a process-unique id, never an address that could be
//!   reused) and the same budget level ([`BudgetId`]);
//! - the bucket is not retired: the cache's eviction listener retires a bucket when it leaves the
//!   cache for any reason (size bound, replaced for a changed limit), and from then on a request
//!   gets whatever bucket the cache holds now, as it did without the front;
//! - the bucket's limit is the one the caller asks for (a changed limit goes through the cache);
//! - it has answered fewer than [`HITS_PER_FILL`] times: then it is read from the cache again, which
//!   keeps moka's frequency counts (its eviction policy) in charge of hot keys too.
//!
//! A slot is found from the address of the level's id (not its bytes), and answers only for that
//! very id. Collisions only cost a cache read. A thread keeps at most [`SLOTS`] retired buckets alive until
//! their slots are overwritten or the thread ends.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::bucket::Bucket;
use crate::limits::{BudgetId, PoolId, RateLimit};

/// Slots per thread (a power of two).
pub(super) const SLOTS: usize = 64;
/// Answers a slot gives before it is read from the cache again.
pub(super) const HITS_PER_FILL: u32 = 256;

struct Slot {
    rates: u64,
    key: BudgetId,
    bucket: Arc<Bucket>,
    hits_left: u32,
}

thread_local! {
    static FRONT: RefCell<[Option<Slot>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// The slot of a level: from the address of its id's shared string (every clone of a principal's
/// budget shares it, so a key's requests find its slot without reading the id's bytes). The slot
/// still compares the whole id before it answers: a hash is only where to look. Ids are the
/// resolver's own allocations, so nobody can grind ids into one slot.
fn index(key: &BudgetId) -> usize {
    let address = match key {
        BudgetId::Key(id) => id.as_str().as_ptr() as usize,
        BudgetId::Pool(PoolId { owner, account }) => {
            owner.as_ptr() as usize ^ account.as_deref().map_or(0, |a| a.as_ptr() as usize >> 3)
        }
    };
    // Fibonacci hashing: the top bits of the product.
    ((address as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

/// Calls `f` with this thread's current bucket for `key` at `limit` in the `MemoryRates` with id
/// `rates`, without taking a reference to it (no reference count changes); `Err(f)` when there
/// is none. `f` must not use the front.
pub(super) fn with<R, F: FnOnce(&Arc<Bucket>) -> R>(
    rates: u64,
    key: &BudgetId,
    limit: RateLimit,
    f: F,
) -> Result<R, F> {
    let mut f = Some(f);
    let answer = FRONT
        .try_with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            let slot = front[index(key)].as_mut()?;
            if !slot.answers(rates, key, limit) {
                return None;
            }
            slot.hits_left -= 1;
            let f = f.take()?;
            Some(f(&slot.bucket))
        })
        .ok()
        .flatten();
    match (answer, f) {
        (Some(answer), _) => Ok(answer),
        (None, Some(f)) => Err(f),
        (None, None) => unreachable!("`f` ran, so it answered"),
    }
}

impl Slot {
    /// Whether this slot may answer for `key` at `limit` in the `MemoryRates` with id `rates`.
    fn answers(&self, rates: u64, key: &BudgetId, limit: RateLimit) -> bool {
        self.rates == rates
            && self.hits_left != 0
            && self.bucket.limit == limit
            && !self.bucket.retired.load(Ordering::Acquire)
            && self.key == *key
    }
}

/// This thread's current bucket for `key` at `limit` in the `MemoryRates` with id `rates`, if
/// there is one.
pub(super) fn get(rates: u64, key: &BudgetId, limit: RateLimit) -> Option<Arc<Bucket>> {
    with(rates, key, limit, Arc::clone).ok()
}

/// Puts `bucket`, just read from the cache for `key`, in this thread's front.
pub(super) fn fill(rates: u64, key: &BudgetId, bucket: &Arc<Bucket>) {
    let _ = FRONT.try_with(|front| {
        if let Ok(mut front) = front.try_borrow_mut() {
            front[index(key)] = Some(Slot {
                rates,
                key: key.clone(),
                bucket: bucket.clone(),
                hits_left: HITS_PER_FILL,
            });
        }
    });
}

/// Calls `f` with each key and bucket in this thread's front for the `MemoryRates` with id `rates`.
#[cfg(test)]
pub(super) fn each(rates: u64, mut f: impl FnMut(&BudgetId, &Bucket)) {
    FRONT.with_borrow(|front| {
        for slot in front.iter().flatten().filter(|slot| slot.rates == rates) {
            f(&slot.key, &slot.bucket);
        }
    });
}
