//! Every input is bounded: each limit at its edge (accepted) and one past it (refused with a typed
//! error and a stable code). The presented-key limit is driven over real HTTP; the rest through the
//! public routers with `oneshot` and through the library API.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_api_keys::error::{AuthError, ErrorCode};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::MAX_PRESENTED_KEY_LEN;
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{
    self, CreateKey, DEFAULT_PAGE_SIZE, KeyManager, MAX_BODY_BYTES, MAX_GRACE_PERIOD,
    MAX_KEY_ID_LEN, MAX_NAME_LEN, MAX_OWNER_LEN, MAX_PAGE_SIZE, MAX_SCOPES,
};
use tower_api_keys::principal::Principal;
use tower_api_keys::provenance::DEFAULT_MAX_BODY_BYTES;
use tower_api_keys::provenance::ProvenanceLayer;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scope::MAX_SCOPE_LEN;

struct Fixture {
    store: Arc<TestStore>,
    manager: KeyManager,
    app: Router,
}

fn fixture() -> Fixture {
    let store = TestStore::new();
    let resolver = CachedResolver::builder(store.clone())
        .format(KeyFormat::new("sk_live").unwrap())
        .build();
    let manager = KeyManager::new(resolver.clone());
    let app = Router::new()
        .route(
            "/whoami",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .route(
            "/records",
            post(|body: Bytes| async move { body })
                .route_layer(ProvenanceLayer::new())
                // The stamp makes a body at the layer's limit longer than axum's default limit
                // (also 2 MiB): the handler's own limit must leave room for it.
                .layer(DefaultBodyLimit::max(DEFAULT_MAX_BODY_BYTES + 1024)),
        )
        .merge(manage::router(manager.clone()))
        .layer(
            ApiKeyLayer::new(resolver)
                .sources([
                    KeySource::x_api_key(),
                    KeySource::blnk(),
                    KeySource::bearer(),
                ])
                .master_key(ApiKey::new(MASTER)),
        );
    Fixture {
        store,
        manager,
        app,
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
    error: Option<AuthError>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }

    /// The stable code, checked to agree with the typed error in the extensions.
    fn code(&self) -> String {
        let code = self.json()["error_detail"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.text))
            .to_owned();
        let typed = self.error.as_ref().expect("the typed error travels along");
        assert_eq!(typed.code().as_str(), code);
        code
    }

    fn assert_refused(&self, status: StatusCode, code: ErrorCode, message: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.code(), code.as_str(), "{}", self.text);
        assert!(
            self.json()["error"].as_str().unwrap().contains(message),
            "expected {message:?} in {}",
            self.text
        );
    }
}

async fn send(app: &Router, method: &str, uri: &str, key: &str, body: Option<String>) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", key);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, Body::from))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let error = response.extensions().get::<AuthError>().cloned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        error,
    }
}

async fn create(f: &Fixture, body: Value) -> Reply {
    send(&f.app, "POST", "/api-keys", MASTER, Some(body.to_string())).await
}

// --- the presented key --------------------------------------------------------------------------

#[tokio::test]
async fn a_64_kib_key_header_over_http_is_a_clean_401_with_no_store_call() {
    let f = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, f.app.clone()).into_future());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let huge = "A".repeat(64 * 1024);
    for (header, value) in [
        ("x-api-key", huge.clone()),
        ("x-blnk-key", format!("sk_live_{huge}")),
        ("authorization", format!("Bearer {huge}")),
        ("x-api-key", "k".repeat(MAX_PRESENTED_KEY_LEN + 1)),
    ] {
        let request = Request::get(format!("{base}/whoami"))
            .header(header, &value)
            .body(Full::default())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{header}");
        assert!(response.headers().contains_key("www-authenticate"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.len() < 1024, "the body does not grow with the key");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error_detail"]["code"], "AUTH_INVALID_API_KEY");
        assert_eq!(body["error_detail"]["details"]["reason"], "malformed");
        assert!(!body.to_string().contains("AAAAAAAA"), "the key is echoed");
    }
    assert_eq!(f.store.lookups(), 0, "an oversized key reaches no store");

    // At the limit the value is still looked at: a master key of exactly MAX_PRESENTED_KEY_LEN
    // bytes works, one byte more does not.
    let long_master = "m".repeat(MAX_PRESENTED_KEY_LEN);
    let store = TestStore::new();
    let app = Router::new()
        .route(
            "/whoami",
            get(|p: Principal| async move { p.name().to_owned() }),
        )
        .layer(
            ApiKeyLayer::new(CachedResolver::new(store.clone()))
                .master_key(ApiKey::new(long_master.clone())),
        );
    let ok = send(&app, "GET", "/whoami", &long_master, None).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let over = send(&app, "GET", "/whoami", &format!("{long_master}m"), None).await;
    over.assert_refused(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidApiKey,
        "invalid",
    );
    assert_eq!(store.lookups(), 0);
}

// --- provenance ----------------------------------------------------------------------------------

/// A JSON object of exactly `len` bytes.
fn padded(len: usize) -> String {
    let skeleton = r#"{"pad":""}"#;
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(len - skeleton.len()))
}

