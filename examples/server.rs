//! The main job: a small ledger-style API protected by scoped API keys, on an embedded SQLite store.
//!
//! ```sh
//! cargo run --example server
//! ```
//!
//! Configuration (environment):
//! - `API_KEYS_MASTER_KEY`: the master key; if unset, one is generated and printed once (not persisted).
//! - `BIND`: listen address (default `127.0.0.1:5001`).
//! - `DATABASE_URL`: `sqlite://path.db` (default `sqlite://tower-api-keys-demo.db`) or, with feature
//!   `postgres`, a `postgres://` URL (revocations then reach every instance through LISTEN/NOTIFY).
//! - `REDIS_URL`: with feature `redis`, broadcast revocations over Redis pub/sub instead.
//!
//! Routes: `/ledgers`, `/balances`, `/transactions` (POST create, GET list, GET `/{id}`), scoped by
//! method (`ledgers:read` / `ledgers:write`, ...); key management at `/api-keys`; `/health` and
//! `/openapi.json` unauthenticated. Records created with a scoped key carry
//! `meta_data.BLNK_GENERATED_BY`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_api_keys::manage::{self, KeyManager, KeyPolicy};
use tower_api_keys::{
    ApiKey, ApiKeyLayer, AuthError, CachedResolver, KeyFormat, KeyId, KeySource, KeyStore,
    Principal, Provenance, RequireScopes, SqliteStore, UsageRecorder,
};

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

fn storage_error(error: sqlx::Error) -> AuthError {
    tracing::error!(%error, "demo record storage failed");
    AuthError::Unavailable(tower_api_keys::StoreError::unavailable(error))
}

/// One resource: create, list, get, scoped by HTTP method, stamped with provenance on create.
fn resource(kind: &'static str, plural: &'static str, records: Records) -> Router {
    let create = move |State(records): State<Records>, principal: Principal, body: Bytes| async move {
        let text = std::str::from_utf8(&body)
            .map_err(|_| AuthError::invalid("body must be UTF-8 JSON"))?;
        let value: &serde_json::value::RawValue = serde_json::from_str(text)
            .map_err(|e| AuthError::invalid(format!("invalid JSON body: {e}")))?;
        if !value.get().starts_with('{') {
            return Err(AuthError::invalid("body must be a JSON object"));
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
            None => Ok::<_, AuthError>(json_response(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("{kind} not found")}).to_string(),
            )),
        }
    };
    Router::new()
        .route(&format!("/{plural}"), get(list).post(create))
        .route(&format!("/{plural}/{{id}}"), get(get_one))
        .route_layer(Provenance::new())
        .route_layer(RequireScopes::by_method(plural))
        .with_state(records)
}

/// The whole service.
fn app(layer: ApiKeyLayer, manager: KeyManager, records: Records) -> Router {
    let mut openapi = manage::openapi();
    openapi.info.title = "tower-api-keys demo ledger".into();
    Router::new()
        .merge(resource("ledger", "ledgers", records.clone()))
        .merge(resource("balance", "balances", records.clone()))
        .merge(resource("transaction", "transactions", records))
        .merge(manage::router(manager))
        .layer(layer)
        // Outside the authentication layer: no key needed.
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/openapi.json",
            get(move || async move { Json(openapi.clone()) }),
        )
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

    let format = KeyFormat::new("sk_live")?;
    let master = match std::env::var("API_KEYS_MASTER_KEY") {
        Ok(key) if !key.is_empty() => ApiKey::new(key),
        _ => {
            let key = KeyFormat::new("sk_master")?.generate();
            eprintln!(
                "WARNING: API_KEYS_MASTER_KEY is not set; generated a master key for this run only (not persisted):\n\n    {}\n",
                key.expose_secret()
            );
            key
        }
    };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:5001".into());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://tower-api-keys-demo.db".into());

    // Keys and records live in the same database.
    let (store, records): (Arc<dyn KeyStore>, Records);
    #[cfg(feature = "postgres")]
    let mut pg_store = None;
    if database_url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        {
            let pg = tower_api_keys::PostgresStore::connect(&database_url).await?;
            records = Records::Postgres(pg.pool().clone());
            pg_store = Some(pg.clone());
            store = Arc::new(pg);
        }
        #[cfg(not(feature = "postgres"))]
        return Err("DATABASE_URL is a PostgreSQL URL: run with --features postgres".into());
    } else {
        let url = if database_url.contains('?') {
            database_url.clone()
        } else {
            format!("{database_url}?mode=rwc")
        };
        let sqlite = SqliteStore::connect(&url).await?;
        records = Records::Sqlite(sqlite.pool().clone());
        store = Arc::new(sqlite);
    }
    records.migrate().await?;

    let resolver = CachedResolver::builder(store.clone())
        .format(format)
        .ttl(Duration::from_secs(60))
        .build();
    let mut manager = KeyManager::new(store.clone(), resolver.clone()).policy(
        KeyPolicy::default()
            .max_active_per_owner(10)
            .max_lifetime(Duration::from_secs(365 * 86_400)),
    );

    // Revocations reach other instances: Redis if configured, else LISTEN/NOTIFY on PostgreSQL.
    let mut _subscriptions: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    if let Ok(redis_url) = std::env::var("REDIS_URL") {
        #[cfg(feature = "redis")]
        {
            let invalidator = tower_api_keys::RedisInvalidator::open(&redis_url)?;
            _subscriptions.push(Box::new(invalidator.subscribe(resolver.clone())));
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
            let invalidator = tower_api_keys::PgInvalidator::from_store(pg);
            _subscriptions.push(Box::new(invalidator.subscribe(resolver.clone())));
            manager = manager.invalidator(invalidator);
            tracing::info!("revocations broadcast over PostgreSQL LISTEN/NOTIFY");
        }
    }
    let _ = &mut manager;

    let usage = UsageRecorder::spawn(store, Duration::from_secs(30));
    let layer = ApiKeyLayer::new(resolver)
        .sources([
            KeySource::blnk(),
            KeySource::x_api_key(),
            KeySource::bearer(),
            KeySource::blecon(),
        ])
        .master_key(master)
        .usage(usage.clone());

    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(layer, manager, records))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let flushed = usage.flush().await?;
    tracing::info!(keys = flushed, "usage flushed; bye");
    Ok(())
}
