//! Where keys live: the [`KeyStore`] trait and its implementations.
//!
//! A store holds [`KeyRecord`]s: metadata plus the digest of the secret (never the secret). The
//! resolver only ever calls [`KeyStore::find_by_digest`] on a cache miss; the rest serves key
//! management. Every implementation passes the same conformance suite (`tests/store_conformance.rs`).
//!
//! [`MemoryStore`] is the default, for tests and single-process services that may lose their keys on
//! restart.

pub(crate) mod error;
mod format;
mod memory;
mod overview;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod record;
mod shared;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod sql_common;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::sync::Arc;

use time::OffsetDateTime;

pub use error::{StoreError, StoreErrorKind};
pub use format::{FormatLoadError, FormatSecrets, StoredSecret};
pub use memory::MemoryStore;
pub use overview::{MAX_OWNERS, OwnerSummary};
#[cfg(feature = "postgres")]
pub use postgres::{InvalidIdentifier, PostgresStore, PostgresStoreBuilder};
pub use record::{KeyChange, KeyRecord, PreviousSecret};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{DigestScheme, FormatSecret, KeyDigest, KeyId};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};
use crate::usage::counts::UsageBucket;

/// The deepest delegation: a key created by a master-created key is at depth 1, its own
/// creations at depth 2, and so on up to this. Bounded so that walking a key's ancestry (the
/// containment rule, its budget chain) is a bounded read, and a chain's budget decision a bounded
/// number of levels.
pub const MAX_DELEGATION_DEPTH: usize = 8;

/// What [`KeyStore::spend_credits`] did, all levels at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainSpend {
    /// Spent at every level that counts credits; what each level has left (`None`: that level
    /// has no credits in the store, and was not counted), in the order asked.
    Spent {
        /// Left per level.
        remaining: Vec<Option<u64>>,
    },
    /// Level `level` had less than the cost: nothing was spent anywhere (due refills were still
    /// applied).
    Insufficient {
        /// Which level (an index into the levels asked).
        level: usize,
        /// What it has left.
        remaining: u64,
    },
}

/// Maximum active (unrevoked, unexpired) keys, enforced by [`KeyStore::insert`] atomically.
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

/// A secret rotation for [`KeyStore::replace_secret`].
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

/// Which keys the hygiene sweeper reads ([`KeyStore::sweep`]): unrevoked keys not yet expired at
/// `now` that expire by `expiring_before` or were last used (never used: created) by
/// `idle_before`, in id order after `after`, at most `limit`.
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

/// What [`KeyStore::adjust_credits`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreditAdjustment {
    /// Applied; this is what is left.
    Applied {
        /// Credits left.
        remaining: u64,
    },
    /// A spend larger than what is left: nothing was spent (a due refill was still applied).
    Insufficient {
        /// Credits left.
        remaining: u64,
    },
}

/// A change of a key's name, rate limit or credits ([`KeyStore::update`]); `None` keeps a field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new rate limit; `Some(None)` removes it.
    pub rate_limit: Option<Option<crate::quota::RateLimit>>,
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

/// Applies a due refill at `now`, then `delta` (a spend when negative, refused if larger than what
/// is left): the one rule every store follows in [`KeyStore::adjust_credits`].
pub fn adjust(credits: &mut Credits, delta: i64, now: OffsetDateTime) -> CreditAdjustment {
    *credits = credits.refreshed(now);
    let magnitude = delta.unsigned_abs();
    if delta < 0 {
        match credits.remaining.checked_sub(magnitude) {
            Some(left) => credits.remaining = left,
            None => {
                return CreditAdjustment::Insufficient {
                    remaining: credits.remaining,
                };
            }
        }
    } else {
        credits.remaining = credits
            .remaining
            .saturating_add(magnitude)
            .min(crate::quota::MAX_CREDITS);
    }
    CreditAdjustment::Applied {
        remaining: credits.remaining,
    }
}

/// The levels of one [`KeyStore::spend_credits`] or [`KeyStore::refund_credits`] call, each
/// counted once: `unique` is sorted (the order the SQL stores lock rows in, so that concurrent
/// chains never wait on each other in a cycle) and deduplicated; `positions` maps every level asked
/// to its entry in `unique`.
#[derive(Debug)]
pub(crate) struct ChainLevels {
    pub(crate) unique: Vec<BudgetId>,
    positions: Vec<usize>,
}

