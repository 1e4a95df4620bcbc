//! What per-key limits add to a request.
//!
//! In memory (the hot path): a trivial `tower::service_fn` called with a request that carries a
//! principal, `bare` and behind `RateLimitLayer`, for a key with a rate limit it never reaches
//! (the key's bucket from the per-thread front over `moka`, one `moka` get in 256, and one
//! `governor` GCRA step), a key with credits (one locked decrement), and a key without limits (one
//! branch). Target: `limited - bare` ≤ 100 ns median.
//!
//! With Redis (`--features redis`, `TEST_REDIS_URL` or `redis://127.0.0.1:6379`): one decision of
//! `RedisRates` (an `EVALSHA` of the GCRA script) next to a bare round trip on the same kind of
//! connection (`GET` of one key), measured in the same run. Target: decision ≤ 1.3 × round trip.
//!
//! After the criterion groups, each pair is timed again in interleaved rounds (so both sides see
//! the same machine load) and the medians and ratios are printed.
//!
//! `cargo bench --features redis --bench ratelimit`; only the interleaved ratios:
//! `cargo bench --features redis --bench ratelimit -- nomatch`.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use futures_util::FutureExt;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_api_keys::key::KeyId;
use tower_api_keys::principal::Principal;
use tower_api_keys::quota::{Credits, RateLimit, UsageLimits};
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

fn principal(id: &str, limits: UsageLimits) -> Principal {
    Principal::scoped(
        KeyId::new(id),
        "bench",
        "team",
        "acct",
        "ledgers:read".parse().unwrap(),
        None,
    )
    .with_limits(limits)
}

/// The least any limiter answering with the IETF fields adds: the handler's response with two
/// fixed header values inserted (no decision, no formatting, no allocation).
async fn handler_with_fixed_headers(request: Request<()>) -> Result<Response<Bytes>, Infallible> {
    let mut response = handler(request).await?;
    let headers = response.headers_mut();
    headers.insert(
        http::HeaderName::from_static("ratelimit-policy"),
        http::HeaderValue::from_static("\"rate\";q=1000000000;w=1"),
    );
    headers.insert(
        http::HeaderName::from_static("ratelimit"),
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
    let gcra = governor::RateLimiter::direct(
        governor::Quota::with_period(Duration::from_nanos(1))
            .unwrap()
            .allow_burst(std::num::NonZeroU32::new(1_000_000_000).unwrap()),
    );
    let decided = limiter.check(&rated, 1).now_or_never().unwrap();
    let mut parts = c.benchmark_group("ratelimit/memory parts");
    parts.bench_function("moka get", |b| b.iter(|| black_box(cache.get(&id))));
    parts.bench_function("governor check_n", |b| {
        b.iter(|| black_box(gcra.check_n(std::num::NonZeroU32::MIN)))
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
    runtime.block_on(async {
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .arg(format!("{prefix}:key_rated"))
            .arg(format!("{prefix}:direct"))
            .query_async(&mut plain)
            .await
            .unwrap();
    });
}

fn main() {
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    memory(&mut criterion);
    #[cfg(feature = "redis")]
    redis(&mut criterion);
    criterion.final_summary();
}
