//! A flood of made-up keys: the public CRC32 checksum against the keyed format, in one run, through
//! `ApiKeyLayer` + `RequireScopesLayer` over stores that count their digest lookups.
//!
//! 1. **Store lookups**: 100,000 made-up keys per format, each new. Public format: keys with a valid
//!    CRC32 that no store knows (anyone can make them), one lookup each. Keyed format: half random
//!    base62 of the right length, half well-formed keys tagged by another service's secret: target
//!    **0** lookups.
//! 2. **Cost per refused request**: 201 interleaved rounds (case order rotated each round) of 256
//!    requests per case, thread CPU time on a current-thread runtime; each case's median ns per
//!    request and the median of its per-round ratio to a malformed key (wrong length, refused by the
//!    shape check) sent to the same keyed service. Target: a made-up keyed key ≤ 1.2× a malformed one.
//!
//! Any missed count or wrong answer panics (non-zero exit). `FLOOD_SEED=<n>` replays a run's keys.
//!
//! `cargo bench --bench flood`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::error::{AuthError, InvalidKeyReason};
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{FormatSecret, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

mod fixtures;
use fixtures::CountingStore;

const REQUESTS: usize = 100_000;
const ROUNDS: usize = 201;
const BATCH: usize = 256;
const TARGET_RATIO: f64 = 1.2;
const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// splitmix64, to make keys quickly and replayably.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn alnum(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| ALNUM[(self.next() % 62) as usize] as char)
            .collect()
    }
}

type BoxService =
    tower::util::BoxCloneService<Request<String>, Response<LiveBody<Full<Bytes>>>, Infallible>;

/// The layer and a guard over a handler that answers 200, for `format` over `store`.
fn stack(store: Arc<CountingStore>, format: KeyFormat) -> BoxService {
    let resolver = CachedResolver::builder(store).format(format).build();
    let service =
        ApiKeyLayer::new(resolver).layer(RequireScopesLayer::all(["ledgers:read"]).layer(
            tower::service_fn(|request: Request<LiveBody<String>>| {
                black_box(&request);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
            }),
        ));
    tower::util::BoxCloneService::new(service)
}

fn request(key: &str) -> Request<String> {
    Request::get("/ledgers")
        .header("x-api-key", key)
        .body(String::new())
        .unwrap()
}

async fn answer(service: &mut BoxService, key: &str) -> (StatusCode, Option<AuthError>) {
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request(key))
        .await
        .unwrap();
    (
        response.status(),
        response.extensions().get::<AuthError>().cloned(),
    )
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One row of the cost table.
struct Case {
    name: &'static str,
    service: usize,
    reason: Option<InvalidKeyReason>,
    /// Store lookups each timed batch must make.
    lookups: u64,
    make: Box<dyn FnMut(&mut Rng) -> String>,
    ns: Vec<f64>,
    ratios: Vec<f64>,
}

