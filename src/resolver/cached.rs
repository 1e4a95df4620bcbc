//! [`CachedResolver`] itself: what it holds, and the way from a digest to a principal (the cache,
//! the per-thread front, the bounded store lookups). What it hears (invalidations, the fleet) is in
//! `invalidation.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{nanos_of, now_unix_nanos};
use crate::error::AuthError;
use crate::key::{KeyDigest, KeyFormat};
use crate::life::Registry;
use crate::principal::Principal;
use crate::store::{KeyStore, StoreError, StoreErrorKind};
use crate::throttle::Throttle;
use futures_util::FutureExt;

use super::builder::CachedResolverBuilder;
use super::entry::ResolvedKey;
use super::entry::{CacheEntry, effective_expiry, key_check};
use super::lookup::{InFlight, LookupShed, OVERTAKEN_RETRIES, Overtaken, QueuePlace, is_shed};
use super::{cache, format, front, intern};

pub(super) struct Inner {
    pub(super) store: Arc<dyn KeyStore>,
    /// The format presented keys are checked against; swapped when the store's secrets change.
    pub(super) format: format::FormatSlot,
    pub(super) cache: cache::Cache,
    /// Owner, account and scope-set values shared by the cached principals.
    pub(super) shared: intern::Interner,
    pub(super) in_flight: Mutex<HashMap<KeyDigest, InFlight>>,
    /// Bumped by every invalidation; a lookup that started before a bump does not fill the cache.
    pub(super) epoch: AtomicU64,
    pub(super) lookup_timeout: Duration,
    pub(super) ttl: Duration,
    /// Store lookups allowed to run at once.
    pub(super) lookup_slots: tokio::sync::Semaphore,
    /// Lookups allowed to wait for a slot, and how many do.
    pub(super) queue_limit: usize,
    pub(super) queued: AtomicUsize,
    pub(super) shed: AtomicU64,
    pub(super) lookups: AtomicU64,
    /// Subscriptions of this resolver that are down (or not yet up): degraded while not 0.
    pub(super) degraded: AtomicUsize,
    pub(super) degraded_time_to_live: i64,
    /// Until when (Unix nanoseconds) the fleet vouches for this cache: a fleet subscription moves it
    /// to `t + degraded_time_to_live` each time it hears its own heartbeat sent at `t`. `i64::MAX` without
    /// one (nothing to hear): the single-instance path never reads past it.
    pub(super) vouched_until: AtomicI64,
    /// Serve a cached answer the fleet no longer vouches for when the store cannot be read either
    /// (weaker: see [`CachedResolverBuilder::serve_stale`]).
    pub(super) serve_stale: bool,
    pub(super) front: bool,
    /// Process-unique id: tells this resolver's entries apart in the per-thread front.
    pub(super) id: u64,
    /// The life of every digest a cache entry or a request in flight holds (I4).
    pub(super) lives: Arc<Registry>,
}

impl Inner {
    /// The oldest store read still trusted at `now`: `i64::MIN` normally; in degraded mode (a
    /// subscription down, or the fleet not heard within the bound), `now` minus the degraded
    /// lifetime.
    ///
    /// `i64::MAX` (nothing cached may be served) when, in degraded mode, the key format itself is
    /// older than that (or down): it must be read again first (`format.rs`).
    #[inline]
    pub(super) fn floor(&self, now: i64) -> i64 {
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
    pub(super) inner: Arc<Inner>,
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

    /// Whether this thread's front holds a current entry with `hint` (see [`front::hint`]): the
    /// key was admitted here lately, probably this very key (the digest decides).
    #[inline]
    pub(crate) fn front_knows(&self, hint: u64) -> bool {
        let inner = &*self.inner;
        inner.front && front::knows(inner.id, inner.epoch.load(Ordering::Acquire), hint)
    }

    /// The hot path: admits a cached digest at `now` (Unix nanoseconds; revocation and expiry
    /// checked) and calls `admit` with the key, or refuses it. `None` when the digest is not cached.
    /// Synchronous, no allocation: this thread's front answers first (see [`front`]); before moka is
    /// asked, `precheck` runs (the layer's checksum check: a front hit is a stored key's digest and
    /// needs none, while a made-up key is refused without a moka read), and its error is the answer.
    pub(crate) fn admit_cached<R>(
        &self,
        digest: &KeyDigest,
        hint: u64,
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
            && let Some(decided) = front::with(inner.id, epoch, hint, digest, |key| {
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
                front::fill(inner.id, epoch, hint, digest, key);
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
}
