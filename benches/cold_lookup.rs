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
use time::OffsetDateTime;
use tower_api_keys::store::{KeyLimits, PostgresStore, SqliteStore};
use tower_api_keys::{
    CachedResolver, KeyDigest, KeyFormat, KeyId, KeyRecord, KeyStore, MemoryStore, ScopeSet,
};

const KEYS: usize = 2_000;

struct Backend {
    name: &'static str,
    store: Arc<dyn KeyStore>,
    resolver: CachedResolver,
    known: KeyDigest,
}

fn record(i: usize) -> (KeyDigest, KeyRecord) {
    let format = KeyFormat::default();
    let key = format.generate();
    let digest = key.digest();
    let record = KeyRecord {
        id: KeyId::new(format!("key_{i:06}")),
        name: format!("bench {i}"),
        owner: format!("owner_{}", i % 100),
        account: "acct".into(),
        scopes: ScopeSet::parse(["ledgers:read", "balances:write"]).unwrap(),
        digest,
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: OffsetDateTime::now_utc(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
    };
    (digest, record)
}

async fn backend(name: &'static str, store: Arc<dyn KeyStore>) -> Backend {
    let mut known = None;
    for i in 0..KEYS {
        let (digest, r) = record(i);
        store
            .insert(&r, KeyLimits::default(), OffsetDateTime::now_utc())
            .await
            .unwrap();
        known.get_or_insert(digest);
    }
    let resolver = CachedResolver::builder(store.clone())
        .ttl(Duration::from_secs(300))
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
    let sqlite_path = std::env::temp_dir().join(format!("cold_lookup_{}.db", std::process::id()));
    let pg_schema = format!("bench_cold_lookup_{}", std::process::id());
    let pg_url = std::env::var("TEST_DATABASE_URL").ok();

    let backends: Vec<Backend> = rt.block_on(async {
        let mut backends = vec![backend("memory", Arc::new(MemoryStore::new())).await];
        let url = format!("sqlite://{}?mode=rwc", sqlite_path.display());
        let sqlite = SqliteStore::connect(&url).await.expect("open SQLite");
        backends.push(backend("sqlite", Arc::new(sqlite)).await);
        match &pg_url {
            Some(url) => {
                let pg = PostgresStore::builder()
                    .schema(&pg_schema)
                    .unwrap()
                    .connect(url)
                    .await
                    .expect("connect to TEST_DATABASE_URL");
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

    rt.block_on(async {
        if let Some(url) = &pg_url {
            if let Ok(pool) = sqlx::PgPool::connect(url).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{pg_schema}\" CASCADE"
                )))
                .execute(&pool)
                .await;
            }
        }
    });
    for suffix in ["", "-wal", "-shm"] {
        let mut file = sqlite_path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}
