//! Key lifecycle: [`KeyManager`] (library API) and, with feature `manage`, an axum router
//! ([`router`]) speaking Blnk's wire format.
//!
//! Every operation takes the acting [`Principal`] and asks one rule, [`authorize`], whether it
//! may (its documentation has the table): the master key may do everything (naming the owner it
//! acts for: `APIKEY_OWNER_REQUIRED`); a scoped key acts only inside its own owner and account,
//! reads with `api-keys:read`, and creates, rotates and revokes with `api-keys:write`, only keys
//! whose scopes it covers and which do not outlive it; hard deletion needs the master key.
//!
//! Keys a key created die with it: revoking or deleting a key revokes its descendants in the same
//! store transaction (and the store refuses a child whose creator is no longer active, so a
//! creation racing a revocation cannot leave a live orphan), and a delegated key's expiry is capped
//! at its creator's effective expiry. Revoke, delete and rotate invalidate the local
//! [`CachedResolver`] at once and publish an [`Invalidation`] for other instances; revoking an
//! already revoked key changes nothing and invalidates nothing.
//!
//! ## Limits
//!
//! Every input is bounded; past a bound the request is refused with 400 `APIKEY_INVALID` and a
//! message naming the bound, never truncated: a name of at most [`MAX_NAME_LEN`] characters, owner
//! and account ids of at most [`MAX_OWNER_LEN`] visible ASCII characters, 1 to [`MAX_SCOPES`] scopes
//! of at most [`MAX_SCOPE_LEN`](crate::scope::MAX_SCOPE_LEN) characters each, pages of 1 to [`MAX_PAGE_SIZE`] keys, cursors of at
//! most [`MAX_KEY_ID_LEN`] characters, a rotation grace period of at most [`MAX_GRACE_PERIOD`]. The
//! HTTP router reads bodies of at most [`MAX_BODY_BYTES`] (413 `REQUEST_BODY_TOO_LARGE` past it).
//! Lifetimes and active-key counts are the [`KeyPolicy`]'s.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_api_keys::error::AuthError> {
//! use std::sync::Arc;
//! use tower_api_keys::manage::{CreateKey, KeyManager, KeyPolicy};
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let manager = KeyManager::new(store, resolver.clone())
//!     .policy(KeyPolicy::default().max_active_per_owner(5));
//!
//! // Bootstrap with the master key: it must name the owner.
//! let created = manager
//!     .create(&Principal::master(), CreateKey::new(["ledgers:read", "api-keys:write"]).owner("payments"))
//!     .await?;
//! println!("give this to the payments team once: {}", created.key.expose_secret());
//!
//! // The new key authenticates...
//! let principal = resolver.authenticate(&created.key.digest()).await?;
//! assert_eq!(principal.owner(), Some("payments"));
//!
//! // ...and may delegate, but only what it holds.
//! let child = manager.create(&principal, CreateKey::new(["ledgers:read"])).await?;
//! assert_eq!(child.info.created_by.as_ref(), Some(&created.info.id));
//! assert!(manager.create(&principal, CreateKey::new(["*:*"])).await.is_err());
//!
//! manager.revoke(&Principal::master(), &child.info.id).await?;
//! assert!(resolver.authenticate(&child.key.digest()).await.is_err());
//! # Ok(())
//! # }
//! ```

mod authorize;
#[cfg(feature = "console")]
pub mod console;
#[cfg(feature = "manage")]
mod router;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

#[cfg(feature = "manage")]
pub use router::{openapi, router};

pub use authorize::{KeyFacts, Operation, OperationKind, Target, authorize};

use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::invalidate::{Invalidation, Invalidator, NoBroadcast};
use crate::key::{ApiKey, DigestScheme, KeyDigest, KeyId};
use crate::principal::Principal;
use crate::quota::{Credits, RateLimit, UsageLimits};
use crate::resolver::CachedResolver;
use crate::scope::ScopeSet;
use crate::store::{
    KeyChange, KeyLimits, KeyRecord, KeyStore, KeyUpdate, ListQuery, Rotation, StoreErrorKind,
};

