//! [`CachedResolver`]: from a key digest to a principal, through a bounded cache in front of a
//! [`KeyStore`].
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
//!    [`Principal::expires_at`] (`tests/resolver.rs`: `a_cached_key_expires_on_time`,
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

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{nanos_of, now_unix_nanos};
use crate::error::{AuthError, ExpiredReason};
use crate::key::{KeyDigest, KeyFormat, KeyId};
use crate::life::{Life, Registry};
use crate::principal::Principal;
use crate::store::{KeyStore, StoreError, StoreErrorKind};
use crate::throttle::Throttle;
use futures_util::FutureExt;

mod builder;
mod cache;
mod entry;
mod format;
mod front;
mod intern;
mod lookup;

pub use builder::CachedResolverBuilder;
pub(crate) use entry::{CacheEntry, ResolvedKey};
use entry::{effective_expiry, key_check};
pub use format::CurrentFormat;
use lookup::{InFlight, LookupShed, OVERTAKEN_RETRIES, Overtaken, QueuePlace, is_shed};

struct Inner {
    store: Arc<dyn KeyStore>,
    /// The format presented keys are checked against; swapped when the store's secrets change.
    format: format::FormatSlot,
    cache: cache::Cache,
    /// Owner, account and scope-set values shared by the cached principals.
    shared: intern::Interner,
    in_flight: Mutex<HashMap<KeyDigest, InFlight>>,
    /// Bumped by every invalidation; a lookup that started before a bump does not fill the cache.
    epoch: AtomicU64,
    lookup_timeout: Duration,
    ttl: Duration,
    /// Store lookups allowed to run at once.
    lookup_slots: tokio::sync::Semaphore,
    /// Lookups allowed to wait for a slot, and how many do.
    queue_limit: usize,
    queued: AtomicUsize,
    shed: AtomicU64,
    lookups: AtomicU64,
    /// Subscriptions of this resolver that are down (or not yet up): degraded while not 0.
    degraded: AtomicUsize,
    degraded_time_to_live: i64,
    /// Until when (Unix nanoseconds) the fleet vouches for this cache: a fleet subscription moves it
    /// to `t + degraded_time_to_live` each time it hears its own heartbeat sent at `t`. `i64::MAX` without
    /// one (nothing to hear): the single-instance path never reads past it.
    vouched_until: AtomicI64,
    /// Serve a cached answer the fleet no longer vouches for when the store cannot be read either
    /// (weaker: see [`CachedResolverBuilder::serve_stale`]).
    serve_stale: bool,
    front: bool,
    /// Process-unique id: tells this resolver's entries apart in the per-thread front.
    id: u64,
    /// The life of every digest a cache entry or a request in flight holds (I4).
    lives: Arc<Registry>,
}

impl Inner {
    /// The oldest store read still trusted at `now`: `i64::MIN` normally; in degraded mode (a
    /// subscription down, or the fleet not heard within the bound), `now` minus the degraded
    /// lifetime.
    ///
    /// `i64::MAX` (nothing cached may be served) when, in degraded mode, the key format itself is
    /// older than that (or down): it must be read again first (`format.rs`).
    #[inline]
    fn floor(&self, now: i64) -> i64 {
        if self.degraded.load(Ordering::Acquire) == 0
            && now <= self.vouched_until.load(Ordering::Acquire)
        {
            i64::MIN
        } else {
            self.degraded_floor(now)
        }
    }

    #[cold]
    fn degraded_floor(&self, now: i64) -> i64 {
        let floor = now.saturating_sub(self.degraded_time_to_live);
        if self.format.trusted_after(floor) {
            floor
        } else {
            i64::MAX
        }
    }
}

/// Resolves key digests to principals through a bounded cache in front of a [`KeyStore`].
///
/// Cheap to clone; clones share the cache. Give the same resolver to [`ApiKeyLayer`](crate::layer::ApiKeyLayer)
/// and to key management, so that revocations reach the cache the layer reads. The module
/// documentation lists what it promises.
#[derive(Clone)]
pub struct CachedResolver {
    inner: Arc<Inner>,
}

