//! What the SQL stores' [`WebhookStore`](super::WebhookStore)s (`sqlite`, `postgres`) share: their
//! rows as read, before validation, and the columns they read them from.

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::types::{Claimed, Delivery, DeliveryStatus, Webhook, WebhookSecret};
use crate::audit::EventType;
use crate::key::KeyId;
use crate::store::{StoreError, StoreErrorKind};

/// The columns of a [`WebhookRow`], in order.
pub(super) const WEBHOOK_COLUMNS: &str = "id, owner_id, url, events, registered_by, created_at";

/// The columns of a [`DeliveryRow`], in order.
pub(super) const DELIVERY_COLUMNS: &str = "id, webhook_id, event_type, status, attempts, \
    last_status, last_error, last_attempt_at, next_attempt_at, delivered_at, created_at";

pub(super) fn corrupt(what: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, what)
}

/// A count as stored, as a `u32` (saturating: a stored count is never negative).
fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// An endpoint's row.
pub(super) struct WebhookRow {
    pub(super) id: String,
    pub(super) owner: String,
    pub(super) url: String,
    pub(super) events: Vec<String>,
    pub(super) registered_by: Option<String>,
    pub(super) created_at: OffsetDateTime,
}

impl WebhookRow {
    /// The endpoint; [`StoreErrorKind::Corrupt`] for an unknown event type.
    pub(super) fn into_webhook(self) -> Result<Webhook, StoreError> {
        Ok(Webhook {
            id: self.id,
            owner: self.owner,
            url: self.url,
            events: self
                .events
                .into_iter()
                .map(|e| EventType::new(e).ok_or_else(|| corrupt("bad webhook event type")))
                .collect::<Result<_, _>>()?,
            registered_by: self.registered_by.map(KeyId::new),
            created_at: self.created_at,
        })
    }
}

/// A delivery's row, as the log shows it.
pub(super) struct DeliveryRow {
    pub(super) id: String,
    pub(super) webhook_id: String,
    pub(super) event_type: String,
    pub(super) status: String,
    pub(super) attempts: i64,
    pub(super) last_status: Option<i64>,
    pub(super) last_error: Option<String>,
    pub(super) last_attempt_at: Option<OffsetDateTime>,
    pub(super) next_attempt_at: Option<OffsetDateTime>,
    pub(super) delivered_at: Option<OffsetDateTime>,
    pub(super) created_at: OffsetDateTime,
}

impl DeliveryRow {
    /// The delivery; [`StoreErrorKind::Corrupt`] for an unknown status.
    pub(super) fn into_delivery(self) -> Result<Delivery, StoreError> {
        Ok(Delivery {
            id: self.id,
            webhook_id: self.webhook_id,
            event_type: self.event_type,
            status: DeliveryStatus::parse(&self.status)
                .ok_or_else(|| corrupt("bad delivery status"))?,
            attempts: count(self.attempts),
            last_status: self.last_status.and_then(|s| u16::try_from(s).ok()),
            last_error: self.last_error,
            last_attempt_at: self.last_attempt_at,
            next_attempt_at: self.next_attempt_at,
            delivered_at: self.delivered_at,
            created_at: self.created_at,
        })
    }
}

/// A claimed delivery's row, with its endpoint's URL and secret.
pub(super) struct ClaimedRow {
    pub(super) id: String,
    pub(super) webhook_id: String,
    pub(super) url: String,
    pub(super) secret: Zeroizing<String>,
    pub(super) payload: String,
    pub(super) attempts: i64,
    pub(super) created_at: OffsetDateTime,
    pub(super) registrar_ended: bool,
}

impl ClaimedRow {
    /// The claimed delivery; [`StoreErrorKind::Corrupt`] for a secret that does not parse.
    pub(super) fn into_claimed(self) -> Result<Claimed, StoreError> {
        Ok(Claimed {
            id: self.id,
            webhook_id: self.webhook_id,
            url: self.url,
            secret: WebhookSecret::parse(&self.secret)
                .ok_or_else(|| corrupt("bad webhook secret"))?,
            payload: self.payload,
            attempts: count(self.attempts),
            created_at: self.created_at,
            registrar_ended: self.registrar_ended,
        })
    }
}