// Input limits. Each one is refused with 400 `APIKEY_INVALID` and a message naming the limit, never
// truncated silently. The README's "Limits" table lists them with the layer's own.

/// Longest key name accepted, in characters (after trimming): 128.
pub const MAX_NAME_LEN: usize = 128;
/// Longest owner or account id accepted: 128 bytes of visible ASCII.
pub const MAX_OWNER_LEN: usize = 128;
/// Most scopes one key may hold: 64. Each scope is at most [`MAX_SCOPE_LEN`](crate::scope::MAX_SCOPE_LEN) bytes.
pub const MAX_SCOPES: usize = 64;
/// Largest page [`KeyManager::list`] returns: 100. A larger `limit` (or 0) is refused, not clamped,
/// so a client never mistakes a short page for the end of the list.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Largest request body the management router reads: 64 KiB (a create body at every other limit
/// is under 10 KiB). Larger bodies get 413 `REQUEST_BODY_TOO_LARGE`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Page size of `GET /api-keys` without `limit`: 50.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Longest rotation grace period: 30 days.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(30 * 86_400);
/// Longest key id accepted in a path or as a `before` cursor: 128 bytes. Longer ids are unknown (404)
/// in a path, and a 400 as a cursor.
pub const MAX_KEY_ID_LEN: usize = 128;

/// Rules for new keys: lifetimes and active-key limits (409 `APIKEY_LIMIT_REACHED`, enforced
/// atomically by the store). The fixed input bounds (name, scopes, page size, ...) are this module's
/// constants: see [Limits](self#limits).
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct KeyPolicy {
    default_lifetime: Option<Duration>,
    max_lifetime: Option<Duration>,
    limits: KeyLimits,
    usage: UsageLimits,
}

impl Default for KeyPolicy {
    /// Keys never expire unless asked to, no lifetime cap, no limits.
    fn default() -> Self {
        Self {
            default_lifetime: None,
            max_lifetime: None,
            limits: KeyLimits::default(),
            usage: UsageLimits::NONE,
        }
    }
}

impl KeyPolicy {
    /// Lifetime of a key created without `expires_at` (default: never expires, unless a maximum
    /// lifetime is set, which then applies).
    pub fn default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = Some(lifetime);
        self
    }

    /// Longest lifetime a key may have (e.g. 365 days, as Blecon). Keys without an expiry are then
    /// refused unless a default lifetime fills it in.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = Some(lifetime);
        self
    }

    /// Most active (unrevoked, unexpired) keys per owner (e.g. 5, as Blazelock).
    pub fn max_active_per_owner(mut self, limit: u32) -> Self {
        self.limits.per_owner = Some(limit);
        self
    }

    /// Most active keys per account (e.g. 10, as Blecon).
    pub fn max_active_per_account(mut self, limit: u32) -> Self {
        self.limits.per_account = Some(limit);
        self
    }

    /// The active-key limits.
    pub fn limits(&self) -> KeyLimits {
        self.limits
    }

    /// The lifetime of a key created without an expiry, if set.
    pub fn lifetime_default(&self) -> Option<Duration> {
        self.default_lifetime
    }

    /// The longest lifetime a key may have, if set.
    pub fn lifetime_max(&self) -> Option<Duration> {
        self.max_lifetime
    }

    /// The rate limit of keys created without one.
    pub fn default_rate_limit(mut self, limit: RateLimit) -> Self {
        self.usage.rate_limit = Some(limit);
        self
    }

    /// The credits of keys created without any (`set_at` is replaced by the creation time).
    pub fn default_credits(mut self, credits: Credits) -> Self {
        self.usage.credits = Some(credits);
        self
    }

    /// The rate limit and credits of keys created without them.
    pub fn default_usage(&self) -> UsageLimits {
        self.usage
    }
}

