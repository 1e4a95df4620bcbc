//! One authenticated request through an axum `Router` as users wire it, case by case: for counting
//! instructions under `valgrind --tool=callgrind` (`scripts/callgrind.sh`), and for thread CPU time
//! in interleaved rounds.
//!
//! Cases (every request carries one key header; every handler answers `"ok"`):
//!
//! | case | router |
//! |---|---|
//! | `bare` | the route alone |
//! | `static-token` | `.layer(ValidateRequestHeaderLayer::bearer(token))` (tower-http, one token) |
//! | `moka-by-hand` | `.layer(middleware::from_fn_with_state(..))`: SHA-256 of the header, a `moka` get, an extension insert, what people write by hand |
//! | `layer` | `.layer(ApiKeyLayer::new(..).axum_body())` (as the README wires it; every `layer*` case but the next) |
//! | `layer(any-body)` | `.layer(ApiKeyLayer::new(..))`: bodies in a `LiveBody` that axum reboxes, the mode for any tower service |
//! | `layer+require` | `.route_layer(RequireScopesLayer::all(..)).layer(ApiKeyLayer)`: two layers, two boxes |
//! | `layer+scoped` | `.layer(ApiKeyLayer)`, the handler takes `Scoped<LedgersRead>`: the guard costs no layer |
//! | `layer+scoped(keyed)` | `layer+scoped` with keys of the keyed format (`KeyFormat::keyed`, the README's): an HMAC-SHA-256 tag checked on every request before the digest |
//! | `layer+require+limit` | `layer+require` with `.route_layer(RateLimiter::in_memory().layer())` inside the guard, a key with a rate limit it never reaches |
//! | `layer+scoped+limit` | `layer+scoped` with the rate-limit layer |
//!
//! `cargo bench --bench instructions` (or `-- cpu`) times every case in interleaved rounds of 256
//! requests in thread CPU time and prints the medians and ratios. `instructions-<hash> <case> <n>`
//! sets the case up, sends 64 warm-up requests, then `n` requests, and exits: what
//! `scripts/callgrind.sh` runs under callgrind twice per case (two `n`s, so that the setup cancels);
//! `instructions-<hash> sha256 <n>` computes `n` SHA-256 digests of a key, to tell that part apart.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tower::Service;
use tower_api_keys::guard::{RequireScopesLayer, Scoped};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::limits::{RateLimit, UsageLimits};
use tower_api_keys::ratelimit::RateLimiter;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scopes;
use tower_api_keys::store::{KeyLimits, KeyStore, MemoryStore};

mod fixtures;

const TOKEN: &str = "a-static-token-0123456789abcdefghijklmnopqrstuvwxyz";
/// Requests before the counted ones: caches warm, per-thread front filled, lazy statics set.
const WARM_UP: u32 = 64;

/// The cases, in the order they are printed.
const CASES: [&str; 10] = [
    "bare",
    "static-token",
    "moka-by-hand",
    "layer",
    "layer(any-body)",
    "layer+require",
    "layer+scoped",
    "layer+scoped(keyed)",
    "layer+require+limit",
    "layer+scoped+limit",
];

scopes! {
    /// What `/ledgers` requires.
    LedgersRead = all("ledgers:read");
}

async fn ok() -> &'static str {
    "ok"
}

async fn scoped(auth: Scoped<LedgersRead>) -> &'static str {
    black_box(&auth);
    "ok"
}

/// The user record a hand-written middleware keeps per key.
#[allow(dead_code)] // read by handlers in real code
#[derive(Clone)]
struct User(Arc<UserInner>);

#[allow(dead_code)]
struct UserInner {
    id: String,
    scopes: Vec<String>,
}

