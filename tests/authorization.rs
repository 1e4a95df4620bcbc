//! Regression tests for issue #12 (items 1, 2, 3, 5 and the no-op revoke), each reproduced as the
//! attacker did: over real HTTP, against the management router behind `ApiKeyLayer`. The rule as a
//! whole is held against a reference model in `tests/authorization_model.rs`.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::routing::get;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_api_keys::error::ErrorCode;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::invalidate::{Invalidation, Invalidator};
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{self, CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::StoreError;

/// Records every broadcast.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Invalidation>>>);

#[async_trait::async_trait]
impl Invalidator for Recorder {
    async fn publish(&self, invalidation: &Invalidation) -> Result<(), StoreError> {
        self.0.lock().unwrap().push(invalidation.clone());
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<Invalidation> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct Server {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    store: Arc<TestStore>,
    resolver: CachedResolver,
    manager: KeyManager,
    broadcasts: Recorder,
}

/// The management router and a `ledgers:read` route behind the layer, served on a free port.
async fn start() -> Server {
    let store = TestStore::new();
    let resolver = CachedResolver::builder(store.clone())
        .format(KeyFormat::new("sk_live").unwrap())
        .build();
    let broadcasts = Recorder::default();
    let manager = KeyManager::new(resolver.clone()).invalidator(broadcasts.clone());
    let app = Router::new()
        .route(
            "/ledgers",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .route_layer(RequireScopesLayer::all(["ledgers:read"]))
        .merge(manage::router(manager.clone()))
        .layer(
            ApiKeyLayer::new(resolver.clone())
                .sources([KeySource::blnk(), KeySource::x_api_key()])
                .master_key(ApiKey::new(MASTER)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app).into_future());
    Server {
        base,
        client: Client::builder(TokioExecutor::new()).build_http(),
        store,
        resolver,
        manager,
        broadcasts,
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
            .uri(format!("{}{path}", self.base))
            .header("x-blnk-key", key);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = self
            .client
            .request(request.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, json)
    }

    /// Creates a key as `caller`; returns (secret, id), asserting 201.
    async fn create(&self, caller: &str, body: Value) -> (String, String) {
        let (status, json) = self.send("POST", "/api-keys", caller, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{json}");
        secret_and_id(&json)
    }

    /// The status of a `ledgers:read` request with `key`.
    async fn ledgers(&self, key: &str) -> StatusCode {
        self.send("GET", "/ledgers", key, None).await.0
    }
}

fn secret_and_id(json: &Value) -> (String, String) {
    (
        json["key"].as_str().expect("a plaintext key").to_owned(),
        json["api_key_id"].as_str().unwrap().to_owned(),
    )
}

fn code(json: &Value) -> &str {
    json["error_detail"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {json}"))
}

fn in_days(days: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::days(days))
        .format(&Rfc3339)
        .unwrap()
}

fn digest_of(secret: &str) -> KeyDigest {
    ApiKey::new(secret).digest()
}

// ---------------------------------------------------------------------------------------------
// Item 1: rotate (and revoke) escalated.

#[tokio::test]
async fn a_narrow_key_cannot_rotate_or_revoke_a_broader_sibling() {
    let s = start().await;
    let (narrow, _) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let (broad, broad_id) = s
        .create(MASTER, json!({"owner": "o", "scopes": ["*:*"]}))
        .await;
    // A peer it covers, but did not create: outside its subtree (#19 I1), so also refused.
    let (peer, peer_id) = s
        .create(MASTER, json!({"owner": "o", "scopes": ["ledgers:read"]}))
        .await;
    for target in [&broad_id, &peer_id] {
        for body in [None, Some(json!({"grace_period_seconds": 2_592_000}))] {
            let (status, json) = s
                .send("POST", &format!("/api-keys/{target}/rotate"), &narrow, body)
                .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
            assert_eq!(code(&json), "AUTH_OUTSIDE_SUBTREE");
            assert!(json.get("key").is_none());
        }
        let (status, json) = s
            .send("DELETE", &format!("/api-keys/{target}"), &narrow, None)
            .await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE")
        );
    }
    // The siblings are untouched: same secrets, still working.
    for (secret, id) in [(&broad, &broad_id), (&peer, &peer_id)] {
        assert_eq!(s.ledgers(secret).await, StatusCode::OK);
        let (_, json) = s
            .send("GET", &format!("/api-keys/{id}"), MASTER, None)
            .await;
        assert_eq!(json["is_revoked"], false);
        assert_eq!(json["rotated_at"], Value::Null);
    }

    // What it created, it may rotate and revoke.
    let (_, child_id) = s.create(&narrow, json!({"scopes": ["ledgers:read"]})).await;
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{child_id}/rotate"),
            &narrow,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (rotated, _) = secret_and_id(&json);
    assert_eq!(s.ledgers(&rotated).await, StatusCode::OK);
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{child_id}"), &narrow, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(s.ledgers(&rotated).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_expiring_key_cannot_rotate_a_key_that_outlives_it() {
    let s = start().await;
    let (short, _) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"], "expires_at": in_days(10)}),
        )
        .await;
    // Keys it did not create are outside its subtree, whatever their expiry.
    for expires_at in [None, Some(in_days(20)), Some(in_days(5))] {
        let (_, target) = s
            .create(
                MASTER,
                json!({"owner": "o", "scopes": ["ledgers:read"], "expires_at": expires_at}),
            )
            .await;
        for (method, path) in [
            ("POST", format!("/api-keys/{target}/rotate")),
            ("DELETE", format!("/api-keys/{target}")),
        ] {
            let (status, json) = s.send(method, &path, &short, None).await;
            assert_eq!(
                (status, code(&json)),
                (StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"),
                "{method} {path}"
            );
        }
    }
    // Its own delegates never outlive it: asking for more is refused, the default is capped.
    let (status, json) = s
        .send(
            "POST",
            "/api-keys",
            &short,
            Some(json!({"scopes": ["ledgers:read"], "expires_at": in_days(20)})),
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION")
    );
    let (_, child) = s
        .create(
            &short,
            json!({"scopes": ["ledgers:read"], "expires_at": in_days(5)}),
        )
        .await;
    let (status, json) = s
        .send("POST", &format!("/api-keys/{child}/rotate"), &short, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
}

// ---------------------------------------------------------------------------------------------
// Item 2: the account boundary held on create only.

#[tokio::test]
async fn a_key_bound_to_one_account_cannot_touch_another_accounts_keys() {
    let s = start().await;
    let (a1, a1_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "account": "a1", "scopes": ["*:*"]}),
        )
        .await;
    let (a2, a2_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "account": "a2", "scopes": ["ledgers:read"]}),
        )
        .await;
    for (method, path, body) in [
        ("GET", format!("/api-keys/{a2_id}"), None),
        ("GET", format!("/api-keys/{a2_id}?owner=o"), None),
        (
            "POST",
            format!("/api-keys/{a2_id}/rotate"),
            Some(json!({"grace_period_seconds": 60})),
        ),
        ("DELETE", format!("/api-keys/{a2_id}"), None),
    ] {
        let (status, json) = s.send(method, &path, &a1, body).await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND"),
            "{method} {path}"
        );
    }
    let (status, json) = s
        .send(
            "DELETE",
            &format!("/api-keys/{a2_id}?permanent=true"),
            &a1,
            None,
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_MASTER_KEY_REQUIRED")
    );
    let (status, json) = s
        .send(
            "POST",
            "/api-keys",
            &a1,
            Some(json!({"account": "a2", "scopes": ["ledgers:read"]})),
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_CROSS_OWNER_ACCESS")
    );
    // The listing shows its own account only.
    let (status, json) = s.send("GET", "/api-keys", &a1, None).await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["api_key_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [a1_id.as_str()]);
    // a2's key still works and is unchanged; the master key sees both.
    assert_eq!(s.ledgers(&a2).await, StatusCode::OK);
    let (_, json) = s.send("GET", "/api-keys?owner=o", MASTER, None).await;
    assert_eq!(json.as_array().unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Item 3: what a key delegated outlived it.

#[tokio::test]
async fn revoking_or_deleting_a_creator_stops_every_descendant_at_once() {
    let s = start().await;
    let writer = json!({"scopes": ["api-keys:write", "ledgers:read"]});
    for permanent in [false, true] {
        let (parent, parent_id) = s
            .create(
                MASTER,
                json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
            )
            .await;
        let (child, child_id) = s.create(&parent, writer.clone()).await;
        let (grandchild, _) = s.create(&child, json!({"scopes": ["ledgers:read"]})).await;
        let (sibling, _) = s
            .create(MASTER, json!({"owner": "o", "scopes": ["ledgers:read"]}))
            .await;
        for key in [&parent, &child, &grandchild, &sibling] {
            assert_eq!(
                s.ledgers(key).await,
                StatusCode::OK,
                "cached before the revocation"
            );
        }
        s.broadcasts.take();
        let path = if permanent {
            format!("/api-keys/{parent_id}?permanent=true")
        } else {
            format!("/api-keys/{parent_id}")
        };
        let (status, _) = s.send("DELETE", &path, MASTER, None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        for key in [&parent, &child, &grandchild] {
            assert_eq!(
                s.ledgers(key).await,
                StatusCode::UNAUTHORIZED,
                "permanent={permanent}"
            );
        }
        assert_eq!(s.ledgers(&sibling).await, StatusCode::OK);
        // One broadcast carries all three keys' digests, for the other instances.
        let broadcasts = s.broadcasts.take();
        assert_eq!(broadcasts.len(), 1, "{broadcasts:?}");
        for key in [&parent, &child, &grandchild] {
            assert!(broadcasts[0].digests.contains(&digest_of(key)));
        }
        // The descendants stay listed, revoked.
        let (_, json) = s
            .send("GET", &format!("/api-keys/{child_id}"), MASTER, None)
            .await;
        assert_eq!(json["is_revoked"], true, "{json}");
        assert_eq!(json["created_by"], parent_id.as_str());
    }
}

#[tokio::test]
async fn a_create_authorized_before_its_creators_revocation_is_refused() {
    // The race: a request authenticated (and authorized) with the parent's key, whose insert runs
    // after the parent was revoked. The store checks the creator in the insert's transaction.
    let s = start().await;
    let (parent, parent_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let principal = s.resolver.authenticate(&digest_of(&parent)).await.unwrap();
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{parent_id}"), MASTER, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let err = s
        .manager
        .create(&principal, CreateKey::new(["ledgers:read"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::ExpiredApiKey, "{err}");
    let page = s
        .manager
        .list(&Principal::master(), Some("o"), None, 100)
        .await
        .unwrap();
    assert_eq!(page.keys.len(), 1, "no orphan was stored: {page:?}");
    // Deleted rather than revoked: the creator is unknown now.
    let (other, other_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let principal = s.resolver.authenticate(&digest_of(&other)).await.unwrap();
    s.send(
        "DELETE",
        &format!("/api-keys/{other_id}?permanent=true"),
        MASTER,
        None,
    )
    .await;
    let err = s
        .manager
        .create(&principal, CreateKey::new(["ledgers:read"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidApiKey, "{err}");
}

#[tokio::test]
async fn rotation_ends_the_descendants_only_when_asked() {
    let s = start().await;
    let (parent, parent_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let (child, _) = s.create(&parent, json!({"scopes": ["ledgers:read"]})).await;
    // Routine rotation (the default): the delegated key keeps working.
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{parent_id}/rotate"),
            MASTER,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (parent, _) = secret_and_id(&json);
    assert_eq!(s.ledgers(&child).await, StatusCode::OK);
    // A suspected leak: the descendants end with the old secret, the rotated key lives on.
    s.broadcasts.take();
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{parent_id}/rotate?owner=o"),
            MASTER,
            Some(json!({"revoke_descendants": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (new_parent, _) = secret_and_id(&json);
    assert_eq!(s.ledgers(&child).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.ledgers(&parent).await,
        StatusCode::UNAUTHORIZED,
        "old secret, no grace"
    );
    assert_eq!(s.ledgers(&new_parent).await, StatusCode::OK);
    let broadcasts = s.broadcasts.take();
    assert_eq!(broadcasts.len(), 1);
    assert!(broadcasts[0].digests.contains(&digest_of(&child)));
    assert!(broadcasts[0].digests.contains(&digest_of(&parent)));
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{parent_id}/rotate"),
            MASTER,
            Some(json!({"revoke_descendants": "yes"})),
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::BAD_REQUEST, "APIKEY_INVALID")
    );
}

/// The second half of item 3: a key minted with an old secret during its rotation grace period
/// ends when that secret does, and the old secret cannot obtain the new one (the principal of an
/// old secret carries its effective expiry: the grace end, when earlier).
#[tokio::test]
async fn an_old_secret_in_grace_mints_keys_that_end_with_its_grace() {
    let s = start().await;
    let (old, id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let (status, json) = s
        .send(
            "POST",
            &format!("/api-keys/{id}/rotate"),
            MASTER,
            Some(json!({"grace_period_seconds": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let grace_end = OffsetDateTime::now_utc() + time::Duration::hours(1);
    // No expiry asked for: capped at the grace end.
    let (status, json) = s
        .send(
            "POST",
            "/api-keys",
            &old,
            Some(json!({"scopes": ["ledgers:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{json}");
    let expires =
        OffsetDateTime::parse(json["expires_at"].as_str().expect("an expiry"), &Rfc3339).unwrap();
    assert!(
        (expires - grace_end).abs() < time::Duration::seconds(30),
        "{expires} vs {grace_end}"
    );
    // Past the grace end: refused.
    let (status, json) = s
        .send(
            "POST",
            "/api-keys",
            &old,
            Some(json!({"scopes": ["ledgers:read"], "expires_at": in_days(1)})),
        )
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION")
    );
    // The old secret may not rotate its own key (it would obtain the new secret).
    let (status, json) = s
        .send("POST", &format!("/api-keys/{id}/rotate"), &old, None)
        .await;
    assert_eq!(
        (status, code(&json)),
        (StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION")
    );
}

// ---------------------------------------------------------------------------------------------
// Item 5: Blnk's revoke form, and `owner` on every id-addressed route.

#[tokio::test]
async fn blnk_revokes_with_the_owner_in_the_query() {
    let s = start().await;
    let (scoped, _) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    for caller in [MASTER, scoped.as_str()] {
        // The key is the caller's own creation (a scoped key revokes only inside its subtree).
        let (key, id) = s
            .create(caller, json!({"owner": "o", "scopes": ["ledgers:read"]}))
            .await;
        let (status, json) = s
            .send("DELETE", &format!("/api-keys/{id}?owner=o"), caller, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
        assert_eq!(s.ledgers(&key).await, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn owner_must_match_on_every_id_addressed_route() {
    let s = start().await;
    let (scoped, _) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "*:*"]}),
        )
        .await;
    // The scoped caller's own creation: inside its subtree.
    let (key, id) = s
        .create(&scoped, json!({"owner": "o", "scopes": ["ledgers:read"]}))
        .await;
    let routes = |owner: &str| {
        [
            ("GET", format!("/api-keys/{id}?owner={owner}")),
            ("POST", format!("/api-keys/{id}/rotate?owner={owner}")),
            ("DELETE", format!("/api-keys/{id}?owner={owner}")),
            (
                "DELETE",
                format!("/api-keys/{id}?permanent=true&owner={owner}"),
            ),
        ]
    };
    for (method, path) in routes("other") {
        let (status, json) = s.send(method, &path, MASTER, None).await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND"),
            "master {method} {path}"
        );
        let (status, json) = s.send(method, &path, &scoped, None).await;
        assert_eq!(
            (status, code(&json)),
            (
                StatusCode::FORBIDDEN,
                if path.contains("permanent") {
                    "AUTH_MASTER_KEY_REQUIRED"
                } else {
                    "AUTH_CROSS_OWNER_ACCESS"
                }
            ),
            "scoped {method} {path}"
        );
    }
    assert_eq!(s.ledgers(&key).await, StatusCode::OK, "nothing changed");
    for (method, path) in [
        ("GET", format!("/api-keys/{id}?owner=")),
        ("GET", format!("/api-keys/{id}?account=o")),
        ("DELETE", format!("/api-keys/{id}?owner=o&owner=o")),
    ] {
        let (status, json) = s.send(method, &path, MASTER, None).await;
        assert_eq!(
            (status, code(&json)),
            (StatusCode::BAD_REQUEST, "APIKEY_INVALID"),
            "{method} {path}"
        );
    }
    let [get, rotate, revoke, delete] = routes("o");
    let (status, json) = s.send(get.0, &get.1, &scoped, None).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (status, json) = s.send(rotate.0, &rotate.1, &scoped, None).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let (status, _) = s.send(revoke.0, &revoke.1, &scoped, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s.send(delete.0, &delete.1, MASTER, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = s
        .send("GET", &format!("/api-keys/{id}"), MASTER, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------------
// Item 6 (part): a no-op revoke.

#[tokio::test]
async fn revoking_a_revoked_key_invalidates_and_broadcasts_nothing() {
    let s = start().await;
    let (key, id) = s
        .create(MASTER, json!({"owner": "o", "scopes": ["ledgers:read"]}))
        .await;
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{id}"), MASTER, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(s.broadcasts.take().len(), 1, "the first revoke broadcasts");
    assert_eq!(s.ledgers(&key).await, StatusCode::UNAUTHORIZED);
    let lookups = s.store.lookups();
    for _ in 0..3 {
        let (status, _) = s
            .send("DELETE", &format!("/api-keys/{id}?owner=o"), MASTER, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "idempotent");
        assert_eq!(s.ledgers(&key).await, StatusCode::UNAUTHORIZED);
    }
    assert!(s.broadcasts.take().is_empty(), "no broadcast for a no-op");
    assert_eq!(
        s.store.lookups(),
        lookups,
        "the cached answer was kept: no cache invalidation"
    );
}

#[tokio::test]
async fn a_large_cascade_is_broadcast_in_payloads_a_notify_can_carry() {
    // PostgreSQL's NOTIFY takes at most 8000 bytes: a cascade over many keys is split.
    let s = start().await;
    let (parent, parent_id) = s
        .create(
            MASTER,
            json!({"owner": "o", "scopes": ["api-keys:write", "ledgers:read"]}),
        )
        .await;
    let principal = s.resolver.authenticate(&digest_of(&parent)).await.unwrap();
    let mut children = Vec::new();
    for _ in 0..120 {
        let child = s
            .manager
            .create(&principal, CreateKey::new(["ledgers:read"]))
            .await
            .unwrap();
        children.push(child.key);
    }
    s.broadcasts.take();
    let (status, _) = s
        .send("DELETE", &format!("/api-keys/{parent_id}"), MASTER, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let broadcasts = s.broadcasts.take();
    assert_eq!(broadcasts.len(), 2, "121 digests, at most 96 per broadcast");
    assert!(broadcasts.iter().all(|b| b.to_json().len() < 8000));
    let sent: Vec<KeyDigest> = broadcasts.iter().flat_map(|b| b.digests.clone()).collect();
    assert_eq!(sent.len(), 121);
    for child in &children {
        assert!(sent.contains(&child.digest()));
    }
    assert_eq!(
        s.ledgers(children[119].expose_secret()).await,
        StatusCode::UNAUTHORIZED
    );
}
