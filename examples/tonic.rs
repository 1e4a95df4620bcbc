//! A gRPC service (tonic) protected by `tower-api-keys`, with the scopes each gRPC method needs.
//!
//! Run the server (the feature generates the protobuf code at build time with a vendored `protoc`,
//! so nothing needs installing):
//!
//! ```text
//! cargo run --example tonic --features grpc-example
//! ```
//!
//! It listens on `BIND` (default `127.0.0.1:50051`), uses the master key from `API_KEYS_MASTER_KEY`
//! (or generates one and prints it once), and prints two scoped keys of the account `acme`: a writer
//! (`ledgers:read ledgers:write`) and a reader (`ledgers:read`).
//!
//! The example is also its own client, so you need no `grpcurl` (run these in a second terminal; the
//! client reads the key from `API_KEY` and sends it as `x-api-key` metadata):
//!
//! ```text
//! API_KEY=<writer key> cargo run --example tonic --features grpc-example -- create "Main ledger"
//! #  -> Ledger { ledger_id: "ldg_1", name: "Main ledger", account: "acme", created_by: "key_..." }
//! API_KEY=<reader key> cargo run --example tonic --features grpc-example -- get ldg_1
//! API_KEY=<reader key> cargo run --example tonic --features grpc-example -- create "Nope"
//! #  -> PermissionDenied: AUTH_INSUFFICIENT_PERMISSIONS: API key lacks the required scopes
//! cargo run --example tonic --features grpc-example -- get ldg_1
//! #  -> Unauthenticated: AUTH_MISSING_API_KEY: API key is missing
//! ```
//!
//! `tests/grpc.rs` drives the same server with a tonic client and checks every refusal.
//!
//! How it fits together:
//! - [`ApiKeyLayer`] reads the key from `x-api-key` or `authorization: Bearer` metadata (gRPC
//!   metadata are HTTP/2 headers) and renders refusals with [`GrpcRejection`]: a trailers-only
//!   response carrying `grpc-status` (UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE) and a
//!   `grpc-message` that starts with the stable code, e.g. `AUTH_INVALID_API_KEY: ...`. Never an
//!   HTTP 401 with a JSON body, which gRPC clients would report as a confusing transport error.
//! - [`MethodScopesLayer`] (from the crate) picks the [`RequireScopesLayer`] guard of each gRPC method from
//!   the request path (`/ledger.v1.Ledgers/CreateLedger`); a method nobody declared needs `*:*`, so
//!   an RPC added to the proto without its scopes fails closed.
//! - Handlers read the [`Principal`] from the request extensions (tonic copies the HTTP request's
//!   extensions into `tonic::Request`) and use its account to scope data.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::Stream;
use futures_util::StreamExt;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;
use tower_api_keys::error::{AuthError, GrpcRejection};
use tower_api_keys::guard::{MethodScopesLayer, RequireScopesLayer};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::KeyManager;
use tower_api_keys::manage::{CreateKey, KeyInfo};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

/// The code generated from `proto/ledger.proto` by `build.rs`.
pub mod pb {
    tonic::include_proto!("ledger.v1");
}

use pb::ledgers_server::{Ledgers, LedgersServer};
use pb::{CreateLedgerRequest, GetLedgerRequest, ImportSummary, Ledger, WatchLedgersRequest};

/// The example's timeouts, in one place (the README's deployment notes list them).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A request body (a client stream included) that stalls this long between two frames fails.
    pub body: Duration,
    /// The deadline of a call until its response head (tonic's `Server::timeout`): a unary or
    /// client-streaming call past it ends `CANCELLED`. Server streams run on, until the client
    /// leaves or the key ends.
    pub request: Duration,
}

impl Timeouts {
    /// 10 s between two body frames, 30 s for a call.
    pub const DEFAULT: Self = Self {
        body: Duration::from_secs(10),
        request: Duration::from_secs(30),
    };
}

/// `/ledger.v1.Ledgers/GetLedger`: the request path of a gRPC method.
fn method_path(method: &str) -> String {
    format!("/{}/{method}", pb::ledgers_server::SERVICE_NAME)
}

