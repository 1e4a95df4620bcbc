//! What per-key limits add to a request.
//!
//! In memory (the hot path): a trivial `tower::service_fn` called with a request that carries a
//! principal, `bare` and behind `RateLimitLayer`, for a key with a rate limit it never reaches
//! (the level's bucket from the per-thread front over `moka`, one `moka` get in 256, and one GCRA
//! step under the level's lock), a key with credits (one locked decrement), and a key without
//! limits (one branch). Target: `limited - bare` ≤ 100 ns median.
//!
//! Hierarchical budgets (issue #19): a key with 0, 1 and 3 limited ancestors (1, 2 and 4 levels),
//! whole requests and the decision alone, in memory and on Redis. Targets: each limited level adds
//! ≤ 150 ns median in memory; Redis stays one round trip per decision whatever the depth.
//!
//! The GCRA step itself: `governor`'s `check_n` (what `MemoryRates` used before) beside this
//! crate's own (`src/ratelimit/gcra.rs`, included here as is), each on the same clock.
//!
//! With Redis (`--features redis`, `TEST_REDIS_URL` or `redis://127.0.0.1:6379`): one decision of
//! `RedisRates` (an `EVALSHA` of the GCRA script) next to a bare round trip on the same kind of
//! connection (`GET` of one key), measured in the same run. Target: decision ≤ 1.3 × round trip.
//!
//! After the criterion groups, each pair is timed again in interleaved rounds (so both sides see
//! the same machine load) and the medians and ratios are printed.
//!
//! `cargo bench --features redis --bench ratelimit`; only the interleaved ratios:
//! `cargo bench --features redis --bench ratelimit -- nomatch`; instructions per call under
//! callgrind (deterministic): `cargo bench --bench ratelimit -- instructions`.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use futures_util::FutureExt;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_api_keys::key::KeyId;
use tower_api_keys::limits::{Budget, BudgetId, BudgetLevel, Credits, RateLimit, UsageLimits};
use tower_api_keys::principal::Principal;
use tower_api_keys::ratelimit::{MemoryRates, RateLimiter, StoreCredits};
use tower_api_keys::store::MemoryStore;

