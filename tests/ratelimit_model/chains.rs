//! Budget chains against a reference model (see the crate-level comment of `ratelimit_model.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use proptest::prelude::*;
use time::OffsetDateTime;
use time::macros::datetime;
use tower_api_keys::error::ErrorCode;
use tower_api_keys::key::KeyId;
use tower_api_keys::limits::{
    Budget, BudgetId, BudgetLevel, Credits, PoolId, RateLimit, RefillInterval, UsageLimits,
};
use tower_api_keys::principal::Principal;
use tower_api_keys::ratelimit::{Decision, MemoryCredits, MemoryRates, RateLimiter};

/// The deepest chain of keys (a root at depth 1).
const MAX_DEPTH: usize = 4;

/// One budget level's settings: a rate limit (units per period), credits with an optional daily
/// refill amount.
#[derive(Clone, Copy, Debug)]
struct LevelSpec {
    rate: Option<u32>,
    credits: Option<(u64, Option<u64>)>,
}

/// A key: its parent (made a root when it would be deeper than `MAX_DEPTH`), its account (0 or 1),
/// its own limits.
#[derive(Clone, Debug)]
struct KeySpec {
    parent: Option<prop::sample::Index>,
    account: usize,
    limits: LevelSpec,
}

/// One request: which key, its cost, and how far the clocks move first (milliseconds).
#[derive(Clone, Debug)]
struct Step {
    key: prop::sample::Index,
    cost: u32,
    advance_ms: u64,
}

#[derive(Clone, Debug)]
struct Scenario {
    keys: Vec<KeySpec>,
    /// The pools: account 0, account 1, the owner.
    pools: [LevelSpec; 3],
    steps: Vec<Step>,
}

fn level_spec() -> impl Strategy<Value = LevelSpec> {
    let rate = prop::option::weighted(0.6, 1u32..=6);
    let credits = prop::option::weighted(0.4, (0u64..=15, prop::option::weighted(0.5, 1u64..=10)));
    (rate, credits).prop_map(|(rate, credits)| LevelSpec { rate, credits })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let key = (
        prop::option::weighted(0.8, any::<prop::sample::Index>()),
        0usize..2,
        level_spec(),
    )
        .prop_map(|(parent, account, limits)| KeySpec {
            parent,
            account,
            limits,
        });
    let unlimited = Just(LevelSpec {
        rate: None,
        credits: None,
    });
    let pool = prop_oneof![2 => unlimited, 1 => level_spec()];
    let step = (
        any::<prop::sample::Index>(),
        1u32..=4,
        prop_oneof![12 => 0u64..=3_000, 1 => 3_600_000u64..=8 * 3_600_000],
    )
        .prop_map(|(key, cost, advance_ms)| Step {
            key,
            cost,
            advance_ms,
        });
    (
        prop::collection::vec(key, 1..=7),
        [pool.clone(), pool.clone(), pool],
        prop::collection::vec(step, 1..=60),
    )
        .prop_map(|(keys, pools, steps)| Scenario { keys, pools, steps })
}

/// The wall clock of refills at virtual time zero (two hours before a midnight).
const WALL_START: OffsetDateTime = datetime!(2026-03-04 22:00 UTC);

/// One level in the model: its limits, GCRA state (theoretical arrival time, virtual ns) and
/// credits (left, and when last set), and the literal history the invariants are checked on.
#[derive(Debug)]
struct ModelLevel {
    id: BudgetId,
    limits: UsageLimits,
    /// (limit, emission interval in ns)
    rate: Option<(u32, u64)>,
    tat: u64,
    credits_left: u64,
    credits_set_at: OffsetDateTime,
    /// Admitted requests: (earliest, latest) time of the decision in ns, cost.
    admitted: Vec<(u64, u64, u32)>,
    /// Credits spent since the last refill, and what the level had then.
    spent_since_refill: u64,
    had_at_refill: u64,
}

impl ModelLevel {
    fn new(id: BudgetId, spec: LevelSpec, period_seconds: u32) -> Self {
        let rate_limit = spec.rate.map(|n| RateLimit::new(n, period_seconds));
        let credits = spec.credits.map(|(start, refill)| {
            let credits = Credits::new(start).set_at(WALL_START);
            match refill {
                Some(amount) => credits.refill(RefillInterval::Daily, amount),
                None => credits,
            }
        });
        Self {
            id,
            limits: UsageLimits {
                rate_limit,
                credits,
            },
            rate: spec.rate.map(|n| {
                (
                    n,
                    (u64::from(period_seconds) * 1_000_000_000 / u64::from(n)).max(1),
                )
            }),
            tat: 0,
            credits_left: spec.credits.map_or(0, |(start, _)| start),
            credits_set_at: WALL_START,
            admitted: Vec::new(),
            spent_since_refill: 0,
            had_at_refill: spec.credits.map_or(0, |(start, _)| start),
        }
    }

