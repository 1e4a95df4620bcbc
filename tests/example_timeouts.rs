//! Issue #26: the example server cuts slow clients, with the timeouts of `examples/server/timeouts.rs`
//! (its `serve` and `Timeouts::apply`, here with short values): a stalled request head, a stalled
//! body and a request past its deadline, over real sockets. The defaults stay within the bounds the
//! README documents.

#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use server::timeouts::{Timeouts, serve};
use tokio::net::TcpListener;

/// Short enough for a test, long enough for a loaded machine to send a head in time.
const SHORT: Timeouts = Timeouts {
    head: Duration::from_millis(400),
    body: Duration::from_millis(400),
    request: Duration::from_millis(800),
};

/// A router like the example's, its timeouts applied by the example's code, served by the
/// example's `serve`.
async fn start(timeouts: Timeouts) -> SocketAddr {
    let router = Router::new()
        .route("/echo", post(|body: String| async move { body }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                "too late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        timeouts.apply(router, tower::layer::util::Identity::new()),
        timeouts,
        std::future::pending(),
    ));
    addr
}

#[test]
fn the_defaults_are_within_the_documented_bounds() {
    let defaults = Timeouts::DEFAULT;
    assert!(defaults.head <= Duration::from_secs(30));
    assert!(defaults.body <= Duration::from_secs(30));
    assert_eq!(defaults.request, Duration::from_secs(30));
}

#[tokio::test]
async fn a_stalled_head_is_cut() {
    common::wire::assert_stalled_head_is_cut(start(SHORT).await, SHORT.head).await;
}

#[tokio::test]
async fn a_stalled_body_is_cut() {
    let addr = start(SHORT).await;
    let answer = common::wire::until_closed(
        addr,
        b"POST /echo HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\n\
          content-length: 20\r\nconnection: close\r\n\r\nonly part",
        SHORT.body,
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the body timed out: {answer}"
    );
    assert!(!answer.contains("only part"), "never handled: {answer}");
}

#[tokio::test]
async fn a_request_past_its_deadline_is_answered_408() {
    let addr = start(SHORT).await;
    let answer = common::wire::until_closed(
        addr,
        b"GET /slow HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        SHORT.request,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(!answer.contains("too late"), "{answer}");
}
