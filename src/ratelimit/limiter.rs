//! [`RateLimiter`]: the one decision over a key's whole budget chain, whatever the backends.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::Either;
use time::OffsetDateTime;

use super::backends::{
    Backends, Configured, CreditBackend, CreditKind, InMemory, RateBackend, RateKind,
};
use super::credits::MemoryCredits;
use super::decision::{CreditStatus, Decision, FailMode, RateChain, RateStatus, Spend};
use super::headers::ceil_secs;
use super::memory::MemoryRates;
use crate::error::AuthError;
use crate::key::{KeyId, MASTER_KEY_ID};
use crate::limits::{Budget, BudgetId, BudgetLevel, RateLimit, UsageLimits};
use crate::principal::Principal;
use crate::store::StoreError;
use crate::throttle::Throttle;

type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

#[derive(Clone)]
struct Engine {
    rates: RateBackend,
    credits: CreditBackend,
    /// The master key's budget: one level with [`RateLimiter::master`]'s limit, or none.
    master: Budget,
    rate_failure: FailMode,
    credit_failure: FailMode,
    clock: Clock,
}

/// Decides, per request, whether a key is within every budget of its chain (its own rate limit and
/// credits, each limited ancestor's, the account and owner pools': see
/// [`Principal::budget`]). A request is admitted only if every level admits it, and then spends
/// at every level; a refused request spends nothing anywhere. Cheap to clone (one `Arc`); clones
/// share their state. Make layers with [`RateLimiter::layer`].
#[derive(Clone)]
pub struct RateLimiter(Arc<Engine>);

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rates", &self.0.rates)
            .field("credits", &self.0.credits)
            .field("master", &self.0.master)
            .field("rate_failure", &self.0.rate_failure)
            .field("credit_failure", &self.0.credit_failure)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter keeping rate-limit state in `rates` and counting credits in `credits`.
    pub fn new(rates: impl Into<RateBackend>, credits: impl Into<CreditBackend>) -> Self {
        Self(Arc::new(Engine {
            rates: rates.into(),
            credits: credits.into(),
            master: Budget::NONE,
            rate_failure: FailMode::Open,
            credit_failure: FailMode::Closed,
            clock: Arc::new(OffsetDateTime::now_utc),
        }))
    }

    /// One instance, all in memory: [`MemoryRates`] and [`MemoryCredits`].
    pub fn in_memory() -> Self {
        Self::new(MemoryRates::new(), MemoryCredits::new())
    }

    /// A changed copy (clones made before keep the old settings; the state is shared).
    fn edit(mut self, f: impl FnOnce(&mut Engine)) -> Self {
        f(Arc::make_mut(&mut self.0));
        self
    }

    /// Limits the master key too (by default it is not limited).
    #[must_use]
    pub fn master(self, limit: RateLimit) -> Self {
        self.edit(|e| {
            e.master = Budget::new([BudgetLevel {
                id: BudgetId::Key(KeyId::new(MASTER_KEY_ID)),
                limits: UsageLimits {
                    rate_limit: Some(limit),
                    credits: None,
                },
            }]);
        })
    }

    /// What to do when the rate-limit backend fails (default [`FailMode::Open`]).
    #[must_use]
    pub fn on_rate_error(self, mode: FailMode) -> Self {
        self.edit(|e| e.rate_failure = mode)
    }

    /// What to do when the credit backend fails (default [`FailMode::Closed`]).
    #[must_use]
    pub fn on_credit_error(self, mode: FailMode) -> Self {
        self.edit(|e| e.credit_failure = mode)
    }

    /// The wall clock used for credit refills (default `OffsetDateTime::now_utc`); for tests.
    #[must_use]
    pub fn clock(self, clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        self.edit(|e| e.clock = Arc::new(clock))
    }

    /// The levels a request of `principal` counts against: the master key's configured limit, the
    /// principal's budget, or (a principal made by hand with only
    /// [`with_limits`](Principal::with_limits)) its own limits as the one level.
    fn levels_of<'a>(&'a self, principal: &'a Principal) -> Cow<'a, [BudgetLevel]> {
        if principal.is_master() {
            return Cow::Borrowed(self.0.master.levels());
        }
        let budget = principal.budget();
        if !budget.is_unlimited() || principal.limits().is_unlimited() {
            return Cow::Borrowed(budget.levels());
        }
        Cow::Owned(vec![BudgetLevel {
            id: BudgetId::Key(principal.key_id().clone()),
            limits: *principal.limits(),
        }])
    }

    /// Whether `principal` is limited at all (a request of a key with no limit anywhere in its
    /// chain costs one branch).
    pub fn applies_to(&self, principal: &Principal) -> bool {
        if principal.is_master() {
            !self.0.master.is_unlimited()
        } else {
            !principal.budget().is_unlimited() || !principal.limits().is_unlimited()
        }
    }

    /// The decision for one request, made now, when it asks only in-memory backends (rates in
    /// memory, and credits in memory or a chain without credits); `None` when it would wait on
    /// I/O (then [`check`](Self::check) it).
    pub(crate) fn check_now(&self, principal: &Principal, cost: u32) -> Option<Decision> {
        let rates = match &self.0.rates.0 {
            RateKind::Memory(rates) => rates,
            #[cfg(feature = "redis")]
            RateKind::Redis(_) => return None,
        };
        let levels = self.levels_of(principal);
        let credits = match &self.0.credits.0 {
            CreditKind::Memory(ledger) => Some(ledger),
            CreditKind::Store(_) if levels.iter().any(|l| l.limits.credits.is_some()) => {
                return None;
            }
            CreditKind::Store(_) => None,
        };
        if credits.is_none() || !levels.iter().any(|l| l.limits.credits.is_some()) {
            // Rate limits alone (most keys): the rate part of the decision, without the
            // machinery for credits.
            let mut decision = Decision {
                rate_policy: levels.iter().find_map(|level| level.limits.rate_limit),
                ..Decision::unlimited()
            };
            self.apply_rates(&mut decision, &levels, Ok(rates.check(&levels, cost)));
            return Some(finish(decision));
        }
        let backends = InMemory { rates, credits };
        let decision = self.decide(&backends, &levels, cost).now_or_never();
        Some(decision.expect("in-memory backends answer without waiting"))
    }

    /// Decides one request of `principal` costing `cost` units over every level of its budget,
    /// and spends them at every level if admitted. On in-memory backends the decision is made
    /// before this returns (the future is ready at once and small); one that waits on a backend
    /// (Redis, the store) is boxed.
    pub fn check<'a>(
        &'a self,
        principal: &'a Principal,
        cost: u32,
    ) -> impl Future<Output = Decision> + Send + 'a {
        if let Some(decision) = self.check_now(principal, cost) {
            return Either::Left(std::future::ready(decision));
        }
        Either::Right(Box::pin(self.check_waiting(principal, cost)))
    }

    /// The decision on the configured backends, for one that [`check_now`](Self::check_now)
    /// could not make without waiting.
    pub(super) async fn check_waiting(&self, principal: &Principal, cost: u32) -> Decision {
        let levels = self.levels_of(principal);
        let backends = Configured {
            rates: &self.0.rates,
            credits: &self.0.credits,
        };
        self.decide(&backends, &levels, cost).await
    }

    /// The one decision for a request over `levels` (those of its principal), whatever the
    /// backends: [`check`](Self::check) awaits it on the configured ones,
    /// [`check_now`](Self::check_now) runs it to completion on in-memory ones. Credits are spent
    /// first (all levels or none); then the rate limits are checked (all levels or none); if they
    /// refuse, the credits are given back.
    async fn decide<B: Backends>(
        &self,
        backends: &B,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> Decision {
        if levels.is_empty() {
            return Decision::unlimited();
        }
        let engine = &*self.0;
        let nearest_rate = levels.iter().find_map(|level| level.limits.rate_limit);
        let credited = levels.iter().any(|level| level.limits.credits.is_some());
        let mut decision = Decision {
            rate_policy: nearest_rate,
            ..Decision::unlimited()
        };
        // The wall clock is for refills: read only for a chain with credits.
        let now = match credited {
            true => (engine.clock)(),
            false => OffsetDateTime::UNIX_EPOCH,
        };
        let mut spent = false;
        if credited {
            let status = |level: usize, remaining: u64| {
                let refill = levels[level].limits.credits.and_then(|c| c.refill);
                CreditStatus {
                    remaining,
                    refill,
                    reset: refill.map(|r| (r.interval.next_refill(now) - now).unsigned_abs()),
                }
            };
            match backends.spend(levels, cost, now).await {
                Ok(Spend::Spent { level, remaining }) => {
                    spent = true;
                    decision.credits = Some(status(level, remaining));
                }
                Ok(Spend::NotCounted) => {}
                Ok(Spend::Exhausted { level, remaining }) => {
                    let credits = status(level, remaining);
                    decision.credits = Some(credits);
                    decision.refusal = Some(AuthError::UsageExceeded {
                        retry_after: credits.reset.map(ceil_secs),
                    });
                    decision.refused_by = Some(levels[level].id.clone());
                    return finish(decision);
                }
                Err(error) => {
                    backend_failed("credits", engine.credit_failure, &error);
                    if engine.credit_failure == FailMode::Closed {
                        decision.refusal = Some(AuthError::Unavailable(error));
                        return finish(decision);
                    }
                }
            }
        }
        if nearest_rate.is_some() {
            let chain = backends.rate(levels, cost).await;
            self.apply_rates(&mut decision, levels, chain);
            if decision.refusal.is_some() && spent {
                // A refused request consumes nothing: give the credits back.
                match backends.refund(levels, cost, now).await {
                    Ok(()) => {
                        if let Some(credits) = &mut decision.credits {
                            credits.remaining = credits.remaining.saturating_add(cost.into());
                        }
                    }
                    Err(error) => {
                        static REFUND: Throttle = Throttle::new();
                        if let Some(left_out) = REFUND.admit() {
                            tracing::warn!(
                                budget = %levels[0].id,
                                error = %error,
                                left_out,
                                "could not give back the credits of a rate-limited request"
                            );
                        }
                    }
                }
            }
        }
        finish(decision)
    }
}

