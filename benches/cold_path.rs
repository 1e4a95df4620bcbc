//! The first request for a key, 1,000 at once: every request of the burst carries the same key that
//! no cache has seen, and they all go through `ApiKeyLayer` + `RequireScopesLayer` on a 2-worker tokio
//! runtime. The resolver must answer the whole burst with ONE store lookup (the others join it or find
//! its answer cached); the store is wrapped in a counter, so this is counted, not assumed.
//!
//! Stores: `memory`, `memory +1ms` (each lookup sleeps 1 ms first, so the burst certainly piles up
//! behind an unfinished lookup), and, with their features, `sqlite` (a temp file) and `postgres`
//! (`TEST_DATABASE_URL`, a schema of its own, dropped afterwards; SKIPPED loudly when unset or
//! unreachable).
//!
//! Each round, for each store in turn: a fresh key is stored, then the same burst is sent twice: cold
//! (first requests) and warm (the key now cached). Reported: median burst wall time cold and warm,
//! the median of the per-round cold/warm ratio, and the most lookups any cold burst made. Panics if a
//! cold burst made more than one lookup, a warm burst made any, or a request was not answered 200.
//!
//! `cargo bench --bench cold_path` (SQLite; add `--features postgres` and `TEST_DATABASE_URL` for
//! PostgreSQL). `COLD_PATH_ROUNDS` overrides the 21 rounds.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::RwLock;
use tower::{Layer, ServiceExt};
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::KeyFormat;
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

mod fixtures;
use fixtures::CountingStore;

const BURST: usize = 1_000;

struct Backend {
    name: &'static str,
    store: Arc<CountingStore>,
    resolver: CachedResolver,
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    ratios: Vec<f64>,
    max_lookups: u64,
}

impl Backend {
    fn new(name: &'static str, store: Arc<CountingStore>) -> Self {
        let resolver = CachedResolver::builder(store.clone())
            .time_to_live(Duration::from_secs(300))
            .build();
        Self {
            name,
            store,
            resolver,
            cold: Vec::new(),
            warm: Vec::new(),
            ratios: Vec::new(),
            max_lookups: 0,
        }
    }
}

/// Sends `BURST` requests with `key` at once; returns the wall time from release to the last answer
/// and the store lookups made meanwhile.
async fn burst(resolver: &CachedResolver, store: &CountingStore, key: &str) -> (Duration, u64) {
    let service =
        ApiKeyLayer::new(resolver.clone()).layer(RequireScopesLayer::all(["ledgers:read"]).layer(
            tower::service_fn(|_: Request<LiveBody<String>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }),
        ));
    // Every task waits on the gate (a held write lock) until all are spawned and built.
    let gate = Arc::new(RwLock::new(()));
    let closed = gate.write().await;
    let waiting = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..BURST)
        .map(|_| {
            let service = service.clone();
            let request = Request::get("/ledgers")
                .header("x-api-key", key)
                .body(String::new())
                .unwrap();
            let (gate, waiting) = (gate.clone(), waiting.clone());
            tokio::spawn(async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _open = gate.read().await;
                service.oneshot(request).await.unwrap().status()
            })
        })
        .collect();
    while waiting.load(Ordering::SeqCst) < BURST {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let lookups = store.lookups();
    let start = Instant::now();
    drop(closed);
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    (start.elapsed(), store.lookups() - lookups)
}

async fn backends(databases: &fixtures::Databases) -> Vec<Backend> {
    let memory = || -> Arc<dyn KeyStore> { Arc::new(MemoryStore::new()) };
    #[allow(unused_mut)]
    let mut backends = vec![
        Backend::new("memory", CountingStore::wrap(memory())),
        Backend::new(
            "memory +1ms",
            CountingStore::with_latency(memory(), Some(Duration::from_millis(1))),
        ),
    ];
    #[cfg(feature = "sqlite")]
    backends.push(Backend::new(
        "sqlite",
        CountingStore::wrap(Arc::new(databases.sqlite().await)),
    ));
    #[cfg(feature = "postgres")]
    match databases.postgres().await {
        Ok(pg) => backends.push(Backend::new("postgres", CountingStore::wrap(Arc::new(pg)))),
        Err(why) => eprintln!("\n*** PostgreSQL SKIPPED: {why} ***\n"),
    }
    #[cfg(not(feature = "postgres"))]
    eprintln!("\n*** PostgreSQL SKIPPED: built without the `postgres` feature ***\n");
    let _ = databases; // unused without the `sqlite` and `postgres` features
    backends
}

fn median<T: PartialOrd + Copy>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted[sorted.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("COLD_PATH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(21);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let databases = fixtures::Databases::new("cold_path");
    let format = KeyFormat::default();
    let mut backends = runtime.block_on(backends(&databases));

    runtime.block_on(async {
        for round in 0..rounds {
            for b in &mut backends {
                let key = fixtures::issue(&*b.store, &format, round, "ledgers:read").await;
                let key = key.expose_secret();
                let (cold, lookups) = burst(&b.resolver, &b.store, key).await;
                let (warm, warm_lookups) = burst(&b.resolver, &b.store, key).await;
                assert!(
                    lookups == 1,
                    "{}: a burst of {BURST} first requests made {lookups} store lookups (target 1)",
                    b.name
                );
                assert_eq!(
                    warm_lookups, 0,
                    "{}: a cached key reached the store",
                    b.name
                );
                b.max_lookups = b.max_lookups.max(lookups);
                b.cold.push(cold);
                b.warm.push(warm);
                b.ratios.push(cold.as_secs_f64() / warm.as_secs_f64());
            }
        }
    });
    // The resolver's own count agrees with the store's.
    for b in &backends {
        assert_eq!(b.resolver.store_lookups(), b.store.lookups(), "{}", b.name);
    }

    println!(
        "\n{BURST} concurrent first requests for one key, {rounds} rounds (2 tokio workers; medians)"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>11} {:>13}",
        "store", "cold burst", "warm burst", "cold/warm", "max lookups"
    );
    for b in &backends {
        println!(
            "{:<12} {:>12.2?} {:>12.2?} {:>10.2}x {:>13}",
            b.name,
            median(&b.cold),
            median(&b.warm),
            median(&b.ratios),
            b.max_lookups
        );
    }
    drop(runtime);
    drop(databases);
}
