//! The webhook routes of the management API over real HTTP (SQLite): the wire contract, and the
//! one rule: the master key or `api-keys:write` in that owner; a scoped key registers for its own
//! owner only, its endpoint receives events about its own subtree only (and only while it is
//! active), and it manages the endpoints registered inside its subtree only (another owner's, or
//! the master key's owner-wide ones, are 404 to it; a sibling's are 403 `AUTH_OUTSIDE_SUBTREE`).
#![cfg(all(feature = "webhooks", feature = "sqlite"))]

mod common;
#[path = "webhooks/support.rs"]
mod support;

use axum::Router;
use http::StatusCode;
use serde_json::{Value, json};
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{self, CreateKey, CreatedKey};
use tower_api_keys::principal::Principal;

use common::MASTER;
use common::wire::{Reply, call, serve_with_connect_info};
use support::{Backend, Instance, Receiver, local};

async fn serve(server: &Instance) -> std::net::SocketAddr {
    let app = Router::new()
        .merge(manage::router(server.manager.clone()))
        .layer(
            ApiKeyLayer::new(server.manager.resolver().clone())
                .sources([KeySource::x_api_key()])
                .master_key(ApiKey::new(MASTER)),
        );
    serve_with_connect_info(app).await
}

struct Api {
    addr: std::net::SocketAddr,
}

