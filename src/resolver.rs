//! [`CachedResolver`]: from a key digest to a principal, through a moka cache in front of a
//! [`KeyStore`].
//!
//! - Hits are answered synchronously, without allocating or awaiting.
//! - Concurrent misses for one digest share a single store lookup.
//! - Unknown digests are cached too (for a shorter time), so a flood of one made-up key costs one lookup.
//! - Store errors and timeouts are never cached: the next request asks again.
//! - A positive entry never outlives the key's own expiry; revocation and expiry are still checked on
//!   every request, even on a hit.
//! - [`invalidate_digest`](CachedResolver::invalidate_digest), [`invalidate_key`](CachedResolver::invalidate_key)
//!   and [`invalidate_all`](CachedResolver::invalidate_all) forget entries at once; a lookup that was in
//!   flight when an invalidation happened does not put its (possibly stale) answer in the cache.
//!
//! ```
//! use std::time::Duration;
//! use tower_api_keys::{CachedResolver, KeyFormat, MemoryStore};
//!
//! let resolver = CachedResolver::builder(MemoryStore::new())
//!     .format(KeyFormat::new("sk_live").unwrap())
//!     .ttl(Duration::from_secs(30))
//!     .negative_ttl(Duration::from_secs(5))
//!     .max_capacity(100_000)
//!     .lookup_timeout(Duration::from_secs(2))
//!     .build();
//! # let _ = resolver;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use moka::Expiry;
use time::OffsetDateTime;

use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::key::{KeyDigest, KeyFormat, KeyId};
use crate::principal::Principal;
use crate::store::{KeyRecord, KeyStore, StoreError, StoreErrorKind};

/// A key as the cache holds it: the ready-made principal and what must be checked per request.
pub(crate) struct ResolvedKey {
    pub(crate) principal: Principal,
    pub(crate) revoked: bool,
    /// Effective expiry: the key's own, or the end of a rotation grace period if that is earlier.
    pub(crate) expires_at: Option<OffsetDateTime>,
    /// `expires_at` in nanoseconds since the Unix epoch: the per-request check compares it with
    /// `SystemTime::now()` (what `OffsetDateTime::now_utc` reads) without a calendar conversion.
    expires_at_unix_nanos: Option<i128>,
    /// Unix seconds of the latest use not yet flushed (0 = none).
    pub(crate) last_used: AtomicI64,
    /// Whether this entry is queued for the next usage flush.
    pub(crate) queued: AtomicBool,
}

impl ResolvedKey {
    fn from_record(record: &KeyRecord, digest: &KeyDigest) -> Self {
        let grace_end = record
            .previous
            .as_ref()
            .filter(|previous| previous.digest == *digest && record.digest != *digest)
            .map(|previous| previous.valid_until);
        let expires_at = match (record.expires_at, grace_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            principal: record.principal(),
            revoked: record.revoked_at.is_some(),
            expires_at,
            expires_at_unix_nanos: expires_at.map(OffsetDateTime::unix_timestamp_nanos),
            last_used: AtomicI64::new(0),
            queued: AtomicBool::new(false),
        }
    }

    /// The request-time check, done on every request, cached or not.
    pub(crate) fn check(&self, now: OffsetDateTime) -> Result<(), AuthError> {
        if self.revoked {
            return Err(AuthError::ExpiredKey(ExpiredReason::Revoked));
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::ExpiredKey(ExpiredReason::Expired));
        }
        Ok(())
    }

    /// [`check`](Self::check) at a `SystemTime`: the same answer as `check(OffsetDateTime::from(now))`,
    /// without building the `OffsetDateTime` (the hot path).
    pub(crate) fn check_at(&self, now: SystemTime) -> Result<(), AuthError> {
        if self.revoked {
            return Err(AuthError::ExpiredKey(ExpiredReason::Revoked));
        }
        if self
            .expires_at_unix_nanos
            .is_some_and(|at| at <= unix_nanos(now))
        {
            return Err(AuthError::ExpiredKey(ExpiredReason::Expired));
        }
        Ok(())
    }
}

/// Nanoseconds since the Unix epoch, negative before it (as `OffsetDateTime::unix_timestamp_nanos`).
fn unix_nanos(time: SystemTime) -> i128 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    }
}

/// What the cache remembers about a digest.
#[derive(Clone)]
pub(crate) enum CacheEntry {
    Known(Arc<ResolvedKey>),
    Unknown,
}

impl CacheEntry {
    pub(crate) fn authenticate(&self, now: OffsetDateTime) -> Result<&Arc<ResolvedKey>, AuthError> {
        match self {
            Self::Known(key) => key.check(now).map(|()| key),
            Self::Unknown => Err(AuthError::InvalidKey(InvalidKeyReason::Unknown)),
        }
    }

