//! One key's rate-limit bucket, shared by the cache of [`MemoryRates`](super::MemoryRates) and
//! the per-thread fronts (`front.rs`) that hold the very same `Arc`.

use std::sync::atomic::AtomicBool;

use governor::RateLimiter;
use governor::clock::QuantaClock;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};

use crate::quota::RateLimit;

pub(super) type Gcra =
    RateLimiter<NotKeyed, InMemoryState, QuantaClock, StateInformationMiddleware>;

/// One key's bucket: a direct `governor` limiter for the key's own quota.
pub(super) struct Bucket {
    pub(super) limit: RateLimit,
    pub(super) gcra: Gcra,
    /// Set when the bucket leaves the cache (evicted, or replaced for a changed limit): the
    /// per-thread fronts stop using it from then on.
    pub(super) retired: AtomicBool,
}