impl RateLimiter {
    /// Puts the outcome of the rate limits of `levels` (the levels of one request) in
    /// `decision`: the most constraining (or refusing) level's state, the refusal, or what the
    /// fail mode says about a backend failure.
    fn apply_rates(
        &self,
        decision: &mut Decision,
        levels: &[BudgetLevel],
        chain: Result<Option<RateChain>, StoreError>,
    ) {
        match chain {
            Ok(Some(chain)) => {
                let outcome = chain.outcome;
                let limit = levels[chain.level]
                    .limits
                    .rate_limit
                    .expect("a rate chain names a rate-limited level");
                decision.rate_policy = Some(limit);
                decision.rate = Some(RateStatus {
                    limit,
                    remaining: outcome.remaining,
                    reset: outcome.reset,
                    retry_after: outcome.retry_after,
                });
                if !outcome.allowed {
                    decision.refusal = Some(AuthError::RateLimited {
                        retry_after: ceil_secs(outcome.retry_after).max(1),
                    });
                    decision.refused_by = Some(levels[chain.level].id.clone());
                }
            }
            Ok(None) => {}
            Err(error) => {
                let mode = self.0.rate_failure;
                backend_failed("rates", mode, &error);
                if mode == FailMode::Closed {
                    decision.refusal = Some(AuthError::Unavailable(error));
                }
            }
        }
    }
}

