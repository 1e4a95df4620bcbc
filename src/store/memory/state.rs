//! What a [`MemoryStore`](super::MemoryStore) holds, behind its one mutex, and the key writes
//! applied to it: each checks, changes the maps and answers what changed, under the lock (the
//! store writes the change's events before it lets go).

use std::collections::{BTreeMap, HashMap, HashSet};

use time::OffsetDateTime;

use crate::audit::{AuditEvent, ChainLink, ChainState, EventDraft, Journal};
use crate::key::{FormatSecret, KeyId, MAX_SECRET_VERSION};
use crate::limits::{BudgetId, Credits, PoolId, UsageLimits};
use crate::record::{KeyChange, KeyRecord, MAX_DELEGATION_DEPTH, PreviousSecret};
use crate::store::credits::ChainLevels;
use crate::store::format::{FormatSecrets, StoredSecret};
use crate::store::params::{KeyLimits, KeyUpdate, Rotation};
use crate::store::usage::UsageBucket;
use crate::store::{StoreError, StoreErrorKind};

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) by_id: BTreeMap<KeyId, KeyRecord>,
    pub(super) by_digest: HashMap<[u8; 32], KeyId>,
    /// The keyed format's legacy record (`None` until first written) and secrets.
    pub(super) legacy_keys: Option<bool>,
    pub(super) format_secrets: Vec<StoredSecret>,
    /// The shared pools that are set.
    pub(super) pools: BTreeMap<PoolId, UsageLimits>,
    /// Every owner's audit events, in the order written, and each owner's chain.
    pub(super) events: Vec<AuditEvent>,
    pub(super) chains: BTreeMap<String, ChainState>,
    /// Hourly usage counts by key and hour (Unix seconds).
    pub(super) usage: BTreeMap<(KeyId, i64), UsageBucket>,
    /// The hygiene notices given, per key.
    pub(super) notices: HashSet<(KeyId, String)>,
}

