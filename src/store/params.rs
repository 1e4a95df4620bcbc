//! What [`KeyStore`](super::KeyStore)'s methods take: a page of keys ([`ListQuery`]), the sweeper's
//! query ([`SweepQuery`]), limits on active keys ([`KeyLimits`]), a rotation ([`Rotation`]) and an
//! update ([`KeyUpdate`]).

use time::OffsetDateTime;

use crate::key::{DigestScheme, KeyDigest, KeyId};
use crate::limits::Credits;
use crate::record::KeyRecord;

/// Maximum active (unrevoked, unexpired) keys, enforced by
/// [`KeyStore::insert`](super::KeyStore::insert) atomically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Per owner.
    pub per_owner: Option<u32>,
    /// Per account.
    pub per_account: Option<u32>,
}

/// A page of one owner's keys, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    /// Whose keys.
    pub owner: String,
    /// Only this account's keys, when set (a scoped caller sees its own account only).
    pub account: Option<String>,
    /// Only keys with an id lower (older) than this one: the cursor of the previous page.
    pub before: Option<KeyId>,
    /// At most this many.
    pub limit: u32,
}

/// A secret rotation for [`KeyStore::replace_secret`](super::KeyStore::replace_secret).
#[derive(Clone, Debug, PartialEq)]
pub struct Rotation {
    /// Digest of the new secret.
    pub digest: KeyDigest,
    /// How `digest` was computed.
    pub digest_scheme: DigestScheme,
    /// Masked form of the new secret.
    pub masked_key: String,
    /// When the rotation happened.
    pub rotated_at: OffsetDateTime,
    /// `Some(t)`: the old secret keeps working until `t`. `None`: it stops at once.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// Also revoke, at `rotated_at`, every key this one created (transitively): for a secret that
    /// may have leaked and minted keys.
    pub revoke_descendants: bool,
}

/// Which keys the hygiene sweeper reads ([`KeyStore::sweep`](super::KeyStore::sweep)): unrevoked
/// keys not yet expired at `now` that expire by `expiring_before` or were last used (never used:
/// created) by `idle_before`, in id order after `after`, at most `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepQuery {
    /// The time of the sweep.
    pub now: OffsetDateTime,
    /// Keys expiring at or before this (and after `now`).
    pub expiring_before: OffsetDateTime,
    /// Keys last used (or, never used, created) at or before this.
    pub idle_before: OffsetDateTime,
    /// The last id of the previous page.
    pub after: Option<KeyId>,
    /// Page size.
    pub limit: u32,
}

impl SweepQuery {
    /// Whether `record` is one the query asks for (ignoring `after` and `limit`).
    pub fn matches(&self, record: &KeyRecord) -> bool {
        record.is_active(self.now)
            && (record
                .expires_at
                .is_some_and(|at| at <= self.expiring_before)
                || record.last_used_at.unwrap_or(record.created_at) <= self.idle_before)
    }
}

/// A change of a key's name, rate limit or credits ([`KeyStore::update`](super::KeyStore::update));
/// `None` keeps a field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new rate limit; `Some(None)` removes it.
    pub rate_limit: Option<Option<crate::limits::RateLimit>>,
    /// New credits; `Some(None)` removes them.
    pub credits: Option<Option<Credits>>,
}

impl KeyUpdate {
    /// Applies the update to `record`.
    pub fn apply(&self, record: &mut KeyRecord) {
        if let Some(name) = &self.name {
            record.name.clone_from(name);
        }
        if let Some(rate_limit) = self.rate_limit {
            record.limits.rate_limit = rate_limit;
        }
        if let Some(credits) = self.credits {
            record.limits.credits = credits;
        }
    }
}
