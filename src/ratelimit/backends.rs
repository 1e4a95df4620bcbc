//! Where the state lives: [`RateBackend`] (memory or Redis) and [`CreditBackend`] (memory or the
//! key store), and the one interface a decision asks them through.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use time::OffsetDateTime;

use super::credits::MemoryCredits;
use super::decision::{RateChain, Spend};
use super::memory::MemoryRates;
#[cfg(feature = "redis")]
use super::redis::RedisRates;
use crate::limits::{BudgetId, BudgetLevel};
use crate::store::{ChainSpend, CreditAdjustment, KeyStore, StoreError};

/// Where rate-limit state lives: [`MemoryRates`] or `RedisRates`.
#[derive(Clone, Debug)]
pub struct RateBackend(pub(super) RateKind);

#[derive(Clone, Debug)]
pub(super) enum RateKind {
    Memory(MemoryRates),
    #[cfg(feature = "redis")]
    Redis(RedisRates),
}

impl From<MemoryRates> for RateBackend {
    fn from(rates: MemoryRates) -> Self {
        Self(RateKind::Memory(rates))
    }
}

#[cfg(feature = "redis")]
impl From<RedisRates> for RateBackend {
    fn from(rates: RedisRates) -> Self {
        Self(RateKind::Redis(rates))
    }
}

impl RateBackend {
    async fn check(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> Result<Option<RateChain>, StoreError> {
        match &self.0 {
            RateKind::Memory(rates) => Ok(rates.check(levels, cost)),
            #[cfg(feature = "redis")]
            RateKind::Redis(rates) => rates.check(levels, cost).await,
        }
    }
}

/// Where credits are counted: [`MemoryCredits`] or [`StoreCredits`].
#[derive(Clone, Debug)]
pub struct CreditBackend(pub(super) CreditKind);

#[derive(Clone)]
pub(super) enum CreditKind {
    Memory(MemoryCredits),
    Store(StoreCredits),
}

impl fmt::Debug for CreditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory(m) => m.fmt(f),
            Self::Store(s) => s.fmt(f),
        }
    }
}

/// Credits counted in the key store itself ([`KeyStore::spend_credits`]): every spend is one
/// atomic conditional update of every level of the chain that has credits (the key's, its
/// ancestors', the pools'), all or nothing, so instances sharing the store (PostgreSQL, a SQLite
/// file) never spend more than there is together at any level, `remaining` is always current in
/// the management API, and it survives restarts of anything but the store. It costs one store
/// write per request of a key with credits somewhere in its chain (none for keys without): one
/// conditional update ([`KeyStore::adjust_credits`]) when a single key level has credits, one
/// transaction over the chain otherwise.
#[derive(Clone)]
pub struct StoreCredits {
    store: Arc<dyn KeyStore>,
}

impl fmt::Debug for StoreCredits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCredits").finish_non_exhaustive()
    }
}

impl StoreCredits {
    /// Counts credits in `store` (the one keys are created in).
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self { store }
    }

    /// The levels with credits, and where each is in `levels`.
    fn credited(levels: &[BudgetLevel]) -> (Vec<BudgetId>, Vec<usize>) {
        levels
            .iter()
            .enumerate()
            .filter(|(_, level)| level.limits.credits.is_some())
            .map(|(i, level)| (level.id.clone(), i))
            .unzip()
    }

    /// The one key level with credits, when that is the whole chain's credits.
    fn single_key(levels: &[BudgetLevel]) -> Option<(usize, &crate::key::KeyId)> {
        let mut credited = levels
            .iter()
            .enumerate()
            .filter(|(_, level)| level.limits.credits.is_some());
        match (credited.next(), credited.next()) {
            (
                Some((
                    at,
                    BudgetLevel {
                        id: BudgetId::Key(id),
                        ..
                    },
                )),
                None,
            ) => Some((at, id)),
            _ => None,
        }
    }

    async fn spend(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> Result<Spend, StoreError> {
        if let Some((level, id)) = Self::single_key(levels) {
            return Ok(
                match self.store.adjust_credits(id, -i64::from(cost), now).await? {
                    Some(CreditAdjustment::Applied { remaining }) => {
                        Spend::Spent { level, remaining }
                    }
                    Some(CreditAdjustment::Insufficient { remaining }) => {
                        Spend::Exhausted { level, remaining }
                    }
                    None => Spend::NotCounted,
                },
            );
        }
        let (ids, at) = Self::credited(levels);
        Ok(
            match self.store.spend_credits(&ids, cost.into(), now).await? {
                ChainSpend::Spent { remaining } => remaining
                    .iter()
                    .zip(&at)
                    .filter_map(|(left, level)| left.map(|left| (left, *level)))
                    .min_by_key(|(left, _)| *left)
                    .map_or(Spend::NotCounted, |(remaining, level)| Spend::Spent {
                        level,
                        remaining,
                    }),
                ChainSpend::Insufficient { level, remaining } => Spend::Exhausted {
                    level: at.get(level).copied().unwrap_or_default(),
                    remaining,
                },
            },
        )
    }

    async fn refund(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if let Some((_, id)) = Self::single_key(levels) {
            return self
                .store
                .adjust_credits(id, cost.into(), now)
                .await
                .map(drop);
        }
        let (ids, _) = Self::credited(levels);
        self.store.refund_credits(&ids, cost.into(), now).await
    }
}

