//! [`KeyManager`]: the key lifecycle, every operation through [`authorize`]. This file holds the
//! manager, its settings and what every operation shares (authorizing and recording a refusal,
//! finding the target key, invalidating caches); the operations live beside it: creating
//! (`create.rs`), reading (`read.rs`), revoking, deleting and rotating (`revoke.rs`), changing
//! limits and pools (`limits.rs`), reading activity (`activity.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::policy::KeyPolicy;
use super::validate::validate_id;
use crate::audit::{Actor, EventDraft, EventType, Origin};
use crate::authorize::{KeyFacts, Operation, OperationKind, Target, authorize};
use crate::error::AuthError;
use crate::invalidate::{Invalidation, Invalidator, NoBroadcast, Receipt, Sequenced};
use crate::key::{KeyDigest, KeyId};
use crate::principal::Principal;
use crate::resolver::CachedResolver;
use crate::store::{KeyChange, KeyRecord, KeyStore};

/// Creates, lists, revokes, deletes and rotates keys under a [`KeyPolicy`], enforcing owner context
/// and delegation rules. Cheap to clone.
///
/// Every change is written with its audit event in one store transaction ([`crate::audit`]); a
/// power operation the rule refuses is recorded as `key.refused`. [`at`](Self::at) says where a
/// call comes from (the actor's address, the request id).
#[derive(Clone)]
pub struct KeyManager {
    pub(super) store: Arc<dyn KeyStore>,
    pub(super) resolver: CachedResolver,
    pub(super) invalidator: Arc<dyn Invalidator>,
    /// How long an invalidating operation waits for every live instance to acknowledge it
    /// (`None`: it does not wait).
    pub(super) acknowledgement: Option<Duration>,
    pub(super) policy: Arc<KeyPolicy>,
    pub(super) origin: Arc<Origin>,
    #[cfg(feature = "webhooks")]
    pub(super) webhooks: Option<crate::webhooks::Webhooks>,
}

impl fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Most digests in one broadcast [`Invalidation`]: its JSON then stays under PostgreSQL's
/// 8000-byte `NOTIFY` payload limit. A larger cascade is sent in several.
const DIGESTS_PER_INVALIDATION: usize = 96;

impl KeyManager {
    /// A manager over `resolver`'s store that keeps its cache in step with every change. Keys are
    /// generated in the resolver's [`KeyFormat`](crate::key::KeyFormat). The store is the one the
    /// resolver was built over: a manager writing to one store while its resolver reads another
    /// cannot be written.
    pub fn new(resolver: CachedResolver) -> Self {
        Self {
            store: resolver.store().clone(),
            acknowledgement: Some(resolver.bound()),
            resolver,
            invalidator: Arc::new(NoBroadcast),
            policy: Arc::new(KeyPolicy::default()),
            origin: Arc::new(Origin::default()),
            #[cfg(feature = "webhooks")]
            webhooks: None,
        }
    }

    /// This manager acting for calls from `origin`: the events it writes carry its address and
    /// request id. Cheap (what the router does per request).
    #[must_use]
    pub fn at(&self, origin: Origin) -> Self {
        Self {
            origin: Arc::new(origin),
            ..self.clone()
        }
    }

    /// A draft event by `caller`, from this manager's origin, in `owner`'s chain.
    pub(super) fn draft(
        &self,
        caller: &Principal,
        event_type: EventType,
        owner: &str,
    ) -> EventDraft {
        EventDraft::new(event_type, Actor::of(caller), &self.origin, owner)
    }

