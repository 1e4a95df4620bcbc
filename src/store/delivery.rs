//! A webhook delivery as the SQL stores write it to their outbox (`api_key_webhook_deliveries`),
//! in the transaction of each event: its message id and its body, the same bytes on every attempt.
//! Which endpoints get one is each store's `outbox::enqueue`; the endpoints and the sending are the
//! `webhooks` module's.

use serde_json::json;

use crate::audit::AuditEvent;
use crate::key::KeyId;

/// A new message id: `msg_` and 26 Crockford base-32 characters (the `webhook-id` header, the
/// same on every attempt).
pub(crate) fn message_id() -> String {
    let id = KeyId::generate();
    format!("msg_{}", &id.as_str()["key_".len()..])
}

/// The body of the message for `event` (Standard Webhooks): `{"type", "timestamp", "data"}`,
/// `data` being the event as the management API shows it.
pub(crate) fn payload(event: &AuditEvent) -> String {
    json!({
        "type": event.event_type,
        "timestamp": crate::audit::timestamp(Some(event.at)),
        "data": event.to_json(),
    })
    .to_string()
}
