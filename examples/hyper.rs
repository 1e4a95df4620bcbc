//! A plain hyper 1 server (no axum) protected by `tower-api-keys`: [`ApiKeyLayer`] around a
//! `tower::service_fn`, per-route scopes with [`RequireScopesLayer`], the [`Principal`] read from the
//! request extensions.
//!
//! ```text
//! cargo run --example hyper
//! ```
//!
//! It listens on `BIND` (default `127.0.0.1:5002`), uses the master key from `API_KEYS_MASTER_KEY`
//! (or generates one and prints it once), and prints a scoped key holding `ledgers:read` and
//! `ledgers:write`. Then, in a second terminal:
//!
//! ```text
//! KEY=<the printed key>
//! curl -i localhost:5002/whoami -H "X-Api-Key: $KEY"                       # 200, the principal
//! curl -i localhost:5002/ledgers -H "Authorization: Bearer $KEY" \
//!      -H 'content-type: application/json' -d '{"name": "Main ledger"}'   # 201
//! curl -i localhost:5002/ledgers -H "X-Api-Key: $KEY"                      # 200, the account's ledgers
//! curl -i -X DELETE localhost:5002/ledgers/ldg_1 -H "X-Api-Key: $KEY"      # 403 AUTH_INSUFFICIENT_PERMISSIONS
//! curl -i localhost:5002/ledgers                                           # 401 AUTH_MISSING_API_KEY
//! ```
//!
//! `tests/hyper_example.rs` runs the same requests with a hyper client.
//!
//! ## Why the response body is `Full<Bytes>`
//!
//! A tower stack answers with one response type, and refusals from the layer and the guards are
//! responses of the inner service's body type. [`JsonRejection`] can render into any body that is
//! `From<Bytes>`. hyper's request body, `Incoming`, is not (it can only come from a connection), so the
//! handlers answer with `http_body_util::Full<Bytes>`, which is `From<Bytes>`, and so are `String`,
//! `Vec<u8>` and `axum::body::Body`. The layer answers with a [`LiveBody`] around it, and hands the
//! handlers hyper's `Incoming` in a [`LiveBody`] (and a `TimeoutBody`): a request lives no longer
//! than its key, nor than its [`Timeouts`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_api_keys::error::{AuthError, JsonRejection, RenderRejection};
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, KeySource, LiveBody};
use tower_api_keys::manage::KeyManager;
use tower_api_keys::manage::{CreateKey, KeyInfo};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutBody, TimeoutLayer};

/// The example's timeouts, in one place (the README's deployment notes list them): a slow client
/// cannot hold a request open for long, whatever its key.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// How long a client may take to send a request head: a stalled head is cut (the connection
    /// closes) after this.
    pub head: Duration,
    /// How long a request body may stall between two frames: reading it then fails and the
    /// handler answers 400.
    pub body: Duration,
    /// The deadline of a whole request, until its response head: 408 past it.
    pub request: Duration,
}

impl Timeouts {
    /// 10 s for a head, 10 s between two body frames, 30 s for a whole request.
    pub const DEFAULT: Self = Self {
        head: Duration::from_secs(10),
        body: Duration::from_secs(10),
        request: Duration::from_secs(30),
    };
}

/// The request body the handlers read: hyper's, cut when it stalls ([`Timeouts::body`]) and when
/// the key ends ([`LiveBody`]).
pub type ReqBody = LiveBody<TimeoutBody<Incoming>>;

/// The body of every response, handlers' and refusals' alike (see the module docs).
pub type Body = Full<Bytes>;

