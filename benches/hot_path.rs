//! What one authenticated request costs on the hot path (cached key), next to the alternatives.
//!
//! Cases, all around the same trivial `tower::service_fn` (no router, no I/O), with requests built
//! outside the timed region in batches of 256 (small enough to stay in cache, like a request the
//! server just parsed):
//!
//! - `bare`: the inner service alone;
//! - `tower-http bearer`: `ValidateRequestHeaderLayer::bearer(token)`, one static token compared;
//! - `layer`: `ApiKeyLayer` (cached key, cache warmed first) + `RequireScopesLayer`; also the layer alone,
//!   and the layer over a resolver with its per-thread front turned off (every hit a moka `get`),
//!   which is what decides whether the front stays;
//! - the parts no key-store auth can avoid: SHA-256 of the key, one `std` `HashMap` lookup of the
//!   32-byte digest, one `http::Extensions` insert of an `Arc`-sized value, each and in sequence;
//! - `resolver hit`: `CachedResolver::authenticate` on a cached digest (moka `get`, clock, clone;
//!   `authenticate` does not use the front);
//! - `bcrypt verify (cost 10)`: what a server hashing keys with bcrypt pays per request.
//!
//! After the criterion groups, the cases are timed again in 1001 interleaved rounds, in thread CPU
//! time (the machines are 2 shared cores: time spent preempted must not land on one case), and the
//! ratios are printed from the medians. Separate processes can land in a "slow mode" where every
//! case, bare included, is ~1.7x slower; compare ratios within one run, and rerun if `bare` is far
//! above ~90 ns.
//!
//! `cargo bench --bench hot_path` (about a minute); only the interleaved ratios:
//! `cargo bench --bench hot_path -- nomatch`. For a profiler, `HOT_PATH_PROFILE=<n>` sends n requests
//! through the layer and exits (see [`profile`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, SamplingMode};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use http_body_util::Full;
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::store::KeyLimits;

mod fixtures;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore};

/// The requests of these benches: no body.
type Req = Request<Empty<Bytes>>;

/// The response of a service under `ApiKeyLayer`, unwrapped (its body is not read here).
fn unwrap_live<B>(response: Response<LiveBody<B>>) -> Response<B> {
    response.map(LiveBody::into_inner)
}

const BEARER_TOKEN: &str = "a-static-token-0123456789abcdefghijklmnopqrstuvwxyz";
const BCRYPT_COST: u32 = 10;
/// Requests built ahead of one timed batch: few enough to stay in cache.
const BATCH: u32 = 256;

async fn handler<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    black_box(&request);
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Runs a future that never waits to completion.
fn now<F: Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("in-memory requests complete at once")
}

fn run<S>(service: &mut S, request: Req) -> StatusCode
where
    S: Service<Req, Response = Response<Full<Bytes>>, Error = Infallible>,
{
    let ready = now(service.ready()).unwrap();
    now(ready.call(request)).unwrap().status()
}

fn api_key_request(key: &str) -> Req {
    Request::get("/ledgers")
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap()
}

fn bearer_request() -> Req {
    Request::get("/ledgers")
        .header("authorization", format!("Bearer {BEARER_TOKEN}"))
        .body(Empty::new())
        .unwrap()
}

/// A store holding one key with `ledgers:read`, expiring in a year, and two resolvers that have it
/// cached: with the per-thread front (the default) and without.
fn setup() -> (ApiKey, CachedResolver, CachedResolver) {
    let format = KeyFormat::default();
    let key = format.generate();
    let now = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "bench key".to_owned(),
        owner: "team-a".to_owned(),
        account: "team-a-account".to_owned(),
        scopes: "ledgers:read balances:read".parse().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: now,
        expires_at: Some(now + time::Duration::days(365)),
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    let store = MemoryStore::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        store
            .insert(&record, KeyLimits::default(), now)
            .await
            .unwrap();
    });
    let store: std::sync::Arc<dyn KeyStore> = std::sync::Arc::new(store);
    let resolver = |front: bool| {
        // Long enough for the whole run: every timed request must be a cache hit.
        let resolver = CachedResolver::builder(store.clone())
            .time_to_live(Duration::from_secs(24 * 3600))
            .per_thread_front(front)
            .build();
        // Warm the cache.
        runtime.block_on(async {
            resolver.authenticate(&key.digest()).await.unwrap();
        });
        resolver
    };
    let (with_front, without_front) = (resolver(true), resolver(false));
    (key, with_front, without_front)
}

