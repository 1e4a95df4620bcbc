//! The README walkthrough, replayed over real HTTP against `examples/server/` on a temporary SQLite file.

#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A running example server, on its own database file (removed on drop).
struct Running {
    base: String,
    master: String,
    client: Client<HttpConnector, Full<Bytes>>,
    db: PathBuf,
    _demo_parts: Vec<Box<dyn std::any::Any + Send>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.db.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

struct Reply {
    status: StatusCode,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn code(&self) -> String {
        self.json()["error_detail"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

async fn start() -> Running {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let db = std::env::temp_dir().join(format!(
        "tower-api-keys-walkthrough-{}-{}.db",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let demo = server::build(server::Config {
        master_key: None,
        database_url: format!("sqlite://{}", db.display()),
        redis_url: None,
        public_checksum: false,
    })
    .await
    .expect("the example builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, demo.router).into_future());
    Running {
        base,
        master: demo.master.expose_secret().to_owned(),
        client: Client::builder(TokioExecutor::new()).build_http(),
        db,
        _demo_parts: demo._subscriptions,
    }
}

impl Running {
    /// One request with `X-blnk-key: <key>` (if any) and, with a body, `Content-Type: application/json`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("X-blnk-key", key);
        }
        if body.is_some() {
            request = request.header("Content-Type", "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }
}

const BIG: &str = "12345678901234567890123456789.000000000000000000001";

#[tokio::test]
async fn readme_walkthrough() {
    let app = start().await;
    let master = app.master.as_str();

    // Create a scoped key with the master key (the Blnk docs' seed request).
    let expires_at = (OffsetDateTime::now_utc() + time::Duration::days(30))
        .replace_nanosecond(0)
        .unwrap()
        .format(&Rfc3339)
        .unwrap();
    let create = format!(
        r#"{{"name": "Service Account", "owner": "owner_id", "scopes": ["ledgers:read", "balances:write"], "expires_at": "{expires_at}"}}"#
    );
    let created = app
        .send(Method::POST, "/api-keys", Some(master), Some(&create))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let created = created.json();
    let id = created["api_key_id"]
        .as_str()
        .expect("api_key_id")
        .to_owned();
    let key = created["key"].as_str().expect("plaintext key").to_owned();
    assert!(key.starts_with("sk_live_"), "{key}");
    assert_eq!(created["name"], "Service Account");
    assert_eq!(created["owner_id"], "owner_id");
    let mut scopes: Vec<&str> = created["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["balances:write", "ledgers:read"]);
    let expiry = OffsetDateTime::parse(created["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    assert_eq!(
        expiry,
        OffsetDateTime::parse(&expires_at, &Rfc3339).unwrap()
    );
    assert!(created["created_at"].is_string());
    assert_eq!(created["last_used_at"], "0001-01-01T00:00:00Z");
    assert_eq!(created["is_revoked"], false);

    // The new key creates a balance: its id is stamped into meta_data, the big number kept as sent.
    let balance = format!(
        r#"{{"ledger_id": "general_ledger_id", "currency": "USD", "meta_data": {{"customer_name": "Jerry", "amount": {BIG}}}}}"#
    );
    let reply = app
        .send(Method::POST, "/balances", Some(&key), Some(&balance))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert!(
        reply.text.contains(&format!(r#""amount": {BIG}"#)),
        "the big number is byte-identical: {}",
        reply.text
    );
    let stamped = reply.json();
    assert_eq!(stamped["meta_data"]["BLNK_GENERATED_BY"], id.as_str());
    assert_eq!(stamped["meta_data"]["customer_name"], "Jerry");
    let balance_id = stamped["balance_id"].as_str().unwrap().to_owned();

    // ... and reads it back, byte for byte. (balances:write does not grant read.)
    let reply = app
        .send(
            Method::GET,
            &format!("/balances/{balance_id}"),
            Some(master),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(
        reply.text.contains(&format!(r#""amount": {BIG}"#)),
        "{}",
        reply.text
    );
    let reply = app.send(Method::GET, "/balances", Some(&key), None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);

    // Out of scope: ledgers:read does not grant creating ledgers.
    let reply = app
        .send(
            Method::POST,
            "/ledgers",
            Some(&key),
            Some(r#"{"name": "General"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
    assert_eq!(reply.code(), "AUTH_INSUFFICIENT_PERMISSIONS");
    assert_eq!(
        reply.json()["error_detail"]["details"]["required"],
        serde_json::json!(["ledgers:write"])
    );

    // In scope.
    let reply = app.send(Method::GET, "/ledgers", Some(&key), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(reply.json().is_array());

    // Revoke it with the master key: it stops working at once.
    let reply = app
        .send(
            Method::DELETE,
            &format!("/api-keys/{id}"),
            Some(master),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    let reply = app.send(Method::GET, "/ledgers", Some(&key), None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
    assert_eq!(reply.code(), "AUTH_EXPIRED_API_KEY");
    assert_eq!(reply.json()["error_detail"]["details"]["reason"], "revoked");
    assert!(!reply.text.contains(&key), "errors never echo the key");

    // Listed as revoked.
    let reply = app
        .send(Method::GET, &format!("/api-keys/{id}"), Some(master), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["is_revoked"], true);

    // No key: refused on the API, fine on /health and /openapi.json.
    let reply = app.send(Method::GET, "/ledgers", None, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.code(), "AUTH_MISSING_API_KEY");
    let reply = app.send(Method::GET, "/health", None, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["status"], "ok");

    let reply = app.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let doc = reply.json();
    let paths = &doc["paths"];
    for path in [
        "/api-keys",
        "/api-keys/{id}",
        "/api-keys/{id}/rotate",
        "/ledgers",
        "/ledgers/{id}",
        "/balances",
        "/balances/{id}",
        "/transactions",
        "/transactions/{id}",
        "/health",
    ] {
        assert!(
            paths.get(path).is_some(),
            "{path} missing from /openapi.json"
        );
    }
    assert!(paths["/balances"]["post"].is_object());
    assert!(paths["/balances"]["get"].is_object());
    assert_eq!(paths["/health"]["get"]["security"], serde_json::json!([]));
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["blnk_key"]["name"], "x-blnk-key");
    assert_eq!(schemes["api_key"]["name"], "x-api-key");
    assert!(doc["components"]["schemas"]["Record"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());

    #[cfg(feature = "metrics")]
    {
        let reply = app.send(Method::GET, "/metrics", None, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        let text = &reply.text;
        for expected in [
            "# TYPE api_key_requests_total counter",
            r#"outcome="ok""#,
            r#"kind="scoped""#,
            r#"kind="master""#,
            r#"outcome="AUTH_EXPIRED_API_KEY""#,
            r#"outcome="AUTH_MISSING_API_KEY""#,
            r#"api_key_guard_refusals_total{outcome="AUTH_INSUFFICIENT_PERMISSIONS"} 2"#,
            "api_key_lookup_seconds_bucket{",
            r#"outcome="found""#,
        ] {
            assert!(
                text.contains(expected),
                "{expected} not in /metrics:\n{text}"
            );
        }
        assert!(!text.contains(&key) && !text.contains(master));
    }
}

#[tokio::test]
async fn master_key_bodies_are_not_stamped() {
    let app = start().await;
    let body = format!(r#"{{"name":"General","meta_data":{{"amount":{BIG},"note":"é"}}}}"#);
    let reply = app
        .send(Method::POST, "/ledgers", Some(&app.master), Some(&body))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert!(
        !reply.text.contains("BLNK_GENERATED_BY"),
        "the master key is never stamped: {}",
        reply.text
    );
    let rest = body.strip_prefix('{').unwrap();
    assert!(
        reply.text.ends_with(rest),
        "the body is kept byte for byte: {}",
        reply.text
    );
}