    /// [`authenticate`](Self::authenticate) at a `SystemTime` (see [`ResolvedKey::check_at`]).
    pub(crate) fn authenticate_at(&self, now: SystemTime) -> Result<&Arc<ResolvedKey>, AuthError> {
        match self {
            Self::Known(key) => key.check_at(now).map(|()| key),
            Self::Unknown => Err(AuthError::InvalidKey(InvalidKeyReason::Unknown)),
        }
    }
}

struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<[u8; 32], CacheEntry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        value: &CacheEntry,
        _: Instant,
    ) -> Option<Duration> {
        Some(match value {
            CacheEntry::Unknown => self.negative_ttl,
            CacheEntry::Known(key) => match key.expires_at {
                Some(at) if !key.revoked => {
                    let left = at - OffsetDateTime::now_utc();
                    // An already expired key stays cached as expired: it cannot come back.
                    if left.is_positive() {
                        self.ttl.min(left.unsigned_abs())
                    } else {
                        self.ttl
                    }
                }
                _ => self.ttl,
            },
        })
    }
}

type Lookup = Shared<BoxFuture<'static, Result<CacheEntry, StoreError>>>;

struct Inner {
    store: Arc<dyn KeyStore>,
    format: KeyFormat,
    cache: moka::sync::Cache<[u8; 32], CacheEntry>,
    in_flight: Mutex<HashMap<[u8; 32], (u64, Lookup)>>,
    /// Bumped by every invalidation; a lookup that started before a bump does not fill the cache.
    epoch: AtomicU64,
    lookup_timeout: Duration,
    lookups: AtomicU64,
}

/// Resolves key digests to principals through a bounded moka cache in front of a [`KeyStore`].
///
/// Cheap to clone; clones share the cache. Give the same resolver to [`ApiKeyLayer`](crate::ApiKeyLayer)
/// and to key management, so that revocations reach the cache the layer reads.
#[derive(Clone)]
pub struct CachedResolver {
    inner: Arc<Inner>,
}

impl fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedResolver")
            .field("format", &self.inner.format)
            .field("entries", &self.inner.cache.entry_count())
            .field("lookup_timeout", &self.inner.lookup_timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`CachedResolver`]; see [`CachedResolver::builder`].
#[must_use]
pub struct CachedResolverBuilder {
    store: Arc<dyn KeyStore>,
    format: KeyFormat,
    ttl: Duration,
    negative_ttl: Duration,
    max_capacity: u64,
    lookup_timeout: Duration,
}