/// The whole service: authentication, per-route scopes, handlers. `Clone`, as hyper wants one
/// service per connection.
pub fn app(
    resolver: CachedResolver,
    master_key: ApiKey,
    timeouts: Timeouts,
) -> impl Service<
    Request<Incoming>,
    Response = Response<LiveBody<Body>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let ledgers = Ledgers::default();
    // Each guarded route is its handler wrapped in a `RequireScopesLayer` layer. The guard reads the
    // principal `ApiKeyLayer` put in the extensions and answers 403 `AUTH_INSUFFICIENT_PERMISSIONS`
    // (with `details.required`) when a scope is missing, before the handler runs.
    let list =
        RequireScopesLayer::all(["ledgers:read"]).layer(handler(ledgers.clone(), list_ledgers));
    let create =
        RequireScopesLayer::all(["ledgers:write"]).layer(handler(ledgers.clone(), create_ledger));
    let delete =
        RequireScopesLayer::all(["ledgers:delete"]).layer(handler(ledgers.clone(), delete_ledger));

    let router = service_fn(move |req: Request<ReqBody>| {
        let route = match (req.method(), req.uri().path()) {
            (&Method::GET, "/whoami") => Route::Whoami,
            (&Method::GET, "/ledgers") => Route::List,
            (&Method::POST, "/ledgers") => Route::Create,
            (&Method::DELETE, path) if path.starts_with("/ledgers/") => Route::Delete,
            _ => Route::NotFound,
        };
        let (list, create, delete) = (list.clone(), create.clone(), delete.clone());
        async move {
            match route {
                Route::Whoami => Ok(whoami(&req)),
                Route::List => list.oneshot(req).await,
                Route::Create => create.oneshot(req).await,
                Route::Delete => delete.oneshot(req).await,
                Route::NotFound => Ok(json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "not found"}),
                )),
            }
        }
    });

    // The layer wraps every route: a request without a valid key never reaches the router (so an
    // unknown path answers 401 to a caller without a key, and 404 only to an authenticated one).
    ServiceBuilder::new()
        // The examples' timeouts, in one place (see the constants above and the README).
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeouts.request,
        ))
        .layer(RequestBodyTimeoutLayer::new(timeouts.body))
        .layer(
            ApiKeyLayer::new(resolver)
                .sources([KeySource::x_api_key(), KeySource::bearer()])
                .master_key(master_key),
        )
        .service(router)
}

/// Accepts HTTP/1 connections on `listener` and serves each with `app`, until the task is dropped;
/// a request head that takes longer than `timeouts.head` closes its connection.
pub async fn serve<S>(listener: TcpListener, app: S, timeouts: Timeouts) -> std::io::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<LiveBody<Body>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // A timer, so that a request head that stalls is cut after `HEAD_TIMEOUT`.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.head)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                eprintln!("connection error: {error}");
            }
        });
    }
}

enum Route {
    Whoami,
    List,
    Create,
    Delete,
    NotFound,
}

/// A ledger, kept in the account of the key that created it.
#[derive(Clone, Debug, Serialize)]
pub struct Ledger {
    pub ledger_id: String,
    pub name: String,
    /// `None` when the master key created it.
    pub account: Option<String>,
    /// The key id of the creator; `None` for the master key, which is never stamped.
    pub created_by: Option<String>,
}

#[derive(Clone, Default)]
struct Ledgers {
    inner: Arc<Mutex<Vec<Ledger>>>,
    next_id: Arc<AtomicU64>,
}

/// A `service_fn` calling `f(ledgers, request)`.
fn handler<F, Fut>(
    ledgers: Ledgers,
    f: F,
) -> impl Service<Request<ReqBody>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static
where
    F: Fn(Ledgers, Request<ReqBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    service_fn(move |req| {
        let response = f(ledgers.clone(), req);
        async move { Ok(response.await) }
    })
}

/// What a handler answers if no principal is in the extensions: only possible if `ApiKeyLayer` is
/// not in front of it, a wiring bug, answered as the library does (401 `AUTH_MISSING_PRINCIPAL`).
fn missing_principal() -> Response<Body> {
    JsonRejection::new().render(&AuthError::MissingPrincipal)
}

fn whoami(req: &Request<ReqBody>) -> Response<Body> {
    // The layer put the authenticated principal in the request extensions.
    let Some(principal) = req.extensions().get::<Principal>() else {
        return missing_principal();
    };
    json_response(
        StatusCode::OK,
        &json!({
            "key_id": principal.key_id(),
            "name": principal.name(),
            "kind": principal.kind().as_str(),
            "owner": principal.owner(),
            "account": principal.account(),
            "scopes": principal.scopes(),
        }),
    )
}

/// The ledgers the caller's account may see (all of them for the master key).
fn visible(principal: &Principal, ledger: &Ledger) -> bool {
    principal.is_master() || ledger.account.as_deref() == principal.account()
}