    /// [`authorize`], recording a refused power operation as `key.refused` in the caller's
    /// owner's chain (a read refused, or a key not found, is not recorded). A failure to record
    /// is logged; the refusal stands either way.
    pub(super) async fn authorize_recorded(
        &self,
        caller: &Principal,
        operation: Operation,
        target: &Target<'_>,
        key_id: Option<&KeyId>,
    ) -> Result<(), AuthError> {
        let Err(refusal) = authorize(caller, operation, target) else {
            return Ok(());
        };
        let owner = caller.owner().map(str::to_owned);
        if operation.kind() == OperationKind::Read
            || matches!(refusal, AuthError::NotFound)
            || owner.is_none()
        {
            return Err(refusal);
        }
        let mut draft = self
            .draft(
                caller,
                EventType::KEY_REFUSED,
                owner.as_deref().unwrap_or_default(),
            )
            .detail("operation", operation.verb())
            .detail("code", refusal.code().as_str());
        // The event joins the key's own history only when the key is one of the chain's owner's:
        // an attempt on an unknown id or on another owner's key names the id in its details, so
        // that no key id gains a history where it has no key (a never-created id stays unknown
        // to `GET /api-keys/{id}/events`).
        let owners_key = matches!(
            target,
            Target::Key { key: Some(facts), .. } if Some(facts.owner) == owner.as_deref()
        );
        match key_id {
            Some(id) if owners_key => draft.key_id = Some(id.clone()),
            Some(id) => draft = draft.detail("target_key_id", id.as_str()),
            None => {}
        }
        draft.account_id = caller.account().map(str::to_owned);
        if let Err(error) = self.store.append_events(&[draft]).await {
            tracing::warn!(%error, "recording a refused API key operation failed");
        }
        Err(refusal)
    }

