//! The console's whole-owner views through real HTTP, on every store: `GET /api-keys/owners`
//! (every owner with its key counts, master key only) and `GET /api-keys/usage` (each key's
//! requests over a period, default 7 days: the keys table's "Requests (7 d)" column).

mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore, SqliteStore};
use tower_api_keys::usage::{OUTCOMES, Outcome, UsageBucket, hour_of};

fn app(store: Arc<dyn KeyStore>) -> Router {
    let resolver = CachedResolver::new(store.clone());
    Router::new()
        .merge(manage::router(KeyManager::new(store, resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)))
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", key);
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    (
        status,
        if status == StatusCode::NO_CONTENT {
            Value::Null
        } else {
            json_body(response).await
        },
    )
}

async fn create(app: &Router, key: &str, body: Value) -> Value {
    let (status, created) = call(app, "POST", "/api-keys", key, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

fn bucket(key: &Value, hours_ago: i64, admitted: u64, rate_limited: u64, ip: &str) -> UsageBucket {
    let mut counts = [0; OUTCOMES];
    counts[Outcome::Admitted.index()] = admitted;
    counts[Outcome::RateLimited.index()] = rate_limited;
    UsageBucket {
        key_id: tower_api_keys::key::KeyId::new(key["api_key_id"].as_str().unwrap()),
        hour: hour_of(OffsetDateTime::now_utc() - time::Duration::hours(hours_ago)),
        counts,
        last_ip: Some(ip.parse().unwrap()),
    }
}

async fn the_views(store: Arc<dyn KeyStore>) {
    let app = app(store.clone());
    let (status, empty) = call(&app, "GET", "/api-keys/owners", MASTER, None).await;
    assert_eq!(status, StatusCode::OK, "{empty}");
    assert_eq!(empty, json!({"owners": []}));

    let writer = create(
        &app,
        MASTER,
        json!({"name": "writer", "owner": "acme", "scopes": ["api-keys:write", "ledgers:read"]}),
    )
    .await;
    let sibling = create(
        &app,
        MASTER,
        json!({"name": "sibling", "owner": "acme", "scopes": ["ledgers:read"]}),
    )
    .await;
    let writer_key = writer["key"].as_str().unwrap();
    let child = create(
        &app,
        writer_key,
        json!({"name": "child", "scopes": ["ledgers:read"]}),
    )
    .await;
    let gone = create(
        &app,
        MASTER,
        json!({"name": "gone", "owner": "acme", "scopes": ["ledgers:read"]}),
    )
    .await;
    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/api-keys/{}", gone["api_key_id"].as_str().unwrap()),
        MASTER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let other = create(
        &app,
        MASTER,
        json!({"name": "other", "owner": "globex", "scopes": ["ledgers:read"]}),
    )
    .await;

    // Owners in order, with every key and the active ones.
    let (status, owners) = call(&app, "GET", "/api-keys/owners", MASTER, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        owners,
        json!({"owners": [{"owner": "acme", "keys": 4, "active_keys": 3},
                          {"owner": "globex", "keys": 1, "active_keys": 1}]})
    );
    // The master key only: it spans every owner.
    let (status, refused) = call(&app, "GET", "/api-keys/owners", writer_key, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(refused["error_detail"]["code"], "AUTH_MASTER_KEY_REQUIRED");

    // Usage: within the last 7 days by default; older hours and other owners' keys left out.
    store
        .record_usage(&[
            bucket(&writer, 1, 5, 2, "192.0.2.1"),
            bucket(&writer, 30, 3, 0, "192.0.2.9"),
            bucket(&writer, 24 * 8, 100, 0, "192.0.2.7"),
            bucket(&sibling, 2, 7, 0, "198.51.100.4"),
            bucket(&child, 3, 1, 1, "203.0.113.5"),
            bucket(&other, 1, 50, 0, "192.0.2.200"),
        ])
        .await
        .unwrap();
    let (status, summary) = call(&app, "GET", "/api-keys/usage?owner=acme", MASTER, None).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["owner"], "acme");
    let by_id = |summary: &Value| -> Vec<(String, u64, u64, u64, String)> {
        let mut rows: Vec<_> = summary["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap().to_owned(),
                    k["requests"].as_u64().unwrap(),
                    k["admitted"].as_u64().unwrap(),
                    k["refused"]["rate_limited"].as_u64().unwrap(),
                    k["last_ip"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let id = |key: &Value| key["api_key_id"].as_str().unwrap().to_owned();
    let mut expected = vec![
        (id(&writer), 10, 8, 2, "192.0.2.1".to_owned()),
        (id(&sibling), 7, 7, 0, "198.51.100.4".to_owned()),
        (id(&child), 2, 1, 1, "203.0.113.5".to_owned()),
    ];
    expected.sort();
    assert_eq!(by_id(&summary), expected);
    assert_eq!(
        summary["keys"][0]["refused"].as_object().unwrap().len(),
        OUTCOMES - 1
    );

    // A longer period reaches the older hour.
    let from = (OffsetDateTime::now_utc() - time::Duration::days(30))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (_, month) = call(
        &app,
        "GET",
        &format!("/api-keys/usage?owner=acme&from={from}"),
        MASTER,
        None,
    )
    .await;
    assert!(
        by_id(&month)
            .iter()
            .any(|row| row.0 == id(&writer) && row.1 == 110),
        "{month}"
    );

    // A scoped key sees its own subtree only: itself and its child, not its sibling.
    let (status, scoped) = call(&app, "GET", "/api-keys/usage", writer_key, None).await;
    assert_eq!(status, StatusCode::OK, "{scoped}");
    let mut subtree = vec![
        expected_row(&expected, &id(&writer)),
        expected_row(&expected, &id(&child)),
    ];
    subtree.sort();
    assert_eq!(by_id(&scoped), subtree);
    // ...inside its own owner.
    let (status, cross) = call(
        &app,
        "GET",
        "/api-keys/usage?owner=globex",
        writer_key,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(cross["error_detail"]["code"], "AUTH_CROSS_OWNER_ACCESS");
    // A key without api-keys:read cannot read it.
    let (status, _) = call(
        &app,
        "GET",
        "/api-keys/usage",
        sibling["key"].as_str().unwrap(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Bad input is a 400, the master key names the owner.
    for uri in [
        "/api-keys/usage?owner=acme&from=yesterday",
        "/api-keys/usage?owner=acme&from=2020-01-01T00:00:00Z",
        "/api-keys/usage?owner=acme&extra=1",
    ] {
        let (status, body) = call(&app, "GET", uri, MASTER, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["error_detail"]["code"], "APIKEY_INVALID");
    }
    let (status, body) = call(&app, "GET", "/api-keys/usage", MASTER, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error_detail"]["code"], "APIKEY_OWNER_REQUIRED");
}

fn expected_row(
    rows: &[(String, u64, u64, u64, String)],
    id: &str,
) -> (String, u64, u64, u64, String) {
    rows.iter().find(|r| r.0 == id).unwrap().clone()
}

#[tokio::test]
async fn owners_and_usage_summary_on_memory() {
    the_views(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn owners_and_usage_summary_on_sqlite() {
    the_views(Arc::new(SqliteStore::in_memory().await.unwrap())).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn owners_and_usage_summary_on_postgres() {
    let Some(schema) = common::db::pg_schema("console_overview").await else {
        return;
    };
    the_views(Arc::new(schema.store().await)).await;
    schema.drop_schema().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_views() {
    let doc = serde_json::to_value(manage::openapi()).unwrap();
    for path in ["/api-keys/owners", "/api-keys/usage"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["OwnerBody"]["properties"]["active_keys"].is_object());
    assert!(schemas["KeyUsageBody"]["properties"]["requests"].is_object());
}
