//! [`Webhooks`]: registering, listing, deleting and rotating endpoints, and reading their delivery
//! logs, for a caller, under the one rule ([`authorize`]).

use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use super::deliver::Deliverer;
use super::store::WebhookStore;
use super::types::{self, Delivery, EVENT_TYPES, Webhook, WebhookSecret};
use super::url::UrlPolicy;
use crate::audit::{Actor, EventDraft, EventType, Origin};
use crate::authorize::{KeyFacts, Operation, Target, authorize};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::scope::ScopeSet;
use crate::store::KeyStore;

/// Most endpoints per owner: 16.
pub const MAX_WEBHOOKS_PER_OWNER: u32 = 16;
/// Largest page of deliveries: 100 (the default is 50).
pub const MAX_DELIVERY_PAGE: u32 = 100;

/// A newly registered (or rotated) endpoint and its secret, shown this once.
#[derive(Clone)]
pub struct CreatedWebhook {
    /// The endpoint.
    pub webhook: Webhook,
    /// Its signing secret.
    pub secret: WebhookSecret,
}

impl fmt::Debug for CreatedWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedWebhook")
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

/// A page of an endpoint's delivery log, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryPage {
    /// The deliveries.
    pub deliveries: Vec<Delivery>,
    /// The cursor of the next page, when there may be one.
    pub next_cursor: Option<String>,
}