/// What to create. Build with [`CreateKey::new`] and the setters.
#[derive(Clone, Debug, Default, PartialEq)]
#[must_use]
pub struct CreateKey {
    /// Display name; defaults to a timestamp-based one.
    pub name: Option<String>,
    /// Owner; required with the master key, defaults to the caller's owner for a scoped key.
    pub owner: Option<String>,
    /// Account; defaults to the caller's account (scoped key) or the owner (master key).
    pub account: Option<String>,
    /// Scope strings, validated.
    pub scopes: Vec<String>,
    /// Expiry; defaults to the policy's default lifetime.
    pub expires_at: Option<OffsetDateTime>,
    /// Rate limit; defaults to the policy's (or, for a delegated key, its creator's).
    pub rate_limit: Option<RateLimit>,
    /// Credits (their `set_at` becomes the creation time); defaults to the policy's (or, for a
    /// delegated key, its creator's remaining).
    pub credits: Option<Credits>,
}

impl CreateKey {
    /// A request for a key holding `scopes`.
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            scopes: scopes.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the owner.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Sets the account.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// Sets the expiry.
    pub fn expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets the rate limit.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Sets the credits.
    pub fn credits(mut self, credits: Credits) -> Self {
        self.credits = Some(credits);
        self
    }
}

/// A change to a key ([`KeyManager::update`]): `None` keeps a field; `Some(None)` removes a rate
/// limit or credits.
#[derive(Clone, Debug, Default, PartialEq)]
#[must_use]
pub struct UpdateKey {
    /// A new name.
    pub name: Option<String>,
    /// A new rate limit, or `Some(None)` for none.
    pub rate_limit: Option<Option<RateLimit>>,
    /// New credits (their `set_at` becomes the update time), or `Some(None)` for none.
    pub credits: Option<Option<Credits>>,
}

/// A key's metadata as shown to people: never the secret, never the digest.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyInfo {
    /// Stable public id.
    pub id: KeyId,
    /// Display name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Account.
    pub account: String,
    /// Scopes.
    pub scopes: ScopeSet,
    /// Masked secret, e.g. `sk_live_Ab3d…x9Qz`.
    pub masked_key: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry, if any.
    pub expires_at: Option<OffsetDateTime>,
    /// Last use (flushed in batches).
    pub last_used_at: Option<OffsetDateTime>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// Last rotation time, if rotated.
    pub rotated_at: Option<OffsetDateTime>,
    /// The key that delegated this one, if a scoped key created it.
    pub created_by: Option<KeyId>,
    /// Rate limit and credits; `credits.remaining` as the store last counted it, a due refill
    /// applied.
    pub limits: UsageLimits,
}

impl From<KeyRecord> for KeyInfo {
    fn from(r: KeyRecord) -> Self {
        Self {
            id: r.id,
            name: r.name,
            owner: r.owner,
            account: r.account,
            scopes: r.scopes,
            masked_key: r.masked_key,
            created_at: r.created_at,
            expires_at: r.expires_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
            rotated_at: r.rotated_at,
            created_by: r.created_by,
            limits: UsageLimits {
                rate_limit: r.limits.rate_limit,
                credits: r
                    .limits
                    .credits
                    .map(|c| c.refreshed(OffsetDateTime::now_utc())),
            },
        }
    }
}

/// A newly created or rotated key: the plaintext, shown this once, and its metadata.
#[derive(Clone)]
pub struct CreatedKey {
    /// The plaintext secret. Hand it over once; it cannot be recovered.
    pub key: ApiKey,
    /// The key's metadata.
    pub info: KeyInfo,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &self.key)
            .field("info", &self.info)
            .finish()
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyPage {
    /// Keys, newest first.
    pub keys: Vec<KeyInfo>,
    /// Pass as `before` to get the next page; `None` on the last page.
    pub next_cursor: Option<KeyId>,
}

