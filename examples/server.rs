//! The main job: a small ledger-style API protected by scoped API keys, on an embedded SQLite store.
//!
//! ```sh
//! cargo run --example server
//! cargo run --example server --features metrics   # also serve /metrics (Prometheus)
//! ```
//!
//! Configuration (environment):
//! - `API_KEYS_MASTER_KEY`: the master key; if unset, one is generated and printed once (not persisted).
//! - `BIND`: listen address (default `127.0.0.1:5001`).
//! - `DATABASE_URL`: `sqlite://path.db` (default `sqlite://tower-api-keys-demo.db`) or, with feature
//!   `postgres`, a `postgres://` URL (revocations then reach every instance through LISTEN/NOTIFY).
//! - `REDIS_URL`: with feature `redis`, broadcast revocations over Redis pub/sub instead.
//! - `RUST_LOG`: log filter (default `info,sqlx=warn`); one line per request, with the caller's
//!   `api_key_id` (never the key).
//!
//! Routes: `/ledgers`, `/balances`, `/transactions` (POST create, GET list, GET `/{id}`), scoped by
//! method (`ledgers:read` / `ledgers:write`, ...); key management at `/api-keys`. Unauthenticated:
//! `/health`, `/openapi.json` (the whole API) and, with feature `metrics`, `/metrics`. Records created
//! with a scoped key carry `meta_data.BLNK_GENERATED_BY`. `/ping` (no key) and `/auth/ping` (scope
//! `ledgers:read`) run the same trivial handler outside and behind the key layer, so that
//! `scripts/load.sh` can measure what authentication costs.
//!
//! [`build`] assembles everything from a [`Config`] without binding a port (`tests/walkthrough.rs`
//! uses it); `main` adds the environment, the listener and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_api_keys::error::AuthError;
use tower_api_keys::guard::RequireScopes;
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{self, KeyManager, KeyPolicy};
use tower_api_keys::principal::Principal;
use tower_api_keys::provenance::Provenance;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, SqliteStore};
use tower_api_keys::usage::UsageRecorder;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// Where the demo keeps its ledgers, balances and transactions: the same database as the keys.
#[derive(Clone)]
enum Records {
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

#[derive(Debug)]
struct Record {
    id: String,
    body: String,
    created_at: String,
}

impl Records {
    async fn migrate(&self) -> Result<(), sqlx::Error> {
        const DDL: &str = "CREATE TABLE IF NOT EXISTS demo_records (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, created_at TEXT NOT NULL)";
        match self {
            Self::Sqlite(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
        }
    }

    async fn insert(&self, kind: &str, record: &Record) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query(
                "INSERT INTO demo_records (id, kind, body, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(&record.id)
            .bind(kind)
            .bind(&record.body)
            .bind(&record.created_at)
            .execute(pool)
            .await
            .map(drop),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => sqlx::query(
                "INSERT INTO demo_records (id, kind, body, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&record.id)
            .bind(kind)
            .bind(&record.body)
            .bind(&record.created_at)
            .execute(pool)
            .await
            .map(drop),
        }
    }

    async fn list(&self, kind: &str, id: Option<&str>) -> Result<Vec<Record>, sqlx::Error> {
        use sqlx::Row;
        macro_rules! fetch {
            ($pool:expr, $by_kind:literal, $by_id:literal) => {{
                let rows = match id {
                    Some(id) => {
                        sqlx::query($by_id)
                            .bind(kind)
                            .bind(id)
                            .fetch_all($pool)
                            .await?
                    }
                    None => sqlx::query($by_kind).bind(kind).fetch_all($pool).await?,
                };
                rows.iter()
                    .map(|row| {
                        Ok(Record {
                            id: row.try_get("id")?,
                            body: row.try_get("body")?,
                            created_at: row.try_get("created_at")?,
                        })
                    })
                    .collect()
            }};
        }
        match self {
            Self::Sqlite(pool) => fetch!(
                pool,
                "SELECT id, body, created_at FROM demo_records WHERE kind = ? ORDER BY id DESC LIMIT 100",
                "SELECT id, body, created_at FROM demo_records WHERE kind = ? AND id = ?"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => fetch!(
                pool,
                "SELECT id, body, created_at FROM demo_records WHERE kind = $1 ORDER BY id DESC LIMIT 100",
                "SELECT id, body, created_at FROM demo_records WHERE kind = $1 AND id = $2"
            ),
        }
    }
}

impl Record {
    /// The stored JSON object with `<kind>_id` and `created_at` put in front; every byte the client
    /// sent (numbers, key order, the provenance stamp) is kept as received.
    fn to_json(&self, kind: &str) -> String {
        let rest = self
            .body
            .trim_start()
            .strip_prefix('{')
            .unwrap_or("}")
            .trim_start();
        let separator = if rest.starts_with('}') { "" } else { "," };
        format!(
            r#"{{"{kind}_id":"{}","created_at":"{}"{separator}{rest}"#,
            self.id, self.created_at
        )
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A demo error in the crate's body shape (`{"error", "error_detail": {"code", "message"}}`), for
/// refusals that are not the key layer's.
fn demo_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "error": message,
        "error_detail": {"code": code, "message": message},
    });
    json_response(status, body.to_string())
}

fn storage_error(error: sqlx::Error) -> AuthError {
    tracing::error!(%error, "demo record storage failed");
    AuthError::Unavailable(tower_api_keys::store::StoreError::unavailable(error))
}

/// Largest record body a client may send: 256 KiB (`Provenance` refuses a larger one from a scoped
/// key before the handler runs). The handler's own limit is 1 KiB higher: room for the stamp.
const MAX_RECORD_BYTES: usize = 256 * 1024;

/// One resource: create, list, get, scoped by HTTP method, stamped with provenance on create.
fn resource(kind: &'static str, plural: &'static str, records: Records) -> Router {
    let create = move |State(records): State<Records>,
                       principal: Principal,
                       body: Result<Bytes, BytesRejection>| async move {
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AuthError::PayloadTooLarge {
                    limit: MAX_RECORD_BYTES,
                }
            } else {
                AuthError::invalid("unreadable request body")
            }
        })?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| AuthError::invalid("body must be UTF-8 JSON"))?;
        let value: &serde_json::value::RawValue = serde_json::from_str(text)
            .map_err(|e| AuthError::invalid(format!("invalid JSON body: {e}")))?;
        if !value.get().starts_with('{') {
            return Err(AuthError::invalid("body must be a JSON object"));
        }
        // The same rule for every caller: `Provenance` refuses a non-object `meta_data` from scoped
        // keys, and the master key's requests (which it does not stamp) must not slip past it.
        #[derive(serde::Deserialize)]
        struct Metadata<'a> {
            #[serde(borrow, default)]
            meta_data: Option<&'a serde_json::value::RawValue>,
        }
        let metadata: Metadata<'_> = serde_json::from_str(text)
            .map_err(|e| AuthError::invalid(format!("invalid JSON body: {e}")))?;
        if metadata
            .meta_data
            .is_some_and(|m| !m.get().starts_with('{'))
        {
            return Err(AuthError::InvalidMetadata(
                "meta_data must be a JSON object".into(),
            ));
        }
        let record = Record {
            id: format!(
                "{kind}_{}",
                KeyId::generate()
                    .as_str()
                    .trim_start_matches("key_")
                    .to_lowercase()
            ),
            body: value.get().to_owned(),
            created_at: OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_default(),
        };
        records.insert(kind, &record).await.map_err(storage_error)?;
        tracing::info!(record = %record.id, by = %principal.key_id(), "created");
        Ok::<_, AuthError>(json_response(StatusCode::CREATED, record.to_json(kind)))
    };
    let list = move |State(records): State<Records>| async move {
        let all = records.list(kind, None).await.map_err(storage_error)?;
        let items: Vec<String> = all.iter().map(|r| r.to_json(kind)).collect();
        Ok::<_, AuthError>(json_response(
            StatusCode::OK,
            format!("[{}]", items.join(",")),
        ))
    };
    let get_one = move |State(records): State<Records>, Path(id): Path<String>| async move {
        let found = records.list(kind, Some(&id)).await.map_err(storage_error)?;
        match found.first() {
            Some(record) => Ok(json_response(StatusCode::OK, record.to_json(kind))),
            None => Ok::<_, AuthError>(demo_error(
                StatusCode::NOT_FOUND,
                "RECORD_NOT_FOUND",
                format!("{kind} not found"),
            )),
        }
    };
    Router::new()
        .route(&format!("/{plural}"), get(list).post(create))
        .route(&format!("/{plural}/{{id}}"), get(get_one))
        .route_layer(Provenance::new().max_body_bytes(MAX_RECORD_BYTES))
        .route_layer(RequireScopes::by_method(plural))
        // The handler reads master-key bodies, which `Provenance` passes through unread, and
        // stamped ones, which the stamp (under 100 bytes) has made longer than the client sent.
        .layer(DefaultBodyLimit::max(MAX_RECORD_BYTES + 1024))
        .with_state(records)
}

