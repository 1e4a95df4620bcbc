//! The one authorization rule of key management: [`authorize`].
//!
//! Every [`KeyManager`](crate::manage::KeyManager) operation, and so every route of the management
//! [`router`](crate::manage::router), asks [`authorize`] before it reads a key's metadata for a caller or
//! changes anything. A new operation joins the rule with one [`Operation`] variant and one row in
//! [`Operation::kind`].
//!
//! ```
//! use tower_api_keys::manage::{KeyFacts, Operation, Target, authorize};
//! use tower_api_keys::error::ErrorCode;
//! use tower_api_keys::key::KeyId;
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::scope::ScopeSet;
//!
//! let (parent, caller, child, sibling) =
//!     (KeyId::new("key_0"), KeyId::new("key_1"), KeyId::new("key_2"), KeyId::new("key_3"));
//! let scopes: ScopeSet = "api-keys:write ledgers:read".parse().unwrap();
//! let principal = Principal::scoped(caller.clone(), "ci", "payments", "acct_1", scopes.clone(), None);
//! let key = |lineage| KeyFacts {
//!     owner: "payments", account: "acct_1", scopes: &scopes, expires_at: None,
//!     limits: Default::default(), allowed_networks: None, lineage,
//! };
//!
//! // The caller created `child`: it governs it.
//! let mine = [child.clone(), caller.clone(), parent.clone()];
//! let target = Target::Key { named_owner: None, key: Some(key(&mine)) };
//! assert!(authorize(&principal, Operation::Rotate, &target).is_ok());
//!
//! // An equal sibling (also made by `parent`) is outside the caller's subtree: it may read it,
//! // but neither rotate it (and so obtain its secret) nor change it.
//! let theirs = [sibling.clone(), parent.clone()];
//! let target = Target::Key { named_owner: None, key: Some(key(&theirs)) };
//! let refused = authorize(&principal, Operation::Rotate, &target).unwrap_err();
//! assert_eq!(refused.code(), ErrorCode::OutsideSubtree);
//! assert!(authorize(&principal, Operation::Get, &target).is_ok());
//!
//! // Nor its own creator.
//! let above = [parent.clone()];
//! let target = Target::Key { named_owner: None, key: Some(key(&above)) };
//! let refused = authorize(&principal, Operation::Update, &target).unwrap_err();
//! assert_eq!(refused.code(), ErrorCode::OutsideSubtree);
//!
//! // A new key is the caller's child, and gets no scope the caller lacks.
//! let broad: ScopeSet = "*:*".parse().unwrap();
//! let new = [KeyId::new("key_4"), caller.clone(), parent.clone()];
//! let target = Target::NewKey(KeyFacts { scopes: &broad, ..key(&new) });
//! let refused = authorize(&principal, Operation::Create, &target).unwrap_err();
//! assert_eq!(refused.code(), ErrorCode::ScopeEscalation);
//! ```

use time::OffsetDateTime;

use crate::error::AuthError;
use crate::key::KeyId;
use crate::limits::UsageLimits;
use crate::network::Networks;
use crate::principal::Principal;
use crate::record::{KeyRecord, MAX_DELEGATION_DEPTH};
use crate::scope::ScopeMatch;
use crate::scope::{Scope, ScopeSet};

