//! `examples/hyper.rs` end to end: the example's service on `127.0.0.1:0`, called by a real hyper
//! client.

#[path = "../examples/hyper.rs"]
#[allow(dead_code)]
mod hyper_example;

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower_api_keys::key::ApiKey;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

use hyper_example::{Timeouts, issue_key};

const MASTER: &str = "master-key-for-hyper-tests-0123456789";

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start(resolver: CachedResolver) -> Server {
    start_with(resolver, Timeouts::DEFAULT).await
}

async fn start_with(resolver: CachedResolver, timeouts: Timeouts) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = hyper_example::app(resolver, ApiKey::new(MASTER), timeouts);
    tokio::spawn(hyper_example::serve(listener, app, timeouts));
    Server {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Server {
    /// How many ledgers exist (listed with the master key).
    async fn ledger_count(&self) -> usize {
        let (status, _, body) = self
            .send(Method::GET, "/ledgers", &[("x-api-key", MASTER)], None)
            .await;
        assert_eq!(status, StatusCode::OK);
        body["ledgers"].as_array().map_or(0, Vec::len)
    }

    /// Sends a request with `headers` and returns the status, headers and JSON body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(body.to_string()))
            }
            None => Full::default(),
        };
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (parts.status, parts.headers, json)
    }
}

#[tokio::test]
async fn a_key_gets_200_and_the_handler_sees_its_principal() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, record) = issue_key(&resolver, "acme", "ledgers:read ledgers:write")
        .await
        .unwrap();
    let server = start(resolver).await;
    let key = key.expose_secret();

    let (status, _, body) = server
        .send(Method::GET, "/whoami", &[("x-api-key", key)], None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key_id"], record.id.as_str());
    assert_eq!(body["account"], "acme");
    assert_eq!(body["kind"], "scoped");
    assert_eq!(body["scopes"], json!(["ledgers:read", "ledgers:write"]));

    let bearer = format!("Bearer {key}");
    let (status, _, created) = server
        .send(
            Method::POST,
            "/ledgers",
            &[("authorization", &bearer)],
            Some(json!({"name": "Main ledger"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["created_by"], record.id.as_str());
    assert_eq!(created["account"], "acme");

    let (status, _, list) = server
        .send(Method::GET, "/ledgers", &[("x-api-key", key)], None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["ledgers"], json!([created]));
}

#[tokio::test]
async fn no_key_is_401_json_with_a_challenge() {
    let server = start(CachedResolver::new(MemoryStore::new())).await;
    for (method, path) in [
        (Method::GET, "/ledgers"),
        (Method::GET, "/whoami"),
        (Method::GET, "/no-such-route"),
    ] {
        let (status, headers, body) = server.send(method, path, &[], None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body["error_detail"]["code"], "AUTH_MISSING_API_KEY");
        assert_eq!(body["error"], "API key is missing");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    }
    let (status, _, body) = server
        .send(Method::GET, "/ledgers", &[("x-api-key", "sk_nope")], None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error_detail"]["code"], "AUTH_INVALID_API_KEY");
}

#[tokio::test]
async fn a_missing_scope_is_403_with_the_required_scopes() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (reader, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
    let server = start(resolver).await;
    let reader = reader.expose_secret();

    let (status, _, body) = server
        .send(
            Method::POST,
            "/ledgers",
            &[("x-api-key", reader)],
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["error_detail"]["code"],
        "AUTH_INSUFFICIENT_PERMISSIONS"
    );
    assert_eq!(
        body["error_detail"]["details"]["required"],
        json!(["ledgers:write"])
    );

    let (status, _, body) = server
        .send(
            Method::DELETE,
            "/ledgers/ldg_1",
            &[("x-api-key", reader)],
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body["error_detail"]["details"]["required"],
        json!(["ledgers:delete"])
    );

    // The routes the key is allowed on still work, and the master key passes every guard.
    let (status, _, _) = server
        .send(Method::GET, "/ledgers", &[("x-api-key", reader)], None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, created) = server
        .send(
            Method::POST,
            "/ledgers",
            &[("x-api-key", MASTER)],
            Some(json!({"name": "by master"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        created["created_by"],
        Value::Null,
        "the master key is never stamped"
    );
    let path = format!("/ledgers/{}", created["ledger_id"].as_str().unwrap());
    let (status, _, _) = server
        .send(Method::DELETE, &path, &[("x-api-key", MASTER)], None)
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// Short bounds, so that the stall tests stay fast (the example's defaults are 10 s, 10 s, 30 s).
const SHORT: Timeouts = Timeouts {
    head: std::time::Duration::from_millis(300),
    body: std::time::Duration::from_millis(300),
    request: std::time::Duration::from_secs(5),
};
/// Only guards against hanging.
const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(30);

#[tokio::test]
async fn a_stalled_head_is_cut() {
    let server = start_with(CachedResolver::new(MemoryStore::new()), SHORT).await;
    common::wire::assert_stalled_head_is_cut(server.addr, SHORT.head).await;
}

#[tokio::test]
async fn a_stalled_body_is_cut() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, _) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
    let server = start_with(resolver, SHORT).await;
    let head = format!(
        "POST /ledgers HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: 20\r\nconnection: close\r\n\r\n{{\"na",
        key.expose_secret()
    );
    let answer = common::wire::until_closed(server.addr, head.as_bytes(), SHORT.body).await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the body timed out: {answer}"
    );
    assert_eq!(server.ledger_count().await, 0, "nothing written");
}

#[tokio::test]
async fn a_body_sent_after_the_revocation_gets_401() {
    use tokio::io::AsyncWriteExt;
    use tower_api_keys::manage::KeyManager;
    use tower_api_keys::principal::Principal;
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, info) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
    let manager = KeyManager::new(resolver.clone());
    let server = start(resolver.clone()).await;
    let body = r#"{"name":"late"}"#;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /ledgers HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        key.expose_secret(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The head is admitted once the key is cached (the only lookup is this request's).
    while resolver.store_lookups() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    manager
        .revoke(&Principal::master(), &info.id)
        .await
        .unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let answer = common::wire::read_until_closed(&mut stream, HANG_GUARD).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("AUTH_EXPIRED_API_KEY"), "{answer}");
    assert_eq!(server.ledger_count().await, 0, "nothing written");
}