    /// A due daily refill at `wall` sets what is left to the amount.
    fn refill(&mut self, wall: OffsetDateTime) {
        let Some(credits) = self.limits.credits else {
            return;
        };
        let Some(refill) = credits.refill else {
            return;
        };
        let day_start = wall.date().midnight().assume_utc();
        if day_start > self.credits_set_at {
            self.credits_left = refill.amount;
            self.credits_set_at = wall;
            self.spent_since_refill = 0;
            self.had_at_refill = refill.amount;
        }
    }

    /// (fits, until full in ns) for `cost` at `now`.
    fn gcra(&self, now: u64, cost: u32) -> Option<(bool, u64, u64)> {
        let (limit, emission) = self.rate?;
        let tat = self.tat.max(now);
        let new_tat = tat + emission * u64::from(cost);
        let fits = cost <= limit && new_tat - now <= emission * u64::from(limit);
        Some((fits, tat - now, new_tat))
    }

    fn left(&self, until_full: u64) -> u32 {
        let (limit, emission) = self.rate.expect("rate-limited");
        ((emission * u64::from(limit)).saturating_sub(until_full) / emission) as u32
    }
}

/// What the model expects of a decision.
#[derive(Debug, PartialEq)]
struct Expected {
    refusal: Option<ErrorCode>,
    refused_by: Option<BudgetId>,
    rate_left: Option<u32>,
    credits_left: Option<u64>,
}

/// The model of one scenario: its levels, and each key's chain (indexes into `levels`).
struct Model {
    levels: Vec<ModelLevel>,
    chains: Vec<Vec<usize>>,
    principals: Vec<Principal>,
}

impl Model {
    fn new(run: &str, scenario: &Scenario, period_seconds: u32) -> Self {
        let mut levels = Vec::new();
        let mut parents: Vec<Option<usize>> = Vec::new();
        let mut depth: Vec<usize> = Vec::new();
        for (i, key) in scenario.keys.iter().enumerate() {
            let parent = match key.parent {
                Some(index) if i > 0 => Some(index.index(i)),
                _ => None,
            }
            .filter(|&p| depth[p] < MAX_DEPTH);
            depth.push(parent.map_or(1, |p| depth[p] + 1));
            parents.push(parent);
            let id = BudgetId::Key(KeyId::new(format!("key_{run}_{i}")));
            levels.push(ModelLevel::new(id, key.limits, period_seconds));
        }
        let owner: Arc<str> = format!("team_{run}").into();
        for (i, spec) in scenario.pools.iter().enumerate() {
            let id = match i {
                2 => PoolId::owner(owner.clone()),
                account => PoolId::account(owner.clone(), format!("acct_{account}")),
            };
            levels.push(ModelLevel::new(BudgetId::Pool(id), *spec, period_seconds));
        }
        let keys = scenario.keys.len();
        let mut chains = Vec::new();
        let mut principals = Vec::new();
        for (i, key) in scenario.keys.iter().enumerate() {
            let mut chain = vec![i];
            let mut next = parents[i];
            while let Some(p) = next {
                chain.push(p);
                next = parents[p];
            }
            chain.push(keys + key.account);
            chain.push(keys + 2);
            chain.retain(|&l| !levels[l].limits.is_unlimited());
            let budget = Budget::new(chain.iter().map(|&l| BudgetLevel {
                id: levels[l].id.clone(),
                limits: levels[l].limits,
            }));
            principals.push(
                Principal::scoped(
                    KeyId::new(format!("key_{run}_{i}")),
                    "model",
                    owner.as_ref(),
                    format!("acct_{}", key.account),
                    Default::default(),
                    None,
                )
                .with_limits(levels[i].limits)
                .with_budget(budget),
            );
            chains.push(chain);
        }
        Self {
            levels,
            chains,
            principals,
        }
    }

