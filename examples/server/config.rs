//! What the environment chooses: the master key, the database (SQLite or PostgreSQL, holding keys
//! and records alike), the broadcast of revocations to other instances, and the shutdown signal.
//!
//! The environment:
//! - `API_KEYS_MASTER_KEY`: the master key; if unset, one is generated and printed once (not persisted).
//! - `BIND`: listen address (default `127.0.0.1:5001`).
//! - `DATABASE_URL`: `sqlite://path.db` (default `sqlite://tower-api-keys-demo.db`) or, with feature
//!   `postgres`, a `postgres://` URL (revocations then reach every instance through LISTEN/NOTIFY).
//! - `REDIS_URL`: with feature `redis`, broadcast revocations over Redis pub/sub instead.
//! - `WEBHOOKS_ALLOW_PRIVATE=1`: with feature `webhooks`, allow webhook URLs on private, loopback
//!   and link-local addresses, over plain `http` too (a receiver on your machine); otherwise only
//!   `https` to public addresses.
//! - A fleet (several instances on one PostgreSQL, or one Redis): `API_KEYS_INSTANCE` names this
//!   instance in the roster, logs and metrics (default `<pid>-<random>`); `API_KEYS_CHANNEL` the
//!   broadcast channel (default the crate's); `API_KEYS_SCHEMA` the PostgreSQL schema of the keys
//!   (default `tower_api_keys`). A revoke (`DELETE /api-keys/{id}`) waits up to 1 s for every live
//!   instance and reports it in its `Revocation-*` headers.
//! - `API_KEYS_MAX_ACTIVE_PER_OWNER`: the most active keys an owner may hold (default 10; 409
//!   `APIKEY_LIMIT_REACHED` past it). `scripts/schemathesis.sh` raises it, so that a run keeps
//!   creating keys to the end.
//! - `RUST_LOG`: log filter (default `info,sqlx=warn`); one line per request, with the caller's
//!   `api_key_id` (never the key).

use std::any::Any;
use std::sync::Arc;

use tower_api_keys::key::ApiKey;
use tower_api_keys::manage::KeyManager;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, SqliteStore};

use super::records::Records;

/// What [`build`](super::build) needs. `main` reads it from the environment; tests write it.
pub(crate) struct Config {
    /// The master key; `None` generates one for this run (see [`Demo::master`](super::Demo)).
    pub(crate) master_key: Option<ApiKey>,
    /// `sqlite://path.db` (created if missing) or, with feature `postgres`, a `postgres://` URL.
    pub(crate) database_url: String,
    /// With feature `redis`: broadcast revocations over Redis pub/sub.
    pub(crate) redis_url: Option<String>,
    /// Issue keys with the public CRC32 checksum (offline validation by secret scanners) instead of
    /// the keyed tag (made-up keys refused with no I/O; the secret lives in the key store).
    pub(crate) public_checksum: bool,
    /// With feature `leaks`: a file of secret scanners' public keys in GitHub's JSON shape
    /// (`LEAK_REPORT_PUBLIC_KEYS`); when set, `POST /api-keys/leaks` receives signed leak reports
    /// (GitHub's and deps.dev's headers) and revokes leaked keys with their descendants.
    pub(crate) leak_report_public_keys: Option<std::path::PathBuf>,
    /// The most active keys an owner may hold (`API_KEYS_MAX_ACTIVE_PER_OWNER`); `None`: 10.
    pub(crate) max_active_per_owner: Option<u32>,
}

impl Config {
    pub(crate) fn from_env() -> Self {
        Self {
            master_key: std::env::var("API_KEYS_MASTER_KEY")
                .ok()
                .filter(|key| !key.is_empty())
                .map(ApiKey::new),
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "sqlite://tower-api-keys-demo.db".into()),
            redis_url: std::env::var("REDIS_URL").ok(),
            public_checksum: std::env::var("API_KEYS_PUBLIC_CHECKSUM").is_ok_and(|v| v == "1"),
            leak_report_public_keys: std::env::var_os("LEAK_REPORT_PUBLIC_KEYS")
                .filter(|path| !path.is_empty())
                .map(Into::into),
            max_active_per_owner: std::env::var("API_KEYS_MAX_ACTIVE_PER_OWNER")
                .ok()
                .and_then(|limit| limit.parse().ok()),
        }
    }
}

/// Broadcast subscriptions, to keep alive as long as the service.
pub(crate) type Subscriptions = Vec<Box<dyn Any + Send>>;

