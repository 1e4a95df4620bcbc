//! What a [`CachedResolver`] hears: invalidations by digest, key and all; the requests in flight
//! under ended keys (I4); the fleet's vouching and degraded mode.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cached::CachedResolver;
use super::entry::effective_expiry;
use crate::clock::{nanos_of, now_unix_nanos};
use crate::error::ExpiredReason;
use crate::key::{KeyDigest, KeyId};
use crate::life::Life;
#[cfg(doc)]
use crate::principal::Principal;

impl CachedResolver {
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
        crate::life::in_flight_ended(&lives)
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
    pub(super) fn retire_front(&self) {
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