/// Webhook endpoints of a store that keeps keys and an outbox ([`SqliteStore`](crate::store::SqliteStore),
/// [`PostgresStore`](crate::store::PostgresStore)), managed for callers under the one rule. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    store: Arc<dyn WebhookStore>,
    keys: Arc<dyn KeyStore>,
    urls: UrlPolicy,
    origin: Arc<Origin>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// The endpoints of `store`, with the strict [`UrlPolicy`].
    pub fn new<S: WebhookStore + KeyStore>(store: Arc<S>) -> Self {
        Self {
            store: store.clone(),
            keys: store,
            urls: UrlPolicy::default(),
            origin: Arc::default(),
        }
    }

    /// These endpoints acting for calls from `origin`: the audit events of their changes carry
    /// its address and request id (what the router does per request).
    #[must_use]
    pub fn at(&self, origin: Origin) -> Self {
        Self {
            origin: Arc::new(origin),
            ..self.clone()
        }
    }

    /// An audit event of a change to `webhook`: `webhook.registered`, `.deleted` or `.rotated`
    /// (never delivered as webhooks: they are not key events).
    fn event(&self, caller: &Principal, name: &'static str, webhook: &Webhook) -> EventDraft {
        let event_type = EventType::new(name).expect("a valid event type");
        EventDraft::new(event_type, Actor::of(caller), &self.origin, &webhook.owner)
            .detail("webhook_id", webhook.id.as_str())
            .detail("url", webhook.url.as_str())
    }

    /// [`authorize`], recording a refusal (but for an unknown or invisible endpoint) as
    /// `key.refused` in the caller's owner's chain, as the key manager does.
    async fn authorize_recorded(
        &self,
        caller: &Principal,
        operation: Operation,
        target: &Target<'_>,
    ) -> Result<(), AuthError> {
        let Err(refusal) = authorize(caller, operation, target) else {
            return Ok(());
        };
        let refusal = match refusal {
            AuthError::NotFound => return Err(AuthError::WebhookNotFound),
            other => other,
        };
        if let Some(owner) = caller.owner() {
            let mut draft = EventDraft::new(
                EventType::KEY_REFUSED,
                Actor::of(caller),
                &self.origin,
                owner,
            )
            .detail("operation", operation.verb())
            .detail("code", refusal.code().as_str());
            draft.account_id = caller.account().map(str::to_owned);
            if let Err(error) = self.keys.append_events(&[draft]).await {
                tracing::warn!(%error, "recording a refused webhook operation failed");
            }
        }
        Err(refusal)
    }

    /// Which URLs may be registered (and, for [`deliverer`](Self::deliverer), called).
    #[must_use]
    pub fn urls(mut self, urls: UrlPolicy) -> Self {
        self.urls = urls;
        self
    }

    /// A [`Deliverer`] of this store's outbox with the same URL policy.
    pub fn deliverer(&self) -> Deliverer {
        Deliverer::new(self.store.clone()).urls(self.urls)
    }

    /// Registers an endpoint of `owner` (a scoped key: its own, the default) for `events`
    /// ([`EVENT_TYPES`]) at `url`; the answer holds the secret, shown this once.
    pub async fn register(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        url: &str,
        events: &[String],
    ) -> Result<CreatedWebhook, AuthError> {
        let owner = owner_of(caller, owner)?;
        self.authorize_recorded(
            caller,
            Operation::RegisterWebhook,
            &Target::Keys {
                owner,
                account: caller.account(),
            },
        )
        .await?;
        let events = validate_events(events)?;
        self.urls.resolve(url).await?;
        let count = self.store.webhooks(owner).await?.len();
        if count >= MAX_WEBHOOKS_PER_OWNER as usize {
            return Err(AuthError::WebhookLimitReached {
                limit: MAX_WEBHOOKS_PER_OWNER,
            });
        }
        let webhook = Webhook {
            id: types::new_id("whk_"),
            owner: owner.to_owned(),
            url: url.to_owned(),
            events,
            registered_by: (!caller.is_master()).then(|| caller.key_id().clone()),
            created_at: crate::audit::floor_micros(OffsetDateTime::now_utc()),
        };
        let secret = WebhookSecret::generate();
        let event = self.event(caller, "webhook.registered", &webhook).detail(
            "events",
            webhook
                .events
                .iter()
                .map(EventType::as_str)
                .collect::<Vec<_>>(),
        );
        self.store
            .insert_webhook(&webhook, &secret, &[event])
            .await?;
        tracing::info!(webhook_id = %webhook.id, owner = %webhook.owner, "webhook registered");
        Ok(CreatedWebhook { webhook, secret })
    }

    /// `owner`'s endpoints the caller may manage, oldest first.
    pub async fn list(
        &self,
        caller: &Principal,
        owner: Option<&str>,
    ) -> Result<Vec<Webhook>, AuthError> {
        let owner = owner_of(caller, owner)?;
        authorize(
            caller,
            Operation::ListWebhooks,
            &Target::Keys {
                owner,
                account: caller.account(),
            },
        )?;
        let mut visible = Vec::new();
        for webhook in self.store.webhooks(owner).await? {
            if self.check(caller, &webhook, None, false).await.is_ok() {
                visible.push(webhook);
            }
        }
        Ok(visible)
    }

    /// Deletes an endpoint and its delivery log.
    pub async fn delete(
        &self,
        caller: &Principal,
        id: &str,
        owner: Option<&str>,
    ) -> Result<(), AuthError> {
        let webhook = self.target(caller, id, owner).await?;
        let event = self.event(caller, "webhook.deleted", &webhook);
        if !self.store.delete_webhook(&webhook.id, &[event]).await? {
            return Err(AuthError::WebhookNotFound);
        }
        tracing::info!(webhook_id = %webhook.id, owner = %webhook.owner, "webhook deleted");
        Ok(())
    }

    /// Gives an endpoint a new secret (its pending deliveries are signed with it); the answer
    /// holds the secret, shown this once.
    pub async fn rotate(
        &self,
        caller: &Principal,
        id: &str,
        owner: Option<&str>,
    ) -> Result<CreatedWebhook, AuthError> {
        let webhook = self.target(caller, id, owner).await?;
        let secret = WebhookSecret::generate();
        let event = self.event(caller, "webhook.rotated", &webhook);
        if !self
            .store
            .set_webhook_secret(&webhook.id, &secret, &[event])
            .await?
        {
            return Err(AuthError::WebhookNotFound);
        }
        tracing::info!(webhook_id = %webhook.id, owner = %webhook.owner, "webhook secret rotated");
        Ok(CreatedWebhook { webhook, secret })
    }

    /// A page of an endpoint's delivery log, newest first, from `cursor` (a previous page's
    /// `next_cursor`); `limit` 1 to [`MAX_DELIVERY_PAGE`] (default 50).
    pub async fn deliveries(
        &self,
        caller: &Principal,
        id: &str,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<DeliveryPage, AuthError> {
        let limit = limit.unwrap_or(50);
        if !(1..=MAX_DELIVERY_PAGE).contains(&limit) {
            return Err(AuthError::invalid("limit: 1 to 100"));
        }
        if cursor.is_some_and(|c| c.len() > 64 || !c.starts_with("msg_")) {
            return Err(AuthError::invalid("cursor: not a cursor of this list"));
        }
        let webhook = self.target(caller, id, owner).await?;
        let deliveries = self.store.deliveries(&webhook.id, cursor, limit).await?;
        let next_cursor = (deliveries.len() == limit as usize)
            .then(|| deliveries.last().map(|d| d.id.clone()))
            .flatten();
        Ok(DeliveryPage {
            deliveries,
            next_cursor,
        })
    }

    /// The endpoint `id`, if the caller may manage it.
    async fn target(
        &self,
        caller: &Principal,
        id: &str,
        owner: Option<&str>,
    ) -> Result<Webhook, AuthError> {
        if id.len() > 64 {
            return Err(AuthError::WebhookNotFound);
        }
        let webhook = self
            .store
            .webhook(id)
            .await?
            .ok_or(AuthError::WebhookNotFound)?;
        self.check(caller, &webhook, owner, true).await?;
        Ok(webhook)
    }

    /// The rule, for an existing endpoint: its target is the key that registered it. An endpoint
    /// the master key registered (or whose key is gone) belongs to no scoped key's subtree: it
    /// stands for the whole owner, in no account, and only the master key reaches it.
    async fn check(
        &self,
        caller: &Principal,
        webhook: &Webhook,
        named_owner: Option<&str>,
        record: bool,
    ) -> Result<(), AuthError> {
        let registrar = match &webhook.registered_by {
            Some(id) => self.keys.get(id).await?,
            None => None,
        };
        let lineage: Vec<KeyId> = match &registrar {
            Some(record) => std::iter::once(record.id.clone())
                .chain(
                    self.keys
                        .ancestors(&record.id)
                        .await?
                        .into_iter()
                        .map(|r| r.id),
                )
                .collect(),
            None => Vec::new(),
        };
        let nothing = ScopeSet::default();
        let facts = match &registrar {
            Some(record) => KeyFacts::of(record, &lineage),
            None => KeyFacts {
                owner: &webhook.owner,
                account: "",
                scopes: &nothing,
                expires_at: None,
                limits: Default::default(),
                allowed_networks: None,
                lineage: &[],
            },
        };
        let target = Target::Key {
            named_owner,
            key: Some(facts),
        };
        if record {
            return self
                .authorize_recorded(caller, Operation::ManageWebhook, &target)
                .await;
        }
        authorize(caller, Operation::ManageWebhook, &target).map_err(|e| match e {
            AuthError::NotFound => AuthError::WebhookNotFound,
            other => other,
        })
    }
}

fn owner_of<'a>(caller: &'a Principal, owner: Option<&'a str>) -> Result<&'a str, AuthError> {
    let owner = match owner {
        Some(owner) => owner,
        None => caller.owner().ok_or(AuthError::OwnerRequired)?,
    };
    if owner.is_empty() || owner.len() > 128 || !owner.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::invalid(
            "owner: 1 to 128 visible ASCII characters",
        ));
    }
    Ok(owner)
}

fn validate_events(events: &[String]) -> Result<Vec<EventType>, AuthError> {
    if events.is_empty() {
        return Err(AuthError::invalid("events: at least one event type"));
    }
    let mut chosen = Vec::new();
    for name in events {
        let event = EVENT_TYPES
            .iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                AuthError::invalid(format!(
                    "events: not a key event type (one of {})",
                    EVENT_TYPES.map(|t| t.as_str().to_owned()).join(", ")
                ))
            })?;
        if !chosen.contains(event) {
            chosen.push(event.clone());
        }
    }
    Ok(chosen)
}