impl CachedResolverBuilder {
    /// The key format presented keys must match (default: prefix `sk`).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// How long a known key is cached (default 60 s). Without a broadcast invalidator this bounds how
    /// long another instance may keep accepting a revoked key.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an unknown digest is cached (default 5 s).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// Most entries held (default 100,000); least recently used entries go first.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.max_capacity = entries;
        self
    }

    /// How long a store lookup may take before the request is answered 503 (default 2 s).
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// Builds the resolver.
    pub fn build(self) -> CachedResolver {
        let cache = moka::sync::Cache::builder()
            .max_capacity(self.max_capacity)
            .expire_after(EntryExpiry {
                ttl: self.ttl,
                negative_ttl: self.negative_ttl,
            })
            .support_invalidation_closures()
            .build();
        CachedResolver {
            inner: Arc::new(Inner {
                store: self.store,
                format: self.format,
                cache,
                in_flight: Mutex::default(),
                epoch: AtomicU64::new(0),
                lookup_timeout: self.lookup_timeout,
                lookups: AtomicU64::new(0),
            }),
        }
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
            negative_ttl: Duration::from_secs(5),
            max_capacity: 100_000,
            lookup_timeout: Duration::from_secs(2),
        }
    }

    /// The key format this resolver accepts.
    pub fn format(&self) -> &KeyFormat {
        &self.inner.format
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// How many store lookups this resolver has made (cache misses that reached the store).
    pub fn store_lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// Number of cached entries (approximate: moka applies some bookkeeping lazily).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// Authenticates a digest: cache, then store. Does the request-time revocation and expiry checks.
    pub async fn authenticate(&self, digest: &KeyDigest) -> Result<Principal, AuthError> {
        let entry = self.resolve(digest).await?;
        let now = OffsetDateTime::now_utc();
        entry.authenticate(now).map(|key| key.principal.clone())
    }

    /// The cached answer for a digest, if any. Synchronous: the hot path.
    pub(crate) fn cached(&self, digest: &KeyDigest) -> Option<CacheEntry> {
        self.inner.cache.get(digest.as_bytes())
    }

    /// The answer for a digest, looking it up in the store on a miss (one lookup per digest at a time).
    pub(crate) async fn resolve(&self, digest: &KeyDigest) -> Result<CacheEntry, StoreError> {
        if let Some(entry) = self.cached(digest) {
            return Ok(entry);
        }
        let lookup = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // A lookup that finished between our miss and taking the lock filled the cache first.
            if let Some(entry) = self.cached(digest) {
                return Ok(entry);
            }
            let epoch = self.inner.epoch.load(Ordering::Acquire);
            in_flight
                .entry(*digest.as_bytes())
                .or_insert_with(|| (epoch, self.clone().lookup(*digest, epoch).boxed().shared()))
                .1
                .clone()
        };
        lookup.await
    }

    /// One store lookup; `epoch` is the invalidation epoch when it was registered as in flight.
    async fn lookup(self, digest: KeyDigest, epoch: u64) -> Result<CacheEntry, StoreError> {
        let inner = &self.inner;
        inner.lookups.fetch_add(1, Ordering::Relaxed);
        let lookup =
            tokio::time::timeout(inner.lookup_timeout, inner.store.find_by_digest(&digest));
        let result = match crate::metrics::timed_lookup(lookup).await {
            Err(_) => Err(StoreError::from_kind(StoreErrorKind::Timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Ok(CacheEntry::Unknown),
            Ok(Ok(Some(record))) => Ok(CacheEntry::Known(Arc::new(ResolvedKey::from_record(
                &record, &digest,
            )))),
        };
        {
            let mut in_flight = inner.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                Ok(entry) if inner.epoch.load(Ordering::Acquire) == epoch => {
                    inner.cache.insert(*digest.as_bytes(), entry.clone());
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "API key lookup failed"),
            }
            // An invalidation since then already dropped this lookup and may have started another.
            if in_flight
                .get(digest.as_bytes())
                .is_some_and(|(e, _)| *e == epoch)
            {
                in_flight.remove(digest.as_bytes());
            }
        }
        result
    }

    /// Forgets what the cache knows about one digest.
    pub fn invalidate_digest(&self, digest: &KeyDigest) {
        self.bump();
        self.inner.cache.invalidate(digest.as_bytes());
    }

    /// Forgets every cached digest of one key (current and previous secrets).
    pub fn invalidate_key(&self, id: &KeyId) {
        self.bump();
        let id = id.clone();
        let result = self.inner.cache.invalidate_entries_if(move |_, entry| {
            matches!(entry, CacheEntry::Known(key) if *key.principal.key_id() == id)
        });
        if result.is_err() {
            self.inner.cache.invalidate_all();
        }
    }

    /// Forgets everything (e.g. after a broadcast subscription reconnects and may have missed messages).
    pub fn invalidate_all(&self) {
        self.bump();
        self.inner.cache.invalidate_all();
    }

    /// Starts a new invalidation epoch: lookups in flight may have read the store before the change,
    /// so they will not fill the cache and new requests do not join them.
    fn bump(&self) {
        let mut in_flight = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(expires_at: Option<OffsetDateTime>, revoked: bool) -> ResolvedKey {
        ResolvedKey {
            principal: Principal::master(),
            revoked,
            expires_at,
            expires_at_unix_nanos: expires_at.map(OffsetDateTime::unix_timestamp_nanos),
            last_used: AtomicI64::new(0),
            queued: AtomicBool::new(false),
        }
    }

    /// The hot path's `SystemTime` check answers exactly as the `OffsetDateTime` one.
    #[test]
    fn check_at_agrees_with_check() {
        let now = SystemTime::now();
        let base = OffsetDateTime::from(now);
        let ns = time::Duration::nanoseconds;
        let epoch = OffsetDateTime::UNIX_EPOCH;
        for expires_at in [
            None,
            Some(base - ns(1)),
            Some(base),
            Some(base + ns(1)),
            Some(epoch - ns(1_500_000_001)),
            Some(base + time::Duration::days(365 * 100)),
        ] {
            for revoked in [false, true] {
                let key = key(expires_at, revoked);
                for at in [
                    now,
                    now - Duration::from_nanos(1),
                    now + Duration::from_nanos(1),
                    SystemTime::UNIX_EPOCH - Duration::from_nanos(1_500_000_000),
                    SystemTime::UNIX_EPOCH - Duration::from_nanos(1_500_000_002),
                ] {
                    assert_eq!(
                        format!("{:?}", key.check_at(at)),
                        format!("{:?}", key.check(OffsetDateTime::from(at))),
                        "expires_at {expires_at:?}, revoked {revoked}, at {at:?}"
                    );
                }
            }
        }
    }
}