/// The hand-written middleware: `x-api-key` → SHA-256 → moka → `User` in the extensions.
async fn moka_auth(
    State(cache): State<moka::sync::Cache<[u8; 32], User>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(key) = request.headers().get("x-api-key") else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    match cache.get(&digest) {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// A case: its router and the header its requests carry.
struct Case {
    router: Router,
    header: (HeaderName, HeaderValue),
}

impl Case {
    fn request(&self) -> Request {
        let mut request = Request::get("/ledgers").body(Body::empty()).unwrap();
        request
            .headers_mut()
            .insert(self.header.0.clone(), self.header.1.clone());
        request
    }

    /// One request to completion (nothing here waits).
    fn send(&mut self) {
        let request = self.request();
        let response = self
            .router
            .call(request)
            .now_or_never()
            .expect("in-memory requests complete at once")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        black_box(response);
    }
}

/// The stored key (with `ledgers:read` and a rate limit it never reaches) and a resolver that has it
/// cached.
fn key_and_resolver(runtime: &tokio::runtime::Runtime, keyed: bool) -> (ApiKey, CachedResolver) {
    let format = match keyed {
        false => KeyFormat::default(),
        true => KeyFormat::keyed("sk_live")
            .secret(1, tower_api_keys::key::FormatSecret::generate())
            .build()
            .unwrap(),
    };
    let key = format.generate();
    let mut record = fixtures::record(&format, &key, 1, "ledgers:read balances:read");
    record.limits = UsageLimits {
        rate_limit: Some(RateLimit::new(1_000_000_000, 1)),
        credits: None,
    };
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::builder(store.clone() as Arc<dyn KeyStore>)
        .time_to_live(Duration::from_secs(24 * 3600))
        .format(format)
        .build();
    runtime.block_on(async {
        store
            .insert(
                &record,
                KeyLimits::default(),
                time::OffsetDateTime::now_utc(),
            )
            .await
            .unwrap();
        resolver.authenticate(&key.digest()).await.unwrap();
    });
    (key, resolver)
}

fn case(name: &str, runtime: &tokio::runtime::Runtime) -> Case {
    let route = |scoped_handler: bool| {
        Router::new().route(
            "/ledgers",
            if scoped_handler { get(scoped) } else { get(ok) },
        )
    };
    let x_api_key = HeaderName::from_static("x-api-key");
    let (key, resolver) = key_and_resolver(runtime, name.ends_with("(keyed)"));
    let key_header = (
        x_api_key,
        HeaderValue::from_str(key.expose_secret()).unwrap(),
    );
    let layer = || ApiKeyLayer::new(resolver.clone()).axum_body();
    let guard = || RequireScopesLayer::all(["ledgers:read"]);
    let limiter = || RateLimiter::in_memory().layer();
    #[allow(deprecated)] // `bearer` is deprecated in tower-http 0.6.7 and still there
    let static_token = || tower_http::validate_request::ValidateRequestHeaderLayer::bearer(TOKEN);
    let (router, header) = match name {
        "bare" => (route(false), key_header),
        "static-token" => (
            route(false).layer(static_token()),
            (
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap(),
            ),
        ),
        "moka-by-hand" => {
            let cache = moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build();
            let digest: [u8; 32] = Sha256::digest(key.expose_secret().as_bytes()).into();
            let user = User(Arc::new(UserInner {
                id: "key_1".into(),
                scopes: vec!["ledgers:read".into()],
            }));
            cache.insert(digest, user);
            let router = route(false).layer(middleware::from_fn_with_state(cache, moka_auth));
            (router, key_header)
        }
        "layer" => (route(false).layer(layer()), key_header),
        "layer(any-body)" => (
            route(false).layer(ApiKeyLayer::new(resolver.clone())),
            key_header,
        ),
        "layer+require" => (route(false).route_layer(guard()).layer(layer()), key_header),
        "layer+scoped" | "layer+scoped(keyed)" => (route(true).layer(layer()), key_header),
        "layer+require+limit" => (
            route(false)
                .route_layer(limiter())
                .route_layer(guard())
                .layer(layer()),
            key_header,
        ),
        "layer+scoped+limit" => (
            route(true).route_layer(limiter()).layer(layer()),
            key_header,
        ),
        other => panic!("unknown case {other:?}; cases: {}", CASES.join(", ")),
    };
    let mut case = Case { router, header };
    for _ in 0..WARM_UP {
        case.send();
    }
    case
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` requests of one case, for callgrind (`sha256`: `n` SHA-256 digests of a key, no request).
fn count(name: &str, n: u32) {
    if name == "sha256" {
        let key = KeyFormat::default().generate();
        measured_digests(key.expose_secret().as_bytes(), n);
        return;
    }
    let runtime = runtime();
    let mut case = case(name, &runtime);
    measured_requests(&mut case, n);
}

/// The counted digests (see [`measured_requests`]).
#[inline(never)]
fn measured_digests(key: &[u8], n: u32) {
    for _ in 0..n {
        black_box(Sha256::digest(black_box(key)));
    }
}

/// The counted requests: `scripts/callgrind.sh` collects inside this function only
/// (`--toggle-collect`), so that setup whose cost depends on time (the rate limiter's clock
/// calibrates itself for a while) stays out of the counts.
#[inline(never)]
fn measured_requests(case: &mut Case, n: u32) {
    for _ in 0..n {
        case.send();
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Every case in interleaved rounds of 256 requests, thread CPU time: medians and ratios.
fn cpu(rounds: usize) {
    const BATCH: u32 = 256;
    let runtime = runtime();
    let mut cases: Vec<Case> = CASES.iter().map(|name| case(name, &runtime)).collect();
    let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (case, samples) in cases.iter_mut().zip(&mut samples) {
            let start = fixtures::thread_cpu();
            for _ in 0..BATCH {
                case.send();
            }
            samples.push((fixtures::thread_cpu() - start) / BATCH);
        }
    }
    let medians: Vec<f64> = samples
        .into_iter()
        .map(|s| median(s).as_nanos() as f64)
        .collect();
    print_table("ns (thread CPU, median per request)", &medians);
}

/// Prints per-case figures, what each adds over `bare`, and that over what the static token adds.
pub fn print_table(unit: &str, figures: &[f64]) {
    let bare = figures[0];
    let token = figures[1] - bare;
    println!(
        "{:<22} {:>12} {:>12} {:>16}",
        "case", unit, "over bare", "÷ static token"
    );
    for (name, figure) in CASES.iter().zip(figures) {
        let over = figure - bare;
        let ratio = if *name == "bare" {
            String::new()
        } else {
            format!("{:.2}×", over / token)
        };
        println!("{name:<22} {figure:>12.0} {over:>12.0} {ratio:>16}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [name, n] if CASES.contains(&name) || name == "sha256" => {
            count(name, n.parse().expect("a request count"))
        }
        ["list"] => println!("{}", CASES.join("\n")),
        // `cargo bench` passes `--bench` (and a filter, if any).
        _ => cpu(std::env::var("ROUNDS").map_or(301, |r| r.parse().expect("ROUNDS: a number"))),
    }
}
