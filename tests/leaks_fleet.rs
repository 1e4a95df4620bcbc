//! A signed leak report received by instance A revokes the leaked key and its descendants on every
//! instance within a second: two instances (each its own `PostgresStore` pool and resolver) on one
//! database, B holding both keys in its cache, the revocation broadcast over LISTEN/NOTIFY, then
//! over Redis pub/sub. Needs `TEST_DATABASE_URL` (and `TEST_REDIS_URL`); see `common::db`.
#![cfg(all(feature = "leaks", feature = "postgres"))]

mod common;
#[path = "leaks/scanner.rs"]
mod scanner;

use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, StatusCode};
use tower::ServiceExt as _;
use tower_api_keys::error::{AuthError, ExpiredReason};
use tower_api_keys::invalidate::{Invalidator, PostgresInvalidator};
use tower_api_keys::key::ApiKey;
use tower_api_keys::leaks::{self, LeakReceiver, PublicKeys, Scanner as Origin};
use tower_api_keys::manage::{CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;

use common::db::PgSchema;
use scanner::{Scanner, report};

const HANG_GUARD: Duration = Duration::from_secs(30);

fn resolver(store: tower_api_keys::store::PostgresStore) -> CachedResolver {
    CachedResolver::builder(store)
        .time_to_live(Duration::from_secs(300))
        .build()
}

/// A on `a_invalidator` (publishing) receives the report; B, subscribed through `b_invalidator`,
/// must refuse the leaked key and its child within a second.
async fn report_on_a_revokes_on_b(
    transport: &str,
    schema: &PgSchema,
    a_invalidator: impl Invalidator + Clone,
    b_invalidator_subscribe: impl FnOnce(CachedResolver) -> tower_api_keys::invalidate::Subscription,
) {
    let a_resolver = resolver(schema.store().await);
    let b_resolver = resolver(schema.store().await);
    let control = resolver(schema.store().await);
    let a_manager = KeyManager::new(a_resolver.clone()).invalidator(a_invalidator);
    let b_subscription = b_invalidator_subscribe(b_resolver.clone());
    tokio::time::timeout(HANG_GUARD, b_subscription.wait_connected())
        .await
        .expect("B's subscriber connects");

    let github = Scanner::new("github-key-1");
    let keys = PublicKeys::from_json(Scanner::document(&[&github]).as_bytes()).unwrap();
    let app = leaks::router(
        LeakReceiver::builder(a_manager.clone())
            .keys(Origin::GitHub, keys)
            .build(),
    );

    let parent = a_manager
        .create(
            &Principal::master(),
            CreateKey::new(["ledgers:read", "api-keys:write"]).owner("payments"),
        )
        .await
        .unwrap();
    let acting = a_resolver.authenticate(&parent.key.digest()).await.unwrap();
    let child = a_manager
        .create(&acting, CreateKey::new(["ledgers:read"]))
        .await
        .unwrap();
    let keys: [&ApiKey; 2] = [&parent.key, &child.key];
    for key in keys {
        b_resolver.authenticate(&key.digest()).await.unwrap();
        control.authenticate(&key.digest()).await.unwrap();
    }

    let body = report(&[parent.key.expose_secret()]);
    let signature = github.sign(body.as_bytes());
    let start = Instant::now();
    let response = app
        .oneshot(
            Request::post("/api-keys/leaks")
                .header("Github-Public-Key-Identifier", &github.identifier)
                .header("Github-Public-Key-Signature", signature)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answered = start.elapsed();
    for (name, key) in [("leaked key", keys[0]), ("leaked key's child", keys[1])] {
        let refused = loop {
            match b_resolver.authenticate(&key.digest()).await {
                Err(AuthError::ExpiredKey(ExpiredReason::Revoked)) => break start.elapsed(),
                Ok(_) => {}
                Err(other) => panic!("B answered {other:?}"),
            }
            assert!(start.elapsed() < HANG_GUARD, "B never refused the {name}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        println!(
            "leak report over {transport}: B refused the {name} {refused:?} after the report \
             (the report was answered in {answered:?})"
        );
        assert!(refused < Duration::from_secs(1), "{name}: {refused:?}");
        assert!(
            control.authenticate(&key.digest()).await.is_ok(),
            "a resolver hearing no broadcast still has it cached: B's refusal came from the broadcast"
        );
    }
    b_subscription.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_report_revokes_on_every_instance_over_listen_notify() {
    let Some(schema) = common::db::pg_schema("leaks_fleet_pg").await else {
        return;
    };
    let channel = common::db::unique("leaks_fleet_pg");
    let a_store = schema.store().await;
    let b_store = schema.store().await;
    let a = PostgresInvalidator::from_store(&a_store)
        .with_channel(&channel)
        .unwrap();
    let b = PostgresInvalidator::from_store(&b_store)
        .with_channel(&channel)
        .unwrap();
    report_on_a_revokes_on_b("LISTEN/NOTIFY", &schema, a, |r| b.subscribe(r)).await;
    schema.drop_schema().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_report_revokes_on_every_instance_over_redis() {
    use tower_api_keys::invalidate::RedisInvalidator;
    let Some(schema) = common::db::pg_schema("leaks_fleet_redis").await else {
        return;
    };
    let Some(url) = common::db::redis_url("leaks_fleet_redis").await else {
        return;
    };
    let channel = common::db::unique("leaks_fleet_redis");
    let a = RedisInvalidator::open(&url).unwrap().with_channel(&channel);
    let b = RedisInvalidator::open(&url).unwrap().with_channel(&channel);
    report_on_a_revokes_on_b("Redis pub/sub", &schema, a, |r| b.subscribe(r)).await;
    schema.drop_schema().await;
}
