//! The resolver's promises (the "Invariants" of `src/resolver/mod.rs`) through the public API and
//! the layer: hits, single flight, negative caching, expiry, degraded mode, the lookup bound. The
//! invalidation races are in `tests/resolver_race.rs`.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::gate::GateStore;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::error::AuthError;
use tower_api_keys::error::ExpiredReason;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::manage::{CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;

async fn ok<B>(_: Request<B>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::empty()))
}

fn request(key: &ApiKey) -> Request<Body> {
    Request::get("/")
        .header("x-api-key", key.expose_secret())
        .body(Body::empty())
        .unwrap()
}

async fn status<S>(service: &mut S, key: &ApiKey) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<LiveBody<Body>>, Error = Infallible>,
{
    service
        .ready()
        .await
        .unwrap()
        .call(request(key))
        .await
        .unwrap()
        .status()
}

/// Invariant 1: once cached, a key is answered synchronously (the response future is ready at its
/// first poll) and never reaches the store again.
#[tokio::test]
async fn hits_never_reach_the_store() {
    let store = common::TestStore::new();
    let format = KeyFormat::default();
    let (key, _) = common::issue(&*store, &format, "ledgers:read").await;
    let resolver = CachedResolver::new(store.clone());
    let mut service = ApiKeyLayer::new(resolver.clone()).layer(tower::service_fn(ok));
    assert_eq!(status(&mut service, &key).await, StatusCode::OK);
    assert_eq!(store.lookups(), 1);
    for _ in 0..1_000 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(&key))
            .now_or_never()
            .expect("a hit is answered without waiting")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(store.lookups(), 1, "hits never reach the store");
}

/// Invariant 2: 200 concurrent first requests for one digest make one store lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_lookup() {
    let store = common::TestStore::new();
    let format = KeyFormat::default();
    let (key, record) = common::issue(&*store, &format, "ledgers:read").await;
    let resolver = CachedResolver::new(store.clone());
    let digest = key.digest();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.authenticate(&digest).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().key_id(), &record.id);
    }
    assert_eq!(store.lookups(), 1);
}

