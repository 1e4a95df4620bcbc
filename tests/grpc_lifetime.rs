//! I4 over gRPC (issue #26), through the example's tonic server and a tonic client on 127.0.0.1:
//! a client stream whose messages come after the revocation ends UNAUTHENTICATED with none of them
//! handled; a server stream ends with status 16 once the key is revoked. Needs the `grpc-example`
//! feature (`cargo test --all-features` has it).

#[path = "../examples/tonic.rs"]
#[allow(dead_code)]
mod tonic_example;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Code;
use tower_api_keys::key::ApiKey;
use tower_api_keys::manage::KeyManager;
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

use tonic_example::pb::ledgers_client::LedgersClient;
use tonic_example::pb::{CreateLedgerRequest, WatchLedgersRequest};
use tonic_example::{LedgerService, Timeouts, issue_key};

const MASTER: &str = "master-key-for-grpc-lifetime-0123456789";
/// Only guards against hanging; no assertion is about speed.
const HANG_GUARD: Duration = Duration::from_secs(30);

async fn start(resolver: CachedResolver, service: LedgerService) -> SocketAddr {
    start_with(resolver, service, Timeouts::DEFAULT).await
}

async fn start_with(
    resolver: CachedResolver,
    service: LedgerService,
    timeouts: Timeouts,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic_example::serve_with(
        listener,
        resolver,
        ApiKey::new(MASTER),
        service,
        timeouts,
    ));
    addr
}

fn with_key<T>(message: T, key: &ApiKey) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", key.expose_secret().parse().unwrap());
    request
}

fn assert_ended(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().starts_with("AUTH_EXPIRED_API_KEY"),
        "the stable message: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_after_the_revocation_is_not_handled() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, info) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
    let manager = KeyManager::new(resolver.clone());
    let service = LedgerService::default();
    let addr = start(resolver.clone(), service.clone()).await;
    let mut client = LedgersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let (sender, receiver) = tokio::sync::mpsc::channel::<CreateLedgerRequest>(4);
    let call = {
        let key = key.clone();
        tokio::spawn(async move {
            let messages = tokio_stream_from(receiver);
            client.import_ledgers(with_key(messages, &key)).await
        })
    };
    sender
        .send(CreateLedgerRequest {
            name: "before".into(),
        })
        .await
        .unwrap();
    // The first message is handled while the key lives.
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while service.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, receipt) = manager
        .revoke_with_receipt(&Principal::master(), &info.id, None, None)
        .await
        .unwrap();
    assert_eq!(receipt.requests_ended_total(), 1, "{receipt}");
    for name in ["after 1", "after 2"] {
        let _ = sender.send(CreateLedgerRequest { name: name.into() }).await;
    }
    drop(sender);
    let status = tokio::time::timeout(HANG_GUARD, call)
        .await
        .expect("the call ended")
        .unwrap()
        .expect_err("the call fails");
    assert_ended(&status);
    assert_eq!(
        service.len(),
        1,
        "no message after the revocation was handled"
    );
    assert_eq!(resolver.requests_ended(&info.id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_ends_with_status_16_after_the_revocation() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, info) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
    let manager = KeyManager::new(resolver.clone());
    let addr = start(resolver.clone(), LedgerService::default()).await;
    let mut client = LedgersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = client
        .watch_ledgers(with_key(WatchLedgersRequest { interval_ms: 20 }, &key))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        let beat = tokio::time::timeout(HANG_GUARD, stream.message())
            .await
            .expect("heartbeats come")
            .unwrap();
        assert!(beat.is_some(), "the stream runs while the key lives");
    }
    let (_, receipt) = manager
        .revoke_with_receipt(&Principal::master(), &info.id, None, None)
        .await
        .unwrap();
    // The stream, already answered with its head, is in flight until its last frame.
    assert_eq!(receipt.requests_ended_total(), 1, "{receipt}");
    // The stream never ends by itself: only the key's end stops it, at its next message.
    let ended = tokio::time::timeout(HANG_GUARD, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the stream ended");
    assert_ended(&ended);
    assert_eq!(resolver.requests_ended(&info.id), 1);
}

/// A `Stream` of the messages sent into `receiver`.
fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// Regression tests for the shapes that held in the review of #26, over a real HTTP/2 connection
/// (tonic's `Channel`, which sends any path and metadata as given).
mod held {
    use super::*;
    use tower::{Service, ServiceExt};