/// The parts of authenticating by stored key that no implementation can skip.
struct Parts {
    map: HashMap<[u8; 32], Principal>,
}

impl Parts {
    fn new(key: &ApiKey) -> Self {
        let mut map = HashMap::new();
        for i in 0..1000 {
            let other = ApiKey::new(format!("other-key-{i}"));
            map.insert(*other.digest().as_bytes(), principal());
        }
        map.insert(*key.digest().as_bytes(), principal());
        Self { map }
    }

    fn sha256(key: &str) -> KeyDigest {
        KeyDigest::of(key)
    }

    fn lookup(&self, digest: &[u8; 32]) -> Principal {
        self.map.get(digest).expect("the key is in the map").clone()
    }

    fn insert(principal: Principal) -> http::Extensions {
        let mut extensions = http::Extensions::new();
        extensions.insert(principal);
        extensions
    }

    fn all(&self, key: &str) -> http::Extensions {
        let digest = Self::sha256(key);
        Self::insert(self.lookup(digest.as_bytes()))
    }
}

fn principal() -> Principal {
    Principal::scoped(
        KeyId::new("key_01JABCDEFGHJKMNPQRSTVWXYZ0"),
        "bench",
        "owner",
        "account",
        "ledgers:read".parse().unwrap(),
        None,
    )
}

struct Fixture {
    key: ApiKey,
    resolver: CachedResolver,
    no_front: CachedResolver,
    parts: Parts,
    bcrypt_hash: String,
}

impl Fixture {
    fn new() -> Self {
        let (key, resolver, no_front) = setup();
        let parts = Parts::new(&key);
        let bcrypt_hash = bcrypt::hash(key.expose_secret(), BCRYPT_COST).unwrap();
        Self {
            key,
            resolver,
            no_front,
            parts,
            bcrypt_hash,
        }
    }

    fn bare(&self) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> {
        tower::service_fn(handler)
    }

    fn layer(&self) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> {
        ApiKeyLayer::new(self.resolver.clone())
            .layer(RequireScopesLayer::all(["ledgers:read"]).layer(tower::service_fn(handler)))
            .map_response(unwrap_live)
    }

    /// The layer and guard over the resolver without a per-thread front.
    fn layer_no_front(
        &self,
    ) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> {
        ApiKeyLayer::new(self.no_front.clone())
            .layer(RequireScopesLayer::all(["ledgers:read"]).layer(tower::service_fn(handler)))
            .map_response(unwrap_live)
    }

    fn layer_only(
        &self,
    ) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> {
        ApiKeyLayer::new(self.resolver.clone())
            .layer(tower::service_fn(handler))
            .map_response(unwrap_live)
    }

    #[allow(deprecated)]
    fn bearer(&self) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible> {
        tower_http::validate_request::ValidateRequestHeaderLayer::bearer(BEARER_TOKEN)
            .layer(tower::service_fn(handler))
    }

    /// Every stack answers 200 to its request (and 401 without it), and the key stays cached.
    fn check(&self) {
        let key = self.key.expose_secret();
        let lookups = self.resolver.store_lookups() + self.no_front.store_lookups();
        assert_eq!(run(&mut self.bare(), api_key_request(key)), StatusCode::OK);
        assert_eq!(run(&mut self.layer(), api_key_request(key)), StatusCode::OK);
        assert_eq!(
            run(&mut self.layer_no_front(), api_key_request(key)),
            StatusCode::OK
        );
        assert_eq!(
            run(&mut self.layer_only(), api_key_request(key)),
            StatusCode::OK
        );
        assert_eq!(
            run(&mut self.layer(), bearer_request()),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(run(&mut self.bearer(), bearer_request()), StatusCode::OK);
        assert_eq!(
            run(&mut self.bearer(), api_key_request(key)),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            self.resolver.store_lookups() + self.no_front.store_lookups(),
            lookups,
            "the key is cached"
        );
        assert!(bcrypt::verify(key, &self.bcrypt_hash).unwrap());
        let extensions = self.parts.all(key);
        assert!(extensions.get::<Principal>().is_some());
    }
}

fn bench_stack<S>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut service: S,
    request: impl Fn() -> Req,
) where
    S: Service<Req, Response = Response<Full<Bytes>>, Error = Infallible>,
{
    group.bench_function(name, |b| {
        b.iter_batched(
            &request,
            |request| run(&mut service, request),
            // Small batches: requests stay in cache, as a request just parsed by the server is.
            BatchSize::NumIterations(BATCH.into()),
        )
    });
}