impl From<StoreCredits> for CreditBackend {
    fn from(credits: StoreCredits) -> Self {
        Self(CreditKind::Store(credits))
    }
}

impl From<MemoryCredits> for CreditBackend {
    fn from(credits: MemoryCredits) -> Self {
        Self(CreditKind::Memory(credits))
    }
}

impl CreditBackend {
    async fn spend(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> Result<Spend, StoreError> {
        match &self.0 {
            CreditKind::Memory(ledger) => Ok(ledger.spend(levels, cost, now)),
            CreditKind::Store(ledger) => ledger.spend(levels, cost, now).await,
        }
    }

    async fn refund(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        match &self.0 {
            CreditKind::Memory(ledger) => {
                ledger.refund(levels, cost, now);
                Ok(())
            }
            CreditKind::Store(ledger) => ledger.refund(levels, cost, now).await,
        }
    }
}

/// The backends one decision asks. The decision is written once against this; the configured
/// backends may wait on I/O, [`InMemory`] ones answer at once, so a decision on them runs to
/// completion in one poll without a boxed or large future.
pub(super) trait Backends {
    /// Spends `cost` credits at every level of `levels` that has credits, or nowhere.
    fn spend(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send;

    /// Gives back what [`spend`](Self::spend) spent.
    fn refund(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Decides `cost` units over every level of `levels` that has a rate limit, all or nothing.
    fn rate(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> impl Future<Output = Result<Option<RateChain>, StoreError>> + Send;
}

/// The configured backends.
pub(super) struct Configured<'a> {
    pub(super) rates: &'a RateBackend,
    pub(super) credits: &'a CreditBackend,
}

impl Backends for Configured<'_> {
    fn spend(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send {
        self.credits.spend(levels, cost, now)
    }

    fn refund(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.credits.refund(levels, cost, now)
    }

    fn rate(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> impl Future<Output = Result<Option<RateChain>, StoreError>> + Send {
        self.rates.check(levels, cost)
    }
}

/// The backends of a decision that asks only memory: in-memory rates, and in-memory credits or
/// none (a chain without credits never asks the credit backend, wherever it is).
pub(super) struct InMemory<'a> {
    pub(super) rates: &'a MemoryRates,
    pub(super) credits: Option<&'a MemoryCredits>,
}

impl Backends for InMemory<'_> {
    fn spend(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send {
        // `None` only for chains without credits, which are never spent for.
        std::future::ready(Ok(match self.credits {
            Some(ledger) => ledger.spend(levels, cost, now),
            None => Spend::NotCounted,
        }))
    }

    fn refund(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Some(ledger) = self.credits {
            ledger.refund(levels, cost, now);
        }
        std::future::ready(Ok(()))
    }

    fn rate(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> impl Future<Output = Result<Option<RateChain>, StoreError>> + Send {
        std::future::ready(Ok(self.rates.check(levels, cost)))
    }
}