/// Invariant 3: an unknown digest is cached for the negative TTL, then asked again.
#[tokio::test]
async fn unknown_digests_are_cached_for_the_negative_ttl() {
    let store = common::TestStore::new();
    let resolver = CachedResolver::builder(store.clone())
        .negative_time_to_live(Duration::from_millis(200))
        .build();
    let digest = KeyFormat::default().generate().digest();
    for _ in 0..3 {
        let error = resolver.authenticate(&digest).await.unwrap_err();
        assert!(matches!(error, AuthError::InvalidKey(_)), "{error:?}");
    }
    assert_eq!(store.lookups(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    resolver.authenticate(&digest).await.unwrap_err();
    assert_eq!(store.lookups(), 2, "asked again after the negative TTL");
}

/// Invariant 5: a cached key is refused once it expires, however long the TTL.
#[tokio::test]
async fn a_cached_key_expires_on_time() {
    let store = common::TestStore::new();
    let format = KeyFormat::default();
    let expires = OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
    let (key, _) = common::issue_with(&*store, &format, "ledgers:read", |r| {
        r.expires_at = Some(expires)
    })
    .await;
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(3600))
        .build();
    let mut service = ApiKeyLayer::new(resolver.clone()).layer(tower::service_fn(ok));
    assert_eq!(status(&mut service, &key).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(status(&mut service, &key).await, StatusCode::UNAUTHORIZED);
    assert!(matches!(
        resolver.authenticate(&key.digest()).await,
        Err(AuthError::ExpiredKey(ExpiredReason::Expired))
    ));
}

/// Invariant 5, the principal: a request with the old secret during a rotation grace period carries
/// the grace end as its expiry (what delegation caps a child key at); the new secret carries the
/// key's own expiry.
#[tokio::test]
async fn grace_period_principal_expires_with_the_grace() {
    let store = common::TestStore::new();
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let own_expiry = OffsetDateTime::now_utc() + time::Duration::days(30);
    let created = manager
        .create(
            &Principal::master(),
            CreateKey::new(["ledgers:read"])
                .owner("team")
                .expires_at(own_expiry),
        )
        .await
        .unwrap();
    let before = OffsetDateTime::now_utc();
    let rotated = manager
        .rotate(
            &Principal::master(),
            &created.info.id,
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let after = OffsetDateTime::now_utc();
    let old = resolver.authenticate(&created.key.digest()).await.unwrap();
    let grace_end = old.expires_at().expect("the grace period ends");
    assert!(
        grace_end >= before + time::Duration::seconds(600)
            && grace_end <= after + time::Duration::seconds(600),
        "old secret's principal expires at the grace end, got {grace_end}"
    );
    let new = resolver.authenticate(&rotated.key.digest()).await.unwrap();
    let new_expiry = new.expires_at().expect("the key expires");
    assert!(
        (new_expiry - own_expiry).abs() < time::Duration::seconds(1),
        "new secret carries the key's own expiry"
    );
}

/// Invariant 8: while a subscription of the resolver is not connected (here a Redis invalidator
/// on a closed port: it never connects), answers older than the degraded lifetime are read again,
/// so a revocation nobody broadcast is refused within that lifetime; once the subscription is
/// gone, the TTL applies again.
#[cfg(feature = "redis")]
#[tokio::test]
async fn degraded_mode_rereads_old_answers() {
    use tower_api_keys::invalidate::RedisInvalidator;
    use tower_api_keys::store::KeyStore;

    let store = common::TestStore::new();
    let format = KeyFormat::default();
    let (key, record) = common::issue(&*store, &format, "ledgers:read").await;
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(3600))
        .degraded_time_to_live(Duration::from_millis(200))
        .build();
    assert!(!resolver.is_degraded(), "no subscription, no degraded mode");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let subscription = RedisInvalidator::open(&format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .subscribe(resolver.clone());
    assert!(
        resolver.is_degraded(),
        "degraded until the subscription is up"
    );

    let mut service = ApiKeyLayer::new(resolver.clone()).layer(tower::service_fn(ok));
    assert_eq!(status(&mut service, &key).await, StatusCode::OK);
    assert_eq!(status(&mut service, &key).await, StatusCode::OK);
    assert_eq!(
        store.lookups(),
        1,
        "fresh answers are served from the cache"
    );
    // Revoked in the store, with no invalidation: refused once the answer is older than 200 ms.
    store
        .revoke(&record.id, OffsetDateTime::now_utc())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(status(&mut service, &key).await, StatusCode::UNAUTHORIZED);
    assert_eq!(store.lookups(), 2);

    // Without the subscription the resolver is no longer degraded: cached answers last the TTL.
    drop(subscription);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!resolver.is_degraded());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(status(&mut service, &key).await, StatusCode::UNAUTHORIZED);
    assert_eq!(store.lookups(), 2, "the TTL applies again");
}

/// Invariant 9 (#16): with 1 lookup in flight and 1 queued, a third distinct miss is answered 503
/// `AUTH_UNAVAILABLE` at once and counted, a miss for the digest already in flight joins it, cached
/// keys keep being answered, and once the store answers, misses are looked up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lookup_bound_sheds_and_recovers() {
    let store = Arc::new(GateStore::default());
    let format = KeyFormat::default();
    let (cached, _) = common::issue(&*store, &format, "ledgers:read").await;
    let (first, _) = common::issue(&*store, &format, "ledgers:read").await;
    let (second, _) = common::issue(&*store, &format, "ledgers:read").await;
    let (third, _) = common::issue(&*store, &format, "ledgers:read").await;
    let resolver = CachedResolver::builder(store.clone())
        .lookup_limit(1, 1)
        .lookup_timeout(Duration::from_secs(10))
        .build();
    let service = ApiKeyLayer::new(resolver.clone()).layer(tower::service_fn(ok));
    let send = |key: &ApiKey| {
        let mut service = service.clone();
        let request = request(key);
        tokio::spawn(async move { service.ready().await.unwrap().call(request).await.unwrap() })
    };
    assert_eq!(send(&cached).await.unwrap().status(), StatusCode::OK);

    store.hold_next(1);
    let in_flight = send(&first);
    store.wait_held(1).await;
    let joined = send(&first);
    let queued = send(&second);
    // The queued lookup waits for the slot; give it time to take its place.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shed = tokio::time::timeout(Duration::from_secs(1), send(&third))
        .await
        .expect("shed at once")
        .unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        common::error_code(shed.map(LiveBody::into_inner)).await,
        "AUTH_UNAVAILABLE"
    );
    assert_eq!(resolver.shed_lookups(), 1);
    assert_eq!(
        send(&cached).await.unwrap().status(),
        StatusCode::OK,
        "cached keys still pass"
    );
    assert_eq!(
        store.lookups(),
        2,
        "one in flight (the join shares it), one cached before"
    );

    store.release(1);
    for pending in [in_flight, joined, queued] {
        assert_eq!(pending.await.unwrap().status(), StatusCode::OK);
    }
    // Recovered: the shed key is looked up now.
    assert_eq!(send(&third).await.unwrap().status(), StatusCode::OK);
    assert_eq!(store.lookups(), 4);
    assert_eq!(resolver.shed_lookups(), 1);
}