/// Something a caller asks to do with keys. Each has one row in the rule (see [`authorize`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// List one owner's keys (`GET /api-keys`).
    List,
    /// Read one key's metadata (`GET /api-keys/{id}`).
    Get,
    /// Create a key, receiving its secret (`POST /api-keys`).
    Create,
    /// Give a key a new secret, receiving it (`POST /api-keys/{id}/rotate`).
    Rotate,
    /// Revoke a key and its descendants (`DELETE /api-keys/{id}`).
    Revoke,
    /// Change a key's name, rate limit or credits (`PATCH /api-keys/{id}`).
    Update,
    /// Delete a key's record and revoke its descendants (`DELETE /api-keys/{id}?permanent=true`).
    Delete,
    /// Read the limits of an owner's or account's shared pool (`GET /api-keys/pools`).
    GetPool,
    /// Set or remove a shared pool (`PUT /api-keys/pools`): it binds every key of the owner or
    /// account, ancestors and strangers included, so it is beyond any scoped key's subtree.
    SetPool,
    /// Read the audit events and usage counts of a key (`GET /api-keys/{id}/events`,
    /// `GET /api-keys/{id}/usage`) or of an owner (`GET /api-keys/events`): a scoped key reads
    /// those of its own subtree only (I1: what it governs is what it may watch).
    ReadActivity,
    /// Check an owner's whole audit chain (`GET /api-keys/events/verify`): it covers keys
    /// outside any scoped key's subtree.
    VerifyEvents,
    /// List every owner with its key counts (`GET /api-keys/owners`): it spans every owner.
    ListOwners,
    /// Register a webhook endpoint for an owner (`POST /api-keys/webhooks`), receiving its
    /// signing secret. An endpoint a scoped key registers receives events about that key's
    /// subtree only, and only while the key is active: what it can watch is what it governs (I1).
    RegisterWebhook,
    /// List an owner's webhook endpoints (`GET /api-keys/webhooks`): a scoped key sees those it
    /// may manage only.
    ListWebhooks,
    /// Delete an endpoint, rotate its secret (receiving it), or read its delivery log
    /// (`/api-keys/webhooks/{id}/...`). The target is the key that registered the endpoint: a
    /// scoped key manages endpoints registered inside its subtree only; an endpoint the master
    /// key registered (it receives the whole owner's events) is the master key's alone.
    ManageWebhook,
}

/// How the rule judges an [`Operation`]: the `kind` column of the table in [`authorize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OperationKind {
    /// Shows metadata, never a secret: needs `api-keys:read` (or `api-keys:write`).
    Read,
    /// Hands out a secret or grants, or destroys: needs `api-keys:write`, and the target may have
    /// no scope the caller lacks, and may not outlive the caller.
    Power,
    /// Needs the master key.
    Master,
}

impl Operation {
    /// The rule's table, one row per operation.
    pub const fn kind(self) -> OperationKind {
        match self {
            Self::List | Self::Get | Self::GetPool | Self::ReadActivity => OperationKind::Read,
            Self::Create
            | Self::Rotate
            | Self::Revoke
            | Self::Update
            | Self::RegisterWebhook
            | Self::ListWebhooks
            | Self::ManageWebhook => OperationKind::Power,
            Self::Delete | Self::SetPool | Self::VerifyEvents | Self::ListOwners => {
                OperationKind::Master
            }
        }
    }

    /// Whether a scoped caller may do it only inside its own subtree (I1): every power operation,
    /// and reading a key's activity. The rule needs the target's whole lineage for these.
    pub const fn in_subtree(self) -> bool {
        matches!(self.kind(), OperationKind::Power) || matches!(self, Self::ReadActivity)
    }

    /// Whether the operation grants usage limits (rate limit, credits) to the target: those may be
    /// no looser than the caller's.
    const fn grants_limits(self) -> bool {
        matches!(self, Self::Create | Self::Update)
    }

    /// The verb used in refusals ("cannot rotate a key ...").
    pub(crate) const fn verb(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Get => "read",
            Self::Create => "create",
            Self::Rotate => "rotate",
            Self::Revoke => "revoke",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::GetPool => "read the pool of",
            Self::SetPool => "set the pool of",
            Self::ReadActivity => "read the activity of",
            Self::VerifyEvents => "verify the events of",
            Self::ListOwners => "list the owners of",
            Self::RegisterWebhook => "register a webhook for",
            Self::ListWebhooks => "list the webhooks of",
            Self::ManageWebhook => "manage a webhook registered by",
        }
    }
}

/// What the rule looks at in a key: where it lives, what it holds, when it ends, where it may be
/// used from, and whose subtree it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFacts<'a> {
    /// Its owner.
    pub owner: &'a str,
    /// Its account.
    pub account: &'a str,
    /// Its scopes.
    pub scopes: &'a ScopeSet,
    /// Its expiry (`None`: never).
    pub expires_at: Option<OffsetDateTime>,
    /// Its rate limit and credits, as the operation leaves them. For an update, a field the
    /// update does not change is not granted by it: pass the caller's own there.
    pub limits: UsageLimits,
    /// Where it may be used from (`None`: anywhere).
    pub allowed_networks: Option<&'a Networks>,
    /// Its lineage: its own id first, then its ancestors' ids, nearest first (its creator, its
    /// creator's creator, ...; [`KeyStore::ancestors`](crate::store::KeyStore::ancestors)). The
    /// subtree of a key `k` is every key whose lineage holds `k`.
    pub lineage: &'a [KeyId],
}