/// The whole service: the three resources and key management behind [`ApiKeyLayer`]; `/health`,
/// `/openapi.json` (and `/metrics`) outside it; every request logged by `TraceLayer`.
fn app(layer: ApiKeyLayer, manager: KeyManager, records: Records) -> Router {
    let openapi = openapi();
    let router = Router::new()
        .merge(resource("ledger", "ledgers", records.clone()))
        .merge(resource("balance", "balances", records.clone()))
        .merge(resource("transaction", "transactions", records))
        .merge(manage::router(manager))
        .route(
            "/auth/ping",
            get(ping).route_layer(RequireScopes::all(["ledgers:read"])),
        )
        .layer(layer)
        // Added after the authentication layer: no key needed.
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
    router.layer(
        TraceLayer::new_for_http()
            .make_span_with(request_span)
            .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
    )
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

/// `/metrics` in the Prometheus text format, from the crate's `api_key_requests_total` and
/// `api_key_lookup_seconds` (feature `metrics`).
#[cfg(feature = "metrics")]
mod prometheus {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    /// The process-wide recorder, installed on first use (no HTTP listener of its own: we serve it).
    fn handle() -> &'static PrometheusHandle {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        HANDLE.get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(tower_api_keys::metrics::LOOKUP_SECONDS.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ],
                )
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            tower_api_keys::metrics::describe();
            handle
        })
    }

    /// Installs the recorder (call before serving, so that the first requests are counted).
    pub(crate) fn install() {
        handle();
    }

    pub(crate) async fn render() -> impl axum::response::IntoResponse {
        let handle = handle();
        handle.run_upkeep();
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
    }
}

