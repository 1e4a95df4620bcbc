//! What a store holds of a key ([`KeyRecord`]) and what a change did to the keys ([`KeyChange`]):
//! plain data, shared by the stores, the audit trail and the resolver. Public as `store::KeyRecord`
//! and so on; defined here, below the store and the audit trail, because both speak of it.

use time::OffsetDateTime;

use crate::key::{DigestScheme, KeyDigest, KeyId};
use crate::limits::UsageLimits;
use crate::network::Networks;
use crate::scope::ScopeSet;

/// The deepest delegation: a key created by a master-created key is at depth 1, its own
/// creations at depth 2, and so on up to this. Bounded so that walking a key's ancestry (the
/// containment rule, its budget chain) is a bounded read, and a chain's budget decision a bounded
/// number of levels.
pub const MAX_DELEGATION_DEPTH: usize = 8;

/// One stored key: metadata and the digest of its secret.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    /// Stable public id.
    pub id: KeyId,
    /// Human-readable name.
    pub name: String,
    /// The team, service or tenant managing the key.
    pub owner: String,
    /// The tenancy boundary the key acts inside.
    pub account: String,
    /// What the key may do.
    pub scopes: ScopeSet,
    /// Digest of the current secret.
    pub digest: KeyDigest,
    /// How `digest` was computed.
    pub digest_scheme: DigestScheme,
    /// The masked form of the current secret, for listings (`sk_live_Ab3d…x9Qz`).
    pub masked_key: String,
    /// When the key was created.
    pub created_at: OffsetDateTime,
    /// When the key stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// When the key was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
    /// Last time the key authenticated a request (flushed in batches, so it lags a little).
    pub last_used_at: Option<OffsetDateTime>,
    /// The key that created this one, when it was delegated by a scoped key.
    pub created_by: Option<KeyId>,
    /// When the secret was last rotated.
    pub rotated_at: Option<OffsetDateTime>,
    /// The secret replaced by the last rotation, still valid during its grace period.
    pub previous: Option<PreviousSecret>,
    /// The key's rate limit and credits (none: unlimited). Stores keep `credits.remaining` current
    /// when they count credits ([`KeyStore::adjust_credits`](crate::store::KeyStore::adjust_credits)).
    pub limits: UsageLimits,
    /// Where the key may be used from (`None`: anywhere). Set at creation; a delegated key's lie
    /// within its creator's.
    pub allowed_networks: Option<Networks>,
}

/// A rotated-out secret that keeps working until `valid_until`.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviousSecret {
    /// Digest of the old secret.
    pub digest: KeyDigest,
    /// How `digest` was computed.
    pub digest_scheme: DigestScheme,
    /// End of the grace period.
    pub valid_until: OffsetDateTime,
}

impl KeyRecord {
    /// Whether the key counts against active-key limits at `now`: not revoked and not expired.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }

    /// Every digest that currently identifies this key (the current one, and a previous one during
    /// a rotation grace period): what a cache must forget when the key changes.
    pub fn digests(&self) -> impl Iterator<Item = &KeyDigest> {
        std::iter::once(&self.digest).chain(self.previous.as_ref().map(|p| &p.digest))
    }
}

/// What [`KeyStore::revoke`](crate::store::KeyStore::revoke),
/// [`KeyStore::delete`](crate::store::KeyStore::delete) and
/// [`KeyStore::replace_secret`](crate::store::KeyStore::replace_secret) changed, all in one atomic step:
/// what a cache must forget.
///
/// The *descendants* of a key are the keys it created (their [`KeyRecord::created_by`] is its id),
/// the keys those created, and so on.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyChange {
    /// The addressed key before the change.
    pub before: KeyRecord,
    /// The addressed key after the change; `None` when it was deleted.
    pub after: Option<KeyRecord>,
    /// The descendants this call revoked (those already revoked are left out), in no order.
    pub revoked_descendants: Vec<KeyRecord>,
}

impl KeyChange {
    /// Whether anything changed: `false` only for a revocation of a key that was already revoked
    /// and had no active descendant left (a no-op, which needs no cache invalidation).
    pub fn is_noop(&self) -> bool {
        self.revoked_descendants.is_empty() && self.after.as_ref() == Some(&self.before)
    }

    /// Every record whose cached answers are stale: the addressed key (as it was) and the revoked
    /// descendants.
    pub fn affected(&self) -> impl Iterator<Item = &KeyRecord> {
        std::iter::once(&self.before).chain(&self.revoked_descendants)
    }
}
