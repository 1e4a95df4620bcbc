//! A small per-thread front for the moka cache: the hot path of a cached key without moka's
//! per-read bookkeeping (its clock read, read recording in the frequency sketch and expiry checks),
//! which is most of what a moka hit costs. Kept because `benches/hot_path.rs` measures the layer
//! with and without it in one run (BENCHMARKS.md, *Hot path*).
//!
//! Each thread holds a direct-mapped table of [`SLOTS`] recently admitted keys. A slot answers only
//! while all of these hold, so it never knows more than the cache behind it:
//!
//! - it belongs to the same resolver (by a process-unique id, never an address that could be reused);
//! - the resolver's invalidation epoch has not moved since the slot was filled from the cache (every
//!   invalidation moves the epoch again after it has removed the entries from the cache, so a slot
//!   filled from a stale entry is already outdated when it is first read);
//! - the caller's check passes: the key's cache lifetime (`ttl` from when the store was read) has not
//!   run out, and in degraded mode the read is recent enough (see the resolver's invariants);
//! - it has answered fewer than [`HITS_PER_FILL`] times: then it is refilled from the cache, which
//!   keeps moka's frequency counts (its eviction policy) and expiry in charge of hot keys too. The
//!   budget is 256 (about 1 ns per request of moka reads): a key served only by fronts must still
//!   look used to moka's TinyLFU, or a flood of one-off digests would take its place.
//!
//! Slots are found by the key's **hint**: its last 8 bytes as presented (a keyed key's HMAC tag, a
//! public key's checksum and the end of its random body: spread evenly, and no secret beyond what
//! the digest stands for). The hint is known before the digest is computed, so the layer can tell
//! at once whether this thread has admitted the key lately ([`knows`]): a keyed key it does not know
//! has its tag checked before anything else (a made-up key costs what the tag costs), one it knows
//! has its digest compared instead (a hit needs no tag: the slot's key passed it when it went in).
//!
//! Only known keys enter the front; unknown digests (a hostile flood) stay in the cache. Collisions
//! only cost a moka read. A thread keeps at most [`SLOTS`] entries alive after they left the cache,
//! until overwritten or the thread ends.

use std::cell::RefCell;
use std::sync::Arc;

use super::ResolvedKey;
use crate::key::KeyDigest;

/// Slots per thread (a power of two).
pub(super) const SLOTS: usize = 128;
/// Answers a slot gives before it is refilled from the cache.
pub(super) const HITS_PER_FILL: u32 = 256;

struct Slot {
    resolver: u64,
    epoch: u64,
    hint: u64,
    digest: KeyDigest,
    key: Arc<ResolvedKey>,
    hits_left: u32,
}

impl Slot {
    /// Whether the slot may answer for a key with `hint` at `epoch` of `resolver` (its digest
    /// still to compare).
    #[inline]
    fn current(&self, resolver: u64, epoch: u64, hint: u64) -> bool {
        self.resolver == resolver && self.epoch == epoch && self.hits_left > 0 && self.hint == hint
    }
}

thread_local! {
    static FRONT: RefCell<[Option<Slot>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// The hint of a presented key: its last 8 bytes (fewer: zero-padded), read as one number.
#[inline]
pub(crate) fn hint(presented: &[u8]) -> u64 {
    let tail = &presented[presented.len().saturating_sub(8)..];
    let mut bytes = [0u8; 8];
    bytes[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(bytes)
}

#[inline]
fn index(hint: u64) -> usize {
    // Fibonacci hashing: every byte of the hint moves the slot. A caller who grinds keys into one
    // slot only makes their own requests read the cache.
    (hint.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as usize & (SLOTS - 1)
}

/// Whether this thread's front holds a current entry with this hint (the digest not compared).
#[inline]
pub(super) fn knows(resolver: u64, epoch: u64, hint: u64) -> bool {
    FRONT
        .try_with(|front| {
            front.try_borrow().ok().is_some_and(|front| {
                front[index(hint)]
                    .as_ref()
                    .is_some_and(|slot| slot.current(resolver, epoch, hint))
            })
        })
        .unwrap_or(false)
}

/// Calls `f` with this thread's front entry for `digest` (found by `hint`) if it is current; a
/// slot counts as used only when `f` answers (`Some`).
pub(super) fn with<R>(
    resolver: u64,
    epoch: u64,
    hint: u64,
    digest: &KeyDigest,
    f: impl FnOnce(&Arc<ResolvedKey>) -> Option<R>,
) -> Option<R> {
    FRONT
        .try_with(|front| {
            let mut front = front.try_borrow_mut().ok()?;
            let slot = front[index(hint)].as_mut()?;
            if !slot.current(resolver, epoch, hint) || slot.digest != *digest {
                return None;
            }
            let answer = f(&slot.key)?;
            slot.hits_left -= 1;
            Some(answer)
        })
        .ok()
        .flatten()
}

/// Puts a key just read from the cache (at `epoch`, read before the cache was) in this thread's front.
pub(super) fn fill(
    resolver: u64,
    epoch: u64,
    hint: u64,
    digest: &KeyDigest,
    key: &Arc<ResolvedKey>,
) {
    let _ = FRONT.try_with(|front| {
        if let Ok(mut front) = front.try_borrow_mut() {
            front[index(hint)] = Some(Slot {
                resolver,
                epoch,
                hint,
                digest: *digest,
                key: key.clone(),
                hits_left: HITS_PER_FILL,
            });
        }
    });
}