impl fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedResolver")
            .field("format", &self.format())
            .field("lookup_timeout", &self.inner.lookup_timeout)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl CachedResolver {
    /// A resolver with default settings over `store`.
    pub fn new(store: impl KeyStore) -> Self {
        Self::builder(store).build()
    }

    /// A builder over `store` (any [`KeyStore`], or an `Arc<dyn KeyStore>`).
    pub fn builder(store: impl KeyStore) -> CachedResolverBuilder {
        CachedResolverBuilder {
            store: Arc::new(store),
            format: KeyFormat::default(),
            ttl: Duration::from_secs(60),
            negative_time_to_live: Duration::from_secs(5),
            max_capacity: 100_000,
            lookup_timeout: Duration::from_secs(2),
            lookup_limit: (32, 64),
            degraded_time_to_live: Duration::from_secs(1),
            serve_stale: false,
            front: true,
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// How many store lookups this resolver has made (cache misses that reached the store).
    pub fn store_lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// How many misses the lookup bound answered 503 without asking the store (see
    /// [`CachedResolverBuilder::lookup_limit`]).
    pub fn shed_lookups(&self) -> u64 {
        self.inner.shed.load(Ordering::Relaxed)
    }

    /// Number of cached entries, known and unknown digests (runs the cache's pending maintenance
    /// first, so it is exact but not free).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.len()
    }

    /// Whether the resolver is in degraded mode: one of its invalidation subscriptions is down or not
    /// yet connected, or (in a fleet) it has not heard its own heartbeat come back within the
    /// freshness bound, so cached answers are trusted for the degraded lifetime only.
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Acquire) != 0 || !self.is_vouched()
    }

    /// Authenticates a digest: cache, then store. Does the request-time revocation and expiry checks.
    pub async fn authenticate(&self, digest: &KeyDigest) -> Result<Principal, AuthError> {
        let entry = self.resolve(digest).await.map_err(AuthError::Unavailable)?;
        entry
            .authenticate(now_unix_nanos())
            .map(|key| key.principal.clone())
    }

    /// The hot path: admits a cached digest at `now` (Unix nanoseconds; revocation and expiry
    /// checked) and calls `admit` with the key, or refuses it. `None` when the digest is not cached.
    /// Synchronous, no allocation: this thread's front answers first (see [`front`]); before moka is
    /// asked, `precheck` runs (the layer's checksum check: a front hit is a stored key's digest and
    /// needs none, while a made-up key is refused without a moka read), and its error is the answer.
    pub(crate) fn admit_cached<R>(
        &self,
        digest: &KeyDigest,
        now: i64,
        precheck: impl FnOnce() -> Result<(), AuthError>,
        admit: impl Fn(&Arc<ResolvedKey>) -> R,
        refused: impl Fn(&Arc<ResolvedKey>),
    ) -> Option<Result<R, AuthError>> {
        let inner = &*self.inner;
        // Read before the cache: an invalidation that the cache's answer predates has not moved it
        // yet.
        let epoch = inner.epoch.load(Ordering::Acquire);
        let floor = inner.floor(now);
        if inner.front
            && let Some(decided) = front::with(inner.id, epoch, digest, |key| {
                key.servable(now, floor).then(|| {
                    key.check(now).inspect_err(|_| refused(key))?;
                    Ok(admit(key))
                })
            })
        {
            return Some(decided);
        }
        if let Err(error) = precheck() {
            return Some(Err(error));
        }
        let entry = self.cached(digest, now, floor)?;
        if let (CacheEntry::Known(key), Err(_)) = (&entry, key_check(&entry, now)) {
            refused(key);
        }
        Some(entry.authenticate(now).map(|key| {
            if inner.front {
                front::fill(inner.id, epoch, digest, key);
            }
            admit(key)
        }))
    }

    /// The answer the cache holds for a digest at `now`, if it may be served.
    fn cached(&self, digest: &KeyDigest, now: i64, floor: i64) -> Option<CacheEntry> {
        self.inner
            .cache
            .get(digest)
            .filter(|entry| entry.servable(now, floor))
    }

    /// The answer for a digest, looking it up in the store on a miss (one lookup per digest at a time).
    ///
    /// A lookup that an invalidation of its digest overtook is not answered from: the request asks
    /// again (a new lookup, which reads the store after the change), so that once an invalidation
    /// has been applied no request is admitted on an answer read before it.
    pub(crate) async fn resolve(&self, digest: &KeyDigest) -> Result<CacheEntry, StoreError> {
        for _ in 0..OVERTAKEN_RETRIES {
            let mut now = now_unix_nanos();
            let mut floor = self.inner.floor(now);
            if floor == i64::MAX {
                // Degraded, and the key format is older than the bound: read it again first.
                match self.refresh_format().await {
                    Ok(()) => {}
                    Err(error) if self.inner.serve_stale && !self.inner.format.is_down() => {
                        return self.cached(digest, now, i64::MIN).ok_or(error);
                    }
                    Err(error) => return Err(error),
                }
                now = now_unix_nanos();
                floor = now.saturating_sub(self.inner.degraded_time_to_live);
            }
            let generation = self.inner.format.generation();
            if let Some(entry) = self.cached(digest, now, floor) {
                return Ok(entry);
            }
            let (lookup, overtaken) = {
                let mut in_flight = self
                    .inner
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                // A lookup that finished between our miss and taking the lock filled the cache first.
                let now = now_unix_nanos();
                if let Some(entry) = self.cached(digest, now, self.inner.floor(now)) {
                    return Ok(entry);
                }
                let epoch = self.inner.epoch.load(Ordering::Acquire);
                let entry = in_flight.entry(*digest).or_insert_with(|| InFlight {
                    epoch,
                    lookup: self.clone().lookup(*digest, epoch).boxed().shared(),
                    overtaken: Arc::default(),
                });
                (entry.lookup.clone(), entry.overtaken.clone())
            };
            let result = lookup.await;
            if overtaken.load(Ordering::Acquire) {
                continue;
            }
            // The key was checked against a format that a swap has replaced since.
            self.unchanged_since(generation)?;
            return match result {
                Err(error) if self.inner.serve_stale && !is_shed(&error) => {
                    // Degraded, and the store is out of reach: the application chose stale answers.
                    let now = now_unix_nanos();
                    self.cached(digest, now, i64::MIN).ok_or(error)
                }
                other => other,
            };
        }
        Err(StoreError::new(StoreErrorKind::Unavailable, Overtaken))
    }

    /// Waits for a lookup slot, or sheds the lookup when the queue is full too.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        let inner = &*self.inner;
        if let Ok(permit) = inner.lookup_slots.try_acquire() {
            return Ok(permit);
        }
        if inner.queued.fetch_add(1, Ordering::AcqRel) >= inner.queue_limit {
            inner.queued.fetch_sub(1, Ordering::AcqRel);
            inner.shed.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            ::metrics::counter!(crate::metrics::LOOKUPS_SHED_TOTAL).increment(1);
            return Err(StoreError::new(StoreErrorKind::Unavailable, LookupShed));
        }
        let _place = QueuePlace(&inner.queued);
        inner
            .lookup_slots
            .acquire()
            .await
            .map_err(StoreError::unavailable)
    }

    /// The store's answer for a digest, within the lookup bound and timeout; `read_at` is now.
    async fn read(&self, digest: &KeyDigest, read_at: i64) -> Result<CacheEntry, StoreError> {
        let inner = &*self.inner;
        let deadline = tokio::time::Instant::now() + inner.lookup_timeout;
        let timed_out = || StoreError::from_kind(StoreErrorKind::Timeout);
        let _slot = tokio::time::timeout_at(deadline, self.slot())
            .await
            .map_err(|_| timed_out())??;
        inner.lookups.fetch_add(1, Ordering::Relaxed);
        let found = tokio::time::timeout_at(deadline, inner.store.find_by_digest(digest));
        match crate::metrics::timed_lookup(found).await {
            Err(_) => Err(timed_out()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Ok(CacheEntry::Unknown { read_at }),
            Ok(Ok(Some(record))) => {
                // The budgets above the key's own: only for a live key (a revoked or expired one
                // is refused before any budget is asked).
                let live = record.revoked_at.is_none()
                    && effective_expiry(&record, digest).is_none_or(|at| nanos_of(at) > read_at);
                let above = if live {
                    let above =
                        tokio::time::timeout_at(deadline, inner.store.budget_above(&record));
                    match above.await {
                        Err(_) => return Err(timed_out()),
                        Ok(result) => result?,
                    }
                } else {
                    Vec::new()
                };
                Ok(CacheEntry::Known(Arc::new(ResolvedKey::from_record(
                    &record,
                    digest,
                    above,
                    inner.ttl,
                    read_at,
                    &inner.shared,
                    &inner.lives,
                ))))
            }
        }
    }

    /// One store lookup; `epoch` is the invalidation epoch when it was registered as in flight.
    async fn lookup(self, digest: KeyDigest, epoch: u64) -> Result<CacheEntry, StoreError> {
        let result = self.read(&digest, now_unix_nanos()).await;
        let inner = &self.inner;
        {
            let mut in_flight = inner.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                // The generation guard: only a lookup no invalidation has overtaken fills the cache.
                Ok(entry) if inner.epoch.load(Ordering::Acquire) == epoch => {
                    inner.cache.insert(digest, entry.clone());
                }
                Ok(_) => {}
                // Shed lookups are counted, not logged one by one: they come in floods.
                Err(error) if is_shed(error) => {}
                Err(error) => {
                    // Counted every time (`api_key_lookup_seconds{outcome="error"}`); logged once a second.
                    static FAILED: Throttle = Throttle::new();
                    if let Some(left_out) = FAILED.admit() {
                        tracing::warn!(%error, left_out, "API key lookup failed");
                    }
                }
            }
            // An invalidation since then already dropped this lookup and may have started another.
            if in_flight.get(&digest).is_some_and(|f| f.epoch == epoch) {
                in_flight.remove(&digest);
            }
        }
        result
    }

    /// Forgets what the cache knows about one digest.
    ///
    /// Requests in flight under the digest are then judged again: their key's record is read from
    /// the store in the background, and they end if it says the key ended (see
    /// [`Principal::is_live`]).
    pub fn invalidate_digest(&self, digest: &KeyDigest) {
        self.forget_digest(digest);
        self.recheck(self.inner.lives.live(|life| life.digest() == digest));
    }

    /// [`invalidate_digest`](Self::invalidate_digest) without judging the requests in flight again
    /// (key management does that itself, before it returns: [`settle`](Self::settle)).
    pub(crate) fn forget_digest(&self, digest: &KeyDigest) {
        self.bump(Some(digest));
        self.inner.cache.remove(digest);
        self.retire_front();
    }

    /// The requests in flight under `digests` (their lives, while live): taken before the cache
    /// forgets the digests, so that whoever ends them then (a settle, or a new request's re-read)
    /// they are counted by [`settle`](Self::settle).
    pub(crate) fn lives_of(&self, digests: &[KeyDigest]) -> Vec<Arc<Life>> {
        self.inner
            .lives
            .live(|life| digests.contains(life.digest()))
    }

    /// Judges the requests in flight under `lives` again, against the store: a key the store
    /// says ended (revoked, deleted, a previous secret past its grace, expired) ends them; a
    /// rotation's new grace end arms its timer. A store failure is retried a few times, then the
    /// requests keep running (as cached keys keep working while the store is down). Returns how
    /// many requests were in flight under those of `lives` that have ended (by this call or any
    /// other way).
    pub(crate) async fn settle(&self, lives: Vec<Arc<Life>>) -> u64 {
        self.settle_lives(&lives).await;
        lives
            .iter()
            .filter(|life| life.ended().is_some())
            .map(|life| life.in_flight_at_end())
            .sum()
    }

    async fn settle_lives(&self, lives: &[Arc<Life>]) {
        const ATTEMPTS: u32 = 5;
        for life in lives {
            for attempt in 1..=ATTEMPTS {
                if life.ended().is_some() {
                    break;
                }
                match self.inner.store.find_by_digest(life.digest()).await {
                    // Deleted, or a previous secret whose rotation kept no grace.
                    Ok(None) => {
                        life.end(ExpiredReason::Revoked);
                    }
                    Ok(Some(record)) if record.revoked_at.is_some() => {
                        life.end(ExpiredReason::Revoked);
                    }
                    Ok(Some(record)) => life.expire_at(
                        effective_expiry(&record, life.digest()).map_or(i64::MAX, nanos_of),
                    ),
                    Err(error) if attempt < ATTEMPTS => {
                        tracing::debug!(%error, attempt, "re-reading an API key for requests in flight failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, api_key_id = %life.key_id(), "re-reading an API key for requests in flight failed; they keep running");
                    }
                }
                break;
            }
        }
    }

    /// [`settle_lives`](Self::settle_lives) in the background (nothing to do: no task).
    fn recheck(&self, lives: Vec<Arc<Life>>) {
        if lives.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let resolver = self.clone();
                runtime.spawn(async move { resolver.settle_lives(&lives).await });
            }
            Err(_) => tracing::warn!(
                "an API key invalidation outside a tokio runtime: requests in flight are not judged again"
            ),
        }
    }

    /// How many requests in flight under the key `id` its end (revocation, deletion, expiry, …)
    /// has cut short on this instance so far: bodies refused and streams ended (each request
    /// counted once).
    pub fn requests_ended(&self, id: &KeyId) -> u64 {
        self.inner.lives.requests_ended(id)
    }

    /// Forgets every cached digest of one key (current and previous secrets). Effective at once;
    /// the cache's maintenance then removes the entries (a scan in the background). When the
    /// digests are known, [`invalidate_digest`](Self::invalidate_digest) each is cheaper: that is
    /// what [`Invalidation::apply`](crate::invalidate::Invalidation::apply) does.
    pub fn invalidate_key(&self, id: &KeyId) {
        self.bump(None);
        self.inner.cache.remove_key(id);
        self.retire_front();
        self.recheck(self.inner.lives.live(|life| life.key_id() == id));
    }

    /// Forgets everything (e.g. after a broadcast subscription reconnects and may have missed messages).
    ///
    /// Requests in flight are judged again against the store (in the background): only those whose
    /// key the store says ended are ended, never a live key's.
    pub fn invalidate_all(&self) {
        self.bump(None);
        self.inner.cache.clear();
        self.retire_front();
        self.recheck(self.inner.lives.live(|_| true));
    }

    /// Starts a new invalidation epoch: lookups in flight may have read the store before the change,
    /// so they will not fill the cache and new requests do not join them. Those for `digest` (every
    /// one when `None`) are marked overtaken: their waiters ask again.
    fn bump(&self, digest: Option<&KeyDigest>) {
        let mut in_flight = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        for (d, f) in in_flight.drain() {
            if digest.is_none_or(|digest| *digest == d) {
                f.overtaken.store(true, Ordering::Release);
            }
        }
    }

    /// The fleet vouches for this cache until `until` (Unix nanoseconds): a fleet subscription heard
    /// its own heartbeat sent at `until - degraded_time_to_live`. Only moves forward.
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn vouch_until(&self, until: i64) {
        self.inner.vouched_until.fetch_max(until, Ordering::AcqRel);
    }

    /// A fleet subscription starts: from now on the cache is vouched for only while heartbeats are
    /// heard (until then, for the bound from `now`).
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn join_fleet(&self, now: i64) {
        self.inner.vouched_until.store(
            now.saturating_add(self.inner.degraded_time_to_live),
            Ordering::Release,
        );
    }

    /// Leaves the fleet: the cache no longer waits for heartbeats (the subscription ended).
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn leave_fleet(&self) {
        self.inner.vouched_until.store(i64::MAX, Ordering::Release);
    }

    /// The freshness bound (the degraded lifetime).
    pub(crate) fn bound(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.inner.degraded_time_to_live).unwrap_or(0))
    }

    /// Whether the fleet vouches for this cache at `now` (always, outside a fleet).
    pub fn is_vouched(&self) -> bool {
        now_unix_nanos() <= self.inner.vouched_until.load(Ordering::Acquire)
    }

    /// Moves the epoch again once the cache has forgotten the entries: every thread's front slot
    /// filled before this (possibly from an entry read just before its removal) stops answering.
    fn retire_front(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A subscription of this resolver went down (or is not up yet): enter degraded mode.
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn subscription_down(&self) {
        if self.inner.degraded.fetch_add(1, Ordering::AcqRel) == 0 {
            tracing::warn!(
                degraded_ttl_ms = self.inner.degraded_time_to_live / 1_000_000,
                "API key cache degraded: invalidation subscription not connected; cached keys are \
                 re-read from the store when older than the degraded lifetime"
            );
            #[cfg(feature = "metrics")]
            ::metrics::gauge!(crate::metrics::CACHE_DEGRADED).set(1.0);
        }
    }

    /// A subscription of this resolver is (back) up, and has cleared the cache: leave degraded mode
    /// once no other subscription is down.
    #[cfg(any(feature = "postgres", feature = "redis"))]
    pub(crate) fn subscription_up(&self) {
        if self.inner.degraded.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A front slot refused for its age during degraded mode may hold an answer that a
            // re-read has replaced in the cache since: no slot from before answers again.
            self.retire_front();
            tracing::info!("API key cache no longer degraded: invalidation subscription connected");
            #[cfg(feature = "metrics")]
            ::metrics::gauge!(crate::metrics::CACHE_DEGRADED).set(0.0);
        }
    }
}

#[cfg(test)]
mod tests;
