//! Cold-lookup latency, side by side for `MemoryStore`, `SqliteStore` and `PostgresStore`:
//!
//! - `find_by_digest/miss/<store>`: a store lookup of a digest that is not there;
//! - `authenticate_cold/<store>`: `CachedResolver::authenticate` of a stored key whose cache entry
//!   was just invalidated, so every call goes through the store.
//!
//! Each store holds 2,000 keys. PostgreSQL is measured when `TEST_DATABASE_URL` is set (a schema of
//! its own, dropped afterwards). After criterion's report, a short plain timing of each case prints
//! the mean latencies and their ratios to memory.
//!
//! `cargo bench --features sqlite,postgres --bench cold_lookup`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use tower_api_keys::key::{KeyDigest, KeyFormat};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

mod fixtures;

const KEYS: usize = 2_000;

struct Backend {
    name: &'static str,
    store: Arc<dyn KeyStore>,
    resolver: CachedResolver,
    known: KeyDigest,
}

async fn backend(name: &'static str, store: Arc<dyn KeyStore>) -> Backend {
    let mut known = None;
    let format = KeyFormat::default();
    for i in 0..KEYS {
        let key = fixtures::issue(&*store, &format, i, "ledgers:read balances:write").await;
        known.get_or_insert(key.digest());
    }
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(300))
        .build();
    Backend {
        name,
        store,
        resolver,
        known: known.unwrap(),
    }
}

/// Digests that are in no store, cycled through.
fn misses() -> Vec<KeyDigest> {
    let format = KeyFormat::default();
    (0..4096).map(|_| format.generate().digest()).collect()
}

async fn authenticate_cold(b: &Backend) {
    b.resolver.invalidate_digest(&b.known);
    b.resolver.authenticate(&b.known).await.unwrap();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let databases = fixtures::Databases::new("cold_lookup");

    let backends: Vec<Backend> = rt.block_on(async {
        let mut backends = vec![backend("memory", Arc::new(MemoryStore::new())).await];
        backends.push(backend("sqlite", Arc::new(databases.sqlite().await)).await);
        match &databases.pg_url {
            Some(_) => {
                let pg = databases.postgres().await.expect("PostgreSQL");
                backends.push(backend("postgres", Arc::new(pg)).await);
            }
            None => eprintln!("TEST_DATABASE_URL not set: PostgreSQL is not measured"),
        }
        backends
    });
    let misses = misses();

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    {
        let mut group = c.benchmark_group("find_by_digest/miss");
        for b in &backends {
            let mut i = 0;
            group.bench_function(b.name, |bench| {
                bench.to_async(&rt).iter(|| {
                    i = (i + 1) % misses.len();
                    let digest = misses[i];
                    let store = b.store.clone();
                    async move { assert!(store.find_by_digest(&digest).await.unwrap().is_none()) }
                })
            });
        }
        group.finish();
    }
    {
        let mut group = c.benchmark_group("authenticate_cold");
        for b in &backends {
            group.bench_function(b.name, |bench| {
                bench.to_async(&rt).iter(|| authenticate_cold(b))
            });
        }
        group.finish();
    }
    c.final_summary();

    // A plain timing of the same cases, for the side-by-side ratios.
    const ROUNDS: u32 = 2_000;
    println!("\nmean latency over {ROUNDS} calls (ratio to memory):");
    rt.block_on(async {
        let mut base = [None, None];
        for b in &backends {
            let start = Instant::now();
            for i in 0..ROUNDS as usize {
                let digest = misses[i % misses.len()];
                assert!(b.store.find_by_digest(&digest).await.unwrap().is_none());
            }
            let miss = start.elapsed() / ROUNDS;
            let start = Instant::now();
            for _ in 0..ROUNDS {
                authenticate_cold(b).await;
            }
            let cold = start.elapsed() / ROUNDS;
            let miss_base = *base[0].get_or_insert(miss);
            let cold_base = *base[1].get_or_insert(cold);
            println!(
                "  {:<9} find_by_digest miss {:>10.2?} ({:>7.1}x)   authenticate cold {:>10.2?} ({:>7.1}x)",
                b.name,
                miss,
                miss.as_secs_f64() / miss_base.as_secs_f64(),
                cold,
                cold.as_secs_f64() / cold_base.as_secs_f64(),
            );
        }
    });

    // Drops the PostgreSQL schema and removes the SQLite file.
    drop(databases);
}
