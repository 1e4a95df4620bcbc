//! Store outages: a store that cannot be reached or does not answer makes `authenticate` fail with
//! `AuthError::Unavailable` (503), never `InvalidKey`; keys already cached keep working; and once the
//! store answers again, so does authentication (errors are not cached).
//!
//! The PostgreSQL cases use a closed port (no server needed) and, with `TEST_DATABASE_URL`, a TCP
//! proxy in front of the real server that is taken down and brought back.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use time::OffsetDateTime;
use tower_api_keys::error::AuthError;
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyLimits, StoreErrorKind};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore, StoreError};

fn new_record() -> (ApiKey, KeyRecord) {
    let format = KeyFormat::default();
    let key = format.generate();
    let record = common::record(&format, &key, "team", "ledgers:read");
    (key, record)
}

fn unknown_digest() -> KeyDigest {
    KeyFormat::default().generate().digest()
}

/// The store error inside an `Unavailable`; panics on any other answer.
fn unavailable<T: std::fmt::Debug>(result: Result<T, AuthError>) -> StoreError {
    match result {
        Err(AuthError::Unavailable(error)) => error,
        other => panic!("expected AuthError::Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn hanging_store_is_unavailable_cached_keys_work_and_it_recovers() {
    let store = common::TestStore::wrap(Arc::new(MemoryStore::new()));
    let (cached_key, cached) = new_record();
    let (cold_key, cold) = new_record();
    for r in [&cached, &cold] {
        store
            .insert(r, KeyLimits::default(), OffsetDateTime::now_utc())
            .await
            .unwrap();
    }
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(300))
        .lookup_timeout(Duration::from_millis(100))
        .build();
    resolver.authenticate(&cached_key.digest()).await.unwrap();

    store.hanging.store(true, Ordering::SeqCst);
    let error = unavailable(resolver.authenticate(&cold_key.digest()).await);
    assert_eq!(error.kind(), StoreErrorKind::Timeout);
    let error = unavailable(resolver.authenticate(&unknown_digest()).await);
    assert_eq!(error.kind(), StoreErrorKind::Timeout, "not InvalidKey");
    let principal = resolver.authenticate(&cached_key.digest()).await.unwrap();
    assert_eq!(principal.key_id(), &cached.id, "cached keys keep working");

    store.hanging.store(false, Ordering::SeqCst);
    let principal = resolver.authenticate(&cold_key.digest()).await.unwrap();
    assert_eq!(
        principal.key_id(),
        &cold.id,
        "recovered: the timeout was not cached"
    );
    assert!(matches!(
        resolver.authenticate(&unknown_digest()).await,
        Err(AuthError::InvalidKey(_))
    ));
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::Instant;

    use sqlx::postgres::PgConnectOptions;
    use tower_api_keys::key::KeyId;
    use tower_api_keys::store::PostgresStore;

    use super::*;

    /// Generous bound for waits that only guard against hanging (not timing assertions).
    const HANG_GUARD: Duration = Duration::from_secs(30);

    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn refused_connections_are_unavailable_not_invalid_key() {
        let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
        let builder = || PostgresStore::builder().acquire_timeout(Duration::from_millis(300));

        let error = builder().connect(&url).await.unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);

        // A service may start while its database is down: the lazy store fails each call.
        let store = builder().connect_lazy(&url).unwrap();
        let resolver = CachedResolver::builder(store.clone())
            .lookup_timeout(Duration::from_secs(10))
            .build();
        for attempt in 1..=2 {
            let error = unavailable(resolver.authenticate(&unknown_digest()).await);
            assert_eq!(error.kind(), StoreErrorKind::Unavailable);
            assert_eq!(resolver.store_lookups(), attempt, "errors are not cached");
        }
        let error = store.get(&KeyId::new("key_1")).await.unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_outage_keeps_cached_keys_and_recovers() {
        let Some(schema) = common::db::pg_schema("outage_pg").await else {
            return;
        };
        let direct = schema.store().await;
        let options: PgConnectOptions = schema.url.parse().unwrap();
        let target = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .unwrap()
            .next()
            .expect("the database host resolves");
        let proxy = common::db::Proxy::start(target).await;
        let proxied = PostgresStore::builder()
            .schema(&schema.schema)
            .unwrap()
            .acquire_timeout(Duration::from_millis(500))
            .connect_with(options.host("127.0.0.1").port(proxy.port()))
            .await
            .unwrap();
        let resolver = CachedResolver::builder(proxied.clone())
            .time_to_live(Duration::from_secs(300))
            .lookup_timeout(Duration::from_secs(10))
            .build();

        let (cached_key, cached) = new_record();
        let (cold_key, cold) = new_record();
        for r in [&cached, &cold] {
            direct
                .insert(r, KeyLimits::default(), OffsetDateTime::now_utc())
                .await
                .unwrap();
        }
        resolver.authenticate(&cached_key.digest()).await.unwrap();

        proxy.down().await;
        let error = unavailable(resolver.authenticate(&cold_key.digest()).await);
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
        let error = unavailable(resolver.authenticate(&unknown_digest()).await);
        assert_eq!(error.kind(), StoreErrorKind::Unavailable, "not InvalidKey");
        let principal = resolver.authenticate(&cached_key.digest()).await.unwrap();
        assert_eq!(principal.key_id(), &cached.id, "cached keys keep working");
        let error = proxied.get(&cold.id).await.unwrap_err();
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);

        proxy.up().await;
        let start = Instant::now();
        let principal = loop {
            match resolver.authenticate(&cold_key.digest()).await {
                Ok(principal) => break principal,
                Err(AuthError::Unavailable(_)) if start.elapsed() < HANG_GUARD => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(other) => panic!("after recovery: {other:?}"),
            }
        };
        assert_eq!(principal.key_id(), &cold.id);
        assert!(matches!(
            resolver.authenticate(&unknown_digest()).await,
            Err(AuthError::InvalidKey(_))
        ));
        assert_eq!(
            proxied.get(&cold.id).await.unwrap(),
            direct.get(&cold.id).await.unwrap()
        );

        proxied.pool().close().await;
        direct.pool().close().await;
        drop(proxy);
        schema.drop_schema().await;
    }
}
