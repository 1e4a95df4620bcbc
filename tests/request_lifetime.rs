//! I4, a request lives no longer than its key (issue #26), through real sockets: an axum server on
//! 127.0.0.1 and a raw HTTP/1.1 client that holds a request body back, so that the key ends between
//! the request head (admitted) and the body.
//!
//! - a body sent after the key was revoked (here, on another instance over PostgreSQL and Redis,
//!   through a revoked ancestor) or after it expired writes nothing and gets 401
//!   `AUTH_EXPIRED_API_KEY`, not the extractor's 400;
//! - a chunked response stops at its next chunk once the key is revoked (the connection closes
//!   without the last chunk);
//! - a handler selecting on `Principal::ended` stops.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_api_keys::error::AuthError;
use tower_api_keys::invalidate::{LOCAL_INSTANCE, REQUESTS_ENDED_HEADER};
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{CreateKey, CreatedKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::provenance::ProvenanceLayer;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

/// Only guards against hanging; no assertion is about speed.
const HANG_GUARD: Duration = Duration::from_secs(30);
const BODY: &str = r#"{"name":"written after the end"}"#;

/// What the handlers did.
#[derive(Clone, Default)]
struct Seen {
    /// Requests that got past the layer (their head was admitted).
    admitted: Arc<AtomicUsize>,
    writes: Arc<Mutex<Vec<Bytes>>>,
    stopped: Arc<Mutex<Option<String>>>,
}

/// How the layer hands bodies on in the test's router: every test runs in both modes.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `ApiKeyLayer::new(..)`: bodies in a `LiveBody` (any tower service).
    AnyBody,
    /// `.axum_body()`: axum's own `Body`, wrapped only when watched.
    AxumBody,
}

/// Each `async fn name(mode: Mode)` as two tests, `name::any_body` and `name::axum_body`.
macro_rules! in_both_modes {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn any_body() {
                super::$name(super::Mode::AnyBody).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn axum_body() {
                super::$name(super::Mode::AxumBody).await;
            }
        }
    )+};
}

in_both_modes!(
    a_body_sent_after_a_revocation_writes_nothing_and_gets_401,
    a_body_to_stamp_sent_after_a_revocation_is_neither_stamped_nor_written,
    a_revoked_ancestor_ends_the_requests_of_its_descendants,
    a_body_held_back_past_the_expiry_gets_401,
    a_chunked_response_stops_at_its_next_chunk_after_a_revocation,
    a_handler_selecting_on_the_end_future_stops,
);

fn app(resolver: CachedResolver, seen: Seen, mode: Mode) -> Router {
    let writes = seen.writes.clone();
    let stamped_writes = seen.writes.clone();
    let stopped = seen.stopped.clone();
    let router = Router::new()
        .route(
            "/stamped",
            post(move |body: Bytes| {
                let writes = stamped_writes.clone();
                async move {
                    writes.lock().unwrap().push(body);
                    http::StatusCode::CREATED
                }
            })
            .route_layer(ProvenanceLayer::new()),
        )
        .route(
            "/ledgers",
            post(move |body: Bytes| {
                let writes = writes.clone();
                async move {
                    writes.lock().unwrap().push(body);
                    http::StatusCode::CREATED
                }
            }),
        )
        .route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0u64, |n| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(format!("{n}\n"))),
                        n + 1,
                    ))
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/long",
            get(move |principal: Principal| {
                let stopped = stopped.clone();
                async move {
                    tokio::select! {
                        () = tokio::time::sleep(HANG_GUARD * 2) => Ok("finished"),
                        ended = principal.ended() => {
                            *stopped.lock().unwrap() = Some(ended.code().to_string());
                            Err::<&str, AuthError>(ended)
                        }
                    }
                }
            }),
        )
        .layer(tower::util::MapRequestLayer::new(
            move |request: http::Request<Body>| {
                seen.admitted.fetch_add(1, Ordering::SeqCst);
                request
            },
        ));
    match mode {
        Mode::AnyBody => router.layer(ApiKeyLayer::new(resolver)),
        Mode::AxumBody => router.layer(ApiKeyLayer::new(resolver).axum_body()),
    }
}

