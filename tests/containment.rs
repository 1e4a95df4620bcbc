//! Regression tests for issue #19 items 1–4, each reproduced as the attacker did: over real HTTP,
//! against the management router and a limited route behind `ApiKeyLayer`, with the rate limiter
//! counting credits in the key store. Items 5–8 are in `tests/containment_http.rs`; the rule as a
//! whole is held against a reference model in `tests/authorization_model.rs`.
//!
//! What must hold (the invariants of `manage::authorize`): a scoped key governs its own subtree
//! only (I1), grants only narrow (I2), and a budget binds the whole subtree below it (I3).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::MASTER;
use common::ratelimit::{blast, client, count, serve};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::ratelimit::{MemoryRates, RateLimiter, StoreCredits};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

/// A service with `GET /ledgers` (cost 1, limited) and the management API, on a local port.
struct Server {
    addr: SocketAddr,
}

async fn start() -> Server {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let limiter = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let app = Router::new()
        .route(
            "/ledgers",
            get(|| async { "ledgers" }).route_layer(limiter.layer()),
        )
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)));
    Server {
        addr: serve(app).await,
    }
}

impl Server {
    async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("x-api-key", key);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let response = client().request(request.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Creates a key with `caller` and returns its secret and id.
    async fn create(&self, caller: &str, body: Value) -> (String, String) {
        let (status, json) = self.send("POST", "/api-keys", caller, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{json}");
        (
            json["key"].as_str().unwrap().to_owned(),
            json["api_key_id"].as_str().unwrap().to_owned(),
        )
    }

    /// How many of `n` concurrent `GET /ledgers`, spread over `keys`, were admitted.
    async fn admitted(&self, keys: &[&str], n: usize) -> usize {
        let mut tasks = Vec::new();
        for key in keys.iter().cycle().take(n) {
            let addr = self.addr;
            let key = (*key).to_owned();
            tasks.push(tokio::spawn(async move {
                blast(&[addr], "/ledgers", &key, 1).await.remove(0).status
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            let status = task.await.unwrap();
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "{status}"
            );
            admitted += usize::from(status == StatusCode::OK);
        }
        admitted
    }
}

fn code(json: &Value) -> &str {
    json["error_detail"]["code"].as_str().unwrap_or("")
}

const WRITER: [&str; 2] = ["api-keys:write", "ledgers:read"];

/// Item 1 (HIGH): a child refilled its parent's credits with PATCH, again and again (100 requests
/// admitted on a budget of 5), and equal siblings refilled each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_cannot_be_refilled_from_below_or_beside() {
    let s = start().await;
    let credits = json!({"remaining": 5, "refill": {"interval": "monthly", "amount": 5}});
    let (parent, parent_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": WRITER, "credits": credits}),
        )
        .await;
    let (child, child_id) = s.create(&parent, json!({"scopes": WRITER})).await;
    let (sibling, sibling_id) = s.create(&parent, json!({"scopes": WRITER})).await;

    // Upwards and sideways, every change is refused before anything is written.
    for (caller, target) in [
        (&child, &parent_id),
        (&child, &sibling_id),
        (&sibling, &child_id),
    ] {
        let (status, json) = s
            .send(
                "PATCH",
                &format!("/api-keys/{target}"),
                caller,
                Some(json!({"credits": {"remaining": 5}})),
            )
            .await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"),
            "{json}"
        );
    }
    // The three keys together spend the parent's 5 credits, and not one more.
    assert_eq!(s.admitted(&[&parent, &child, &sibling], 60).await, 5);
    // The parent may refill its own child (inside its subtree), but never beyond what it has left
    // (0 now): and whatever the child holds, its requests spend the parent's credits too.
    let (status, json) = s
        .send(
            "PATCH",
            &format!("/api-keys/{child_id}"),
            &parent,
            Some(json!({"credits": {"remaining": 5}})),
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION"),
        "{json}"
    );
    assert_eq!(s.admitted(&[&child], 10).await, 0);
    // The master key refills the parent: the subtree has 5 again, in all.
    let (status, json) = s
        .send(
            "PATCH",
            &format!("/api-keys/{parent_id}"),
            MASTER,
            Some(json!({"credits": {"remaining": 5}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(s.admitted(&[&parent, &child, &sibling], 60).await, 5);
}

/// Item 2 (MEDIUM-HIGH): a key limited to 1 request an hour rotated an unlimited sibling, or its
/// own unlimited parent, and used the new secret without a limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limited_key_cannot_rotate_its_way_out_of_its_limits() {
    let s = start().await;
    let (parent, parent_id) = s
        .create(MASTER, json!({"owner": "o", "scopes": WRITER}))
        .await;
    let (limited, _) = s
        .create(
            &parent,
            json!({"scopes": WRITER, "rate_limit": {"limit": 1, "period_seconds": 3600},
                   "credits": {"remaining": 1}}),
        )
        .await;
    let (_, sibling_id) = s.create(&parent, json!({"scopes": WRITER})).await;
    for target in [&parent_id, &sibling_id] {
        for body in [json!({}), json!({"grace_period_seconds": 2_592_000})] {
            let (status, json) = s
                .send(
                    "POST",
                    &format!("/api-keys/{target}/rotate"),
                    &limited,
                    Some(body),
                )
                .await;
            assert_eq!(
                (status, code(&json)),
                (StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"),
                "{json}"
            );
            assert!(json.get("key").is_none());
        }
    }
    // What it can reach, its own delegates, spend its budget: 1 request in all.
    let (grandchild, grandchild_id) = s
        .create(&limited, json!({"scopes": ["ledgers:read"]}))
        .await;
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{grandchild_id}/rotate"),
            &limited,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let rotated = json["key"].as_str().unwrap().to_owned();
    assert_ne!(rotated, grandchild);
    assert_eq!(s.admitted(&[&rotated, &limited], 50).await, 1);
}

/// Item 3 (MEDIUM): a parent limited to 2 an hour and its 8 children were admitted 18 times; 30
/// short-lived children made 60 requests; a parent with 3 credits and its delegates, 39.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegation_never_multiplies_a_budget() {
    let s = start().await;
    let (parent, _) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": WRITER,
                   "rate_limit": {"limit": 2, "period_seconds": 3600}}),
        )
        .await;
    let mut keys = vec![parent.clone()];
    for _ in 0..8 {
        keys.push(s.create(&parent, json!({"scopes": WRITER})).await.0);
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(s.admitted(&keys, 90).await, 2, "at once");
    // Churn: create, use and revoke short-lived children: nothing more.
    let mut churned = 0;
    for _ in 0..30 {
        let (child, child_id) = s.create(&parent, json!({"scopes": ["ledgers:read"]})).await;
        churned += s.admitted(&[&child], 2).await;
        let (status, _) = s
            .send("DELETE", &format!("/api-keys/{child_id}"), &parent, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    assert_eq!(churned, 0);

    // Credits the same way.
    let (parent, _) = s
        .create(
            MASTER,
            json!({"owner": "o2", "scopes": WRITER, "credits": {"remaining": 3}}),
        )
        .await;
    let mut keys = vec![parent.clone()];
    for _ in 0..6 {
        let (child, _) = s.create(&parent, json!({"scopes": WRITER})).await;
        keys.push(
            s.create(&child, json!({"scopes": ["ledgers:read"]}))
                .await
                .0,
        );
        keys.push(child);
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(s.admitted(&keys, 80).await, 3);
}

/// Item 4 (MEDIUM): a child renamed its parent, zeroed its limits, revoked it, or rotated it with
/// a 30-day grace; after the owner revoked the leaked child, the stolen parent secret still worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_never_acts_on_its_creator() {
    let s = start().await;
    let (parent, parent_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": WRITER, "name": "parent"}),
        )
        .await;
    let (child, child_id) = s.create(&parent, json!({"scopes": WRITER})).await;
    let attempts = [
        (
            "PATCH",
            format!("/api-keys/{parent_id}"),
            Some(json!({"name": "pwned"})),
        ),
        (
            "PATCH",
            format!("/api-keys/{parent_id}"),
            Some(
                json!({"rate_limit": {"limit": 1, "period_seconds": 86400}, "credits": {"remaining": 0}}),
            ),
        ),
        ("DELETE", format!("/api-keys/{parent_id}"), None),
        ("DELETE", format!("/api-keys/{parent_id}?owner=o"), None),
        (
            "POST",
            format!("/api-keys/{parent_id}/rotate"),
            Some(json!({"grace_period_seconds": 2_592_000})),
        ),
    ];
    for (method, path, body) in attempts {
        let (status, json) = s.send(method, &path, &child, body).await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"),
            "{method} {path}: {json}"
        );
        assert!(json.get("key").is_none());
    }
    let (_, json) = s
        .send("GET", &format!("/api-keys/{parent_id}"), MASTER, None)
        .await;
    assert_eq!(
        (
            json["name"].as_str(),
            &json["rate_limit"],
            &json["credits"],
            &json["rotated_at"],
            json["is_revoked"].as_bool()
        ),
        (
            Some("parent"),
            &Value::Null,
            &Value::Null,
            &Value::Null,
            Some(false)
        ),
        "the parent is untouched: {json}"
    );
    // The owner revokes the leaked child, as the README advises: everything the child obtained
    // ends with it (here: nothing beyond itself), and the parent keeps working.
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{child_id}"), MASTER, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        count(
            &blast(&[s.addr], "/ledgers", &child, 3).await,
            StatusCode::UNAUTHORIZED
        ),
        3
    );
    assert_eq!(
        count(
            &blast(&[s.addr], "/ledgers", &parent, 3).await,
            StatusCode::OK
        ),
        3
    );
}

/// Another angle (not in the report): a key tightening its own rate limit, or a creator
/// re-limiting its delegate, got a fresh, full window each time (10 + 9 + 8 + ... in one hour).
/// A changed limit goes on from the window in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_a_limit_never_buys_a_fresh_window() {
    let s = start().await;
    let (key, id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": WRITER,
                   "rate_limit": {"limit": 10, "period_seconds": 3600}}),
        )
        .await;
    let (child, child_id) = s.create(&key, json!({"scopes": ["ledgers:read"]})).await;
    assert_eq!(s.admitted(&[&key], 10).await, 10);
    for limit in (1..10).rev() {
        for (target, caller) in [(&id, &key), (&child_id, &key)] {
            let (status, json) = s
                .send(
                    "PATCH",
                    &format!("/api-keys/{target}"),
                    caller,
                    Some(json!({"rate_limit": {"limit": limit, "period_seconds": 3600}})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{json}");
        }
        assert_eq!(s.admitted(&[&key, &child], 4).await, 0, "limit {limit}");
    }
}

/// The answer to an operation that ends the calling key itself is still delivered whole (I4 ends
/// streams, not answers already made): a key rotating itself receives its new secret, a key
/// revoking itself its 204. The model test found these cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_ending_itself_gets_its_answer() {
    let s = start().await;
    let (key, id) = s
        .create(MASTER, json!({"owner": "o", "scopes": WRITER}))
        .await;
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{id}/rotate"),
            &key,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let rotated = json["key"].as_str().expect("the new secret").to_owned();
    assert_eq!(
        count(
            &blast(&[s.addr], "/ledgers", &key, 1).await,
            StatusCode::UNAUTHORIZED
        ),
        1
    );
    assert_eq!(
        count(
            &blast(&[s.addr], "/ledgers", &rotated, 1).await,
            StatusCode::OK
        ),
        1
    );
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{id}"), &rotated, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        count(
            &blast(&[s.addr], "/ledgers", &rotated, 1).await,
            StatusCode::UNAUTHORIZED
        ),
        1
    );
}
