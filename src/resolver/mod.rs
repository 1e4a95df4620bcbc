//! [`CachedResolver`]: from a key digest to a principal, through a bounded cache in front of a
//! [`KeyStore`](crate::store::KeyStore).
//!
//! ```
//! use std::time::Duration;
//! use tower_api_keys::key::KeyFormat;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! let resolver = CachedResolver::builder(MemoryStore::new())
//!     .format(KeyFormat::new("sk_live").unwrap())
//!     .time_to_live(Duration::from_secs(30))
//!     .negative_time_to_live(Duration::from_secs(5))
//!     .max_capacity(100_000)
//!     .lookup_timeout(Duration::from_secs(2))
//!     .lookup_limit(32, 64)
//!     .degraded_time_to_live(Duration::from_secs(1))
//!     .build();
//! # let _ = resolver;
//! ```
//!
//! # How it is built
//!
//! - The shared cache is a [`moka::sync::Cache`] (`cache.rs`): per-entry lifetimes through moka's
//!   `Expiry`, moka's TinyLFU eviction. Invalidations name digests (no scan); forgetting a key by id
//!   alone uses a moka invalidation predicate (see `cache.rs` for why there is no key-id index).
//! - In front of it, each thread keeps a few recently admitted keys (`front.rs`), which answers a hot
//!   key without moka's per-read bookkeeping. It is checked against the invalidation epoch on every
//!   read, so it never knows more than the cache behind it.
//! - Misses go through a map of in-flight lookups (one shared future per digest), bounded by a
//!   semaphore and a short queue.
//! - An invalidation epoch: every invalidation moves it, and a lookup only fills the cache if the
//!   epoch has not moved since it started. moka alone would insert an answer read before the
//!   invalidation. The requests waiting for a lookup whose digest was invalidated meanwhile ask
//!   again rather than use its answer.
//!
//! # Invariants
//!
//! Every promise this module makes, with the test that holds it to it (unit tests below, behaviour
//! tests in `tests/resolver*.rs`, `tests/outage.rs`, `tests/fleet_invalidation.rs`):
//!
//! 1. **A hit is synchronous**: a cached digest is answered without awaiting, allocating or touching
//!    the store (`tests/resolver.rs`: `hits_never_reach_the_store`; `benches/hot_path.rs`).
//! 2. **One lookup per digest at a time**: concurrent misses for one digest share a single store
//!    lookup (`tests/resolver.rs`: `concurrent_misses_share_one_lookup`; `benches/cold_path.rs`).
//! 3. **Unknown digests are cached** for the negative TTL, so a repeated made-up key costs one
//!    lookup (`tests/resolver.rs`: `unknown_digests_are_cached_for_the_negative_ttl`).
//! 4. **Failures are never cached**: a store error or timeout is answered 503 `AUTH_UNAVAILABLE`
//!    and the next request asks again (`tests/outage.rs`).
//! 5. **Every request is checked**: revocation and expiry are checked at request time, even on a
//!    hit; a known key's entry never outlives the TTL from its store read nor the key's own expiry,
//!    and a key in its rotation grace period carries the earlier of its expiry and the grace end as
//!    [`Principal::expires_at`](crate::principal::Principal::expires_at) (`tests/resolver.rs`: `a_cached_key_expires_on_time`,
//!    `grace_period_principal_expires_with_the_grace`; unit test `check_agrees_with_calendar_time`).
//! 6. **An invalidation is immediate and final**: once [`invalidate_digest`](CachedResolver::invalidate_digest),
//!    [`invalidate_key`](CachedResolver::invalidate_key) or [`invalidate_all`](CachedResolver::invalidate_all)
//!    has returned, no request on any thread is answered from what was cached before it (the
//!    per-thread fronts included), and a lookup that was in flight meanwhile does not fill the cache:
//!    the next request reaches the store (`tests/resolver_race.rs`:
//!    `a_lookup_overtaken_by_an_invalidation_does_not_fill_the_cache`; unit test
//!    `front_forgets_on_every_invalidation`).
//! 7. **A revocation through [`KeyManager`](crate::manage::KeyManager) is final on this instance**: once
//!    `revoke` has returned, no thread admits the key again (`tests/resolver_race.rs`:
//!    `no_thread_admits_a_key_after_revoke_returned`).
//! 8. **Degraded mode bounds staleness when broadcasts fail**: while an invalidation subscription of
//!    this resolver is down or not yet up, or (in a fleet, [`crate::invalidate`]) has not heard its
//!    own heartbeat come back within the freshness bound, no cached answer read from the store more
//!    than the degraded lifetime ago (default 1 s, the bound) is used; it is read again, and a store
//!    failure then is answered 503 (unless [`serve_stale`](CachedResolverBuilder::serve_stale)). When
//!    a subscription comes back up it catches up from the revocation log (the cache is cleared when
//!    the log no longer reaches back, and on the first connection). So a revocation on another
//!    instance is refused here within about the degraded lifetime whatever fails (`tests/resolver.rs`:
//!    `degraded_mode_rereads_old_answers`; `tests/fleet_invalidation.rs`: the outage cases;
//!    `tests/fleet_receipt_faults.rs`).
//! 9. **Store lookups are bounded**: at most `in_flight` lookups run at once and `queue` more wait;
//!    a miss beyond that is answered 503 `AUTH_UNAVAILABLE` at once and counted, while cached keys
//!    keep being answered (`tests/resolver.rs`: `the_lookup_bound_sheds_and_recovers`).
//! 10. **The cache is bounded**: at most `max_capacity` entries; eviction admits a newcomer only over
//!     an entry used less often, so a flood of one-off digests does not push out keys in use
//!     (`benches/hostile.rs`, case "flood"; `benches/memory.rs` for the cost per entry).
//! 11. **Resolvers are apart**: two resolvers never answer with each other's entries, even on one
//!     thread (unit test `front_keeps_resolvers_apart`).
//! 12. **No request is answered from an overtaken lookup**: a request waiting for a lookup of a
//!     digest that an invalidation of that digest (or of every digest) overtook asks again (a new
//!     lookup, which reads the store after the change; after a few overtaken tries in a row, 503).
//!     With 6, once an invalidation has been applied, no request is admitted on anything read
//!     before it: what a fleet's acknowledgement promises (`tests/resolver_race.rs`:
//!     `a_lookup_overtaken_by_an_invalidation_does_not_fill_the_cache`).
//! 13. **The key format follows the store**: [`format`](CachedResolver::format) is one atomic load;
//!     once [`reload_format`](CachedResolver::reload_format) has returned, every key is checked
//!     against the store's current secrets (a lookup the swap overtook is answered 503), or, if the
//!     store could not be read, every key is refused (503) until a reload succeeds. In degraded
//!     mode the format, like a cached answer, is trusted for the degraded lifetime after its store
//!     read, then read again (`format.rs`; its unit tests; `tests/fleet_format.rs`).

mod builder;
mod cache;
mod cached;
mod entry;
mod format;
mod front;
pub(crate) use self::front::hint as front_hint;
mod intern;
mod invalidation;
mod lookup;

pub use builder::CachedResolverBuilder;
pub use cached::CachedResolver;
use cached::Inner;
pub(crate) use entry::{CacheEntry, ResolvedKey};
pub use format::CurrentFormat;

#[cfg(test)]
mod tests;