/// The scopes each method of the service needs.
pub fn ledger_scopes() -> MethodScopesLayer<GrpcRejection> {
    MethodScopesLayer::new()
        .method(
            &method_path("GetLedger"),
            RequireScopesLayer::all(["ledgers:read"]),
        )
        .method(
            &method_path("CreateLedger"),
            RequireScopesLayer::all(["ledgers:write"]),
        )
        .method(
            &method_path("ImportLedgers"),
            RequireScopesLayer::all(["ledgers:write"]),
        )
        .method(
            &method_path("WatchLedgers"),
            RequireScopesLayer::all(["ledgers:read"]),
        )
        .rejection(GrpcRejection)
}

/// Authentication for gRPC: the key from `x-api-key` or `authorization: Bearer` metadata, refusals
/// as gRPC statuses.
pub fn api_key_layer(resolver: CachedResolver, master_key: ApiKey) -> ApiKeyLayer<GrpcRejection> {
    ApiKeyLayer::new(resolver)
        .sources([KeySource::x_api_key(), KeySource::bearer()])
        .master_key(master_key)
        .rejection(GrpcRejection)
}

/// Serves the ledger service on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    resolver: CachedResolver,
    master_key: ApiKey,
) -> Result<(), tonic::transport::Error> {
    serve_with(
        listener,
        resolver,
        master_key,
        LedgerService::default(),
        Timeouts::DEFAULT,
    )
    .await
}

/// [`serve`] with a given service and timeouts.
pub async fn serve_with(
    listener: TcpListener,
    resolver: CachedResolver,
    master_key: ApiKey,
    service: LedgerService,
    timeouts: Timeouts,
) -> Result<(), tonic::transport::Error> {
    // `ServiceBuilder`: the first layer is the outermost, so keys are checked before scopes.
    let auth = ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            timeouts.body,
        ))
        .layer(api_key_layer(resolver, master_key))
        .layer(ledger_scopes())
        .into_inner();
    Server::builder()
        .timeout(timeouts.request)
        .layer(auth)
        .add_service(LedgersServer::new(service))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
}

/// The service: ledgers in memory, each visible only to keys of the account that created it.
#[derive(Debug, Default, Clone)]
pub struct LedgerService {
    ledgers: std::sync::Arc<Mutex<HashMap<String, Ledger>>>,
    next_id: std::sync::Arc<AtomicU64>,
}

impl LedgerService {
    /// How many ledgers exist.
    pub fn len(&self) -> usize {
        self.ledgers.lock().expect("ledger map poisoned").len()
    }

    /// Whether no ledger exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates a ledger for `principal`.
    fn create(&self, principal: &Principal, name: String) -> Result<Ledger, tonic::Status> {
        if name.trim().is_empty() {
            return Err(tonic::Status::invalid_argument("a ledger needs a name"));
        }
        let ledger = Ledger {
            ledger_id: format!("ldg_{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1),
            name,
            account: principal.account().unwrap_or_default().to_owned(),
            // The master key is never stamped as creator.
            created_by: principal
                .provenance_id()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        };
        self.ledgers
            .lock()
            .expect("ledger map poisoned")
            .insert(ledger.ledger_id.clone(), ledger.clone());
        Ok(ledger)
    }
}

/// The principal [`ApiKeyLayer`] attached to the request.
fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        // Only if the layer is missing: a wiring bug, reported like the library does.
        .ok_or_else(|| {
            tonic::Status::unauthenticated("AUTH_MISSING_PRINCIPAL: ApiKeyLayer is not installed")
        })
}

#[tonic::async_trait]
impl Ledgers for LedgerService {
    async fn get_ledger(
        &self,
        request: tonic::Request<GetLedgerRequest>,
    ) -> Result<tonic::Response<Ledger>, tonic::Status> {
        let principal = principal(&request)?;
        let id = request.into_inner().ledger_id;
        let ledgers = self.ledgers.lock().expect("ledger map poisoned");
        match ledgers.get(&id) {
            // Another account's ledger answers NOT_FOUND too: no existence leak.
            Some(ledger)
                if principal.is_master() || principal.account() == Some(&ledger.account) =>
            {
                Ok(tonic::Response::new(ledger.clone()))
            }
            _ => Err(tonic::Status::not_found(format!("no ledger {id:?}"))),
        }
    }

