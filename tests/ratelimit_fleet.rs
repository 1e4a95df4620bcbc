//! Per-key limits across a fleet: two instances (each its own `PostgresStore` pool, resolver and
//! limiter) sharing one PostgreSQL schema and one Redis, through real HTTP. Together they never
//! admit more than a key's rate limit or credits, nor (I3) more than a parent's rate limit or
//! credits for all its children together; credits survive a Redis restart (they are
//! counted in PostgreSQL); with Redis stopped mid-run rate limits fail open (or closed, when so
//! configured) while credits stay exact, and the limits come back by themselves when Redis does.
//!
//! The shared Redis (`TEST_REDIS_URL`) is used with a unique key prefix per test; the restart and
//! fault tests start a private `redis-server` on a free port and stop only that one.
#![cfg(all(feature = "postgres", feature = "redis"))]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use common::db::PgSchema;
use common::ratelimit::*;
use http::StatusCode;
use time::OffsetDateTime;
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::limits::{Credits, RateLimit, UsageLimits};
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::ratelimit::{
    DEFAULT_REDIS_CONNECTIONS, FailMode, RateLimiter, RedisRates, StoreCredits,
};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{KeyLimits, KeyRecord, KeyStore, PostgresStore};

const MASTER: &str = "master-key-for-fleet-tests-0123456789";

/// One instance of the service, serving on its own port.
struct Instance {
    addr: SocketAddr,
    store: PostgresStore,
}

async fn instance(
    schema: &PgSchema,
    redis_url: &str,
    prefix: &str,
    rate_failure: FailMode,
) -> Instance {
    let store = schema.store().await;
    let shared: Arc<dyn KeyStore> = Arc::new(store.clone());
    let resolver = CachedResolver::new(shared.clone());
    // A generous timeout: on a loaded test machine a slow answer must not count as an outage.
    let rates = RedisRates::open(redis_url)
        .unwrap()
        .prefix(prefix.to_owned())
        .timeout(Duration::from_secs(10))
        .unwrap();
    let limiter =
        RateLimiter::new(rates, StoreCredits::new(shared.clone())).on_rate_error(rate_failure);
    let app = Router::new()
        .route(
            "/ledgers",
            get(|| async { "ledgers" }).route_layer(limiter.layer()),
        )
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)));
    Instance {
        addr: serve(app).await,
        store,
    }
}

async fn fleet(test: &str, redis_url: Option<&str>) -> Option<(PgSchema, String, String)> {
    let schema = common::db::pg_schema(test).await?;
    let redis = match redis_url {
        Some(url) => url.to_owned(),
        None => common::db::redis_url(test).await?,
    };
    Some((schema, redis, common::db::unique("rl")))
}

/// A key with `limits`, stored through `store`.
async fn key_with(store: &PostgresStore, limits: UsageLimits) -> (String, KeyId) {
    key_under(store, None, limits).await
}

/// A key with `limits` created by `parent` (a master-made key without one), stored through `store`.
async fn key_under(
    store: &PostgresStore,
    parent: Option<&KeyId>,
    limits: UsageLimits,
) -> (String, KeyId) {
    let format = KeyFormat::default();
    let key = format.generate();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "fleet".into(),
        owner: "team".into(),
        account: "acct".into(),
        scopes: ScopeSet::parse(["ledgers:read"]).unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: OffsetDateTime::now_utc(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: parent.cloned(),
        rotated_at: None,
        previous: None,
        limits,
        allowed_networks: None,
    };
    store
        .insert(&record, KeyLimits::default(), OffsetDateTime::now_utc())
        .await
        .unwrap();
    (key.expose_secret().to_owned(), record.id)
}