impl Api {
    async fn send(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> Reply {
        let mut headers = vec![("x-api-key", key)];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        call(self.addr, method, path, &headers, body).await
    }
}

async fn key(server: &Instance, by: &Principal, owner: &str, scopes: &[&str]) -> CreatedKey {
    let mut create = CreateKey::new(scopes.iter().copied());
    if by.is_master() {
        create = create.owner(owner);
    }
    server.manager.create(by, create).await.unwrap()
}

async fn principal(server: &Instance, key: &CreatedKey) -> Principal {
    server
        .manager
        .resolver()
        .authenticate(&key.key.digest())
        .await
        .unwrap()
}

/// The types of `owner`'s audit events, newest first.
async fn events_of(server: &Instance, owner: &str) -> Vec<String> {
    let query = tower_api_keys::audit::EventQuery {
        owner: owner.into(),
        limit: 500,
        ..Default::default()
    };
    let events = server.store.events(&query).await.unwrap();
    for event in &events {
        assert!(
            !event.to_json().to_string().contains("whsec_"),
            "a secret in {event:?}"
        );
    }
    events
        .iter()
        .map(|e| e.event_type.as_str().to_owned())
        .collect()
}

fn secret_of(key: &CreatedKey) -> &str {
    key.key.expose_secret()
}

#[test]
fn the_openapi_document_has_the_webhook_routes() {
    let doc = serde_json::to_value(manage::openapi()).unwrap();
    for (path, method) in [
        ("/api-keys/webhooks", "post"),
        ("/api-keys/webhooks", "get"),
        ("/api-keys/webhooks/{id}", "delete"),
        ("/api-keys/webhooks/{id}/rotate", "post"),
        ("/api-keys/webhooks/{id}/deliveries", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_contract() {
    let backend = Backend::sqlite();
    let server = backend.open(local()).await;
    let api = Api {
        addr: serve(&server).await,
    };
    let receiver = Receiver::start().await;

    let created = api
        .send(
            MASTER,
            "POST",
            "/api-keys/webhooks",
            Some(json!({
            "owner": "team", "url": receiver.url(), "events": ["key.created", "key.revoked"]})),
        )
        .await;
    created.expect(StatusCode::CREATED, None);
    let body = created.json();
    let fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields.len(), 6, "{body}");
    for field in ["id", "owner", "url", "events", "created_at", "secret"] {
        assert!(fields.contains(&field), "{field} in {body}");
    }
    assert_eq!(body["owner"], "team");
    assert_eq!(body["events"], json!(["key.created", "key.revoked"]));
    assert!(body["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created.headers["cache-control"], "no-store");
    let id = body["id"].as_str().unwrap().to_owned();

    let list = api
        .send(MASTER, "GET", "/api-keys/webhooks?owner=team", None)
        .await;
    list.expect(StatusCode::OK, None);
    let listed = &list.json()["webhooks"];
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        listed[0].get("secret").is_none(),
        "listing never shows the secret"
    );
    assert_eq!(listed[0]["id"], id.as_str());

    // A change: its delivery is in the log, pending, then delivered.
    server
        .manager
        .create(
            &Principal::master(),
            CreateKey::new(["ledgers:read"]).owner("team"),
        )
        .await
        .unwrap();
    let log = api
        .send(
            MASTER,
            "GET",
            &format!("/api-keys/webhooks/{id}/deliveries?limit=10"),
            None,
        )
        .await;
    log.expect(StatusCode::OK, None);
    let d = &log.json()["deliveries"][0];
    let expected = [
        "id",
        "event_type",
        "status",
        "attempts",
        "last_status",
        "last_error",
        "last_attempt_at",
        "next_attempt_at",
        "delivered_at",
        "created_at",
    ];
    assert_eq!(d.as_object().unwrap().len(), expected.len(), "{d}");
    for field in expected {
        assert!(d.get(field).is_some(), "{field} in {d}");
    }
    assert_eq!(
        (d["status"].as_str(), d["attempts"].as_u64()),
        (Some("pending"), Some(0))
    );
    assert!(log.json()["next_cursor"].is_null());
    server.webhooks.deliverer().deliver_due().await.unwrap();
    let log = api
        .send(
            MASTER,
            "GET",
            &format!("/api-keys/webhooks/{id}/deliveries"),
            None,
        )
        .await;
    let d = &log.json()["deliveries"][0];
    assert_eq!(
        (d["status"].as_str(), d["last_status"].as_u64()),
        (Some("delivered"), Some(200))
    );
    assert_eq!(receiver.got()[0].id, d["id"].as_str().unwrap());

    // Paging: a cursor from a full page.
    for _ in 0..2 {
        server
            .manager
            .create(
                &Principal::master(),
                CreateKey::new(["ledgers:read"]).owner("team"),
            )
            .await
            .unwrap();
    }
    let page = api
        .send(
            MASTER,
            "GET",
            &format!("/api-keys/webhooks/{id}/deliveries?limit=2"),
            None,
        )
        .await
        .json();
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let next = api
        .send(
            MASTER,
            "GET",
            &format!("/api-keys/webhooks/{id}/deliveries?limit=2&cursor={cursor}"),
            None,
        )
        .await
        .json();
    assert_eq!(next["deliveries"].as_array().unwrap().len(), 1);

    // Rotate: a new secret, which signs what is delivered from now on.
    let rotated = api
        .send(
            MASTER,
            "POST",
            &format!("/api-keys/webhooks/{id}/rotate"),
            None,
        )
        .await;
    rotated.expect(StatusCode::OK, None);
    let new_secret = rotated.json()["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, body["secret"].as_str().unwrap());
    server.webhooks.deliverer().deliver_due().await.unwrap();
    let last = receiver.got().pop().unwrap();
    let secret = tower_api_keys::webhooks::WebhookSecret::parse(&new_secret).unwrap();
    assert!(secret.verify(&last.id, last.timestamp, &last.body, &last.signature));

    // Bad input and unknown ids, with stable codes.
    let bad = api
        .send(
            MASTER,
            "POST",
            "/api-keys/webhooks",
            Some(json!({"owner": "team", "url": receiver.url(), "events": ["key.nope"]})),
        )
        .await;
    bad.expect(StatusCode::BAD_REQUEST, Some("APIKEY_INVALID"));
    let no_owner = api
        .send(
            MASTER,
            "POST",
            "/api-keys/webhooks",
            Some(json!({"url": receiver.url(), "events": ["key.created"]})),
        )
        .await;
    no_owner.expect(StatusCode::BAD_REQUEST, Some("APIKEY_OWNER_REQUIRED"));
    for (method, path) in [
        ("DELETE", "/api-keys/webhooks/whk_nope".to_owned()),
        ("POST", "/api-keys/webhooks/whk_nope/rotate".to_owned()),
        ("GET", "/api-keys/webhooks/whk_nope/deliveries".to_owned()),
        ("DELETE", format!("/api-keys/webhooks/{id}?owner=other")),
    ] {
        api.send(MASTER, method, &path, None)
            .await
            .expect(StatusCode::NOT_FOUND, Some("WEBHOOK_NOT_FOUND"));
    }

    api.send(MASTER, "DELETE", &format!("/api-keys/webhooks/{id}"), None)
        .await
        .expect(StatusCode::NO_CONTENT, None);
    let list = api
        .send(MASTER, "GET", "/api-keys/webhooks?owner=team", None)
        .await;
    assert_eq!(list.json(), json!({"webhooks": []}));
    // Each change is an audit event of the owner, written with it (never a secret in it).
    let types = events_of(&server, "team").await;
    for t in ["webhook.registered", "webhook.rotated", "webhook.deleted"] {
        assert_eq!(
            types.iter().filter(|e| *e == t).count(),
            1,
            "{t} in {types:?}"
        );
    }
    backend.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_keys_hold_webhooks_of_their_own_subtree_only() {
    let backend = Backend::sqlite();
    let server = backend.open(local()).await;
    let api = Api {
        addr: serve(&server).await,
    };
    let receiver = Receiver::start().await;
    let master = Principal::master();
    let scopes = ["ledgers:read", "api-keys:write"];
    // In owner "team": A and its sibling B (both made by the master key), C made by A; a reader;
    // and a key of another owner.
    let a = key(&server, &master, "team", &scopes).await;
    let b = key(&server, &master, "team", &scopes).await;
    let c = key(&server, &principal(&server, &a).await, "team", &scopes).await;
    let reader = key(&server, &master, "team", &["api-keys:read"]).await;
    let stranger = key(&server, &master, "other", &scopes).await;
    let hook = |owner: Option<&str>| {
        let mut body =
            json!({"url": receiver.url(), "events": ["key.created", "key.revoked", "key.updated"]});
        if let Some(owner) = owner {
            body["owner"] = owner.into();
        }
        body
    };

    // Registering: api-keys:write in one's own owner.
    api.send(
        secret_of(&reader),
        "POST",
        "/api-keys/webhooks",
        Some(hook(None)),
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_INSUFFICIENT_PERMISSIONS"));
    api.send(
        secret_of(&a),
        "POST",
        "/api-keys/webhooks",
        Some(hook(Some("other"))),
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_CROSS_OWNER_ACCESS"));
    let mine = api
        .send(
            secret_of(&a),
            "POST",
            "/api-keys/webhooks",
            Some(hook(None)),
        )
        .await;
    mine.expect(StatusCode::CREATED, None);
    let mine = mine.json();
    assert_eq!(mine["owner"], "team");
    let mine_id = mine["id"].as_str().unwrap().to_owned();
    let owner_wide = api
        .send(
            MASTER,
            "POST",
            "/api-keys/webhooks",
            Some(hook(Some("team"))),
        )
        .await;
    let owner_wide_id = owner_wide.json()["id"].as_str().unwrap().to_owned();

    // Listing and managing: A sees its own, not the master's; C (A's child: A is above it, not
    // inside its subtree) and B (a sibling) see none.
    for (who, visible) in [(&a, vec![&mine_id]), (&c, vec![]), (&b, vec![])] {
        let list = api
            .send(secret_of(who), "GET", "/api-keys/webhooks", None)
            .await;
        list.expect(StatusCode::OK, None);
        let ids: Vec<String> = list.json()["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.iter().collect::<Vec<_>>(), visible);
    }
    let master_list = api
        .send(MASTER, "GET", "/api-keys/webhooks?owner=team", None)
        .await;
    assert_eq!(master_list.json()["webhooks"].as_array().unwrap().len(), 2);
    api.send(
        secret_of(&b),
        "GET",
        &format!("/api-keys/webhooks/{mine_id}/deliveries"),
        None,
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_OUTSIDE_SUBTREE"));
    let refused_before = events_of(&server, "team")
        .await
        .iter()
        .filter(|t| *t == "key.refused")
        .count();
    api.send(
        secret_of(&b),
        "POST",
        &format!("/api-keys/webhooks/{mine_id}/rotate"),
        None,
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_OUTSIDE_SUBTREE"));
    // A refused power operation is recorded, as for keys.
    let refused = events_of(&server, "team")
        .await
        .iter()
        .filter(|t| *t == "key.refused")
        .count();
    assert_eq!(refused, refused_before + 1);
    for path in [
        format!("/api-keys/webhooks/{mine_id}/deliveries"),
        format!("/api-keys/webhooks/{owner_wide_id}/deliveries"),
    ] {
        api.send(secret_of(&stranger), "GET", &path, None)
            .await
            .expect(StatusCode::NOT_FOUND, Some("WEBHOOK_NOT_FOUND"));
    }
    api.send(
        secret_of(&a),
        "DELETE",
        &format!("/api-keys/webhooks/{owner_wide_id}"),
        None,
    )
    .await
    .expect(StatusCode::NOT_FOUND, Some("WEBHOOK_NOT_FOUND"));
    api.send(
        secret_of(&a),
        "GET",
        &format!("/api-keys/webhooks/{mine_id}/deliveries"),
        None,
    )
    .await
    .expect(StatusCode::OK, None);

    // What A's endpoint receives: events about its subtree, nothing about B or other keys.
    let acting_a = principal(&server, &a).await;
    let d = key(&server, &acting_a, "team", &["ledgers:read"]).await; // in A's subtree
    let e = key(&server, &master, "team", &["ledgers:read"]).await; // not
    server.manager.revoke(&master, &b.info.id).await.unwrap(); // not
    server.manager.revoke(&master, &d.info.id).await.unwrap(); // in
    let _ = e;
    let log = |id: String| {
        let api = &api;
        async move {
            let r = api
                .send(
                    MASTER,
                    "GET",
                    &format!("/api-keys/webhooks/{id}/deliveries"),
                    None,
                )
                .await;
            r.json()["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["event_type"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(log(mine_id.clone()).await, ["key.revoked", "key.created"]);
    server.webhooks.deliverer().deliver_due().await.unwrap();
    let secret =
        tower_api_keys::webhooks::WebhookSecret::parse(mine["secret"].as_str().unwrap()).unwrap();
    let about: Vec<String> = receiver
        .got()
        .iter()
        .filter(|g| secret.verify(&g.id, g.timestamp, &g.body, &g.signature))
        .map(|g| g.json()["data"]["key_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(about, [d.info.id.as_str(), d.info.id.as_str()]);

    // A revoked: what was queued for its endpoint is failed, not sent, and it hears nothing
    // more (not even about its former subtree).
    let queued = key(&server, &acting_a, "team", &["ledgers:read"]).await;
    let queued_id = queued.info.id.as_str().to_owned();
    server.manager.revoke(&master, &a.info.id).await.unwrap();
    server
        .manager
        .update(
            &master,
            &c.info.id,
            tower_api_keys::manage::UpdateKey {
                name: Some("after".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(log(mine_id.clone()).await.len(), 3);
    server.webhooks.deliverer().deliver_due().await.unwrap();
    let latest = api
        .send(
            MASTER,
            "GET",
            &format!("/api-keys/webhooks/{mine_id}/deliveries?limit=1"),
            None,
        )
        .await
        .json();
    let d = &latest["deliveries"][0];
    assert_eq!(d["event_type"], "key.created");
    assert_eq!(d["status"], "failed");
    assert_eq!(
        d["last_error"],
        "the key that registered the endpoint is no longer active"
    );
    assert!(
        receiver
            .got()
            .iter()
            .filter(|g| secret.verify(&g.id, g.timestamp, &g.body, &g.signature))
            .all(|g| g.json()["data"]["key_id"] != queued_id.as_str()),
        "nothing about the queued key was sent to A's endpoint"
    );
    // The master key's endpoint heard everything of the owner since it was registered.
    let mut all = log(owner_wide_id).await;
    all.sort();
    assert_eq!(
        all,
        [
            "key.created",
            "key.created",
            "key.created",
            "key.revoked",
            "key.revoked",
            "key.revoked",
            "key.updated"
        ]
    );
    backend.cleanup().await;
}
