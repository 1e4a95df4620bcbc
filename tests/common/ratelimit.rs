//! What the rate-limit tests share: a real HTTP server for an app, and a client that fires many
//! requests at once and collects status, headers and error code of each.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Serves `app` on a free local port until the test ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `error_detail.code` of an error body, if any.
    pub code: Option<String>,
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http()
}

/// `GET http://{addr}{path}` with `key` in `x-api-key`.
pub async fn fetch(
    client: &Client<HttpConnector, Body>,
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> Answer {
    let request = Request::get(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error_detail"]["code"].as_str().map(str::to_owned));
    Answer {
        status,
        headers,
        code,
    }
}

/// `n` concurrent GETs, spread round-robin over `addrs`, all started before any is awaited.
pub async fn blast(addrs: &[SocketAddr], path: &str, key: &str, n: usize) -> Vec<Answer> {
    blast_keys(addrs, path, &[key.to_owned()], n).await
}

/// `n` concurrent GETs, request `i` with `keys[i % keys.len()]` to
/// `addrs[(i / keys.len()) % addrs.len()]` (every key reaches every address), all started before
/// any is awaited; the answers in the order of the requests.
pub async fn blast_keys(
    addrs: &[SocketAddr],
    path: &str,
    keys: &[String],
    n: usize,
) -> Vec<Answer> {
    let client = client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let addr = addrs[(i / keys.len()) % addrs.len()];
            let path = path.to_owned();
            let key = keys[i % keys.len()].clone();
            tokio::spawn(async move { fetch(&client, addr, &path, &key).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// How many answers had `status`.
pub fn count(answers: &[Answer], status: StatusCode) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

/// Every refused answer is a 429 with `code`, a positive `Retry-After` and both RateLimit fields;
/// every admitted one carries both fields too. Panics otherwise.
pub fn check_headers(answers: &[Answer], code: &str) {
    for answer in answers {
        assert!(
            answer.headers.contains_key("ratelimit-policy") || code == "USAGE_EXCEEDED",
            "{answer:?}"
        );
        assert!(answer.headers.contains_key("ratelimit"), "{answer:?}");
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.code.as_deref(), Some(code), "{answer:?}");
            if code == "RATE_LIMITED" {
                let retry: u64 = answer.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1, "{answer:?}");
            }
        } else {
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        }
    }
}