    async fn create_ledger(
        &self,
        request: tonic::Request<CreateLedgerRequest>,
    ) -> Result<tonic::Response<Ledger>, tonic::Status> {
        let principal = principal(&request)?;
        let name = request.into_inner().name;
        Ok(tonic::Response::new(self.create(&principal, name)?))
    }

    async fn import_ledgers(
        &self,
        request: tonic::Request<tonic::Streaming<CreateLedgerRequest>>,
    ) -> Result<tonic::Response<ImportSummary>, tonic::Status> {
        let principal = principal(&request)?;
        let mut messages = request.into_inner();
        let mut created = 0;
        // A message that arrives after the key ended is never seen here: the stream fails, and
        // the layer answers UNAUTHENTICATED.
        while let Some(message) = messages.message().await? {
            self.create(&principal, message.name)?;
            created += 1;
        }
        Ok(tonic::Response::new(ImportSummary { created }))
    }

    type WatchLedgersStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<Ledger, tonic::Status>> + Send>>;

    async fn watch_ledgers(
        &self,
        request: tonic::Request<WatchLedgersRequest>,
    ) -> Result<tonic::Response<Self::WatchLedgersStream>, tonic::Status> {
        let principal = principal(&request)?;
        let interval = match request.into_inner().interval_ms {
            0 => Duration::from_secs(1),
            ms => Duration::from_millis(u64::from(ms)),
        };
        let visible: Vec<Ledger> = self
            .ledgers
            .lock()
            .expect("ledger map poisoned")
            .values()
            .filter(|ledger| principal.is_master() || principal.account() == Some(&ledger.account))
            .cloned()
            .collect();
        // Runs until the client leaves; the layer ends it with UNAUTHENTICATED once the key ends.
        let heartbeats = futures_util::stream::unfold(0u64, move |n| async move {
            tokio::time::sleep(interval).await;
            let beat = Ledger {
                ledger_id: format!("heartbeat_{n}"),
                ..Ledger::default()
            };
            Some((Ok(beat), n + 1))
        });
        let stream = futures_util::stream::iter(visible.into_iter().map(Ok)).chain(heartbeats);
        Ok(tonic::Response::new(Box::pin(stream)))
    }
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

fn bind_addr() -> SocketAddr {
    let addr = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    addr.parse()
        .unwrap_or_else(|e| panic!("BIND={addr:?} is not an address: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        return client(&args).await;
    }

    let resolver = CachedResolver::new(MemoryStore::new());
    let master = master_key();
    let writer = issue_key(&resolver, "acme", "ledgers:read ledgers:write").await?;
    let reader = issue_key(&resolver, "acme", "ledgers:read").await?;
    let listener = TcpListener::bind(bind_addr()).await?;
    println!("gRPC ledger service on http://{}", listener.local_addr()?);
    for ((key, record), what) in [(writer, "writer"), (reader, "reader")] {
        println!(
            "{what} key {} ({}, account acme):\n  {}",
            record.id,
            record.scopes,
            key.expose_secret()
        );
    }
    serve(listener, resolver, master).await?;
    Ok(())
}

/// `get <ledger id>` or `create <name>` against the server at `BIND`, with the key in `API_KEY`.
async fn client(args: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use pb::ledgers_client::LedgersClient;

    let mut client = LedgersClient::connect(format!("http://{}", bind_addr())).await?;
    let answer = match args {
        [command, id] if command == "get" => {
            let request = with_key(GetLedgerRequest {
                ledger_id: id.clone(),
            })?;
            client.get_ledger(request).await
        }
        [command, name] if command == "create" => {
            let request = with_key(CreateLedgerRequest { name: name.clone() })?;
            client.create_ledger(request).await
        }
        _ => return Err("usage: tonic [get <ledger id> | create <name>]".into()),
    };
    match answer {
        Ok(response) => println!("{:?}", response.into_inner()),
        Err(status) => println!("{:?}: {}", status.code(), status.message()),
    }
    Ok(())
}

/// A request carrying the key from `API_KEY` (if set) as `x-api-key` metadata.
fn with_key<T>(message: T) -> Result<tonic::Request<T>, Box<dyn std::error::Error + Send + Sync>> {
    let mut request = tonic::Request::new(message);
    if let Ok(key) = std::env::var("API_KEY") {
        request.metadata_mut().insert("x-api-key", key.parse()?);
    }
    Ok(request)
}
