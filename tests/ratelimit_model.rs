//! Both rate-limit backends against small reference models, each decided by `MemoryRates` and by
//! `RedisRates` (when `TEST_REDIS_URL` answers; skipped loudly otherwise, required under
//! `CI=true`), with credits in memory, and by the model.
//!
//! **Budget chains** (`chains_follow_the_model_and_no_level_ever_overspends`, invariant I3):
//! random trees of keys (depth ≤ 4) with rate limits and credits (some refilled daily) at random
//! levels, an account pool and an owner pool, random requests with costs while a controllable
//! clock advances (the in-memory limiter's own clock and the wall clock of refills). After every
//! step it checks literally, from the history of what was admitted: per level, the cost admitted
//! in any window is within the level's GCRA bound (its limit + elapsed / emission interval); the
//! credits spent per level since its last refill are within what it had; a refused request changed
//! nothing (every level's credits, and on Redis every level's bucket, read before and after). And
//! every decision is the model's: admitted or refused, by which level, with what left.
//!
//! **One key at a time** (`memory_and_redis_rates_follow_the_model`): random sequences of requests
//! of random cost for a few keys with random rate limits and, for some, credits.
//!
//! The periods are an hour long, so the time a test takes (milliseconds) refills far less than a
//! unit: the model can ignore time. It says: a request passes when its cost fits in what is left,
//! and then uses its cost; a refused request uses nothing; what is left is reported after each
//! decision; a refused request is told to retry once the missing units have refilled; a cost above
//! the whole limit never passes (reported as nothing left, retry after a period) and uses nothing.

#[path = "ratelimit_model/chains.rs"]
mod chains;
mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::FutureExt;
use proptest::prelude::*;
use tower_api_keys::error::ErrorCode;
use tower_api_keys::key::KeyId;
use tower_api_keys::limits::{Credits, RateLimit, UsageLimits};
use tower_api_keys::principal::Principal;
use tower_api_keys::ratelimit::{Decision, RateLimiter};

const PERIOD_SECONDS: u32 = 3600;

/// One key's settings: its rate limit, and the credits it starts with, if any.
#[derive(Clone, Copy, Debug)]
struct Spec {
    limit: u32,
    credits: Option<u64>,
}

/// One request: which key, at what cost.
#[derive(Clone, Debug)]
struct Request {
    key: usize,
    cost: u32,
}

fn scenario() -> impl Strategy<Value = (Vec<Spec>, Vec<Request>)> {
    let spec = (1u32..=12, proptest::option::of(0u64..=30))
        .prop_map(|(limit, credits)| Spec { limit, credits });
    proptest::collection::vec(spec, 1..=3).prop_flat_map(|specs| {
        let keys = specs.len();
        let requests = proptest::collection::vec(
            (0..keys, 1u32..=14).prop_map(|(key, cost)| Request { key, cost }),
            1..=40,
        );
        (Just(specs), requests)
    })
}

/// What the model expects of one decision.
#[derive(Debug, PartialEq)]
struct Expected {
    /// `None`: admitted.
    refusal: Option<ErrorCode>,
    /// Units reported left, when the rate limit was checked (`None`: it was not).
    rate_left: Option<u32>,
    /// Credits reported left, for a key with credits.
    credits_left: Option<u64>,
}

/// The reference: units used and credits left per key.
#[derive(Default)]
struct Model {
    used: HashMap<usize, u32>,
    credits: HashMap<usize, u64>,
}

impl Model {
    /// Credits are asked first: too few refuse the request (`USAGE_EXCEEDED`) before the rate
    /// limit is looked at. Then the rate limit: a cost above the whole limit never passes
    /// (reported as nothing left for it), a cost above what is left is refused (`RATE_LIMITED`).
    /// A refused request spends nothing, credits included.
    fn decide(&mut self, spec: Spec, request: &Request) -> Expected {
        let cost = request.cost;
        let credits = spec
            .credits
            .map(|start| *self.credits.entry(request.key).or_insert(start));
        if let Some(credits) = credits
            && u64::from(cost) > credits
        {
            return Expected {
                refusal: Some(ErrorCode::UsageExceeded),
                rate_left: None,
                credits_left: Some(credits),
            };
        }
        let used = self.used.entry(request.key).or_default();
        let left = spec.limit - *used;
        let (refusal, rate_left) = if cost > spec.limit {
            (Some(ErrorCode::RateLimited), 0)
        } else if cost <= left {
            *used += cost;
            (None, left - cost)
        } else {
            (Some(ErrorCode::RateLimited), left)
        };
        let credits_left = credits.map(|c| match refusal {
            None => c - u64::from(cost),
            Some(_) => c,
        });
        if let Some(left) = credits_left {
            self.credits.insert(request.key, left);
        }
        Expected {
            refusal,
            rate_left: Some(rate_left),
            credits_left,
        }
    }
}

