//! Changing what a key may use: [`KeyManager::update`] (name, rate limit, credits) and the shared
//! pools of an owner or account ([`pool`](KeyManager::pool), [`set_pool`](KeyManager::set_pool)).

use time::OffsetDateTime;

use super::manager::KeyManager;
use super::types::{KeyInfo, UpdateKey};
use super::validate::{validate_credits, validate_id, validate_name, validate_rate_limit};
use crate::audit::{EventDraft, EventType, Journal};
use crate::authorize::{KeyFacts, Operation, Target, authorize};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::limits::{Credits, PoolId, RateLimit, UsageLimits};
use crate::principal::Principal;
use crate::store::{KeyChange, KeyUpdate, ListQuery, StoreErrorKind};

impl KeyManager {
    /// Changes a key's name, rate limit or credits ([`Operation::Update`]: the rules of
    /// create hold, and a scoped caller never gives more than it has). New credits replace the
    /// count (a top-up is a new `remaining`); a removed limit of a scoped caller's key becomes the
    /// caller's own.
    pub async fn update(
        &self,
        caller: &Principal,
        id: &KeyId,
        request: UpdateKey,
    ) -> Result<KeyInfo, AuthError> {
        self.update_in(caller, id, None, request).await
    }

    /// [`update`](Self::update), when the request also names the key's owner (`?owner=`).
    pub async fn update_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        request: UpdateKey,
    ) -> Result<KeyInfo, AuthError> {
        let now = OffsetDateTime::now_utc();
        let name = request.name.map(validate_name).transpose()?;
        let rate_limit = request.rate_limit.map(validate_rate_limit).transpose()?;
        let credits = request.credits.map(validate_credits).transpose()?;
        if let Some(owner) = owner {
            validate_id("owner", owner)?;
        }
        let caller = self.current(caller).await?;
        let old = self.store.get(id).await?;
        // The limits the update gives, for the rule; a field it leaves alone is not given by it
        // and is judged as the caller's own (trivially within).
        let limits = old.as_ref().map(|old| {
            inherit(
                &caller,
                rate_limit.unwrap_or(old.limits.rate_limit),
                credits.unwrap_or(old.limits.credits),
                now,
            )
        });
        let judged = limits.map(|limits| UsageLimits {
            rate_limit: if rate_limit.is_some() {
                limits.rate_limit
            } else {
                caller.limits().rate_limit
            },
            credits: if credits.is_some() {
                limits.credits
            } else {
                caller.limits().credits
            },
        });
        let lineage = self
            .lineage(&caller, Operation::Update, old.as_ref())
            .await?;
        let target = Target::Key {
            named_owner: owner,
            key: old.as_ref().zip(judged).map(|(old, limits)| KeyFacts {
                limits,
                ..KeyFacts::of(old, &lineage)
            }),
        };
        self.authorize_recorded(&caller, Operation::Update, &target, Some(id))
            .await?;
        let (old, limits) = old.zip(limits).ok_or(AuthError::NotFound)?;
        let update = KeyUpdate {
            name,
            rate_limit: rate_limit.map(|_| limits.rate_limit),
            credits: credits.map(|_| limits.credits),
        };
        let journal = Journal::of(
            self.draft(&caller, EventType::KEY_UPDATED, &old.owner)
                .about(&old),
        )
        .with_diff();
        let record = self
            .store
            .update_with(id, &update, &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        if record.limits == old.limits {
            self.invalidate(&KeyChange {
                before: old,
                after: Some(record.clone()),
                revoked_descendants: Vec::new(),
            })
            .await;
        } else {
            // The key's limits are a level of every descendant's budget (I3): their cached
            // principals carry the old ones.
            let descendants = self.store.descendants(id).await?;
            self.invalidate_records(id, std::iter::once(&old).chain(&descendants))
                .await;
        }
        tracing::info!(api_key_id = %record.id, "API key updated");
        Ok(record.into())
    }

    /// Writes the policy's pools for a new key's account and owner where none is set yet (an
    /// insert-if-absent), and forgets the cached keys a new pool now binds.
    pub(super) async fn open_pools(
        &self,
        caller: &Principal,
        owner: &str,
        account: &str,
    ) -> Result<(), AuthError> {
        for pool in [PoolId::account(owner, account), PoolId::owner(owner)] {
            let Some(limits) = self.policy.pool_default(&pool) else {
                continue;
            };
            let limits = start_now(limits, OffsetDateTime::now_utc());
            let journal = Journal::of(
                self.pool_event(caller, &pool, Some(&limits))
                    .detail("source", "policy default"),
            );
            if self
                .store
                .set_pool_with(&pool, Some(limits), true, &journal)
                .await?
            {
                self.invalidate_pool_members(&pool).await?;
            }
        }
        Ok(())
    }

    /// The limits of a shared pool (the owner's with `account` `None`), `None` when it has none.
    /// Allowed exactly when listing the owner's (account's) keys is ([`Operation::GetPool`]).
    pub async fn pool(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        account: Option<&str>,
    ) -> Result<Option<UsageLimits>, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = account.map(|a| validate_id("account", a)).transpose()?;
        let listed = account.or(caller.account());
        authorize(
            caller,
            Operation::GetPool,
            &Target::Keys {
                owner,
                account: listed,
            },
        )?;
        let pool = match account {
            Some(account) => PoolId::account(owner, account),
            None => PoolId::owner(owner),
        };
        Ok(self.store.pool(&pool).await?)
    }

    /// Sets the limits of a shared pool (the owner's with `account` `None`), or removes it with
    /// `None`: every key of the owner (account) counts against it from its next request, on
    /// every instance (I3). Needs the master key ([`Operation::SetPool`]): a pool binds keys
    /// outside any scoped key's subtree. New credits are set now.
    pub async fn set_pool(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        account: Option<&str>,
        limits: Option<UsageLimits>,
    ) -> Result<Option<UsageLimits>, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = account.map(|a| validate_id("account", a)).transpose()?;
        if let Some(limits) = &limits {
            validate_rate_limit(limits.rate_limit)?;
            validate_credits(limits.credits)?;
        }
        self.authorize_recorded(
            caller,
            Operation::SetPool,
            &Target::Keys { owner, account },
            None,
        )
        .await?;
        let pool = match account {
            Some(account) => PoolId::account(owner, account),
            None => PoolId::owner(owner),
        };
        let limits = limits
            .filter(|l| !l.is_unlimited())
            .map(|l| start_now(l, OffsetDateTime::now_utc()));
        let journal = Journal::of(self.pool_event(caller, &pool, limits.as_ref()));
        match self
            .store
            .set_pool_with(&pool, limits, false, &journal)
            .await
        {
            Ok(_) => {}
            Err(error) if error.kind() == StoreErrorKind::Unsupported => {
                return Err(AuthError::invalid("this key store has no shared pools"));
            }
            Err(error) => return Err(error.into()),
        }
        self.invalidate_pool_members(&pool).await?;
        tracing::info!(owner = %pool.owner, account = ?pool.account, "API key pool set");
        Ok(limits)
    }

    /// The `pool.set` event of `pool` getting `limits` (`None`: removed).
    fn pool_event(
        &self,
        caller: &Principal,
        pool: &PoolId,
        limits: Option<&UsageLimits>,
    ) -> EventDraft {
        let mut draft = self
            .draft(caller, EventType::POOL_SET, &pool.owner)
            .detail(
                "pool",
                if pool.account.is_some() {
                    "account"
                } else {
                    "owner"
                },
            )
            .detail("removed", limits.is_none());
        draft.account_id = pool.account.as_deref().map(str::to_owned);
        if let Some(limits) = limits {
            draft.details.insert(
                "rate_limit".into(),
                limits.rate_limit.map_or(
                    serde_json::Value::Null,
                    |r| serde_json::json!({"limit": r.limit, "period_seconds": r.period_seconds}),
                ),
            );
            draft.details.insert(
                "credits".into(),
                limits
                    .credits
                    .map_or(serde_json::Value::Null, |c| c.remaining.into()),
            );
        }
        draft
    }

    /// Forgets every cached key of the pool's owner (and account): their budgets changed.
    async fn invalidate_pool_members(&self, pool: &PoolId) -> Result<(), AuthError> {
        const PAGE: u32 = 500;
        let mut query = ListQuery {
            owner: pool.owner.to_string(),
            account: pool.account.as_deref().map(str::to_owned),
            before: None,
            limit: PAGE,
        };
        loop {
            let page = self.store.list(&query).await?;
            if let Some(first) = page.first() {
                self.invalidate_records(&first.id, page.iter()).await;
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => query.before = Some(last.id.clone()),
                _ => return Ok(()),
            }
        }
    }
}

/// `limits` with its credits counted from `now`.
fn start_now(limits: UsageLimits, now: OffsetDateTime) -> UsageLimits {
    UsageLimits {
        rate_limit: limits.rate_limit,
        credits: limits.credits.map(|c| c.set_at(now)),
    }
}

/// The limits of a key `caller` gives `rate_limit` and `credits` (set now): what a scoped caller
/// has fills what is not given, so a delegate is never unlimited where its creator is limited.
pub(super) fn inherit(
    caller: &Principal,
    rate_limit: Option<RateLimit>,
    credits: Option<Credits>,
    now: OffsetDateTime,
) -> UsageLimits {
    let own = caller.limits();
    UsageLimits {
        rate_limit: rate_limit.or(own.rate_limit),
        credits: credits
            .or_else(|| own.credits.map(|c| c.refreshed(now)))
            .map(|c| c.set_at(now)),
    }
}
