//! Fleet-wide revocation: two instances (each its own `PostgresStore` pool, resolver and subscriber)
//! on one PostgreSQL database. Instance A revokes a key that B has cached and publishes the change; B
//! must refuse the key within one second. Once over LISTEN/NOTIFY, once over Redis pub/sub. A third
//! resolver without a subscriber keeps accepting the key from its cache, which shows that the
//! broadcast, not a cache expiry, made B refuse it.
//!
//! Also: a subscriber whose connection is killed reconnects and catches up from the revocation log.
//!
//! Needs `TEST_DATABASE_URL` (and `TEST_REDIS_URL` for the Redis tests); see `common::db`. Run with
//! `--nocapture` to see the measured propagation times.
#![cfg(feature = "postgres")]

mod common;

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tower_api_keys::error::AuthError;
use tower_api_keys::error::ExpiredReason;
use tower_api_keys::invalidate::{Invalidation, Invalidator, PostgresInvalidator};
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{KeyLimits, PostgresStore};
use tower_api_keys::store::{KeyRecord, KeyStore};

use common::db::PgSchema;

/// Generous bound for waits that only guard against hanging (not timing assertions).
const HANG_GUARD: Duration = Duration::from_secs(30);

/// One instance of the service: its own pool and resolver.
struct Instance {
    store: PostgresStore,
    resolver: CachedResolver,
}

async fn instance(schema: &PgSchema) -> Instance {
    let store = schema.store().await;
    let resolver = CachedResolver::builder(store.clone())
        .time_to_live(Duration::from_secs(300))
        .build();
    Instance { store, resolver }
}

/// Stores a new active key and returns it with its record.
async fn new_key(store: &impl KeyStore) -> (ApiKey, KeyRecord) {
    let format = KeyFormat::default();
    let key = format.generate();
    let now = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "fleet".into(),
        owner: "team".into(),
        account: "acct".into(),
        scopes: ScopeSet::parse(["ledgers:read"]).unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: now,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    store
        .insert(&record, KeyLimits::default(), now)
        .await
        .unwrap();
    (key, record)
}

