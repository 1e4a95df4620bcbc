//! The main job: a small ledger-style API protected by scoped API keys, on an embedded SQLite store.
//!
//! ```sh
//! cargo run --example server
//! cargo run --example server --features metrics   # also serve /metrics (Prometheus)
//! ```
//!
//! Configuration (environment, see `config.rs`):
//! - `API_KEYS_MASTER_KEY`: the master key; if unset, one is generated and printed once (not persisted).
//! - `API_KEYS_PUBLIC_CHECKSUM=1`: issue keys with the public CRC32 checksum instead of the keyed tag
//!   (whose secret the key store creates on first start).
//! - `BIND`: listen address (default `127.0.0.1:5001`).
//! - `DATABASE_URL`: `sqlite://path.db` (default `sqlite://tower-api-keys-demo.db`) or, with feature
//!   `postgres`, a `postgres://` URL (revocations then reach every instance through LISTEN/NOTIFY).
//! - `REDIS_URL`: with feature `redis`, broadcast revocations over Redis pub/sub instead.
//! - `API_KEYS_INSTANCE`, `API_KEYS_CHANNEL`, `API_KEYS_SCHEMA`: a fleet's settings (`config.rs`).
//! - `RUST_LOG`: log filter (default `info,sqlx=warn`); one line per request, with the caller's
//!   `api_key_id` (never the key).
//!
//! Routes: `/ledgers`, `/balances`, `/transactions` (POST create, GET list, GET `/{id}`), scoped by
//! method (`ledgers:read` / `ledgers:write`, ...); key management at `/api-keys`. Unauthenticated:
//! `/health`, `/openapi.json` (the whole API), the key console at `/console` (a web page; it asks
//! for a key itself) and, with feature `metrics`, `/metrics`. Records are JSON objects nested at
//! most [`MAX_RECORD_DEPTH`] (64) levels deep; those created with a scoped key carry
//! `meta_data.BLNK_GENERATED_BY` and belong to its owner *and* account: a scoped key sees the
//! records of its own owner's account only, the master key all of them (the handlers in
//! `records.rs` scope every query by `principal.owner()` and `principal.account()`). `/ping` (no
//! key) and `/auth/ping` (scope `ledgers:read`) run the same trivial handler outside and behind the
//! key layer, so that `scripts/load.sh` can measure what authentication costs.
//!
//! **Every route that takes a key goes through the rate limiter** (a key's `rate_limit` and
//! `credits`, and its ancestors'): the records, `/auth/ping` and key management. Each request costs
//! 1 unit of rate limit and 1 credit. On record routes and `/auth/ping` the scope guard runs first,
//! so a request refused for its scope costs nothing; key management checks what a caller may do in
//! its handlers, after the limiter, so every management call a scoped key makes costs 1, allowed
//! or not (`GET /api-keys` included). The master key is not limited. At start-up the server logs
//! what each limit backend does when it fails (rate limits on Redis fail open, credits in the key
//! store fail closed).
//!
//! The server is served with connect info, so keys created with `allowed_networks` are judged by
//! the peer address. Behind a reverse proxy, add `.trusted_proxies(...)` to the `ApiKeyLayer` in
//! [`build`], naming the proxy's addresses, so `X-Forwarded-For` names the client.
//!
//! This file is the wiring to copy. Beside it: `records.rs` (the demo's records and their handlers),
//! `openapi.rs` (the `/openapi.json` document), `prometheus.rs` (`/metrics`), `console.rs` (the
//! console's declared scopes) and `config.rs` (the
//! environment, the database, revocation broadcast). [`build`] assembles everything from a
//! [`Config`] without binding a port (`tests/walkthrough.rs` uses it); `main` adds the environment,
//! the listener and graceful shutdown.

mod config;
mod console;
mod openapi;
#[cfg(feature = "metrics")]
mod prometheus;
mod records;
pub(crate) mod timeouts;