impl Inner {
    /// Seals `drafts` onto their owners' chains and keeps them: the one place events are written.
    pub(super) fn append(&mut self, drafts: Vec<EventDraft>) -> Vec<AuditEvent> {
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

    /// Writes `journal`'s events for `change`, when there is one, and hands the change back.
    pub(super) fn journaled(
        &mut self,
        change: Option<KeyChange>,
        journal: &Journal,
    ) -> Option<KeyChange> {
        if let Some(change) = &change {
            self.append(journal.for_change(change));
        }
        change
    }

    fn unindex(&mut self, record: &KeyRecord) {
        for digest in record.digests() {
            self.by_digest.remove(digest.as_bytes());
        }
    }

    /// The ids of every descendant of `root` (its subtree without itself), in no order: what
    /// cascades revoke and [`KeyStore::descendants`] answers.
    pub(super) fn subtree(&self, root: &KeyId) -> Vec<KeyId> {
        let mut children: HashMap<&KeyId, Vec<&KeyId>> = HashMap::new();
        for record in self.by_id.values() {
            if let Some(parent) = &record.created_by {
                children.entry(parent).or_default().push(&record.id);
            }
        }
        // A key is inserted after its creator, so this is a tree; `seen` guards against a cycle in
        // data written some other way.
        let mut seen = HashSet::from([root]);
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
    pub(super) fn ancestors_from(&self, creator: Option<&KeyId>) -> Vec<&KeyRecord> {
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
    pub(super) fn with_credits<T>(
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

    /// Stores `record` unless its id or a digest is taken, its creator is not active at `now`, or
    /// `limits` would be exceeded.
    pub(super) fn insert(
        &mut self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if self.by_id.contains_key(&record.id)
            || record
                .digests()
                .any(|d| self.by_digest.contains_key(d.as_bytes()))
        {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        if let Some(creator) = &record.created_by
            && !self.by_id.get(creator).is_some_and(|c| c.is_active(now))
        {
            return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
        }
        let active = |same: &dyn Fn(&KeyRecord) -> bool| {
            self.by_id
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
            self.by_digest.insert(*digest.as_bytes(), record.id.clone());
        }
        self.by_id.insert(record.id.clone(), record.clone());
        Ok(())
    }

    /// Revokes the key at `at` (keeping an earlier revocation) and its descendants.
    pub(super) fn revoke(&mut self, id: &KeyId, at: OffsetDateTime) -> Option<KeyChange> {
        let record = self.by_id.get_mut(id)?;
        let before = record.clone();
        record.revoked_at.get_or_insert(at);
        let after = record.clone();
        let revoked_descendants = self.revoke_descendants(id, at);
        Some(KeyChange {
            before,
            after: Some(after),
            revoked_descendants,
        })
    }

    /// Removes the key and revokes its descendants at `at`.
    pub(super) fn delete(&mut self, id: &KeyId, at: OffsetDateTime) -> Option<KeyChange> {
        let before = self.by_id.remove(id)?;
        self.unindex(&before);
        let revoked_descendants = self.revoke_descendants(id, at);
        Some(KeyChange {
            before,
            after: None,
            revoked_descendants,
        })
    }

    /// Replaces the key's secret as `rotation` says.
    pub(super) fn replace_secret(
        &mut self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        let Some(old) = self.by_id.get(id).cloned() else {
            return Ok(None);
        };
        if old.revoked_at.is_some() {
            return Err(StoreError::from_kind(StoreErrorKind::Revoked));
        }
        if self.by_digest.contains_key(rotation.digest.as_bytes()) {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        self.unindex(&old);
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
            self.by_digest.insert(*digest.as_bytes(), id.clone());
        }
        self.by_id.insert(id.clone(), record.clone());
        let revoked_descendants = if rotation.revoke_descendants {
            self.revoke_descendants(id, rotation.rotated_at)
        } else {
            Vec::new()
        };
        Ok(Some(KeyChange {
            before: old,
            after: Some(record),
            revoked_descendants,
        }))
    }

    /// Changes the key's name, rate limit or credits.
    pub(super) fn update(&mut self, id: &KeyId, update: &KeyUpdate) -> Option<KeyChange> {
        let record = self.by_id.get_mut(id)?;
        let before = record.clone();
        update.apply(record);
        Some(KeyChange {
            before,
            after: Some(record.clone()),
            revoked_descendants: Vec::new(),
        })
    }

    /// The format's secrets, storing `initial` as version 1 in a store holding none.
    pub(super) fn format_secrets(
        &mut self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> FormatSecrets {
        if self.legacy_keys.is_none() {
            self.legacy_keys = Some(!self.by_id.is_empty());
        }
        if self.format_secrets.is_empty() {
            self.format_secrets.push(StoredSecret {
                version: 1,
                secret: initial.clone(),
                created_at: now,
                retired_at: None,
            });
        }
        FormatSecrets {
            secrets: self.format_secrets.clone(),
            legacy_keys: self.legacy_keys.unwrap_or(false),
        }
    }

    /// Stores `secret` as the next version.
    pub(super) fn add_format_secret(
        &mut self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let version = self.format_secrets.last().map_or(1, |s| s.version + 1);
        if version > MAX_SECRET_VERSION {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "every secret version is used",
            ));
        }
        self.format_secrets.push(StoredSecret {
            version,
            secret: secret.clone(),
            created_at: now,
            retired_at: None,
        });
        Ok(version)
    }

    /// Retires `version` unless it is the last one not retired.
    pub(super) fn retire_format_secret(&mut self, version: u8, now: OffsetDateTime) -> bool {
        let others_active = self
            .format_secrets
            .iter()
            .any(|s| s.version != version && s.retired_at.is_none());
        match self
            .format_secrets
            .iter_mut()
            .find(|s| s.version == version && s.retired_at.is_none())
        {
            Some(secret) if others_active => {
                secret.retired_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Removes the events older than `before`, per owner up to the first kept one, and records
    /// the last removed as the chain's anchor; how many it removed.
    pub(super) fn purge_events(&mut self, before: OffsetDateTime) -> u64 {
        let Self { events, chains, .. } = self;
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
        removed
    }
}