async fn remaining(store: &PostgresStore, id: &KeyId) -> u64 {
    store
        .get(id)
        .await
        .unwrap()
        .unwrap()
        .limits
        .credits
        .unwrap()
        .remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_admit_exactly_the_limit_and_the_credits_together() {
    let Some((schema, redis, prefix)) = fleet("rl_fleet_exact", None).await else {
        return;
    };
    let a = instance(&schema, &redis, &prefix, FailMode::Open).await;
    let b = instance(&schema, &redis, &prefix, FailMode::Open).await;
    let addrs = [a.addr, b.addr];

    let (limited, _) = key_with(
        &a.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(10, 60)),
            credits: None,
        },
    )
    .await;
    let started = Instant::now();
    let answers = blast(&addrs, "/ledgers", &limited, 200).await;
    println!("200 requests over two instances in {:?}", started.elapsed());
    check_headers(&answers, "RATE_LIMITED");
    assert_eq!(count(&answers, StatusCode::OK), 10);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 190);

    let (paid, id) = key_with(
        &b.store,
        UsageLimits {
            rate_limit: None,
            credits: Some(Credits::new(100)),
        },
    )
    .await;
    let started = Instant::now();
    let answers = blast(&addrs, "/ledgers", &paid, 500).await;
    println!(
        "500 credited requests over two instances in {:?}",
        started.elapsed()
    );
    assert_eq!(count(&answers, StatusCode::OK), 100);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 400);
    check_headers(&answers, "USAGE_EXCEEDED");
    assert_eq!(remaining(&a.store, &id).await, 0);
    // Both instances served some of the admitted ones.
    let per_instance: Vec<usize> = (0..2)
        .map(|i| {
            answers
                .iter()
                .skip(i)
                .step_by(2)
                .filter(|a| a.status == StatusCode::OK)
                .count()
        })
        .collect();
    println!("admitted per instance: {per_instance:?}");
    schema.drop_schema().await;
}

/// I3 across a fleet: a parent with 4 children (two with a looser rate limit of their own, two with
/// none; two with credits of their own, two without), 200 concurrent requests spread over the
/// children and both instances: never more admitted than the parent's rate limit, never more
/// spent than the parent's credits, and what a child spent is spent at the parent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_binds_its_four_children_across_two_instances() {
    let Some((schema, redis, prefix)) = fleet("rl_fleet_chain", None).await else {
        return;
    };
    let a = instance(&schema, &redis, &prefix, FailMode::Closed).await;
    let b = instance(&schema, &redis, &prefix, FailMode::Closed).await;
    let addrs = [a.addr, b.addr];

    // Rates: the parent allows 12 a minute; the children more (or nothing of their own).
    let (_, parent) = key_with(
        &a.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(12, 60)),
            credits: None,
        },
    )
    .await;
    let mut children = Vec::new();
    for i in 0..4 {
        let own = (i % 2 == 0).then_some(RateLimit::new(100, 60));
        let limits = UsageLimits {
            rate_limit: own,
            credits: None,
        };
        children.push(key_under(&b.store, Some(&parent), limits).await.0);
    }
    let answers = blast_keys(&addrs, "/ledgers", &children, 200).await;
    check_headers(&answers, "RATE_LIMITED");
    assert_eq!(count(&answers, StatusCode::OK), 12, "{answers:#?}");
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 188);

    // Credits: the parent has 30; two children have 20 of their own, two none.
    let (_, parent) = key_with(
        &b.store,
        UsageLimits {
            rate_limit: None,
            credits: Some(Credits::new(30)),
        },
    )
    .await;
    let mut children = Vec::new();
    for i in 0..4 {
        let own = (i % 2 == 0).then(|| Credits::new(20));
        let limits = UsageLimits {
            rate_limit: None,
            credits: own,
        };
        children.push(key_under(&a.store, Some(&parent), limits).await);
    }
    let secrets: Vec<String> = children.iter().map(|(key, _)| key.clone()).collect();
    let answers = blast_keys(&addrs, "/ledgers", &secrets, 200).await;
    check_headers(&answers, "USAGE_EXCEEDED");
    assert_eq!(count(&answers, StatusCode::OK), 30, "{answers:#?}");
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 170);
    assert_eq!(remaining(&a.store, &parent).await, 0);
    // Each child with credits spent exactly what it was admitted for, at its level and the parent's.
    let admitted_per_child: Vec<u64> = (0..4)
        .map(|c| {
            answers
                .iter()
                .skip(c)
                .step_by(4)
                .filter(|a| a.status == StatusCode::OK)
                .count() as u64
        })
        .collect();
    for (c, (_, id)) in children.iter().enumerate().filter(|(c, _)| c % 2 == 0) {
        assert_eq!(
            remaining(&b.store, id).await,
            20 - admitted_per_child[c],
            "child {c}: {admitted_per_child:?}"
        );
    }
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_window_a_fleet_key_works_again() {
    let Some((schema, redis, prefix)) = fleet("rl_fleet_window", None).await else {
        return;
    };
    let a = instance(&schema, &redis, &prefix, FailMode::Open).await;
    let b = instance(&schema, &redis, &prefix, FailMode::Open).await;
    let (key, _) = key_with(
        &a.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(4, 1)),
            credits: None,
        },
    )
    .await;
    let answers = blast(&[a.addr, b.addr], "/ledgers", &key, 20).await;
    assert_eq!(count(&answers, StatusCode::OK), 4);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let answers = blast(&[a.addr, b.addr], "/ledgers", &key, 20).await;
    assert_eq!(count(&answers, StatusCode::OK), 4);
    schema.drop_schema().await;
}

