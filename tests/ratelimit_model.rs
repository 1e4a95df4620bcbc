//! Both rate-limit backends against one small reference model: random sequences of requests of
//! random cost for a few keys with random limits, each decided by `MemoryRates` and by
//! `RedisRates` (when `TEST_REDIS_URL` answers; skipped loudly otherwise, required under
//! `CI=true`), and by the model.
//!
//! The periods are an hour long, so the time a test takes (milliseconds) refills far less than a
//! unit: the model can ignore time. It says: a request passes when its cost fits in what is left,
//! and then uses its cost; a refused request uses nothing; what is left is reported after each
//! decision; a refused request is told to retry once the missing units have refilled; a cost above
//! the whole limit never passes (reported as nothing left, retry after a period) and uses nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::FutureExt;
use proptest::prelude::*;
use tower_api_keys::key::KeyId;
use tower_api_keys::principal::Principal;
use tower_api_keys::quota::{RateLimit, UsageLimits};
use tower_api_keys::ratelimit::{Decision, RateLimiter};

const PERIOD_SECONDS: u32 = 3600;

/// One request: which key, at what cost.
#[derive(Clone, Debug)]
struct Request {
    key: usize,
    cost: u32,
}

fn scenario() -> impl Strategy<Value = (Vec<u32>, Vec<Request>)> {
    proptest::collection::vec(1u32..=12, 1..=3).prop_flat_map(|limits| {
        let keys = limits.len();
        let requests = proptest::collection::vec(
            (0..keys, 1u32..=14).prop_map(|(key, cost)| Request { key, cost }),
            1..=40,
        );
        (Just(limits), requests)
    })
}

/// The reference: units used per key.
#[derive(Default)]
struct Model {
    used: HashMap<usize, u32>,
}

impl Model {
    /// Whether the request passes, and what is reported left after it.
    fn decide(&mut self, limit: u32, request: &Request) -> (bool, u32) {
        let used = self.used.entry(request.key).or_default();
        let left = limit - *used;
        if request.cost > limit {
            // A cost above the whole limit never passes; nothing is left *for it*.
            (false, 0)
        } else if request.cost <= left {
            *used += request.cost;
            (true, left - request.cost)
        } else {
            (false, left)
        }
    }
}

fn principal(run: &str, key: usize, limit: u32) -> Principal {
    Principal::scoped(
        KeyId::new(format!("key_{run}_{key}")),
        "model",
        "team",
        "acct",
        Default::default(),
        None,
    )
    .with_limits(UsageLimits {
        rate_limit: Some(RateLimit::new(limit, PERIOD_SECONDS)),
        credits: None,
    })
}

/// Checks one backend's decision against the model's.
fn agree(
    backend: &str,
    decision: &Decision,
    limit: u32,
    request: &Request,
    (allowed, left): (bool, u32),
) -> Result<(), TestCaseError> {
    let context = format!("{backend}: {request:?} at limit {limit}: {decision:?}");
    prop_assert_eq!(decision.is_admitted(), allowed, "{}", &context);
    let rate = decision.rate.as_ref().expect("a rate-limited key");
    prop_assert_eq!(rate.remaining, left, "{}", &context);
    let emission = Duration::from_secs(PERIOD_SECONDS.into()) / limit;
    if allowed {
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
    proptest!(config, |((limits, requests) in scenario())| {
        // Fresh keys for every case: nothing carries over from the last one.
        let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let run = format!("{}_{run}", std::process::id());
        let mut memory_model = Model::default();
        let mut redis_model = Model::default();
        for request in &requests {
            let limit = limits[request.key];
            let principal = principal(&run, request.key, limit);
            let decision = memory
                .check(&principal, request.cost)
                .now_or_never()
                .expect("in memory");
            agree("memory", &decision, limit, request, memory_model.decide(limit, request))?;
            if let Some(redis) = &redis {
                let decision = runtime.block_on(redis.check(&principal, request.cost));
                agree("redis", &decision, limit, request, redis_model.decide(limit, request))?;
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
