//! [`UsageRecorder`]: `last_used_at` and per-key usage counts without a database write per request.
//!
//! Each authenticated request marks its key as used in memory (two relaxed atomic reads on the hot
//! path, a write at most once per second per key), and its outcome is counted when its response
//! head is ready: admitted, or refused by reason ([`Outcome`]: missing scope, rate limited, out of
//! credits, network, expired or revoked, as the typed [`AuthError`](crate::error::AuthError) in the
//! response says), one relaxed atomic add. The address the key was last used from is read at most
//! once per second per key. A background task flushes the marks to the store in one
//! [`KeyStore::record_last_used`] batch and one [`KeyStore::record_usage`] batch per interval: at
//! most one write per key per interval, however busy the key. Counts are kept per key and hour
//! ([`UsageBucket`]); a flush files what it takes under the hour of the key's latest use, so at an
//! hour boundary up to one interval's counts land in the later hour. Call
//! [`UsageRecorder::flush`] on shutdown so the last interval is not lost.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::{sync::Arc, time::Duration};
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//! use tower_api_keys::usage::UsageRecorder;
//!
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let usage = UsageRecorder::spawn(store, Duration::from_secs(30));
//! let layer = ApiKeyLayer::new(resolver).usage(usage.clone());
//! // ... serve, then on shutdown:
//! usage.flush().await.unwrap();
//! # drop(layer);
//! # }
//! ```

pub use crate::store::usage::{OUTCOMES, Outcome, UsageBucket, hour_of};

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use time::OffsetDateTime;

use crate::key::KeyId;
use crate::store::{KeyStore, StoreError, StoreErrorKind};

/// The usage state of one cached key: the latest use not yet flushed, and whether the key waits in
/// a recorder's queue. The resolver keeps one inside each cached key (so marking a use is two
/// relaxed atomic reads, no lookup); only this module reads or changes it.
#[derive(Debug, Default)]
pub(crate) struct UsageMark {
    /// Unix seconds of the latest use not yet flushed (0 = none).
    last_used: AtomicI64,
    /// Whether the key is queued for the next flush.
    queued: AtomicBool,
    /// Requests per [`Outcome`] not yet flushed.
    counts: [AtomicU64; OUTCOMES],
    /// Unix seconds when the address was last read, and that address.
    ip_read: AtomicI64,
    last_ip: Mutex<Option<IpAddr>>,
}

impl UsageMark {
    /// Whether the address is due to be read at `seconds` (at most once a second); claims it.
    pub(crate) fn ip_due(&self, seconds: i64) -> bool {
        self.ip_read.load(Ordering::Relaxed) < seconds
            && self.ip_read.swap(seconds, Ordering::Relaxed) < seconds
    }

    /// Records the address a request came from.
    pub(crate) fn set_ip(&self, ip: IpAddr) {
        *self.last_ip.lock().unwrap_or_else(|p| p.into_inner()) = Some(ip);
    }
}

/// Something whose use can be recorded: a cached key (see `resolver::ResolvedKey`).
pub(crate) trait Used: Send + Sync + 'static {
    /// The key's usage state.
    fn usage(&self) -> &UsageMark;
    /// The key it belongs to.
    fn key_id(&self) -> &KeyId;
}

/// Records key use in memory and flushes it to the store in batches. Cheap to clone.
#[derive(Clone)]
pub struct UsageRecorder {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    pending: Mutex<Vec<Arc<dyn Used>>>,
    flush_lock: tokio::sync::Mutex<()>,
    batches: AtomicU64,
    rows: AtomicU64,
    usage_rows: AtomicU64,
}

impl fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageRecorder")
            .field("batches_written", &self.batches_written())
            .field("rows_written", &self.rows_written())
            .finish_non_exhaustive()
    }
}

