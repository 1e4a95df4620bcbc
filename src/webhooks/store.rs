//! [`WebhookStore`]: endpoints and the outbox, kept by the key store that writes the events.

use time::OffsetDateTime;

use super::types::{AttemptOutcome, Claimed, Delivery, Webhook, WebhookSecret};
use crate::audit::EventDraft;
use crate::store::StoreError;

/// Endpoints and their outbox. [`SqliteStore`](crate::store::SqliteStore) and
/// [`PostgresStore`](crate::store::PostgresStore) implement it: their audit `append` writes one
/// pending delivery per subscribed endpoint in the transaction of each event, so an event is never
/// written without its deliveries.
///
/// The contract (what [`Deliverer`](super::Deliverer) relies on):
/// - `claim` hands each due delivery (pending, `next_attempt_at <= now`, no live lease) to one
///   caller only, leasing it until `lease_until`: two deliverers on one store never hold the same
///   delivery at once; a deliverer that dies leaves its lease to expire and the delivery to
///   another;
/// - `finish` records an attempt only if the lease `token` still holds it;
/// - deleting an endpoint deletes its deliveries;
/// - `events` (the change's audit events: `webhook.registered`, `webhook.deleted`,
///   `webhook.rotated`) are written in the same atomic step as the change, and only if it changed
///   something.
#[async_trait::async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Stores a new endpoint with its secret.
    async fn insert_webhook(
        &self,
        webhook: &Webhook,
        secret: &WebhookSecret,
        events: &[EventDraft],
    ) -> Result<(), StoreError>;

    /// The endpoint with this id.
    async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError>;

    /// One owner's endpoints, oldest first.
    async fn webhooks(&self, owner: &str) -> Result<Vec<Webhook>, StoreError>;

    /// Removes an endpoint and its deliveries; `false` if there was none.
    async fn delete_webhook(&self, id: &str, events: &[EventDraft]) -> Result<bool, StoreError>;

    /// Replaces an endpoint's secret (pending deliveries are signed with the new one); `false` if
    /// there was no such endpoint.
    async fn set_webhook_secret(
        &self,
        id: &str,
        secret: &WebhookSecret,
        events: &[EventDraft],
    ) -> Result<bool, StoreError>;

    /// An endpoint's deliveries, newest first, with a message id below `before` when given.
    async fn deliveries(
        &self,
        webhook_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Claims up to `limit` due deliveries for the caller (`token`) until `lease_until`.
    async fn claim(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        token: &str,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Records an attempt on a delivery the caller (`token`) holds, and releases it.
    async fn finish(
        &self,
        id: &str,
        token: &str,
        outcome: &AttemptOutcome,
    ) -> Result<(), StoreError>;
}