#[tokio::test]
async fn provenance_reads_at_most_2_mib_by_default() {
    // `tests/provenance.rs` covers a configured limit, streamed bodies and Content-Length; this is
    // the default every `ProvenanceLayer::new()` gets.
    assert_eq!(DEFAULT_MAX_BODY_BYTES, 2 * 1024 * 1024);
    let f = fixture();
    let created = f
        .manager
        .create(
            &Principal::master(),
            CreateKey::new(["records:write"]).owner("o"),
        )
        .await
        .unwrap();
    let key = created.key.expose_secret();

    let at_limit = send(
        &f.app,
        "POST",
        "/records",
        key,
        Some(padded(DEFAULT_MAX_BODY_BYTES)),
    )
    .await;
    assert_eq!(at_limit.status, StatusCode::OK);
    assert!(at_limit.text.ends_with(&format!(
        r#","meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#,
        created.info.id
    )));

    let over = send(
        &f.app,
        "POST",
        "/records",
        key,
        Some(padded(DEFAULT_MAX_BODY_BYTES + 1)),
    )
    .await;
    over.assert_refused(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        "2097152 bytes",
    );
    assert_eq!(over.json()["error_detail"]["details"]["limit"], 2_097_152);
}

// --- key management --------------------------------------------------------------------------------

#[tokio::test]
async fn name_is_at_most_128_characters() {
    let f = fixture();
    // Characters, not bytes: 128 four-byte characters are fine.
    let longest = "🔑".repeat(MAX_NAME_LEN);
    let ok = create(
        &f,
        json!({"owner": "o", "scopes": ["a:b"], "name": longest}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    assert_eq!(ok.json()["name"], longest);

    let too_long = format!("{longest}x");
    create(
        &f,
        json!({"owner": "o", "scopes": ["a:b"], "name": too_long}),
    )
    .await
    .assert_refused(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "longer than 128 characters",
    );
    // Counted as sent, like the OpenAPI `maxLength`: padding does not sneak past it.
    let padded = format!("  {}  ", "n".repeat(MAX_NAME_LEN - 1));
    create(&f, json!({"owner": "o", "scopes": ["a:b"], "name": padded}))
        .await
        .assert_refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "longer than 128",
        );
}

#[tokio::test]
async fn owner_and_account_are_at_most_128_visible_ascii_characters() {
    let f = fixture();
    let longest = "o".repeat(MAX_OWNER_LEN);
    let ok = create(
        &f,
        json!({"owner": longest, "account": longest, "scopes": ["a:b"]}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);

    let too_long = "o".repeat(MAX_OWNER_LEN + 1);
    for body in [
        json!({"owner": too_long, "scopes": ["a:b"]}),
        json!({"owner": "o", "account": too_long, "scopes": ["a:b"]}),
        json!({"owner": "o w", "scopes": ["a:b"]}),
        json!({"owner": "", "scopes": ["a:b"]}),
    ] {
        create(&f, body).await.assert_refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "1 to 128 visible ASCII characters",
        );
    }
    let list = send(
        &f.app,
        "GET",
        &format!("/api-keys?owner={too_long}"),
        MASTER,
        None,
    )
    .await;
    list.assert_refused(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, "owner");
}

#[tokio::test]
async fn a_scope_is_at_most_128_characters_and_a_key_holds_at_most_64() {
    let f = fixture();
    let longest = format!("{}:b", "r".repeat(MAX_SCOPE_LEN - 2));
    let ok = create(&f, json!({"owner": "o", "scopes": [longest]})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);

    let too_long = format!("r{longest}");
    let refused = create(&f, json!({"owner": "o", "scopes": [too_long]})).await;
    refused.assert_refused(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "at most 128 characters",
    );

    let many: Vec<String> = (0..MAX_SCOPES).map(|i| format!("r{i}:read")).collect();
    let ok = create(&f, json!({"owner": "o", "scopes": many})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    assert_eq!(ok.json()["scopes"].as_array().unwrap().len(), MAX_SCOPES);

    let too_many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("r{i}:read")).collect();
    create(&f, json!({"owner": "o", "scopes": too_many}))
        .await
        .assert_refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "at most 64 scopes",
        );
}