async fn list_ledgers(ledgers: Ledgers, req: Request<ReqBody>) -> Response<Body> {
    let Some(principal) = req.extensions().get::<Principal>() else {
        return missing_principal();
    };
    let list: Vec<Ledger> = ledgers
        .inner
        .lock()
        .expect("ledgers poisoned")
        .iter()
        .filter(|ledger| visible(principal, ledger))
        .cloned()
        .collect();
    json_response(StatusCode::OK, &json!({ "ledgers": list }))
}

#[derive(Deserialize)]
struct CreateLedger {
    name: String,
}

async fn create_ledger(ledgers: Ledgers, req: Request<ReqBody>) -> Response<Body> {
    // Cloned (one `Arc`) because reading the body consumes the request.
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return missing_principal();
    };
    let bad_request = |message: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("invalid body: {message}")}),
        )
    };
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return bad_request(&error.to_string()),
    };
    let create: CreateLedger = match serde_json::from_slice(&body) {
        Ok(create) => create,
        Err(error) => return bad_request(&error.to_string()),
    };
    let ledger = Ledger {
        ledger_id: format!(
            "ldg_{}",
            ledgers.next_id.fetch_add(1, Ordering::Relaxed) + 1
        ),
        name: create.name,
        account: principal.account().map(str::to_owned),
        created_by: principal.provenance_id().map(|id| id.to_string()),
    };
    ledgers
        .inner
        .lock()
        .expect("ledgers poisoned")
        .push(ledger.clone());
    json_response(StatusCode::CREATED, &ledger)
}

async fn delete_ledger(ledgers: Ledgers, req: Request<ReqBody>) -> Response<Body> {
    let Some(principal) = req.extensions().get::<Principal>() else {
        return missing_principal();
    };
    let id = req.uri().path().trim_start_matches("/ledgers/");
    let mut ledgers = ledgers.inner.lock().expect("ledgers poisoned");
    match ledgers
        .iter()
        .position(|ledger| ledger.ledger_id == id && visible(principal, ledger))
    {
        Some(index) => {
            ledgers.remove(index);
            json_response(StatusCode::OK, &json!({ "deleted": id }))
        }
        None => json_response(StatusCode::NOT_FOUND, &json!({"error": "no such ledger"})),
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(body).expect("serialisable");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

// --- Start-up ------------------------------------------------------------------------------------

/// Creates a key of `account` holding `scopes` (e.g. `"ledgers:read ledgers:write"`) with the
/// master key's authority, and returns its plaintext (shown this once) and its metadata. A real
/// service keeps one [`KeyManager`] and exposes its router (feature `manage`) instead.
pub async fn issue_key(
    resolver: &CachedResolver,
    account: &str,
    scopes: &str,
) -> Result<(ApiKey, KeyInfo), AuthError> {
    let manager = KeyManager::new(resolver.clone());
    let request = CreateKey::new(scopes.split_whitespace())
        .name(format!("{account} example key"))
        .owner("examples")
        .account(account);
    let created = manager.create(&Principal::master(), request).await?;
    Ok((created.key, created.info))
}

/// The master key from `API_KEYS_MASTER_KEY`, or a fresh one printed once with a warning.
fn master_key() -> ApiKey {
    match std::env::var("API_KEYS_MASTER_KEY") {
        Ok(key) if !key.is_empty() => ApiKey::new(key),
        _ => {
            let key = KeyFormat::new("mk").expect("valid prefix").generate();
            eprintln!(
                "warning: API_KEYS_MASTER_KEY is not set; this run's master key (full access) is:\n  {}",
                key.expose_secret()
            );
            key
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:5002".to_owned());
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("BIND={addr:?} is not an address: {e}"))?;

    let resolver = CachedResolver::new(MemoryStore::new());
    let master = master_key();
    let (key, record) = issue_key(&resolver, "acme", "ledgers:read ledgers:write").await?;

    let listener = TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    println!(
        "scoped key {} (ledgers:read ledgers:write, account acme):\n  {}",
        record.id,
        key.expose_secret()
    );
    serve(
        listener,
        app(resolver, master, Timeouts::DEFAULT),
        Timeouts::DEFAULT,
    )
    .await?;
    Ok(())
}