/// Creates, lists, revokes, deletes and rotates keys under a [`KeyPolicy`], enforcing owner context
/// and delegation rules. Cheap to clone.
#[derive(Clone)]
pub struct KeyManager {
    store: Arc<dyn KeyStore>,
    resolver: CachedResolver,
    invalidator: Arc<dyn Invalidator>,
    policy: Arc<KeyPolicy>,
}

impl fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// How [`KeyManager::rotate`] rotates. Converts from a grace period (`Option<Duration>` or
/// `Duration`).
///
/// `revoke_descendants` defaults to `false`: rotation is routine hygiene (scheduled, or when a
/// person leaves), and the keys a key delegated usually belong to other services, which a routine
/// rotation must not break. When the secret may have leaked, it may also have minted keys that
/// look like the legitimate ones: rotate with `revoke_descendants(true)` and no grace period (or
/// revoke the key, which always ends its descendants).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct RotateOptions {
    /// How long the old secret keeps working (at most [`MAX_GRACE_PERIOD`]; `None` or zero: it
    /// stops at once).
    pub grace: Option<Duration>,
    /// Also revoke every key this key created, transitively (default `false`).
    pub revoke_descendants: bool,
}

impl RotateOptions {
    /// Rotation without grace period, keeping the descendants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets the old secret keep working for `grace`.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Also revokes (or not) the keys this key created, transitively.
    pub fn revoke_descendants(mut self, revoke: bool) -> Self {
        self.revoke_descendants = revoke;
        self
    }
}

impl From<Option<Duration>> for RotateOptions {
    fn from(grace: Option<Duration>) -> Self {
        Self {
            grace,
            ..Self::default()
        }
    }
}

impl From<Duration> for RotateOptions {
    fn from(grace: Duration) -> Self {
        Self::from(Some(grace))
    }
}

/// Most digests in one broadcast [`Invalidation`]: its JSON then stays under PostgreSQL's
/// 8000-byte `NOTIFY` payload limit. A larger cascade is sent in several.
const DIGESTS_PER_INVALIDATION: usize = 96;

impl KeyManager {
    /// A manager over `store` that keeps `resolver`'s cache in step with every change. Keys are
    /// generated in the resolver's [`KeyFormat`](crate::key::KeyFormat).
    pub fn new(store: Arc<dyn KeyStore>, resolver: CachedResolver) -> Self {
        Self {
            store,
            resolver,
            invalidator: Arc::new(NoBroadcast),
            policy: Arc::new(KeyPolicy::default()),
        }
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
    async fn target(
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
        let target = Target::Key {
            named_owner,
            key: record.as_ref().map(KeyFacts::from),
        };
        authorize(caller, operation, &target)?;
        record.ok_or(AuthError::NotFound)
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
        authorize(
            caller,
            Operation::Create,
            &Target::NewKey(KeyFacts {
                owner: &owner,
                account: &account,
                scopes: &scopes,
                expires_at,
                limits,
            }),
        )?;
        let format = self.resolver.format();
        let key = format.generate();
        let record = KeyRecord {
            id: KeyId::generate(),
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
            allowed_networks: None,
        };
        if let Err(error) = self.store.insert(&record, self.policy.limits, now).await {
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
    fn expiry(
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
        self.target(caller, Operation::Revoke, id, owner).await?;
        let change = self
            .store
            .revoke(id, OffsetDateTime::now_utc())
            .await?
            .ok_or(AuthError::NotFound)?;
        if change.is_noop() {
            tracing::debug!(api_key_id = %id, "API key already revoked");
        } else {
            self.invalidate(&change).await;
            tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), "API key revoked");
        }
        Ok(change.after.unwrap_or(change.before).into())
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
        self.target(caller, Operation::Delete, id, owner).await?;
        let change = self
            .store
            .delete(id, OffsetDateTime::now_utc())
            .await?
            .ok_or(AuthError::NotFound)?;
        self.invalidate(&change).await;
        tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), "API key deleted");
        Ok(())
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
        let change = match self.store.replace_secret(id, &rotation).await {
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
        let target = Target::Key {
            named_owner: owner,
            key: old.as_ref().zip(judged).map(|(old, limits)| KeyFacts {
                limits,
                ..KeyFacts::from(old)
            }),
        };
        authorize(&caller, Operation::Update, &target)?;
        let (old, limits) = old.zip(limits).ok_or(AuthError::NotFound)?;
        let update = KeyUpdate {
            name,
            rate_limit: rate_limit.map(|_| limits.rate_limit),
            credits: credits.map(|_| limits.credits),
        };
        let record = self
            .store
            .update(id, &update)
            .await?
            .ok_or(AuthError::NotFound)?;
        self.invalidate(&KeyChange {
            before: old,
            after: Some(record.clone()),
            revoked_descendants: Vec::new(),
        })
        .await;
        tracing::info!(api_key_id = %record.id, "API key updated");
        Ok(record.into())
    }

