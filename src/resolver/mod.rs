//! [`CachedResolver`]: from a key digest to a principal, through a bounded cache in front of a
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
//! use tower_api_keys::key::KeyFormat;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
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
use std::time::Duration;

use crate::clock::{nanos_of, now_unix_nanos};
use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::key::{KeyDigest, KeyFormat, KeyId};
use crate::principal::Principal;
use crate::store::{KeyRecord, KeyStore, StoreError, StoreErrorKind};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

mod front;
mod intern;
mod table;

/// A key as the cache holds it: the ready-made principal and what must be checked per request.
pub(crate) struct ResolvedKey {
    pub(crate) principal: Principal,
    /// Effective expiry in Unix nanoseconds (`i64::MAX`: never): the key's own, or the end of a
    /// rotation grace period if that is earlier. Compared with the hot path's clock
    /// ([`crate::clock`]) without a calendar conversion.
    expires_at: i64,
    /// When this answer stops being cacheable (store read + TTL, or the expiry if sooner), in Unix
    /// nanoseconds: the cache and the per-thread front never serve it past this.
    cached_until: i64,
    /// Unix seconds of the latest use not yet flushed (0 = none).
    pub(crate) last_used: AtomicI64,
    pub(crate) revoked: bool,
    /// Whether this entry is queued for the next usage flush.
    pub(crate) queued: AtomicBool,
}

impl ResolvedKey {
    fn from_record(
        record: &KeyRecord,
        digest: &KeyDigest,
        ttl: Duration,
        now: i64,
        shared: &intern::Interner,
    ) -> Self {
        let grace_end = record
            .previous
            .as_ref()
            .filter(|previous| previous.digest == *digest && record.digest != *digest)
            .map(|previous| previous.valid_until);
        let expires_at = match (record.expires_at, grace_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map_or(i64::MAX, nanos_of);
        let revoked = record.revoked_at.is_some();
        let mut cached_until = now.saturating_add(saturating_nanos(ttl));
        // A live key is dropped from the cache when it expires; an already expired or revoked key
        // stays cached as such for the TTL: it cannot come back.
        if !revoked && expires_at > now {
            cached_until = cached_until.min(expires_at);
        }
        Self {
            principal: Principal::scoped(
                record.id.clone(),
                record.name.as_str(),
                shared.string(&record.owner),
                shared.string(&record.account),
                shared.scopes(&record.scopes),
                record.expires_at,
            ),
            expires_at,
            cached_until,
            last_used: AtomicI64::new(0),
            revoked,
            queued: AtomicBool::new(false),
        }
    }

    /// The request-time check, done on every request, cached or not: revocation, and expiry at
    /// `now` (Unix nanoseconds).
    pub(crate) fn check(&self, now: i64) -> Result<(), AuthError> {
        if self.revoked {
            return Err(AuthError::ExpiredKey(ExpiredReason::Revoked));
        }
        if self.expires_at <= now {
            return Err(AuthError::ExpiredKey(ExpiredReason::Expired));
        }
        Ok(())
    }
}

fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// What the cache remembers about a digest.
#[derive(Clone)]
pub(crate) enum CacheEntry {
    Known(Arc<ResolvedKey>),
    Unknown,
}

impl CacheEntry {
    /// The request-time checks at `now` (Unix nanoseconds, see [`crate::clock`]).
    pub(crate) fn authenticate(&self, now: i64) -> Result<&Arc<ResolvedKey>, AuthError> {
        match self {
            Self::Known(key) => key.check(now).map(|()| key),
            Self::Unknown => Err(AuthError::InvalidKey(InvalidKeyReason::Unknown)),
        }
    }
}

type Lookup = Shared<BoxFuture<'static, Result<CacheEntry, StoreError>>>;

struct Inner {
    store: Arc<dyn KeyStore>,
    format: KeyFormat,
    cache: table::Table,
    /// Owner, account and scope-set values shared by the cached principals.
    shared: intern::Interner,
    in_flight: Mutex<HashMap<[u8; 32], (u64, Lookup)>>,
    /// Bumped by every invalidation; a lookup that started before a bump does not fill the cache.
    epoch: AtomicU64,
    lookup_timeout: Duration,
    ttl: Duration,
    negative_ttl: Duration,
    lookups: AtomicU64,
    /// Process-unique id: tells this resolver's entries apart in the per-thread front.
    id: u64,
}

/// Resolves key digests to principals through a bounded cache in front of a [`KeyStore`].
///
/// Cheap to clone; clones share the cache. Give the same resolver to [`ApiKeyLayer`](crate::layer::ApiKeyLayer)
/// and to key management, so that revocations reach the cache the layer reads.
#[derive(Clone)]
pub struct CachedResolver {
    inner: Arc<Inner>,
}

impl fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedResolver")
            .field("format", &self.inner.format)
            .field("entries", &self.inner.cache.len())
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

