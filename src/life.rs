//! The life of a key as the requests admitted under it see it (invariant I4: a request lives no
//! longer than its key).
//!
//! Every live digest the resolver hands out has one [`Life`]: the cached `ResolvedKey` holds it
//! through its [`Principal`](crate::principal::Principal), and so does every request admitted with
//! that digest, for as long as it runs. Ending a `Life` (revocation, deletion, a rotation without
//! grace, a revoked ancestor: an invalidation confirmed by the store; expiry or the end of a grace
//! period: a timer) flips one atomic flag and wakes whoever waits on [`KeyEnded`]. Request and
//! response bodies look at the flag once per frame.
//!
//! The [`Registry`] finds the `Life` of a digest by weak reference, so an entry evicted from the
//! cache (or replaced by a re-read) is still reached by an invalidation while requests hold it, and
//! a re-read of a live key shares the `Life` of the requests already running.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, oneshot};

use crate::clock::now_unix_nanos;
use crate::error::{AuthError, ExpiredReason};
use crate::key::{KeyDigest, KeyId};

const LIVE: u8 = 0;
const REVOKED: u8 = 1;
const EXPIRED: u8 = 2;

/// The liveness of one digest of a key, shared by its cache entry and the requests admitted with it.
pub(crate) struct Life {
    state: AtomicU8,
    notify: Notify,
    /// Requests admitted with this digest whose response is not yet sent in full.
    in_flight: AtomicU64,
    /// How many were in flight when the key ended (set once, by the call that ended it).
    in_flight_at_end: AtomicU64,
    digest: KeyDigest,
    key_id: KeyId,
    /// The effective expiry (Unix nanoseconds, `i64::MAX`: never) the timer is armed for.
    expires_at: AtomicI64,
    /// Dropping the sender stops the timer task armed for the previous expiry.
    timer: Mutex<Option<oneshot::Sender<()>>>,
    registry: Weak<Registry>,
}

impl Life {
    /// Whether the key has ended: one atomic load.
    #[inline]
    pub(crate) fn ended(&self) -> Option<ExpiredReason> {
        match self.state.load(Ordering::Acquire) {
            LIVE => None,
            REVOKED => Some(ExpiredReason::Revoked),
            _ => Some(ExpiredReason::Expired),
        }
    }

    /// A live key with no expiry armed and nothing in flight, kept in `registry` (if any).
    fn new(digest: &KeyDigest, key_id: &KeyId, registry: Weak<Registry>) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(LIVE),
            notify: Notify::new(),
            in_flight: AtomicU64::new(0),
            in_flight_at_end: AtomicU64::new(0),
            digest: *digest,
            key_id: key_id.clone(),
            expires_at: AtomicI64::new(i64::MAX),
            timer: Mutex::new(None),
            registry,
        })
    }

    /// Ends the key (the first reason wins), records how many requests were in flight under it
    /// then ([`in_flight_at_end`](Self::in_flight_at_end)) and wakes every waiter.
    pub(crate) fn end(&self, reason: ExpiredReason) {
        let state = match reason {
            ExpiredReason::Revoked => REVOKED,
            ExpiredReason::Expired => EXPIRED,
        };
        if self
            .state
            .compare_exchange(LIVE, state, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let in_flight = self.in_flight.load(Ordering::Acquire);
        self.in_flight_at_end.store(in_flight, Ordering::Release);
        self.notify.notify_waiters();
        // The timer has nothing left to do.
        self.timer.lock().unwrap_or_else(|p| p.into_inner()).take();
        tracing::debug!(api_key_id = %self.key_id, reason = reason.as_str(), in_flight, "API key ended; requests in flight under it end at their next frame");
    }

    /// How many requests were in flight under this key when it ended (0 while it lives).
    pub(crate) fn in_flight_at_end(&self) -> u64 {
        self.in_flight_at_end.load(Ordering::Acquire)
    }

    /// One more request in flight under this key (admitted; see [`leave`](Self::leave)).
    #[inline]
    pub(crate) fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request counted by [`enter`](Self::enter) is over: its response was sent in full, or
    /// dropped.
    #[inline]
    pub(crate) fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Makes sure the key ends at `at` (Unix nanoseconds) at the latest: arms a timer if `at` is
    /// earlier than the one armed. Without a tokio runtime no timer runs; the request-time check
    /// still refuses new requests.
    pub(crate) fn expire_at(self: &Arc<Self>, at: i64) {
        if at == i64::MAX || self.ended().is_some() {
            return;
        }
        let now = now_unix_nanos();
        if at <= now {
            self.end(ExpiredReason::Expired);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut timer = self.timer.lock().unwrap_or_else(|p| p.into_inner());
        if self.expires_at.load(Ordering::Acquire) <= at && timer.is_some() {
            return;
        }
        self.expires_at.store(at, Ordering::Release);
        let (stop, stopped) = oneshot::channel::<()>();
        // Replacing the sender stops the task armed for a later expiry.
        *timer = Some(stop);
        drop(timer);
        let life = Arc::downgrade(self);
        let wait = Duration::from_nanos(u64::try_from(at - now).unwrap_or(0));
        runtime.spawn(async move {
            let sleep = std::pin::pin!(tokio::time::sleep(wait));
            if let futures_util::future::Either::Right(_) =
                futures_util::future::select(sleep, stopped).await
            {
                return;
            }
            if let Some(life) = life.upgrade() {
                life.end(ExpiredReason::Expired);
            }
        });
    }

    pub(crate) fn digest(&self) -> &KeyDigest {
        &self.digest
    }

    pub(crate) fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// Counts one request in flight that this key's end cut short.
    pub(crate) fn count_cut(&self) {
        if let Some(registry) = self.registry.upgrade() {
            *registry
                .cut
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.key_id.clone())
                .or_default() += 1;
        }
    }

    /// A future resolving when the key ends.
    pub(crate) fn until_ended(self: Arc<Self>) -> BoxFuture<'static, AuthError> {
        Box::pin(async move {
            loop {
                let mut notified = std::pin::pin!(self.notify.notified());
                notified.as_mut().enable();
                if let Some(reason) = self.ended() {
                    return AuthError::ExpiredKey(reason);
                }
                notified.await;
            }
        })
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            let mut lives = registry.lives.lock().unwrap_or_else(|p| p.into_inner());
            // A newer `Life` may have taken the digest's place: remove only a dead one.
            if lives
                .get(&self.digest)
                .is_some_and(|w| w.strong_count() == 0)
            {
                lives.remove(&self.digest);
            }
        }
    }
}