impl<'a> KeyFacts<'a> {
    /// The facts of a stored key whose lineage (its id, then its ancestors') is `lineage`.
    pub fn of(record: &'a KeyRecord, lineage: &'a [KeyId]) -> Self {
        Self {
            owner: &record.owner,
            account: &record.account,
            scopes: &record.scopes,
            expires_at: record.expires_at,
            limits: record.limits,
            allowed_networks: record.allowed_networks.as_ref(),
            lineage,
        }
    }

    /// How many ancestors the key has (0 for a key the master key created).
    pub fn depth(&self) -> usize {
        self.lineage.len().saturating_sub(1)
    }
}

/// What an [`Operation`] acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// The keys of one owner (list), limited to one account when `account` is set.
    Keys {
        /// The owner whose keys are listed (the one the request names, else the caller's).
        owner: &'a str,
        /// The account the listing is limited to, if any.
        account: Option<&'a str>,
    },
    /// A key about to be created, as it will be stored (owner, account and expiry defaults filled
    /// in).
    NewKey(KeyFacts<'a>),
    /// An existing key addressed by id (get, rotate, revoke, delete).
    Key {
        /// The owner the request names (`?owner=`), if it names one.
        named_owner: Option<&'a str>,
        /// The key; `None` when the id is unknown.
        key: Option<KeyFacts<'a>>,
    },
}

