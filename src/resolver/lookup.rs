//! The bookkeeping of store lookups: one shared lookup per digest in flight, why a request was not
//! answered (overtaken by invalidations, or shed at the bound), and a waiting place in the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::future::{BoxFuture, Shared};

use super::entry::CacheEntry;
use crate::store::StoreError;

pub(super) type Lookup = Shared<BoxFuture<'static, Result<CacheEntry, StoreError>>>;

/// A lookup in flight: the epoch it started in, the shared future, and whether an invalidation
/// naming its digest (or every digest) has overtaken it since: then its answer may predate the
/// change, and no waiter uses it.
pub(super) struct InFlight {
    pub(super) epoch: u64,
    pub(super) lookup: Lookup,
    pub(super) overtaken: Arc<AtomicBool>,
}

/// How many times a request asks again when invalidations of its digest keep overtaking its lookup,
/// before it is answered 503 (fail closed).
pub(super) const OVERTAKEN_RETRIES: u32 = 4;

/// Why a request was not answered: its digest was invalidated during every lookup it waited for.
#[derive(Debug, thiserror::Error)]
#[error("the key changed during every lookup; not answered")]
pub(super) struct Overtaken;

/// Why a lookup was not sent to the store: the bound on lookups in flight and queued was reached.
#[derive(Debug, thiserror::Error)]
#[error("too many key lookups in flight; this one was shed")]
pub(super) struct LookupShed;

pub(super) fn is_shed(error: &StoreError) -> bool {
    std::error::Error::source(error).is_some_and(|source| source.is::<LookupShed>())
}

/// Takes a waiting place; gives it back when dropped (also when the lookup is cancelled).
pub(super) struct QueuePlace<'a>(pub(super) &'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