impl UsageRecorder {
    /// A recorder that writes to `store` only when [`flush`](Self::flush) is called.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                pending: Mutex::default(),
                flush_lock: tokio::sync::Mutex::new(()),
                batches: AtomicU64::new(0),
                rows: AtomicU64::new(0),
                usage_rows: AtomicU64::new(0),
            }),
        }
    }

    /// A recorder with a background task (on the current tokio runtime) that flushes every
    /// `interval`. The task ends when the last clone of the recorder is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(store: Arc<dyn KeyStore>, interval: Duration) -> Self {
        let recorder = Self::new(store);
        let weak: Weak<Inner> = Arc::downgrade(&recorder.inner);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if let Err(error) = (UsageRecorder { inner }).flush().await {
                    tracing::warn!(%error, "flushing API key usage failed; will retry");
                }
            }
        });
        recorder
    }

    /// Marks a key as used at `seconds` (Unix time). The hot path: no lock unless the key is not
    /// yet queued.
    pub(crate) fn touch<K: Used>(&self, key: &Arc<K>, seconds: i64) {
        let mark = key.usage();
        if mark.last_used.load(Ordering::Relaxed) < seconds {
            mark.last_used.fetch_max(seconds, Ordering::Relaxed);
        }
        self.queue(key);
    }

    /// Puts the key in the next flush unless it is there.
    fn queue<K: Used>(&self, key: &Arc<K>) {
        let mark = key.usage();
        if !mark.queued.load(Ordering::Relaxed) && !mark.queued.swap(true, Ordering::AcqRel) {
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(key.clone());
        }
    }

    /// Counts one request of the key with `outcome`: one relaxed add (and a queueing if a flush
    /// ran since the key's last use).
    pub(crate) fn count<K: Used>(&self, key: &Arc<K>, outcome: Outcome) {
        key.usage().counts[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.queue(key);
    }

    /// Writes every pending use in one batch; returns how many keys were written. A failed write
    /// puts the uses back for the next flush.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.inner.flush_lock.lock().await;
        let taken =
            std::mem::take(&mut *self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if taken.is_empty() {
            return Ok(0);
        }
        let mut latest: HashMap<KeyId, i64> = HashMap::with_capacity(taken.len());
        let mut buckets: HashMap<KeyId, UsageBucket> = HashMap::new();
        let now = OffsetDateTime::now_utc();
        for key in &taken {
            let mark = key.usage();
            mark.queued.store(false, Ordering::Release);
            let seconds = mark.last_used.load(Ordering::Relaxed);
            let slot = latest.entry(key.key_id().clone()).or_default();
            *slot = (*slot).max(seconds);
            let counts = mark.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
            if counts.iter().all(|&c| c == 0) {
                continue;
            }
            let hour = hour_of(OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(now));
            let bucket = UsageBucket {
                key_id: key.key_id().clone(),
                hour,
                counts,
                last_ip: *mark.last_ip.lock().unwrap_or_else(|p| p.into_inner()),
            };
            match buckets.get_mut(key.key_id()) {
                Some(b) => b.merge(&bucket),
                None => {
                    buckets.insert(key.key_id().clone(), bucket);
                }
            }
        }
        let buckets: Vec<UsageBucket> = buckets.into_values().collect();
        let written = match buckets.is_empty() {
            true => Ok(()),
            false => self.inner.store.record_usage(&buckets).await,
        };
        let written = match written {
            // A store that keeps no usage counts: they are dropped, `last_used_at` still written.
            Err(error) if error.kind() == StoreErrorKind::Unsupported => Ok(()),
            other => other,
        };
        if let Err(error) = written {
            // Put the counts back (added to whatever came since) and keep the keys queued.
            for key in &taken {
                if let Some(b) = buckets.iter().find(|b| &b.key_id == key.key_id()) {
                    for (mark, n) in key.usage().counts.iter().zip(b.counts) {
                        mark.fetch_add(n, Ordering::Relaxed);
                    }
                }
                if !key.usage().queued.swap(true, Ordering::AcqRel) {
                    self.inner
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(key.clone());
                }
            }
            return Err(error);
        }
        self.inner
            .usage_rows
            .fetch_add(buckets.len() as u64, Ordering::Relaxed);
        let batch: Vec<(KeyId, OffsetDateTime)> = latest
            .into_iter()
            .filter_map(|(id, s)| OffsetDateTime::from_unix_timestamp(s).ok().map(|t| (id, t)))
            .collect();
        match self.inner.store.record_last_used(&batch).await {
            Ok(()) => {
                self.inner.batches.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .rows
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            Err(error) => {
                for key in taken {
                    if !key.usage().queued.swap(true, Ordering::AcqRel) {
                        self.inner
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(key);
                    }
                }
                Err(error)
            }
        }
    }

    /// Batches written so far.
    pub fn batches_written(&self) -> u64 {
        self.inner.batches.load(Ordering::Relaxed)
    }

    /// Key rows written so far (one per key per batch).
    pub fn rows_written(&self) -> u64 {
        self.inner.rows.load(Ordering::Relaxed)
    }

    /// Usage-count rows written so far (at most one per key per batch).
    pub fn usage_rows_written(&self) -> u64 {
        self.inner.usage_rows.load(Ordering::Relaxed)
    }
}