/// The rule: may `caller` perform `operation` on `target`?
///
/// It judges what a caller can **end up holding**, not one operation at a time, and holds three
/// invariants (the model-based test `tests/authorization_model.rs` checks them literally after
/// every step of random operation sequences):
///
/// - **I1, containment.** A scoped key governs its own *subtree* only: itself and the keys it
///   created, transitively ([`KeyFacts::lineage`]). Every operation that changes a key or hands
///   out its secret (rotate, revoke, update; every power operation added later) on a key outside
///   the caller's subtree is refused: 404 `APIKEY_NOT_FOUND` where the caller may not even read
///   the key (another owner or account), else 403 `AUTH_OUTSIDE_SUBTREE`. So every secret a
///   scoped key can obtain belongs to its subtree, and revoking a key (which cascades to its
///   subtree) ends everything it ever obtained. Reading (get, list) stays owner- and
///   account-wide, as in Blnk. A hard-deleted key's record is gone and the lineage through it
///   with it: the keys below it (revoked by the deletion) are nobody's subtree but their own.
/// - **I2, grants only narrow.** A key's grants are one family: scopes, expiry (the end of a
///   rotation grace included), usage limits and networks. What a power operation leaves a key
///   holding lies within the caller's own grants: scopes covered, expiry no later, limits no
///   looser, networks within, and the delegation no deeper than
///   [`MAX_DELEGATION_DEPTH`](crate::store::MAX_DELEGATION_DEPTH). By I1 no descendant ever
///   changes an ancestor, and a key changing itself can only tighten (its own grants are the
///   bound).
/// - **I3, a budget binds a subtree.** Not decided here but by what the resolver attaches to
///   every principal ([`Budget`](crate::limits::Budget)): a request of any key of `K`'s subtree
///   counts against `K`'s rate limit and spends `K`'s credits, all levels at once or none. This
///   rule keeps the budget honest: a key cannot refill or loosen an ancestor (I1), and what it
///   gives a descendant is drawn from its own budget anyway.
///
/// **The master key may do everything**; an id-addressed key that does not exist, or whose owner
/// differs from the `owner` the request names, is `404 APIKEY_NOT_FOUND`. A **scoped key** acts
/// only inside its own owner and its own account, and what it may do is this table (checked in
/// this order; the first failing check answers):
///
/// | operation | kind | 1. scope needed | 2. outside the caller's owner/account | 3. subtree (I1) | 4. grants (I2) |
/// |---|---|---|---|---|---|
/// | list   | read   | `api-keys:read` or `api-keys:write` | naming another owner: 403 `AUTH_CROSS_OWNER_ACCESS`; the listing is limited to the caller's account | — | — |
/// | get    | read   | `api-keys:read` or `api-keys:write` | naming another owner (`?owner=`): 403 `AUTH_CROSS_OWNER_ACCESS`; a key of another owner or account: 404 `APIKEY_NOT_FOUND` | — | — |
/// | create | power  | `api-keys:write` | naming another owner or account: 403 `AUTH_CROSS_OWNER_ACCESS` | a new child of the caller: always inside | within, and no deeper than the cap |
/// | rotate | power  | `api-keys:write` | as get | 403 `AUTH_OUTSIDE_SUBTREE` | within |
/// | revoke | power  | `api-keys:write` | as get | 403 `AUTH_OUTSIDE_SUBTREE` | within |
/// | update | power  | `api-keys:write` | as get | 403 `AUTH_OUTSIDE_SUBTREE` | within, limits no looser |
/// | delete | master | the master key: 403 `AUTH_MASTER_KEY_REQUIRED` | — | — | — |
/// | get pool | read | `api-keys:read` or `api-keys:write` | as list | — | — |
/// | set pool | master | the master key: 403 `AUTH_MASTER_KEY_REQUIRED` | — | — | — |
/// | read activity (a key's) | read | `api-keys:read` or `api-keys:write` | as get | 403 `AUTH_OUTSIDE_SUBTREE` | — |
/// | read activity (an owner's) | read | `api-keys:read` or `api-keys:write` | as list; the manager then shows only the events of the caller's subtree | — | — |
/// | verify events | master | the master key: 403 `AUTH_MASTER_KEY_REQUIRED` | — | — | — |
/// | list owners | master | the master key: 403 `AUTH_MASTER_KEY_REQUIRED` | — | — | — |
/// | register webhook | power | `api-keys:write` | naming another owner: 403 `AUTH_CROSS_OWNER_ACCESS` | the endpoint receives events of the caller's subtree only | — |
/// | list webhooks | power | `api-keys:write` | as list; the listing shows only endpoints the caller may manage | — | — |
/// | manage webhook (delete, rotate its secret, read deliveries); the target is the registering key | power | `api-keys:write` | as get (an endpoint of another owner, or one the master key registered: 404) | 403 `AUTH_OUTSIDE_SUBTREE` | within |
///
/// A missing scope is 403 `AUTH_INSUFFICIENT_PERMISSIONS`. "Within" (403 `AUTH_SCOPE_ESCALATION`
/// otherwise): the caller's scopes cover every scope of the target (`ledgers:*` covers
/// `ledgers:read`; `*:read` covers every read); the target's expiry is no later than the
/// caller's *effective* expiry ([`Principal::expires_at`]: the key's own, or the end of the
/// rotation grace period of the old secret it authenticated with, if earlier), a target that
/// never expires being later than any expiring caller; where the caller has allowed networks,
/// the target's lie within them ([`Networks::within`]). Inside its subtree a caller normally
/// holds all of this by construction; the checks stay, because the master key may have changed a
/// descendant since. An operation that grants usage limits (create, update) must also leave the
/// target's no looser than the caller's ([`UsageLimits::looser_than`]): where the caller has a
/// rate limit, the target has one with no bigger burst and no faster rate; where the caller has
/// credits, the target has no more than the caller has left now and no bigger or more frequent
/// refill.
///
/// Hard deletion erases a key's record, so it stays with the master key: a leaked
/// `api-keys:write` key can revoke (inside its subtree), which is visible and keeps the record,
/// but cannot make a key disappear.
///
/// What the rule does not decide, because it is not about the caller: input syntax and bounds
/// (400 `APIKEY_INVALID`, checked before the rule), a master-key call without an owner (400
/// `APIKEY_OWNER_REQUIRED`), the state of the target (rotating a revoked or expired key is a 400,
/// checked after the rule), the policy's limits (409). Revoking or deleting a key also revokes its
/// descendants: they are in its subtree.
pub fn authorize(
    caller: &Principal,
    operation: Operation,
    target: &Target<'_>,
) -> Result<(), AuthError> {
    if caller.is_master() {
        return match target {
            Target::Key { key: None, .. } => Err(AuthError::NotFound),
            Target::Key {
                named_owner: Some(named),
                key: Some(key),
            } if *named != key.owner => Err(AuthError::NotFound),
            _ => Ok(()),
        };
    }
    let kind = operation.kind();
    // 1. The scope the operation needs.
    match kind {
        OperationKind::Master => return Err(AuthError::MasterKeyRequired),
        OperationKind::Read if holds(caller, READ) || holds(caller, WRITE) => {}
        OperationKind::Power if holds(caller, WRITE) => {}
        OperationKind::Read => return Err(missing(READ)),
        OperationKind::Power => return Err(missing(WRITE)),
    }
    // 2. Inside the caller's owner and account.
    let inside = |owner: &str, account: Option<&str>| {
        caller.owner() == Some(owner) && caller.account().is_none_or(|own| account == Some(own))
    };
    let key = match *target {
        Target::Keys { owner, account } => {
            return if inside(owner, account) {
                Ok(())
            } else {
                Err(AuthError::CrossOwnerAccess)
            };
        }
        Target::NewKey(key) if !inside(key.owner, Some(key.account)) => {
            return Err(AuthError::CrossOwnerAccess);
        }
        Target::NewKey(key) => key,
        Target::Key {
            named_owner: Some(named),
            ..
        } if caller.owner() != Some(named) => return Err(AuthError::CrossOwnerAccess),
        Target::Key { key: None, .. } => return Err(AuthError::NotFound),
        Target::Key { key: Some(key), .. } if !inside(key.owner, Some(key.account)) => {
            return Err(AuthError::NotFound);
        }
        Target::Key { key: Some(key), .. } => key,
    };
    if !operation.in_subtree() {
        return Ok(());
    }
    // 3. Inside the caller's subtree (I1). A new key's lineage starts with its creator.
    let subtree = match target {
        Target::NewKey(_) => key.lineage.get(1) == Some(caller.key_id()),
        _ => key.lineage.contains(caller.key_id()),
    };
    if !subtree {
        return Err(AuthError::OutsideSubtree(
            format!(
                "cannot {} a key outside the calling key's subtree (only the calling key and the \
                 keys it created, directly or through its delegates)",
                operation.verb()
            )
            .into(),
        ));
    }
    if kind != OperationKind::Power {
        return Ok(());
    }
    // 4. Grants only narrow (I2).
    let escalation = |what: &str| {
        Err(AuthError::ScopeEscalation(
            format!("cannot {} a key {what}", operation.verb()).into(),
        ))
    };
    if !caller.scopes().covers(key.scopes) {
        let missing: Vec<&str> = caller
            .scopes()
            .uncovered(key.scopes)
            .map(Scope::as_str)
            .collect();
        return escalation(&format!(
            "with scopes the calling key does not hold: {}",
            missing.join(", ")
        ));
    }
    if operation.grants_limits()
        && let Some(what) = key
            .limits
            .looser_than(caller.limits(), OffsetDateTime::now_utc())
    {
        return escalation(&format!("with a {what} beyond the calling key's"));
    }
    if let Some(limit) = caller.expires_at()
        && key.expires_at.is_none_or(|at| at > limit)
    {
        return escalation("that expires after the calling key");
    }
    if !crate::network::within(key.allowed_networks, caller.allowed_networks()) {
        return escalation("usable from networks the calling key is not allowed from");
    }
    if matches!(target, Target::NewKey(_)) && key.depth() > MAX_DELEGATION_DEPTH {
        return escalation(&format!(
            "more than {MAX_DELEGATION_DEPTH} delegations below a key the master key created"
        ));
    }
    Ok(())
}

const READ: &str = "api-keys:read";
const WRITE: &str = "api-keys:write";

fn holds(caller: &Principal, scope: &str) -> bool {
    Scope::parse(scope).is_ok_and(|scope| caller.allows(&scope))
}

fn missing(scope: &str) -> AuthError {
    AuthError::InsufficientPermissions {
        required: ScopeSet::from(Scope::parse(scope).expect("a valid constant scope")),
        mode: ScopeMatch::All,
    }
}

#[cfg(test)]
mod tests;
