//! [`KeyPolicy`]: the rules new keys are created under.

use std::time::Duration;

use crate::limits::{Credits, PoolId, RateLimit, UsageLimits};
use crate::store::KeyLimits;

/// Rules for new keys: lifetimes, active-key limits (409 `APIKEY_LIMIT_REACHED`, enforced
/// atomically by the store), default usage limits and shared pools. The fixed input bounds (name,
/// scopes, page size, ...) are this module's constants: see [Limits](super#limits).
///
/// Plain data: each setting is set by the method of its name and read back from the field of the
/// same name (`KeyPolicy::default().max_lifetime(d)`, then `policy.max_lifetime`).
///
/// ```
/// use std::time::Duration;
/// use tower_api_keys::manage::KeyPolicy;
///
/// let policy = KeyPolicy::default()
///     .max_lifetime(Duration::from_secs(365 * 86_400))
///     .max_active_per_owner(5);
/// assert_eq!(policy.max_lifetime, Some(Duration::from_secs(365 * 86_400)));
/// assert_eq!(policy.max_active_per_owner, Some(5));
/// assert_eq!(policy.default_lifetime, None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct KeyPolicy {
    /// Lifetime of a key created without `expires_at` (`None`: it never expires, unless a maximum
    /// lifetime is set, which then applies).
    pub default_lifetime: Option<Duration>,
    /// Longest lifetime a key may have (`None`: no cap).
    pub max_lifetime: Option<Duration>,
    /// Most active (unrevoked, unexpired) keys per owner (`None`: no limit).
    pub max_active_per_owner: Option<u32>,
    /// Most active keys per account (`None`: no limit).
    pub max_active_per_account: Option<u32>,
    /// The rate limit of keys created without one (`None`: unlimited).
    pub default_rate_limit: Option<RateLimit>,
    /// The credits of keys created without any (`None`: unlimited; `set_at` is replaced by the
    /// creation time).
    pub default_credits: Option<Credits>,
    /// The shared pool every account starts with (`None`, or unlimited: none).
    pub account_pool: Option<UsageLimits>,
    /// The shared pool every owner starts with (`None`, or unlimited: none).
    pub owner_pool: Option<UsageLimits>,
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
        self.max_active_per_owner = Some(limit);
        self
    }

    /// Most active keys per account (e.g. 10, as Blecon).
    pub fn max_active_per_account(mut self, limit: u32) -> Self {
        self.max_active_per_account = Some(limit);
        self
    }

    /// The rate limit of keys created without one.
    pub fn default_rate_limit(mut self, limit: RateLimit) -> Self {
        self.default_rate_limit = Some(limit);
        self
    }

    /// The credits of keys created without any (`set_at` is replaced by the creation time).
    pub fn default_credits(mut self, credits: Credits) -> Self {
        self.default_credits = Some(credits);
        self
    }

    /// The shared pool every account starts with: all keys of one account together stay within
    /// `limits` (invariant I3 with a level above every key). Written for an account when its first
    /// key is created under this policy, if it has no pool yet; change one account's pool
    /// afterwards with [`KeyManager::set_pool`](super::KeyManager::set_pool).
    pub fn account_pool(mut self, limits: UsageLimits) -> Self {
        self.account_pool = Some(limits).filter(|l| !l.is_unlimited());
        self
    }

    /// The shared pool every owner starts with (see [`account_pool`](Self::account_pool)).
    pub fn owner_pool(mut self, limits: UsageLimits) -> Self {
        self.owner_pool = Some(limits).filter(|l| !l.is_unlimited());
        self
    }

    /// The active-key limits, as the store enforces them.
    pub(super) fn key_limits(&self) -> KeyLimits {
        KeyLimits {
            per_owner: self.max_active_per_owner,
            per_account: self.max_active_per_account,
        }
    }

    /// The rate limit and credits of keys created without them.
    pub(super) fn default_usage(&self) -> UsageLimits {
        UsageLimits {
            rate_limit: self.default_rate_limit,
            credits: self.default_credits,
        }
    }

    /// The pool `pool` starts with under this policy: the account or the owner default (an
    /// unlimited one is none).
    pub(super) fn pool_default(&self, pool: &PoolId) -> Option<UsageLimits> {
        match pool.account {
            Some(_) => self.account_pool,
            None => self.owner_pool,
        }
        .filter(|limits| !limits.is_unlimited())
    }
}
