//! The audit trail through real HTTP, on SQLite and PostgreSQL: every event type with its actor,
//! address, request id and details; the change and its event in one transaction; the hash chain
//! finding an edited, a deleted and a reordered row.
#![cfg(all(feature = "sqlite", feature = "manage"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager, KeyPolicy};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, SqliteStore};

const MASTER: &str = common::MASTER;

/// Raw SQL on the store's database, to tamper with it; `{s}` is the schema prefix.
enum Db {
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool, String),
}

impl Db {
    async fn exec(&self, sql: &str) {
        match self {
            Db::Sqlite(pool) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.replace("{s}", "")))
                    .execute(pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            #[cfg(feature = "postgres")]
            Db::Pg(pool, schema) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(
                    sql.replace("{s}", &format!("\"{schema}\".")),
                ))
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// A trigger that fails every event insert: a failure after the change, in its transaction.
    async fn break_event_writes(&self, broken: bool) {
        match (self, broken) {
            (Db::Sqlite(_), true) => {
                self.exec(
                    "CREATE TRIGGER injected BEFORE INSERT ON api_key_events \
                     BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
                )
                .await
            }
            (Db::Sqlite(_), false) => self.exec("DROP TRIGGER injected").await,
            #[cfg(feature = "postgres")]
            (Db::Pg(..), true) => {
                self.exec(
                    "CREATE FUNCTION {s}injected() RETURNS trigger AS $$ BEGIN \
                     RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql; \
                     CREATE TRIGGER injected BEFORE INSERT ON {s}api_key_events \
                     FOR EACH ROW EXECUTE FUNCTION {s}injected();",
                )
                .await
            }
            #[cfg(feature = "postgres")]
            (Db::Pg(..), false) => {
                self.exec(
                    "DROP TRIGGER injected ON {s}api_key_events; DROP FUNCTION {s}injected();",
                )
                .await
            }
        }
    }
}

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Body>,
}