    /// Credits first (the first level in chain order with too little refuses), then rate limits (a
    /// cost above some level's whole limit is refused by the first such level; else the first
    /// level it does not fit). Admitted: spent everywhere. Refused: nothing changes.
    fn decide(&mut self, key: usize, cost: u32, now: u64, wall: OffsetDateTime) -> Expected {
        let chain = self.chains[key].clone();
        let mut expected = Expected {
            refusal: None,
            refused_by: None,
            rate_left: None,
            credits_left: None,
        };
        for &l in &chain {
            self.levels[l].refill(wall);
        }
        let credited: Vec<usize> = chain
            .iter()
            .copied()
            .filter(|&l| self.levels[l].limits.credits.is_some())
            .collect();
        if let Some(&l) = credited
            .iter()
            .find(|&&l| self.levels[l].credits_left < u64::from(cost))
        {
            expected.refusal = Some(ErrorCode::UsageExceeded);
            expected.refused_by = Some(self.levels[l].id.clone());
            expected.credits_left = Some(self.levels[l].credits_left);
            return expected;
        }
        let rated: Vec<usize> = chain
            .iter()
            .copied()
            .filter(|&l| self.levels[l].rate.is_some())
            .collect();
        let refused = rated
            .iter()
            .find(|&&l| cost > self.levels[l].rate.unwrap().0)
            .map(|&l| (l, 0))
            .or_else(|| {
                rated.iter().find_map(|&l| {
                    let (fits, until_full, _) = self.levels[l].gcra(now, cost)?;
                    (!fits).then(|| (l, self.levels[l].left(until_full)))
                })
            });
        if let Some((l, left)) = refused {
            expected.refusal = Some(ErrorCode::RateLimited);
            expected.refused_by = Some(self.levels[l].id.clone());
            expected.rate_left = Some(left);
            expected.credits_left = credited.iter().map(|&l| self.levels[l].credits_left).min();
            return expected;
        }
        for &l in &rated {
            let (_, _, new_tat) = self.levels[l].gcra(now, cost).unwrap();
            self.levels[l].tat = new_tat;
            let left = self.levels[l].left(new_tat - now);
            expected.rate_left = Some(expected.rate_left.map_or(left, |m: u32| m.min(left)));
        }
        for &l in &credited {
            let level = &mut self.levels[l];
            level.credits_left -= u64::from(cost);
            level.spent_since_refill += u64::from(cost);
        }
        expected.credits_left = credited.iter().map(|&l| self.levels[l].credits_left).min();
        expected
    }

    /// Records an admitted request at every level of `key`'s chain, decided between `from` and `to`
    /// (ns), and checks the GCRA bound and the credit bound literally at every level.
    fn record_and_check(
        &mut self,
        key: usize,
        cost: u32,
        from: u64,
        to: u64,
    ) -> Result<(), String> {
        for &l in &self.chains[key] {
            let level = &mut self.levels[l];
            if let Some((limit, emission)) = level.rate {
                level.admitted.push((from, to, cost));
                // Every window that ends with this request: from each earlier admitted one.
                let mut sum = 0u64;
                for &(start, _, c) in level.admitted.iter().rev() {
                    sum += u64::from(c);
                    let elapsed = to.saturating_sub(start);
                    let bound = u64::from(limit) + elapsed / emission;
                    if sum > bound {
                        return Err(format!(
                            "{}: {sum} admitted within {elapsed} ns, bound {bound}",
                            level.id
                        ));
                    }
                }
            }
            if level.limits.credits.is_some() && level.spent_since_refill > level.had_at_refill {
                return Err(format!(
                    "{}: {} credits spent since the last refill, it had {}",
                    level.id, level.spent_since_refill, level.had_at_refill
                ));
            }
        }
        Ok(())
    }
}

fn seen(decision: &Decision) -> Expected {
    Expected {
        refusal: decision.refusal.as_ref().map(|e| e.code()),
        refused_by: decision.refused_by.clone(),
        rate_left: decision.rate.as_ref().map(|r| r.remaining),
        credits_left: decision.credits.as_ref().map(|c| c.remaining),
    }
}

/// What every level's credits are at `wall`, as the ledger has them (a level it has not seen yet
/// has what its settings say).
fn ledger_state(ledger: &MemoryCredits, model: &Model, wall: OffsetDateTime) -> Vec<Option<u64>> {
    model
        .levels
        .iter()
        .map(|level| {
            ledger
                .remaining(&level.id, wall)
                .or(level.limits.credits.map(|c| c.current(wall)))
        })
        .collect()
}

/// One backend under test: the limiter, its credit ledger, and how it sees time.
struct Backend {
    name: &'static str,
    limiter: RateLimiter,
    ledger: MemoryCredits,
    /// The in-memory rates' manual clock; `None`: Redis, on its own clock.
    clock: Option<tower_api_keys::ratelimit::ManualClock>,
    wall_ms: Arc<AtomicU64>,
    period_seconds: u32,
}

impl Backend {
    fn memory() -> Self {
        let (rates, clock) = MemoryRates::with_manual_clock(10_000);
        Self::new("memory", rates.into(), Some(clock), 10)
    }

    fn new(
        name: &'static str,
        rates: tower_api_keys::ratelimit::RateBackend,
        clock: Option<tower_api_keys::ratelimit::ManualClock>,
        period_seconds: u32,
    ) -> Self {
        let ledger = MemoryCredits::new();
        let wall_ms = Arc::new(AtomicU64::new(0));
        let wall = wall_ms.clone();
        let limiter = RateLimiter::new(rates, ledger.clone())
            .on_rate_error(tower_api_keys::ratelimit::FailMode::Closed)
            .clock(move || WALL_START + Duration::from_millis(wall.load(Ordering::SeqCst)));
        Self {
            name,
            limiter,
            ledger,
            clock,
            wall_ms,
            period_seconds,
        }
    }
}

