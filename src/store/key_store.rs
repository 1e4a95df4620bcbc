//! [`KeyStore`]: persistent storage of keys, the trait every store implements.

use std::sync::Arc;

use time::OffsetDateTime;

use super::credits::{ChainSpend, CreditAdjustment};
use super::defaults::{
    Reader, ancestors_by_walking, count_by_listing, descendants_by_listing, usage_by_listing,
};
use super::format::FormatSecrets;
use super::overview::OwnerSummary;
use super::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use super::{StoreError, StoreErrorKind};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId};
use crate::limits::{BudgetId, BudgetLevel, PoolId, UsageLimits};
use crate::record::{KeyChange, KeyRecord};
use crate::store::usage::UsageBucket;

/// Persistent storage of keys. Implement it to put keys anywhere; the crate ships
/// [`MemoryStore`](super::MemoryStore).
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
/// - `ancestors` is nearest first, at most [`MAX_DELEGATION_DEPTH`](super::MAX_DELEGATION_DEPTH),
///   and stops at a creator that
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

    /// Replaces the key's secret, keeping the old one as [`PreviousSecret`](super::PreviousSecret)
    /// if the rotation asks for a grace period, and revoking the descendants if it asks for that.
    /// Fails with [`StoreErrorKind::Revoked`] on a revoked key.
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
        usage_by_listing(self, owner, from, to).await
    }

    /// Every owner with at least one key, in owner order, at most `limit` (and at most
    /// [`MAX_OWNERS`](super::MAX_OWNERS)), with how many of its keys there are and how many are
    /// active at `now`. The default answers [`StoreErrorKind::Unsupported`].
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
    /// version: formats loaded afterwards accept it and tag new keys with it. Two additions racing
    /// for one version, or a 62nd version, fail with [`StoreErrorKind::Conflict`].
    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let _ = (secret, now);
        Err(StoreError::from_kind(StoreErrorKind::Unsupported))
    }

    /// Retires `version` at `now`: formats loaded afterwards refuse the keys it tagged. Returns
    /// `false`, changing nothing, if the version is unknown, already retired, or the last one that
    /// is not retired (something must be left to tag keys with).
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
    /// sharing the store. See [`adjust`](super::adjust) for the rule.
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
    /// [`MAX_DELEGATION_DEPTH`](super::MAX_DELEGATION_DEPTH) of them. The walk stops at a
    /// master-created key or at a creator that is gone (deleted). Revoked and expired ancestors are
    /// included.
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
    /// [`Budget`](crate::limits::Budget)): each ancestor that has limits, nearest first, then the
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
    /// pool is set (an insert-if-absent: instances racing all see the first one). Returns whether
    /// it wrote.
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

/// Every store is a [`Reader`]: the defaults read through its own methods.
impl<S: KeyStore + ?Sized> Reader for S {
    async fn key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        KeyStore::get(self, id).await
    }

    async fn page(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        KeyStore::list(self, query).await
    }

    async fn hours(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        KeyStore::usage(self, key_id, from, to).await
    }
}

#[cfg(test)]
mod tests;