    /// Forgets every affected key here and tells the other instances, in one broadcast (several
    /// for a cascade over more than [`DIGESTS_PER_INVALIDATION`] digests).
    async fn invalidate(&self, change: &KeyChange) {
        let key_id = &change.before.id;
        let digests: Vec<KeyDigest> = change
            .affected()
            .flat_map(KeyRecord::digests)
            .copied()
            .collect();
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
        for invalidation in &invalidations {
            if let Err(error) = self.invalidator.publish(invalidation).await {
                tracing::warn!(%error, api_key_id = %key_id, "broadcasting an API key change failed; other instances will catch up when their cache entries expire");
            }
        }
    }
}

fn default_name(now: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    format!("API key {}", now.format(&format).unwrap_or_default())
}

/// `rate_limit`, if it is within bounds (400 `APIKEY_INVALID` otherwise).
fn validate_rate_limit(rate_limit: Option<RateLimit>) -> Result<Option<RateLimit>, AuthError> {
    if let Some(limit) = &rate_limit {
        limit
            .validate()
            .map_err(|e| AuthError::invalid(e.to_string()))?;
    }
    Ok(rate_limit)
}

/// `credits`, if within bounds (400 `APIKEY_INVALID` otherwise).
fn validate_credits(credits: Option<Credits>) -> Result<Option<Credits>, AuthError> {
    if let Some(credits) = &credits {
        credits
            .validate()
            .map_err(|e| AuthError::invalid(e.to_string()))?;
    }
    Ok(credits)
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

fn validate_name(name: String) -> Result<String, AuthError> {
    // Counted before trimming, as the OpenAPI `maxLength` counts.
    if name.chars().count() > MAX_NAME_LEN {
        return Err(AuthError::invalid(format!(
            "name is longer than {MAX_NAME_LEN} characters"
        )));
    }
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(AuthError::invalid("name cannot be blank"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(AuthError::invalid("name cannot contain control characters"));
    }
    Ok(trimmed.to_owned())
}

fn validate_id<'a>(what: &'static str, value: &'a str) -> Result<&'a str, AuthError> {
    if value.is_empty()
        || value.len() > MAX_OWNER_LEN
        || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AuthError::invalid(format!(
            "{what} must be 1 to {MAX_OWNER_LEN} visible ASCII characters"
        )));
    }
    Ok(value)
}

fn validate_cursor(cursor: &str) -> Result<(), AuthError> {
    if cursor.is_empty()
        || cursor.len() > MAX_KEY_ID_LEN
        || !cursor.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AuthError::invalid(
            "before must be a key id, as sent in x-next-cursor",
        ));
    }
    Ok(())
}

fn validate_scopes(scopes: &[String]) -> Result<ScopeSet, AuthError> {
    if scopes.is_empty() {
        return Err(AuthError::invalid("a key needs at least one scope"));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(AuthError::invalid(format!(
            "a key holds at most {MAX_SCOPES} scopes"
        )));
    }
    ScopeSet::parse(scopes).map_err(|e| AuthError::invalid(e.to_string()))
}
