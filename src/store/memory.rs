use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use time::OffsetDateTime;

use super::credits::{ChainLevels, ChainSpend, CreditAdjustment};
use super::error::{StoreError, StoreErrorKind};
use super::format::{FormatSecrets, StoredSecret};
use super::key_store::KeyStore;
use super::overview::{MAX_OWNERS, OwnerSummary};
use super::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use super::record::{KeyChange, KeyRecord, MAX_DELEGATION_DEPTH, PreviousSecret};
use crate::audit::{AuditEvent, ChainLink, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId, MAX_SECRET_VERSION};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};
use crate::usage::UsageBucket;

/// An in-memory [`KeyStore`]: for tests, examples and services that can lose keys on restart.
///
/// One mutex guards everything, which makes limit checks atomic; it is never held across an await.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: BTreeMap<KeyId, KeyRecord>,
    by_digest: HashMap<[u8; 32], KeyId>,
    /// The keyed format's legacy record (`None` until first written) and secrets.
    legacy_keys: Option<bool>,
    format_secrets: Vec<StoredSecret>,
    /// The shared pools that are set.
    pools: BTreeMap<PoolId, UsageLimits>,
    /// Every owner's audit events, in the order written, and each owner's chain.
    events: Vec<AuditEvent>,
    chains: BTreeMap<String, ChainState>,
    /// Hourly usage counts by key and hour (Unix seconds).
    usage: BTreeMap<(KeyId, i64), UsageBucket>,
    /// The hygiene notices given, per key.
    notices: std::collections::HashSet<(KeyId, String)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than refusing all further service, so recover the data.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// Seals `drafts` onto their owners' chains and keeps them: the one place events are written.
    fn append(&mut self, drafts: Vec<EventDraft>) -> Vec<AuditEvent> {
        let mut sealed = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let chain = self.chains.entry(draft.owner_id.clone()).or_default();
            let event = draft.seal(chain.head);
            chain.head = ChainLink {
                seq: event.seq,
                hash: event.hash,
            };
            self.events.push(event.clone());
            sealed.push(event);
        }
        sealed
    }

    fn unindex(&mut self, record: &KeyRecord) {
        for digest in record.digests() {
            self.by_digest.remove(digest.as_bytes());
        }
    }

    /// The ids of every descendant of `root` (its subtree without itself), in no order: what
    /// cascades revoke and [`KeyStore::descendants`] answers.
    fn subtree(&self, root: &KeyId) -> Vec<KeyId> {
        let mut children: HashMap<&KeyId, Vec<&KeyId>> = HashMap::new();
        for record in self.by_id.values() {
            if let Some(parent) = &record.created_by {
                children.entry(parent).or_default().push(&record.id);
            }
        }
        // A key is inserted after its creator, so this is a tree; `seen` guards against a cycle in
        // data written some other way.
        let mut seen = std::collections::HashSet::from([root]);
        let mut tree = Vec::new();
        let mut pending = vec![root];
        while let Some(parent) = pending.pop() {
            for &child in children.get(parent).into_iter().flatten() {
                if seen.insert(child) {
                    tree.push(child.clone());
                    pending.push(child);
                }
            }
        }
        tree
    }

    /// The ancestors of a key created by `creator`, nearest first, at most
    /// [`MAX_DELEGATION_DEPTH`]; the walk stops at a creator that is gone.
    fn ancestors_from(&self, creator: Option<&KeyId>) -> Vec<&KeyRecord> {
        let mut chain = Vec::new();
        let mut next = creator;
        while let Some(id) = next {
            if chain.len() == MAX_DELEGATION_DEPTH {
                break;
            }
            let Some(record) = self.by_id.get(id) else {
                break;
            };
            chain.push(record);
            next = record.created_by.as_ref();
        }
        chain
    }

    /// The credits of one budget level, where they live.
    fn credits_mut(&mut self, level: &BudgetId) -> Option<&mut Credits> {
        match level {
            BudgetId::Key(id) => self.by_id.get_mut(id)?.limits.credits.as_mut(),
            BudgetId::Pool(pool) => self.pools.get_mut(pool)?.credits.as_mut(),
        }
    }

    /// Loads the credits of `levels`, lets `rule` change them, and writes them back.
    fn with_credits<T>(
        &mut self,
        levels: &ChainLevels,
        rule: impl FnOnce(&mut [Option<Credits>]) -> T,
    ) -> T {
        let mut credits: Vec<Option<Credits>> = levels
            .unique
            .iter()
            .map(|level| self.credits_mut(level).copied())
            .collect();
        let outcome = rule(&mut credits);
        for (level, new) in levels.unique.iter().zip(credits) {
            if let (Some(stored), Some(new)) = (self.credits_mut(level), new) {
                *stored = new;
            }
        }
        outcome
    }

    /// Revokes every descendant of `root` not revoked yet, at `at`; returns those it revoked.
    fn revoke_descendants(&mut self, root: &KeyId, at: OffsetDateTime) -> Vec<KeyRecord> {
        self.subtree(root)
            .iter()
            .filter_map(|id| {
                let record = self.by_id.get_mut(id)?;
                if record.revoked_at.is_some() {
                    return None;
                }
                record.revoked_at = Some(at);
                Some(record.clone())
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .by_digest
            .get(digest.as_bytes())
            .and_then(|id| inner.by_id.get(id))
            .cloned())
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.lock().by_id.get(id).cloned())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = self.lock();
        let range = match &query.before {
            Some(before) => inner.by_id.range(..before.clone()),
            None => inner.by_id.range(..),
        };
        Ok(range
            .rev()
            .map(|(_, r)| r)
            .filter(|r| {
                r.owner == query.owner && query.account.as_ref().is_none_or(|a| *a == r.account)
            })
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn count_active(
        &self,
        owner: &str,
        account: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let inner = self.lock();
        Ok(inner
            .by_id
            .values()
            .filter(|r| r.owner == owner && account.is_none_or(|a| a == r.account))
            .filter(|r| r.is_active(now))
            .count() as u64)
    }

    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.insert_with(record, limits, now, &Journal::none())
            .await
    }

    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.by_id.contains_key(&record.id)
            || record
                .digests()
                .any(|d| inner.by_digest.contains_key(d.as_bytes()))
        {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        if let Some(creator) = &record.created_by
            && !inner.by_id.get(creator).is_some_and(|c| c.is_active(now))
        {
            return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
        }
        let active = |same: &dyn Fn(&KeyRecord) -> bool| {
            inner
                .by_id
                .values()
                .filter(|r| same(r) && r.is_active(now))
                .count()
        };
        if let Some(limit) = limits.per_owner
            && active(&|r| r.owner == record.owner) >= limit as usize
        {
            return Err(StoreError::from_kind(StoreErrorKind::LimitReached {
                limit,
                scope: "owner",
            }));
        }
        if let Some(limit) = limits.per_account
            && active(&|r| r.account == record.account) >= limit as usize
        {
            return Err(StoreError::from_kind(StoreErrorKind::LimitReached {
                limit,
                scope: "account",
            }));
        }
        for digest in record.digests() {
            inner
                .by_digest
                .insert(*digest.as_bytes(), record.id.clone());
        }
        inner.by_id.insert(record.id.clone(), record.clone());
        inner.append(journal.events().to_vec());
        Ok(())
    }

    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.revoke_with(id, at, &Journal::none()).await
    }

    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut inner = self.lock();
        let Some(record) = inner.by_id.get_mut(id) else {
            return Ok(None);
        };
        let before = record.clone();
        record.revoked_at.get_or_insert(at);
        let after = record.clone();
        let revoked_descendants = inner.revoke_descendants(id, at);
        let change = KeyChange {
            before,
            after: Some(after),
            revoked_descendants,
        };
        inner.append(journal.for_change(&change));
        Ok(Some(change))
    }

    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.delete_with(id, at, &Journal::none()).await
    }

    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut inner = self.lock();
        let Some(before) = inner.by_id.remove(id) else {
            return Ok(None);
        };
        inner.unindex(&before);
        let revoked_descendants = inner.revoke_descendants(id, at);
        let change = KeyChange {
            before,
            after: None,
            revoked_descendants,
        };
        inner.append(journal.for_change(&change));
        Ok(Some(change))
    }

    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.replace_secret_with(id, rotation, &Journal::none())
            .await
    }

    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut inner = self.lock();
        let Some(old) = inner.by_id.get(id).cloned() else {
            return Ok(None);
        };
        if old.revoked_at.is_some() {
            return Err(StoreError::from_kind(StoreErrorKind::Revoked));
        }
        if inner.by_digest.contains_key(rotation.digest.as_bytes()) {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        inner.unindex(&old);
        let mut record = old.clone();
        record.previous = rotation
            .previous_valid_until
            .map(|valid_until| PreviousSecret {
                digest: record.digest,
                digest_scheme: record.digest_scheme,
                valid_until,
            });
        record.digest = rotation.digest;
        record.digest_scheme = rotation.digest_scheme;
        record.masked_key = rotation.masked_key.clone();
        record.rotated_at = Some(rotation.rotated_at);
        for digest in record.digests() {
            inner.by_digest.insert(*digest.as_bytes(), id.clone());
        }
        inner.by_id.insert(id.clone(), record.clone());
        let revoked_descendants = if rotation.revoke_descendants {
            inner.revoke_descendants(id, rotation.rotated_at)
        } else {
            Vec::new()
        };
        let change = KeyChange {
            before: old,
            after: Some(record),
            revoked_descendants,
        };
        inner.append(journal.for_change(&change));
        Ok(Some(change))
    }

    async fn sweep(&self, query: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = self.lock();
        let range = match &query.after {
            Some(after) => inner.by_id.range((
                std::ops::Bound::Excluded(after.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => inner.by_id.range(..),
        };
        Ok(range
            .map(|(_, record)| record)
            .filter(|record| query.matches(record))
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        _at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        Ok(self.lock().notices.insert((id.clone(), notice.to_owned())))
    }

    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        _at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let fresh = inner.notices.insert((id.clone(), notice.to_owned()));
        if fresh {
            inner.append(journal.events().to_vec());
        }
        Ok(fresh)
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for (id, at) in uses {
            if let Some(record) = inner.by_id.get_mut(id)
                && record.last_used_at.is_none_or(|prev| prev < *at)
            {
                record.last_used_at = Some(*at);
            }
        }
        Ok(())
    }

    async fn format_secrets(
        &self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, StoreError> {
        let mut inner = self.lock();
        if inner.legacy_keys.is_none() {
            inner.legacy_keys = Some(!inner.by_id.is_empty());
        }
        if inner.format_secrets.is_empty() {
            inner.format_secrets.push(StoredSecret {
                version: 1,
                secret: initial.clone(),
                created_at: now,
                retired_at: None,
            });
        }
        Ok(FormatSecrets {
            secrets: inner.format_secrets.clone(),
            legacy_keys: inner.legacy_keys.unwrap_or(false),
        })
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let mut inner = self.lock();
        let version = inner.format_secrets.last().map_or(1, |s| s.version + 1);
        if version > MAX_SECRET_VERSION {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "every secret version is used",
            ));
        }
        inner.format_secrets.push(StoredSecret {
            version,
            secret: secret.clone(),
            created_at: now,
            retired_at: None,
        });
        Ok(version)
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let others_active = inner
            .format_secrets
            .iter()
            .any(|s| s.version != version && s.retired_at.is_none());
        match inner
            .format_secrets
            .iter_mut()
            .find(|s| s.version == version && s.retired_at.is_none())
        {
            Some(secret) if others_active => {
                secret.retired_at = Some(now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn set_legacy_keys(&self, accept: bool, _now: OffsetDateTime) -> Result<(), StoreError> {
        self.lock().legacy_keys = Some(accept);
        Ok(())
    }

    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.update_with(id, update, &Journal::none()).await
    }

    async fn update_with(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut inner = self.lock();
        let Some(record) = inner.by_id.get_mut(id) else {
            return Ok(None);
        };
        let before = record.clone();
        update.apply(record);
        let change = KeyChange {
            before,
            after: Some(record.clone()),
            revoked_descendants: Vec::new(),
        };
        inner.append(journal.for_change(&change));
        Ok(change.after)
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        let mut inner = self.lock();
        Ok(inner
            .by_id
            .get_mut(id)
            .and_then(|record| record.limits.credits.as_mut())
            .map(|credits| super::credits::adjust(credits, delta, now)))
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = self.lock();
        let creator = inner.by_id.get(id).and_then(|r| r.created_by.as_ref());
        Ok(inner.ancestors_from(creator).into_iter().cloned().collect())
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .subtree(id)
            .iter()
            .filter_map(|id| inner.by_id.get(id).cloned())
            .collect())
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
        let inner = self.lock();
        let mut levels: Vec<BudgetLevel> = inner
            .ancestors_from(record.created_by.as_ref())
            .into_iter()
            .map(|ancestor| BudgetLevel {
                id: BudgetId::Key(ancestor.id.clone()),
                limits: ancestor.limits,
            })
            .collect();
        let owner: std::sync::Arc<str> = record.owner.as_str().into();
        for pool in [
            PoolId::account(owner.clone(), record.account.as_str()),
            PoolId::owner(owner),
        ] {
            if let Some(limits) = inner.pools.get(&pool) {
                levels.push(BudgetLevel {
                    id: BudgetId::Pool(pool),
                    limits: *limits,
                });
            }
        }
        levels.retain(|level| !level.limits.is_unlimited());
        Ok(levels)
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        Ok(self.lock().pools.get(pool).copied())
    }

    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.set_pool_with(pool, limits, if_absent, &Journal::none())
            .await
    }

    async fn set_pool_with(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if if_absent && inner.pools.contains_key(pool) {
            return Ok(false);
        }
        let wrote = match limits {
            Some(limits) => {
                inner.pools.insert(pool.clone(), limits);
                true
            }
            None => inner.pools.remove(pool).is_some(),
        };
        if wrote {
            inner.append(journal.events().to_vec());
        }
        Ok(wrote)
    }

    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        Ok(self.lock().append(events.to_vec()))
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .events
            .iter()
            .rev()
            .filter(|e| query.matches(e))
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        Ok(self.lock().chains.get(owner).copied().unwrap_or_default())
    }

    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .events
            .iter()
            .filter(|e| e.owner_id == owner && e.seq > after_seq)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let Inner { events, chains, .. } = &mut *inner;
        // Per owner, the events before the first kept one go; the last of them is the anchor.
        let mut kept_from: BTreeMap<&str, bool> = BTreeMap::new();
        let mut anchors: BTreeMap<String, ChainLink> = BTreeMap::new();
        let mut keep = Vec::with_capacity(events.len());
        for event in events.iter() {
            let kept = kept_from.entry(event.owner_id.as_str()).or_insert(false);
            *kept |= event.at >= before;
            if *kept {
                keep.push(true);
            } else {
                anchors.insert(
                    event.owner_id.clone(),
                    ChainLink {
                        seq: event.seq,
                        hash: event.hash,
                    },
                );
                keep.push(false);
            }
        }
        let removed = keep.iter().filter(|k| !**k).count() as u64;
        let mut flags = keep.into_iter();
        events.retain(|_| flags.next().unwrap_or(true));
        for (owner, anchor) in anchors {
            chains.entry(owner).or_default().anchor = anchor;
        }
        Ok(removed)
    }

    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for bucket in buckets {
            let slot = (bucket.key_id.clone(), bucket.hour.unix_timestamp());
            match inner.usage.get_mut(&slot) {
                Some(stored) => stored.merge(bucket),
                None => {
                    inner.usage.insert(slot, bucket.clone());
                }
            }
        }
        Ok(())
    }

    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let inner = self.lock();
        let range = (key_id.clone(), from.unix_timestamp())..(key_id.clone(), to.unix_timestamp());
        Ok(inner.usage.range(range).map(|(_, b)| b.clone()).collect())
    }

    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let cut = before.unix_timestamp();
        let len = inner.usage.len();
        inner.usage.retain(|(_, hour), _| *hour >= cut);
        Ok((len - inner.usage.len()) as u64)
    }

    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let inner = self.lock();
        let (from_hour, to_hour) = (from.unix_timestamp(), to.unix_timestamp());
        let mut totals: BTreeMap<&KeyId, UsageBucket> = BTreeMap::new();
        for ((id, hour), bucket) in &inner.usage {
            if *hour < from_hour || *hour >= to_hour {
                continue;
            }
            if inner.by_id.get(id).is_none_or(|r| r.owner != owner) {
                continue;
            }
            match totals.get_mut(id) {
                Some(total) => total.merge(bucket),
                None => {
                    totals.insert(
                        id,
                        UsageBucket {
                            hour: from,
                            ..bucket.clone()
                        },
                    );
                }
            }
        }
        Ok(totals.into_values().collect())
    }

    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<OwnerSummary>, StoreError> {
        let inner = self.lock();
        let mut owners: BTreeMap<&str, OwnerSummary> = BTreeMap::new();
        for record in inner.by_id.values() {
            let summary = owners.entry(&record.owner).or_insert_with(|| OwnerSummary {
                owner: record.owner.clone(),
                keys: 0,
                active_keys: 0,
            });
            summary.keys += 1;
            summary.active_keys += u64::from(record.is_active(now));
        }
        Ok(owners
            .into_values()
            .take(limit.min(MAX_OWNERS) as usize)
            .collect())
    }

    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        let levels = ChainLevels::new(levels);
        let mut inner = self.lock();
        Ok(inner.with_credits(&levels, |credits| levels.spend(credits, cost, now)))
    }

    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let levels = ChainLevels::new(levels);
        let mut inner = self.lock();
        inner.with_credits(&levels, |credits| levels.refund(credits, cost, now));
        Ok(())
    }
}