impl fmt::Debug for Life {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Life")
            .field("key_id", &self.key_id)
            .field("ended", &self.ended())
            .finish_non_exhaustive()
    }
}

/// The `Life` of every digest that a cache entry or a request in flight still holds, by weak
/// reference; and how many requests in flight each ended key cut short.
#[derive(Default)]
pub(crate) struct Registry {
    lives: Mutex<HashMap<KeyDigest, Weak<Life>>>,
    cut: Mutex<HashMap<KeyId, u64>>,
}

impl Registry {
    /// The live `Life` of `digest`, or a new one, ending at `expires_at` at the latest.
    pub(crate) fn life(
        self: &Arc<Self>,
        digest: &KeyDigest,
        key_id: &KeyId,
        expires_at: i64,
    ) -> Arc<Life> {
        // A `Life` dropped here could be the last handle: its `Drop` takes the lock, so it is
        // dropped after the lock is released.
        let mut replaced = None;
        let life = {
            let mut lives = self.lives.lock().unwrap_or_else(|p| p.into_inner());
            match lives.get(digest).and_then(Weak::upgrade) {
                Some(life) if life.ended().is_none() && life.key_id == *key_id => life,
                other => {
                    replaced = other;
                    let life = Life::new(digest, key_id, Arc::downgrade(self));
                    lives.insert(*digest, Arc::downgrade(&life));
                    life
                }
            }
        };
        drop(replaced);
        life.expire_at(expires_at);
        life
    }

    /// A `Life` that has already ended, for a key refused at request time (never registered).
    pub(crate) fn ended(digest: &KeyDigest, key_id: &KeyId, reason: ExpiredReason) -> Arc<Life> {
        let life = Life::new(digest, key_id, Weak::new());
        life.end(reason);
        life
    }

    /// Ends the registered `Life` of `digest`, if any.
    pub(crate) fn end(&self, digest: &KeyDigest, reason: ExpiredReason) {
        let lives = self.lives.lock().unwrap_or_else(|p| p.into_inner());
        let life = lives.get(digest).and_then(Weak::upgrade);
        drop(lives);
        if let Some(life) = life {
            life.end(reason);
        }
    }

    /// The registered lives that are still live and match `filter`.
    pub(crate) fn live(&self, filter: impl Fn(&Life) -> bool) -> Vec<Arc<Life>> {
        // Upgraded under the lock, filtered (and the others dropped) after it: a dropped `Life`
        // takes the lock.
        let all: Vec<Arc<Life>> = self
            .lives
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        all.into_iter()
            .filter(|life| life.ended().is_none() && filter(life))
            .collect()
    }

    /// How many requests in flight under `key_id` its end has cut short on this instance.
    pub(crate) fn requests_ended(&self, key_id: &KeyId) -> u64 {
        self.cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
            .copied()
            .unwrap_or(0)
    }
}