impl ChainLevels {
    pub(crate) fn new(levels: &[BudgetId]) -> Self {
        let mut unique = levels.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let positions = levels
            .iter()
            .map(|level| unique.binary_search(level).unwrap_or_default())
            .collect();
        Self { unique, positions }
    }

    /// The keys among the levels, in lock order (what PostgreSQL locks first).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &KeyId> {
        self.unique.iter().filter_map(|level| match level {
            BudgetId::Key(id) => Some(id),
            BudgetId::Pool(_) => None,
        })
    }

    /// The pools among the levels, in lock order.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn pools(&self) -> impl Iterator<Item = &PoolId> {
        self.unique.iter().filter_map(|level| match level {
            BudgetId::Pool(pool) => Some(pool),
            BudgetId::Key(_) => None,
        })
    }

    /// The all-or-nothing rule of [`KeyStore::spend_credits`] on `credits` (one entry per
    /// `unique` level, `None` where it has none): due refills are applied everywhere, then `cost`
    /// is spent at every level that has credits if each has at least `cost`, else nowhere.
    pub(crate) fn spend(
        &self,
        credits: &mut [Option<Credits>],
        cost: u64,
        now: OffsetDateTime,
    ) -> ChainSpend {
        for c in credits.iter_mut().flatten() {
            *c = c.refreshed(now);
        }
        for (level, &at) in self.positions.iter().enumerate() {
            if let Some(c) = &credits[at]
                && c.remaining < cost
            {
                return ChainSpend::Insufficient {
                    level,
                    remaining: c.remaining,
                };
            }
        }
        for c in credits.iter_mut().flatten() {
            c.remaining -= cost;
        }
        ChainSpend::Spent {
            remaining: self
                .positions
                .iter()
                .map(|&at| credits[at].map(|c| c.remaining))
                .collect(),
        }
    }

    /// [`KeyStore::refund_credits`]'s rule on `credits`: due refills applied, then `cost` given
    /// back at every level that has credits, saturating at [`MAX_CREDITS`](crate::quota::MAX_CREDITS).
    pub(crate) fn refund(&self, credits: &mut [Option<Credits>], cost: u64, now: OffsetDateTime) {
        let delta = i64::try_from(cost).unwrap_or(i64::MAX);
        for c in credits.iter_mut().flatten() {
            adjust(c, delta, now);
        }
    }
}

