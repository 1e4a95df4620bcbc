//! Hostile traffic: what random keys cost the store and the server, through `ApiKeyLayer` +
//! `RequireScopesLayer` over a store that counts its digest lookups.
//!
//! 1. 100,000 malformed keys, a quarter of each kind (wrong prefix, bad checksum, wrong length,
//!    non-base62 characters): every one refused 401 `AUTH_INVALID_API_KEY`, and **0** store lookups.
//! 2. 100,000 well-formed keys (valid checksum, from `KeyFormat::generate`) that no store knows, drawn
//!    at random from a pool of 1,000: every one refused as unknown, and at most one lookup per distinct
//!    key per negative-cache TTL (5 s, the default): `distinct ≤ lookups ≤ distinct × ⌈elapsed / TTL⌉`.
//! 3. Cost per refused request relative to an accepted request with a cached key: 201 interleaved
//!    rounds (case order rotated each round) of 256 requests per case, timed in thread CPU time on a
//!    current-thread runtime; the table shows each case's median ns per request and the median of its
//!    per-round ratio to the accepted case. "unknown, never seen" sends a new well-formed key every
//!    time (one lookup each, counted): the worst case, which only rate limiting bounds.
//!
//! 4. A flood of one-off unknown digests against hot keys: a resolver holding at most 2,000 entries
//!    caches 200 hot keys, then 100,000 never-seen well-formed keys arrive, each followed by one
//!    request for a random hot key (the flood is half the traffic, and 50 times the cache). moka's
//!    TinyLFU admission keeps the hot keys: the bench counts the hot-key requests that had to read
//!    the store again during the flood, and the hot keys evicted after it, and panics if either is
//!    above 1%.
//!
//! Any missed count or wrong answer panics (non-zero exit). Keys come from a PRNG seeded from the OS;
//! `HOSTILE_SEED=<n>` replays a run.
//!
//! `cargo bench --bench hostile`

use std::collections::HashSet;
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::error::AuthError;
use tower_api_keys::error::InvalidKeyReason;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

mod fixtures;
use fixtures::CountingStore;

const REQUESTS: usize = 100_000;
const POOL: usize = 1_000;
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const ROUNDS: usize = 201;
const HOT_KEYS: usize = 200;
const FLOOD_CAPACITY: u64 = 2_000;
const FLOOD_EVERY: usize = 1;
const BATCH: usize = 256;

/// splitmix64: small, fast, good enough to pick and mangle keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Malformed {
    WrongPrefix,
    BadChecksum,
    WrongLength,
    Garbage,
}

impl Malformed {
    const ALL: [Self; 4] = [
        Self::WrongPrefix,
        Self::BadChecksum,
        Self::WrongLength,
        Self::Garbage,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::WrongPrefix => "wrong prefix",
            Self::BadChecksum => "bad checksum",
            Self::WrongLength => "wrong length",
            Self::Garbage => "non-base62 garbage",
        }
    }

    /// The reason the layer must give.
    fn reason(self) -> InvalidKeyReason {
        match self {
            Self::BadChecksum => InvalidKeyReason::BadChecksum,
            _ => InvalidKeyReason::Malformed,
        }
    }

    /// A random key of this kind, for `format`.
    fn generate(self, format: &KeyFormat, rng: &mut Rng) -> String {
        let prefix = format.prefix().len() + 1;
        match self {
            // A valid key of another service's format.
            Self::WrongPrefix => KeyFormat::new("pk_test")
                .unwrap()
                .generate()
                .expose_secret()
                .to_owned(),
            // One character after the prefix replaced by another base62 character: CRC32 catches
            // every single-character change.
            Self::BadChecksum => {
                let mut key = format.generate().expose_secret().as_bytes().to_vec();
                let at = prefix + rng.below(key.len() - prefix);
                let old = key[at];
                while key[at] == old {
                    key[at] = ALNUM[rng.below(ALNUM.len())];
                }
                String::from_utf8(key).unwrap()
            }
            // 1 to 8 characters cut off or appended.
            Self::WrongLength => {
                let mut key = format.generate().expose_secret().to_owned();
                let n = 1 + rng.below(8);
                if rng.next().is_multiple_of(2) {
                    key.truncate(key.len() - n);
                } else {
                    (0..n).for_each(|_| key.push(ALNUM[rng.below(ALNUM.len())] as char));
                }
                key
            }
            // The right prefix and length, random visible ASCII after it, at least one non-base62.
            Self::Garbage => {
                let mut body: Vec<u8> = (prefix..format.key_len())
                    .map(|_| b'!' + rng.below(94) as u8)
                    .collect();
                let at = rng.below(body.len());
                body[at] = b"-_.~+/=!*$"[rng.below(10)];
                format!("{}_{}", format.prefix(), String::from_utf8(body).unwrap())
            }
        }
    }
}

