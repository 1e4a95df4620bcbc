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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic_example::serve_with(
        listener,
        resolver,
        ApiKey::new(MASTER),
        service,
        Timeouts::DEFAULT,
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
    let manager = KeyManager::new(resolver.store().clone(), resolver.clone());
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
    while service.len() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    manager
        .revoke(&Principal::master(), &info.id)
        .await
        .unwrap();
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
    let manager = KeyManager::new(resolver.store().clone(), resolver.clone());
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
    manager
        .revoke(&Principal::master(), &info.id)
        .await
        .unwrap();
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
