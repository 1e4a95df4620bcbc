//! Endpoints, secrets, deliveries and the Standard Webhooks message: what the store keeps and
//! what goes on the wire.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::audit::EventType;
use crate::key::KeyId;

/// The event types an endpoint may subscribe to: every key event.
pub const EVENT_TYPES: [EventType; 8] = [
    EventType::KEY_CREATED,
    EventType::KEY_ROTATED,
    EventType::KEY_REVOKED,
    EventType::KEY_DELETED,
    EventType::KEY_UPDATED,
    EventType::KEY_LEAKED,
    EventType::KEY_EXPIRING,
    EventType::KEY_IDLE,
];

/// The prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a signing secret (the spec asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// An endpoint's signing secret: `whsec_` and the base64 of 32 random bytes, the HMAC-SHA256 key.
/// Zeroed on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSecret(Zeroizing<Vec<u8>>);

impl WebhookSecret {
    /// A new secret from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new(vec![0u8; SECRET_BYTES]);
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        Self(bytes)
    }

    /// A secret from its `whsec_...` form; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let encoded = text.strip_prefix(SECRET_PREFIX)?;
        let bytes = Zeroizing::new(STANDARD.decode(encoded).ok()?);
        (bytes.len() >= 24 && bytes.len() <= 64).then(|| Self(bytes))
    }

    /// The `whsec_...` form: what the receiver configures. Shown once, at registration and
    /// rotation.
    pub fn expose_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{SECRET_PREFIX}{}", STANDARD.encode(&*self.0)))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`: the `webhook-signature` value.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Whether `signature` (a `webhook-signature` header: space-separated `v1,...` entries) holds
    /// a valid signature of the message, compared in constant time.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.sign(id, timestamp, body);
        signature
            .split(' ')
            .any(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// A registered endpoint, as listed: never its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// `whk_` and a time-ordered id.
    pub id: String,
    /// The owner whose key events it receives.
    pub owner: String,
    /// Where deliveries go.
    pub url: String,
    /// The event types it receives.
    pub events: Vec<EventType>,
    /// The scoped key that registered it (`None`: the master key). It receives only events about
    /// that key's subtree, and only while that key is active.
    pub registered_by: Option<KeyId>,
    /// When it was registered.
    pub created_at: OffsetDateTime,
}

impl Webhook {
    /// The endpoint as the management API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "owner": self.owner,
            "url": self.url,
            "events": self.events,
            "created_at": crate::audit::timestamp(Some(self.created_at)),
        })
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not delivered yet; another attempt is due at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: the retry horizon passed, or the endpoint can no longer receive it.
    Failed,
}

impl DeliveryStatus {
    /// `pending`, `delivered` or `failed`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One message to one endpoint, and what became of it: the delivery log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message id (`msg_...`): the `webhook-id` header, the same on every attempt.
    pub id: String,
    /// The endpoint.
    pub webhook_id: String,
    /// The event type.
    pub event_type: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The HTTP status of the last attempt, if it got one.
    pub last_status: Option<u16>,
    /// Why the last attempt failed (never a secret).
    pub last_error: Option<String>,
    /// When the last attempt was made.
    pub last_attempt_at: Option<OffsetDateTime>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<OffsetDateTime>,
    /// When it was delivered.
    pub delivered_at: Option<OffsetDateTime>,
    /// When the event was written (with the change).
    pub created_at: OffsetDateTime,
}

impl Delivery {
    /// The delivery as the management API shows it.
    pub fn to_json(&self) -> Value {
        use crate::audit::timestamp;
        json!({
            "id": self.id,
            "event_type": self.event_type,
            "status": self.status.as_str(),
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_attempt_at": timestamp(self.last_attempt_at),
            "next_attempt_at": timestamp(self.next_attempt_at),
            "delivered_at": timestamp(self.delivered_at),
            "created_at": timestamp(Some(self.created_at)),
        })
    }
}

/// A delivery claimed by a deliverer: the message and where it goes.
pub struct Claimed {
    /// The message id (`webhook-id`).
    pub id: String,
    /// The endpoint.
    pub webhook_id: String,
    /// Where it goes.
    pub url: String,
    /// The endpoint's current secret.
    pub secret: WebhookSecret,
    /// The body, as written with the change (the same bytes on every attempt).
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the event was written.
    pub created_at: OffsetDateTime,
    /// Whether the scoped key that registered the endpoint is no longer active (revoked, expired
    /// or deleted): the delivery is then failed, not sent.
    pub registrar_ended: bool,
}

impl fmt::Debug for Claimed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("webhook_id", &self.webhook_id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to, as the store records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// The new status.
    pub status: DeliveryStatus,
    /// The HTTP status, if the receiver answered.
    pub http_status: Option<u16>,
    /// Why it failed.
    pub error: Option<String>,
    /// When the attempt was made.
    pub at: OffsetDateTime,
    /// When to try again (pending only).
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// A new id: `prefix` and 26 Crockford base-32 characters, in time order (`whk_` for an endpoint,
/// `dlv_` for a deliverer's lease token).
pub(crate) fn new_id(prefix: &str) -> String {
    let id = KeyId::generate();
    format!("{prefix}{}", &id.as_str()["key_".len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_hide() {
        let secret = WebhookSecret::generate();
        let text = secret.expose_secret();
        assert!(text.starts_with("whsec_"));
        let again = WebhookSecret::parse(&text).unwrap();
        assert_eq!(
            again.sign("msg_1", 1, b"{}"),
            secret.sign("msg_1", 1, b"{}")
        );
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)");
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_none());
        assert!(WebhookSecret::parse("sk_nope").is_none());
    }

    #[test]
    fn signatures_reproduce_the_published_test_vector() {
        // The Standard Webhooks test vector (the reference libraries' tests).
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        let signature = secret.sign(id, ts, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(secret.verify(id, ts, body, &format!("v1,bm9wZQ== {signature}")));
        assert!(!secret.verify(id, ts + 1, body, &signature));
    }
}