use std::time::Duration;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::response::Redirect;
use axum::routing::get;
use axum::{Json, Router};
use tower::ServiceBuilder;
use tower_api_keys::error::JsonRejection;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, AxumBody, KeySource};
use tower_api_keys::manage::{self, KeyManager, KeyPolicy};
use tower_api_keys::provenance::ProvenanceLayer;
use tower_api_keys::ratelimit::{FailMode, MemoryRates, RateLimiter, StoreCredits};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::Retention;
use tower_api_keys::usage::UsageRecorder;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub(crate) use config::Config;
use config::Database;
use records::{Records, Resource};
use timeouts::Timeouts;

/// The demo's resources: (record kind, path and scope resource).
const RESOURCES: [(&str, &str); 3] = [
    ("ledger", "ledgers"),
    ("balance", "balances"),
    ("transaction", "transactions"),
];

/// Largest record body a client may send: 256 KiB (`ProvenanceLayer` refuses a larger one from a scoped
/// key before the handler runs). The handler's own limit is 1 KiB higher: room for the stamp.
const MAX_RECORD_BYTES: usize = 256 * 1024;

/// Deepest nesting of a record body: 64 levels of objects and arrays (the top-level object is
/// level 1). A deeper body is refused with 400 `RECORD_TOO_DEEP` before it is stored, so every
/// stored record stays readable by common JSON parsers (serde_json stops at 128 levels).
pub(crate) const MAX_RECORD_DEPTH: usize = 64;

/// When the rate-limit backend (Redis) fails: admit (the crate's default), so an outage of the
/// limiter does not take the API down.
const RATE_FAILURE: FailMode = FailMode::Open;
/// When the credit backend (the key store) fails: refuse with 503, so credits are never overspent.
const CREDIT_FAILURE: FailMode = FailMode::Closed;

/// One resource: create, list, get, scoped by HTTP method, stamped with provenance on create.
fn resource(kind: &'static str, plural: &str, records: Records, limiter: &RateLimiter) -> Router {
    Router::new()
        .route(
            &format!("/{plural}"),
            get(records::list).post(records::create),
        )
        .route(&format!("/{plural}/{{id}}"), get(records::get_one))
        // In order: the scope is checked before the body is read, and a key's rate limit and
        // credits (`rate_limit`, `credits` on `POST /api-keys`) between the two: a request refused
        // for its scope costs nothing. One `route_layer` for the three (axum boxes each
        // `route_layer` per route and request: composed, they cost one box).
        .route_layer(
            ServiceBuilder::new()
                .layer(RequireScopesLayer::by_method(plural))
                .layer(limiter.layer())
                .layer(ProvenanceLayer::new().max_body_bytes(MAX_RECORD_BYTES)),
        )
        // The handler reads master-key bodies, which `ProvenanceLayer` passes through unread, and
        // stamped ones, which the stamp (under 100 bytes) has made longer than the client sent.
        .layer(DefaultBodyLimit::max(MAX_RECORD_BYTES + 1024))
        .with_state(Resource { kind, records })
}

/// The whole service: the three resources and key management behind [`ApiKeyLayer`]; `/health`,
/// `/openapi.json` (and `/metrics`) outside it; every request logged by `TraceLayer`.
fn app(
    layer: ApiKeyLayer<JsonRejection, AxumBody>,
    manager: KeyManager,
    records: Records,
    limiter: RateLimiter,
    unauthenticated: Router,
) -> Router {
    let openapi = openapi::openapi();
    let mut router = Router::new();
    for (kind, plural) in RESOURCES {
        router = router.merge(resource(kind, plural, records.clone(), &limiter));
    }
    let router = router
        // Key management costs like any other request (see the module docs).
        .merge(manage::router(manager).route_layer(limiter.layer()))
        // More routers that need a key merge here, before the layer, each with the limiter.
        .route(
            "/auth/ping",
            // The scope first, then the limiter (a request refused for its scope costs nothing):
            // composed, one axum box.
            get(ping).route_layer(
                ServiceBuilder::new()
                    .layer(RequireScopesLayer::all(["ledgers:read"]))
                    .layer(limiter.layer()),
            ),
        )
        .layer(layer)
        // Added after the authentication layer: no key needed (the leak-report receiver: a
        // scanner's signature is its credential).
        .merge(unauthenticated)
        .nest("/console", console::console().router())
        // `/console/` is the console too (axum's nest matches `/console` only).
        .route(
            "/console/",
            get(|| async { Redirect::permanent("/console") }),
        )
        .route("/ping", get(ping))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/openapi.json",
            get(move || async move { Json(openapi.clone()) }),
        );
    #[cfg(feature = "metrics")]
    let router = router.route("/metrics", get(prometheus::render));
    Timeouts::DEFAULT.apply(
        router,
        TraceLayer::new_for_http()
            .make_span_with(request_span)
            .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
    )
}

