//! Whole-owner views for the console: every owner with its key counts (master key only), and
//! each key's requests over a period.

use std::collections::HashSet;

use time::OffsetDateTime;

use super::activity::MAX_USAGE_SPAN;
use super::manager::KeyManager;
use crate::authorize::{Operation, Target, authorize};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::store::{MAX_OWNERS, OwnerSummary};
use crate::usage::UsageBucket;

impl KeyManager {
    /// Every owner with at least one key, in owner order (at most [`MAX_OWNERS`]), with its key
    /// counts, active ones as of now: master key only ([`Operation::ListOwners`]; 403
    /// `AUTH_MASTER_KEY_REQUIRED`, recorded as `key.refused`).
    pub async fn owners(&self, caller: &Principal) -> Result<Vec<OwnerSummary>, AuthError> {
        self.authorize_recorded(
            caller,
            Operation::ListOwners,
            &Target::Keys {
                owner: caller.owner().unwrap_or_default(),
                account: None,
            },
            None,
        )
        .await?;
        Ok(self
            .store
            .owners(OffsetDateTime::now_utc(), MAX_OWNERS)
            .await?)
    }

    /// Each of an owner's keys' requests with `from <= hour < to` (floored to the hour; at most
    /// [`MAX_USAGE_SPAN`]), summed per key: one bucket per key that had requests, its `hour` the
    /// start. Read like an owner's events ([`Operation::ReadActivity`]): `owner` required with
    /// the master key; a scoped key sees its own subtree's keys only.
    pub async fn usage_by_key(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, AuthError> {
        if to <= from || to - from > MAX_USAGE_SPAN {
            return Err(AuthError::invalid(
                "from must be before to, at most 92 days apart",
            ));
        }
        let owner = match owner {
            Some(owner) => super::validate::validate_id("owner", owner)?,
            None => caller.owner().ok_or(AuthError::OwnerRequired)?,
        };
        authorize(
            caller,
            Operation::ReadActivity,
            &Target::Keys {
                owner,
                account: caller.account(),
            },
        )?;
        let from = crate::usage::hour_of(from);
        let mut totals = self.store.usage_by_key(owner, from, to).await?;
        if !caller.is_master() {
            let mut subtree: HashSet<KeyId> = self
                .store
                .descendants(caller.key_id())
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect();
            subtree.insert(caller.key_id().clone());
            totals.retain(|total| subtree.contains(&total.key_id));
        }
        totals.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(totals)
    }
}