    /// The policy new keys are created under (default: [`KeyPolicy::default`], no limits). The
    /// manager's settings are not read back from it: keep the values you give (the router shows
    /// the policy to clients at `GET /api-keys/policy`).
    #[must_use]
    pub fn policy(mut self, policy: KeyPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Broadcasts changes to other instances with `invalidator`.
    #[must_use]
    pub fn invalidator(mut self, invalidator: impl Invalidator) -> Self {
        self.invalidator = Arc::new(invalidator);
        self
    }

    /// Serves webhook endpoints (`/api-keys/webhooks` in the [router](super::router)) from
    /// `webhooks`, normally of the same store. Without it those routes answer 404
    /// `WEBHOOK_NOT_FOUND`.
    #[cfg(feature = "webhooks")]
    #[must_use]
    pub fn webhooks(mut self, webhooks: crate::webhooks::Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// How long revoke, delete, rotate and the other invalidating operations wait, after
    /// broadcasting, for every live instance of the fleet to acknowledge that it applied the change
    /// (default: the resolver's freshness bound, its [`degraded_time_to_live`](crate::resolver::CachedResolverBuilder::degraded_time_to_live),
    /// 1 s); `None` does not wait. Only invalidators with a roster answer
    /// ([`PostgresInvalidator`](crate::invalidate::PostgresInvalidator), [`RedisInvalidator`](crate::invalidate::RedisInvalidator));
    /// an operation never fails for want of acknowledgements: the laggards are logged and counted
    /// (see [`Receipt`]), and they stop vouching for their caches within the bound.
    #[must_use]
    pub fn acknowledgement_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.acknowledgement = deadline;
        self
    }

    /// The resolver whose cache this manager keeps fresh.
    pub fn resolver(&self) -> &CachedResolver {
        &self.resolver
    }

    /// The owner a call acts for: the one it names (validated), else the caller's; the master key
    /// must name one.
    pub(super) fn owner_of<'a>(
        caller: &'a Principal,
        named: Option<&'a str>,
    ) -> Result<&'a str, AuthError> {
        match named {
            Some(owner) => validate_id("owner", owner),
            None => caller.owner().ok_or(AuthError::OwnerRequired),
        }
    }

    /// The key `id`, once [`authorize`] allows `operation` on it; `named_owner` is the `owner` the
    /// request names, if any.
    pub(super) async fn target(
        &self,
        caller: &Principal,
        operation: Operation,
        id: &KeyId,
        named_owner: Option<&str>,
    ) -> Result<KeyRecord, AuthError> {
        if let Some(owner) = named_owner {
            validate_id("owner", owner)?;
        }
        let record = self.store.get(id).await?;
        let lineage = self.lineage(caller, operation, record.as_ref()).await?;
        let target = Target::Key {
            named_owner,
            key: record.as_ref().map(|r| KeyFacts::of(r, &lineage)),
        };
        self.authorize_recorded(caller, operation, &target, Some(id))
            .await?;
        record.ok_or(AuthError::NotFound)
    }

    /// The lineage of `record` (its id, then its ancestors' ids, nearest first) as far as the rule
    /// needs it for `caller`: the whole of it for a scoped caller's power operation (the subtree
    /// test, I1), the key's own id otherwise (no store read).
    pub(super) async fn lineage(
        &self,
        caller: &Principal,
        operation: Operation,
        record: Option<&KeyRecord>,
    ) -> Result<Vec<KeyId>, AuthError> {
        let Some(record) = record else {
            return Ok(Vec::new());
        };
        let mut lineage = vec![record.id.clone()];
        if !caller.is_master() && operation.in_subtree() && record.created_by.is_some() {
            lineage.extend(
                self.store
                    .ancestors(&record.id)
                    .await?
                    .into_iter()
                    .map(|a| a.id),
            );
        }
        Ok(lineage)
    }

    /// `caller` with its current usage limits: its credits as the store counts them now (the
    /// principal carries them as they were when its key was loaded). What [`authorize`] holds a
    /// delegate's limits to.
    pub(super) async fn current(&self, caller: &Principal) -> Result<Principal, AuthError> {
        if caller.limits().credits.is_none() {
            return Ok(caller.clone());
        }
        Ok(match self.store.get(caller.key_id()).await? {
            Some(record) => caller.clone().with_limits(record.limits),
            None => caller.clone(),
        })
    }

    /// Forgets every affected key here and tells the other instances, in one broadcast (several
    /// for a cascade over more than [`DIGESTS_PER_INVALIDATION`] digests).
    pub(super) async fn invalidate(&self, change: &KeyChange) -> Receipt {
        self.invalidate_records(&change.before.id, change.affected())
            .await
    }

    /// Forgets every digest of `records` here and tells the other instances (in broadcasts of at
    /// most [`DIGESTS_PER_INVALIDATION`] digests, each naming `key_id`), then waits for every live
    /// instance to acknowledge the last one (sequence numbers apply in order), up to the
    /// [deadline](Self::acknowledgement_deadline).
    pub(super) async fn invalidate_records<'a>(
        &self,
        key_id: &KeyId,
        records: impl Iterator<Item = &'a KeyRecord>,
    ) -> Receipt {
        let digests: Vec<KeyDigest> = records.flat_map(KeyRecord::digests).copied().collect();
        let invalidations: Vec<Invalidation> = digests
            .chunks(DIGESTS_PER_INVALIDATION)
            .map(|chunk| Invalidation {
                key_id: key_id.clone(),
                digests: chunk.to_vec(),
            })
            .collect();
        // Requests in flight under the changed keys end here before the change is broadcast and
        // the call returns (I4).
        let lives = invalidations
            .iter()
            .flat_map(|invalidation| invalidation.forget(&self.resolver))
            .collect();
        let ended_here = self.resolver.settle(lives).await;
        let mut published = Vec::with_capacity(invalidations.len());
        for invalidation in &invalidations {
            match self.invalidator.publish_sequenced(invalidation).await {
                Ok(sequenced) => published.extend(sequenced),
                Err(error) => {
                    tracing::warn!(%error, api_key_id = %key_id, "broadcasting an API key change failed; other instances will catch up when their cache entries expire");
                }
            }
        }
        self.receipt_for(&published, Some(ended_here)).await
    }

    /// Waits for every live instance to acknowledge the last of `published` (sequence numbers
    /// apply in order), up to the [deadline](Self::acknowledgement_deadline), and reports the
    /// receipt (empty when nothing was sequenced or the manager does not wait). `ended_here`: the
    /// requests in flight this instance ended for an invalidation, added to those each
    /// acknowledging instance reported for any of `published`.
    pub(super) async fn receipt_for(
        &self,
        published: &[Sequenced],
        ended_here: Option<u64>,
    ) -> Receipt {
        let mut receipt = match (published.split_last(), self.acknowledgement) {
            (Some((last, earlier)), Some(deadline)) => {
                let mut receipt = self.invalidator.receipt(last, deadline).await;
                // Acknowledged in order: the earlier ones are answered by now (or never will be).
                for sequenced in earlier {
                    let early = self.invalidator.receipt(sequenced, Duration::ZERO).await;
                    for (instance, requests) in early.requests_ended {
                        receipt.count_ended(&instance, requests);
                    }
                }
                receipt
            }
            _ => Receipt::default(),
        };
        if let Some(requests) = ended_here {
            receipt.count_ended(&self.invalidator.instance(), requests);
        }
        crate::invalidate::report(&receipt);
        receipt
    }
}