/// Persistent storage of keys. Implement it to put keys anywhere; the crate ships [`MemoryStore`].
///
/// Contract (checked by the conformance suite):
/// - records are returned exactly as inserted, except for the fields the mutating methods change;
/// - `find_by_digest` matches the current digest and, while a rotation grace period lasts, the
///   previous one; it returns revoked and expired records too (the resolver decides);
/// - `insert` enforces [`KeyLimits`] atomically: concurrent inserts never overshoot;
/// - `insert` of a delegated record (`created_by` set) fails with
///   [`StoreErrorKind::CreatorInactive`] unless its creator exists, is not revoked and has not
///   expired at `now`, checked atomically with the insert (no revocation can slip in between);
/// - `revoke` keeps the first `revoked_at`; `delete` removes the record; both also revoke every
///   descendant of the key (see [`KeyChange`]) in the same atomic step, and report what changed;
/// - `replace_secret` refuses a revoked key ([`StoreErrorKind::Revoked`]) and, when asked, revokes
///   the descendants in the same atomic step;
/// - `list` filters by owner and, when given, account;
/// - `ancestors` is nearest first, at most [`MAX_DELEGATION_DEPTH`], and stops at a creator that
///   is gone; `descendants` is the whole subtree; `budget_above` lists the ancestors that have
///   limits, then the account pool, then the owner pool;
/// - `set_pool` with `if_absent` is an insert-if-absent (racing writers all see the first);
/// - `spend_credits` is all or nothing across its levels, atomically with every other spend;
/// - methods on an unknown id return `Ok(None)` / `Ok(false)`, never an error.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record whose current (or grace-period previous) digest is `digest`.
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError>;

    /// The record with this id.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// The keys the hygiene sweeper warns about ([`SweepQuery`]), across every owner. The default
    /// answers [`StoreErrorKind::Unsupported`].
    async fn sweep(&self, query: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        let _ = query;
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Remembers that `notice` (such as `expiring:604800:<expiry>`) was given about key `id`, with
    /// an insert-if-absent write: `true` for the one call that recorded it, `false` for every
    /// later one, on every instance. The default answers [`StoreErrorKind::Unsupported`].
    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let _ = (id, notice, at);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// [`record_notice`](Self::record_notice), writing `journal`'s events in the same atomic
    /// step when (and only when) the notice is new: the sweeper's `key.expiring` and `key.idle`
    /// events, a leak report's `key.leaked`, and so their webhooks. The default records the
    /// notice, then appends the events ([`append_events`](Self::append_events); a store without
    /// an audit trail skips them).
    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let fresh = self.record_notice(id, notice, at).await?;
        if fresh && !journal.is_empty() {
            match self.append_events(journal.events()).await {
                Err(e) if e.kind() == StoreErrorKind::Unsupported => {}
                other => drop(other?),
            }
        }
        Ok(fresh)
    }

    /// One owner's keys, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError>;

    /// How many of `owner`'s keys (of `account` only, when given) are active at `now`
    /// ([`KeyRecord::is_active`]). The default pages through [`list`](Self::list); a store with a
    /// query language should count in one query.
    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        count_by_listing(self, owner, account, now).await
    }

    /// Stores a new record unless that would exceed `limits` counting keys active at `now`
    /// ([`StoreErrorKind::LimitReached`]), or its creator is not active at `now`
    /// ([`StoreErrorKind::CreatorInactive`]).
    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Marks the key revoked at `at` (keeping an earlier revocation time), and every descendant not
    /// yet revoked with it, in one atomic step.
    async fn revoke(&self, id: &KeyId, at: OffsetDateTime)
    -> Result<Option<KeyChange>, StoreError>;

    /// Removes the record and revokes its descendants at `at`, in one atomic step. The
    /// descendants stay listed, revoked, with their `created_by` naming the deleted key.
    async fn delete(&self, id: &KeyId, at: OffsetDateTime)
    -> Result<Option<KeyChange>, StoreError>;

    /// Replaces the key's secret, keeping the old one as [`PreviousSecret`] if the rotation asks for a
    /// grace period, and revoking the descendants if it asks for that. Fails with
    /// [`StoreErrorKind::Revoked`] on a revoked key.
    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError>;

    /// Records last use times in one batch; later times win, unknown ids are ignored.
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError>;

    /// [`insert`](Self::insert), writing `journal`'s events ([`Journal::events`]) in the same
    /// atomic step: both or neither. What [`KeyManager`](crate::manage::KeyManager) calls.
    ///
    /// The defaults of the `*_with` methods write the change alone when the journal is empty and
    /// answer [`StoreErrorKind::Unsupported`] otherwise: a store without an audit trail cannot be
    /// managed with one.
    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        unaudited(journal)?;
        self.insert(record, limits, now).await
    }

    /// [`revoke`](Self::revoke), writing [`Journal::for_change`] in the same atomic step.
    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        unaudited(journal)?;
        self.revoke(id, at).await
    }

    /// [`delete`](Self::delete), writing [`Journal::for_change`] in the same atomic step.
    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        unaudited(journal)?;
        self.delete(id, at).await
    }

    /// [`replace_secret`](Self::replace_secret), writing [`Journal::for_change`] in the same
    /// atomic step.
    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        unaudited(journal)?;
        self.replace_secret(id, rotation).await
    }

    /// [`update`](Self::update), writing [`Journal::for_change`] (the change's `before` and
    /// `after`, no descendants) in the same atomic step.
    async fn update_with(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        unaudited(journal)?;
        self.update(id, update).await
    }

    /// [`set_pool`](Self::set_pool), writing `journal`'s events in the same atomic step when it
    /// writes (none when an `if_absent` write found a pool set).
    async fn set_pool_with(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        unaudited(journal)?;
        self.set_pool(pool, limits, if_absent).await
    }

    /// Seals `events` onto their owners' chains and writes them, in one atomic step: for events
    /// that come with no change (`key.refused`). Returns them sealed.
    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        let _ = events;
        Err(no_audit())
    }

    /// One owner's events matching `query`, newest first (highest sequence number first), at
    /// most `query.limit`.
    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let _ = query;
        Err(no_audit())
    }

    /// The anchor and head of `owner`'s chain (zeros for an owner with no events).
    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        let _ = owner;
        Err(no_audit())
    }

    /// `owner`'s events with a sequence number above `after_seq`, oldest first, at most `limit`:
    /// what [`verify`](crate::audit::verify) reads, page by page.
    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let _ = (owner, after_seq, limit);
        Err(no_audit())
    }

    /// Removes every event older than `before`, oldest first per owner (a chain is cut at its
    /// first event not older than `before`: nothing after a kept event is removed), and records
    /// each chain's last removed event as its anchor, in one atomic step. Returns how many it
    /// removed. The default keeps everything.
    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// Adds a batch of hourly usage counts: a bucket of a key and hour already stored is summed
    /// ([`UsageBucket::merge`]). One atomic step.
    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        let _ = buckets;
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this key store cannot keep usage counts",
        ))
    }

    /// A key's hourly buckets with `from <= hour < to`, oldest first.
    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let _ = (key_id, from, to);
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this key store cannot keep usage counts",
        ))
    }

    /// Removes the usage buckets of hours before `before`; returns how many. The default keeps
    /// everything.
    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let _ = before;
        Ok(0)
    }

    /// Each of `owner`'s keys' usage summed over the hours `from <= hour < to`: one bucket per key
    /// that had requests (its `hour` is `from`, its `last_ip` the latest known), in no particular
    /// order. The default lists the owner's keys and sums [`usage`](Self::usage) key by key; a
    /// store with a query language answers in one query.
    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        overview::usage_by_listing(self, owner, from, to).await
    }

    /// Every owner with at least one key, in owner order, at most `limit` (and at most
    /// [`MAX_OWNERS`]), with how many of its keys there are and how many are active at `now`. The
    /// default answers [`StoreErrorKind::Unsupported`].
    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<OwnerSummary>, StoreError> {
        let _ = (now, limit);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// The keyed key format's secrets ([`FormatSecrets`]). A store holding none yet first stores
    /// `initial` as version 1, and records whether it already holds keys (legacy keys then stay
    /// accepted), both with insert-if-absent writes: instances starting together on a new store all
    /// get the same version 1, whichever wrote it.
    ///
    /// The default answers [`StoreErrorKind::Unsupported`]: such a store cannot hold the secrets
    /// (give them to [`KeyFormat::keyed`](crate::key::KeyFormat::keyed) yourself).
    async fn format_secrets(
        &self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, StoreError> {
        let _ = (initial, now);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Stores `secret` as the next version (one above the highest, retired or not) and returns that
    /// version: formats loaded afterwards accept it and tag new keys with it. Two additions racing for
    /// one version, or a 62nd version, fail with [`StoreErrorKind::Conflict`].
    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let _ = (secret, now);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Retires `version` at `now`: formats loaded afterwards refuse the keys it tagged. Returns
    /// `false`, changing nothing, if the version is unknown, already retired, or the last one that is
    /// not retired (something must be left to tag keys with).
    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let _ = (version, now);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Records whether formats loaded from this store accept legacy (public-checksum) keys: `false`
    /// phases them out for every instance at its next start. Set before any format is loaded, it
    /// replaces the "the store held keys" guess.
    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        let _ = (accept, now);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Changes a key's name, rate limit or credits and returns the updated record. New credits
    /// are set as given (their `set_at` included).
    ///
    /// The default answers [`StoreErrorKind::Unsupported`]: a store that does not implement it
    /// cannot update keys.
    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let _ = (id, update);
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this key store cannot update keys",
        ))
    }

    /// Atomically applies a due refill of the key's credits at `now`, then `delta`: a spend
    /// (negative) only if enough is left, a refund (positive) always. `None` for an unknown key or
    /// one without credits. Concurrent calls never spend more than there is, across every process
    /// sharing the store. See [`adjust`] for the rule.
    ///
    /// The default answers [`StoreErrorKind::Unsupported`]: a store that does not implement it
    /// cannot count credits, and a [`StoreCredits`](crate::ratelimit::StoreCredits) limiter over it
    /// fails as configured.
    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        let _ = (id, delta, now);
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this key store cannot count credits",
        ))
    }

    /// The key's ancestors, nearest first: its creator, its creator's creator, and so on, at most
    /// [`MAX_DELEGATION_DEPTH`] of them. The walk stops at a master-created key or at a creator
    /// that is gone (deleted). Revoked and expired ancestors are included.
    ///
    /// The default walks [`get`](Self::get) one level at a time; a store with a query language
    /// should answer in one query.
    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        ancestors_by_walking(self, id).await
    }

    /// Every key `id` created, transitively (its subtree without itself), revoked ones included,
    /// in no order; empty for an unknown key. The default pages through the owner's listing.
    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        descendants_by_listing(self, id).await
    }

    /// The levels a request of `record`'s key counts against above its own (see
    /// [`Budget`](crate::quota::Budget)): each ancestor that has limits, nearest first, then the
    /// account pool and the owner pool when set. What the resolver attaches to a principal.
    ///
    /// The default asks [`ancestors`](Self::ancestors) (only for a delegated key) and
    /// [`pool`](Self::pool) twice; a store with a query language should answer in one round trip.
    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        let mut levels = Vec::new();
        if record.created_by.is_some() {
            for ancestor in self.ancestors(&record.id).await? {
                levels.push(BudgetLevel {
                    id: BudgetId::Key(ancestor.id),
                    limits: ancestor.limits,
                });
            }
        }
        let owner: Arc<str> = record.owner.as_str().into();
        for pool in [
            PoolId::account(owner.clone(), record.account.as_str()),
            PoolId::owner(owner),
        ] {
            if let Some(limits) = self.pool(&pool).await? {
                levels.push(BudgetLevel {
                    id: BudgetId::Pool(pool),
                    limits,
                });
            }
        }
        levels.retain(|level| !level.limits.is_unlimited());
        Ok(levels)
    }

    /// The limits of a shared pool (its credits as last written), `None` when none is set.
    ///
    /// The default has no pools.
    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        let _ = pool;
        Ok(None)
    }

    /// Sets a pool's limits, or removes the pool with `None`. With `if_absent`, writes only when no
    /// pool is set (an insert-if-absent: instances racing all see the first one). Returns whether it
    /// wrote.
    ///
    /// The default answers [`StoreErrorKind::Unsupported`].
    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        let _ = (pool, limits, if_absent);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Spends `cost` credits at every level of `levels` that has credits in the store (a key's own,
    /// a pool's), applying due refills first, all or nothing in one atomic step: if any level has
    /// less than `cost`, nothing is spent anywhere ([`ChainSpend::Insufficient`]). Concurrent
    /// calls never spend more than there is at any level, across every process sharing the store.
    ///
    /// A level named twice is counted once. Unknown keys and pools count as levels without credits.
    ///
    /// The default handles one key level through [`adjust_credits`](Self::adjust_credits), and
    /// answers [`StoreErrorKind::Unsupported`] for more.
    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        match levels {
            [] => Ok(ChainSpend::Spent {
                remaining: Vec::new(),
            }),
            [BudgetId::Key(id)] => {
                let delta = -i64::try_from(cost).unwrap_or(i64::MAX);
                Ok(match self.adjust_credits(id, delta, now).await? {
                    None => ChainSpend::Spent {
                        remaining: vec![None],
                    },
                    Some(CreditAdjustment::Applied { remaining }) => ChainSpend::Spent {
                        remaining: vec![Some(remaining)],
                    },
                    Some(CreditAdjustment::Insufficient { remaining }) => {
                        ChainSpend::Insufficient {
                            level: 0,
                            remaining,
                        }
                    }
                })
            }
            _ => Err(StoreError::from_kind(StoreErrorKind::Unsupported)),
        }
    }

    /// Gives `cost` credits back at every level of `levels` that has credits (a refused request
    /// spends nothing), in one atomic step. The default mirrors
    /// [`spend_credits`](Self::spend_credits)'s.
    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        match levels {
            [] => Ok(()),
            [BudgetId::Key(id)] => {
                let delta = i64::try_from(cost).unwrap_or(i64::MAX);
                self.adjust_credits(id, delta, now).await.map(drop)
            }
            _ => Err(StoreError::from_kind(StoreErrorKind::Unsupported)),
        }
    }
}

