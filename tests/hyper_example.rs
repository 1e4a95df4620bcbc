//! `examples/hyper.rs` end to end: the example's service on `127.0.0.1:0`, called by a real hyper
//! client.

#[path = "../examples/hyper.rs"]
#[allow(dead_code)]
mod hyper_example;

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

use hyper_example::issue_key;

const MASTER: &str = "master-key-for-hyper-tests-0123456789";

struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start(resolver: CachedResolver) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = hyper_example::app(resolver, ApiKey::new(MASTER));
    tokio::spawn(hyper_example::serve(listener, app));
    Server {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Server {
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
