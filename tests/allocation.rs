//! Heap allocations of an authenticated request with a cached key: none beyond what `http::Extensions`
//! needs to hold the principal (its map and one boxed value), counted by a global allocator that
//! counts per thread.
//!
//! `.ci/run` also runs this binary under `valgrind --tool=memcheck`: the hot path (the coarse clock
//! above all, rustix#1559) must work under valgrind.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use http_body_util::Full;
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyLimits, KeyStore, MemoryStore};

mod common;

/// Counts the allocations of the current thread (other tests' threads do not disturb it).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the counter is a const-initialised
// thread-local `Cell`, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations made by `f` on this thread.
fn allocations_of<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = allocations();
    let result = f();
    (allocations() - before, result)
}

/// A stored key with `ledgers:read` and a resolver that has it cached.
fn cached_key() -> (ApiKey, CachedResolver) {
    let format = KeyFormat::default();
    let key = format.generate();
    let record = common::record(&format, &key, "team-a", "ledgers:read");
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::builder(store.clone() as Arc<dyn KeyStore>)
        .time_to_live(Duration::from_secs(3600))
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        store
            .insert(&record, KeyLimits::default(), OffsetDateTime::now_utc())
            .await
            .unwrap();
        resolver.authenticate(&key.digest()).await.unwrap();
    });
    (key, resolver)
}

/// The handler: answers 200 if a principal is there, without allocating.
async fn handler<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match Principal::from_extensions(request.extensions()) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::UNAUTHORIZED,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

fn call<S>(service: &mut S, request: Request<Empty<Bytes>>) -> StatusCode
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
        .expect("a cached key needs no waiting")
        .unwrap()
        .status()
}

fn request(key: &ApiKey) -> Request<Empty<Bytes>> {
    Request::get("/ledgers")
        .header("x-api-key", key.expose_secret())
        .body(Empty::new())
        .unwrap()
}

/// What holding one principal in a request's extensions costs: the extension map and the boxed
/// value (measured, so that a new `http` version cannot make the test wrong).
fn extensions_cost(principal: &Principal) -> u64 {
    let mut request = Request::get("/ledgers").body(()).unwrap();
    allocations_of(|| {
        request.extensions_mut().insert(principal.clone());
    })
    .0
}

#[test]
fn a_cached_request_allocates_only_the_extension() {
    let (key, resolver) = cached_key();
    let mut service = ApiKeyLayer::new(resolver.clone())
        .layer(RequireScopesLayer::all(["ledgers:read"]).layer(tower::service_fn(handler)));
    let mut layer_only = ApiKeyLayer::new(resolver).layer(tower::service_fn(handler));
    // Warm up: the per-thread front, lazy statics, the tracing callsite cache.
    for _ in 0..50 {
        assert_eq!(call(&mut service, request(&key)), StatusCode::OK);
        assert_eq!(call(&mut layer_only, request(&key)), StatusCode::OK);
    }
    let expected = extensions_cost(&Principal::master());
    assert!(
        expected <= 3,
        "http::Extensions needs {expected} allocations"
    );
    // Enough requests (two answers each) that a refill of the per-thread front from the shared
    // cache (one in 256 answers) is counted too; few enough for memcheck in CI. A refill reads
    // moka, which runs its own maintenance inline when enough time has passed since the last
    // (300 ms: routine under memcheck); that is moka's bookkeeping, amortised over the 256 answers
    // of a slot, so only a refill may allocate more. Every other request allocates exactly the
    // extension.
    const ROUNDS: u64 = 150;
    let mut over = Vec::new();
    for round in 0..ROUNDS {
        let first = request(&key);
        let (n, status) = allocations_of(|| call(&mut service, first));
        assert_eq!(status, StatusCode::OK);
        assert!(
            n >= expected,
            "layer + guard: {n} allocations, fewer than the extension map"
        );
        if n != expected {
            over.push(("layer + guard", round, n));
        }
        let second = request(&key);
        let (n, status) = allocations_of(|| call(&mut layer_only, second));
        assert_eq!(status, StatusCode::OK);
        assert!(
            n >= expected,
            "layer: {n} allocations, fewer than the extension map"
        );
        if n != expected {
            over.push(("layer", round, n));
        }
    }
    // 2 * ROUNDS answers from one front slot: at most this many refills.
    let refills = (2 * ROUNDS).div_ceil(FRONT_HITS_PER_FILL) as usize;
    assert!(
        over.len() <= refills,
        "only a front refill may allocate beyond the extension map ({expected}); \
         {} requests did (at most {refills} refills): {over:?}",
        over.len()
    );
}

