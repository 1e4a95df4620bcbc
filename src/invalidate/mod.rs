//! Telling every instance of a service that a key changed.
//!
//! Key management calls [`Invalidator::publish`] after every revoke, delete and rotation; the local
//! [`CachedResolver`] is invalidated directly before that. Broadcasting implementations deliver the
//! [`Invalidation`] to every other instance, whose subscriber calls [`Invalidation::apply`] on its own
//! resolver; a subscriber that lost its connection clears its whole cache once reconnected, since it
//! may have missed messages.
//!
//! Without a broadcaster ([`NoBroadcast`]), other instances keep a revoked key for at most the
//! resolver's TTL.

mod fleet;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::time::Duration;

use crate::key::{KeyDigest, KeyId};
use crate::resolver::CachedResolver;
use crate::store::StoreError;

#[cfg(any(feature = "postgres", feature = "redis"))]
mod subscription;

#[cfg(feature = "postgres")]
pub use self::postgres::PgInvalidator;
#[cfg(feature = "redis")]
pub use self::redis::RedisInvalidator;
#[cfg(any(feature = "postgres", feature = "redis"))]
pub use self::subscription::{Subscription, SubscriptionStatus};
pub use self::fleet::{
    ACKNOWLEDGED_HEADER, ACKNOWLEDGEMENT_SECONDS, APPLIED_SEQUENCE, ELAPSED_HEADER,
    FLEET_INSTANCES, INSTANCES_HEADER, LAGGARDS_TOTAL, OLDEST_UNACKNOWLEDGED_SECONDS, Receipt,
    SEQUENCE_HEADER, Sequenced,
};
pub(crate) use self::fleet::report;

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

    /// [`apply`](Self::apply) for key management on its own instance: the cache only; the caller
    /// then [settles](CachedResolver::settle) the requests in flight before it returns.
    pub(crate) fn forget(&self, resolver: &CachedResolver) {
        if self.digests.is_empty() {
            resolver.invalidate_key(&self.key_id);
        }
        for digest in &self.digests {
            resolver.forget_digest(digest);
        }
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
        }
    }
}

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
