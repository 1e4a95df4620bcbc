//! One budget level's rate-limit bucket, shared by the cache of
//! [`MemoryRates`](super::MemoryRates) and the per-thread fronts (`front.rs`) that hold the very
//! same `Arc`.

use std::sync::atomic::AtomicBool;

use super::gcra::Gcra;
use crate::limits::RateLimit;

/// One level's bucket: its GCRA at the level's limit.
pub(super) struct Bucket {
    pub(super) limit: RateLimit,
    pub(super) gcra: Gcra,
    /// Set when the bucket leaves the cache (evicted, or replaced for a changed limit): the
    /// per-thread fronts stop using it from then on.
    pub(super) retired: AtomicBool,
}

impl Bucket {
    /// A full bucket for `limit`.
    pub(super) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            gcra: Gcra::new(limit.emission_nanos(), limit.limit),
            retired: AtomicBool::new(false),
        }
    }

    /// The bucket of a level whose limit changed to `limit`: it goes on from `previous`'s window
    /// ([`Gcra::succeeding`]).
    pub(super) fn succeeding(limit: RateLimit, previous: &Bucket) -> Self {
        Self {
            limit,
            gcra: Gcra::succeeding(limit.emission_nanos(), limit.limit, &previous.gcra),
            retired: AtomicBool::new(false),
        }
    }
}