fn request(key: Option<&str>) -> Request<String> {
    let mut request = Request::get("/ledgers");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.body(String::new()).unwrap()
}

/// The answer: status and, for a refusal, the typed error from the response extensions.
async fn send<S>(service: &mut S, request: Request<String>) -> (StatusCode, Option<AuthError>)
where
    S: Service<Request<String>, Response = Response<LiveBody<Full<Bytes>>>, Error = Infallible>,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    (
        response.status(),
        response.extensions().get::<AuthError>().cloned(),
    )
}

fn assert_invalid(answer: &(StatusCode, Option<AuthError>), reason: InvalidKeyReason, what: &str) {
    match answer {
        (StatusCode::UNAUTHORIZED, Some(AuthError::InvalidKey(r))) if *r == reason => {}
        other => panic!("{what}: expected 401 invalid key ({reason:?}), got {other:?}"),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Makes the key of one request (`None`: no key).
type MakeKey = Box<dyn FnMut(&mut Rng) -> Option<String>>;

/// One case of the cost table: how to make a batch of keys, and what each request must get.
struct Case {
    name: &'static str,
    expect: StatusCode,
    /// Store lookups a timed batch must make.
    lookups: u64,
    /// Send the batch once untimed first (to fill the negative cache).
    warm: bool,
    make: MakeKey,
    ns: Vec<f64>,
    ratios: Vec<f64>,
}

impl Case {
    fn new(
        name: &'static str,
        expect: StatusCode,
        lookups: usize,
        make: impl FnMut(&mut Rng) -> Option<String> + 'static,
    ) -> Self {
        Self {
            name,
            expect,
            lookups: lookups as u64,
            warm: false,
            make: Box::new(make),
            ns: Vec::new(),
            ratios: Vec::new(),
        }
    }
}

fn main() {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut bytes = [0; 8];
            getrandom::fill(&mut bytes).unwrap();
            u64::from_le_bytes(bytes)
        });
    println!("HOSTILE_SEED={seed}");
    let mut rng = Rng(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let format = KeyFormat::default();
    let store = CountingStore::wrap(Arc::new(MemoryStore::new()));
    let valid = runtime.block_on(fixtures::issue(&*store, &format, 0, "ledgers:read"));
    let resolver = CachedResolver::builder(store.clone())
        .format(format.clone())
        .negative_time_to_live(NEGATIVE_TTL)
        .build();
    let service =
        ApiKeyLayer::new(resolver.clone()).layer(RequireScopesLayer::all(["ledgers:read"]).layer(
            tower::service_fn(|request: Request<LiveBody<String>>| {
                black_box(&request);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
            }),
        ));

    runtime.block_on(async {
        let mut service = service.clone();
        // The stack accepts the valid key (one lookup, then cached), so refusals below are not a
        // wiring mistake.
        let answer = send(&mut service, request(Some(valid.expose_secret()))).await;
        assert_eq!(answer.0, StatusCode::OK, "{answer:?}");
        assert_eq!(store.lookups(), 1);

        // 1. Malformed keys: no store lookup at all.
        let keys: Vec<(Malformed, String)> = (0..REQUESTS)
            .map(|i| {
                let kind = Malformed::ALL[i % 4];
                (kind, kind.generate(&format, &mut rng))
            })
            .collect();
        let before = store.lookups();
        let start = Instant::now();
        for (kind, key) in &keys {
            let answer = send(&mut service, request(Some(key))).await;
            assert_invalid(&answer, kind.reason(), kind.name());
        }
        let elapsed = start.elapsed();
        let lookups = store.lookups() - before;
        println!(
            "\nmalformed: {REQUESTS} requests ({} of each kind), all 401 AUTH_INVALID_API_KEY, \
             {lookups} store lookups (target 0), {:.2?} per request (wall)",
            REQUESTS / 4,
            elapsed / REQUESTS as u32
        );
        assert_eq!(lookups, 0, "malformed keys reached the store");

        // 2. Well-formed unknown keys from a pool: one lookup per distinct key per negative TTL.
        let pool: Vec<ApiKey> = (0..POOL).map(|_| format.generate()).collect();
        let picks: Vec<usize> = (0..REQUESTS).map(|_| rng.below(POOL)).collect();
        let distinct = picks.iter().collect::<HashSet<_>>().len() as u64;
        let before = store.lookups();
        let start = Instant::now();
        for &pick in &picks {
            let answer = send(&mut service, request(Some(pool[pick].expose_secret()))).await;
            assert_invalid(&answer, InvalidKeyReason::Unknown, "unknown key");
        }
        let elapsed = start.elapsed();
        let lookups = store.lookups() - before;
        let windows = elapsed.as_secs_f64().div_euclid(NEGATIVE_TTL.as_secs_f64()) as u64 + 1;
        println!(
            "unknown:   {REQUESTS} requests over {distinct} distinct well-formed keys (pool {POOL}), \
             all 401 AUTH_INVALID_API_KEY, {lookups} store lookups (target ≤ {distinct} per {:?} \
             negative TTL; {:.2?} elapsed), {:.2?} per request (wall)",
            NEGATIVE_TTL,
            elapsed,
            elapsed / REQUESTS as u32
        );
        assert!(
            distinct <= lookups && lookups <= distinct * windows,
            "unknown keys: {lookups} store lookups for {distinct} distinct keys in {elapsed:?} \
             (negative TTL {NEGATIVE_TTL:?})"
        );
        assert_eq!(resolver.store_lookups(), store.lookups(), "the counts agree");
    });

    // 3. Cost per refused request, relative to an accepted one.
    let valid_key = valid.expose_secret().to_owned();
    let negative_pool: Vec<String> = (0..BATCH)
        .map(|_| format.generate().expose_secret().to_owned())
        .collect();
    let refused = StatusCode::UNAUTHORIZED;
    let mut cases = vec![Case::new(
        "accepted (cached key)",
        StatusCode::OK,
        0,
        move |_| Some(valid_key.clone()),
    )];
    for kind in Malformed::ALL {
        let format = format.clone();
        cases.push(Case::new(kind.name(), refused, 0, move |rng| {
            Some(kind.generate(&format, rng))
        }));
    }
    let mut next = 0;
    cases.push(Case {
        warm: true,
        ..Case::new("unknown (negative-cached)", refused, 0, move |_| {
            next = (next + 1) % negative_pool.len();
            Some(negative_pool[next].clone())
        })
    });
    let fresh = format.clone();
    cases.push(Case::new(
        "unknown, never seen",
        refused,
        BATCH,
        move |_| Some(fresh.generate().expose_secret().to_owned()),
    ));
    cases.push(Case::new("no key", refused, 0, |_| None));

    runtime.block_on(async {
        let mut service = service.clone();
        let mut statuses = Vec::with_capacity(BATCH);
        for round in 0..ROUNDS {
            let mut round_ns = vec![0.0; cases.len()];
            for i in 0..cases.len() {
                let c = (round + i) % cases.len();
                let case = &mut cases[c];
                let keys: Vec<Option<String>> = (0..BATCH).map(|_| (case.make)(&mut rng)).collect();
                if case.warm {
                    for key in &keys {
                        send(&mut service, request(key.as_deref())).await;
                    }
                }
                let requests: Vec<_> = keys.iter().map(|key| request(key.as_deref())).collect();
                statuses.clear();
                let before = store.lookups();
                let start = fixtures::thread_cpu();
                for request in requests {
                    statuses.push(
                        service
                            .ready()
                            .await
                            .unwrap()
                            .call(request)
                            .await
                            .unwrap()
                            .status(),
                    );
                }
                let spent = fixtures::thread_cpu() - start;
                let lookups = store.lookups() - before;
                assert!(
                    statuses.iter().all(|s| *s == case.expect),
                    "{}: expected {} for all, got {statuses:?}",
                    case.name,
                    case.expect
                );
                assert_eq!(lookups, case.lookups, "{}: store lookups", case.name);
                round_ns[c] = spent.as_nanos() as f64 / BATCH as f64;
            }
            for (case, ns) in cases.iter_mut().zip(&round_ns) {
                case.ns.push(*ns);
                case.ratios.push(ns / round_ns[0]);
            }
        }
    });

    println!(
        "\ncost per request, thread CPU time, medians of {ROUNDS} interleaved rounds of {BATCH}:"
    );
    println!("{:<27} {:>11} {:>13}", "case", "ns/request", "vs accepted");
    for case in &mut cases {
        let ns = median(&mut case.ns);
        let ratio = median(&mut case.ratios);
        println!("{:<27} {:>11.0} {:>12.2}x", case.name, ns, ratio);
    }

    flood(&runtime, &format, &mut rng);
}

/// Section 4: hot keys against a flood of one-off unknown digests, in a small cache.
fn flood(runtime: &tokio::runtime::Runtime, format: &KeyFormat, rng: &mut Rng) {
    let store = CountingStore::wrap(Arc::new(MemoryStore::new()));
    let hot: Vec<ApiKey> = runtime.block_on(async {
        let mut keys = Vec::with_capacity(HOT_KEYS);
        for i in 0..HOT_KEYS {
            keys.push(fixtures::issue(&*store, format, i, "ledgers:read").await);
        }
        keys
    });
    let resolver = CachedResolver::builder(store.clone())
        .format(format.clone())
        .max_capacity(FLOOD_CAPACITY)
        .negative_time_to_live(NEGATIVE_TTL)
        .build();
    let mut service =
        ApiKeyLayer::new(resolver.clone()).layer(RequireScopesLayer::all(["ledgers:read"]).layer(
            tower::service_fn(|_: Request<LiveBody<String>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }),
        ));
    runtime.block_on(async {
        // The hot keys are in use: a few requests each.
        for _ in 0..4 {
            for key in &hot {
                let answer = send(&mut service, request(Some(key.expose_secret()))).await;
                assert_eq!(answer.0, StatusCode::OK);
            }
        }
        assert_eq!(store.lookups(), HOT_KEYS as u64);
        let flood: Vec<ApiKey> = (0..REQUESTS).map(|_| format.generate()).collect();
        let (mut hot_requests, mut flood_lookups) = (0u64, 0u64);
        let before = store.lookups();
        let start = Instant::now();
        for (i, key) in flood.iter().enumerate() {
            let lookups = store.lookups();
            let answer = send(&mut service, request(Some(key.expose_secret()))).await;
            assert_invalid(&answer, InvalidKeyReason::Unknown, "flood key");
            flood_lookups += store.lookups() - lookups;
            if i.is_multiple_of(FLOOD_EVERY) {
                let key = &hot[rng.below(HOT_KEYS)];
                let answer = send(&mut service, request(Some(key.expose_secret()))).await;
                assert_eq!(answer.0, StatusCode::OK);
                hot_requests += 1;
            }
        }
        let elapsed = start.elapsed();
        let during = store.lookups() - before - flood_lookups;
        assert_eq!(flood_lookups, REQUESTS as u64, "each one-off key is one lookup");
        // After the flood: which hot keys are still cached?
        let before = store.lookups();
        for key in &hot {
            let answer = send(&mut service, request(Some(key.expose_secret()))).await;
            assert_eq!(answer.0, StatusCode::OK);
        }
        let evicted = store.lookups() - before;
        println!(
            "\nflood: {REQUESTS} one-off unknown keys and {hot_requests} requests for {HOT_KEYS} hot \
             keys, cache capacity {FLOOD_CAPACITY} ({elapsed:.2?}): hot keys re-read from the store \
             during the flood {during} of {hot_requests} requests, hot keys evicted after it \
             {evicted} of {HOT_KEYS} (targets ≤ 1%); entries cached at the end {}",
            resolver.cached_entries()
        );
        assert!(
            evicted as usize <= HOT_KEYS / 100 && during <= hot_requests / 100,
            "the flood pushed hot keys out: {during} re-read during, {evicted} evicted after"
        );
    });
}