/// The per-thread front's refill budget (`resolver::front::HITS_PER_FILL`, private).
const FRONT_HITS_PER_FILL: u64 = 256;

tower_api_keys::scopes! {
    /// What `/ledgers` requires.
    LedgersRead = all("ledgers:read");
    /// What the key does not hold.
    LedgersWrite = all("ledgers:write");
}

/// The one-layer way (the guard is the handler's extractor), through an axum `Router`: admitted
/// and refused, on the same cached key. (Also what memcheck runs in CI.)
#[tokio::test]
async fn a_router_with_the_extractor_guard() {
    use axum::routing::{get, post};
    use tower_api_keys::guard::Scoped;

    let (key, resolver) = tokio::task::spawn_blocking(cached_key).await.unwrap();
    let app = axum::Router::new()
        .route(
            "/ledgers",
            get(|auth: Scoped<LedgersRead>| async move { auth.key_id().to_string() })
                .post(|_: Scoped<LedgersWrite>| async { "created" }),
        )
        .route("/open", post(|| async { "open" }))
        .layer(ApiKeyLayer::new(resolver));
    let send = |method: http::Method| {
        Request::builder()
            .method(method)
            .uri("/ledgers")
            .header("x-api-key", key.expose_secret())
            .body(axum::body::Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        let response = app.clone().oneshot(send(http::Method::GET)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let response = app.clone().oneshot(send(http::Method::POST)).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
}

/// The most frequent of `counts` (a front refill or moka's housekeeping may add to one request in
/// 256; the rest allocate the same).
fn usual(mut counts: Vec<u64>) -> u64 {
    counts.sort_unstable();
    let mut best = (0, 0);
    for run in counts.chunk_by(|a, b| a == b) {
        if run.len() > best.1 {
            best = (run[0], run.len());
        }
    }
    best.0
}

/// Through an axum `Router`: with `.axum_body()` a cached `GET` allocates exactly what a layer that
/// only inserts a principal into the extensions allocates (axum's box for each layer and the
/// extension map are in both): the bodies are not reboxed. With `LiveBody` bodies (the mode for any
/// tower service) axum reboxes the request and the response body.
#[test]
fn through_axum_the_axum_body_mode_allocates_only_the_extension() {
    use axum::routing::get;
    use tower::util::MapRequestLayer;

    let (key, resolver) = cached_key();
    let route = || axum::Router::new().route("/ledgers", get(|| async { "ok" }));
    let principal = Principal::master();
    let mut routers = [
        route().layer(MapRequestLayer::new(
            move |mut request: Request<axum::body::Body>| {
                request.extensions_mut().insert(principal.clone());
                request
            },
        )),
        route().layer(ApiKeyLayer::new(resolver.clone()).axum_body()),
        route().layer(ApiKeyLayer::new(resolver)),
    ];
    let send = |router: &mut axum::Router| {
        let request = Request::get("/ledgers")
            .header("x-api-key", key.expose_secret())
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router
            .call(request)
            .now_or_never()
            .expect("in memory")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    };
    let mut counts = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..150 {
        for (router, counts) in routers.iter_mut().zip(&mut counts) {
            let (n, ()) = allocations_of(|| send(router));
            if round >= 20 {
                counts.push(n);
            }
        }
    }
    let [extension_only, axum_body, any_body] = counts.map(usual);
    eprintln!(
        "allocations per request through axum: principal only {extension_only}, \
         axum_body {axum_body}, any body {any_body}"
    );
    assert_eq!(
        axum_body, extension_only,
        "`.axum_body()` allocates only what holding the principal needs"
    );
    assert!(
        any_body > axum_body,
        "axum reboxes `LiveBody` bodies ({any_body} against {axum_body})"
    );
}
