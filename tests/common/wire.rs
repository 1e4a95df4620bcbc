//! Real HTTP for the behaviour tests: serve a router on 127.0.0.1 with axum's connect info (so
//! `ApiKeyLayer` sees the peer address), and send one request with a hyper client.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;

/// Serves `app` on a free port of 127.0.0.1 with `ConnectInfo<SocketAddr>`, until the test ends.
pub async fn serve_with_connect_info(app: Router) -> SocketAddr {
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
    addr
}

/// One answer: status, headers, the body, and `error_detail.code` if the body has one.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub code: Option<String>,
}

impl Reply {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Panics unless the answer has `status` and (for errors) `code`.
    #[track_caller]
    pub fn expect(&self, status: StatusCode, code: Option<&str>) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.code.as_deref(), code, "{self:?}");
        self
    }
}

/// `method http://{addr}{path}` with `headers` and `body` (a JSON body gets its content type from
/// `headers`).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error_detail"]["code"].as_str().map(str::to_owned));
    Reply {
        status,
        headers,
        body,
        code,
    }
}

/// Reads until the peer closes the connection (or an error), giving up after `hang_guard` (which
/// only guards against hanging), and returns what came.
pub async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    hang_guard: std::time::Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + hang_guard;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the peer closed the connection");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Writes `bytes` (a request the server should give up on: a stalled head or body, or one past
/// its deadline) on a new connection to `addr`, then reads until the server closes it, and checks
/// that it did not close before `not_before` (the timeout under test). Returns what came.
pub async fn until_closed(
    addr: SocketAddr,
    bytes: &[u8],
    not_before: std::time::Duration,
) -> String {
    use tokio::io::AsyncWriteExt;
    /// Only guards against hanging; no assertion is about speed.
    const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(30);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let started = std::time::Instant::now();
    let answer = read_until_closed(&mut stream, HANG_GUARD).await;
    assert!(
        started.elapsed() >= not_before,
        "closed after {:?}, before the bound {not_before:?}: {answer}",
        started.elapsed()
    );
    answer
}

/// Sends half a request head to `addr` and checks that the server cuts it, not before
/// `head_timeout`: hyper answers 408 to a head that timed out, or just closes.
pub async fn assert_stalled_head_is_cut(addr: SocketAddr, head_timeout: std::time::Duration) {
    let answer = until_closed(
        addr,
        b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api",
        head_timeout,
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}