/// Runs `scenario` on `backend` against the model; `buckets` reads every level's Redis bucket.
fn run(
    backend: &Backend,
    run: &str,
    scenario: &Scenario,
    runtime: &tokio::runtime::Runtime,
    buckets: &dyn Fn(&[BudgetId]) -> Vec<Option<String>>,
) -> Result<(), TestCaseError> {
    let mut model = Model::new(run, scenario, backend.period_seconds);
    let ids: Vec<BudgetId> = model.levels.iter().map(|l| l.id.clone()).collect();
    let started = Instant::now();
    let mut virtual_ns = 0u64;
    for (n, step) in scenario.steps.iter().enumerate() {
        let key = step.key.index(scenario.keys.len());
        virtual_ns += step.advance_ms * 1_000_000;
        backend.wall_ms.fetch_add(step.advance_ms, Ordering::SeqCst);
        let wall = WALL_START + Duration::from_nanos(virtual_ns);
        // Memory decides on the virtual clock; Redis on its own (its periods are an hour: the
        // milliseconds a case takes refill less than a unit, and the model ignores them).
        let model_now = match &backend.clock {
            Some(clock) => {
                clock.advance(Duration::from_millis(step.advance_ms));
                virtual_ns
            }
            None => 0,
        };
        let credits_before = ledger_state(&backend.ledger, &model, wall);
        let buckets_before = buckets(&ids);
        let from = started.elapsed().as_nanos() as u64;
        let principal = &model.principals[key];
        let decision = match &backend.clock {
            Some(_) => backend
                .limiter
                .check(principal, step.cost)
                .now_or_never()
                .expect("in memory"),
            None => runtime.block_on(backend.limiter.check(principal, step.cost)),
        };
        let to = started.elapsed().as_nanos() as u64;
        let expected = model.decide(key, step.cost, model_now, wall);
        let context = format!(
            "{} step {n}: key {key} {step:?}: {decision:?}",
            backend.name
        );
        prop_assert_eq!(&seen(&decision), &expected, "{}", &context);
        if decision.is_admitted() {
            let (from, to) = match &backend.clock {
                Some(_) => (virtual_ns, virtual_ns),
                None => (from, to),
            };
            model
                .record_and_check(key, step.cost, from, to)
                .map_err(|e| TestCaseError::fail(format!("{context}: {e}")))?;
        } else {
            // A refused request changed nothing: not a credit, not a bucket, at any level.
            prop_assert_eq!(
                &ledger_state(&backend.ledger, &model, wall),
                &credits_before,
                "{}",
                &context
            );
            prop_assert_eq!(&buckets(&ids), &buckets_before, "{}", &context);
        }
    }
    Ok(())
}

#[test]
fn chains_follow_the_model_and_no_level_ever_overspends() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = runtime.block_on(redis_backend());
    let runs = AtomicU64::new(0);
    let config = ProptestConfig {
        cases: super::cases(),
        ..ProptestConfig::default()
    };
    proptest!(config, |(scenario in scenario())| {
        let n = runs.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}_{n}", std::process::id());
        run(&Backend::memory(), &id, &scenario, &runtime, &|_| Vec::new())?;
        if let Some((backend, buckets)) = &redis {
            backend.wall_ms.store(0, Ordering::SeqCst);
            run(backend, &format!("r{id}"), &scenario, &runtime, &|ids| {
                runtime.block_on(buckets(ids))
            })?;
        }
    });
}

type Buckets = Box<
    dyn Fn(&[BudgetId]) -> futures_util::future::BoxFuture<'static, Vec<Option<String>>>
        + Send
        + Sync,
>;

#[cfg(feature = "redis")]
async fn redis_backend() -> Option<(Backend, Buckets)> {
    use tower_api_keys::ratelimit::RedisRates;
    let url = super::common::db::redis_url("chains_follow_the_model").await?;
    let prefix = super::common::db::unique("rl_chain_model");
    let rates = RedisRates::open(&url)
        .unwrap()
        .prefix(prefix.clone())
        .timeout(Duration::from_secs(10))
        .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let connection = client.get_multiplexed_async_connection().await.unwrap();
    let buckets: Buckets = Box::new(move |ids: &[BudgetId]| {
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}:{id}")).collect();
        let mut connection = connection.clone();
        Box::pin(async move {
            redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .unwrap()
        })
    });
    Some((Backend::new("redis", rates.into(), None, 3600), buckets))
}

#[cfg(not(feature = "redis"))]
async fn redis_backend() -> Option<(Backend, Buckets)> {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: chains_follow_the_model (Redis part): built without `redis`"
    );
    None
}