fn finish(decision: Decision) -> Decision {
    metrics::decided(&decision);
    decision
}

#[cfg(feature = "metrics")]
mod metrics {
    use ::metrics::{Key, Label, Level, Metadata};

    use super::{Decision, FailMode};
    use crate::error::ErrorCode;

    use crate::metrics::{
        RATE_LIMIT_BACKEND_ERRORS_TOTAL as BACKEND_ERRORS_TOTAL,
        RATE_LIMIT_TOTAL as DECISIONS_TOTAL,
    };

    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    macro_rules! key {
        ($name:expr, $($k:literal => $v:expr),+) => {{
            static LABELS: &[Label] = &[$(Label::from_static_parts($k, $v)),+];
            static KEY: Key = Key::from_static_parts($name, LABELS);
            &KEY
        }};
    }

    fn count(key: &'static Key) {
        ::metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA).increment(1));
    }

    pub(super) fn decided(decision: &Decision) {
        if !decision.is_limited() {
            return;
        }
        count(match decision.refusal.as_ref().map(|e| e.code()) {
            None => key!(DECISIONS_TOTAL, "outcome" => "admitted"),
            Some(ErrorCode::RateLimited) => {
                key!(DECISIONS_TOTAL, "outcome" => ErrorCode::RateLimited.as_str())
            }
            Some(ErrorCode::UsageExceeded) => {
                key!(DECISIONS_TOTAL, "outcome" => ErrorCode::UsageExceeded.as_str())
            }
            Some(_) => key!(DECISIONS_TOTAL, "outcome" => ErrorCode::Unavailable.as_str()),
        });
    }

    pub(super) fn backend_error(backend: &'static str, mode: FailMode) {
        count(match (backend, mode) {
            ("rates", FailMode::Open) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "rates", "mode" => "open")
            }
            ("rates", FailMode::Closed) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "rates", "mode" => "closed")
            }
            (_, FailMode::Open) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "credits", "mode" => "open")
            }
            (_, FailMode::Closed) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "credits", "mode" => "closed")
            }
        });
    }
}

