//! The example server with `LEAK_REPORT_PUBLIC_KEYS`: a signed report posted without any API key
//! to `POST /api-keys/leaks` revokes the leaked key (the default policy), and an unsigned one is
//! refused.
#![cfg(feature = "leaks")]

#[path = "leaks/scanner.rs"]
mod scanner;
#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

async fn call(app: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_example_server_receives_signed_leak_reports() {
    let dir = std::env::temp_dir();
    let id = std::process::id();
    let db = dir.join(format!("tower-api-keys-leaks-example-{id}.db"));
    let keys = dir.join(format!("tower-api-keys-leaks-example-{id}.json"));
    let github = scanner::Scanner::new("github-example-key");
    std::fs::write(&keys, scanner::Scanner::document(&[&github])).unwrap();
    let demo = server::build(server::Config {
        master_key: None,
        database_url: format!("sqlite://{}", db.display()),
        redis_url: None,
        public_checksum: false,
        leak_report_public_keys: Some(keys.clone()),
        max_active_per_owner: None,
    })
    .await
    .expect("the example builds");
    let app = demo.router.clone();
    let master = demo.master.expose_secret().to_owned();

    let (status, created) = call(
        &app,
        Request::post("/api-keys")
            .header("x-api-key", &master)
            .header("content-type", "application/json")
            .body(Body::from(
                r#"{"name": "ci", "owner": "team", "scopes": ["ledgers:read"]}"#,
            ))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let ping = || {
        Request::get("/auth/ping")
            .header("x-api-key", &key)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&app, ping()).await.0, StatusCode::OK);

    let body = scanner::report(&[&key]);
    let (status, answer) = call(
        &app,
        Request::post("/api-keys/leaks")
            .body(Body::from(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "unsigned: {answer}");
    assert_eq!(call(&app, ping()).await.0, StatusCode::OK);

    let (status, answer) = call(
        &app,
        Request::post("/api-keys/leaks")
            .header("Github-Public-Key-Identifier", &github.identifier)
            .header("Github-Public-Key-Signature", github.sign(body.as_bytes()))
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer[0]["label"], "true_positive");
    let (status, refused) = call(&app, ping()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused["error_detail"]["details"]["reason"], "revoked");

    let _ = demo.usage.flush().await;
    for path in [&db, &keys] {
        let _ = std::fs::remove_file(path);
    }
}
