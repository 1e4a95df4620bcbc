//! [`MemoryStore`] and its [`KeyStore`] implementation: each method takes the one lock, reads or
//! changes the state (`state`), writes the change's events, and lets go.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;

use super::state::Inner;
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId};
use crate::limits::{BudgetId, BudgetLevel, PoolId, UsageLimits};
use crate::record::{KeyChange, KeyRecord};
use crate::store::StoreError;
use crate::store::credits::{ChainLevels, ChainSpend, CreditAdjustment, adjust};
use crate::store::format::FormatSecrets;
use crate::store::key_store::KeyStore;
use crate::store::overview::{MAX_OWNERS, OwnerSummary};
use crate::store::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::store::usage::UsageBucket;

/// An in-memory [`KeyStore`]: for tests, examples and services that can lose keys on restart.
///
/// One mutex guards everything, which makes limit checks atomic; it is never held across an await.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
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
        inner.insert(record, limits, now)?;
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
        let change = inner.revoke(id, at);
        Ok(inner.journaled(change, journal))
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
        let change = inner.delete(id, at);
        Ok(inner.journaled(change, journal))
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
        let change = inner.replace_secret(id, rotation)?;
        Ok(inner.journaled(change, journal))
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
        Ok(self.lock().format_secrets(initial, now))
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        self.lock().add_format_secret(secret, now)
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        Ok(self.lock().retire_format_secret(version, now))
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
        let change = inner.update(id, update);
        Ok(inner
            .journaled(change, journal)
            .and_then(|change| change.after))
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
            .map(|credits| adjust(credits, delta, now)))
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
        let owner: Arc<str> = record.owner.as_str().into();
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
        Ok(self.lock().purge_events(before))
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