/// A private `redis-server` on a free port, which the test may stop and start again.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut redis = Self { port, child: None };
        redis.up()?;
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port, with no persistence, and waits until it answers.
    fn up(&mut self) -> Option<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops this server (SIGKILL to its own process: nothing is saved).
    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
    }
}

fn private_redis(test: &str) -> Option<PrivateRedis> {
    let redis = PrivateRedis::start();
    if redis.is_none() {
        common::db::skip(test, "cannot start a private redis-server");
    }
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remaining_credits_survive_a_redis_restart() {
    let Some(mut redis) = private_redis("rl_redis_restart") else {
        return;
    };
    let Some((schema, redis_url, prefix)) = fleet("rl_redis_restart", Some(&redis.url())).await
    else {
        return;
    };
    let a = instance(&schema, &redis_url, &prefix, FailMode::Open).await;
    let b = instance(&schema, &redis_url, &prefix, FailMode::Open).await;
    let (key, id) = key_with(
        &a.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(1_000, 60)),
            credits: Some(Credits::new(100)),
        },
    )
    .await;
    let answers = blast(&[a.addr, b.addr], "/ledgers", &key, 30).await;
    assert_eq!(count(&answers, StatusCode::OK), 30);
    assert_eq!(remaining(&a.store, &id).await, 70);
    // Redis loses everything it held.
    redis.down();
    redis.up().expect("redis-server restarts");
    assert_eq!(remaining(&b.store, &id).await, 70);
    // Exactly what is left, and no more, once Redis is back.
    let answers = blast(&[a.addr, b.addr], "/ledgers", &key, 150).await;
    assert_eq!(count(&answers, StatusCode::OK), 70);
    assert_eq!(remaining(&a.store, &id).await, 0);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_run_fails_rate_limits_open_and_credits_stay_exact() {
    let Some(mut redis) = private_redis("rl_redis_fault") else {
        return;
    };
    let Some((schema, redis_url, prefix)) = fleet("rl_redis_fault", Some(&redis.url())).await
    else {
        return;
    };
    let open = instance(&schema, &redis_url, &prefix, FailMode::Open).await;
    let closed = instance(&schema, &redis_url, &prefix, FailMode::Closed).await;
    let (limited, _) = key_with(
        &open.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(5, 60)),
            credits: None,
        },
    )
    .await;
    let (paid, id) = key_with(
        &open.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(1_000, 60)),
            credits: Some(Credits::new(40)),
        },
    )
    .await;
    let client = client();
    // Up: the limit holds, and some credits are spent.
    let answers = blast(&[open.addr], "/ledgers", &limited, 10).await;
    assert_eq!(count(&answers, StatusCode::OK), 5);
    let answers = blast(&[open.addr, closed.addr], "/ledgers", &paid, 10).await;
    assert_eq!(count(&answers, StatusCode::OK), 10);

    redis.down();
    let started = Instant::now();
    // Down, default: rate limits fail open (the key already at its limit gets through)...
    let answers = blast(&[open.addr], "/ledgers", &limited, 10).await;
    println!("10 requests with Redis down in {:?}", started.elapsed());
    assert_eq!(count(&answers, StatusCode::OK), 10, "{answers:?}");
    // ...or closed where so configured: 503 AUTH_UNAVAILABLE.
    let refused = fetch(&client, closed.addr, "/ledgers", &limited).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.code.as_deref(), Some("AUTH_UNAVAILABLE"));
    // Credits never depended on Redis: exactly the 30 left are admitted, not one more.
    let answers = blast(&[open.addr], "/ledgers", &paid, 60).await;
    assert_eq!(count(&answers, StatusCode::OK), 30);
    assert_eq!(remaining(&open.store, &id).await, 0);

    redis.up().expect("redis-server restarts");
    // Back by itself: a request Redis decides again carries the `RateLimit` state (a request that
    // failed open carries only the policy). Each of an instance's pooled connections reconnects on
    // its first failing decision, so wait until, on both instances, as many decisions in a row as
    // there are connections (taken in turn) were Redis's.
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in [closed.addr, open.addr] {
        let mut in_a_row = 0;
        while in_a_row < DEFAULT_REDIS_CONNECTIONS {
            let answer = fetch(&client, addr, "/ledgers", &limited).await;
            if answer.headers.contains_key("ratelimit") {
                in_a_row += 1;
                continue;
            }
            in_a_row = 0;
            assert!(
                Instant::now() < deadline,
                "Redis was not used again: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "limits decided by Redis again {:?} after it went down",
        started.elapsed()
    );
    // And the limit holds across both instances again.
    let (fresh, _) = key_with(
        &open.store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(5, 60)),
            credits: None,
        },
    )
    .await;
    let answers = blast(&[open.addr, closed.addr], "/ledgers", &fresh, 12).await;
    assert_eq!(count(&answers, StatusCode::OK), 5, "{answers:#?}");
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 7);
    schema.drop_schema().await;
}