/// The scenario shared by both broadcasters. `b` is subscribed through its own invalidator;
/// `publisher` is A's invalidator; `control` caches the key but hears nothing.
async fn revoke_on_a_is_refused_by_b(
    transport: &str,
    a: &Instance,
    b: &Instance,
    control: &CachedResolver,
    publisher: &dyn Invalidator,
) {
    let (key, record) = new_key(&a.store).await;
    let digest = key.digest();
    a.resolver.authenticate(&digest).await.unwrap();
    b.resolver.authenticate(&digest).await.unwrap();
    control.authenticate(&digest).await.unwrap();
    let lookups = b.resolver.store_lookups();
    b.resolver.authenticate(&digest).await.unwrap();
    assert_eq!(
        b.resolver.store_lookups(),
        lookups,
        "B answers from its cache"
    );

    let start = Instant::now();
    let revoked = a
        .store
        .revoke(&record.id, OffsetDateTime::now_utc())
        .await
        .unwrap()
        .expect("the key exists")
        .before;
    let invalidation = Invalidation {
        key_id: revoked.id.clone(),
        digests: revoked.digests().copied().collect(),
    };
    invalidation.apply(&a.resolver);
    publisher.publish(&invalidation).await.unwrap();
    let published = start.elapsed();

    let propagation = loop {
        match b.resolver.authenticate(&digest).await {
            Err(AuthError::ExpiredKey(ExpiredReason::Revoked)) => break start.elapsed(),
            Ok(_) => {}
            Err(other) => panic!("B answered {other:?}, expected a revoked key"),
        }
        assert!(
            start.elapsed() < HANG_GUARD,
            "B never refused the revoked key"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    println!(
        "propagation over {transport}: B refused the revoked key {propagation:?} after A's revoke \
         (revoke + publish took {published:?})"
    );
    assert!(
        propagation < Duration::from_secs(1),
        "propagation over {transport} took {propagation:?}"
    );
    assert!(matches!(
        a.resolver.authenticate(&digest).await,
        Err(AuthError::ExpiredKey(ExpiredReason::Revoked))
    ));
    assert!(
        control.authenticate(&digest).await.is_ok(),
        "without a subscriber the cached key is still accepted (so B's refusal came from the broadcast)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_propagates_over_listen_notify() {
    let Some(schema) = common::db::pg_schema("fleet_pg").await else {
        return;
    };
    let channel = common::db::unique("fleet_pg");
    let (a, b) = (instance(&schema).await, instance(&schema).await);
    let control = CachedResolver::new(schema.store().await);
    let a_invalidator = PostgresInvalidator::from_store(&a.store)
        .with_channel(&channel)
        .unwrap();
    let b_invalidator = PostgresInvalidator::from_store(&b.store)
        .with_channel(&channel)
        .unwrap();
    let a_subscription = a_invalidator.subscribe(a.resolver.clone());
    let b_subscription = b_invalidator.subscribe(b.resolver.clone());
    for sub in [&a_subscription, &b_subscription] {
        tokio::time::timeout(HANG_GUARD, sub.wait_connected())
            .await
            .expect("subscriber connects");
    }
    revoke_on_a_is_refused_by_b("LISTEN/NOTIFY", &a, &b, &control, &a_invalidator).await;
    b_subscription.shutdown().await;
    drop(a_subscription);
    schema.drop_schema().await;
}

/// A reconnecting subscriber catches up from the revocation log: the key invalidated while it was
/// away is looked up again, a key nobody changed stays cached (no clearing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_subscriber_catches_up_after_reconnecting() {
    let Some(schema) = common::db::pg_schema("fleet_pg_reconnect").await else {
        return;
    };
    let channel = common::db::unique("fleet_pg_reconnect");
    let b = instance(&schema).await;
    let invalidator = PostgresInvalidator::from_store(&b.store)
        .with_channel(&channel)
        .unwrap()
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let subscription = invalidator.subscribe(b.resolver.clone());
    tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
        .await
        .expect("subscriber connects");
    assert_eq!(subscription.status().connections, 1);

    let (changed, _) = new_key(&b.store).await;
    let (unchanged, _) = new_key(&b.store).await;
    for key in [&changed, &unchanged] {
        b.resolver.authenticate(&key.digest()).await.unwrap();
        b.resolver.authenticate(&key.digest()).await.unwrap();
    }
    assert_eq!(b.resolver.store_lookups(), 2, "cached");

    // Kill the subscriber's backend (its `application_name` is the channel), as a failover or a
    // network cut would, and publish a change meanwhile.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND application_name = $1",
    )
    .bind(&channel)
    .fetch_all(b.store.pool())
    .await
    .unwrap();
    assert_eq!(
        killed,
        [true],
        "exactly the subscriber's connection was killed"
    );
    let invalidation = Invalidation {
        key_id: KeyId::new("key_unrelated"),
        digests: vec![changed.digest()],
    };
    invalidator.publish(&invalidation).await.unwrap();

    tokio::time::timeout(HANG_GUARD, subscription.wait_for_connections(2))
        .await
        .expect("subscriber reconnects");
    let start = Instant::now();
    while b.resolver.store_lookups() == 2 {
        b.resolver.authenticate(&changed.digest()).await.unwrap();
        assert!(start.elapsed() < HANG_GUARD, "the change never reached B");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    b.resolver.authenticate(&unchanged.digest()).await.unwrap();
    assert_eq!(
        b.resolver.store_lookups(),
        3,
        "caught up from the log: only the changed key was looked up again"
    );

    // It still delivers after the reconnect.
    invalidator.publish(&invalidation).await.unwrap();
    let start = Instant::now();
    while b.resolver.store_lookups() == 3 {
        b.resolver.authenticate(&changed.digest()).await.unwrap();
        assert!(
            start.elapsed() < HANG_GUARD,
            "invalidation not applied after reconnect"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    subscription.shutdown().await;
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_notification_clears_the_cache() {
    let Some(schema) = common::db::pg_schema("fleet_pg_garbage").await else {
        return;
    };
    let channel = common::db::unique("fleet_pg_garbage");
    let b = instance(&schema).await;
    let subscription = PostgresInvalidator::from_store(&b.store)
        .with_channel(&channel)
        .unwrap()
        .subscribe(b.resolver.clone());
    tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
        .await
        .expect("subscriber connects");
    let (key, _) = new_key(&b.store).await;
    b.resolver.authenticate(&key.digest()).await.unwrap();
    assert_eq!(b.resolver.store_lookups(), 1);
    sqlx::query("SELECT pg_notify($1, 'not an invalidation')")
        .bind(&channel)
        .execute(b.store.pool())
        .await
        .unwrap();
    let start = Instant::now();
    while b.resolver.store_lookups() == 1 {
        b.resolver.authenticate(&key.digest()).await.unwrap();
        assert!(start.elapsed() < HANG_GUARD, "cache not cleared");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(subscription);
    schema.drop_schema().await;
}

#[cfg(feature = "redis")]
mod over_redis {
    use tower_api_keys::invalidate::RedisInvalidator;

    use super::*;

    /// A Redis client on `url`, but with `db` selected: `CLIENT LIST` shows it, which lets a test
    /// find its own pub/sub connection among others.
    fn client_on_db(url: &str, db: i64) -> redis::Client {
        use redis::IntoConnectionInfo;
        let info = url.into_connection_info().unwrap();
        let settings = info.redis_settings().clone().set_db(db);
        redis::Client::open(info.set_redis_settings(settings)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revocation_propagates_over_redis_pubsub() {
        let Some(redis_url) = common::db::redis_url("fleet_redis").await else {
            return;
        };
        let Some(schema) = common::db::pg_schema("fleet_redis").await else {
            return;
        };
        let channel = common::db::unique("fleet_redis");
        let (a, b) = (instance(&schema).await, instance(&schema).await);
        let control = CachedResolver::new(schema.store().await);
        let a_invalidator = RedisInvalidator::open(&redis_url)
            .unwrap()
            .with_channel(&channel);
        let b_invalidator = RedisInvalidator::open(&redis_url)
            .unwrap()
            .with_channel(&channel);
        let a_subscription = a_invalidator.subscribe(a.resolver.clone());
        let b_subscription = b_invalidator.subscribe(b.resolver.clone());
        for sub in [&a_subscription, &b_subscription] {
            tokio::time::timeout(HANG_GUARD, sub.wait_connected())
                .await
                .expect("subscriber connects");
        }
        revoke_on_a_is_refused_by_b("Redis pub/sub", &a, &b, &control, &a_invalidator).await;
        b_subscription.shutdown().await;
        drop(a_subscription);
        schema.drop_schema().await;
    }

    /// As over LISTEN/NOTIFY: a reconnecting subscriber catches up from the log instead of
    /// clearing its cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_subscriber_catches_up_after_reconnecting() {
        const DB: i64 = 13;
        let Some(redis_url) = common::db::redis_url("fleet_redis_reconnect").await else {
            return;
        };
        let Some(schema) = common::db::pg_schema("fleet_redis_reconnect").await else {
            return;
        };
        let channel = common::db::unique("fleet_redis_reconnect");
        let b = instance(&schema).await;
        let invalidator = RedisInvalidator::new(client_on_db(&redis_url, DB))
            .with_channel(&channel)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
        let subscription = invalidator.subscribe(b.resolver.clone());
        tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
            .await
            .expect("subscriber connects");
        assert_eq!(subscription.status().connections, 1);

        let (key, _) = new_key(&b.store).await;
        let (unchanged, _) = new_key(&b.store).await;
        for key in [&key, &unchanged] {
            b.resolver.authenticate(&key.digest()).await.unwrap();
            b.resolver.authenticate(&key.digest()).await.unwrap();
        }
        assert_eq!(b.resolver.store_lookups(), 2, "cached");

        // Kill the subscriber's pub/sub connection (found by its selected database).
        let admin = redis::Client::open(redis_url.as_str()).unwrap();
        let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await
            .unwrap();
        let ids: Vec<String> = clients
            .lines()
            .filter(|line| line.split(' ').any(|field| field == format!("db={DB}")))
            .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
            .map(str::to_owned)
            .collect();
        assert!(
            !ids.is_empty(),
            "the subscriber's connection is listed: {clients}"
        );
        for id in &ids {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut admin)
                .await
                .unwrap();
        }

        // The fleet shares one database: the revocation log lives there.
        let publisher = RedisInvalidator::new(client_on_db(&redis_url, DB)).with_channel(&channel);
        publisher
            .publish(&Invalidation {
                key_id: KeyId::new("key_unrelated"),
                digests: vec![key.digest()],
            })
            .await
            .unwrap();
        tokio::time::timeout(HANG_GUARD, subscription.wait_for_connections(2))
            .await
            .expect("subscriber reconnects");
        let start = Instant::now();
        while b.resolver.store_lookups() == 2 {
            b.resolver.authenticate(&key.digest()).await.unwrap();
            assert!(start.elapsed() < HANG_GUARD, "the change never reached B");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        b.resolver.authenticate(&unchanged.digest()).await.unwrap();
        assert_eq!(
            b.resolver.store_lookups(),
            3,
            "caught up from the log: only the changed key was looked up again"
        );
        subscription.shutdown().await;
        schema.drop_schema().await;
    }

    /// The Redis outage: B's pub/sub connection goes through the proxy (the shared Redis server
    /// stays up for everyone else).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_outage_is_bounded_by_degraded_mode() {
        let Some(redis_url) = common::db::redis_url("fleet_redis_outage").await else {
            return;
        };
        let Some(schema) = common::db::pg_schema("fleet_redis_outage").await else {
            return;
        };
        let channel = common::db::unique("fleet_redis_outage");
        let (a, b) = (instance(&schema).await, instance(&schema).await);
        let (proxy, through_proxy) = common::db::redis_through_proxy(&redis_url).await;
        let b_subscription = RedisInvalidator::open(&through_proxy)
            .unwrap()
            .with_channel(&channel)
            .subscribe(b.resolver.clone());
        let a_manager = outage::manager(
            &a,
            RedisInvalidator::open(&redis_url)
                .unwrap()
                .with_channel(&channel),
        );
        let fleet = outage::Fleet {
            a: a_manager,
            b,
            b_subscription,
            proxy,
        };
        outage::scenario("Redis", fleet).await;
        schema.drop_schema().await;
    }
}

/// Degraded mode end to end (the resolver's invariant 8): B's subscription runs through a TCP proxy
/// that the test takes down (the broadcaster is unreachable for B, while A still publishes and the
/// store answers). A revokes a key B has cached, through its `KeyManager`; B refuses it within
/// ~1.5 s (degraded lifetime 1 s). The proxy comes back; B reconnects within ~1.5 s (backoff capped
/// at 1 s), leaves degraded mode, and a second revocation reaches it as before.
mod outage {
    use tower_api_keys::invalidate::Subscription;
    use tower_api_keys::manage::{CreateKey, KeyManager};
    use tower_api_keys::principal::Principal;

    use super::*;

    /// How long a revocation or a recovery may take with the default settings.
    const BOUND: Duration = Duration::from_millis(1500);

    pub(super) struct Fleet {
        pub(super) a: KeyManager,
        pub(super) b: Instance,
        pub(super) b_subscription: Subscription,
        pub(super) proxy: common::db::Proxy,
    }

    pub(super) fn manager(instance: &Instance, invalidator: impl Invalidator) -> KeyManager {
        KeyManager::new(instance.resolver.clone()).invalidator(invalidator)
    }

    async fn create(a: &KeyManager) -> (ApiKey, KeyId) {
        let created = a
            .create(
                &Principal::master(),
                CreateKey::new(["ledgers:read"]).owner("team"),
            )
            .await
            .unwrap();
        (created.key, created.info.id)
    }

    /// Revokes on A and returns how long B took to refuse the key.
    async fn revoke_and_time(fleet: &Fleet, key: &ApiKey, id: &KeyId) -> Duration {
        let digest = key.digest();
        let start = Instant::now();
        fleet.a.revoke(&Principal::master(), id).await.unwrap();
        loop {
            match fleet.b.resolver.authenticate(&digest).await {
                Err(AuthError::ExpiredKey(ExpiredReason::Revoked)) => break start.elapsed(),
                Ok(_) => {}
                Err(other) => panic!("B answered {other:?}, expected a revoked key"),
            }
            assert!(
                start.elapsed() < HANG_GUARD,
                "B never refused the revoked key"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until(what: impl Fn() -> bool, context: &str) -> Duration {
        let start = Instant::now();
        while !what() {
            assert!(start.elapsed() < HANG_GUARD, "{context}: never happened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        start.elapsed()
    }

    pub(super) async fn scenario(transport: &str, fleet: Fleet) {
        tokio::time::timeout(HANG_GUARD, fleet.b_subscription.wait_connected())
            .await
            .expect("B's subscriber connects");
        assert!(!fleet.b.resolver.is_degraded());

        // The broadcaster becomes unreachable for B.
        let (key, id) = create(&fleet.a).await;
        fleet.b.resolver.authenticate(&key.digest()).await.unwrap();
        fleet.proxy.down().await;
        let noticed = until(|| fleet.b.resolver.is_degraded(), "degraded mode").await;
        let lookups = fleet.b.resolver.store_lookups();
        fleet.b.resolver.authenticate(&key.digest()).await.unwrap();
        let refused = revoke_and_time(&fleet, &key, &id).await;
        println!(
            "{transport} down: B degraded {noticed:?} after the cut, refused a key revoked on A \
             after {refused:?}"
        );
        assert!(
            refused < BOUND,
            "{transport} down: B refused after {refused:?}"
        );
        assert!(
            fleet.b.resolver.store_lookups() > lookups,
            "B re-read the store"
        );

        // It comes back.
        fleet.proxy.up().await;
        let recovered = until(
            || fleet.b_subscription.status().connections >= 2,
            "reconnection",
        )
        .await;
        assert!(!fleet.b.resolver.is_degraded());
        let (key, id) = create(&fleet.a).await;
        fleet.b.resolver.authenticate(&key.digest()).await.unwrap();
        let refused = revoke_and_time(&fleet, &key, &id).await;
        println!(
            "{transport} back: B reconnected {recovered:?} after the proxy came back, refused a \
             key revoked on A after {refused:?}"
        );
        assert!(
            recovered < BOUND,
            "{transport}: reconnection took {recovered:?}"
        );
        assert!(
            refused < BOUND,
            "{transport} back: B refused after {refused:?}"
        );
        fleet.b_subscription.shutdown().await;
    }
}

/// The LISTEN/NOTIFY outage: B's listener connection goes through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_outage_is_bounded_by_degraded_mode() {
    let Some(schema) = common::db::pg_schema("fleet_pg_outage").await else {
        return;
    };
    let channel = common::db::unique("fleet_pg_outage");
    let (a, b) = (instance(&schema).await, instance(&schema).await);
    // B's store (its pool, its schema) through the proxy: the revocation log is the schema's.
    let (proxy, through_proxy) = common::db::pg_through_proxy(&schema).await;
    let b_subscription = PostgresInvalidator::from_store(&through_proxy)
        .with_channel(&channel)
        .unwrap()
        .subscribe(b.resolver.clone());
    let a_manager = outage::manager(
        &a,
        PostgresInvalidator::from_store(&a.store)
            .with_channel(&channel)
            .unwrap(),
    );
    let fleet = outage::Fleet {
        a: a_manager,
        b,
        b_subscription,
        proxy,
    };
    outage::scenario("LISTEN/NOTIFY", fleet).await;
    schema.drop_schema().await;
}