#[tokio::test]
async fn page_size_is_1_to_100_and_out_of_range_is_a_400_not_a_silent_clamp() {
    let f = fixture();
    for i in 0..(MAX_PAGE_SIZE + 1) {
        f.manager
            .create(
                &Principal::master(),
                CreateKey::new(["a:b"]).owner("o").name(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    let page = |limit: &str| {
        let uri = format!("/api-keys?owner=o{limit}");
        let app = f.app.clone();
        async move { send(&app, "GET", &uri, MASTER, None).await }
    };
    let len = |reply: &Reply| reply.json().as_array().unwrap().len();

    let default = page("").await;
    assert_eq!(default.status, StatusCode::OK);
    assert_eq!(len(&default), DEFAULT_PAGE_SIZE as usize);
    assert!(default.headers.contains_key("x-next-cursor"));

    let largest = page("&limit=100").await;
    assert_eq!(len(&largest), MAX_PAGE_SIZE as usize);
    assert!(largest.headers.contains_key("x-next-cursor"), "101 keys");
    assert_eq!(len(&page("&limit=1").await), 1);

    for limit in ["0", "101", "4294967295"] {
        page(&format!("&limit={limit}")).await.assert_refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 100",
        );
    }
    // Past u32: a parse error, still a 400 with the error shape.
    page("&limit=4294967296").await.assert_refused(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "invalid query",
    );

    // The library API refuses the same way.
    let error = f
        .manager
        .list(&Principal::master(), Some("o"), None, MAX_PAGE_SIZE + 1)
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidRequest);
}

#[tokio::test]
async fn cursors_and_key_ids_are_at_most_128_characters() {
    let f = fixture();
    let long_id = "k".repeat(MAX_KEY_ID_LEN + 1);
    send(
        &f.app,
        "GET",
        &format!("/api-keys?owner=o&before={long_id}"),
        MASTER,
        None,
    )
    .await
    .assert_refused(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "before must be a key id",
    );
    // A key id in a path: no such key, whatever its length (no existence or format oracle).
    for id in ["k".repeat(MAX_KEY_ID_LEN), long_id] {
        send(&f.app, "GET", &format!("/api-keys/{id}"), MASTER, None)
            .await
            .assert_refused(StatusCode::NOT_FOUND, ErrorCode::NotFound, "not found");
    }
}

#[tokio::test]
async fn management_bodies_are_at_most_64_kib() {
    let f = fixture();
    // The largest body every other limit allows fits with room to spare.
    let scopes: Vec<String> = (0..MAX_SCOPES)
        .map(|i| format!("{}{i:02}:read", "r".repeat(MAX_SCOPE_LEN - 7)))
        .collect();
    let largest = json!({
        "name": "🔑".repeat(MAX_NAME_LEN),
        "owner": "o".repeat(MAX_OWNER_LEN),
        "account": "a".repeat(MAX_OWNER_LEN),
        "scopes": scopes,
        "expires_at": "2099-01-01T00:00:00Z",
    })
    .to_string();
    assert!(largest.len() < MAX_BODY_BYTES / 4, "{}", largest.len());
    let ok = send(&f.app, "POST", "/api-keys", MASTER, Some(largest)).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);

    // Whitespace pads a valid body to exactly the limit: still read.
    let body = json!({"owner": "o", "scopes": ["a:b"]}).to_string();
    let at_limit = format!("{body}{}", " ".repeat(MAX_BODY_BYTES - body.len()));
    let ok = send(&f.app, "POST", "/api-keys", MASTER, Some(at_limit.clone())).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);

    for path in ["/api-keys", "/api-keys/key_x/rotate"] {
        let over = send(&f.app, "POST", path, MASTER, Some(format!("{at_limit} "))).await;
        over.assert_refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "65536 bytes",
        );
        assert_eq!(over.json()["error_detail"]["details"]["limit"], 65_536);
    }
}

#[tokio::test]
async fn rotation_grace_is_at_most_30_days() {
    let f = fixture();
    let created = f
        .manager
        .create(&Principal::master(), CreateKey::new(["a:b"]).owner("o"))
        .await
        .unwrap();
    let rotate = |seconds: u64| {
        let uri = format!("/api-keys/{}/rotate", created.info.id);
        let app = f.app.clone();
        async move {
            let body = json!({ "grace_period_seconds": seconds }).to_string();
            send(&app, "POST", &uri, MASTER, Some(body)).await
        }
    };
    assert_eq!(MAX_GRACE_PERIOD.as_secs(), 2_592_000);
    rotate(MAX_GRACE_PERIOD.as_secs() + 1).await.assert_refused(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "at most 30 days",
    );
    let ok = rotate(MAX_GRACE_PERIOD.as_secs()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);

    // The library API enforces it too, before touching the store.
    let error = f
        .manager
        .rotate(
            &Principal::master(),
            &created.info.id,
            Some(MAX_GRACE_PERIOD + Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidRequest);
}

#[tokio::test]
async fn the_library_api_has_the_same_limits_as_the_router() {
    let f = fixture();
    let master = Principal::master();
    let refused = [
        CreateKey::new(["a:b"])
            .owner("o")
            .name("n".repeat(MAX_NAME_LEN + 1)),
        CreateKey::new(["a:b"]).owner("o".repeat(MAX_OWNER_LEN + 1)),
        CreateKey::new(["a:b"])
            .owner("o")
            .account("a".repeat(MAX_OWNER_LEN + 1)),
        CreateKey::new([format!("{}:b", "r".repeat(MAX_SCOPE_LEN))]).owner("o"),
        CreateKey::new((0..=MAX_SCOPES).map(|i| format!("r{i}:read"))).owner("o"),
    ];
    for request in refused {
        let error = f
            .manager
            .create(&master, request.clone())
            .await
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidRequest, "{request:?}");
    }
}
