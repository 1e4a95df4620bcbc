//! The address in audit events, through real HTTP: the peer's, or, behind a proxy the layer trusts,
//! the client `X-Forwarded-For` names; a forwarded-for header from an untrusted peer is ignored.
#![cfg(feature = "manage")]

mod common;

use std::sync::Arc;

use axum::Router;
use serde_json::json;
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::network::Networks;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

use common::wire::{call, serve_with_connect_info};

/// Creates a key through a server whose layer trusts `proxies`, with `X-Forwarded-For: 203.0.113.7`,
/// and returns the address its `key.created` event recorded.
async fn recorded_address(proxies: Option<&str>) -> String {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store);
    let mut layer = ApiKeyLayer::new(resolver.clone()).master_key(ApiKey::new(common::MASTER));
    if let Some(proxies) = proxies {
        layer = layer.trusted_proxies(Networks::parse([proxies]).unwrap());
    }
    let app: Router = manage::router(KeyManager::new(resolver)).layer(layer);
    let addr = serve_with_connect_info(app).await;
    let headers = [
        ("x-api-key", common::MASTER),
        ("content-type", "application/json"),
        ("x-forwarded-for", "203.0.113.7"),
    ];
    let body = json!({"owner": "team", "scopes": ["ledgers:read"]}).to_string();
    let created = call(addr, "POST", "/api-keys", &headers, body).await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.json()["api_key_id"].as_str().unwrap().to_owned();
    let events = call(
        addr,
        "GET",
        &format!("/api-keys/{id}/events?owner=team"),
        &headers,
        axum::body::Body::empty(),
    )
    .await;
    assert_eq!(events.status, 200, "{events:?}");
    let events = events.json();
    assert_eq!(events["events"][0]["type"], "key.created", "{events}");
    events["events"][0]["ip"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_recorded() {
    assert_eq!(recorded_address(Some("127.0.0.1/32")).await, "203.0.113.7");
}

#[tokio::test]
async fn from_an_untrusted_peer_the_peer_is_recorded() {
    assert_eq!(recorded_address(None).await, "127.0.0.1");
    assert_eq!(recorded_address(Some("10.0.0.0/8")).await, "127.0.0.1");
}
