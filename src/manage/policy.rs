//! [`KeyPolicy`]: the rules new keys are created under.

use std::time::Duration;

use crate::quota::{Credits, PoolId, RateLimit, UsageLimits};
use crate::store::KeyLimits;

/// Rules for new keys: lifetimes and active-key limits (409 `APIKEY_LIMIT_REACHED`, enforced
/// atomically by the store). The fixed input bounds (name, scopes, page size, ...) are this module's
/// constants: see [Limits](super#limits).
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct KeyPolicy {
    pub(super) default_lifetime: Option<Duration>,
    pub(super) max_lifetime: Option<Duration>,
    pub(super) limits: KeyLimits,
    pub(super) usage: UsageLimits,
    account_pool: Option<UsageLimits>,
    owner_pool: Option<UsageLimits>,
}

impl Default for KeyPolicy {
    /// Keys never expire unless asked to, no lifetime cap, no limits.
    fn default() -> Self {
        Self {
            default_lifetime: None,
            max_lifetime: None,
            limits: KeyLimits::default(),
            usage: UsageLimits::NONE,
            account_pool: None,
            owner_pool: None,
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

    /// The pool `pool` starts with under this policy: the account or the owner default.
    pub fn pool_default(&self, pool: &PoolId) -> Option<UsageLimits> {
        match pool.account {
            Some(_) => self.account_pool,
            None => self.owner_pool,
        }
    }
}
