//! [`KeyManager`]: the key lifecycle, every operation through [`authorize`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::authorize::{KeyFacts, Operation, OperationKind, Target, authorize};
use super::policy::KeyPolicy;
#[cfg(doc)]
use super::types::RevokeReason;
use super::types::{CreateKey, CreatedKey, KeyInfo, KeyPage, RotateOptions, UpdateKey};
use super::validate::{
    MAX_GRACE_PERIOD, MAX_PAGE_SIZE, default_name, validate_credits, validate_cursor, validate_id,
    validate_name, validate_rate_limit, validate_scopes,
};
use crate::audit::{Actor, EventDraft, EventType, Journal, Origin, grants, timestamp};
use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::invalidate::{Invalidation, Invalidator, NoBroadcast, Receipt};
use crate::key::{DigestScheme, KeyDigest, KeyId};
use crate::principal::Principal;
use crate::quota::{Credits, PoolId, RateLimit, UsageLimits};
use crate::resolver::CachedResolver;
use crate::store::{
    KeyChange, KeyRecord, KeyStore, KeyUpdate, ListQuery, Rotation, StoreErrorKind,
};

/// Creates, lists, revokes, deletes and rotates keys under a [`KeyPolicy`], enforcing owner context
/// and delegation rules. Cheap to clone.
///
/// Every change is written with its audit event in one store transaction ([`crate::audit`]); a
/// power operation the rule refuses is recorded as `key.refused`. [`at`](Self::at) says where a
/// call comes from (the actor's address, the request id).
#[derive(Clone)]
pub struct KeyManager {
    pub(super) store: Arc<dyn KeyStore>,
    resolver: CachedResolver,
    pub(super) invalidator: Arc<dyn Invalidator>,
    /// How long an invalidating operation waits for every live instance to acknowledge it
    /// (`None`: it does not wait).
    pub(super) acknowledgement: Option<Duration>,
    policy: Arc<KeyPolicy>,
    pub(super) origin: Arc<Origin>,
    #[cfg(feature = "webhooks")]
    webhooks: Option<crate::webhooks::Webhooks>,
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

    /// Sets the policy.
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

    /// The webhook endpoints this manager serves, if any.
    #[cfg(feature = "webhooks")]
    pub fn webhook_endpoints(&self) -> Option<&crate::webhooks::Webhooks> {
        self.webhooks.as_ref()
    }

