//! The resolver's invalidation promises under races (its invariants 6 and 7):
//!
//! - a lookup that read the store before an invalidation and answers after it never fills the
//!   cache, and the next request reaches the store (deterministic: the store blocks mid-lookup on a
//!   gate the test opens);
//! - threads authenticating one key in a loop while another revokes it through `KeyManager`: once
//!   `revoke` has returned, no thread admits that key again (through the layer, so the per-thread
//!   fronts are part of it).

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::gate::GateStore;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::error::AuthError;
use tower_api_keys::key::KeyFormat;
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

fn revoked(result: Result<Principal, AuthError>) -> bool {
    matches!(
        result,
        Err(AuthError::ExpiredKey(
            tower_api_keys::error::ExpiredReason::Revoked
        ))
    )
}

/// Invariants 6 and 12, deterministically, for each way to invalidate: a lookup blocked after
/// reading the live key, an invalidation (after the revocation) while it is blocked, then release.
/// A request that arrives while the stale lookup is still in flight does not join it; the blocked
/// request does not use what it read (the lookup was overtaken) but asks the store again, and is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_overtaken_by_an_invalidation_does_not_fill_the_cache() {
    let format = KeyFormat::default();
    for invalidation in ["digest", "key", "all", "manager"] {
        let store = Arc::new(GateStore::default());
        let (key, record) = common::issue(&*store, &format, "ledgers:read").await;
        let resolver = CachedResolver::builder(store.clone())
            .time_to_live(Duration::from_secs(3600))
            .build();
        let manager = KeyManager::new(resolver.clone());
        let digest = key.digest();

        store.hold_next(1);
        let blocked = tokio::spawn({
            let resolver = resolver.clone();
            async move { resolver.authenticate(&digest).await }
        });
        store.wait_held(1).await;
        // The lookup has read the live record and waits. Revoke and invalidate now.
        match invalidation {
            "manager" => {
                manager
                    .revoke(&Principal::master(), &record.id)
                    .await
                    .unwrap();
            }
            other => {
                store
                    .revoke(&record.id, OffsetDateTime::now_utc())
                    .await
                    .unwrap();
                match other {
                    "digest" => resolver.invalidate_digest(&digest),
                    "key" => resolver.invalidate_key(&record.id),
                    _ => resolver.invalidate_all(),
                }
            }
        }
        // A request while the stale lookup is still blocked starts its own lookup.
        assert!(
            revoked(resolver.authenticate(&digest).await),
            "{invalidation}: joined the stale lookup"
        );
        assert_eq!(store.lookups(), 2, "{invalidation}");
        resolver.invalidate_digest(&digest);

        store.release(1);
        // Invariant 12: the blocked request does not use what its overtaken lookup read; it asks
        // the store again and is refused.
        let stale = blocked.await.unwrap();
        assert!(
            revoked(stale),
            "{invalidation}: the blocked request was answered from its overtaken lookup"
        );
        assert_eq!(store.lookups(), 3, "{invalidation}: it asked again");
        assert!(
            revoked(resolver.authenticate(&digest).await),
            "{invalidation}: admitted after the invalidation"
        );
    }
}

async fn ok<B>(_: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Invariant 7: four threads authenticate one key through the layer in a loop (each with its own
/// per-thread front) while the main task revokes it through `KeyManager`. A request that starts
/// after `revoke` returned is never admitted.
#[test]
fn no_thread_admits_a_key_after_revoke_returned() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(3600))
        .build();
    let manager = KeyManager::new(resolver.clone());
    for round in 0..3 {
        let created = runtime
            .block_on(manager.create(
                &Principal::master(),
                CreateKey::new(["ledgers:read"]).owner("team"),
            ))
            .unwrap();
        let key = created.key.expose_secret().to_owned();
        let returned = AtomicBool::new(false);
        let admitted_before = AtomicU64::new(0);
        let admitted_after = AtomicU64::new(0);
        let refused_after = AtomicU64::new(0);
        std::thread::scope(|threads| {
            for _ in 0..4 {
                threads.spawn(|| {
                    let local = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let mut service =
                        ApiKeyLayer::new(resolver.clone()).layer(tower::service_fn(ok));
                    let mut after = 0;
                    // Run until 2,000 requests have started after `revoke` returned.
                    while after < 2_000 {
                        let started_after = returned.load(Ordering::SeqCst);
                        let request = Request::get("/")
                            .header("x-api-key", key.as_str())
                            .body(String::new())
                            .unwrap();
                        let status = local.block_on(async {
                            service
                                .ready()
                                .await
                                .unwrap()
                                .call(request)
                                .await
                                .unwrap()
                                .status()
                        });
                        match (started_after, status) {
                            (false, StatusCode::OK) => {
                                admitted_before.fetch_add(1, Ordering::Relaxed);
                            }
                            (false, _) => {}
                            (true, StatusCode::OK) => {
                                admitted_after.fetch_add(1, Ordering::Relaxed);
                            }
                            (true, status) => {
                                assert_eq!(status, StatusCode::UNAUTHORIZED);
                                refused_after.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if started_after {
                            after += 1;
                        }
                    }
                });
            }
            // Let every thread admit the key (and fill its front) before revoking.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while admitted_before.load(Ordering::Relaxed) < 4_000 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the threads admit nothing"
                );
                std::thread::yield_now();
            }
            runtime
                .block_on(manager.revoke(&Principal::master(), &created.info.id))
                .unwrap();
            returned.store(true, Ordering::SeqCst);
        });
        assert_eq!(
            admitted_after.load(Ordering::Relaxed),
            0,
            "round {round}: admitted after revoke returned"
        );
        assert_eq!(
            refused_after.load(Ordering::Relaxed),
            8_000,
            "round {round}"
        );
    }
}
