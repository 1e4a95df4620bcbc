//! Telling every instance of a service that a key changed, and knowing that they all heard.
//!
//! Key management calls [`Invalidator::publish_sequenced`] after every revoke, delete and rotation
//! (and the other changes that end a key), and [`Invalidator::publish_format_change`] after a
//! change of the keyed format's secrets; the local [`CachedResolver`] is invalidated (or its format
//! swapped) directly before that. Broadcasting implementations ([`PostgresInvalidator`], [`RedisInvalidator`]) deliver the
//! [`Invalidation`] to every other instance, whose subscriber calls [`Invalidation::apply`] on its
//! own resolver.
//!
//! Without a broadcaster ([`NoBroadcast`]), other instances keep a revoked key for at most the
//! resolver's TTL; a single instance needs nothing, and its hot path pays nothing for any of this.
//!
//! # Revocation with a receipt
//!
//! With a broadcaster, the instances form a fleet (each instance is one resolver with its
//! subscription):
//!
//! - **A roster.** Each subscription beats (default every 250 ms, `heartbeat`): it writes its id,
//!   start time and last applied sequence number to the roster (a table in PostgreSQL; in Redis a
//!   sorted set of last beats and a hash of start times, the applied sequence travelling in the
//!   heartbeat) and sends a heartbeat on the fleet channel (the channel's name + `_fleet`). An
//!   instance that has not beaten for `roster_ttl` (default 3 s) is no longer live. Ids default to
//!   `<pid>-<random>`; name them with `instance_name` (unique per instance).
//! - **Sequenced invalidations.** Publishing takes the next sequence number from the shared store
//!   and appends the invalidation to the channel's revocation log in the same step, in commit order
//!   (PostgreSQL: one transaction under an advisory lock; Redis: one script). A subscriber that
//!   sees a gap (a sequence number it skipped, or a heartbeat reporting a later head) or that
//!   reconnects catches up from the log; it clears its cache only when the log no longer reaches
//!   back (kept 10 minutes in PostgreSQL, the last 10,000 in Redis). Each applied invalidation is
//!   acknowledged on the fleet channel, after the instance ended the requests in flight under its
//!   keys (those the store says ended: one store read per key with requests in flight, given half
//!   the bound), with how many there were.
//! - **Acknowledged revocation.** [`KeyManager`](crate::manage::KeyManager) waits, after
//!   publishing, until every instance that was live when it published has acknowledged, up to a
//!   deadline (default the freshness bound, 1 s;
//!   [`acknowledgement_deadline`](crate::manage::KeyManager::acknowledgement_deadline)), and gets a
//!   [`Receipt`]: how many acknowledged, which did not (the laggards, logged at `warn` and counted
//!   in [`LAGGARDS_TOTAL`](crate::metrics::LAGGARDS_TOTAL)), how long it took, and how many requests
//!   in flight under the key and its subtree each instance ended
//!   ([`Receipt::requests_ended`]). `DELETE /api-keys/{id}` still answers 204 with no
//!   body, and says it in headers: [`ACKNOWLEDGED_HEADER`] (`Revocation-Acknowledged: 3`),
//!   [`INSTANCES_HEADER`] (`Revocation-Instances: 3`), [`ELAPSED_HEADER`]
//!   (`Revocation-Elapsed-Ms: 2.417`), [`SEQUENCE_HEADER`] and [`REQUESTS_ENDED_HEADER`]
//!   (`Revocation-Requests-Ended: 2`, the total; also without a fleet, for this instance alone);
//!   the first four are absent when nothing could
//!   be acknowledged (the key was already revoked, the broadcast failed, or no subscription of the
//!   invalidator runs on the instance that revoked). The revoke never fails for want of
//!   acknowledgements.
//! - **The freshness bound.** A subscription vouches for its resolver's cache until one bound
//!   (the resolver's [`degraded_time_to_live`](crate::resolver::CachedResolverBuilder::degraded_time_to_live),
//!   default 1 s) after the sending time of the last heartbeat of its own that came back to it:
//!   everything published before that heartbeat was sent has been received and applied by then
//!   (one ordered channel). Past that, the resolver is degraded: cached answers read from the store
//!   more than the bound ago are read again, and if the store cannot answer either, the request gets
//!   503 `AUTH_UNAVAILABLE` (or, with [`serve_stale`](crate::resolver::CachedResolverBuilder::serve_stale),
//!   the stale answer: weaker, documented there). A silent cut (a connection that stops forwarding
//!   without a reset), a paused process and a broadcaster outage are all noticed this way, by the
//!   heartbeats not coming back, not by TCP errors; the connection is given up after twice the
//!   bound (at least 2 s) without them, and everything recovers by itself.
//!
//! What this guarantees, judged as a whole:
//!
//! 1. **Once a revoke has answered with every live instance acknowledged, no instance in that
//!    roster admits the key, not even once**: an instance acknowledges only after
//!    [`Invalidation::apply`] returned, after which neither its cache, nor any thread's per-thread
//!    front, nor a lookup that was in flight (it does not fill the cache, and the requests waiting
//!    for it ask again) answers from what was read before (the resolver's invariants 6 and 12).
//! 2. **Any other instance** (a laggard, one cut off or paused, one not in the roster yet or any
//!    more) admits the key at most until the bound has passed since the revoke answered: it no
//!    longer vouches for answers read before that.
//!
//! `tests/fleet_receipt.rs` (three example servers under load, 0 admissions in 600 probes) and
//! `tests/fleet_receipt_faults.rs` (Redis stopped, a silent cut, SIGSTOP, PostgreSQL restarted)
//! hold these; BENCHMARKS.md ("Revocation with a receipt") has the figures, `scripts/fleet.sh`
//! reruns them.
//!
//! Metrics (feature `metrics`, listed in [`metrics`](crate::metrics)):
//! [`FLEET_INSTANCES`](crate::metrics::FLEET_INSTANCES),
//! [`OLDEST_UNACKNOWLEDGED_SECONDS`](crate::metrics::OLDEST_UNACKNOWLEDGED_SECONDS),
//! [`APPLIED_SEQUENCE`](crate::metrics::APPLIED_SEQUENCE) (label `instance`),
//! [`ACKNOWLEDGEMENT_SECONDS`](crate::metrics::ACKNOWLEDGEMENT_SECONDS) (a histogram),
//! [`LAGGARDS_TOTAL`](crate::metrics::LAGGARDS_TOTAL) (label `instance`).
//!
//! # Key format changes
//!
//! Adding or retiring a keyed-format secret, or changing the legacy setting, goes through the same
//! path ([`KeyManager::add_format_secret`](crate::manage::KeyManager::add_format_secret),
//! [`retire_format_secret`](crate::manage::KeyManager::retire_format_secret),
//! [`set_legacy_keys`](crate::manage::KeyManager::set_legacy_keys); a Rust API, not exposed over
//! HTTP): the manager writes the store, swaps its own resolver's format, publishes a sequenced
//! format change (`{"seq":N,"format":"reload"}`, kept in the revocation log like an invalidation)
//! and waits for the same acknowledgements, returning the same [`Receipt`]. Each instance that
//! receives it, catches up over it from the log, or cannot know whether it missed one (its first
//! connection, a log that no longer reaches back, an unreadable message) rebuilds its format from
//! the store's current secrets ([`CachedResolver::reload_format`], with the settings it was built
//! with) and swaps it in *before* it acknowledges. So:
//!
//! 1. **Once such a change has answered with every live instance acknowledged, no instance in that
//!    roster admits a key tagged by a retired version, not even once, and every one admits keys
//!    tagged by an added one.**
//! 2. **An instance that cannot read the store** when the change reaches it (the reload is given at
//!    most half the bound) fails closed: it acknowledges, refuses every key with 503
//!    `AUTH_UNAVAILABLE` (keys of a version it has not loaded are refused as unknown, 401), and
//!    retries the reload by itself until it succeeds.
//! 3. **Any other instance** trusts its format, in degraded mode, for the bound after it read it,
//!    as it trusts a cached answer: past that it reads the format again before it admits a key
//!    (a request checked against a format that turns out to have changed gets 503). So it stops
//!    admitting a retired version's keys at most the bound after the change answered.
//!
//! A single instance without a broadcaster ([`NoBroadcast`]) swaps its own format at once; other
//! instances sharing its store without a broadcaster keep theirs until they restart. Instances of
//! an earlier version cannot read the format message: they clear their cache and keep their
//! format until they restart. `tests/fleet_format.rs` holds these over LISTEN/NOTIFY and Redis.