/// Says at start-up what each limit backend does when it fails, so an operator knows before an
/// outage whether limits would be skipped or requests refused. (The Redis URL is not logged: it
/// may hold a password.)
fn log_limit_backends(rates_backend: &str) {
    let what = |mode: FailMode| match mode {
        FailMode::Open => "fail OPEN: requests are admitted without the check",
        FailMode::Closed => "fail CLOSED: requests are refused with 503 AUTH_UNAVAILABLE",
    };
    match rates_backend {
        "memory" => tracing::info!(
            backend = "memory",
            "rate limits: in this process only (each instance counts alone); cannot fail"
        ),
        backend => tracing::warn!(
            backend,
            "rate limits: if {backend} is unreachable, rate limits {}",
            what(RATE_FAILURE)
        ),
    }
    tracing::info!(
        backend = "key store",
        "credits: if the key store is unreachable, credits {}",
        what(CREDIT_FAILURE)
    );
}

/// `/ping` and `/auth/ping`: the same work with and without authentication (`scripts/load.sh`).
async fn ping() -> &'static str {
    "pong"
}

/// The span of every request log line. `ApiKeyLayer` fills `api_key_id` with the caller's key id
/// (never the key). Only the path is logged: a query string could carry secrets.
fn request_span(request: &Request<Body>) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        api_key_id = tracing::field::Empty,
    )
}

/// A ready service: serve `router`, flush `usage` on shutdown.
pub(crate) struct Demo {
    pub(crate) router: Router,
    /// The master key in force (configured or generated).
    pub(crate) master: ApiKey,
    pub(crate) usage: UsageRecorder,
    /// Broadcast subscriptions, alive as long as the service.
    pub(crate) _subscriptions: config::Subscriptions,
}

/// `POST /api-keys/leaks` when `LEAK_REPORT_PUBLIC_KEYS` names a file of scanners' public keys
/// (GitHub's JSON shape), with the default policy: leaked keys are revoked with their descendants.
fn leak_reports(
    keys: Option<&std::path::Path>,
    manager: &KeyManager,
) -> Result<Router, Box<dyn std::error::Error>> {
    let Some(path) = keys else {
        return Ok(Router::new());
    };
    #[cfg(feature = "leaks")]
    {
        use tower_api_keys::leaks::{self, LeakReceiver, PublicKeys, Scanner};
        let keys = PublicKeys::from_json(&std::fs::read(path)?)?;
        tracing::info!(keys = keys.len(), path = %path.display(), "receiving leak reports at POST /api-keys/leaks");
        let receiver = LeakReceiver::builder(manager.clone())
            .keys(Scanner::GitHub, keys.clone())
            .keys(Scanner::DepsDev, keys)
            .build();
        Ok(leaks::router(receiver))
    }
    #[cfg(not(feature = "leaks"))]
    {
        let _ = manager;
        Err(format!(
            "LEAK_REPORT_PUBLIC_KEYS is set ({}) but the example was built without feature `leaks`",
            path.display()
        )
        .into())
    }
}

/// Connects the store, wires resolver, key manager, invalidation and the layer, and builds the router.
/// Binds no port and reads no environment but the optional fleet settings (`config.rs`). Webhook
/// URLs must be `https` to public addresses.
#[allow(dead_code)] // `main` calls `build_with`; the tests that include this file call this
pub(crate) async fn build(config: Config) -> Result<Demo, Box<dyn std::error::Error>> {
    build_with(config, false).await
}