    /// Most entries held (default 100,000; unknown digests count too). When full, an expired entry or
    /// one not used lately makes room (CLOCK, an approximation of least recently used).
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
        CachedResolver {
            inner: Arc::new(Inner {
                store: self.store,
                format: self.format,
                cache: table::Table::new(self.max_capacity),
                shared: intern::Interner::default(),
                in_flight: Mutex::default(),
                epoch: AtomicU64::new(0),
                lookup_timeout: self.lookup_timeout,
                ttl: self.ttl,
                negative_ttl: self.negative_ttl,
                lookups: AtomicU64::new(0),
                id: {
                    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
                    NEXT_ID.fetch_add(1, Ordering::Relaxed)
                },
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

    /// Number of cached entries (known and unknown digests; an expired entry counts until its slot is
    /// reused or it is asked for).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.len() as u64
    }

    /// Authenticates a digest: cache, then store. Does the request-time revocation and expiry checks.
    pub async fn authenticate(&self, digest: &KeyDigest) -> Result<Principal, AuthError> {
        let entry = self.resolve(digest).await?;
        entry
            .authenticate(now_unix_nanos())
            .map(|key| key.principal.clone())
    }

    /// The hot path: admits a cached digest at `now` (Unix nanoseconds; revocation and expiry
    /// checked) and calls `admit` with the key, or refuses it. `None` when the digest is not cached.
    /// Synchronous, no allocation: this thread's front answers first (see [`front`]), then the table.
    pub(crate) fn admit_cached<R>(
        &self,
        digest: &KeyDigest,
        now: i64,
        admit: impl Fn(&Arc<ResolvedKey>) -> R,
    ) -> Option<Result<R, AuthError>> {
        let inner = &*self.inner;
        // Read before the table: an invalidation that the table's answer predates has not bumped it
        // yet.
        let epoch = inner.epoch.load(Ordering::Acquire);
        if let Some(decided) = front::with(inner.id, epoch, digest, now, |key| {
            key.check(now)?;
            Ok(admit(key))
        }) {
            return Some(decided);
        }
        let entry = self.cached(digest, now)?;
        Some(entry.authenticate(now).map(|key| {
            front::fill(inner.id, epoch, digest, key);
            admit(key)
        }))
    }

    /// The answer the table holds for a digest at `now`, if any.
    fn cached(&self, digest: &KeyDigest, now: i64) -> Option<CacheEntry> {
        self.inner.cache.get(digest.as_bytes(), now)
    }

    /// The answer for a digest, looking it up in the store on a miss (one lookup per digest at a time).
    pub(crate) async fn resolve(&self, digest: &KeyDigest) -> Result<CacheEntry, StoreError> {
        if let Some(entry) = self.cached(digest, now_unix_nanos()) {
            return Ok(entry);
        }
        let lookup = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // A lookup that finished between our miss and taking the lock filled the cache first.
            if let Some(entry) = self.cached(digest, now_unix_nanos()) {
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
        let result = crate::metrics::timed_lookup(lookup).await;
        let now = now_unix_nanos();
        let result = match result {
            Err(_) => Err(StoreError::from_kind(StoreErrorKind::Timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Ok((
                CacheEntry::Unknown,
                now.saturating_add(saturating_nanos(inner.negative_ttl)),
            )),
            Ok(Ok(Some(record))) => {
                let key = ResolvedKey::from_record(&record, &digest, inner.ttl, now, &inner.shared);
                let until = key.cached_until;
                Ok((CacheEntry::Known(Arc::new(key)), until))
            }
        };
        {
            let mut in_flight = inner.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                Ok((entry, until)) if inner.epoch.load(Ordering::Acquire) == epoch => {
                    inner
                        .cache
                        .insert(digest.as_bytes(), entry.clone(), *until, now);
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
        result.map(|(entry, _)| entry)
    }

    /// Forgets what the cache knows about one digest.
    pub fn invalidate_digest(&self, digest: &KeyDigest) {
        self.bump();
        self.inner.cache.remove(digest.as_bytes());
        self.retire_front();
    }

    /// Forgets every cached digest of one key (current and previous secrets).
    pub fn invalidate_key(&self, id: &KeyId) {
        self.bump();
        self.inner.cache.remove_if(
            |entry| matches!(entry, CacheEntry::Known(key) if key.principal.key_id() == id),
        );
        self.retire_front();
    }

    /// Forgets everything (e.g. after a broadcast subscription reconnects and may have missed messages).
    pub fn invalidate_all(&self) {
        self.bump();
        self.inner.cache.clear();
        self.retire_front();
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

    /// Moves the epoch again once the table has forgotten the entries: every thread's front slot
    /// filled before this (possibly from an entry read just before its removal) stops answering.
    fn retire_front(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn key(expires_at: Option<OffsetDateTime>, revoked: bool) -> ResolvedKey {
        ResolvedKey {
            principal: Principal::master(),
            expires_at: expires_at.map_or(i64::MAX, nanos_of),
            cached_until: i64::MAX,
            last_used: AtomicI64::new(0),
            revoked,
            queued: AtomicBool::new(false),
        }
    }

    /// The nanosecond check answers as a calendar comparison would, at and around the boundaries.
    #[test]
    fn check_agrees_with_calendar_time() {
        let base = OffsetDateTime::now_utc();
        let ns = time::Duration::nanoseconds;
        let epoch = OffsetDateTime::UNIX_EPOCH;
        let times = [
            base,
            base - ns(1),
            base + ns(1),
            epoch - ns(1_500_000_000),
            epoch - ns(1_500_000_002),
        ];
        for expires_at in [
            None,
            Some(base - ns(1)),
            Some(base),
            Some(base + ns(1)),
            Some(epoch - ns(1_500_000_001)),
            Some(base + time::Duration::days(365 * 100)),
            Some(base + time::Duration::days(365 * 1000)),
        ] {
            for revoked in [false, true] {
                let key = key(expires_at, revoked);
                for at in times {
                    let expected = if revoked {
                        Err(ExpiredReason::Revoked)
                    } else if expires_at.is_some_and(|e| e <= at) {
                        Err(ExpiredReason::Expired)
                    } else {
                        Ok(())
                    };
                    let got = key.check(nanos_of(at)).map_err(|e| match e {
                        AuthError::ExpiredKey(reason) => reason,
                        other => panic!("unexpected {other:?}"),
                    });
                    assert_eq!(
                        got, expected,
                        "expires_at {expires_at:?}, revoked {revoked}, at {at}"
                    );
                }
            }
        }
    }

    fn record(format: &KeyFormat, revoked: bool) -> (crate::key::ApiKey, KeyRecord) {
        let key = format.generate();
        let now = OffsetDateTime::now_utc();
        let record = KeyRecord {
            id: KeyId::generate(),
            name: "front".to_owned(),
            owner: "team".to_owned(),
            account: "acct".to_owned(),
            scopes: "ledgers:read".parse().unwrap(),
            digest: key.digest(),
            digest_scheme: Default::default(),
            masked_key: format.mask(&key).unwrap(),
            created_at: now,
            expires_at: None,
            revoked_at: revoked.then_some(now),
            last_used_at: None,
            created_by: None,
            rotated_at: None,
            previous: None,
        };
        (key, record)
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// What the hot path answers for `digest` on this thread: `None` when nothing is cached.
    fn hot(resolver: &CachedResolver, digest: &KeyDigest) -> Option<Result<KeyId, AuthError>> {
        resolver.admit_cached(digest, now_unix_nanos(), |key| {
            key.principal.key_id().clone()
        })
    }

    fn resolver_with(record: &KeyRecord, ttl: Duration) -> CachedResolver {
        let store = crate::store::MemoryStore::new();
        block_on(store.insert(record, Default::default(), record.created_at)).unwrap();
        CachedResolver::builder(store).ttl(ttl).build()
    }

    /// A revocation reaches the hot path of a thread whose front already holds the key.
    #[test]
    fn front_forgets_on_every_invalidation() {
        let format = KeyFormat::default();
        for invalidation in ["digest", "key", "all"] {
            let (key, record) = record(&format, false);
            let resolver = resolver_with(&record, Duration::from_secs(3600));
            let digest = key.digest();
            assert!(hot(&resolver, &digest).is_none(), "nothing cached yet");
            block_on(resolver.authenticate(&digest)).unwrap();
            // The first hot read fills the front from the table, the second is answered by the front.
            for _ in 0..2 {
                assert_eq!(hot(&resolver, &digest).unwrap().unwrap(), record.id);
            }
            block_on(
                resolver
                    .store()
                    .revoke(&record.id, OffsetDateTime::now_utc()),
            )
            .unwrap();
            match invalidation {
                "digest" => resolver.invalidate_digest(&digest),
                "key" => resolver.invalidate_key(&record.id),
                _ => resolver.invalidate_all(),
            }
            assert!(
                hot(&resolver, &digest).is_none(),
                "{invalidation}: front still answers"
            );
            block_on(resolver.authenticate(&digest)).unwrap_err();
            assert!(matches!(
                hot(&resolver, &digest),
                Some(Err(AuthError::ExpiredKey(ExpiredReason::Revoked)))
            ));
        }
    }

    /// The cached principal (built with shared owner, account and scopes) is the record's principal.
    #[test]
    fn cached_principal_is_the_records() {
        let format = KeyFormat::default();
        let (key, record) = record(&format, false);
        let resolver = resolver_with(&record, Duration::from_secs(3600));
        let principal = block_on(resolver.authenticate(&key.digest())).unwrap();
        assert_eq!(
            principal,
            Principal::scoped(
                record.id.clone(),
                record.name.as_str(),
                record.owner.as_str(),
                record.account.as_str(),
                record.scopes.clone(),
                record.expires_at,
            )
        );
    }

    /// Two resolvers caching the same digest (two stores) never answer with each other's key.
    #[test]
    fn front_keeps_resolvers_apart() {
        let format = KeyFormat::default();
        let (key, first) = record(&format, false);
        let mut second = first.clone();
        second.id = KeyId::generate();
        let (a, b) = (
            resolver_with(&first, Duration::from_secs(3600)),
            resolver_with(&second, Duration::from_secs(3600)),
        );
        let digest = key.digest();
        block_on(a.authenticate(&digest)).unwrap();
        block_on(b.authenticate(&digest)).unwrap();
        for _ in 0..3 {
            assert_eq!(hot(&a, &digest).unwrap().unwrap(), first.id);
            assert_eq!(hot(&b, &digest).unwrap().unwrap(), second.id);
        }
        // A resolver that never cached the digest does not find the other's front entry.
        let c = resolver_with(&first, Duration::from_secs(3600));
        assert_eq!(hot(&a, &digest).unwrap().unwrap(), first.id);
        assert!(hot(&c, &digest).is_none());
    }

    /// Neither the front nor the table serves an answer past its cache lifetime.
    #[test]
    fn front_respects_the_ttl() {
        let format = KeyFormat::default();
        let (key, record) = record(&format, false);
        let resolver = resolver_with(&record, Duration::from_millis(50));
        let digest = key.digest();
        block_on(resolver.authenticate(&digest)).unwrap();
        assert!(hot(&resolver, &digest).unwrap().is_ok());
        assert!(hot(&resolver, &digest).unwrap().is_ok());
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            hot(&resolver, &digest).is_none(),
            "expired entry still answered"
        );
    }

    /// A front slot goes back to the table after its hit budget: the table's recency bits and expiry
    /// stay in charge of hot keys. Seen through the table's own removal: once the table has dropped
    /// the entry, the front stops answering within one budget.
    #[test]
    fn front_refills_from_the_table() {
        let format = KeyFormat::default();
        let (key, record) = record(&format, false);
        let resolver = resolver_with(&record, Duration::from_secs(3600));
        let digest = key.digest();
        block_on(resolver.authenticate(&digest)).unwrap();
        assert!(hot(&resolver, &digest).unwrap().is_ok());
        // Remove from the table only, bypassing the epoch: the front alone still knows the key.
        resolver.inner.cache.remove(digest.as_bytes());
        let answered = (0..2 * front::HITS_PER_FILL)
            .take_while(|_| hot(&resolver, &digest).is_some())
            .count();
        assert_eq!(answered, front::HITS_PER_FILL as usize);
    }
}
