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
//! Collisions only cost a cache read. A thread keeps at most [`SLOTS`] retired buckets alive until
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

/// FNV-1a over the level's bytes (key ids are random; grinding ids into one slot only makes the
/// grinder's own requests read the cache).
fn index(key: &BudgetId) -> usize {
    fn fnv(hash: u32, bytes: &[u8]) -> u32 {
        bytes.iter().fold(hash, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        })
    }
    let hash = match key {
        BudgetId::Key(id) => fnv(0x811c_9dc5, id.as_str().as_bytes()),
        BudgetId::Pool(PoolId { owner, account }) => {
            let hash = fnv(0x811c_9dc5 ^ 0xff, owner.as_bytes());
            fnv(hash, account.as_deref().unwrap_or("").as_bytes())
        }
    };
    (hash as usize) & (SLOTS - 1)
}

/// This thread's current bucket for `key` at `limit` in the `MemoryRates` with id `rates`, if
/// there is one.
pub(super) fn get(rates: u64, key: &BudgetId, limit: RateLimit) -> Option<Arc<Bucket>> {
    FRONT
        .try_with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            let slot = front[index(key)].as_mut()?;
            if slot.rates != rates
                || slot.hits_left == 0
                || slot.bucket.limit != limit
                || slot.bucket.retired.load(Ordering::Acquire)
                || slot.key != *key
            {
                return None;
            }
            slot.hits_left -= 1;
            Some(slot.bucket.clone())
        })
        .ok()
        .flatten()
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