/// [`build`], allowing webhook URLs on private addresses and over plain `http` when
/// `webhooks_allow_private` (`WEBHOOKS_ALLOW_PRIVATE=1`).
pub(crate) async fn build_with(
    config: Config,
    webhooks_allow_private: bool,
) -> Result<Demo, Box<dyn std::error::Error>> {
    let master = match config.master_key {
        Some(key) => key,
        None => KeyFormat::new("sk_master")?.generate(),
    };
    let database = Database::connect(&config.database_url).await?;

    // Keyed: the tag's secret is created in the key store on first start, found there by every instance.
    let format = match config.public_checksum {
        true => KeyFormat::new("sk_live")?,
        false => {
            KeyFormat::keyed("sk_live")
                .load_secret_from(&*database.keys)
                .await?
        }
    };
    let resolver = CachedResolver::builder(database.keys.clone())
        .format(format)
        .time_to_live(Duration::from_secs(60))
        .build();
    let manager = KeyManager::new(resolver.clone()).policy(
        KeyPolicy::default()
            .max_active_per_owner(config.max_active_per_owner.unwrap_or(10))
            .max_lifetime(Duration::from_secs(365 * 86_400)),
    );
    let (manager, mut subscriptions) =
        database.broadcast(config.redis_url.as_deref(), &resolver, manager)?;
    // Signed webhooks for every key event (`/api-keys/webhooks`), delivered from the store's
    // outbox by a deliverer on every instance (each delivery goes out once, whoever claims it).
    #[cfg(feature = "webhooks")]
    let manager = {
        use tower_api_keys::webhooks::UrlPolicy;
        let urls = UrlPolicy::new()
            .allow_private(webhooks_allow_private)
            .allow_http(webhooks_allow_private);
        let webhooks = database.webhooks.clone().urls(urls);
        subscriptions.push(Box::new(webhooks.deliverer().spawn(Duration::from_secs(1))));
        manager.webhooks(webhooks)
    };
    #[cfg(not(feature = "webhooks"))]
    let _ = (webhooks_allow_private, &mut subscriptions);
    let unauthenticated = leak_reports(config.leak_report_public_keys.as_deref(), &manager)?;

    let usage = UsageRecorder::spawn(database.keys.clone(), Duration::from_secs(30));
    // Audit events and usage counts are kept 90 days, purged hourly (the chains stay checkable).
    Retention::default().spawn(database.keys.clone());
    let layer = ApiKeyLayer::new(resolver)
        .sources([
            KeySource::blnk(),
            KeySource::x_api_key(),
            KeySource::bearer(),
            KeySource::blecon(),
        ])
        .master_key(master.clone())
        .usage(usage.clone())
        .axum_body();

    // Rate limits in memory (one instance), or on Redis when `REDIS_URL` is set (a fleet);
    // credits are counted in the key store either way, exact across instances.
    let credits = StoreCredits::new(database.keys.clone());
    let (limiter, rates_backend) = match config.redis_url.as_deref() {
        #[cfg(feature = "redis")]
        Some(url) => (
            RateLimiter::new(
                tower_api_keys::ratelimit::RedisRates::open(url)?.prefix("demo:rl"),
                credits,
            ),
            "Redis",
        ),
        _ => (RateLimiter::new(MemoryRates::new(), credits), "memory"),
    };
    let limiter = limiter
        .on_rate_error(RATE_FAILURE)
        .on_credit_error(CREDIT_FAILURE);
    log_limit_backends(rates_backend);

    #[cfg(feature = "metrics")]
    prometheus::install();
    Ok(Demo {
        router: app(layer, manager, database.records, limiter, unauthenticated),
        master,
        usage,
        _subscriptions: subscriptions,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    let config = Config::from_env();
    let generated = config.master_key.is_none();
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:5001".into());
    let demo = build_with(config, config::webhooks_allow_private_from_env()).await?;
    if generated {
        eprintln!(
            "WARNING: API_KEYS_MASTER_KEY is not set; generated a master key for this run only (not persisted):\n\n    {}\n",
            demo.master.expose_secret()
        );
    }

    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    // With the peer address in each request (axum's `ConnectInfo`): `ApiKeyLayer` judges
    // `allowed_networks` by it.
    timeouts::serve(
        listener,
        demo.router,
        Timeouts::DEFAULT,
        config::shutdown_signal(),
    )
    .await?;
    let flushed = demo.usage.flush().await?;
    tracing::info!(keys = flushed, "usage flushed; bye");
    Ok(())
}
