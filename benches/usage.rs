//! What counting usage adds to one authenticated request (cached key): `ApiKeyLayer` +
//! `RequireScopesLayer` around a trivial service, without and with a [`UsageRecorder`] (last use,
//! the outcome counted when the response head is ready, the address read at most once a second).
//! Target: at most 30 ns median added per request.
//!
//! After the criterion group, both stacks are timed again in 401 interleaved rounds of 256 requests
//! (so that both see the same machine state), and the median difference per request is printed.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use http_body_util::Full;
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyLimits, KeyRecord, KeyStore, MemoryStore};
use tower_api_keys::usage::UsageRecorder;

const BATCH: u32 = 256;

async fn handler<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    black_box(&request);
    Ok(Response::new(Full::new(Bytes::new())))
}

fn run<S>(service: &mut S, request: Request<Empty<Bytes>>) -> StatusCode
where
    S: Service<
            Request<Empty<Bytes>>,
            Response = Response<LiveBody<Full<Bytes>>>,
            Error = Infallible,
        >,
{
    let ready = service.ready().now_or_never().unwrap().unwrap();
    ready
        .call(request)
        .now_or_never()
        .expect("in-memory requests complete at once")
        .unwrap()
        .status()
}

fn request(key: &str) -> Request<Empty<Bytes>> {
    Request::get("/ledgers")
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap()
}

/// A cached key, its resolver and store.
fn setup() -> (ApiKey, CachedResolver, std::sync::Arc<dyn KeyStore>) {
    let format = KeyFormat::default();
    let key = format.generate();
    let now = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "bench key".to_owned(),
        owner: "team-a".to_owned(),
        account: "team-a".to_owned(),
        scopes: "ledgers:read".parse().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: now,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    let store: std::sync::Arc<dyn KeyStore> = std::sync::Arc::new(MemoryStore::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(24 * 3600))
        .build();
    runtime.block_on(async {
        store
            .insert(&record, KeyLimits::default(), now)
            .await
            .unwrap();
        resolver.authenticate(&key.digest()).await.unwrap();
    });
    (key, resolver, store)
}

fn time_batch<S>(service: &mut S, key: &str) -> Duration
where
    S: Service<
            Request<Empty<Bytes>>,
            Response = Response<LiveBody<Full<Bytes>>>,
            Error = Infallible,
        >,
{
    let requests: Vec<_> = (0..BATCH).map(|_| request(key)).collect();
    let start = Instant::now();
    for request in requests {
        black_box(run(service, request));
    }
    start.elapsed()
}

fn main() {
    let (key, resolver, store) = setup();
    let key = key.expose_secret().to_owned();
    let recorder = UsageRecorder::new(store);
    let guarded = || RequireScopesLayer::all(["ledgers:read"]).layer(tower::service_fn(handler));
    let mut plain = ApiKeyLayer::new(resolver.clone()).layer(guarded());
    let mut counted = ApiKeyLayer::new(resolver)
        .usage(recorder.clone())
        .layer(guarded());
    assert_eq!(run(&mut plain, request(&key)), StatusCode::OK);
    assert_eq!(run(&mut counted, request(&key)), StatusCode::OK);

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("usage");
    group.throughput(Throughput::Elements(1));
    group.bench_function("layer", |b| {
        b.iter_batched(
            || request(&key),
            |r| run(&mut plain, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("layer + usage counting", |b| {
        b.iter_batched(
            || request(&key),
            |r| run(&mut counted, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();

    let mut without = Vec::new();
    let mut with = Vec::new();
    for _ in 0..401 {
        without.push(time_batch(&mut plain, &key));
        with.push(time_batch(&mut counted, &key));
    }
    let median = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2].as_nanos() as f64 / f64::from(BATCH)
    };
    let (a, b) = (median(&mut without), median(&mut with));
    println!(
        "usage counting: {a:.1} ns/request without, {b:.1} ns/request with: {:+.1} ns added (target <= 30 ns)",
        b - a
    );
    // The counts are there, in memory, waiting for a flush.
    drop(recorder);
}