#[cfg(any(feature = "postgres", feature = "redis"))]
mod board;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod fleet;
#[cfg(feature = "postgres")]
mod postgres;
mod receipt;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::key::{KeyDigest, KeyId};
use crate::life::Life;
use crate::resolver::CachedResolver;
use crate::store::StoreError;

#[cfg(any(feature = "postgres", feature = "redis"))]
mod member;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod subscription;

#[cfg(feature = "postgres")]
pub use self::postgres::PostgresInvalidator;
pub(crate) use self::receipt::report;
pub use self::receipt::{
    ACKNOWLEDGED_HEADER, ELAPSED_HEADER, INSTANCES_HEADER, REQUESTS_ENDED_HEADER, Receipt,
    SEQUENCE_HEADER, Sequenced,
};
#[cfg(feature = "redis")]
pub use self::redis::RedisInvalidator;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use self::subscription::{Subscription, SubscriptionStatus};

/// A key changed: forget its id and these digests.
#[derive(Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The key that changed.
    pub key_id: KeyId,
    /// Every digest that identified it before the change (current and grace-period secrets).
    pub digests: Vec<KeyDigest>,
}

impl fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidation")
            .field("key_id", &self.key_id)
            .field("digests", &self.digests.len())
            .finish()
    }
}

impl Invalidation {
    /// Applies the change to a resolver's cache: forgets each digest (key management always lists
    /// them all); only an invalidation that names no digest falls back to forgetting by key id.
    /// Requests in flight under those digests are judged again against the store, in the
    /// background, and end if it says their key ended.
    pub fn apply(&self, resolver: &CachedResolver) {
        if self.digests.is_empty() {
            resolver.invalidate_key(&self.key_id);
        }
        for digest in &self.digests {
            resolver.invalidate_digest(digest);
        }
    }