/// The default `*_with` methods: only an empty journal can be honoured.
fn unaudited(journal: &Journal) -> Result<(), StoreError> {
    if journal.is_empty() {
        Ok(())
    } else {
        Err(no_audit())
    }
}

fn no_audit() -> StoreError {
    StoreError::new(
        StoreErrorKind::Unsupported,
        "this key store cannot write audit events",
    )
}

/// [`KeyStore::ancestors`] by walking [`KeyStore::get`] (its default).
async fn ancestors_by_walking<S: KeyStore + ?Sized>(
    store: &S,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut chain = Vec::new();
    let Some(record) = store.get(id).await? else {
        return Ok(chain);
    };
    let mut next = record.created_by;
    while let Some(parent) = next {
        if chain.len() == MAX_DELEGATION_DEPTH {
            break;
        }
        match store.get(&parent).await? {
            Some(record) => {
                next = record.created_by.clone();
                chain.push(record);
            }
            None => break,
        }
    }
    Ok(chain)
}

/// [`KeyStore::descendants`] by paging through the owner's listing (its default).
async fn descendants_by_listing<S: KeyStore + ?Sized>(
    store: &S,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    const PAGE: u32 = 500;
    let Some(root) = store.get(id).await? else {
        return Ok(Vec::new());
    };
    let mut query = ListQuery {
        owner: root.owner.clone(),
        account: None,
        before: None,
        limit: PAGE,
    };
    let mut all = Vec::new();
    loop {
        let page = store.list(&query).await?;
        let full = page.len() == PAGE as usize;
        query.before = page.last().map(|r| r.id.clone());
        all.extend(page);
        if !full {
            break;
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root.id];
    while let Some(parent) = frontier.pop() {
        let (children, rest): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|r| r.created_by.as_ref() == Some(&parent));
        all = rest;
        frontier.extend(children.iter().map(|c| c.id.clone()));
        found.extend(children);
    }
    Ok(found)
}