fn benches(c: &mut Criterion, f: &Fixture) {
    let key = f.key.expose_secret();
    let mut group = c.benchmark_group("hot_path");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    bench_stack(&mut group, "bare", f.bare(), || api_key_request(key));
    bench_stack(&mut group, "tower-http bearer", f.bearer(), bearer_request);
    bench_stack(&mut group, "layer", f.layer(), || api_key_request(key));
    bench_stack(&mut group, "layer without guard", f.layer_only(), || {
        api_key_request(key)
    });
    bench_stack(&mut group, "layer, no front", f.layer_no_front(), || {
        api_key_request(key)
    });
    group.bench_function("parts/sha256", |b| b.iter(|| Parts::sha256(black_box(key))));
    let digest = *f.key.digest().as_bytes();
    group.bench_function("parts/hashmap get", |b| {
        b.iter(|| f.parts.lookup(black_box(&digest)))
    });
    let principal = principal();
    group.bench_function("parts/extensions insert", |b| {
        b.iter(|| Parts::insert(principal.clone()))
    });
    group.bench_function("parts/all", |b| b.iter(|| f.parts.all(black_box(key))));
    group.finish();

    let mut group = c.benchmark_group("hot_path_slow");
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10);
    group.bench_function(format!("bcrypt verify (cost {BCRYPT_COST})"), |b| {
        b.iter(|| bcrypt::verify(black_box(key), &f.bcrypt_hash).unwrap())
    });
    group.finish();
}

/// Median nanoseconds per operation over rounds of `per_round` operations.
fn median(samples: &mut [Duration], per_round: u32) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64 / f64::from(per_round)
}

/// This thread's CPU time spent in `f`.
fn cpu<R>(f: impl FnOnce() -> R) -> Duration {
    let start = fixtures::thread_cpu();
    black_box(f());
    fixtures::thread_cpu() - start
}

/// CPU time of `per_round` requests through `service`, requests built beforehand.
fn time_stack<S>(service: &mut S, per_round: u32, request: &dyn Fn() -> Req) -> Duration
where
    S: Service<Req, Response = Response<Full<Bytes>>, Error = Infallible>,
{
    let requests: Vec<_> = (0..per_round).map(|_| request()).collect();
    cpu(|| {
        for request in requests {
            black_box(run(service, request));
        }
    })
}

/// One interleaved case: the CPU time of one batch.
type Case<'a> = Box<dyn FnMut() -> Duration + 'a>;

