//! Signed webhooks for every key event (feature `webhooks`), from an outbox that is never lost.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_api_keys::manage::{CreateKey, KeyManager};
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::SqliteStore;
//! use tower_api_keys::webhooks::{UrlPolicy, WebhookSecret, Webhooks};
//!
//! let store = Arc::new(SqliteStore::in_memory().await?);
//! // The strict default: https to public addresses only. A receiver on your own network needs
//! // `UrlPolicy::new().allow_private(true)`.
//! let webhooks = Webhooks::new(store.clone()).urls(UrlPolicy::new());
//! // `manage::router(manager)` now serves /api-keys/webhooks too.
//! let manager = KeyManager::new(CachedResolver::new(store.clone()))
//!     .webhooks(webhooks.clone());
//!
//! // An owner's endpoint, for some key events; its secret is shown this once.
//! let master = Principal::master();
//! let endpoint = webhooks
//!     .register(&master, Some("payments"), "https://1.1.1.1/hooks", &["key.created".into(), "key.revoked".into()])
//!     .await?;
//! let secret: String = endpoint.secret.expose_secret().to_string();
//! assert!(secret.starts_with("whsec_"));
//!
//! // Every change writes its deliveries in its own transaction...
//! manager.create(&master, CreateKey::new(["ledgers:read"]).owner("payments")).await?;
//! let log = webhooks.deliveries(&master, &endpoint.webhook.id, None, None, None).await?;
//! assert_eq!(log.deliveries[0].event_type, "key.created");
//!
//! // ...and deliverers (one per instance, or more) send them, signed, with retries.
//! let deliverer = webhooks.deliverer().backoff(Duration::from_secs(5), Duration::from_secs(3600));
//! # drop(deliverer);
//! // In a server: `let task = deliverer.spawn(Duration::from_secs(1));`
//!
//! // The receiver checks `webhook-signature` with the secret (any Standard Webhooks library).
//! let secret = WebhookSecret::parse(&secret).unwrap();
//! let (id, timestamp, body) = ("msg_1", 1_700_000_000, br#"{"type":"key.created"}"#);
//! assert!(secret.verify(id, timestamp, body, &secret.sign(id, timestamp, body)));
//! # Ok(())
//! # }
//! ```
//!
//! # What is sent
//!
//! Each delivery follows the [Standard Webhooks](https://www.standardwebhooks.com) specification:
//! `POST` to the endpoint with `content-type: application/json`, a body
//! `{"type": "key.revoked", "timestamp": "<RFC 3339>", "data": <the audit event>}` (`data` is the
//! event as `GET /api-keys/events` shows it: id, type, at, actor, ip, request id, key id, owner,
//! account, details; never a secret), and the headers `webhook-id` (the message id, `msg_...`, the
//! same on every retry: receivers deduplicate with it), `webhook-timestamp` (Unix seconds of the
//! attempt) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`, keyed
//! with the base64-decoded part of the endpoint's `whsec_` secret). The event types are
//! [`EVENT_TYPES`]: `key.created`, `key.rotated`, `key.revoked`, `key.deleted`, `key.updated`,
//! `key.leaked` (a leak report named the key), `key.expiring` and `key.idle` (the hygiene
//! sweeper).
//!
//! # Never lost
//!
//! The SQL stores' audit trail writes each event in the transaction of its change; in that same
//! transaction it writes one pending delivery per endpoint of the owner subscribed to the event's
//! type (the outbox, [`WebhookStore`]). So a committed change always has its deliveries, whatever
//! happens to the process next, and a rolled-back one has none. [`Deliverer`]s on any number of
//! instances claim due deliveries with a lease (`UPDATE ... RETURNING`; `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL): one attempt at a time per delivery; a deliverer that dies leaves its lease to
//! expire. A failed attempt (no 2xx, a timeout, a refused address) is retried with exponential
//! backoff until the retry horizon, then the delivery is `failed`. Delivery is at least once: a
//! deliverer that crashes after the receiver answered, before recording it, lets it be sent again
//! (with the same `webhook-id`). Each attempt is logged: status, attempts, last HTTP status, last
//! error ([`Webhooks::deliveries`]).
//!
//! # No SSRF
//!
//! [`UrlPolicy`]: by default `https` only, and every address the host resolves to must be public
//! (not loopback, private, link-local or metadata, unspecified, multicast; IPv4 and IPv6,
//! IPv4-mapped included), checked at registration and at each attempt, which connects to the
//! address it checked (a DNS answer changed in between cannot redirect it). Redirects are not
//! followed.
//!
//! # Who may do what
//!
//! Under the one rule ([`authorize`](crate::manage::authorize)): the master key, or a key with
//! `api-keys:write` in that owner (and account). A scoped key's endpoint receives only events about
//! keys of **its own subtree** (itself and the keys it created), and only while it is active
//! (written while it is active, and sent while it still is: what was queued is failed when it
//! ends): a webhook is a standing read of events, and a scoped key reads the activity of its subtree only,
//! so registering one gives it nothing it could not read already; revoking the key stops it.
//! A scoped key lists, deletes, rotates and reads the log of the endpoints registered inside its
//! subtree; the master key's endpoints (which receive the whole owner's events) are the master
//! key's alone (404 to scoped keys). Events about a key whose record was deleted go to the master
//! key's endpoints only (the lineage went with the record).
//!
//! The store keeps each endpoint's secret as it is (the deliverer signs with it), unlike API keys,
//! which it keeps as digests only; it never appears in a listing, a log line or an event.
//!
//! Registering, rotating and deleting an endpoint are audit events of the owner, written with the
//! change (`webhook.registered`, `webhook.rotated`, `webhook.deleted`: the id and URL, never the
//! secret; not key events, so never delivered), and a refused one is `key.refused`, as for keys.
//!
//! The `webhooks` feature must be on in every instance writing to a shared store: the outbox is
//! written by the build that writes the event.

mod deliver;
mod endpoints;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod rows;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;
mod types;
mod url;

pub use deliver::{
    DEFAULT_FIRST_RETRY, DEFAULT_MAX_RETRY, DEFAULT_RETRY_HORIZON, Deliverer, DeliveryReport,
};
pub use endpoints::{
    CreatedWebhook, DeliveryPage, MAX_DELIVERY_PAGE, MAX_WEBHOOKS_PER_OWNER, Webhooks,
};
pub use store::WebhookStore;
pub use types::{
    AttemptOutcome, Claimed, Delivery, DeliveryStatus, EVENT_TYPES, SECRET_PREFIX, Webhook,
    WebhookSecret,
};
pub use url::{MAX_URL_LEN, UrlPolicy, is_public};
