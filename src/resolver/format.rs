//! The resolver's key format, swappable: the layer checks every presented key against
//! [`CachedResolver::format`] (one `ArcSwap` load on the hot path), and a format loaded from the
//! key store is rebuilt from the store's current secrets when they change
//! ([`CachedResolver::reload_format`]: key management on this instance, a fleet message on the
//! others).
//!
//! How far the format in use is trusted follows the cache's rules (the resolver's invariant 8):
//!
//! - While the fleet vouches for this instance (or outside a fleet), the format is the one last
//!   loaded: every change reaches it as a sequenced fleet message, applied before it is
//!   acknowledged.
//! - In degraded mode it is trusted for the bound after its store read, as a cached answer is:
//!   past that, no key is admitted from the cache until the format has been read again (one read
//!   for every waiting request). A re-read that finds the format changed refuses the request it
//!   served (503: its key was checked against the earlier format); the next one is checked against
//!   the new format.
//! - When a change is known (a fleet message, key management) but the store cannot be read, the
//!   format is *down*: every key is refused with 503 `AUTH_UNAVAILABLE` (the master key is not a
//!   store key and keeps working), and a background task retries (100 ms doubling to 2 s) until a
//!   reload succeeds. [`serve_stale`](super::CachedResolverBuilder::serve_stale) does not lift
//!   this.
//!
//! A format not loaded from a store (the public checksum, or keyed secrets given in code only) has
//! nothing to reload and is always trusted: the single-instance hot path pays the `ArcSwap` load
//! and nothing else.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::{CachedResolver, Inner};
use crate::clock::now_unix_nanos;
use crate::key::KeyFormat;
use crate::store::{FormatLoadError, StoreError, StoreErrorKind};

/// The format a resolver checks keys against, as loaded now ([`CachedResolver::format`]).
/// Dereferences to the [`KeyFormat`]. Hold it briefly (for one request, not across a reload you
/// wait for): a later change is not seen through it.
pub struct CurrentFormat(arc_swap::Guard<Arc<KeyFormat>>);

impl Deref for CurrentFormat {
    type Target = KeyFormat;

    #[inline]
    fn deref(&self) -> &KeyFormat {
        &self.0
    }
}

impl fmt::Debug for CurrentFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// The resolver's format and how fresh it is.
pub(super) struct FormatSlot {
    current: ArcSwap<KeyFormat>,
    /// When the store read that gave the format in use started (Unix nanoseconds): `i64::MAX` for
    /// a format not loaded from a store (nothing to reload: always current), `i64::MIN` while it is
    /// down.
    read_at: AtomicI64,
    /// Moved by every swap: a request whose lookup a swap overtook is not answered.
    generation: AtomicU64,
    /// A known change could not be loaded: every key is refused until a reload succeeds (the
    /// resolver counts as degraded meanwhile, which sends every request down the checked path).
    down: AtomicBool,
    /// One reload at a time; requests waiting for a refresh share it.
    reloading: tokio::sync::Mutex<()>,
}

impl FormatSlot {
    pub(super) fn new(format: KeyFormat) -> Self {
        let read_at = if format.is_loaded_from_store() {
            now_unix_nanos()
        } else {
            i64::MAX
        };
        Self {
            current: ArcSwap::from_pointee(format),
            read_at: AtomicI64::new(read_at),
            generation: AtomicU64::new(0),
            down: AtomicBool::new(false),
            reloading: tokio::sync::Mutex::const_new(()),
        }
    }

