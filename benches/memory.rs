//! Memory per cached key: 1,000,000 keys, each with 4 scopes, cached by one `CachedResolver`.
//!
//! The store decodes every record afresh, as SQLite and PostgreSQL do (new strings, a newly parsed
//! scope set), from 1,000 owners/accounts and 16 distinct scope sets: whatever the cache shares, it
//! must share itself. Reported, per key:
//!
//! - **heap**: bytes held through the global allocator (a counting wrapper around `System`), moka's
//!   own per-entry cost and the resolver's key-id index included, after moka has applied its
//!   pending bookkeeping;
//! - **resident**: growth of the process's resident set (`/proc/self/statm`), allocator slack
//!   included;
//! - for attribution, the heap bytes of the same principals built outside any cache (what the
//!   unshared records cost), and of a bare moka cache of the same digests with an 8-byte value.
//!
//! Target (issue #13, moka as the shared cache): at most 768 bytes per key, resident. Exits non-zero
//! when missed.
//!
//! `cargo bench --bench memory` (about half a minute; `MEMORY_KEYS=<n>` for another count).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tower_api_keys::key::{KeyDigest, KeyId};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyChange, KeyLimits, ListQuery, Rotation};
use tower_api_keys::store::{KeyRecord, KeyStore, StoreError};

/// The global allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TARGET_BYTES: f64 = 768.0;
const OWNERS: u32 = 1_000;
const SCOPE_SETS: [&str; 16] = [
    "ledgers:read ledgers:write balances:read transactions:read",
    "ledgers:read balances:read transactions:read identities:read",
    "ledgers:write balances:write transactions:write identities:write",
    "transactions:read transactions:write balances:read ledgers:read",
    "reconciliation:read reconciliation:write transactions:read ledgers:read",
    "hooks:read hooks:write ledgers:read balances:read",
    "api-keys:read api-keys:write ledgers:read balances:read",
    "search:read ledgers:read balances:read transactions:read",
    "*:read ledgers:write balances:write transactions:write",
    "ledgers:* balances:read transactions:read identities:read",
    "balances:* ledgers:read transactions:read identities:read",
    "transactions:* ledgers:read balances:read identities:read",
    "identities:* ledgers:read balances:read transactions:read",
    "metadata:read metadata:write ledgers:read balances:read",
    "backups:read backups:write ledgers:read balances:read",
    "reports:read reports:write ledgers:read balances:read",
];

/// A store that decodes a record for any digest, the way a SQL store builds one from a row.
struct DecodingStore;

/// The principal the resolver builds for `record`, outside any cache.
fn principal(record: KeyRecord) -> Principal {
    Principal::scoped(
        record.id,
        record.name,
        record.owner,
        record.account,
        record.scopes,
        record.expires_at,
    )
}

fn decode(digest: &KeyDigest) -> KeyRecord {
    let bytes = digest.as_bytes();
    let n = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let owner = n % OWNERS;
    let now = OffsetDateTime::now_utc();
    KeyRecord {
        id: KeyId::generate(),
        name: format!("service key {n}"),
        owner: format!("team-{owner}"),
        account: format!("account-{owner}"),
        scopes: SCOPE_SETS[(n / OWNERS) as usize % SCOPE_SETS.len()]
            .parse()
            .expect("valid scopes"),
        digest: *digest,
        digest_scheme: Default::default(),
        masked_key: "sk_Ab3d…x9Qz".to_owned(),
        created_at: now,
        expires_at: Some(now + time::Duration::days(90)),
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    }
}

#[async_trait::async_trait]
impl KeyStore for DecodingStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(Some(decode(digest)))
    }
    async fn get(&self, _: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn list(&self, _: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn insert(
        &self,
        _: &KeyRecord,
        _: KeyLimits,
        _: OffsetDateTime,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    async fn revoke(&self, _: &KeyId, _: OffsetDateTime) -> Result<Option<KeyChange>, StoreError> {
        Ok(None)
    }
    async fn delete(&self, _: &KeyId, _: OffsetDateTime) -> Result<Option<KeyChange>, StoreError> {
        Ok(None)
    }
    async fn replace_secret(
        &self,
        _: &KeyId,
        _: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        Ok(None)
    }
    async fn record_last_used(&self, _: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        Ok(())
    }
}

fn digest(i: u32) -> KeyDigest {
    KeyDigest::of(&format!("sk_memory_bench_key_{i}"))
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident bytes of this process.
fn resident() -> isize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: isize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`, `cargo test --benches`: nothing to list.
    }
    let keys: u32 = std::env::var("MEMORY_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let resolver = CachedResolver::builder(DecodingStore)
        .max_capacity(u64::from(keys) * 2)
        .time_to_live(Duration::from_secs(3600))
        .build();
    let (heap_before, rss_before) = (live(), resident());
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..keys {
            resolver
                .authenticate(&digest(i))
                .await
                .expect("decoded key");
        }
    });
    let fill = started.elapsed();
    let entries = resolver.cached_entries();
    assert_eq!(entries, u64::from(keys), "every key stays cached");
    assert_eq!(resolver.store_lookups(), u64::from(keys));
    let heap = (live() - heap_before) as f64 / f64::from(keys);
    let rss = (resident() - rss_before) as f64 / f64::from(keys);
    // What the principals alone cost, built from freshly decoded records and kept in a Vec.
    let (heap_before, rss_before) = (live(), resident());
    let principals: Vec<Principal> = (0..keys).map(|i| principal(decode(&digest(i)))).collect();
    let principal_heap = (live() - heap_before) as f64 / f64::from(keys);
    let principal_rss = (resident() - rss_before) as f64 / f64::from(keys);
    drop(principals);

    // For comparison: moka (a general-purpose cache), same keys, an 8-byte value, no principal.
    let moka = {
        let cache: moka::sync::Cache<[u8; 32], u64> = moka::sync::Cache::builder()
            .max_capacity(u64::from(keys) * 2)
            .time_to_live(Duration::from_secs(3600))
            .build();
        let heap_before = live();
        for i in 0..keys {
            cache.insert(*digest(i).as_bytes(), u64::from(i));
        }
        cache.run_pending_tasks();
        (live() - heap_before) as f64 / f64::from(keys)
    };

    println!("\nmemory per cached key: {keys} keys, 4 scopes each, {OWNERS} owners");
    println!("  cache heap (allocated)            {heap:>8.0} B/key");
    println!(
        "  cache resident (RSS growth)       {rss:>8.0} B/key   (target <= {TARGET_BYTES:.0})"
    );
    println!("  principals alone, heap            {principal_heap:>8.0} B/key");
    println!("  principals alone, resident        {principal_rss:>8.0} B/key");
    println!("  moka alone, [u8; 32] -> u64, heap {moka:>8.0} B/key");
    println!(
        "  fill: {:.2} µs per key (one store lookup each)",
        fill.as_secs_f64() * 1e6 / f64::from(keys)
    );
    if rss > TARGET_BYTES {
        eprintln!("memory target missed: {rss:.0} B/key resident > {TARGET_BYTES:.0}");
        std::process::exit(1);
    }
}