/// The OpenAPI document of the whole service: key management (from [`manage::openapi`], with its
/// security schemes) plus the ledger, balance and transaction endpoints.
fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::schema::{
        AdditionalProperties, KnownFormat, Object, ObjectBuilder, SchemaFormat, Type,
    };
    use utoipa::openapi::{ArrayBuilder, ContentBuilder, Ref, Required, ResponseBuilder};

    /// A ledger, balance or transaction: any JSON object; the server adds `<kind>_id` and
    /// `created_at`, and keeps every other byte (numbers, key order) as sent.
    #[derive(utoipa::ToSchema)]
    #[schema(as = Record)]
    #[allow(dead_code)]
    struct RecordSchema {
        /// Free-form metadata. Records created with a scoped key get `BLNK_GENERATED_BY`: the key id.
        #[schema(value_type = Option<Object>, example = json!({"customer": "c_42", "BLNK_GENERATED_BY": "key_01J9Z6Q4X8K2M7N5P3R1T0V9WA"}))]
        meta_data: Option<()>,
    }

    #[derive(OpenApi)]
    #[openapi(components(schemas(RecordSchema)))]
    struct DemoApi;

    let json = |description: &str, schema: utoipa::openapi::RefOr<utoipa::openapi::Schema>| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(schema)).build(),
            )
            .build()
    };
    let ok = |description: &str| ResponseBuilder::new().description(description).build();
    let record = || -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        Ref::from_schema_name("Record").into()
    };
    // What the server answers: the body as sent, with `<kind>_id` and `created_at` put in front.
    let stored = |kind: &str| -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        let id = format!("{kind}_id");
        ObjectBuilder::new()
            .description(Some(format!(
                "A {kind}: the object as created, with `{id}` and `created_at` added"
            )))
            .property(&id, Object::with_type(Type::String))
            .required(&id)
            .property(
                "created_at",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .required("created_at")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    };
    let error = |description: &str| json(description, Ref::from_schema_name("ErrorBody").into());
    let public = || OperationBuilder::new().securities(Some([])).tag("service");

    let mut doc = manage::openapi().merge_from(DemoApi::openapi());
    doc.info.title = "tower-api-keys demo ledger".into();
    doc.info.description = Some(
        "A ledger-style API protected by scoped API keys (`X-Blnk-Key`, `X-Api-Key` or \
         `Authorization: Bearer`). Each resource needs `<resource>:read` for GET and \
         `<resource>:write` for POST."
            .into(),
    );
    for (kind, plural) in RESOURCES {
        let denied = || {
            OperationBuilder::new()
                .tag(plural)
                .response("401", error("Missing, invalid, expired or revoked key"))
                .response("403", error("The key lacks the scope"))
                .response("503", error("Key store unavailable"))
        };
        let create = denied()
            .operation_id(Some(format!("create_{kind}")))
            .summary(Some(format!("Create a {kind} (scope `{plural}:write`)")))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(record())).build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ))
            .response("201", json("Created", stored(kind)))
            .response(
                "400",
                error("Not a JSON object, or `meta_data` is not an object"),
            )
            .response("413", error("Body over 256 KiB (`REQUEST_BODY_TOO_LARGE`)"));
        let list = denied()
            .operation_id(Some(format!("list_{plural}")))
            .summary(Some(format!(
                "List {plural}, newest first (scope `{plural}:read`)"
            )))
            .response(
                "200",
                json(
                    "Up to 100 records",
                    ArrayBuilder::new().items(stored(kind)).into(),
                ),
            );
        let get_one = denied()
            .operation_id(Some(format!("get_{kind}")))
            .summary(Some(format!("Get one {kind} (scope `{plural}:read`)")))
            .parameter(
                ParameterBuilder::new()
                    .name("id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(Object::with_type(Type::String))),
            )
            .response("200", json("The record", stored(kind)))
            .response("404", error("No such record (`RECORD_NOT_FOUND`)"));
        doc.paths
            .add_path_operation(format!("/{plural}"), vec![HttpMethod::Post], create);
        doc.paths
            .add_path_operation(format!("/{plural}"), vec![HttpMethod::Get], list);
        doc.paths
            .add_path_operation(format!("/{plural}/{{id}}"), vec![HttpMethod::Get], get_one);
    }
    doc.paths.add_path_operation(
        "/health",
        vec![HttpMethod::Get],
        public()
            .summary(Some("Liveness (no key)"))
            .response("200", ok("`{\"status\":\"ok\"}`")),
    );
    doc.paths.add_path_operation(
        "/openapi.json",
        vec![HttpMethod::Get],
        public()
            .summary(Some("This document (no key)"))
            .response("200", ok("OpenAPI 3.1")),
    );
    // The pair `scripts/load.sh` compares.
    doc.paths.add_path_operation(
        "/ping",
        vec![HttpMethod::Get],
        public()
            .summary(Some("`pong` (no key; twin of `/auth/ping`)"))
            .response("200", ok("`pong`")),
    );
    doc.paths.add_path_operation(
        "/auth/ping",
        vec![HttpMethod::Get],
        OperationBuilder::new()
            .tag("service")
            .summary(Some("`pong` (scope `ledgers:read`; twin of `/ping`)"))
            .response("200", ok("`pong`"))
            .response("401", error("Missing, invalid, expired or revoked key"))
            .response("403", error("The key lacks the scope")),
    );
    #[cfg(feature = "metrics")]
    doc.paths.add_path_operation(
        "/metrics",
        vec![HttpMethod::Get],
        public()
            .summary(Some("Prometheus metrics (no key)"))
            .response(
                "200",
                ok("`api_key_requests_total`, `api_key_lookup_seconds`"),
            ),
    );
    doc
}

