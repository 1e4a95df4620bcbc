//! What key management takes and gives: requests ([`CreateKey`], [`UpdateKey`],
//! [`RotateOptions`]) and answers ([`KeyInfo`], [`CreatedKey`], [`KeyPage`]).

use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;

#[cfg(doc)]
use super::manager::KeyManager;
use crate::key::{ApiKey, KeyId};
use crate::limits::{Credits, RateLimit, UsageLimits};
use crate::network::Networks;
use crate::scope::ScopeSet;
use crate::store::KeyRecord;

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
    /// Where the key may be used from; defaults to anywhere (or, for a delegated key, its
    /// creator's networks). A delegated key's lie within its creator's.
    pub allowed_networks: Option<Networks>,
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

    /// Sets where the key may be used from.
    pub fn allowed_networks(mut self, networks: Networks) -> Self {
        self.allowed_networks = Some(networks);
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
    /// Where the key may be used from (`None`: anywhere).
    pub allowed_networks: Option<Networks>,
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
            allowed_networks: r.allowed_networks,
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
    /// How long the old secret keeps working (at most [`MAX_GRACE_PERIOD`](super::MAX_GRACE_PERIOD); `None` or zero: it
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

/// The reasons the crate itself revokes keys for, as recorded by
/// [`KeyManager::revoke_because`](super::KeyManager::revoke_because).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevokeReason {
    /// Someone asked (the management API, the console, the library).
    Requested,
    /// A secret scanner reported the key's secret as leaked.
    Leaked,
    /// The hygiene sweeper found the key unused for too long.
    Idle,
}

impl RevokeReason {
    /// The stable name: `requested`, `leaked`, `idle`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Leaked => "leaked",
            Self::Idle => "idle",
        }
    }
}