/// Coalesced decisions (`RedisRates::coalesce`, on by default) are exact: two limiters (two
/// instances) each firing 150 decisions at once over the same chains admit exactly what the
/// tightest level allows, each admitted decision sees a different number left (as if they had
/// been made one after the other), a parent's budget binds its children together (each child its
/// own lane, the parent's level shared), and costs above 1 count in full. Off, the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_decisions_never_exceed_any_level() {
    use tower_api_keys::limits::{Budget, BudgetId, BudgetLevel};
    use tower_api_keys::principal::Principal;
    let Some(redis) = common::db::redis_url("rl_fleet_coalesce").await else {
        return;
    };
    let level = |id: &str, limit: u32| BudgetLevel {
        id: BudgetId::Key(KeyId::new(id)),
        limits: UsageLimits {
            rate_limit: Some(RateLimit::new(limit, 3600)),
            credits: None,
        },
    };
    let principal = |levels: Vec<BudgetLevel>| {
        let own = levels[0].clone();
        let BudgetId::Key(id) = own.id.clone() else {
            unreachable!()
        };
        Principal::scoped(id, "n", "o", "a", Default::default(), None)
            .with_limits(own.limits)
            .with_budget(Budget::new(levels))
    };
    for coalesce in [true, false] {
        let prefix = common::db::unique("rl_coalesce");
        let limiter = |prefix: &str| {
            RateLimiter::new(
                RedisRates::open(&redis)
                    .unwrap()
                    .prefix(prefix.to_owned())
                    .timeout(Duration::from_secs(10))
                    .unwrap()
                    .coalesce(coalesce),
                tower_api_keys::ratelimit::MemoryCredits::new(),
            )
            .on_rate_error(FailMode::Closed)
        };
        let limiters = [limiter(&prefix), limiter(&prefix)];
        // One key alone, 37 an hour: 300 decisions at once, 37 admitted.
        let alone = principal(vec![level("key_alone", 37)]);
        // Three children (limits 100, 5, 100) under one parent of 20: 20 admitted in all, the
        // second child at most 5.
        let children: Vec<Principal> = [100, 5, 100]
            .iter()
            .enumerate()
            .map(|(i, &own)| {
                principal(vec![
                    level(&format!("key_child_{i}"), own),
                    level("key_parent", 20),
                ])
            })
            .collect();
        let mut tasks = Vec::new();
        for n in 0..300usize {
            let limiter = limiters[n % 2].clone();
            let (who, cost) = match n % 4 {
                0 | 1 => (alone.clone(), 1),
                // Costs of 2 on the first child.
                2 => (
                    children[n / 4 % 3].clone(),
                    if n / 4 % 3 == 0 { 2 } else { 1 },
                ),
                _ => (children[(n / 4 + 1) % 3].clone(), 1),
            };
            tasks.push(tokio::spawn(async move {
                let decision = limiter.check(&who, cost).await;
                assert!(
                    decision
                        .refusal
                        .as_ref()
                        .is_none_or(|e| e.code() == tower_api_keys::error::ErrorCode::RateLimited),
                    "{decision:?}"
                );
                (who.key_id().clone(), cost, decision)
            }));
        }
        let mut alone_left = Vec::new();
        let mut spent_by_child = std::collections::HashMap::new();
        for task in tasks {
            let (id, cost, decision) = task.await.unwrap();
            if !decision.is_admitted() {
                continue;
            }
            let rate = decision.rate.expect("a rate status");
            if id.as_str() == "key_alone" {
                alone_left.push(rate.remaining);
            } else {
                *spent_by_child.entry(id.as_str().to_owned()).or_insert(0u32) += cost;
            }
        }
        alone_left.sort_unstable();
        assert_eq!(
            alone_left,
            (0..37).collect::<Vec<u32>>(),
            "coalesce {coalesce}: exactly the limit, each seeing one fewer left"
        );
        let total: u32 = spent_by_child.values().sum();
        assert!(total <= 20, "coalesce {coalesce}: {spent_by_child:?}");
        assert!(
            total >= 19,
            "the parent's budget is used up: {spent_by_child:?}"
        );
        assert!(
            spent_by_child.get("key_child_1").copied().unwrap_or(0) <= 5,
            "{spent_by_child:?}"
        );
    }
}

