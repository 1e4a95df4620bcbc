//! Shared by `tests/webhooks*.rs`: a store on SQLite (a file, so that a "restarted" instance opens
//! the same database) or PostgreSQL (a schema of its own), instances on it, and a receiver on
//! 127.0.0.1 that records every delivery.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tower_api_keys::manage::KeyManager;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, SqliteStore};
use tower_api_keys::webhooks::{UrlPolicy, WebhookSecret, WebhookStore, Webhooks};

use super::common::db;

/// Where the data lives.
pub enum Backend {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Pg(db::PgSchema),
}

/// One server instance on the backend.
pub struct Instance {
    pub manager: KeyManager,
    pub webhooks: Webhooks,
    pub store: Arc<dyn KeyStore>,
}

/// Private targets and plain http allowed: the receiver is on 127.0.0.1.
pub fn local() -> UrlPolicy {
    UrlPolicy::new().allow_private(true).allow_http(true)
}

fn instance<S: WebhookStore + KeyStore>(store: Arc<S>, urls: UrlPolicy) -> Instance {
    let webhooks = Webhooks::new(store.clone()).urls(urls);
    let manager = KeyManager::new(CachedResolver::new(store.clone())).webhooks(webhooks.clone());
    Instance {
        manager,
        webhooks,
        store,
    }
}

impl Backend {
    pub fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(db::unique("webhooks"));
        std::fs::create_dir_all(&dir).unwrap();
        Self::Sqlite(dir)
    }

    #[cfg(feature = "postgres")]
    pub async fn pg(test: &str) -> Option<Self> {
        db::pg_schema(test).await.map(Self::Pg)
    }

    /// A new instance (its own pool) on the same data.
    pub async fn open(&self, urls: UrlPolicy) -> Instance {
        match self {
            Self::Sqlite(dir) => {
                let url = format!("sqlite://{}?mode=rwc", dir.join("keys.db").display());
                instance(Arc::new(SqliteStore::connect(&url).await.unwrap()), urls)
            }
            #[cfg(feature = "postgres")]
            Self::Pg(schema) => instance(Arc::new(schema.store().await), urls),
        }
    }

    pub async fn cleanup(self) {
        match self {
            Self::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            #[cfg(feature = "postgres")]
            Self::Pg(schema) => schema.drop_schema().await,
        }
    }
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub timestamp: i64,
    pub signature: String,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on 127.0.0.1 answering `status` (200 unless changed).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Got>>>,
    pub status: Arc<AtomicU16>,
}

impl Receiver {
    pub async fn start() -> Self {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let (g, s) = (got.clone(), status.clone());
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    g.lock().unwrap().push(Got {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp").parse().unwrap_or(-1),
                        signature: header("webhook-signature"),
                        body,
                    });
                    StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, got, status }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Panics unless every request carries a valid signature of `secret`.
    #[track_caller]
    pub fn assert_all_signed(&self, secret: &WebhookSecret) {
        for got in self.got() {
            assert!(
                secret.verify(&got.id, got.timestamp, &got.body, &got.signature),
                "bad signature on {got:?}"
            );
        }
    }
}