impl Seen {
    /// Waits until more than `before` requests were admitted.
    async fn wait_admitted(&self, before: usize) {
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        while self.admitted.load(Ordering::SeqCst) <= before {
            assert!(tokio::time::Instant::now() < deadline, "never admitted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A POST whose head is sent at once and whose body waits for [`HeldPost::finish`].
struct HeldPost {
    stream: TcpStream,
}

impl HeldPost {
    async fn start(addr: std::net::SocketAddr, key: &ApiKey, seen: &Seen) -> Self {
        Self::start_at(addr, "/ledgers", key, seen).await
    }

    async fn start_at(addr: std::net::SocketAddr, path: &str, key: &ApiKey, seen: &Seen) -> Self {
        let before = seen.admitted.load(Ordering::SeqCst);
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            key.expose_secret(),
            BODY.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // The head was admitted: the request is in flight, waiting for its body.
        seen.wait_admitted(before).await;
        Self { stream }
    }

    /// Sends the body and returns the response (status, whole text).
    async fn finish(mut self) -> (u16, String) {
        self.stream.write_all(BODY.as_bytes()).await.unwrap();
        read_response(&mut self.stream).await
    }
}

async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(HANG_GUARD, stream.read(&mut buf))
            .await
            .expect("the response came")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        let so_far = String::from_utf8_lossy(&text);
        if let Some((head, body)) = so_far.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|length| body.len() >= length) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A one-shot GET with `key`; the status.
async fn get_status(addr: std::net::SocketAddr, path: &str, key: &ApiKey) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\nconnection: close\r\n\r\n",
        key.expose_secret()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    read_response(&mut stream).await.0
}

async fn create(manager: &KeyManager, caller: &Principal, scopes: &[&str]) -> CreatedKey {
    manager
        .create(
            caller,
            CreateKey::new(scopes.iter().copied())
                .owner("team")
                .account("acct"),
        )
        .await
        .unwrap()
}

fn assert_refused_as_ended(status: u16, text: &str, reason: &str, key: &ApiKey) {
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("AUTH_EXPIRED_API_KEY"), "{text}");
    assert!(text.contains(reason), "{text}");
    assert!(!text.contains(key.expose_secret()), "never the key: {text}");
}

async fn a_body_sent_after_a_revocation_writes_nothing_and_gets_401(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let seen = Seen::default();
    let addr = serve(app(resolver.clone(), seen.clone(), mode)).await;
    let created = create(&manager, &Principal::master(), &["ledgers:write"]).await;

    // The same request shape goes through while the key lives.
    let (status, text) = HeldPost::start(addr, &created.key, &seen)
        .await
        .finish()
        .await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(seen.writes.lock().unwrap().len(), 1);

    let held = HeldPost::start(addr, &created.key, &seen).await;
    let (_, receipt) = manager
        .revoke_with_receipt(&Principal::master(), &created.info.id, None, None)
        .await
        .unwrap();
    // The one request in flight (the finished one is not), on this instance (no fleet).
    assert_eq!(
        receipt.requests_ended,
        [(LOCAL_INSTANCE.to_owned(), 1)].into()
    );
    assert!(
        receipt
            .headers()
            .contains(&(REQUESTS_ENDED_HEADER.parse().unwrap(), "1".parse().unwrap())),
        "{:?}",
        receipt.headers()
    );
    let (status, text) = held.finish().await;
    assert_refused_as_ended(status, &text, "revoked", &created.key);
    assert_eq!(seen.writes.lock().unwrap().len(), 1, "nothing written");
    assert_eq!(resolver.requests_ended(&created.info.id), 1);
}

async fn a_body_to_stamp_sent_after_a_revocation_is_neither_stamped_nor_written(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let seen = Seen::default();
    let addr = serve(app(resolver.clone(), seen.clone(), mode)).await;
    let created = create(&manager, &Principal::master(), &["ledgers:write"]).await;

    let (status, text) = HeldPost::start_at(addr, "/stamped", &created.key, &seen)
        .await
        .finish()
        .await;
    assert_eq!(status, 201, "{text}");
    let stamped = seen.writes.lock().unwrap()[0].clone();
    assert!(String::from_utf8_lossy(&stamped).contains(created.info.id.as_str()));

    let held = HeldPost::start_at(addr, "/stamped", &created.key, &seen).await;
    manager
        .revoke(&Principal::master(), &created.info.id)
        .await
        .unwrap();
    let (status, text) = held.finish().await;
    assert_refused_as_ended(status, &text, "revoked", &created.key);
    assert_eq!(
        seen.writes.lock().unwrap().len(),
        1,
        "nothing stamped nor written"
    );
}

async fn a_revoked_ancestor_ends_the_requests_of_its_descendants(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let seen = Seen::default();
    let addr = serve(app(resolver.clone(), seen.clone(), mode)).await;
    let parent = create(
        &manager,
        &Principal::master(),
        &["ledgers:write", "api-keys:write"],
    )
    .await;
    let parent_principal = resolver.authenticate(&parent.key.digest()).await.unwrap();
    let child = create(&manager, &parent_principal, &["ledgers:write"]).await;

    let held = HeldPost::start(addr, &child.key, &seen).await;
    let (_, receipt) = manager
        .revoke_with_receipt(&Principal::master(), &parent.info.id, None, None)
        .await
        .unwrap();
    assert_eq!(
        receipt.requests_ended_total(),
        1,
        "the child's request counts in the parent's receipt: {receipt}"
    );
    let (status, text) = held.finish().await;
    assert_refused_as_ended(status, &text, "revoked", &child.key);
    assert!(seen.writes.lock().unwrap().is_empty(), "nothing written");
}

async fn a_body_held_back_past_the_expiry_gets_401(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let seen = Seen::default();
    let addr = serve(app(resolver.clone(), seen.clone(), mode)).await;
    let expires_at = OffsetDateTime::now_utc() + Duration::from_millis(1500);
    let created = manager
        .create(
            &Principal::master(),
            CreateKey::new(["ledgers:write"])
                .owner("team")
                .account("acct")
                .expires_at(expires_at),
        )
        .await
        .unwrap();

    let held = HeldPost::start(addr, &created.key, &seen).await;
    // No event: the expiry is a time. Hold the body until it has passed.
    while OffsetDateTime::now_utc() < expires_at + Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, text) = held.finish().await;
    assert_refused_as_ended(status, &text, "expired", &created.key);
    assert!(seen.writes.lock().unwrap().is_empty(), "nothing written");
}