fn print_ratios(f: &Fixture) {
    const ROUNDS: usize = 1001;
    let key = f.key.expose_secret();
    let api_key = || api_key_request(key);
    let digest = f.key.digest();
    let (mut bare, mut bearer) = (f.bare(), f.bearer());
    let (mut layer, mut layer_only) = (f.layer(), f.layer_only());
    let mut layer_no_front = f.layer_no_front();
    let principal = principal();
    let loop_of = |op: &dyn Fn()| {
        cpu(|| {
            for _ in 0..BATCH {
                op();
            }
        })
    };
    let mut cases: Vec<(&str, Case<'_>)> = vec![
        (
            "bare service",
            Box::new(|| time_stack(&mut bare, BATCH, &api_key)),
        ),
        (
            "tower-http bearer",
            Box::new(|| time_stack(&mut bearer, BATCH, &bearer_request)),
        ),
        (
            "layer + RequireScopesLayer",
            Box::new(|| time_stack(&mut layer, BATCH, &api_key)),
        ),
        (
            "layer alone",
            Box::new(|| time_stack(&mut layer_only, BATCH, &api_key)),
        ),
        (
            "layer + RequireScopesLayer, no front",
            Box::new(|| time_stack(&mut layer_no_front, BATCH, &api_key)),
        ),
        (
            "sum of parts (sha+map+extension)",
            Box::new(|| loop_of(&|| drop(black_box(f.parts.all(black_box(key)))))),
        ),
        (
            "  sha256",
            Box::new(|| loop_of(&|| _ = black_box(Parts::sha256(black_box(key))))),
        ),
        (
            "  hashmap get",
            Box::new(|| loop_of(&|| drop(black_box(f.parts.lookup(black_box(digest.as_bytes())))))),
        ),
        (
            "  extensions insert",
            Box::new(|| loop_of(&|| drop(black_box(Parts::insert(principal.clone()))))),
        ),
        (
            "resolver hit (authenticate, moka)",
            Box::new(|| {
                loop_of(&|| {
                    drop(black_box(
                        now(f.resolver.authenticate(black_box(&digest))).unwrap(),
                    ))
                })
            }),
        ),
    ];
    let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for ((_, case), samples) in cases.iter_mut().zip(&mut samples) {
            samples.push(case());
        }
    }
    let ns: Vec<f64> = samples.iter_mut().map(|s| median(s, BATCH)).collect();
    let names: Vec<&str> = cases.iter().map(|(name, _)| *name).collect();
    drop(cases);
    let get = |name: &str| ns[names.iter().position(|n| *n == name).unwrap()];
    let (bare, bearer, layer, parts) = (
        get("bare service"),
        get("tower-http bearer"),
        get("layer + RequireScopesLayer"),
        get("sum of parts (sha+map+extension)"),
    );
    // bcrypt: a few verifications, interleaved with rounds of the layer.
    let (mut b, mut l) = (Vec::new(), Vec::new());
    let mut layer_b = f.layer();
    for _ in 0..7 {
        b.push(cpu(|| {
            bcrypt::verify(black_box(key), &f.bcrypt_hash).unwrap()
        }));
        l.push(time_stack(&mut layer_b, BATCH, &api_key));
    }
    let bcrypt = median(&mut b, 1);
    let layer_b = median(&mut l, BATCH);

    let added = layer - bare;
    println!(
        "\nhot path: thread CPU time per request, medians of {ROUNDS} interleaved rounds of {BATCH}"
    );
    for (name, ns) in names.iter().zip(&ns) {
        println!("  {name:<34} {ns:>10.1} ns");
    }
    println!(
        "  bcrypt verify (cost {BCRYPT_COST})           {:>10.3} ms",
        bcrypt / 1e6
    );
    println!("ratios:");
    println!(
        "  (layer - bare) / sum of parts      {:>10.2}x   (target <= 2x, aim 1.5x)",
        added / parts
    );
    println!(
        "  (layer, no front - bare) / parts   {:>10.2}x   (what the per-thread front saves)",
        (get("layer + RequireScopesLayer, no front") - bare) / parts
    );
    println!(
        "  layer / sum of parts               {:>10.2}x",
        layer / parts
    );
    println!(
        "  (layer - bare) - (bearer - bare)   {:>10.1} ns  (a key store over one static token)",
        layer - bearer
    );
    println!(
        "  bcrypt / layer                     {:>10.0}x   (target >= 10,000x)",
        bcrypt / layer_b
    );
    println!(
        "  bcrypt / (layer - bare)            {:>10.0}x",
        bcrypt / (layer_b - bare)
    );
}

/// `HOT_PATH_PROFILE=<requests>`: only sends that many requests through the layer stack, in chunks
/// built beforehand, for a profiler (`valgrind --tool=callgrind --toggle-collect='*ApiKeyService*call*'`).
fn profile(f: &Fixture, requests: u32) {
    let key = f.key.expose_secret();
    let mut layer = f.layer();
    for _ in 0..requests.div_ceil(BATCH) {
        black_box(time_stack(&mut layer, BATCH, &|| api_key_request(key)));
    }
}

fn main() {
    let fixture = Fixture::new();
    if let Some(requests) = std::env::var("HOT_PATH_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return profile(&fixture, requests);
    }
    fixture.check();
    let listing = std::env::args().any(|a| a == "--list" || a == "--test" || a == "--profile-time");
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &fixture);
    criterion.final_summary();
    if !listing {
        print_ratios(&fixture);
        fixture.check();
    }
}