    /// [`apply`](Self::apply) without judging the requests in flight again: the cache only; the
    /// caller [settles](CachedResolver::settle) the returned lives itself (key management before
    /// it returns, a fleet subscription before it acknowledges). The lives of the requests in
    /// flight under the digests are taken *before* the cache forgets them, so that the settle
    /// counts them whoever ends them (the settle, or a new request's re-read).
    #[must_use = "the requests in flight under the keys are settled with these"]
    pub(crate) fn forget(&self, resolver: &CachedResolver) -> Vec<Arc<Life>> {
        let lives = resolver.lives_of(&self.digests);
        if self.digests.is_empty() {
            resolver.invalidate_key(&self.key_id);
        }
        for digest in &self.digests {
            resolver.forget_digest(digest);
        }
        lives
    }

    /// The wire form used by the broadcasters: `{"key_id":"key_…","digests":["<64 hex>",…]}`.
    pub fn to_json(&self) -> String {
        let digests: Vec<String> = self
            .digests
            .iter()
            .map(|d| d.as_bytes().iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        serde_json::json!({ "key_id": self.key_id, "digests": digests }).to_string()
    }

    /// Parses the wire form; `None` if it is not one.
    pub fn from_json(text: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Wire {
            key_id: KeyId,
            digests: Vec<String>,
        }
        let wire: Wire = serde_json::from_str(text).ok()?;
        let digests = wire
            .digests
            .iter()
            .map(|hex| {
                if hex.len() != 64 || !hex.is_ascii() {
                    return None;
                }
                let mut bytes = [0u8; 32];
                for (i, byte) in bytes.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
                }
                Some(KeyDigest::from_bytes(bytes))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            key_id: wire.key_id,
            digests,
        })
    }
}

/// Delivers [`Invalidation`]s to the other instances of a service.
#[async_trait::async_trait]
pub trait Invalidator: Send + Sync + 'static {
    /// Broadcasts one change. An error is logged by the caller; the local cache is already clean.
    async fn publish(&self, invalidation: &Invalidation) -> Result<(), StoreError>;

    /// Broadcasts one change with a sequence number from the fleet's revocation log, and returns
    /// it with the roster of that moment; `None` from an invalidator without a roster (the
    /// default: [`publish`](Self::publish)).
    async fn publish_sequenced(
        &self,
        invalidation: &Invalidation,
    ) -> Result<Option<Sequenced>, StoreError> {
        self.publish(invalidation).await.map(|()| None)
    }

    /// Broadcasts, sequenced like an invalidation, that the keyed format's secrets changed in the
    /// store (a secret added or retired, the legacy setting changed): every instance reloads its
    /// format ([`CachedResolver::reload_format`]) before it acknowledges. `None` from an
    /// invalidator without a roster. The default broadcasts nothing: other instances keep the
    /// format they have until they restart.
    async fn publish_format_change(&self) -> Result<Option<Sequenced>, StoreError> {
        Ok(None)
    }

    /// Waits until every instance of `published.live` has applied `published.sequence`, at most
    /// `deadline` after it was published, and says who did. The default knows nobody's answer:
    /// every instance is a laggard.
    async fn receipt(&self, published: &Sequenced, deadline: Duration) -> Receipt {
        Receipt {
            sequence: Some(published.sequence),
            instances: published.live.len(),
            acknowledged: 0,
            laggards: published.live.clone(),
            elapsed: deadline,
            requests_ended: Default::default(),
        }
    }

    /// The id under which this instance appears in the fleet (what its acknowledgements carry),
    /// for the count of requests it ended itself in a [`Receipt`]. The default is
    /// [`LOCAL_INSTANCE`].
    fn instance(&self) -> String {
        LOCAL_INSTANCE.to_owned()
    }
}

/// The instance id of the revoking instance in a [`Receipt`] when its invalidator knows no fleet
/// id for it ([`Invalidator::instance`]).
pub const LOCAL_INSTANCE: &str = "local";

/// No broadcast: other instances learn of changes when their cache entries expire.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBroadcast;

#[async_trait::async_trait]
impl Invalidator for NoBroadcast {
    async fn publish(&self, _: &Invalidation) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips_and_rejects_garbage() {
        let event = Invalidation {
            key_id: KeyId::new("key_1"),
            digests: vec![KeyDigest::of("a"), KeyDigest::of("b")],
        };
        let text = event.to_json();
        assert_eq!(Invalidation::from_json(&text), Some(event));
        for bad in [
            "",
            "{}",
            r#"{"key_id":"k","digests":["zz"]}"#,
            r#"{"key_id":"k","digests":["é"]}"#,
        ] {
            assert_eq!(Invalidation::from_json(bad), None, "{bad}");
        }
    }
}
