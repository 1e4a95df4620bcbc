//! What the cache holds for a digest: a known key ([`ResolvedKey`]: its ready-made principal and
//! what is checked on every request) or an unknown one ([`CacheEntry::Unknown`]).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::clock::nanos_of;
#[cfg(test)]
use crate::clock::now_unix_nanos;
use crate::error::{AuthError, ExpiredReason, InvalidKeyReason};
use crate::key::{KeyDigest, KeyId};
use crate::life::Registry;
use crate::limits::{Budget, BudgetId, BudgetLevel};
use crate::principal::Principal;
use crate::store::KeyRecord;
use crate::usage::{UsageMark, Used};

use super::intern;

/// A key as the cache holds it: the ready-made principal and what must be checked per request.
pub(crate) struct ResolvedKey {
    pub(crate) principal: Principal,
    /// Effective expiry in Unix nanoseconds (`i64::MAX`: never): the key's own, or the end of a
    /// rotation grace period if that is earlier. Compared with the hot path's clock
    /// ([`crate::clock`]) without a calendar conversion.
    pub(super) expires_at: i64,
    /// When the store lookup that produced this answer started, in Unix nanoseconds: the age that
    /// degraded mode looks at.
    pub(super) read_at: i64,
    /// When this answer stops being cacheable (read + TTL, or the expiry if sooner), in Unix
    /// nanoseconds: the cache and the per-thread front never serve it past this.
    pub(super) cached_until: i64,
    pub(super) revoked: bool,
    /// Last use not yet flushed; owned by [`crate::usage`].
    pub(super) usage: UsageMark,
}

impl Used for ResolvedKey {
    fn usage(&self) -> &UsageMark {
        &self.usage
    }

    fn key_id(&self) -> &KeyId {
        self.principal.key_id()
    }
}

/// The expiry a request authenticated with `digest` carries: the record's, or the end of the
/// rotation grace period when `digest` is the previous secret's and that is earlier.
pub(super) fn effective_expiry(record: &KeyRecord, digest: &KeyDigest) -> Option<OffsetDateTime> {
    let grace_end = record
        .previous
        .as_ref()
        .filter(|previous| previous.digest == *digest && record.digest != *digest)
        .map(|previous| previous.valid_until);
    match (record.expires_at, grace_end) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl ResolvedKey {
    pub(super) fn from_record(
        record: &KeyRecord,
        digest: &KeyDigest,
        above: Vec<BudgetLevel>,
        ttl: Duration,
        read_at: i64,
        shared: &intern::Interner,
        lives: &Arc<Registry>,
    ) -> Self {
        let effective = effective_expiry(record, digest);
        let expires_at = effective.map_or(i64::MAX, nanos_of);
        let revoked = record.revoked_at.is_some();
        // A live key shares the life of the requests already admitted with it; a re-read that
        // finds it ended ends them too.
        let life = if revoked {
            lives.end(digest, ExpiredReason::Revoked);
            Registry::ended(digest, &record.id, ExpiredReason::Revoked)
        } else if expires_at <= read_at {
            lives.end(digest, ExpiredReason::Expired);
            Registry::ended(digest, &record.id, ExpiredReason::Expired)
        } else {
            lives.life(digest, &record.id, expires_at)
        };
        let mut cached_until = read_at.saturating_add(saturating_nanos(ttl));
        // A live key is dropped from the cache when it expires; an already expired or revoked key
        // stays cached as such for the TTL: it cannot come back.
        if !revoked && expires_at > read_at {
            cached_until = cached_until.min(expires_at);
        }
        Self {
            principal: Principal::scoped(
                record.id.clone(),
                record.name.as_str(),
                shared.string(&record.owner),
                shared.string(&record.account),
                shared.scopes(&record.scopes),
                effective,
            )
            .with_limits(record.limits)
            .with_budget(Budget::new(
                std::iter::once(BudgetLevel {
                    id: BudgetId::Key(record.id.clone()),
                    limits: record.limits,
                })
                .chain(above),
            ))
            .with_networks(record.allowed_networks.clone())
            .with_life(life),
            expires_at,
            read_at,
            cached_until,
            revoked,
            usage: UsageMark::default(),
        }
    }

    /// A live key with the given lifetime (cache tests).
    #[cfg(test)]
    pub(super) fn for_test(id: KeyId, cached_until: i64) -> Self {
        Self {
            principal: Principal::scoped(
                id,
                "t",
                "o",
                "a",
                crate::scope::ScopeSet::default(),
                None,
            ),
            expires_at: i64::MAX,
            read_at: now_unix_nanos(),
            cached_until,
            revoked: false,
            usage: UsageMark::default(),
        }
    }

    /// The request-time check, done on every request, cached or not: revocation, and expiry at
    /// `now` (Unix nanoseconds).
    pub(crate) fn check(&self, now: i64) -> Result<(), AuthError> {
        if self.revoked {
            return Err(AuthError::ExpiredKey(ExpiredReason::Revoked));
        }
        if self.expires_at <= now {
            return Err(AuthError::ExpiredKey(ExpiredReason::Expired));
        }
        Ok(())
    }

    /// Whether this cached answer may still be served at `now`, given the degraded-mode floor
    /// (`i64::MIN` outside degraded mode).
    pub(super) fn servable(&self, now: i64, floor: i64) -> bool {
        self.cached_until > now && self.read_at > floor
    }
}

pub(super) fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// What the cache remembers about a digest.
#[derive(Clone)]
pub(crate) enum CacheEntry {
    Known(Arc<ResolvedKey>),
    /// No such key, as of `read_at` (Unix nanoseconds).
    Unknown {
        read_at: i64,
    },
}

/// The request-time check of a known key (unknown keys pass: nothing to count them against).
pub(super) fn key_check(entry: &CacheEntry, now: i64) -> Result<(), AuthError> {
    match entry {
        CacheEntry::Known(key) => key.check(now),
        CacheEntry::Unknown { .. } => Ok(()),
    }
}

impl CacheEntry {
    /// The request-time checks at `now` (Unix nanoseconds, see [`crate::clock`]).
    pub(crate) fn authenticate(&self, now: i64) -> Result<&Arc<ResolvedKey>, AuthError> {
        match self {
            Self::Known(key) => key.check(now).map(|()| key),
            Self::Unknown { .. } => Err(AuthError::InvalidKey(InvalidKeyReason::Unknown)),
        }
    }

    pub(super) fn servable(&self, now: i64, floor: i64) -> bool {
        match self {
            Self::Known(key) => key.servable(now, floor),
            Self::Unknown { read_at } => *read_at > floor,
        }
    }
}
