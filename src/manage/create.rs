//! Creating keys: [`KeyManager::create`], with the expiry and the usage limits a new key gets.

use time::OffsetDateTime;

use super::limits::inherit;
use super::manager::KeyManager;
use super::types::{CreateKey, CreatedKey};
use super::validate::{
    default_name, validate_credits, validate_id, validate_name, validate_rate_limit,
    validate_scopes,
};
use crate::audit::{EventType, Journal, grants};
use crate::authorize::{KeyFacts, Operation, Target};
use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::key::{DigestScheme, KeyId};
use crate::limits::{Credits, RateLimit, UsageLimits};
use crate::principal::Principal;
use crate::store::{KeyRecord, StoreErrorKind};

impl KeyManager {
    /// Creates a key and returns its plaintext, once. The key is delegated by `caller` (recorded
    /// in [`KeyInfo::created_by`](super::types::KeyInfo::created_by), unless it is the master
    /// key): it never outlives the caller and dies with it.
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
            .insert_with(&record, self.policy.key_limits(), now, &journal)
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
        let defaults = self.policy.default_usage();
        let caller = self.current(caller).await?;
        Ok(inherit(
            &caller,
            validate_rate_limit(rate_limit.or(defaults.rate_limit))?,
            validate_credits(credits.or(defaults.credits))?,
            now,
        ))
    }
}