#[cfg(not(feature = "metrics"))]
mod metrics {
    use super::{Decision, FailMode};

    #[inline(always)]
    pub(super) fn decided(_: &Decision) {}

    #[inline(always)]
    pub(super) fn backend_error(_: &'static str, _: FailMode) {}
}
/// A backend failure: counted every time, logged at most once a second per backend (an outage
/// under load would otherwise write a line per request), with how many were left out.
fn backend_failed(backend: &'static str, mode: FailMode, error: &StoreError) {
    static RATES: Throttle = Throttle::new();
    static CREDITS: Throttle = Throttle::new();
    let throttle = if backend == "rates" { &RATES } else { &CREDITS };
    if let Some(left_out) = throttle.admit() {
        tracing::warn!(
            backend,
            mode = mode.as_str(),
            error = %error,
            left_out,
            "rate-limit backend failed; failing {}",
            mode.as_str()
        );
    }
    metrics::backend_error(backend, mode);
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;
    use crate::limits::Credits;

    #[test]
    fn metrics_count_admitted_and_refused_by_reason() {
        use futures_util::FutureExt;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let limiter = RateLimiter::in_memory();
        let principal = |id: &str, limits| {
            Principal::scoped(KeyId::new(id), "n", "o", "a", Default::default(), None)
                .with_limits(limits)
        };
        let rated = principal(
            "key_r",
            UsageLimits {
                rate_limit: Some(RateLimit::new(2, 60)),
                credits: None,
            },
        );
        let paid = principal(
            "key_c",
            UsageLimits {
                rate_limit: None,
                credits: Some(Credits::new(1)),
            },
        );
        let free = principal("key_f", UsageLimits::NONE);
        ::metrics::with_local_recorder(&recorder, || {
            for p in [&rated, &rated, &rated, &paid, &paid, &free] {
                limiter.check(p, 1).now_or_never().unwrap();
            }
        });
        let text = handle.render();
        let count = |outcome: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "api_key_rate_limit_total{{outcome=\"{outcome}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.to_owned())
        };
        assert_eq!(count("admitted").as_deref(), Some("3"), "{text}");
        assert_eq!(count("RATE_LIMITED").as_deref(), Some("1"), "{text}");
        assert_eq!(count("USAGE_EXCEEDED").as_deref(), Some("1"), "{text}");
    }
}