async fn a_chunked_response_stops_at_its_next_chunk_after_a_revocation(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let addr = serve(app(resolver.clone(), Seen::default(), mode)).await;
    let created = create(&manager, &Principal::master(), &["ledgers:read"]).await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET /stream HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n",
        created.key.expose_secret()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // A few chunks while the key lives.
    while !String::from_utf8_lossy(&received).contains("\r\n3\n") {
        let n = tokio::time::timeout(HANG_GUARD, stream.read(&mut buf))
            .await
            .expect("chunks come")
            .unwrap();
        assert!(n > 0, "the stream ended before the revocation");
        received.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"));
    manager
        .revoke(&Principal::master(), &created.info.id)
        .await
        .unwrap();
    // The stream is infinite: only the key's end can stop it. It stops without the last chunk.
    let after = common::wire::read_until_closed(&mut stream, HANG_GUARD).await;
    assert!(!after.contains("\r\n0\r\n\r\n"), "no clean end: {after}");
    assert!(
        after.matches('\n').count() <= 4,
        "at most the chunk in flight: {after}"
    );
    assert_eq!(resolver.requests_ended(&created.info.id), 1);
}

async fn a_handler_selecting_on_the_end_future_stops(mode: Mode) {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let seen = Seen::default();
    let addr = serve(app(resolver.clone(), seen.clone(), mode)).await;
    let created = create(&manager, &Principal::master(), &["ledgers:read"]).await;

    let key = created.key.clone();
    let before = seen.admitted.load(Ordering::SeqCst);
    let request = tokio::spawn(async move { get_status(addr, "/long", &key).await });
    seen.wait_admitted(before).await;
    assert!(seen.stopped.lock().unwrap().is_none());
    manager
        .revoke(&Principal::master(), &created.info.id)
        .await
        .unwrap();
    let status = tokio::time::timeout(HANG_GUARD, request)
        .await
        .expect("the handler stopped")
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        seen.stopped.lock().unwrap().as_deref(),
        Some("AUTH_EXPIRED_API_KEY")
    );
}

/// The fleet: the server runs on instance B; the key is revoked through A's `KeyManager`, which
/// publishes the change and waits for B's acknowledgement. B ends the requests in flight under the
/// key before it acknowledges, and says how many: once the receipt is complete, the body held back
/// on B is refused, with no waiting.
#[cfg(feature = "postgres")]
mod fleet {
    use super::*;
    use tower_api_keys::invalidate::Invalidator;
    use tower_api_keys::store::PostgresStore;