/// Answers like a real handler: a body and a content type (so the header map is not empty).
async fn handler(request: Request<()>) -> Result<Response<Bytes>, Infallible> {
    black_box(&request);
    let mut response = Response::new(Bytes::from_static(b"ok"));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

/// The GCRA of `src/ratelimit/gcra.rs`, the very file the crate compiles.
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../src/ratelimit/gcra.rs"]
mod gcra;

/// A principal as the resolver hands it out: its own limits, and its budget chain.
fn principal(id: &str, limits: UsageLimits) -> Principal {
    chained(id, limits, 0)
}

/// A principal whose key has `limits` and `ancestors` limited ancestors (each `WIDE`).
fn chained(id: &str, limits: UsageLimits, ancestors: usize) -> Principal {
    let own = BudgetLevel {
        id: BudgetId::Key(KeyId::new(id)),
        limits,
    };
    let above = (0..ancestors).map(|i| BudgetLevel {
        id: BudgetId::Key(KeyId::new(format!("{id}_ancestor_{i}"))),
        limits: UsageLimits {
            rate_limit: Some(WIDE),
            credits: None,
        },
    });
    Principal::scoped(
        KeyId::new(id),
        "bench",
        "team",
        "acct",
        "ledgers:read".parse().unwrap(),
        None,
    )
    .with_limits(limits)
    .with_budget(Budget::new(std::iter::once(own).chain(above)))
}

/// Rate-limited only, `WIDE`.
const RATED: UsageLimits = UsageLimits {
    rate_limit: Some(WIDE),
    credits: None,
};

/// The least any limiter answering with the IETF fields adds: the handler's response with two
/// fixed header values inserted (no decision, no formatting, no allocation).
async fn handler_with_fixed_headers(request: Request<()>) -> Result<Response<Bytes>, Infallible> {
    // Names made at compile time, values never validated nor copied: the floor.
    const POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
    const STATE: http::HeaderName = http::HeaderName::from_static("ratelimit");
    let mut response = handler(request).await?;
    let headers = response.headers_mut();
    headers.insert(
        POLICY,
        http::HeaderValue::from_static("\"rate\";q=1000000000;w=1"),
    );
    headers.insert(
        STATE,
        http::HeaderValue::from_static("\"rate\";r=999999999;t=1"),
    );
    Ok(response)
}

/// A rate limit the bench never reaches.
const WIDE: RateLimit = RateLimit::new(1_000_000_000, 1);

fn request(principal: &Principal) -> Request<()> {
    let mut request = Request::new(());
    request.extensions_mut().insert(principal.clone());
    request
}

/// One call of `service` for `principal`, to completion (nothing here waits).
fn call<S>(service: &mut S, principal: &Principal) -> Response<Bytes>
where
    S: Service<Request<()>, Response = Response<Bytes>, Error = Infallible>,
{
    service
        .call(request(principal))
        .now_or_never()
        .expect("in memory")
        .unwrap()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// `rounds` interleaved batches of `per_batch` calls of each case: the median per call.
fn interleaved(rounds: usize, per_batch: u32, cases: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (case, samples) in cases.iter_mut().zip(&mut samples) {
            let start = Instant::now();
            for _ in 0..per_batch {
                case();
            }
            samples.push(start.elapsed() / per_batch);
        }
    }
    samples.into_iter().map(median).collect()
}

fn memory(c: &mut Criterion) {
    let limiter = RateLimiter::in_memory();
    let layer = limiter.layer();
    let mut bare = tower::service_fn(handler);
    let mut limited = layer.layer(tower::service_fn(handler));
    let rated = principal(
        "key_rated",
        UsageLimits {
            rate_limit: Some(WIDE),
            credits: None,
        },
    );
    let paid = principal(
        "key_paid",
        UsageLimits {
            rate_limit: None,
            credits: Some(Credits::new(u64::MAX / 2)),
        },
    );
    let free = principal("key_free", UsageLimits::NONE);
    assert_eq!(call(&mut limited, &rated).status(), 200);
    assert!(
        call(&mut limited, &rated)
            .headers()
            .contains_key("ratelimit")
    );

    let mut group = c.benchmark_group("ratelimit/memory");
    group.bench_function("bare", |b| b.iter(|| call(&mut bare, &rated)));
    group.bench_function("limited (rate limit)", |b| {
        b.iter(|| call(&mut limited, &rated))
    });
    group.bench_function("limited (credits)", |b| {
        b.iter(|| call(&mut limited, &paid))
    });
    group.bench_function("key without limits", |b| {
        b.iter(|| call(&mut limited, &free))
    });
    group.finish();

    let mut fixed_headers = tower::service_fn(handler_with_fixed_headers);
    // As `examples/server` has it: rates in memory, credits in the key store. A key without
    // credits never asks the store, so it decides in memory too.
    let store_credits = StoreCredits::new(std::sync::Arc::new(MemoryStore::new()));
    let mut limited_store_credits = RateLimiter::new(MemoryRates::new(), store_credits)
        .layer()
        .layer(tower::service_fn(handler));
    let mut limited_paid = limited.clone();
    let mut limited_free = limited.clone();
    // The parts of the rate-limited case, each alone.
    let cache: moka::sync::Cache<KeyId, std::sync::Arc<u64>> = moka::sync::Cache::new(1_000_000);
    let id = KeyId::new("key_rated");
    cache.insert(id.clone(), std::sync::Arc::new(1));
    // Today's step beside the one before: `governor` as `MemoryRates` had it (a direct limiter with
    // the state-information middleware, on a quanta clock) and this crate's GCRA on the same
    // clock, each for a limit never reached, with what the decision reads back (units left).
    let governor = governor::RateLimiter::direct_with_clock(
        governor::Quota::with_period(Duration::from_nanos(1))
            .unwrap()
            .allow_burst(std::num::NonZeroU32::new(1_000_000_000).unwrap()),
        governor::clock::QuantaClock::default(),
    )
    .with_middleware::<governor::middleware::StateInformationMiddleware>();
    let own = gcra::Gcra::new(1, 1_000_000_000);
    let clock = quanta::Clock::new();
    let origin = clock.now();
    let own_step = || {
        let now = clock.now().saturating_duration_since(origin).as_nanos() as u64;
        let mut held = own.lock();
        match held.check(now, 1) {
            gcra::Step::Fits {
                new_tat,
                until_full,
            } => {
                held.commit(new_tat);
                gcra::remaining(1, 1_000_000_000, until_full)
            }
            gcra::Step::Refused { .. } => 0,
        }
    };
    let governor_step = || match governor.check_n(std::num::NonZeroU32::MIN) {
        Ok(Ok(snapshot)) => snapshot.remaining_burst_capacity(),
        _ => 0,
    };
    let decided = limiter.check(&rated, 1).now_or_never().unwrap();
    let mut parts = c.benchmark_group("ratelimit/memory parts");
    parts.bench_function("moka get", |b| b.iter(|| black_box(cache.get(&id))));
    parts.bench_function("GCRA step: governor check_n (before)", |b| {
        b.iter(|| black_box(governor_step()))
    });
    parts.bench_function("GCRA step: own, locked (now)", |b| {
        b.iter(|| black_box(own_step()))
    });
    parts.bench_function("limiter check (no service)", |b| {
        b.iter(|| black_box(limiter.check(&rated, 1).now_or_never()))
    });
    parts.bench_function("write headers", |b| {
        b.iter(|| {
            let mut headers = http::HeaderMap::new();
            decided.write_headers(&mut headers);
            black_box(headers)
        })
    });
    parts.finish();

    let gcra_medians = interleaved(
        1001,
        1000,
        &mut [
            &mut || {
                black_box(governor_step());
            },
            &mut || {
                black_box(own_step());
            },
        ],
    );
    println!(
        "interleaved medians per GCRA step: governor {} ns, own {} ns (own / governor {:.2})",
        gcra_medians[0].as_nanos(),
        gcra_medians[1].as_nanos(),
        gcra_medians[1].as_secs_f64() / gcra_medians[0].as_secs_f64()
    );

    chains(c, &limiter);

    let medians = interleaved(
        1001,
        200,
        &mut [
            &mut || drop(black_box(call(&mut bare, &rated))),
            &mut || drop(black_box(call(&mut limited, &rated))),
            &mut || drop(black_box(call(&mut limited_paid, &paid))),
            &mut || drop(black_box(call(&mut limited_free, &free))),
            &mut || drop(black_box(call(&mut fixed_headers, &rated))),
            &mut || drop(black_box(call(&mut limited_store_credits, &rated))),
        ],
    );
    let [bare_ns, rated_ns, paid_ns, free_ns, fixed_ns, store_ns] =
        [0, 1, 2, 3, 4, 5].map(|i| medians[i].as_nanos());
    println!(
        "interleaved medians per request: bare {bare_ns} ns; rate-limited key {rated_ns} ns \
         (+{} ns); key with credits {paid_ns} ns (+{} ns); key without limits {free_ns} ns (+{} ns); \
         bare + two fixed header values {fixed_ns} ns (+{} ns, the floor of any limiter sending them); \
         rate-limited key, credits in the store {store_ns} ns (+{} ns)",
        rated_ns.saturating_sub(bare_ns),
        paid_ns.saturating_sub(bare_ns),
        free_ns.saturating_sub(bare_ns),
        fixed_ns.saturating_sub(bare_ns),
        store_ns.saturating_sub(bare_ns),
    );
}

/// Keys with 0, 1 and 3 limited ancestors (1, 2 and 4 levels), every level a rate limit never
/// reached: whole requests and the decision alone.
fn chains(c: &mut Criterion, limiter: &RateLimiter) {
    let depths = [0usize, 1, 3];
    let principals: Vec<Principal> = depths
        .iter()
        .map(|&n| chained(&format!("key_chain_{n}"), RATED, n))
        .collect();
    let mut bare = tower::service_fn(handler);
    let layer = limiter.layer();
    let mut services: Vec<_> = depths
        .iter()
        .map(|_| layer.layer(tower::service_fn(handler)))
        .collect();
    for (service, principal) in services.iter_mut().zip(&principals) {
        let response = call(service, principal);
        assert!(response.headers().contains_key("ratelimit"));
    }
    let mut group = c.benchmark_group("ratelimit/memory chain");
    for ((n, service), principal) in depths.iter().zip(&mut services).zip(&principals) {
        group.bench_function(format!("request, {n} limited ancestors"), |b| {
            b.iter(|| call(service, principal))
        });
        group.bench_function(format!("decision, {n} limited ancestors"), |b| {
            b.iter(|| black_box(limiter.check(principal, 1).now_or_never()))
        });
    }
    group.finish();

    let [s0, s1, s3] = &mut services[..] else {
        unreachable!()
    };
    let [p0, p1, p3] = &principals[..] else {
        unreachable!()
    };
    let medians = interleaved(
        1001,
        200,
        &mut [
            &mut || drop(black_box(call(&mut bare, p0))),
            &mut || drop(black_box(call(s0, p0))),
            &mut || drop(black_box(call(s1, p1))),
            &mut || drop(black_box(call(s3, p3))),
            &mut || drop(black_box(limiter.check(p0, 1).now_or_never())),
            &mut || drop(black_box(limiter.check(p1, 1).now_or_never())),
            &mut || drop(black_box(limiter.check(p3, 1).now_or_never())),
        ],
    );
    let ns: Vec<u128> = medians.iter().map(Duration::as_nanos).collect();
    println!(
        "interleaved medians per request: bare {} ns; 0 limited ancestors {} ns (+{}), 1 {} ns \
         (+{}), 3 {} ns (+{}); per limited ancestor: +{} ns (1), +{} ns (3, average)",
        ns[0],
        ns[1],
        ns[1].saturating_sub(ns[0]),
        ns[2],
        ns[2].saturating_sub(ns[0]),
        ns[3],
        ns[3].saturating_sub(ns[0]),
        ns[2].saturating_sub(ns[1]),
        ns[3].saturating_sub(ns[1]) / 3,
    );
    println!(
        "interleaved medians per decision alone (no headers): 0 limited ancestors {} ns, 1 {} ns, \
         3 {} ns; per limited ancestor: +{} ns (1), +{} ns (3, average)",
        ns[4],
        ns[5],
        ns[6],
        ns[5].saturating_sub(ns[4]),
        ns[6].saturating_sub(ns[4]) / 3,
    );
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion) {
    use redis::AsyncCommands;
    use tower_api_keys::ratelimit::{MemoryCredits, RedisRates};

    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("bench_rl_{}", std::process::id());
    let limiter = runtime.block_on(async {
        RateLimiter::new(
            RedisRates::open(&url)
                .unwrap()
                .prefix(prefix.clone())
                .timeout(Duration::from_secs(5))
                .unwrap(),
            MemoryCredits::new(),
        )
    });
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut plain = runtime.block_on(async {
        redis::aio::ConnectionManager::new(client.clone())
            .await
            .expect("Redis for the bench")
    });
    let key = format!("{prefix}:plain");
    runtime.block_on(async {
        let _: () = plain.set(&key, "1").await.unwrap();
    });
    let rated = principal(
        "key_rated",
        UsageLimits {
            rate_limit: Some(WIDE),
            credits: None,
        },
    );
    let decision = runtime.block_on(limiter.check(&rated, 1));
    assert!(
        decision.is_admitted() && decision.rate.is_some(),
        "{decision:?}"
    );

    let mut group = c.benchmark_group("ratelimit/redis");
    group.bench_function("bare round trip (GET)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut plain = plain.clone();
            let key = key.clone();
            async move {
                let value: String = plain.get(&key).await.unwrap();
                black_box(value)
            }
        })
    });
    group.bench_function("decision (GCRA script)", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(limiter.check(&rated, 1).await) })
    });
    group.finish();

    // What Redis itself adds: an EVALSHA of a script that does nothing, and the GCRA script
    // invoked directly on the bare connection (no limiter around it).
    let noop = redis::Script::new("return 1");
    let gcra = redis::Script::new(tower_api_keys::ratelimit::REDIS_GCRA_SCRIPT);
    let mut parts = c.benchmark_group("ratelimit/redis parts");
    parts.bench_function("EVALSHA return 1", |b| {
        b.to_async(&runtime).iter(|| {
            let mut plain = plain.clone();
            let noop = &noop;
            async move { black_box(noop.invoke_async::<_, i64>(&mut plain).await.unwrap()) }
        })
    });
    parts.bench_function("GCRA script, bare connection", |b| {
        b.to_async(&runtime).iter(|| {
            let mut plain = plain.clone();
            let gcra = &gcra;
            let prefix = &prefix;
            async move {
                let mut call = gcra.key(format!("{prefix}:direct"));
                call.arg(1u64).arg(1_000_000_000u32).arg(1u32);
                black_box(call.invoke_async::<i64>(&mut plain).await.unwrap())
            }
        })
    });
    parts.finish();

    let mut plain2 = plain.clone();
    let medians = interleaved(
        201,
        20,
        &mut [
            &mut || {
                runtime.block_on(async {
                    let value: String = plain.get(&key).await.unwrap();
                    black_box(value);
                })
            },
            &mut || {
                runtime.block_on(async {
                    black_box(limiter.check(&rated, 1).await);
                })
            },
            &mut || {
                runtime.block_on(async {
                    black_box(noop.invoke_async::<_, i64>(&mut plain2).await.unwrap());
                })
            },
        ],
    );
    println!(
        "interleaved medians: bare Redis round trip (GET) {:?}; limiter decision {:?} (ratio {:.2}); \
         EVALSHA of an empty script {:?} (ratio {:.2})",
        medians[0],
        medians[1],
        medians[1].as_secs_f64() / medians[0].as_secs_f64(),
        medians[2],
        medians[2].as_secs_f64() / medians[0].as_secs_f64()
    );
    // Depth: 1, 2 and 4 levels in one script call each, beside the bare round trip.
    let chained_principals: Vec<Principal> = [0usize, 1, 3]
        .iter()
        .map(|&n| chained(&format!("key_redis_chain_{n}"), RATED, n))
        .collect();
    for principal in &chained_principals {
        let decision = runtime.block_on(limiter.check(principal, 1));
        assert!(
            decision.is_admitted() && decision.rate.is_some(),
            "{decision:?}"
        );
    }
    let mut chain = c.benchmark_group("ratelimit/redis chain");
    for (n, principal) in [0, 1, 3].iter().zip(&chained_principals) {
        chain.bench_function(format!("decision, {n} limited ancestors"), |b| {
            b.to_async(&runtime)
                .iter(|| async { black_box(limiter.check(principal, 1).await) })
        });
    }
    chain.finish();
    let mut plain3 = plain.clone();
    let [p0, p1, p3] = &chained_principals[..] else {
        unreachable!()
    };
    let medians = interleaved(
        201,
        20,
        &mut [
            &mut || {
                runtime.block_on(async {
                    let value: String = plain3.get(&key).await.unwrap();
                    black_box(value);
                })
            },
            &mut || runtime.block_on(async { drop(black_box(limiter.check(p0, 1).await)) }),
            &mut || runtime.block_on(async { drop(black_box(limiter.check(p1, 1).await)) }),
            &mut || runtime.block_on(async { drop(black_box(limiter.check(p3, 1).await)) }),
        ],
    );
    println!(
        "interleaved medians: bare Redis round trip (GET) {:?}; decision with 0 limited ancestors \
         {:?} ({:.2}x), 1 {:?} ({:.2}x), 3 {:?} ({:.2}x)",
        medians[0],
        medians[1],
        medians[1].as_secs_f64() / medians[0].as_secs_f64(),
        medians[2],
        medians[2].as_secs_f64() / medians[0].as_secs_f64(),
        medians[3],
        medians[3].as_secs_f64() / medians[0].as_secs_f64(),
    );

    in_flight(&url, &prefix);

    runtime.block_on(async {
        let mut keys: Vec<String> = vec![
            key.clone(),
            format!("{prefix}:key:key_rated"),
            format!("{prefix}:direct"),
        ];
        for name in [
            "key_redis_chain_0",
            "key_redis_chain_1",
            "key_redis_chain_3",
        ] {
            keys.push(format!("{prefix}:key:{name}"));
            for i in 0..3 {
                keys.push(format!("{prefix}:key:{name}_ancestor_{i}"));
            }
        }
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut plain)
            .await
            .unwrap();
    });
}