const RESOURCES: [(&str, &str); 3] = [
    ("ledger", "ledgers"),
    ("balance", "balances"),
    ("transaction", "transactions"),
];

/// What [`build`] needs. `main` reads it from the environment; tests write it.
pub(crate) struct Config {
    /// The master key; `None` generates one for this run (see [`Demo::master`]).
    pub(crate) master_key: Option<ApiKey>,
    /// `sqlite://path.db` (created if missing) or, with feature `postgres`, a `postgres://` URL.
    pub(crate) database_url: String,
    /// With feature `redis`: broadcast revocations over Redis pub/sub.
    pub(crate) redis_url: Option<String>,
}

impl Config {
    fn from_env() -> Self {
        Self {
            master_key: std::env::var("API_KEYS_MASTER_KEY")
                .ok()
                .filter(|key| !key.is_empty())
                .map(ApiKey::new),
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "sqlite://tower-api-keys-demo.db".into()),
            redis_url: std::env::var("REDIS_URL").ok(),
        }
    }
}

/// A ready service: serve `router`, flush `usage` on shutdown.
pub(crate) struct Demo {
    pub(crate) router: Router,
    /// The master key in force (configured or generated).
    pub(crate) master: ApiKey,
    pub(crate) usage: UsageRecorder,
    /// Broadcast subscriptions, alive as long as the service.
    pub(crate) _subscriptions: Vec<Box<dyn std::any::Any + Send>>,
}

