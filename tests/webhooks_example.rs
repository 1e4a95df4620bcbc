//! The example server with feature `webhooks`: a webhook on 127.0.0.1 is refused by default and
//! accepted with `WEBHOOKS_ALLOW_PRIVATE=1` (`build_with(.., true)`), and the deliverer the example
//! runs delivers a key's creation to it, signed.
#![cfg(all(feature = "webhooks", feature = "sqlite"))]

mod common;
#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;
#[path = "webhooks/support.rs"]
mod support;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use tower_api_keys::webhooks::WebhookSecret;

async fn call(app: &axum::Router, key: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::post(uri)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn config(db: &std::path::Path) -> server::Config {
    server::Config {
        master_key: None,
        database_url: format!("sqlite://{}", db.display()),
        redis_url: None,
        public_checksum: false,
        leak_report_public_keys: None,
        max_active_per_owner: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_server_sends_webhooks_to_private_targets_only_when_allowed() {
    let dir = std::env::temp_dir().join(common::db::unique("webhooks_example"));
    std::fs::create_dir_all(&dir).unwrap();
    let receiver = support::Receiver::start().await;
    let hook = json!({"owner": "team", "url": receiver.url(), "events": ["key.created"]});

    let strict = server::build(config(&dir.join("strict.db"))).await.unwrap();
    let master = strict.master.expose_secret().to_owned();
    let (status, body) = call(&strict.router, &master, "/api-keys/webhooks", hook.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error_detail"]["code"], "WEBHOOK_URL_REFUSED");

    let open = server::build_with(config(&dir.join("open.db")), true)
        .await
        .unwrap();
    let master = open.master.expose_secret().to_owned();
    let (status, body) = call(&open.router, &master, "/api-keys/webhooks", hook).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let secret = WebhookSecret::parse(body["secret"].as_str().unwrap()).unwrap();
    let (status, _) = call(
        &open.router,
        &master,
        "/api-keys",
        json!({"name": "ci", "owner": "team", "scopes": ["ledgers:read"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // The example's deliverer polls every second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while receiver.got().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let got = receiver.got();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["type"], "key.created");
    receiver.assert_all_signed(&secret);
    let _ = std::fs::remove_dir_all(dir);
}
