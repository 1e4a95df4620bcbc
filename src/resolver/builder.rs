//! [`CachedResolverBuilder`]: the resolver's settings, and the resolver it builds.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::key::KeyFormat;
use crate::store::KeyStore;

use super::entry::saturating_nanos;
use super::{CachedResolver, Inner, cache, format, intern};

/// Builds a [`CachedResolver`]; see [`CachedResolver::builder`].
#[must_use]
pub struct CachedResolverBuilder {
    pub(super) store: Arc<dyn KeyStore>,
    pub(super) format: KeyFormat,
    pub(super) ttl: Duration,
    pub(super) negative_time_to_live: Duration,
    pub(super) max_capacity: u64,
    pub(super) lookup_timeout: Duration,
    pub(super) lookup_limit: (usize, usize),
    pub(super) degraded_time_to_live: Duration,
    pub(super) serve_stale: bool,
    pub(super) front: bool,
}

impl CachedResolverBuilder {
    /// The key format presented keys must match (default: prefix `sk`).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// How long a known key is cached (default 60 s). Without a broadcast invalidator this bounds how
    /// long another instance may keep accepting a revoked key.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an unknown digest is cached (default 5 s).
    pub fn negative_time_to_live(mut self, ttl: Duration) -> Self {
        self.negative_time_to_live = ttl;
        self
    }

    /// Most entries held (default 100,000; unknown digests count too). When full, moka's TinyLFU
    /// policy decides: a newcomer only takes the place of an entry used less often.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.max_capacity = entries;
        self
    }

    /// How long a store lookup may take, waiting for a slot included, before the request is
    /// answered 503 (default 2 s).
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// At most `in_flight` store lookups at once, and `queue` more waiting for one (defaults 32 and
    /// 64); a miss beyond that is answered 503 `AUTH_UNAVAILABLE` at once, without reaching the
    /// store, and counted ([`shed_lookups`](CachedResolver::shed_lookups), metric
    /// [`LOOKUPS_SHED_TOTAL`](crate::metrics::LOOKUPS_SHED_TOTAL)). Concurrent misses for one digest share one lookup and one place.
    /// Cached keys are answered whatever the load. `in_flight` is at least 1.
    pub fn lookup_limit(mut self, in_flight: usize, queue: usize) -> Self {
        self.lookup_limit = (in_flight.max(1), queue);
        self
    }

    /// While an invalidation subscription of this resolver is down or not yet connected, cached
    /// answers read from the store longer ago than this are read again (default 1 s). This bounds
    /// how long a key revoked on another instance is still accepted here when the broadcast fails.
    ///
    /// It is also the fleet's *freshness bound* ([`crate::invalidate`], "Revocation with a
    /// receipt"): an instance whose subscription has not heard its own heartbeat come back for
    /// longer than this stops vouching for its cache in the same way.
    pub fn degraded_time_to_live(mut self, ttl: Duration) -> Self {
        self.degraded_time_to_live = ttl;
        self
    }

    /// When the fleet no longer vouches for a cached answer (degraded mode) *and* the store cannot
    /// be read, serve the cached answer anyway instead of 503 `AUTH_UNAVAILABLE` (default `false`).
    ///
    /// **Weaker**: a key revoked on another instance meanwhile may then be admitted here for as
    /// long as both the broadcast and the store are out of reach (up to the TTL). Revocations made
    /// on this instance, and those it heard, are still refused at once.
    pub fn serve_stale(mut self, enabled: bool) -> Self {
        self.serve_stale = enabled;
        self
    }

    /// Benches only: turns the per-thread front off (to measure what it saves).
    #[doc(hidden)]
    pub fn per_thread_front(mut self, enabled: bool) -> Self {
        self.front = enabled;
        self
    }

    /// Builds the resolver.
    pub fn build(self) -> CachedResolver {
        let (in_flight, queue) = self.lookup_limit;
        CachedResolver {
            inner: Arc::new(Inner {
                store: self.store,
                format: format::FormatSlot::new(self.format),
                cache: cache::Cache::new(self.max_capacity, self.negative_time_to_live),
                shared: intern::Interner::default(),
                in_flight: Mutex::default(),
                epoch: AtomicU64::new(0),
                lookup_timeout: self.lookup_timeout,
                ttl: self.ttl,
                lookup_slots: tokio::sync::Semaphore::new(
                    in_flight.min(tokio::sync::Semaphore::MAX_PERMITS),
                ),
                queue_limit: queue,
                queued: AtomicUsize::new(0),
                shed: AtomicU64::new(0),
                lookups: AtomicU64::new(0),
                degraded: AtomicUsize::new(0),
                degraded_time_to_live: saturating_nanos(self.degraded_time_to_live),
                vouched_until: AtomicI64::new(i64::MAX),
                serve_stale: self.serve_stale,
                front: self.front,
                id: {
                    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
                    NEXT_ID.fetch_add(1, Ordering::Relaxed)
                },
                lives: Arc::default(),
            }),
        }
    }
}