    /// How long revoke, delete, rotate and the other invalidating operations wait, after
    /// broadcasting, for every live instance of the fleet to acknowledge that it applied the change
    /// (default: the resolver's freshness bound, its [`degraded_time_to_live`](crate::resolver::CachedResolverBuilder::degraded_time_to_live),
    /// 1 s); `None` does not wait. Only invalidators with a roster answer
    /// ([`PgInvalidator`](crate::invalidate::PgInvalidator), [`RedisInvalidator`](crate::invalidate::RedisInvalidator));
    /// an operation never fails for want of acknowledgements: the laggards are logged and counted
    /// (see [`Receipt`]), and they stop vouching for their caches within the bound.
    #[must_use]
    pub fn acknowledgement_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.acknowledgement = deadline;
        self
    }

    /// The policy new keys are created under.
    pub fn key_policy(&self) -> &KeyPolicy {
        &self.policy
    }

    /// The resolver whose cache this manager keeps fresh.
    pub fn resolver(&self) -> &CachedResolver {
        &self.resolver
    }

    /// The owner a call acts for: the one it names (validated), else the caller's; the master key
    /// must name one.
    fn owner_of<'a>(caller: &'a Principal, named: Option<&'a str>) -> Result<&'a str, AuthError> {
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
    async fn lineage(
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
    async fn current(&self, caller: &Principal) -> Result<Principal, AuthError> {
        if caller.limits().credits.is_none() {
            return Ok(caller.clone());
        }
        Ok(match self.store.get(caller.key_id()).await? {
            Some(record) => caller.clone().with_limits(record.limits),
            None => caller.clone(),
        })
    }

    /// The rate limit and credits of a key `caller` creates with `rate_limit` and `credits`
    /// requested: validated, the policy's defaults filling what is not asked for, then what a
    /// scoped caller has filling the rest ([`authorize`] refuses more than it has).
    async fn usage_for(
        &self,
        caller: &Principal,
        rate_limit: Option<RateLimit>,
        credits: Option<Credits>,
        now: OffsetDateTime,
    ) -> Result<UsageLimits, AuthError> {
        let defaults = self.policy.usage;
        let caller = self.current(caller).await?;
        Ok(inherit(
            &caller,
            validate_rate_limit(rate_limit.or(defaults.rate_limit))?,
            validate_credits(credits.or(defaults.credits))?,
            now,
        ))
    }

    /// Creates a key and returns its plaintext, once. The key is delegated by `caller` (recorded
    /// in [`KeyInfo::created_by`], unless it is the master key): it never outlives the caller and
    /// dies with it.
    pub async fn create(
        &self,
        caller: &Principal,
        request: CreateKey,
    ) -> Result<CreatedKey, AuthError> {
        let owner = Self::owner_of(caller, request.owner.as_deref())?.to_owned();
        let account = match (request.account.as_deref(), caller.account()) {
            (Some(account), _) => validate_id("account", account)?.to_owned(),
            (None, Some(own)) => own.to_owned(),
            (None, None) => owner.clone(),
        };
        let now = OffsetDateTime::now_utc();
        let name = match request.name {
            Some(name) => validate_name(name)?,
            None => default_name(now),
        };
        let scopes = validate_scopes(&request.scopes)?;
        let expires_at = self.expiry(caller, request.expires_at, now)?;
        let limits = self
            .usage_for(caller, request.rate_limit, request.credits, now)
            .await?;
        let caller = &self.current(caller).await?;
        // A delegated key may be used from where its creator may, unless it asks for less.
        let allowed_networks = request
            .allowed_networks
            .or_else(|| caller.allowed_networks().cloned());
        let id = KeyId::generate();
        let mut lineage = vec![id.clone()];
        if let Some(creator) = caller.provenance_id() {
            lineage.push(creator.clone());
            let ancestors = self.store.ancestors(creator).await?;
            lineage.extend(ancestors.into_iter().map(|a| a.id));
        }
        self.authorize_recorded(
            caller,
            Operation::Create,
            &Target::NewKey(KeyFacts {
                owner: &owner,
                account: &account,
                scopes: &scopes,
                expires_at,
                limits,
                allowed_networks: allowed_networks.as_ref(),
                lineage: &lineage,
            }),
            None,
        )
        .await?;
        self.open_pools(caller, &owner, &account).await?;
        let format = self.resolver.format();
        let key = format.generate();
        let record = KeyRecord {
            id,
            name,
            owner,
            account,
            scopes,
            digest: key.digest(),
            digest_scheme: DigestScheme::Sha256,
            masked_key: format.mask(&key).expect("a generated key has the format"),
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
            created_by: caller.provenance_id().cloned(),
            rotated_at: None,
            previous: None,
            limits,
            allowed_networks,
        };
        let mut event = self
            .draft(caller, EventType::KEY_CREATED, &record.owner)
            .about(&record)
            .detail("created_by", record.created_by.as_ref().map(KeyId::as_str));
        event.details.extend(grants(&record));
        let journal = Journal::of(event);
        if let Err(error) = self
            .store
            .insert_with(&record, self.policy.limits, now, &journal)
            .await
        {
            return Err(match error.kind() {
                StoreErrorKind::LimitReached { limit, scope } => {
                    AuthError::LimitReached { limit, scope }
                }
                // The caller was revoked (or expired) after it authenticated this request.
                StoreErrorKind::CreatorInactive => self.why_inactive(caller).await,
                _ => AuthError::Unavailable(error),
            });
        }
        tracing::info!(api_key_id = %record.id, owner = %record.owner, created_by = ?record.created_by, "API key created");
        Ok(CreatedKey {
            key,
            info: record.into(),
        })
    }

    /// The refusal for a caller whose key the store found inactive while creating a child: what
    /// the layer would now answer for that key.
    async fn why_inactive(&self, caller: &Principal) -> AuthError {
        match self.store.get(caller.key_id()).await {
            Ok(Some(record)) if record.revoked_at.is_none() => {
                AuthError::ExpiredKey(ExpiredReason::Expired)
            }
            Ok(Some(_)) => AuthError::ExpiredKey(ExpiredReason::Revoked),
            Ok(None) => AuthError::InvalidKey(InvalidKeyReason::Unknown),
            Err(error) => AuthError::Unavailable(error),
        }
    }

    /// The expiry of a new key: requested (in the future, within the policy's maximum lifetime),
    /// or the policy default capped at the caller's effective expiry (a default never outlives the
    /// creator; an explicit expiry past it is refused by [`authorize`]).
    pub(super) fn expiry(
        &self,
        caller: &Principal,
        requested: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<Option<OffsetDateTime>, AuthError> {
        let policy = &self.policy;
        let expires_at = match requested {
            Some(at) if at <= now => {
                return Err(AuthError::invalid("expires_at must be in the future"));
            }
            Some(at) => Some(at),
            None => {
                let default = policy
                    .default_lifetime
                    .or(policy.max_lifetime)
                    .map(|d| now + d);
                match (default, caller.expires_at()) {
                    (Some(at), Some(limit)) => Some(at.min(limit)),
                    (at, limit) => at.or(limit),
                }
            }
        };
        if let (Some(max), Some(at)) = (policy.max_lifetime, expires_at)
            && at > now + max
        {
            return Err(AuthError::invalid(format!(
                "expires_at is beyond the maximum key lifetime of {} days",
                max.as_secs() / 86_400
            )));
        }
        Ok(expires_at)
    }

    /// One owner's keys, newest first, at most `limit` (1 to [`MAX_PAGE_SIZE`], else
    /// `APIKEY_INVALID`) per page. `owner` is required with the master key; a scoped key lists its
    /// own owner's keys, of its own account. `before` is the previous page's
    /// [`KeyPage::next_cursor`].
    pub async fn list(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        before: Option<KeyId>,
        limit: u32,
    ) -> Result<KeyPage, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(AuthError::invalid(format!(
                "limit must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        if let Some(cursor) = &before {
            validate_cursor(cursor.as_str())?;
        }
        let account = caller.account();
        authorize(caller, Operation::List, &Target::Keys { owner, account })?;
        let mut keys = self
            .store
            .list(&ListQuery {
                owner: owner.to_owned(),
                account: account.map(str::to_owned),
                before,
                limit: limit + 1,
            })
            .await?;
        let next_cursor = if keys.len() > limit as usize {
            keys.truncate(limit as usize);
            keys.last().map(|k| k.id.clone())
        } else {
            None
        };
        Ok(KeyPage {
            keys: keys.into_iter().map(KeyInfo::from).collect(),
            next_cursor,
        })
    }

    /// How many keys active at `now` the caller would see listed for `owner`: the owner's keys, or
    /// only its own account's for a scoped caller bound to one. Allowed exactly when
    /// [`list`](Self::list) is ([`Operation::List`]); counted by the store in one query.
    pub async fn count_active(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = caller.account();
        authorize(caller, Operation::List, &Target::Keys { owner, account })?;
        Ok(self.store.count_active(owner, account, now).await?)
    }

    /// One key's metadata. A key the caller may not see is [`AuthError::NotFound`].
    pub async fn get(&self, caller: &Principal, id: &KeyId) -> Result<KeyInfo, AuthError> {
        self.get_in(caller, id, None).await
    }

    /// [`get`](Self::get), when the request also names the key's owner (`?owner=`): a key of
    /// another owner is then not found.
    pub async fn get_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        Ok(self.target(caller, Operation::Get, id, owner).await?.into())
    }

    /// Revokes a key and, in the same step, every key it created (transitively): they stop working
    /// at once, here and (with a broadcasting [`Invalidator`]) on every instance, and stay listed.
    /// Idempotent: revoking a revoked key changes nothing and invalidates nothing.
    pub async fn revoke(&self, caller: &Principal, id: &KeyId) -> Result<KeyInfo, AuthError> {
        self.revoke_in(caller, id, None).await
    }

    /// [`revoke`](Self::revoke), when the request also names the key's owner (`?owner=`).
    pub async fn revoke_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        self.revoke_because(caller, id, owner, None).await
    }

    /// [`revoke_in`](Self::revoke_in), recording `reason` (at most [`MAX_NAME_LEN`] characters;
    /// `requested` when none is given; see [`RevokeReason`] for the crate's own) in the
    /// `key.revoked` event.
    ///
    /// [`MAX_NAME_LEN`]: super::MAX_NAME_LEN
    pub async fn revoke_because(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        reason: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        self.revoke_with_receipt(caller, id, owner, reason)
            .await
            .map(|(info, _)| info)
    }

    /// [`revoke_because`](Self::revoke_because), with what the fleet said: how many live instances
    /// acknowledged the revocation within the [deadline](Self::acknowledgement_deadline) (an empty
    /// receipt when nothing was broadcast or nobody could answer: a key already revoked, a failed
    /// broadcast, an invalidator without a roster, or none of its subscriptions running here).
    pub async fn revoke_with_receipt(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(KeyInfo, Receipt), AuthError> {
        let reason = match reason {
            Some(reason) => validate_name(reason.to_owned())
                .map_err(|_| AuthError::invalid("reason: at most 200 visible characters"))?,
            None => "requested".to_owned(),
        };
        let record = self.target(caller, Operation::Revoke, id, owner).await?;
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_REVOKED, &record.owner)
                .about(&record)
                .detail("reason", reason.clone()),
        )
        .with_cascade();
        let change = self
            .store
            .revoke_with(id, OffsetDateTime::now_utc(), &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        let mut receipt = Receipt::default();
        if change.is_noop() {
            tracing::debug!(api_key_id = %id, "API key already revoked");
        } else {
            receipt = self.invalidate(&change).await;
            tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), %reason, "API key revoked");
        }
        Ok((change.after.unwrap_or(change.before).into(), receipt))
    }

    /// Deletes a key's record for good and revokes every key it created (transitively). Needs the
    /// master key: revoke keeps the audit trail.
    pub async fn delete(&self, caller: &Principal, id: &KeyId) -> Result<(), AuthError> {
        self.delete_in(caller, id, None).await
    }

    /// [`delete`](Self::delete), when the request also names the key's owner (`?owner=`).
    pub async fn delete_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<(), AuthError> {
        self.delete_with_receipt(caller, id, owner)
            .await
            .map(|_| ())
    }

    /// [`delete_in`](Self::delete_in), with what the fleet said (see
    /// [`revoke_with_receipt`](Self::revoke_with_receipt)).
    pub async fn delete_with_receipt(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<Receipt, AuthError> {
        let record = self.target(caller, Operation::Delete, id, owner).await?;
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_DELETED, &record.owner)
                .about(&record)
                .detail("name", record.name.as_str()),
        )
        .with_cascade();
        let change = self
            .store
            .delete_with(id, OffsetDateTime::now_utc(), &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        let receipt = self.invalidate(&change).await;
        tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), "API key deleted");
        Ok(receipt)
    }

    /// Gives a key a new secret under the same id. The old secret stops working at once, or after
    /// the grace period (at most [`MAX_GRACE_PERIOD`]; never past the key's own expiry). See
    /// [`RotateOptions`] for ending the key's descendants too.
    pub async fn rotate(
        &self,
        caller: &Principal,
        id: &KeyId,
        options: impl Into<RotateOptions>,
    ) -> Result<CreatedKey, AuthError> {
        self.rotate_in(caller, id, None, options).await
    }

    /// [`rotate`](Self::rotate), when the request also names the key's owner (`?owner=`).
    pub async fn rotate_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        options: impl Into<RotateOptions>,
    ) -> Result<CreatedKey, AuthError> {
        let options = options.into();
        if options.grace.is_some_and(|g| g > MAX_GRACE_PERIOD) {
            return Err(AuthError::invalid(format!(
                "the grace period is at most {} days ({} seconds)",
                MAX_GRACE_PERIOD.as_secs() / 86_400,
                MAX_GRACE_PERIOD.as_secs()
            )));
        }
        let old = self.target(caller, Operation::Rotate, id, owner).await?;
        let now = OffsetDateTime::now_utc();
        let revoked = || AuthError::invalid("a revoked key cannot be rotated");
        if old.revoked_at.is_some() {
            return Err(revoked());
        }
        if old.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::invalid("an expired key cannot be rotated"));
        }
        let format = self.resolver.format();
        let key = format.generate();
        let rotation = Rotation {
            digest: key.digest(),
            digest_scheme: DigestScheme::Sha256,
            masked_key: format.mask(&key).expect("a generated key has the format"),
            rotated_at: now,
            previous_valid_until: options.grace.filter(|g| !g.is_zero()).map(|g| now + g),
            revoke_descendants: options.revoke_descendants,
        };
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_ROTATED, &old.owner)
                .about(&old)
                .detail("grace_until", timestamp(rotation.previous_valid_until))
                .detail("revoke_descendants", rotation.revoke_descendants),
        )
        .with_cascade();
        let change = match self
            .store
            .replace_secret_with(id, &rotation, &journal)
            .await
        {
            Ok(change) => change.ok_or(AuthError::NotFound)?,
            Err(error) if error.kind() == StoreErrorKind::Revoked => return Err(revoked()),
            Err(error) => return Err(error.into()),
        };
        // Forget the old secret's cached entry: with a grace period it is re-read with its new end.
        self.invalidate(&change).await;
        tracing::info!(
            api_key_id = %id,
            grace_seconds = options.grace.map(|g| g.as_secs()),
            descendants = change.revoked_descendants.len(),
            "API key rotated"
        );
        let record = change.after.ok_or(AuthError::NotFound)?;
        Ok(CreatedKey {
            key,
            info: record.into(),
        })
    }

    /// Changes a key's name, rate limit or credits ([`Operation::Update`]: the rules of
    /// create hold, and a scoped caller never gives more than it has). New credits replace the
    /// count (a top-up is a new `remaining`); a removed limit of a scoped caller's key becomes the
    /// caller's own.
    pub async fn update(
        &self,
        caller: &Principal,
        id: &KeyId,
        request: UpdateKey,
    ) -> Result<KeyInfo, AuthError> {
        self.update_in(caller, id, None, request).await
    }

    /// [`update`](Self::update), when the request also names the key's owner (`?owner=`).
    pub async fn update_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        request: UpdateKey,
    ) -> Result<KeyInfo, AuthError> {
        let now = OffsetDateTime::now_utc();
        let name = request.name.map(validate_name).transpose()?;
        let rate_limit = request.rate_limit.map(validate_rate_limit).transpose()?;
        let credits = request.credits.map(validate_credits).transpose()?;
        if let Some(owner) = owner {
            validate_id("owner", owner)?;
        }
        let caller = self.current(caller).await?;
        let old = self.store.get(id).await?;
        // The limits the update gives, for the rule; a field it leaves alone is not given by it
        // and is judged as the caller's own (trivially within).
        let limits = old.as_ref().map(|old| {
            inherit(
                &caller,
                rate_limit.unwrap_or(old.limits.rate_limit),
                credits.unwrap_or(old.limits.credits),
                now,
            )
        });
        let judged = limits.map(|limits| UsageLimits {
            rate_limit: if rate_limit.is_some() {
                limits.rate_limit
            } else {
                caller.limits().rate_limit
            },
            credits: if credits.is_some() {
                limits.credits
            } else {
                caller.limits().credits
            },
        });
        let lineage = self
            .lineage(&caller, Operation::Update, old.as_ref())
            .await?;
        let target = Target::Key {
            named_owner: owner,
            key: old.as_ref().zip(judged).map(|(old, limits)| KeyFacts {
                limits,
                ..KeyFacts::of(old, &lineage)
            }),
        };
        self.authorize_recorded(&caller, Operation::Update, &target, Some(id))
            .await?;
        let (old, limits) = old.zip(limits).ok_or(AuthError::NotFound)?;
        let update = KeyUpdate {
            name,
            rate_limit: rate_limit.map(|_| limits.rate_limit),
            credits: credits.map(|_| limits.credits),
        };
        let journal = Journal::of(
            self.draft(&caller, EventType::KEY_UPDATED, &old.owner)
                .about(&old),
        )
        .with_diff();
        let record = self
            .store
            .update_with(id, &update, &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        if record.limits == old.limits {
            self.invalidate(&KeyChange {
                before: old,
                after: Some(record.clone()),
                revoked_descendants: Vec::new(),
            })
            .await;
        } else {
            // The key's limits are a level of every descendant's budget (I3): their cached
            // principals carry the old ones.
            let descendants = self.store.descendants(id).await?;
            self.invalidate_records(id, std::iter::once(&old).chain(&descendants))
                .await;
        }
        tracing::info!(api_key_id = %record.id, "API key updated");
        Ok(record.into())
    }

    /// Writes the policy's pools for a new key's account and owner where none is set yet (an
    /// insert-if-absent), and forgets the cached keys a new pool now binds.
    async fn open_pools(
        &self,
        caller: &Principal,
        owner: &str,
        account: &str,
    ) -> Result<(), AuthError> {
        for pool in [PoolId::account(owner, account), PoolId::owner(owner)] {
            let Some(limits) = self.policy.pool_default(&pool) else {
                continue;
            };
            let limits = start_now(limits, OffsetDateTime::now_utc());
            let journal = Journal::of(
                self.pool_event(caller, &pool, Some(&limits))
                    .detail("source", "policy default"),
            );
            if self
                .store
                .set_pool_with(&pool, Some(limits), true, &journal)
                .await?
            {
                self.invalidate_pool_members(&pool).await?;
            }
        }
        Ok(())
    }

    /// The limits of a shared pool (the owner's with `account` `None`), `None` when it has none.
    /// Allowed exactly when listing the owner's (account's) keys is ([`Operation::GetPool`]).
    pub async fn pool(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        account: Option<&str>,
    ) -> Result<Option<UsageLimits>, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = account.map(|a| validate_id("account", a)).transpose()?;
        let listed = account.or(caller.account());
        authorize(
            caller,
            Operation::GetPool,
            &Target::Keys {
                owner,
                account: listed,
            },
        )?;
        let pool = match account {
            Some(account) => PoolId::account(owner, account),
            None => PoolId::owner(owner),
        };
        Ok(self.store.pool(&pool).await?)
    }

    /// Sets the limits of a shared pool (the owner's with `account` `None`), or removes it with
    /// `None`: every key of the owner (account) counts against it from its next request, on
    /// every instance (I3). Needs the master key ([`Operation::SetPool`]): a pool binds keys
    /// outside any scoped key's subtree. New credits are set now.
    pub async fn set_pool(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        account: Option<&str>,
        limits: Option<UsageLimits>,
    ) -> Result<Option<UsageLimits>, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = account.map(|a| validate_id("account", a)).transpose()?;
        if let Some(limits) = &limits {
            validate_rate_limit(limits.rate_limit)?;
            validate_credits(limits.credits)?;
        }
        self.authorize_recorded(
            caller,
            Operation::SetPool,
            &Target::Keys { owner, account },
            None,
        )
        .await?;
        let pool = match account {
            Some(account) => PoolId::account(owner, account),
            None => PoolId::owner(owner),
        };
        let limits = limits
            .filter(|l| !l.is_unlimited())
            .map(|l| start_now(l, OffsetDateTime::now_utc()));
        let journal = Journal::of(self.pool_event(caller, &pool, limits.as_ref()));
        match self
            .store
            .set_pool_with(&pool, limits, false, &journal)
            .await
        {
            Ok(_) => {}
            Err(error) if error.kind() == StoreErrorKind::Unsupported => {
                return Err(AuthError::invalid("this key store has no shared pools"));
            }
            Err(error) => return Err(error.into()),
        }
        self.invalidate_pool_members(&pool).await?;
        tracing::info!(owner = %pool.owner, account = ?pool.account, "API key pool set");
        Ok(limits)
    }

    /// The `pool.set` event of `pool` getting `limits` (`None`: removed).
    fn pool_event(
        &self,
        caller: &Principal,
        pool: &PoolId,
        limits: Option<&UsageLimits>,
    ) -> EventDraft {
        let mut draft = self
            .draft(caller, EventType::POOL_SET, &pool.owner)
            .detail(
                "pool",
                if pool.account.is_some() {
                    "account"
                } else {
                    "owner"
                },
            )
            .detail("removed", limits.is_none());
        draft.account_id = pool.account.as_deref().map(str::to_owned);
        if let Some(limits) = limits {
            draft.details.insert(
                "rate_limit".into(),
                limits.rate_limit.map_or(
                    serde_json::Value::Null,
                    |r| serde_json::json!({"limit": r.limit, "period_seconds": r.period_seconds}),
                ),
            );
            draft.details.insert(
                "credits".into(),
                limits
                    .credits
                    .map_or(serde_json::Value::Null, |c| c.remaining.into()),
            );
        }
        draft
    }

    /// Forgets every cached key of the pool's owner (and account): their budgets changed.
    async fn invalidate_pool_members(&self, pool: &PoolId) -> Result<(), AuthError> {
        const PAGE: u32 = 500;
        let mut query = ListQuery {
            owner: pool.owner.to_string(),
            account: pool.account.as_deref().map(str::to_owned),
            before: None,
            limit: PAGE,
        };
        loop {
            let page = self.store.list(&query).await?;
            if let Some(first) = page.first() {
                self.invalidate_records(&first.id, page.iter()).await;
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => query.before = Some(last.id.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Forgets every affected key here and tells the other instances, in one broadcast (several
    /// for a cascade over more than [`DIGESTS_PER_INVALIDATION`] digests).
    async fn invalidate(&self, change: &KeyChange) -> Receipt {
        self.invalidate_records(&change.before.id, change.affected())
            .await
    }

    /// Forgets every digest of `records` here and tells the other instances (in broadcasts of at
    /// most [`DIGESTS_PER_INVALIDATION`] digests, each naming `key_id`), then waits for every live
    /// instance to acknowledge the last one (sequence numbers apply in order), up to the
    /// [deadline](Self::acknowledgement_deadline).
    async fn invalidate_records<'a>(
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
        for invalidation in &invalidations {
            invalidation.forget(&self.resolver);
        }
        // Requests in flight under the changed keys end here before the change is broadcast and
        // the call returns (I4).
        self.resolver.settle(&digests).await;
        let mut last = None;
        for invalidation in &invalidations {
            match self.invalidator.publish_sequenced(invalidation).await {
                Ok(published) => last = published.or(last),
                Err(error) => {
                    tracing::warn!(%error, api_key_id = %key_id, "broadcasting an API key change failed; other instances will catch up when their cache entries expire");
                }
            }
        }
        self.receipt_for(last).await
    }
}

/// `limits` with its credits counted from `now`.
fn start_now(limits: UsageLimits, now: OffsetDateTime) -> UsageLimits {
    UsageLimits {
        rate_limit: limits.rate_limit,
        credits: limits.credits.map(|c| c.set_at(now)),
    }
}

/// The limits of a key `caller` gives `rate_limit` and `credits` (set now): what a scoped caller
/// has fills what is not given, so a delegate is never unlimited where its creator is limited.
fn inherit(
    caller: &Principal,
    rate_limit: Option<RateLimit>,
    credits: Option<Credits>,
    now: OffsetDateTime,
) -> UsageLimits {
    let own = caller.limits();
    UsageLimits {
        rate_limit: rate_limit.or(own.rate_limit),
        credits: credits
            .or_else(|| own.credits.map(|c| c.refreshed(now)))
            .map(|c| c.set_at(now)),
    }
}