/// The key store and the records table, in one database.
pub(crate) struct Database {
    pub(crate) keys: Arc<dyn KeyStore>,
    pub(crate) records: Records,
    #[cfg(feature = "postgres")]
    postgres: Option<tower_api_keys::store::PostgresStore>,
    /// Webhook endpoints and their outbox, in the key store.
    #[cfg(feature = "webhooks")]
    pub(crate) webhooks: tower_api_keys::webhooks::Webhooks,
}

/// `WEBHOOKS_ALLOW_PRIVATE=1`: private targets (and plain http) allowed.
pub(crate) fn webhooks_allow_private_from_env() -> bool {
    std::env::var("WEBHOOKS_ALLOW_PRIVATE").is_ok_and(|v| v == "1")
}

impl Database {
    /// Connects (creating a SQLite file if missing) and creates the records table.
    pub(crate) async fn connect(url: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let database = if url.starts_with("postgres") {
            #[cfg(feature = "postgres")]
            {
                let mut builder = tower_api_keys::store::PostgresStore::builder();
                if let Some(schema) = fleet_setting("API_KEYS_SCHEMA") {
                    builder = builder.schema(&schema)?;
                }
                let pg = builder.connect(url).await?;
                let pg = Arc::new(pg);
                Self {
                    records: Records::Postgres(
                        tower_api_keys::store::PostgresStore::pool(&pg).clone(),
                    ),
                    postgres: Some((*pg).clone()),
                    #[cfg(feature = "webhooks")]
                    webhooks: tower_api_keys::webhooks::Webhooks::new(pg.clone()),
                    keys: pg,
                }
            }
            #[cfg(not(feature = "postgres"))]
            return Err("DATABASE_URL is a PostgreSQL URL: run with --features postgres".into());
        } else {
            let url = if url.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            let sqlite = Arc::new(SqliteStore::connect(&url).await?);
            Self {
                records: Records::Sqlite(SqliteStore::pool(&sqlite).clone()),
                #[cfg(feature = "webhooks")]
                webhooks: tower_api_keys::webhooks::Webhooks::new(sqlite.clone()),
                keys: sqlite,
                #[cfg(feature = "postgres")]
                postgres: None,
            }
        };
        database.records.migrate().await?;
        Ok(database)
    }

    /// Revocations reach other instances: over Redis if `redis_url` is set, else over PostgreSQL's
    /// LISTEN/NOTIFY if that is the database; a single SQLite instance needs nothing. Returns the
    /// manager that broadcasts and the subscriptions to keep alive as long as the service.
    pub(crate) fn broadcast(
        &self,
        redis_url: Option<&str>,
        resolver: &CachedResolver,
        manager: KeyManager,
    ) -> Result<(KeyManager, Subscriptions), Box<dyn std::error::Error>> {
        if let Some(redis_url) = redis_url {
            #[cfg(feature = "redis")]
            {
                let mut invalidator =
                    tower_api_keys::invalidate::RedisInvalidator::open(redis_url)?;
                if let Some(channel) = fleet_setting("API_KEYS_CHANNEL") {
                    invalidator = invalidator.with_channel(channel);
                }
                if let Some(name) = fleet_setting("API_KEYS_INSTANCE") {
                    invalidator = invalidator.instance_name(&name);
                }
                let subscription: Box<dyn Any + Send> =
                    Box::new(invalidator.subscribe(resolver.clone()));
                tracing::info!("revocations broadcast over Redis");
                return Ok((manager.invalidator(invalidator), vec![subscription]));
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = redis_url;
                return Err("REDIS_URL is set: run with --features redis".into());
            }
        }
        #[cfg(feature = "postgres")]
        if let Some(pg) = &self.postgres {
            let mut invalidator = tower_api_keys::invalidate::PostgresInvalidator::from_store(pg);
            if let Some(channel) = fleet_setting("API_KEYS_CHANNEL") {
                invalidator = invalidator.with_channel(&channel)?;
            }
            if let Some(name) = fleet_setting("API_KEYS_INSTANCE") {
                invalidator = invalidator.instance_name(&name);
            }
            let subscription: Box<dyn Any + Send> =
                Box::new(invalidator.subscribe(resolver.clone()));
            tracing::info!("revocations broadcast over PostgreSQL LISTEN/NOTIFY");
            return Ok((manager.invalidator(invalidator), vec![subscription]));
        }
        let _ = resolver;
        Ok((manager, Vec::new()))
    }
}

/// A fleet setting from the environment (see the module docs), if set and not empty.
#[cfg(any(feature = "postgres", feature = "redis"))]
fn fleet_setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