/// Connects the store, wires resolver, key manager, invalidation and the layer, and builds the router.
/// Binds no port and reads no environment.
pub(crate) async fn build(config: Config) -> Result<Demo, Box<dyn std::error::Error>> {
    let master = match config.master_key {
        Some(key) => key,
        None => KeyFormat::new("sk_master")?.generate(),
    };

    // Keys and records live in the same database.
    let (store, records): (Arc<dyn KeyStore>, Records);
    #[cfg(feature = "postgres")]
    let mut pg_store = None;
    if config.database_url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        {
            let pg = tower_api_keys::store::PostgresStore::connect(&config.database_url).await?;
            records = Records::Postgres(pg.pool().clone());
            pg_store = Some(pg.clone());
            store = Arc::new(pg);
        }
        #[cfg(not(feature = "postgres"))]
        return Err("DATABASE_URL is a PostgreSQL URL: run with --features postgres".into());
    } else {
        let url = if config.database_url.contains('?') {
            config.database_url.clone()
        } else {
            format!("{}?mode=rwc", config.database_url)
        };
        let sqlite = SqliteStore::connect(&url).await?;
        records = Records::Sqlite(sqlite.pool().clone());
        store = Arc::new(sqlite);
    }
    records.migrate().await?;

    let resolver = CachedResolver::builder(store.clone())
        .format(KeyFormat::new("sk_live")?)
        .ttl(Duration::from_secs(60))
        .build();
    let mut manager = KeyManager::new(store.clone(), resolver.clone()).policy(
        KeyPolicy::default()
            .max_active_per_owner(10)
            .max_lifetime(Duration::from_secs(365 * 86_400)),
    );

    // Revocations reach other instances: Redis if configured, else LISTEN/NOTIFY on PostgreSQL.
    let mut subscriptions: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    if let Some(redis_url) = config.redis_url {
        #[cfg(feature = "redis")]
        {
            let invalidator = tower_api_keys::invalidate::RedisInvalidator::open(&redis_url)?;
            subscriptions.push(Box::new(invalidator.subscribe(resolver.clone())));
            manager = manager.invalidator(invalidator);
            tracing::info!("revocations broadcast over Redis");
        }
        #[cfg(not(feature = "redis"))]
        {
            let _ = redis_url;
            return Err("REDIS_URL is set: run with --features redis".into());
        }
    } else {
        #[cfg(feature = "postgres")]
        if let Some(pg) = &pg_store {
            let invalidator = tower_api_keys::invalidate::PgInvalidator::from_store(pg);
            subscriptions.push(Box::new(invalidator.subscribe(resolver.clone())));
            manager = manager.invalidator(invalidator);
            tracing::info!("revocations broadcast over PostgreSQL LISTEN/NOTIFY");
        }
    }
    // Only mutated with feature `redis` or `postgres`.
    let _ = (&mut manager, &mut subscriptions);

    let usage = UsageRecorder::spawn(store, Duration::from_secs(30));
    let layer = ApiKeyLayer::new(resolver)
        .sources([
            KeySource::blnk(),
            KeySource::x_api_key(),
            KeySource::bearer(),
            KeySource::blecon(),
        ])
        .master_key(master.clone())
        .usage(usage.clone());

    #[cfg(feature = "metrics")]
    prometheus::install();
    Ok(Demo {
        router: app(layer, manager, records),
        master,
        usage,
        _subscriptions: subscriptions,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
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
    let demo = build(config).await?;
    if generated {
        eprintln!(
            "WARNING: API_KEYS_MASTER_KEY is not set; generated a master key for this run only (not persisted):\n\n    {}\n",
            demo.master.expose_secret()
        );
    }

    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, demo.router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let flushed = demo.usage.flush().await?;
    tracing::info!(keys = flushed, "usage flushed; bye");
    Ok(())
}