    /// Whether the format was read from the store after `floor` (always, for one that was not
    /// loaded from a store; never while down).
    #[inline]
    pub(super) fn trusted_after(&self, floor: i64) -> bool {
        self.read_at.load(Ordering::Acquire) > floor
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

/// Why a request was not answered: the format changed while its key was being looked up (its key
/// was checked against the earlier one).
#[derive(Debug, thiserror::Error)]
#[error("the key format changed while this key was checked; not answered")]
pub(super) struct FormatChanged;

/// Why a request was not answered: a change of the key format is known but could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("the key format's secrets changed and could not be reloaded from the store")]
pub(super) struct FormatDown;

/// Delays between background reloads of a format that is down.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl CachedResolver {
    /// The key format this resolver accepts now. Swapped when the store's secrets change (see
    /// [`reload_format`](Self::reload_format)); one atomic load.
    #[inline]
    pub fn format(&self) -> CurrentFormat {
        CurrentFormat(self.inner.format.current.load())
    }

    /// Rebuilds the key format from the store's current secrets, with the settings it was built
    /// with ([`KeyFormat::reload_from`]), and swaps it in: keys are checked against the new format
    /// as soon as this returns. `Ok(true)` if it changed, `Ok(false)` if not, or if the format was
    /// not loaded from a store (nothing to reload).
    ///
    /// Called for you: by [`KeyManager`](crate::manage::KeyManager)'s format operations on its own
    /// instance, and by a fleet subscription ([`crate::invalidate`]) when another instance changed
    /// the secrets, or when it cannot know whether it missed a change (its first connection, a
    /// revocation log that no longer reaches back). Call it from an invalidator of your own.
    ///
    /// The store read is given the resolver's lookup timeout, at most half the freshness bound
    /// ([`degraded_time_to_live`](super::CachedResolverBuilder::degraded_time_to_live)).
    ///
    /// **When it fails** (the store cannot be read, or the store's secrets no longer make a format
    /// with this resolver's settings, such as a pinned minting version that was retired), the
    /// resolver fails closed: the format may have lost a secret, so every key is refused with 503
    /// `AUTH_UNAVAILABLE` until a reload succeeds, which it retries by itself in the background.
    pub async fn reload_format(&self) -> Result<bool, FormatLoadError> {
        self.reload(true).await
    }

    /// One reload. `known_change`: a change is known to have happened, so a failure takes the
    /// format down; otherwise (a refresh for its age) a failure changes nothing.
    async fn reload(&self, known_change: bool) -> Result<bool, FormatLoadError> {
        let inner = &*self.inner;
        let slot = &inner.format;
        let _one = slot.reloading.lock().await;
        let current = slot.current.load_full();
        let read_at = now_unix_nanos();
        // Within half the freshness bound: a fleet subscription acknowledges after the reload (or
        // its failure), and the acknowledgement is awaited for one bound.
        let patience = inner
            .lookup_timeout
            .min(self.bound() / 2)
            .max(Duration::from_millis(100));
        let loaded = tokio::time::timeout(patience, current.reload_from(&*inner.store))
            .await
            .unwrap_or_else(|_| Err(StoreError::from_kind(StoreErrorKind::Timeout).into()));
        match loaded {
            Ok(None) => Ok(false),
            Ok(Some(format)) => {
                let changed = format != *current;
                if changed {
                    slot.current.store(Arc::new(format));
                    slot.generation.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(
                        versions = ?slot.current.load().accepted_versions(),
                        "API key format reloaded: its secrets changed"
                    );
                }
                slot.read_at.store(read_at, Ordering::Release);
                if slot.down.swap(false, Ordering::AcqRel) {
                    let _last = inner.degraded.fetch_sub(1, Ordering::AcqRel) == 1;
                    #[cfg(feature = "metrics")]
                    if _last {
                        ::metrics::gauge!(crate::metrics::CACHE_DEGRADED).set(0.0);
                    }
                    self.retire_front();
                    tracing::info!("API key format reloaded: keys are admitted again");
                }
                Ok(changed)
            }
            Err(error) => {
                if known_change && !slot.down.swap(true, Ordering::AcqRel) {
                    slot.read_at.store(i64::MIN, Ordering::Release);
                    let _first = inner.degraded.fetch_add(1, Ordering::AcqRel) == 0;
                    #[cfg(feature = "metrics")]
                    if _first {
                        ::metrics::gauge!(crate::metrics::CACHE_DEGRADED).set(1.0);
                    }
                    tracing::warn!(
                        %error,
                        "the API key format's secrets changed and could not be reloaded: every key \
                         is refused (503) until a reload succeeds; retrying"
                    );
                    retry(Arc::downgrade(&self.inner));
                }
                Err(error)
            }
        }
    }

    /// In degraded mode, the format is older than the bound (or down): reads it again before a key
    /// checked against it is admitted. `Err` when the store cannot be read (or the format is down),
    /// or when it changed (the request's key was checked against the earlier one).
    pub(super) async fn refresh_format(&self) -> Result<(), StoreError> {
        let generation = self.inner.format.generation();
        {
            // Another request may have refreshed it while this one waited.
            let _one = self.inner.format.reloading.lock().await;
            let now = now_unix_nanos();
            if self.inner.floor(now) != i64::MAX {
                return self.unchanged_since(generation);
            }
        }
        match self.reload(false).await {
            Ok(_) => self.unchanged_since(generation),
            Err(FormatLoadError::Store(error)) if !self.inner.format.is_down() => Err(error),
            Err(_) => Err(StoreError::new(StoreErrorKind::Unavailable, FormatDown)),
        }
    }

    /// `Err` (503) if the format was swapped since `generation`.
    pub(super) fn unchanged_since(&self, generation: u64) -> Result<(), StoreError> {
        if self.inner.format.generation() == generation {
            Ok(())
        } else {
            Err(StoreError::new(StoreErrorKind::Unavailable, FormatChanged))
        }
    }
}

/// Retries the reload of a format that is down until it succeeds (or the resolver is gone).
fn retry(inner: Weak<Inner>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("the API key format is down outside a tokio runtime: not retried");
        return;
    };
    runtime.spawn(async move {
        let mut delay = RETRY_FIRST;
        loop {
            tokio::time::sleep(delay).await;
            let Some(inner) = inner.upgrade() else { return };
            let resolver = CachedResolver { inner };
            if !resolver.inner.format.is_down() || resolver.reload(false).await.is_ok() {
                return;
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    });
}

#[cfg(test)]
mod tests;