/// How many requests were in flight under those of `lives` that have ended, when each ended (what a
/// revocation's receipt reports for this instance).
pub(crate) fn in_flight_ended(lives: &[Arc<Life>]) -> u64 {
    lives
        .iter()
        .filter(|life| life.ended().is_some())
        .map(|life| life.in_flight_at_end())
        .sum()
}

/// A future that resolves when the key of a [`Principal`](crate::principal::Principal) ends
/// (revocation, deletion, expiry, the end of a rotation's grace period, a revoked ancestor), with
/// the refusal a new request with that key would get (`AUTH_EXPIRED_API_KEY`, `details.reason`
/// saying which). See [`Principal::ended`](crate::principal::Principal::ended).
///
/// Never resolves for a key that cannot end this way (the master key, a principal built by hand).
#[must_use = "futures do nothing unless polled"]
pub struct KeyEnded {
    inner: Option<BoxFuture<'static, AuthError>>,
}

impl KeyEnded {
    pub(crate) fn new(life: Option<&Arc<Life>>) -> Self {
        Self {
            inner: life.map(|life| life.clone().until_ended()),
        }
    }
}

impl fmt::Debug for KeyEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEnded").finish_non_exhaustive()
    }
}

impl Future for KeyEnded {
    type Output = AuthError;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AuthError> {
        match &mut self.inner {
            Some(future) => future.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_life_is_shared_per_digest_and_forgotten_when_dropped() {
        let registry = Arc::new(Registry::default());
        let (digest, id) = (KeyDigest::of("a"), KeyId::new("key_a"));
        let first = registry.life(&digest, &id, i64::MAX);
        let second = registry.life(&digest, &id, i64::MAX);
        assert!(Arc::ptr_eq(&first, &second));
        drop((first, second));
        assert!(registry.lives.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn ending_wakes_waiters_and_is_final() {
        let registry = Arc::new(Registry::default());
        let (digest, id) = (KeyDigest::of("a"), KeyId::new("key_a"));
        let life = registry.life(&digest, &id, i64::MAX);
        let waiter = tokio::spawn(KeyEnded::new(Some(&life)));
        tokio::task::yield_now().await;
        registry.end(&digest, ExpiredReason::Revoked);
        let error = waiter.await.unwrap();
        assert!(matches!(
            error,
            AuthError::ExpiredKey(ExpiredReason::Revoked)
        ));
        life.end(ExpiredReason::Expired);
        assert_eq!(life.ended(), Some(ExpiredReason::Revoked));
        // An ended life is not handed out again.
        let next = registry.life(&digest, &id, i64::MAX);
        assert!(!Arc::ptr_eq(&life, &next));
        assert_eq!(next.ended(), None);
    }

    #[tokio::test]
    async fn ending_reports_the_requests_in_flight_once() {
        let registry = Arc::new(Registry::default());
        let (digest, id) = (KeyDigest::of("a"), KeyId::new("key_a"));
        let life = registry.life(&digest, &id, i64::MAX);
        life.enter();
        life.enter();
        life.enter();
        life.leave();
        assert_eq!(life.in_flight_at_end(), 0, "nothing while it lives");
        let lives = [life.clone()];
        assert_eq!(in_flight_ended(&lives), 0, "a live key ended nothing");
        registry.end(&digest, ExpiredReason::Revoked);
        assert_eq!(life.in_flight_at_end(), 2);
        assert_eq!(in_flight_ended(&lives), 2);
        // Only the call that ended it records them: a later end changes nothing.
        life.enter();
        life.end(ExpiredReason::Expired);
        assert_eq!(life.in_flight_at_end(), 2);
        registry.end(&KeyDigest::of("unknown"), ExpiredReason::Revoked);
        life.leave();
        life.leave();
        assert_eq!(life.in_flight_at_end(), 2, "what was in flight then");
    }

    #[tokio::test]
    async fn expiry_ends_the_life_on_time() {
        let registry = Arc::new(Registry::default());
        let (digest, id) = (KeyDigest::of("a"), KeyId::new("key_a"));
        let at = now_unix_nanos() + 50_000_000;
        let life = registry.life(&digest, &id, at);
        assert_eq!(life.ended(), None);
        let error = KeyEnded::new(Some(&life)).await;
        assert!(matches!(
            error,
            AuthError::ExpiredKey(ExpiredReason::Expired)
        ));
        assert!(
            now_unix_nanos() >= at - 5_000_000,
            "never before the expiry (one coarse tick)"
        );
        // The past is ended at once.
        let past = Registry::ended(&digest, &id, ExpiredReason::Expired);
        assert_eq!(past.ended(), Some(ExpiredReason::Expired));
    }
}
