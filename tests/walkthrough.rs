//! The README walkthrough, replayed over real HTTP against `examples/server/` on a temporary SQLite
//! file; and what the example promises beyond it: records are JSON, stamped with the creating key
//! (no framing forges the stamp), owned by its account, with ids and timestamps set by the server.

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
    router: axum::Router,
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
        leak_report_public_keys: None,
        max_active_per_owner: None,
    })
    .await
    .expect("the example builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, demo.router.clone()).into_future());
    Running {
        base,
        master: demo.master.expose_secret().to_owned(),
        router: demo.router,
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
        let headers: &[(&str, &str)] = match body {
            Some(_) => &[("Content-Type", "application/json")],
            None => &[],
        };
        self.send_with(
            method,
            path,
            key,
            headers,
            body.unwrap_or_default().as_bytes(),
        )
        .await
    }

    /// One request with `X-blnk-key: <key>` (if any), exactly these headers (repeats kept) and body.
    async fn send_with(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("X-blnk-key", key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = Full::new(Bytes::copy_from_slice(body));
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

    // A key with a rate limit of 2 requests a minute: the third is refused with 429.
    let limited = format!(
        r#"{{"owner": "owner_id", "scopes": ["ledgers:read"], "expires_at": "{expires_at}", "rate_limit": {{"limit": 2, "period_seconds": 60}}}}"#
    );
    let reply = app
        .send(Method::POST, "/api-keys", Some(master), Some(&limited))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(
        reply.json()["rate_limit"],
        serde_json::json!({"limit": 2, "period_seconds": 60})
    );
    let limited_key = reply.json()["key"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let reply = app
            .send(Method::GET, "/ledgers", Some(&limited_key), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    let reply = app
        .send(Method::GET, "/ledgers", Some(&limited_key), None)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text
    );
    assert_eq!(reply.code(), "RATE_LIMITED");

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

/// The console answers at `/console`, and `/console/` sends the browser there (not to a 401).
#[tokio::test]
async fn the_console_is_at_console_with_or_without_the_slash() {
    let app = start().await;
    let console = app.send(Method::GET, "/console", None, None).await;
    assert_eq!(console.status, StatusCode::OK);
    assert!(console.text.contains("<html"), "{}", console.text);
    let request = Request::get(format!("{}/console/", app.base))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = app.client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()["location"], "/console");
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

impl Running {
    /// Creates a key with the master key, for `owner_id` in `account`; returns (key, key id).
    async fn key(&self, account: &str, scopes: &[&str]) -> (String, String) {
        let body = serde_json::json!({"owner": "owner_id", "account": account, "scopes": scopes});
        let reply = self
            .send(
                Method::POST,
                "/api-keys",
                Some(&self.master),
                Some(&body.to_string()),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        let created = reply.json();
        (
            created["key"].as_str().unwrap().to_owned(),
            created["api_key_id"].as_str().unwrap().to_owned(),
        )
    }

    /// The ids of the `plural` records `key` lists.
    async fn listed(&self, plural: &str, kind: &str, key: &str) -> Vec<String> {
        let reply = self
            .send(Method::GET, &format!("/{plural}"), Some(key), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[format!("{kind}_id")].as_str().unwrap().to_owned())
            .collect()
    }

    /// `GET /ledgers/{id}` with `key`.
    async fn get(&self, key: &str, id: &str) -> Reply {
        self.send(Method::GET, &format!("/ledgers/{id}"), Some(key), None)
            .await
    }

    /// How many records the example has stored, of every kind and account.
    async fn stored(&self) -> i64 {
        let url = format!("sqlite://{}", self.db.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let count = sqlx::query_scalar("SELECT count(*) FROM demo_owned_records")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        count
    }
}

const FORGED: &str = r#"{"name": "cash", "meta_data": {"BLNK_GENERATED_BY": "forged"}}"#;

/// Issue #12 item 4, each bypass over real HTTP: refused with 415, nothing stored.
#[tokio::test]
async fn bodies_provenance_cannot_stamp_are_refused() {
    let app = start().await;
    let (key, _) = app.key("a1", &["ledgers:write", "ledgers:read"]).await;
    let json = ("Content-Type", "application/json");
    let cases: [&[(&str, &str)]; 6] = [
        &[("Content-Type", "text/plain")],
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &[json, ("Content-Encoding", "gzip")],
        &[json, ("Content-Type", "text/plain")],
        &[("Content-Type", "text/plain"), json],
        &[],
    ];
    for headers in cases {
        let reply = app
            .send_with(
                Method::POST,
                "/ledgers",
                Some(&key),
                headers,
                FORGED.as_bytes(),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{headers:?}: {}",
            reply.text
        );
        assert_eq!(reply.code(), "REQUEST_UNSUPPORTED_MEDIA_TYPE");
    }
    assert_eq!(app.stored().await, 0, "nothing was stored");
    assert!(
        app.listed("ledgers", "ledger", &app.master)
            .await
            .is_empty()
    );

    // The handler takes JSON only, whoever calls: the master key's bodies are not stamped, but a
    // non-JSON one is refused all the same.
    let reply = app
        .send_with(
            Method::POST,
            "/ledgers",
            Some(&app.master),
            &[("Content-Type", "text/plain")],
            FORGED.as_bytes(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        reply.text
    );
    assert_eq!(reply.code(), "REQUEST_UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(app.stored().await, 0);

    // The same body as JSON is stamped with the real key id.
    let reply = app
        .send(Method::POST, "/ledgers", Some(&key), Some(FORGED))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_ne!(reply.json()["meta_data"]["BLNK_GENERATED_BY"], "forged");
}

/// Issue #12 item 6: a client's own `<kind>_id` or `created_at` is refused, never stored twice.
#[tokio::test]
async fn the_server_owns_ids_and_timestamps() {
    let app = start().await;
    let (key, _) = app.key("a1", &["balances:write"]).await;
    for who in [key.as_str(), app.master.as_str()] {
        for body in [
            r#"{"balance_id": "bal_mine", "currency": "USD"}"#,
            r#"{"created_at": "2000-01-01T00:00:00Z"}"#,
            r#"{"balance\u005fid": "bal_escaped"}"#,
            r#"{"currency": "USD", "created_at": 1, "created_at": 2}"#,
        ] {
            let reply = app
                .send(Method::POST, "/balances", Some(who), Some(body))
                .await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{body}: {}",
                reply.text
            );
            assert_eq!(reply.code(), "RECORD_INVALID");
        }
    }
    assert_eq!(app.stored().await, 0);

    // Another record's id is a reference (a balance names its ledger): kept, once.
    let reply = app
        .send(
            Method::POST,
            "/balances",
            Some(&key),
            Some(r#"{"ledger_id": "ledger_1", "currency": "USD"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.text.matches(r#""balance_id""#).count(), 1);
    assert_eq!(reply.text.matches(r#""created_at""#).count(), 1);
    assert_eq!(reply.json()["ledger_id"], "ledger_1");
}

/// Issue #12 item 6: a scoped key sees and fetches its own account's records; the master key all.
#[tokio::test]
async fn records_are_scoped_to_the_callers_account() {
    let app = start().await;
    let scopes = ["ledgers:write", "ledgers:read"];
    let (a1, _) = app.key("a1", &scopes).await;
    let (a1_too, _) = app.key("a1", &scopes).await;
    let (a2, _) = app.key("a2", &scopes).await;
    let mut ids = Vec::new();
    for who in [&a1, &a2, &app.master] {
        let reply = app
            .send(
                Method::POST,
                "/ledgers",
                Some(who),
                Some(r#"{"name": "cash"}"#),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        ids.push(reply.json()["ledger_id"].as_str().unwrap().to_owned());
    }
    let (in_a1, in_a2, masters) = (&ids[0], &ids[1], &ids[2]);

    assert_eq!(app.listed("ledgers", "ledger", &a1).await, [in_a1.as_str()]);
    assert_eq!(
        app.listed("ledgers", "ledger", &a1_too).await,
        [in_a1.as_str()],
        "another key of the same account sees it"
    );
    assert_eq!(app.listed("ledgers", "ledger", &a2).await, [in_a2.as_str()]);
    let mut all = app.listed("ledgers", "ledger", &app.master).await;
    all.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(all, want, "the master key sees every record");

    assert_eq!(app.get(&a1, in_a1).await.status, StatusCode::OK);
    for (key, id) in [(&a1, in_a2), (&a2, in_a1), (&a1, masters), (&a2, masters)] {
        let reply = app.get(key, id).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text);
        assert_eq!(reply.code(), "RECORD_NOT_FOUND");
    }
    for id in &ids {
        assert_eq!(app.get(&app.master, id).await.status, StatusCode::OK);
    }
}

/// Content types and encodings a client might send, odd casing and whitespace included.
const CONTENT_TYPES: [&str; 12] = [
    "application/json",
    "Application/JSON; charset=UTF-8",
    " application/json ",
    "application/vnd.api+json",
    "application/json; charset=utf-16",
    "application/json, text/plain",
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonp",
    "",
];
const CONTENT_ENCODINGS: [&str; 7] = ["identity", "IDENTITY", "gzip", "Gzip", "br", " gzip", ""];
/// Bodies whose only `forged` is a forged stamp.
const BODIES: [&str; 7] = [
    FORGED,
    r#"{"meta\u005fdata": {"BLNK_GENERATED\u005fBY": "forged"}}"#,
    r#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}, "meta_data": {"BLNK_GENERATED_BY": "forged"}}"#,
    r#"{"meta_data": {"BLNK_GENERATED_BY": "forged", "BLNK_GENERATED_BY": "forged"}}"#,
    r#"[{"meta_data": {"BLNK_GENERATED_BY": "forged"}}]"#,
    r#"{"meta_data": null, "amount": 12345678901234567890123}"#,
    r#"{"name": "cash"}"#,
];

/// Cases of `no_framing_forges_a_stamp_through_the_example`.
const EXAMPLE_CASES: u32 = 512;

/// Issue #12's provenance property, end to end through the example's router and SQLite: a scoped
/// key's request (random Content-Type and Content-Encoding headers, repeats included, and bodies)
/// is refused with nothing stored, or the stored record's stamp is exactly the caller's key id.
#[test]
fn no_framing_forges_a_stamp_through_the_example() {
    use proptest::prelude::*;
    use tower::ServiceExt;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(start());
    let (key, key_id) = runtime.block_on(app.key("a1", &["ledgers:write", "ledgers:read"]));
    // Mostly one header, often an accepted one; sometimes none, sometimes two.
    let headers = |pool: &'static [&'static str], accepted: usize| {
        prop_oneof![
            2 => Just(vec![]),
            6 => prop::sample::select(&pool[..accepted]).prop_map(|v| vec![v]),
            3 => prop::sample::select(pool).prop_map(|v| vec![v]),
            2 => prop::collection::vec(prop::sample::select(pool), 2..=2),
        ]
    };
    let strategy = (
        headers(&CONTENT_TYPES, 4),
        headers(&CONTENT_ENCODINGS, 2),
        prop::sample::select(&BODIES[..]),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: EXAMPLE_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let created = std::cell::Cell::new(0u32);
    let started = std::time::Instant::now();
    runner
        .run(&strategy, |(types, encodings, body)| {
            let mut request = Request::post("/ledgers").header("x-api-key", &key);
            for value in &types {
                request = request.header("content-type", *value);
            }
            for value in &encodings {
                request = request.header("content-encoding", *value);
            }
            let request = request.body(axum::body::Body::from(body)).unwrap();
            let before = runtime.block_on(app.stored());
            let response = runtime
                .block_on(app.router.clone().oneshot(request))
                .unwrap();
            let status = response.status();
            let text = runtime
                .block_on(response.into_body().collect())
                .unwrap()
                .to_bytes();
            let text = String::from_utf8_lossy(&text).into_owned();
            let after = runtime.block_on(app.stored());
            if status != StatusCode::CREATED {
                prop_assert!(status.is_client_error(), "{status}: {text}");
                prop_assert_eq!(after, before, "refused ({}) but stored", status);
                return Ok(());
            }
            created.set(created.get() + 1);
            prop_assert_eq!(after, before + 1);
            let record: Value = serde_json::from_str(&text).unwrap();
            let id = record["ledger_id"].as_str().unwrap();
            let stored = runtime.block_on(app.get(&app.master, id));
            for text in [&text, &stored.text] {
                let record: Value = serde_json::from_str(text).unwrap();
                prop_assert_eq!(&record["meta_data"]["BLNK_GENERATED_BY"], key_id.as_str());
                prop_assert!(
                    !text.contains("forged"),
                    "a forged stamp was kept: {}",
                    text
                );
            }
            Ok(())
        })
        .unwrap();
    let created = created.get();
    eprintln!(
        "{EXAMPLE_CASES} framings through the example in {:?}: {created} created",
        started.elapsed()
    );
    assert!(created > EXAMPLE_CASES / 10, "only {created} created");
    assert!(
        created < EXAMPLE_CASES / 2 * 2,
        "{created} created: nothing refused?"
    );
}