/// Decisions cancelled at any moment (their requests went away: a client closing its connections)
/// never leave a chain stuck: after each of 50 waves of 200 decisions on one chain, cancelled at
/// staggered moments, a fresh decision on that chain is answered by Redis at once, not after the
/// limiter's timeout. A lead handed to a decision that was cancelled just
/// then used to be lost, and every later decision on the chain waited out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_decisions_never_leave_a_chain_stuck() {
    use tower_api_keys::principal::Principal;
    let Some(redis) = common::db::redis_url("rl_fleet_cancel").await else {
        return;
    };
    let limiter = RateLimiter::new(
        RedisRates::open(&redis)
            .unwrap()
            .prefix(common::db::unique("rl_cancel"))
            .timeout(Duration::from_secs(2))
            .unwrap(),
        tower_api_keys::ratelimit::MemoryCredits::new(),
    )
    .on_rate_error(FailMode::Closed);
    let who = Principal::scoped(
        KeyId::new("key_cancelled"),
        "n",
        "o",
        "a",
        Default::default(),
        None,
    )
    .with_limits(UsageLimits {
        rate_limit: Some(RateLimit::new(1_000_000_000, 1)),
        credits: None,
    });
    for wave in 0..50u64 {
        let tasks: Vec<_> = (0..200u64)
            .map(|_| {
                let (limiter, who) = (limiter.clone(), who.clone());
                tokio::spawn(async move { limiter.check(&who, 1).await })
            })
            .collect();
        // Cancelled as a closed connection cancels a request (the future dropped where it
        // waits, not polled again), at staggered moments: before, during and after their calls.
        for (n, task) in tasks.iter().enumerate() {
            for _ in 0..(n as u64 * 7 + wave) % 13 {
                tokio::task::yield_now().await;
            }
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        let started = Instant::now();
        let decision = limiter.check(&who, 1).await;
        let took = started.elapsed();
        assert!(
            decision.is_admitted(),
            "wave {wave}: {:?} after {took:?}",
            decision.refusal
        );
        assert!(
            took < Duration::from_secs(1),
            "wave {wave}: a fresh decision took {took:?}: the chain is stuck"
        );
    }
}