/// [`KeyStore::count_active`] by paging through [`KeyStore::list`] (its default).
async fn count_by_listing<S: KeyStore + ?Sized>(
    store: &S,
    owner: &str,
    account: Option<&str>,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    const PAGE: u32 = 500;
    let mut query = ListQuery {
        owner: owner.to_owned(),
        account: account.map(str::to_owned),
        before: None,
        limit: PAGE,
    };
    let mut active = 0;
    loop {
        let page = store.list(&query).await?;
        active += page.iter().filter(|r| r.is_active(now)).count() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => query.before = Some(last.id.clone()),
            _ => return Ok(active),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::ScopeSet;

    /// The default pages through `list` (pages of 500): it counts across pages, per account, and
    /// agrees with `MemoryStore`'s own count.
    #[tokio::test]
    async fn the_default_count_pages_through_the_listing() {
        let store = MemoryStore::new();
        let now = OffsetDateTime::now_utc();
        let format = crate::key::KeyFormat::default();
        for i in 0..1203 {
            let key = format.generate();
            let record = KeyRecord {
                id: KeyId::new(format!("key_{i:05}")),
                name: String::new(),
                owner: "o".into(),
                account: ["a1", "a2", "a3"][i % 3].into(),
                scopes: ScopeSet::default(),
                digest: key.digest(),
                digest_scheme: DigestScheme::default(),
                masked_key: format.mask(&key).unwrap(),
                created_at: now,
                expires_at: None,
                revoked_at: (i % 5 == 0).then_some(now),
                last_used_at: None,
                created_by: None,
                rotated_at: None,
                previous: None,
                limits: UsageLimits::default(),
                allowed_networks: None,
            };
            store
                .insert(&record, KeyLimits::default(), now)
                .await
                .unwrap();
        }
        for account in [None, Some("a1"), Some("a2"), Some("a3"), Some("a4")] {
            let default = count_by_listing(&store, "o", account, now).await.unwrap();
            let own = store.count_active("o", account, now).await.unwrap();
            assert_eq!(default, own, "{account:?}");
        }
        // 1203 keys, one in five revoked (0, 5, ..., 1200: 241).
        assert_eq!(count_by_listing(&store, "o", None, now).await.unwrap(), 962);
        assert_eq!(count_by_listing(&store, "p", None, now).await.unwrap(), 0);
    }

    /// A store with only the required methods (forwarded to a `MemoryStore`): what a custom store
    /// gets from the defaults.
    struct Minimal(MemoryStore);

    #[async_trait::async_trait]
    impl KeyStore for Minimal {
        async fn find_by_digest(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
            self.0.find_by_digest(d).await
        }
        async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
            self.0.get(id).await
        }
        async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
            self.0.list(query).await
        }
        async fn insert(
            &self,
            record: &KeyRecord,
            limits: KeyLimits,
            now: OffsetDateTime,
        ) -> Result<(), StoreError> {
            self.0.insert(record, limits, now).await
        }
        async fn revoke(
            &self,
            id: &KeyId,
            at: OffsetDateTime,
        ) -> Result<Option<KeyChange>, StoreError> {
            self.0.revoke(id, at).await
        }
        async fn delete(
            &self,
            id: &KeyId,
            at: OffsetDateTime,
        ) -> Result<Option<KeyChange>, StoreError> {
            self.0.delete(id, at).await
        }
        async fn replace_secret(
            &self,
            id: &KeyId,
            rotation: &Rotation,
        ) -> Result<Option<KeyChange>, StoreError> {
            self.0.replace_secret(id, rotation).await
        }
        async fn record_last_used(
            &self,
            uses: &[(KeyId, OffsetDateTime)],
        ) -> Result<(), StoreError> {
            self.0.record_last_used(uses).await
        }
        async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
            self.0.record_usage(buckets).await
        }
        async fn usage(
            &self,
            key_id: &KeyId,
            from: OffsetDateTime,
            to: OffsetDateTime,
        ) -> Result<Vec<UsageBucket>, StoreError> {
            self.0.usage(key_id, from, to).await
        }
    }

    /// The defaults answer like `MemoryStore`'s own methods for ancestry, and `Unsupported` (not
    /// `Unavailable`, which would read as an outage) for what a custom store cannot do.
    #[tokio::test]
    async fn the_defaults_agree_with_memory_and_refuse_what_they_cannot_do() {
        let minimal = Minimal(MemoryStore::new());
        let now = OffsetDateTime::now_utc();
        let format = crate::key::KeyFormat::default();
        // key_00 -> key_01 -> ... -> key_11, and key_00 -> key_20.
        let parents = (0..12)
            .map(|i| (i, (i > 0).then(|| i - 1)))
            .chain([(20, Some(0))]);
        for (i, parent) in parents {
            let key = format.generate();
            let record = KeyRecord {
                id: KeyId::new(format!("key_{i:02}")),
                name: String::new(),
                owner: "o".into(),
                account: "a".into(),
                scopes: ScopeSet::default(),
                digest: key.digest(),
                digest_scheme: DigestScheme::default(),
                masked_key: format.mask(&key).unwrap(),
                created_at: now,
                expires_at: None,
                revoked_at: None,
                last_used_at: None,
                created_by: parent.map(|p: i32| KeyId::new(format!("key_{p:02}"))),
                rotated_at: None,
                previous: None,
                limits: UsageLimits {
                    rate_limit: None,
                    credits: Some(Credits::new(10).set_at(now)),
                },
                allowed_networks: None,
            };
            minimal
                .insert(&record, KeyLimits::default(), now)
                .await
                .unwrap();
        }
        let ids = |records: Vec<KeyRecord>| -> Vec<String> {
            let mut ids: Vec<String> = records.into_iter().map(|r| r.id.to_string()).collect();
            ids.sort();
            ids
        };
        for id in ["key_11", "key_05", "key_00", "key_20", "key_99"] {
            let id = KeyId::new(id);
            let walked = minimal.ancestors(&id).await.unwrap();
            assert_eq!(walked, minimal.0.ancestors(&id).await.unwrap(), "{id}");
            assert!(walked.len() <= MAX_DELEGATION_DEPTH);
            assert_eq!(
                ids(minimal.descendants(&id).await.unwrap()),
                ids(minimal.0.descendants(&id).await.unwrap()),
                "{id}"
            );
            if let Some(record) = minimal.get(&id).await.unwrap() {
                assert_eq!(
                    minimal.budget_above(&record).await.unwrap(),
                    minimal.0.budget_above(&record).await.unwrap(),
                    "{id}"
                );
            }
        }
        assert_eq!(
            minimal
                .ancestors(&KeyId::new("key_11"))
                .await
                .unwrap()
                .len(),
            MAX_DELEGATION_DEPTH
        );
        assert_eq!(
            minimal
                .descendants(&KeyId::new("key_00"))
                .await
                .unwrap()
                .len(),
            12
        );
        let unsupported = |e: StoreError| assert_eq!(e.kind(), StoreErrorKind::Unsupported);
        let id = KeyId::new("key_03");
        unsupported(
            minimal
                .update(&id, &KeyUpdate::default())
                .await
                .unwrap_err(),
        );
        unsupported(minimal.adjust_credits(&id, -1, now).await.unwrap_err());
        let pool = PoolId::owner("o");
        assert_eq!(minimal.pool(&pool).await.unwrap(), None);
        unsupported(
            minimal
                .set_pool(&pool, Some(UsageLimits::NONE), false)
                .await
                .unwrap_err(),
        );
        let two = [BudgetId::Key(id.clone()), BudgetId::Pool(pool)];
        unsupported(minimal.spend_credits(&two, 1, now).await.unwrap_err());
        unsupported(minimal.refund_credits(&two, 1, now).await.unwrap_err());
        assert_eq!(
            minimal.spend_credits(&[], 1, now).await.unwrap(),
            ChainSpend::Spent {
                remaining: Vec::new()
            }
        );
        unsupported(minimal.owners(now, 10).await.unwrap_err());
        // Usage per key by listing: the same sums as the memory store's own.
        let hour = crate::usage::hour_of(now);
        let bucket = |id: &str, hours_ago: i64, n: u64| UsageBucket {
            key_id: KeyId::new(id),
            hour: hour - time::Duration::hours(hours_ago),
            counts: [n, 1, 0, 0, 0, 0, 0],
            last_ip: None,
        };
        minimal
            .record_usage(&[
                bucket("key_00", 1, 2),
                bucket("key_00", 2, 3),
                bucket("key_05", 1, 4),
                bucket("key_05", 200, 9),
            ])
            .await
            .unwrap();
        let from = now - time::Duration::days(7);
        let mut by_listing = minimal.usage_by_key("o", from, now).await.unwrap();
        let mut own = minimal.0.usage_by_key("o", from, now).await.unwrap();
        by_listing.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        own.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        assert_eq!(by_listing, own);
        assert_eq!(
            own.iter()
                .map(|b| (b.key_id.to_string(), b.counts[0], b.counts[1]))
                .collect::<Vec<_>>(),
            [("key_00".to_owned(), 5, 2), ("key_05".to_owned(), 4, 1)]
        );
        assert!(
            minimal
                .usage_by_key("nobody", from, now)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Levels are counted once each and judged in the order asked.
    #[test]
    fn chain_levels_count_each_level_once() {
        let now = OffsetDateTime::now_utc();
        let (a, b) = (
            BudgetId::Key(KeyId::new("b")),
            BudgetId::Key(KeyId::new("a")),
        );
        let pool = BudgetId::Pool(PoolId::owner("o"));
        let levels = ChainLevels::new(&[pool.clone(), a.clone(), b.clone(), a.clone()]);
        assert_eq!(
            levels.unique,
            [b.clone(), a.clone(), pool.clone()],
            "lock order"
        );
        assert_eq!(levels.keys().count(), 2);
        assert_eq!(levels.pools().count(), 1);
        // unique: b (none), a (3), pool (5)
        let mut credits = [
            None,
            Some(Credits::new(3).set_at(now)),
            Some(Credits::new(5).set_at(now)),
        ];
        assert_eq!(
            levels.spend(&mut credits, 2, now),
            ChainSpend::Spent {
                remaining: vec![Some(3), Some(1), None, Some(1)],
            }
        );
        assert_eq!(
            levels.spend(&mut credits, 2, now),
            ChainSpend::Insufficient {
                level: 1,
                remaining: 1,
            }
        );
        assert_eq!(credits[1].unwrap().remaining, 1, "nothing spent");
        assert_eq!(credits[2].unwrap().remaining, 3, "nothing spent");
        levels.refund(&mut credits, u64::MAX, now);
        assert_eq!(credits[1].unwrap().remaining, crate::quota::MAX_CREDITS);
        assert_eq!(credits[0], None);
    }
}