    async fn body_on_b_after_revoke_on_a(
        a_store: PostgresStore,
        a_invalidator: impl Invalidator,
        b_resolver: CachedResolver,
    ) {
        let a_resolver = CachedResolver::new(a_store.clone());
        let a = KeyManager::new(a_resolver).invalidator(a_invalidator);
        let seen = Seen::default();
        let addr = serve(app(b_resolver.clone(), seen.clone(), Mode::AxumBody)).await;
        // Until both instances are in the roster (a throwaway key's revocation says so).
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        loop {
            let probe = create(&a, &Principal::master(), &["ledgers:write"]).await;
            let (_, receipt) = a
                .revoke_with_receipt(&Principal::master(), &probe.info.id, None, None)
                .await
                .unwrap();
            if receipt.is_complete() && receipt.instances == 2 {
                assert_eq!(
                    receipt.requests_ended,
                    [("a".to_owned(), 0), ("b".to_owned(), 0)].into(),
                    "nothing was in flight under the probe: {receipt}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never 2 instances: {receipt}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let created = create(&a, &Principal::master(), &["ledgers:write"]).await;

        let held = HeldPost::start(addr, &created.key, &seen).await;
        let (_, receipt) = a
            .revoke_with_receipt(&Principal::master(), &created.info.id, None, None)
            .await
            .unwrap();
        assert!(receipt.is_complete(), "{receipt}");
        assert_eq!(
            receipt.requests_ended,
            [("a".to_owned(), 0), ("b".to_owned(), 1)].into(),
            "B ended the request held there before it acknowledged: {receipt}"
        );
        // Ended before the acknowledgement: B refuses the body and new requests at once.
        assert!(
            b_resolver
                .authenticate(&created.key.digest())
                .await
                .is_err()
        );
        let (status, text) = held.finish().await;
        assert_refused_as_ended(status, &text, "revoked", &created.key);
        assert!(
            seen.writes.lock().unwrap().is_empty(),
            "nothing written on B"
        );
        assert_eq!(b_resolver.requests_ended(&created.info.id), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_listen_notify() {
        use tower_api_keys::invalidate::PostgresInvalidator;
        let Some(schema) = common::db::pg_schema("lifetime_pg").await else {
            return;
        };
        let channel = common::db::unique("lifetime_pg");
        let (a_store, b_store) = (schema.store().await, schema.store().await);
        let b_resolver = CachedResolver::builder(b_store.clone())
            .time_to_live(Duration::from_secs(300))
            .build();
        let a_invalidator = PostgresInvalidator::from_store(&a_store)
            .with_channel(&channel)
            .unwrap()
            .heartbeat(Duration::from_millis(50))
            .instance_name("a");
        let a_subscription = a_invalidator.subscribe(CachedResolver::new(a_store.clone()));
        let b_subscription = PostgresInvalidator::from_store(&b_store)
            .with_channel(&channel)
            .unwrap()
            .heartbeat(Duration::from_millis(50))
            .instance_name("b")
            .subscribe(b_resolver.clone());
        for subscription in [&a_subscription, &b_subscription] {
            tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
                .await
                .expect("subscriber connects");
        }
        body_on_b_after_revoke_on_a(a_store, a_invalidator, b_resolver).await;
        a_subscription.shutdown().await;
        b_subscription.shutdown().await;
        schema.drop_schema().await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_redis() {
        use tower_api_keys::invalidate::RedisInvalidator;
        let Some(schema) = common::db::pg_schema("lifetime_redis").await else {
            return;
        };
        let Some(redis_url) = common::db::redis_url("lifetime_redis").await else {
            return;
        };
        let channel = common::db::unique("lifetime_redis");
        let (a_store, b_store) = (schema.store().await, schema.store().await);
        let b_resolver = CachedResolver::builder(b_store.clone())
            .time_to_live(Duration::from_secs(300))
            .build();
        let a_invalidator = RedisInvalidator::open(&redis_url)
            .unwrap()
            .with_channel(&channel)
            .heartbeat(Duration::from_millis(50))
            .instance_name("a");
        let a_subscription = a_invalidator.subscribe(CachedResolver::new(a_store.clone()));
        let b_subscription = RedisInvalidator::open(&redis_url)
            .unwrap()
            .with_channel(&channel)
            .heartbeat(Duration::from_millis(50))
            .instance_name("b")
            .subscribe(b_resolver.clone());
        for subscription in [&a_subscription, &b_subscription] {
            tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
                .await
                .expect("subscriber connects");
        }
        body_on_b_after_revoke_on_a(a_store, a_invalidator, b_resolver).await;
        a_subscription.shutdown().await;
        b_subscription.shutdown().await;
        schema.drop_schema().await;
    }
}
