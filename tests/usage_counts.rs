//! Per-key usage counts through real HTTP on SQLite: admitted and refused requests show up as such
//! after a flush, with the address; a restart loses no flushed count; and the store writes stay
//! bounded (one usage row per key per flush) however many requests come.
#![cfg(all(feature = "sqlite", feature = "manage"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, SqliteStore};
use tower_api_keys::usage::UsageRecorder;

const MASTER: &str = common::MASTER;

fn app(store: Arc<dyn KeyStore>, usage: UsageRecorder) -> Router {
    let resolver = CachedResolver::new(store.clone());
    Router::new()
        .route(
            "/ledgers",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .route_layer(RequireScopesLayer::all(["ledgers:read"]))
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(
            ApiKeyLayer::new(resolver)
                .master_key(ApiKey::new(MASTER))
                .usage(usage),
        )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

async fn call(
    client: &Client<HttpConnector, Body>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `(admitted, refused by reason)` summed over a key's buckets.
fn totals(usage: &Value) -> (u64, Value) {
    let mut admitted = 0;
    let mut refused = serde_json::Map::new();
    for bucket in usage["buckets"].as_array().unwrap() {
        admitted += bucket["admitted"].as_u64().unwrap();
        for (reason, n) in bucket["refused"].as_object().unwrap() {
            let sum =
                refused.get(reason).and_then(Value::as_u64).unwrap_or(0) + n.as_u64().unwrap();
            refused.insert(reason.clone(), sum.into());
        }
    }
    (admitted, Value::Object(refused))
}

fn refused(missing_scope: u64, expired_or_revoked: u64) -> Value {
    json!({"invalid": 0, "expired_or_revoked": expired_or_revoked, "missing_scope": missing_scope,
           "rate_limited": 0, "out_of_credits": 0, "network": 0})
}

#[tokio::test]
async fn counts_by_outcome_survive_a_flush_and_a_restart() {
    let dir = std::env::temp_dir().join(common::db::unique("usage"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("keys.db").display());
    let client = Client::builder(TokioExecutor::new()).build_http();

    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    let usage = UsageRecorder::new(store.clone());
    let addr = serve(app(store.clone(), usage.clone())).await;
    let mut keys = Vec::new();
    for scopes in [
        vec!["ledgers:read"],
        vec!["balances:read"],
        vec!["ledgers:read"],
    ] {
        let (status, key) = call(
            &client,
            addr,
            "POST",
            "/api-keys",
            MASTER,
            Some(json!({"owner": "acme", "scopes": scopes})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        keys.push((
            key["api_key_id"].as_str().unwrap().to_owned(),
            key["key"].as_str().unwrap().to_owned(),
        ));
    }
    let [(reader, reader_key), (other, other_key), (gone, gone_key)] = keys.try_into().unwrap();
    for _ in 0..5 {
        let (status, _) = call(&client, addr, "GET", "/ledgers", &reader_key, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    for _ in 0..3 {
        let (status, _) = call(&client, addr, "GET", "/ledgers", &other_key, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (status, _) = call(&client, addr, "GET", "/ledgers", &gone_key, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &client,
        addr,
        "DELETE",
        &format!("/api-keys/{gone}"),
        MASTER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for _ in 0..2 {
        let (status, _) = call(&client, addr, "GET", "/ledgers", &gone_key, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // Nothing is written before a flush.
    let usage_of = |id: &str| format!("/api-keys/{id}/usage");
    let (_, before) = call(&client, addr, "GET", &usage_of(&reader), MASTER, None).await;
    assert_eq!(before["buckets"], json!([]));
    usage.flush().await.unwrap();
    let (status, got) = call(&client, addr, "GET", &usage_of(&reader), MASTER, None).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["granularity"], "hour");
    assert_eq!(got["last_ip"], "127.0.0.1");
    assert_eq!(totals(&got), (5, refused(0, 0)));
    let (_, got) = call(&client, addr, "GET", &usage_of(&other), MASTER, None).await;
    assert_eq!(totals(&got), (0, refused(3, 0)));
    let (_, got) = call(&client, addr, "GET", &usage_of(&gone), MASTER, None).await;
    assert_eq!(totals(&got), (1, refused(0, 2)));
    let (_, days) = call(
        &client,
        addr,
        "GET",
        &format!("{}?granularity=day", usage_of(&reader)),
        MASTER,
        None,
    )
    .await;
    assert_eq!(days["granularity"], "day");
    assert_eq!(totals(&days), (5, refused(0, 0)));
    assert!(
        days["buckets"][0]["start"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );

    // A restart: a new store and recorder on the same file keep what was flushed, and add to it.
    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    let usage = UsageRecorder::new(store.clone());
    let addr = serve(app(store, usage.clone())).await;
    let (_, got) = call(&client, addr, "GET", &usage_of(&reader), MASTER, None).await;
    assert_eq!(totals(&got), (5, refused(0, 0)));
    for _ in 0..2 {
        call(&client, addr, "GET", "/ledgers", &reader_key, None).await;
    }
    usage.flush().await.unwrap();
    let (_, got) = call(&client, addr, "GET", &usage_of(&reader), MASTER, None).await;
    assert_eq!(totals(&got), (7, refused(0, 0)));
    // The read rule: a key outside the caller's subtree is refused.
    let (status, body) = call(&client, addr, "GET", &usage_of(&other), &reader_key, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Thousands of requests by three keys, flushed every 20 ms: every request is counted, and the
/// store gets at most one usage row per key per flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_writes_stay_bounded_under_load() {
    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::in_memory().await.unwrap());
    let usage = UsageRecorder::spawn(store.clone(), Duration::from_millis(20));
    let app = app(store.clone(), usage.clone());
    let resolver_keys = {
        let manager = KeyManager::new(CachedResolver::new(store.clone()));
        let mut keys = Vec::new();
        for _ in 0..3 {
            let created = manager
                .create(
                    &Principal::master(),
                    manage::CreateKey::new(["ledgers:read"]).owner("load"),
                )
                .await
                .unwrap();
            keys.push((created.info.id, created.key.expose_secret().to_owned()));
        }
        keys
    };
    const PER_TASK: usize = 500;
    let mut tasks = Vec::new();
    for task in 0..6 {
        let app = app.clone();
        let key = resolver_keys[task % 3].1.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_TASK {
                let request = Request::get("/ledgers")
                    .header("x-api-key", &key)
                    .body(Body::empty())
                    .unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    usage.flush().await.unwrap();
    let batches = usage.batches_written();
    let rows = usage.usage_rows_written();
    assert!(
        rows <= 3 * batches,
        "{rows} usage rows in {batches} flushes"
    );
    assert!(
        batches < 6 * PER_TASK as u64 / 10,
        "a flush per request or so: {batches}"
    );
    let now = time::OffsetDateTime::now_utc();
    let mut total = 0;
    for (id, _) in &resolver_keys {
        for bucket in store
            .usage(
                id,
                now - time::Duration::hours(2),
                now + time::Duration::hours(1),
            )
            .await
            .unwrap()
        {
            total += bucket.count(tower_api_keys::usage::Outcome::Admitted);
        }
    }
    assert_eq!(total, 6 * PER_TASK as u64, "every request counted once");
}