fn main() {
    let seed = std::env::var("FLOOD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut bytes = [0; 8];
            getrandom::fill(&mut bytes).unwrap();
            u64::from_le_bytes(bytes)
        });
    println!("FLOOD_SEED={seed}");
    let mut rng = Rng(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Two services, each with one real key: the public checksum, and the keyed format with its
    // secret created in (and loaded from) the key store.
    let public = KeyFormat::new("sk_live").unwrap();
    let public_store = CountingStore::wrap(Arc::new(MemoryStore::new()));
    let keyed_inner = Arc::new(MemoryStore::new());
    let keyed = runtime
        .block_on(KeyFormat::keyed("sk_live").load_secret_from(&*keyed_inner))
        .unwrap();
    let keyed_store = CountingStore::wrap(keyed_inner as Arc<dyn KeyStore>);
    let stores = [public_store.clone(), keyed_store.clone()];
    let mut services = [
        stack(public_store.clone(), public.clone()),
        stack(keyed_store.clone(), keyed.clone()),
    ];
    let valid = runtime.block_on(async {
        let a = fixtures::issue(&*public_store, &public, 0, "ledgers:read").await;
        let b = fixtures::issue(&*keyed_store, &keyed, 0, "ledgers:read").await;
        [a.expose_secret().to_owned(), b.expose_secret().to_owned()]
    });
    let stranger = KeyFormat::keyed("sk_live")
        .secret(1, FormatSecret::generate())
        .build()
        .unwrap();

    // 1. Store lookups of 100,000 made-up keys per format.
    runtime.block_on(async {
        for (i, service) in services.iter_mut().enumerate() {
            let (status, _) = answer(service, &valid[i]).await;
            assert_eq!(status, StatusCode::OK, "the stack accepts its real key");
        }
        let public_keys: Vec<String> = (0..REQUESTS)
            .map(|_| public.generate().expose_secret().to_owned())
            .collect();
        let keyed_keys: Vec<String> = (0..REQUESTS)
            .map(|i| {
                if i % 2 == 0 {
                    format!("sk_live_{}", rng.alnum(55))
                } else {
                    stranger.generate().expose_secret().to_owned()
                }
            })
            .collect();
        println!("\nstore lookups for {REQUESTS} made-up keys, each new:");
        for (i, keys, want) in [
            (0, &public_keys, InvalidKeyReason::Unknown),
            (1, &keyed_keys, InvalidKeyReason::BadChecksum),
        ] {
            let before = stores[i].lookups();
            let start = Instant::now();
            let mut wrong_reason = 0;
            for key in keys {
                match answer(&mut services[i], key).await {
                    (StatusCode::UNAUTHORIZED, Some(AuthError::InvalidKey(reason))) => {
                        // a random version character may name no secret: malformed, also no I/O
                        if reason != want && reason != InvalidKeyReason::Malformed {
                            wrong_reason += 1;
                        }
                    }
                    other => panic!("a made-up key was not refused: {other:?}"),
                }
            }
            let lookups = stores[i].lookups() - before;
            println!(
                "  {:<34} {lookups:>7} lookups   ({:.2?} per request, wall)",
                if i == 0 {
                    "public CRC32 (valid checksum)"
                } else {
                    "keyed (random, or another secret)"
                },
                start.elapsed() / REQUESTS as u32
            );
            assert_eq!(wrong_reason, 0, "refused for the wrong reason");
            if i == 0 {
                assert_eq!(lookups, REQUESTS as u64, "each new public key is looked up");
            } else {
                assert_eq!(
                    lookups, 0,
                    "a made-up keyed key reached the store (target 0)"
                );
            }
        }
    });

    // 2. Cost per refused request.
    let key_len = keyed.key_len();
    let accepted = valid[1].clone();
    let fresh_public = public.clone();
    let fresh_stranger = stranger.clone();
    let mut cases = vec![
        Case {
            name: "malformed (wrong length)",
            service: 1,
            reason: Some(InvalidKeyReason::Malformed),
            lookups: 0,
            make: Box::new(move |rng| format!("sk_live_{}", rng.alnum(key_len - 8 - 3))),
            ns: vec![],
            ratios: vec![],
        },
        Case {
            name: "malformed (non-base62)",
            service: 1,
            reason: Some(InvalidKeyReason::Malformed),
            lookups: 0,
            make: Box::new(move |rng| format!("sk_live_{}!", rng.alnum(key_len - 8 - 1))),
            ns: vec![],
            ratios: vec![],
        },
        Case {
            name: "made-up keyed (another secret)",
            service: 1,
            reason: Some(InvalidKeyReason::BadChecksum),
            lookups: 0,
            make: Box::new(move |_| fresh_stranger.generate().expose_secret().to_owned()),
            ns: vec![],
            ratios: vec![],
        },
        Case {
            name: "made-up keyed (random tag)",
            service: 1,
            reason: Some(InvalidKeyReason::BadChecksum),
            lookups: 0,
            // version 1 (the one the service accepts), random tag
            make: Box::new(move |rng| format!("sk_live_{}1{}", rng.alnum(43), rng.alnum(11))),
            ns: vec![],
            ratios: vec![],
        },
        Case {
            name: "made-up public (valid CRC32)",
            service: 0,
            reason: Some(InvalidKeyReason::Unknown),
            lookups: BATCH as u64,
            make: Box::new(move |_| fresh_public.generate().expose_secret().to_owned()),
            ns: vec![],
            ratios: vec![],
        },
        Case {
            name: "accepted (cached keyed key)",
            service: 1,
            reason: None,
            lookups: 0,
            make: Box::new(move |_| accepted.clone()),
            ns: vec![],
            ratios: vec![],
        },
    ];
    runtime.block_on(async {
        let mut statuses: Vec<(StatusCode, Option<InvalidKeyReason>)> = Vec::with_capacity(BATCH);
        for round in 0..ROUNDS {
            let mut round_ns = vec![0.0; cases.len()];
            for i in 0..cases.len() {
                let c = (round + i) % cases.len();
                let case = &mut cases[c];
                let requests: Vec<_> = (0..BATCH)
                    .map(|_| request(&(case.make)(&mut rng)))
                    .collect();
                let service = &mut services[case.service];
                statuses.clear();
                let before = stores[case.service].lookups();
                let start = fixtures::thread_cpu();
                for request in requests {
                    let response = service.ready().await.unwrap().call(request).await.unwrap();
                    let reason = match response.extensions().get::<AuthError>() {
                        Some(AuthError::InvalidKey(reason)) => Some(*reason),
                        _ => None,
                    };
                    statuses.push((response.status(), reason));
                }
                let spent = fixtures::thread_cpu() - start;
                let lookups = stores[case.service].lookups() - before;
                let expect = (
                    if case.reason.is_some() {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::OK
                    },
                    case.reason,
                );
                assert!(
                    statuses.iter().all(|s| *s == expect),
                    "{}: expected {expect:?} for all, got {statuses:?}",
                    case.name
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
    println!("{:<32} {:>11} {:>15}", "case", "ns/request", "vs malformed");
    let mut keyed_ratio = 0.0f64;
    for case in &mut cases {
        let ns = median(&mut case.ns);
        let ratio = median(&mut case.ratios);
        if case.name.starts_with("made-up keyed") {
            keyed_ratio = keyed_ratio.max(ratio);
        }
        println!("{:<32} {:>11.0} {:>14.2}x", case.name, ns, ratio);
    }
    println!(
        "\nmade-up keyed key vs malformed: {keyed_ratio:.2}x (target <= {TARGET_RATIO}x), 0 store lookups"
    );
    assert!(
        keyed_ratio <= TARGET_RATIO,
        "a made-up keyed key costs {keyed_ratio:.2}x a malformed one (target <= {TARGET_RATIO}x)"
    );
}