impl Server {
    async fn start(store: Arc<dyn KeyStore>, policy: KeyPolicy) -> Self {
        let resolver = CachedResolver::new(store.clone());
        let app: Router = manage::router(KeyManager::new(resolver.clone()).policy(policy))
            .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap()
        });
        Self {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `method path` with `key`, a request id and an optional JSON body: status and JSON body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        request_id: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("x-api-key", key)
            .header("x-request-id", request_id)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str, key: &str) -> Value {
        let (status, body) = self.call("GET", path, key, "read", None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    async fn events(&self, owner: &str) -> Vec<Value> {
        self.get(&format!("/api-keys/events?owner={owner}&limit=100"), MASTER)
            .await["events"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn verify(&self, owner: &str) -> Value {
        self.get(&format!("/api-keys/events/verify?owner={owner}"), MASTER)
            .await
    }
}

/// Every event type over HTTP, with actor, address, request id and details right; no secret in
/// any event; then the chain found broken by an edit, a reorder and a deletion.
async fn events_and_chain(store: Arc<dyn KeyStore>, db: Db) {
    let server = Server::start(store, KeyPolicy::default()).await;
    let (status, parent) = server
        .call(
            "POST",
            "/api-keys",
            MASTER,
            "req-create",
            Some(json!({"name": "ci", "owner": "acme",
                        "scopes": ["api-keys:write", "api-keys:read", "ledgers:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{parent}");
    let parent_key = parent["key"].as_str().unwrap().to_owned();
    let parent_id = parent["api_key_id"].as_str().unwrap().to_owned();
    let (status, child) = server
        .call(
            "POST",
            "/api-keys",
            &parent_key,
            "req-child",
            Some(json!({"name": "deploy", "scopes": ["ledgers:read"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{child}");
    let child_id = child["api_key_id"].as_str().unwrap().to_owned();
    // An escalation attempt: refused, and recorded.
    let (status, _) = server
        .call(
            "POST",
            "/api-keys",
            &parent_key,
            "req-escalate",
            Some(json!({"scopes": ["*:*"]})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server
        .call(
            "PATCH",
            &format!("/api-keys/{child_id}"),
            MASTER,
            "req-update",
            Some(json!({"name": "deploy-2"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, rotated) = server
        .call(
            "POST",
            &format!("/api-keys/{child_id}/rotate"),
            &parent_key,
            "req-rotate",
            Some(json!({"grace_period_seconds": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let rotated_key = rotated["key"].as_str().unwrap().to_owned();
    let (status, _) = server
        .call(
            "DELETE",
            &format!("/api-keys/{parent_id}?reason=offboarded"),
            MASTER,
            "req-revoke",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Revoking again changes nothing, and writes nothing.
    server
        .call(
            "DELETE",
            &format!("/api-keys/{parent_id}"),
            MASTER,
            "req-again",
            None,
        )
        .await;
    let (status, _) = server
        .call(
            "DELETE",
            &format!("/api-keys/{child_id}?permanent=true"),
            MASTER,
            "req-delete",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server
        .call(
            "PUT",
            "/api-keys/pools",
            MASTER,
            "req-pool",
            Some(json!({"owner": "acme", "rate_limit": {"limit": 100, "period_seconds": 60}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let events = server.events("acme").await;
    let text = serde_json::to_string(&events).unwrap();
    for secret in [
        parent_key.as_str(),
        rotated_key.as_str(),
        child["key"].as_str().unwrap(),
    ] {
        assert!(!text.contains(secret), "a secret in the events");
    }
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "pool.set",
            "key.deleted",
            "key.revoked",
            "key.rotated",
            "key.updated",
            "key.refused",
            "key.created",
            "key.created"
        ]
    );
    let by = |request_id: &str| {
        events
            .iter()
            .find(|e| e["request_id"] == request_id)
            .unwrap_or_else(|| panic!("no event of {request_id}"))
    };
    for event in &events {
        assert_eq!(event["ip"], "127.0.0.1", "{event}");
        assert_eq!(event["owner_id"], "acme");
        assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    }
    let created = by("req-create");
    assert_eq!(
        created["actor"],
        json!({"kind": "master", "key_id": null, "name": null})
    );
    assert_eq!(created["key_id"], parent_id.as_str());
    assert_eq!(
        created["details"]["scopes"],
        json!(["api-keys:read", "api-keys:write", "ledgers:read"])
    );
    let delegated = by("req-child");
    assert_eq!(
        delegated["actor"],
        json!({"kind": "key", "key_id": parent_id, "name": "ci"})
    );
    assert_eq!(delegated["details"]["created_by"], parent_id.as_str());
    let refused = by("req-escalate");
    assert_eq!(refused["type"], "key.refused");
    assert_eq!(refused["details"]["code"], "AUTH_SCOPE_ESCALATION");
    assert_eq!(refused["details"]["operation"], "create");
    assert_eq!(
        by("req-update")["details"]["changes"],
        json!({"name": {"before": "deploy", "after": "deploy-2"}})
    );
    let rotation = by("req-rotate");
    assert_eq!(rotation["actor"]["key_id"], parent_id.as_str());
    assert!(rotation["details"]["grace_until"].is_string());
    let revoked = by("req-revoke");
    assert_eq!(revoked["details"]["reason"], "offboarded");
    assert_eq!(revoked["details"]["descendants_revoked"], 1);
    assert!(events.iter().all(|e| e["request_id"] != "req-again"));
    assert_eq!(by("req-delete")["details"]["descendants_revoked"], 0);
    assert_eq!(by("req-pool")["details"]["pool"], "owner");

    // One key's events, newest first.
    let child_events = server
        .get(&format!("/api-keys/{child_id}/events?owner=acme"), MASTER)
        .await;
    let child_types: Vec<&str> = child_events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        child_types,
        ["key.deleted", "key.rotated", "key.updated", "key.created"]
    );
    // Filter by type; page with the cursor.
    let page = server
        .get(
            "/api-keys/events?owner=acme&type=key.created&limit=1",
            MASTER,
        )
        .await;
    assert_eq!(page["events"][0]["request_id"], "req-child");
    let cursor = page["next_cursor"].as_str().unwrap();
    let next = server
        .get(
            &format!("/api-keys/events?owner=acme&type=key.created&limit=1&cursor={cursor}"),
            MASTER,
        )
        .await;
    assert_eq!(next["events"][0]["request_id"], "req-create");
    assert!(next.get("next_cursor").is_none());

    // The chain: intact, then an edit, a reorder and a deletion, each found.
    assert_eq!(
        server.verify("acme").await,
        json!({"valid": true, "checked": 8})
    );
    let seq_of = |request_id: &str| {
        8 - events
            .iter()
            .position(|e| e["request_id"] == request_id)
            .unwrap()
    };
    let id_at = |seq: usize| events[8 - seq]["id"].as_str().unwrap().to_owned();
    assert_eq!(seq_of("req-create"), 1);

    db.exec(
        "UPDATE {s}api_key_events SET details = replace(details, 'deploy-2', 'deploy-X') \
         WHERE owner_id = 'acme' AND seq = 4",
    )
    .await;
    let broken = server.verify("acme").await;
    assert_eq!(broken["valid"], false);
    assert_eq!(broken["first_invalid"], id_at(4).as_str(), "{broken}");
    assert_eq!(broken["reason"], "hash");
    assert_eq!(broken["checked"], 3);
    db.exec(
        "UPDATE {s}api_key_events SET details = replace(details, 'deploy-X', 'deploy-2') \
         WHERE owner_id = 'acme' AND seq = 4",
    )
    .await;
    assert_eq!(server.verify("acme").await["valid"], true);

    // Swap events 5 and 6.
    db.exec("UPDATE {s}api_key_events SET seq = -1 WHERE owner_id = 'acme' AND seq = 5")
        .await;
    db.exec("UPDATE {s}api_key_events SET seq = 5 WHERE owner_id = 'acme' AND seq = 6")
        .await;
    db.exec("UPDATE {s}api_key_events SET seq = 6 WHERE owner_id = 'acme' AND seq = -1")
        .await;
    let broken = server.verify("acme").await;
    assert_eq!(broken["valid"], false);
    assert_eq!(broken["first_invalid"], id_at(6).as_str(), "{broken}");
    db.exec("UPDATE {s}api_key_events SET seq = -1 WHERE owner_id = 'acme' AND seq = 5")
        .await;
    db.exec("UPDATE {s}api_key_events SET seq = 5 WHERE owner_id = 'acme' AND seq = 6")
        .await;
    db.exec("UPDATE {s}api_key_events SET seq = 6 WHERE owner_id = 'acme' AND seq = -1")
        .await;
    assert_eq!(server.verify("acme").await["valid"], true);

    // Delete event 2: event 3 no longer links.
    db.exec("DELETE FROM {s}api_key_events WHERE owner_id = 'acme' AND seq = 2")
        .await;
    let broken = server.verify("acme").await;
    assert_eq!(broken["first_invalid"], id_at(3).as_str(), "{broken}");
    assert_eq!(broken["reason"], "link");
    // Delete the newest: the head still names it.
    db.exec("DELETE FROM {s}api_key_events WHERE owner_id = 'acme' AND seq >= 2")
        .await;
    let broken = server.verify("acme").await;
    assert_eq!(
        broken,
        json!({"valid": false, "checked": 1, "first_invalid": null, "seq": 2, "reason": "missing"})
    );
}

/// No change without its event, no event without its change.
async fn transactions(store: Arc<dyn KeyStore>, db: Db) {
    let server = Server::start(store, KeyPolicy::default().max_active_per_owner(1)).await;
    let create = |name: &str| json!({"name": name, "owner": "tx", "scopes": ["ledgers:read"]});
    let (status, key) = server
        .call("POST", "/api-keys", MASTER, "r1", Some(create("one")))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = key["api_key_id"].as_str().unwrap().to_owned();
    // A change that fails (the limit, checked in the transaction) writes no event.
    let (status, _) = server
        .call("POST", "/api-keys", MASTER, "r2", Some(create("two")))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(server.events("tx").await.len(), 1);

    // A failure after the change (writing its event) rolls the change back too.
    db.break_event_writes(true).await;
    let (status, body) = server
        .call("DELETE", &format!("/api-keys/{id}"), MASTER, "r3", None)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error_detail"]["code"], "AUTH_UNAVAILABLE");
    let (status, _) = server
        .call(
            "PATCH",
            &format!("/api-keys/{id}"),
            MASTER,
            "r4",
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    db.break_event_writes(false).await;
    let key = server.get(&format!("/api-keys/{id}"), MASTER).await;
    assert_eq!(
        key["is_revoked"], false,
        "the revocation survived its failed event"
    );
    assert_eq!(key["name"], "one", "the update survived its failed event");
    assert_eq!(server.events("tx").await.len(), 1);
    // And the key still works.
    let (status, _) = server
        .call(
            "GET",
            "/api-keys/self",
            key_secret(&server, &id).await.as_str(),
            "r5",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        server.verify("tx").await,
        json!({"valid": true, "checked": 2})
    );
}

/// Rotates `id` (master) to learn a working secret: also one more event.
async fn key_secret(server: &Server, id: &str) -> String {
    let (status, body) = server
        .call(
            "POST",
            &format!("/api-keys/{id}/rotate"),
            MASTER,
            "rot",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    body["key"].as_str().unwrap().to_owned()
}

async fn sqlite() -> (Arc<dyn KeyStore>, Db, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let url = format!("sqlite://{}?mode=rwc", dir.path.join("keys.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    (Arc::new(store), Db::Sqlite(pool), dir)
}

/// A temporary directory removed on drop.
mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(super::common::db::unique("audit"));
            std::fs::create_dir_all(&path).unwrap();
            Self { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[tokio::test]
async fn sqlite_events_and_chain() {
    let (store, db, _dir) = sqlite().await;
    events_and_chain(store, db).await;
}

#[tokio::test]
async fn sqlite_transactions() {
    let (store, db, _dir) = sqlite().await;
    transactions(store, db).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_events_and_chain() {
    let Some(schema) = common::db::pg_schema("audit_chain").await else {
        return;
    };
    let store = schema.store().await;
    let db = Db::Pg(store.pool().clone(), schema.schema.clone());
    events_and_chain(Arc::new(store), db).await;
    schema.drop_schema().await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_transactions() {
    let Some(schema) = common::db::pg_schema("audit_tx").await else {
        return;
    };
    let store = schema.store().await;
    let db = Db::Pg(store.pool().clone(), schema.schema.clone());
    transactions(Arc::new(store), db).await;
    schema.drop_schema().await;
}