    /// Sends an empty gRPC call to `path` with `metadata`; the `grpc-status` and `grpc-message`.
    async fn call(addr: SocketAddr, path: &str, metadata: &[(&str, &str)]) -> (String, String) {
        let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in metadata {
            request = request.header(*name, *value);
        }
        // One empty message (flag 0, length 0), so that a reachable method could answer.
        let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])));
        let response = channel
            .ready()
            .await
            .unwrap()
            .call(request.body(body).unwrap())
            .await
            .unwrap();
        let header = |headers: &http::HeaderMap, name: &str| {
            headers.get(name).map(|v| v.to_str().unwrap().to_owned())
        };
        if let (Some(status), message) = (
            header(response.headers(), "grpc-status"),
            header(response.headers(), "grpc-message"),
        ) {
            return (status, message.unwrap_or_default());
        }
        let trailers = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .trailers()
            .cloned()
            .unwrap_or_default();
        (
            header(&trailers, "grpc-status").unwrap_or_default(),
            header(&trailers, "grpc-message").unwrap_or_default(),
        )
    }

    #[tokio::test]
    async fn method_path_variants_fall_back_to_default_deny() {
        let resolver = CachedResolver::new(MemoryStore::new());
        let (key, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
        let service = LedgerService::default();
        let addr = start(resolver, service.clone()).await;
        let metadata = [("x-api-key", key.expose_secret())];
        // The read key reaches GetLedger (NOT_FOUND: no such ledger) ...
        let (status, _) = call(addr, "/ledger.v1.Ledgers/GetLedger", &metadata).await;
        assert_eq!(status, "5");
        // ... and no spelling of CreateLedger (which needs `ledgers:write`) gets past the guard.
        for path in [
            "/ledger.v1.Ledgers/CreateLedger",
            "/ledger.v1.Ledgers/createledger",
            "/ledger.v1.Ledgers/CREATELEDGER",
            "/ledger.v1.ledgers/CreateLedger",
            "//ledger.v1.Ledgers/CreateLedger",
            "/ledger.v1.Ledgers//CreateLedger",
            "/ledger.v1.Ledgers/CreateLedger/",
            "/ledger.v1.Ledgers/CreateLedger/extra",
            "/ledger.v1.Ledgers/%43reateLedger",
            "/ledger.v1.Ledgers%2FCreateLedger",
            "/ledger.v1.Ledgers/./CreateLedger",
            "/x/../ledger.v1.Ledgers/CreateLedger",
            "/ledger.v1.Ledgers/CreateLedger?scope=ledgers:write",
            "/ledger.v1.Ledgers/ImportLedgers",
        ] {
            let (status, message) = call(addr, path, &metadata).await;
            assert_eq!(status, "7", "{path}: {message}");
            assert!(
                message.starts_with("AUTH_INSUFFICIENT_PERMISSIONS"),
                "{path}: {message}"
            );
        }
        assert_eq!(service.len(), 0, "nothing created");
    }

    #[tokio::test]
    async fn two_different_keys_and_binary_metadata_are_refused_with_stable_messages() {
        let resolver = CachedResolver::new(MemoryStore::new());
        let (key, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
        let (other, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
        let addr = start(resolver, LedgerService::default()).await;
        let path = "/ledger.v1.Ledgers/GetLedger";
        let bearer = format!("Bearer {}", other.expose_secret());
        // Two different keys: ambiguous, refused (never "the first one wins").
        let (status, message) = call(
            addr,
            path,
            &[
                ("x-api-key", key.expose_secret()),
                ("authorization", &bearer),
            ],
        )
        .await;
        assert_eq!(status, "16", "{message}");
        assert!(message.starts_with("AUTH_INVALID_API_KEY"), "{message}");
        // A key in binary metadata is not a key source (whatever its encoding: here the plain
        // text, which a careless decoder would take as is).
        let (status, message) = call(addr, path, &[("x-api-key-bin", key.expose_secret())]).await;
        assert_eq!(status, "16", "{message}");
        assert!(message.starts_with("AUTH_MISSING_API_KEY"), "{message}");
        assert!(!message.contains(key.expose_secret()), "never the key");
    }
}

/// The example's timeouts (short values here): a client stream that stalls fails after the body
/// timeout, with nothing after the stall handled; a call past its deadline ends CANCELLED.
mod timeouts {
    use super::*;

    const SHORT: Duration = Duration::from_millis(400);

    /// `ImportLedgers` fed by `receiver` (which the test keeps open), until the server fails it:
    /// not before [`SHORT`], the bound under test.
    async fn import_until_failed(
        client: &mut LedgersClient<tonic::transport::Channel>,
        receiver: tokio::sync::mpsc::Receiver<CreateLedgerRequest>,
        key: &ApiKey,
    ) -> tonic::Status {
        let started = std::time::Instant::now();
        let status = tokio::time::timeout(
            HANG_GUARD,
            client.import_ledgers(with_key(tokio_stream_from(receiver), key)),
        )
        .await
        .expect("the call ended")
        .expect_err("the server fails the call");
        assert!(started.elapsed() >= SHORT, "not before the bound");
        status
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_client_stream_is_cut() {
        let resolver = CachedResolver::new(MemoryStore::new());
        let (key, _) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
        let service = LedgerService::default();
        let timeouts = Timeouts {
            body: SHORT,
            request: Duration::from_secs(20),
        };
        let addr = start_with(resolver, service.clone(), timeouts).await;
        let mut client = LedgersClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        sender
            .send(CreateLedgerRequest {
                name: "before the stall".into(),
            })
            .await
            .unwrap();
        let status = import_until_failed(&mut client, receiver, &key).await;
        // tonic maps the body's error to UNKNOWN with tower-http's words.
        assert_eq!(status.code(), Code::Unknown, "{status:?}");
        assert!(status.message().contains("timeout"), "{status:?}");
        assert_eq!(service.len(), 1, "the message before the stall only");
        drop(sender);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_past_its_deadline_is_cancelled() {
        let resolver = CachedResolver::new(MemoryStore::new());
        let (key, _) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
        let timeouts = Timeouts {
            body: Duration::from_secs(20),
            request: SHORT,
        };
        let addr = start_with(resolver, LedgerService::default(), timeouts).await;
        let mut client = LedgersClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        // A client stream that stays open (sending nothing) has no answer before the deadline.
        let (sender, receiver) = tokio::sync::mpsc::channel::<CreateLedgerRequest>(4);
        let status = import_until_failed(&mut client, receiver, &key).await;
        assert_eq!(status.code(), Code::Cancelled, "{status:?}");
        drop(sender);
    }
}