fn principal(run: &str, key: usize, spec: Spec) -> Principal {
    Principal::scoped(
        KeyId::new(format!("key_{run}_{key}")),
        "model",
        "team",
        "acct",
        Default::default(),
        None,
    )
    .with_limits(UsageLimits {
        rate_limit: Some(RateLimit::new(spec.limit, PERIOD_SECONDS)),
        credits: spec.credits.map(Credits::new),
    })
}

/// Checks one backend's decision against the model's.
fn agree(
    backend: &str,
    decision: &Decision,
    spec: Spec,
    request: &Request,
    expected: Expected,
) -> Result<(), TestCaseError> {
    let context = format!("{backend}: {request:?} with {spec:?}: {decision:?}");
    let seen = Expected {
        refusal: decision.refusal.as_ref().map(|e| e.code()),
        rate_left: decision.rate.as_ref().map(|r| r.remaining),
        credits_left: decision.credits.as_ref().map(|c| c.remaining),
    };
    prop_assert_eq!(&seen, &expected, "{}", &context);
    let Some(rate) = decision.rate.as_ref() else {
        return Ok(());
    };
    let (limit, left) = (spec.limit, rate.remaining);
    let emission = Duration::from_secs(PERIOD_SECONDS.into()) / limit;
    if decision.is_admitted() {
        prop_assert_eq!(rate.retry_after, Duration::ZERO, "{}", &context);
        // Full again once every used unit has refilled (Redis counts whole microseconds, rounded
        // up: at most one more per request).
        let used = limit - left;
        prop_assert!(
            rate.reset <= emission * used + Duration::from_millis(1),
            "{}",
            &context
        );
        prop_assert!(
            rate.reset + Duration::from_secs(1) > emission * used,
            "{}",
            &context
        );
    } else if request.cost > limit {
        // Never passes: told to wait a whole period.
        prop_assert_eq!(rate.retry_after, Duration::from_secs(PERIOD_SECONDS.into()));
    } else {
        let missing = emission * (request.cost - left);
        prop_assert!(
            rate.retry_after <= missing + Duration::from_millis(1),
            "{}",
            &context
        );
        prop_assert!(
            rate.retry_after + Duration::from_secs(1) > missing,
            "{}",
            &context
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48)
}

#[test]
fn memory_and_redis_rates_follow_the_model() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = runtime.block_on(redis_limiter());
    let memory = RateLimiter::in_memory();
    let runs = std::sync::atomic::AtomicU64::new(0);
    let config = ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    };
    proptest!(config, |((specs, requests) in scenario())| {
        // Fresh keys for every case: nothing carries over from the last one.
        let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let run = format!("{}_{run}", std::process::id());
        let mut memory_model = Model::default();
        let mut redis_model = Model::default();
        // One principal per key for the whole case, as the resolver hands out (its credits'
        // `set_at` is what the in-memory ledger was seeded from).
        let principals: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(key, spec)| principal(&run, key, *spec))
            .collect();
        for request in &requests {
            let spec = specs[request.key];
            let principal = &principals[request.key];
            let decision = memory
                .check(principal, request.cost)
                .now_or_never()
                .expect("in memory");
            agree("memory", &decision, spec, request, memory_model.decide(spec, request))?;
            if let Some(redis) = &redis {
                let decision = runtime.block_on(redis.check(principal, request.cost));
                agree("redis", &decision, spec, request, redis_model.decide(spec, request))?;
            }
        }
    });
}

#[cfg(feature = "redis")]
async fn redis_limiter() -> Option<RateLimiter> {
    use tower_api_keys::ratelimit::{FailMode, MemoryCredits, RedisRates};
    let url = common::db::redis_url("memory_and_redis_rates_follow_the_model").await?;
    let rates = RedisRates::open(&url)
        .unwrap()
        .prefix(common::db::unique("rl_model"))
        .timeout(Duration::from_secs(10))
        .unwrap();
    // A failing Redis must fail the test, not pass the request.
    Some(RateLimiter::new(rates, MemoryCredits::new()).on_rate_error(FailMode::Closed))
}

#[cfg(not(feature = "redis"))]
async fn redis_limiter() -> Option<RateLimiter> {
    // Not a missing service but a build without the backend: said, never failed.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: memory_and_redis_rates_follow_the_model (Redis part): built without `redis`"
    );
    None
}
