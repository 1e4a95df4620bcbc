//! What the SQL stores' audit trails share: an event row as read (`EVENT_COLUMNS` order), before
//! validation ([`RawEvent`]), and the text its details are written as ([`details_text`]).

use time::OffsetDateTime;

use super::{StoreError, StoreErrorKind};
use crate::audit::{Actor, ActorKind, AuditEvent, ChainHash, EventDraft, EventType};
use crate::key::KeyId;

/// An event's row as read from a SQL store, before validation.
pub(crate) struct RawEvent {
    pub(crate) id: String,
    pub(crate) owner_id: String,
    pub(crate) seq: i64,
    pub(crate) event_type: String,
    pub(crate) at: OffsetDateTime,
    pub(crate) actor_kind: String,
    pub(crate) actor_key_id: Option<String>,
    pub(crate) actor_name: Option<String>,
    pub(crate) ip: Option<String>,
    pub(crate) request_id: Option<String>,
    pub(crate) key_id: Option<String>,
    pub(crate) account_id: Option<String>,
    pub(crate) details: String,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

impl RawEvent {
    /// Validates the row: a known event type and actor kind, a sequence number that is not
    /// negative ([`StoreErrorKind::Corrupt`] otherwise). Details that no longer parse (edited by
    /// hand) are kept as text, and a bad hash reads as zeros: verifying the chain finds the edit.
    pub(crate) fn into_event(self) -> Result<AuditEvent, StoreError> {
        let corrupt = |what: &'static str| StoreError::new(StoreErrorKind::Corrupt, what);
        let details = match serde_json::from_str(&self.details) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::from_iter([("unreadable".to_owned(), self.details.into())]),
        };
        Ok(AuditEvent {
            draft: EventDraft {
                id: self.id,
                owner_id: self.owner_id,
                event_type: EventType::new(self.event_type)
                    .ok_or_else(|| corrupt("bad event type"))?,
                at: self.at,
                actor: Actor {
                    kind: ActorKind::parse(&self.actor_kind)
                        .ok_or_else(|| corrupt("bad actor kind"))?,
                    key_id: self.actor_key_id.map(KeyId::new),
                    name: self.actor_name,
                },
                ip: self.ip.and_then(|ip| ip.parse().ok()),
                request_id: self.request_id,
                key_id: self.key_id.map(KeyId::new),
                account_id: self.account_id,
                details,
            },
            seq: u64::try_from(self.seq).map_err(|_| corrupt("negative sequence"))?,
            prev_hash: ChainHash::from_hex(&self.prev_hash).unwrap_or_default(),
            hash: ChainHash::from_hex(&self.hash).unwrap_or_default(),
        })
    }
}

/// `event`'s details as written: their canonical JSON (what its hash covers).
pub(crate) fn details_text(event: &AuditEvent) -> String {
    let mut details = String::new();
    crate::audit::canonical_json(
        &serde_json::Value::Object(event.details.clone()),
        &mut details,
    );
    details
}