/// 32 decisions in flight at once (a server under load), on one connection and on a pool of
/// `POOL`, on a two-worker runtime: the median time one decision takes from start to answer, and decisions
/// per second, in interleaved rounds.
#[cfg(feature = "redis")]
fn in_flight(url: &str, prefix: &str) {
    use tower_api_keys::ratelimit::{MemoryCredits, RedisRates};
    const IN_FLIGHT: usize = 32;
    const POOL: usize = 4;
    const PER_TASK: usize = 20;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let limiter = |connections: usize| {
        runtime.block_on(async {
            RateLimiter::new(
                RedisRates::open(url)
                    .unwrap()
                    .prefix(format!("{prefix}_flight"))
                    .timeout(Duration::from_secs(5))
                    .unwrap()
                    .connections(connections)
                    .unwrap(),
                MemoryCredits::new(),
            )
        })
    };
    let limiters = [limiter(1), limiter(POOL)];
    let principals: Vec<Principal> = (0..IN_FLIGHT)
        .map(|i| principal(&format!("key_flight_{i}"), RATED))
        .collect();
    // One round: 32 tasks, each making PER_TASK decisions one after the other; the latency of each
    // decision and the round's wall time.
    let round = |limiter: &RateLimiter| -> (Vec<Duration>, Duration) {
        runtime.block_on(async {
            let started = Instant::now();
            let tasks: Vec<_> = principals
                .iter()
                .map(|principal| {
                    let (limiter, principal) = (limiter.clone(), principal.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::with_capacity(PER_TASK);
                        for _ in 0..PER_TASK {
                            let start = Instant::now();
                            let decision = limiter.check(&principal, 1).await;
                            assert!(decision.rate.is_some(), "{decision:?}");
                            latencies.push(start.elapsed());
                        }
                        latencies
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(IN_FLIGHT * PER_TASK);
            for task in tasks {
                all.extend(task.await.unwrap());
            }
            (all, started.elapsed())
        })
    };
    // Warm both (connections open, script loaded).
    for limiter in &limiters {
        round(limiter);
    }
    let mut latencies = [Vec::new(), Vec::new()];
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..15 {
        for (i, limiter) in limiters.iter().enumerate() {
            let (round_latencies, wall) = round(limiter);
            latencies[i].extend(round_latencies);
            rates[i].push(Duration::from_secs_f64(
                wall.as_secs_f64() / (IN_FLIGHT * PER_TASK) as f64,
            ));
        }
    }
    let [one, pool] = latencies.map(median);
    let [one_rate, pool_rate] = rates.map(median);
    println!(
        "{IN_FLIGHT} decisions in flight: median latency, one connection {one:?}, \
         {POOL} connections {pool:?} ({:.2}x); throughput {:.0}/s vs {:.0}/s \
         ({:.2}x)",
        pool.as_secs_f64() / one.as_secs_f64(),
        1.0 / one_rate.as_secs_f64(),
        1.0 / pool_rate.as_secs_f64(),
        one_rate.as_secs_f64() / pool_rate.as_secs_f64(),
    );
}

/// Instruction counts (deterministic, whatever the machine's load): `ratelimit-<hash> <case> <n>`
/// sets `case` up, warms it with 64 calls, makes `n` more and exits; `cargo bench --bench
/// ratelimit -- instructions` runs each case under `valgrind --tool=callgrind` twice (`N1`, `N2`
/// calls, 512 and 2560 by default, so the setup cancels) and prints instructions per call.
const INSTRUCTION_CASES: [&str; 9] = [
    "bare",
    "fixed-headers",
    "request",
    "request-1",
    "request-3",
    "decision",
    "decision-1",
    "decision-3",
    "headers",
];

/// One instruction-count case: `n` calls after a warm-up.
fn instruction_case(case: &str, n: u32) {
    let limiter = RateLimiter::in_memory();
    let depth = match case {
        "request-1" | "decision-1" => 1,
        "request-3" | "decision-3" => 3,
        _ => 0,
    };
    let rated = chained("key_01JD3M7Q8X9ZB2C4E6G8J0K2M4", RATED, depth);
    let mut bare = tower::service_fn(handler);
    let mut fixed = tower::service_fn(handler_with_fixed_headers);
    let mut limited = limiter.layer().layer(tower::service_fn(handler));
    let decided = limiter.check(&rated, 1).now_or_never().unwrap();
    let mut one: Box<dyn FnMut()> = match case {
        "bare" => Box::new(|| drop(black_box(call(&mut bare, &rated)))),
        "fixed-headers" => Box::new(|| drop(black_box(call(&mut fixed, &rated)))),
        "request" | "request-1" | "request-3" => {
            Box::new(|| drop(black_box(call(&mut limited, &rated))))
        }
        "decision" | "decision-1" | "decision-3" => {
            Box::new(|| drop(black_box(limiter.check(&rated, 1).now_or_never())))
        }
        "headers" => Box::new(|| {
            let mut headers = http::HeaderMap::new();
            decided.write_headers(&mut headers);
            drop(black_box(headers))
        }),
        other => panic!("no case {other:?}; cases: {INSTRUCTION_CASES:?}"),
    };
    for _ in 0..64 {
        one();
    }
    rl_measured_calls(n, &mut *one);
}

/// The counted calls: callgrind collects inside this function only (`--toggle-collect`), so
/// setup that depends on time (the clock's calibration) stays out of the counts.
#[inline(never)]
fn rl_measured_calls(n: u32, one: &mut dyn FnMut()) {
    for _ in 0..n {
        one();
    }
}

/// Runs every case under callgrind twice and prints instructions per call.
fn instructions() {
    let n1: u64 = std::env::var("N1").map_or(512, |n| n.parse().unwrap());
    let n2: u64 = std::env::var("N2").map_or(2560, |n| n.parse().unwrap());
    let me = std::env::current_exe().unwrap();
    let out = std::env::temp_dir().join(format!("ratelimit-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let count = |case: &str, n: u64| -> u64 {
        let file = out.join(format!("{case}.{n}"));
        let status = std::process::Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg("--toggle-collect=*rl_measured_calls*")
            .arg(format!("--callgrind-out-file={}", file.display()))
            .arg(&me)
            .arg(case)
            .arg(n.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("valgrind (apt-get install valgrind)");
        assert!(status.success(), "{case} {n} under callgrind: {status}");
        let text = std::fs::read_to_string(&file).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("summary: "))
            .and_then(|total| total.trim().parse().ok())
            .expect("a callgrind summary line")
    };
    let mut per = std::collections::HashMap::new();
    for case in INSTRUCTION_CASES {
        let (i1, i2) = (count(case, n1), count(case, n2));
        let each = (i2 - i1) / (n2 - n1);
        per.insert(case, each);
        println!("{case:<14} {each:>6} instructions per call");
    }
    let over = |case: &str| per[case] as i64 - per["bare"] as i64;
    println!(
        "over bare: request +{}, request with 1 limited ancestor +{}, 3 +{}; two fixed header \
         values +{}; decision alone {}, 1 ancestor {} (+{}), 3 ancestors {} (+{} each); writing \
         the headers alone {}",
        over("request"),
        over("request-1"),
        over("request-3"),
        over("fixed-headers"),
        per["decision"],
        per["decision-1"],
        per["decision-1"] - per["decision"],
        per["decision-3"],
        (per["decision-3"] - per["decision"]) / 3,
        per["headers"],
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [case, n] = &args[..]
        && let Ok(n) = n.parse()
    {
        return instruction_case(case, n);
    }
    if args.first().map(String::as_str) == Some("instructions") {
        return instructions();
    }
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    memory(&mut criterion);
    #[cfg(feature = "redis")]
    redis(&mut criterion);
    criterion.final_summary();
}
