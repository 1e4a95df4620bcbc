//! What the key console reads from the management API: `GET /api-keys/self` (who the signed-in key
//! is) and `GET /api-keys/policy` (lifetimes, and active keys against the limit), and the console
//! router mounted beside the API.

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use common::*;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::console::{CONTENT_SECURITY_POLICY, Console};
use tower_api_keys::manage::{self, KeyManager, KeyPolicy};
use tower_api_keys::resolver::CachedResolver;

fn app(policy: KeyPolicy) -> Router {
    let store = TestStore::new();
    let resolver = CachedResolver::builder(store.clone())
        .format(KeyFormat::new("sk_live").unwrap())
        .build();
    let manager = KeyManager::new(resolver.clone()).policy(policy);
    Router::new()
        .merge(manage::router(manager))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)))
        .nest(
            "/console",
            Console::new()
                .scope("ledgers:read".parse().unwrap(), "Read ledgers")
                .router(),
        )
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if !key.is_empty() {
        request = request.header("x-api-key", key);
    }
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
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn create(app: &Router, key: &str, body: Value) -> Value {
    let (status, created) = call(app, "POST", "/api-keys", key, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

fn at(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().expect("a timestamp"), &Rfc3339).unwrap()
}

#[tokio::test]
async fn self_describes_the_master_key_and_a_scoped_key() {
    let app = app(KeyPolicy::default());
    let (status, me) = call(&app, "GET", "/api-keys/self", MASTER, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        me,
        json!({"kind": "master", "api_key_id": "master", "name": "master key", "owner_id": null,
               "account_id": null, "scopes": ["*:*"], "expires_at": null, "rate_limit": null,
               "credits": null})
    );

    let expires = "2099-01-01T00:00:00Z";
    let created = create(
        &app,
        MASTER,
        json!({"name": "reporting", "owner": "acme", "scopes": ["ledgers:read"], "expires_at": expires,
               "rate_limit": {"limit": 10, "period_seconds": 60},
               "credits": {"remaining": 500, "refill": {"interval": "monthly", "amount": 500}}}),
    )
    .await;
    let key = created["key"].as_str().unwrap();
    // Any valid key may ask who it is, even one that cannot manage keys.
    let (status, me) = call(&app, "GET", "/api-keys/self", key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        me,
        json!({"kind": "scoped", "api_key_id": created["api_key_id"], "name": "reporting",
               "owner_id": "acme", "account_id": "acme", "scopes": ["ledgers:read"],
               "expires_at": expires, "rate_limit": {"limit": 10, "period_seconds": 60},
               "credits": {"remaining": 500, "refill": {"interval": "monthly", "amount": 500}}})
    );
    assert!(me.get("key").is_none() && !me.to_string().contains(key));

    let (status, refused) = call(&app, "GET", "/api-keys/self", "", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused["error_detail"]["code"], "AUTH_MISSING_API_KEY");
}

#[tokio::test]
async fn policy_counts_the_owners_active_keys_against_the_limit() {
    let app = app(KeyPolicy::default()
        .max_active_per_owner(3)
        .max_lifetime(Duration::from_secs(30 * 86_400)));
    let (status, refused) = call(&app, "GET", "/api-keys/policy", MASTER, None).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the master key names the owner"
    );
    assert_eq!(refused["error_detail"]["code"], "APIKEY_OWNER_REQUIRED");

    let (status, empty) = call(&app, "GET", "/api-keys/policy?owner=acme", MASTER, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(empty["owner_id"], "acme");
    assert_eq!(empty["active_keys"], 0);
    assert_eq!(empty["max_active_per_owner"], 3);
    assert_eq!(empty["max_active_per_account"], Value::Null);
    assert_eq!(empty["max_lifetime_seconds"], 30 * 86_400);
    assert_eq!(empty["default_lifetime_seconds"], Value::Null);
    assert_eq!(empty["never_expires_allowed"], false);
    let now = OffsetDateTime::now_utc();
    let latest = at(&empty["latest_expires_at"]);
    assert!((latest - (now + Duration::from_secs(30 * 86_400))).abs() < time::Duration::seconds(5));
    assert_eq!(empty["default_expires_at"], empty["latest_expires_at"]);

    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        let created = create(
            &app,
            MASTER,
            json!({"name": name, "owner": "acme", "scopes": ["ledgers:read"]}),
        )
        .await;
        ids.push(created["api_key_id"].as_str().unwrap().to_owned());
    }
    create(
        &app,
        MASTER,
        json!({"owner": "globex", "scopes": ["ledgers:read"]}),
    )
    .await;
    let (_, full) = call(&app, "GET", "/api-keys/policy?owner=acme", MASTER, None).await;
    assert_eq!(full["active_keys"], 3, "globex's key is not acme's");
    let (status, _) = call(
        &app,
        "POST",
        "/api-keys",
        MASTER,
        Some(json!({"owner": "acme", "scopes": ["ledgers:read"]})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the count matches the limit the API enforces"
    );

    // A revoked key stays listed but no longer counts.
    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/api-keys/{}", ids[0]),
        MASTER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, after) = call(&app, "GET", "/api-keys/policy?owner=acme", MASTER, None).await;
    assert_eq!(after["active_keys"], 2);
    assert_eq!(after["owner_pool"], Value::Null);
    // A shared pool shows in the policy the console reads (#19).
    let (status, set) = call(
        &app,
        "PUT",
        "/api-keys/pools",
        MASTER,
        Some(
            json!({"owner": "acme", "rate_limit": {"limit": 100, "period_seconds": 60},
                    "credits": {"remaining": 500}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let (_, pooled) = call(&app, "GET", "/api-keys/policy?owner=acme", MASTER, None).await;
    assert_eq!(
        (
            &pooled["owner_pool"]["rate_limit"],
            &pooled["owner_pool"]["credits"]["remaining"]
        ),
        (&json!({"limit": 100, "period_seconds": 60}), &json!(500)),
        "{pooled}"
    );
}

#[tokio::test]
async fn policy_counts_across_pages() {
    let app = app(KeyPolicy::default());
    for _ in 0..(manage::MAX_PAGE_SIZE + 5) {
        create(
            &app,
            MASTER,
            json!({"owner": "big", "scopes": ["ledgers:read"]}),
        )
        .await;
    }
    let (status, policy) = call(&app, "GET", "/api-keys/policy?owner=big", MASTER, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(policy["active_keys"], manage::MAX_PAGE_SIZE + 5);
    assert_eq!(policy["max_active_per_owner"], Value::Null);
    assert_eq!(policy["never_expires_allowed"], true);
    assert_eq!(policy["default_expires_at"], Value::Null);
    assert_eq!(policy["latest_expires_at"], Value::Null);
}

#[tokio::test]
async fn policy_follows_the_callers_own_rules() {
    let app = app(KeyPolicy::default().default_lifetime(Duration::from_secs(7 * 86_400)));
    let own_expiry = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    let delegate = create(
        &app,
        MASTER,
        json!({"owner": "acme", "scopes": ["ledgers:read", "api-keys:write"],
               "expires_at": own_expiry.format(&Rfc3339).unwrap()}),
    )
    .await;
    let key = delegate["key"].as_str().unwrap();

    // A scoped key reads its own owner's policy without naming it, and may not name another.
    let (status, policy) = call(&app, "GET", "/api-keys/policy", key, None).await;
    assert_eq!(status, StatusCode::OK, "{policy}");
    assert_eq!(policy["owner_id"], "acme");
    assert_eq!(policy["active_keys"], 1);
    assert_eq!(policy["default_lifetime_seconds"], 7 * 86_400);
    // Its children never outlive it: the default and the bound are its own expiry.
    assert_eq!(
        at(&policy["latest_expires_at"]),
        at(&delegate["expires_at"])
    );
    assert_eq!(
        at(&policy["default_expires_at"]),
        at(&delegate["expires_at"])
    );
    assert_eq!(policy["never_expires_allowed"], false);
    let (status, refused) = call(&app, "GET", "/api-keys/policy?owner=globex", key, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(refused["error_detail"]["code"], "AUTH_CROSS_OWNER_ACCESS");

    // The master key's default is the policy's lifetime.
    let (_, master) = call(&app, "GET", "/api-keys/policy?owner=acme", MASTER, None).await;
    let default = at(&master["default_expires_at"]);
    let expected = OffsetDateTime::now_utc() + Duration::from_secs(7 * 86_400);
    assert!((default - expected).abs() < time::Duration::seconds(5));
    assert_eq!(master["latest_expires_at"], Value::Null);
    assert_eq!(master["never_expires_allowed"], false);

    // A key that cannot read keys cannot read the policy either.
    let reader = create(
        &app,
        MASTER,
        json!({"owner": "acme", "scopes": ["ledgers:read"]}),
    )
    .await;
    let (status, refused) = call(
        &app,
        "GET",
        "/api-keys/policy",
        reader["key"].as_str().unwrap(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        refused["error_detail"]["code"],
        "AUTH_INSUFFICIENT_PERMISSIONS"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_both_endpoints() {
    let doc = serde_json::to_value(manage::openapi()).unwrap();
    for path in ["/api-keys/self", "/api-keys/policy"] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let schemas = &doc["components"]["schemas"];
    for field in [
        "active_keys",
        "max_active_per_owner",
        "latest_expires_at",
        "never_expires_allowed",
    ] {
        assert!(
            schemas["PolicyResponse"]["properties"][field].is_object(),
            "{field}"
        );
    }
    for field in [
        "kind",
        "owner_id",
        "scopes",
        "expires_at",
        "rate_limit",
        "credits",
    ] {
        assert!(
            schemas["CallerResponse"]["properties"][field].is_object(),
            "{field}"
        );
    }
}

#[tokio::test]
async fn the_console_beside_the_api_loads_without_a_key() {
    let app = app(KeyPolicy::default());
    let response = app
        .clone()
        .oneshot(Request::get("/console").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-security-policy"],
        CONTENT_SECURITY_POLICY
    );
    let (status, config) = call(&app, "GET", "/console/config.json", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["api_base"], "../");
    assert_eq!(config["scopes"][0]["scope"], "ledgers:read");
    // The API beside it still wants a key.
    let (status, _) = call(&app, "GET", "/api-keys?owner=acme", "", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
