//! Keyed-format secret changes reach every instance through the fleet (issue #22): three instances
//! (each its own store pool, resolver with a keyed format loaded from the store, layer and
//! subscription) on one PostgreSQL schema, the changes made through instance A's
//! [`KeyManager`]; once over LISTEN/NOTIFY, once over Redis pub/sub. C's subscription goes through
//! a TCP proxy that can cut it off.
//!
//! 1. Once `add_format_secret` has answered with every instance acknowledged, every instance admits
//!    a key minted under the new version at once.
//! 2. Once `retire_format_secret` has answered, no instance admits a key tagged by the retired
//!    version, not even once (each is asked right after the answer, then again).
//! 3. C cut off misses a change; when it reconnects it has caught up from the revocation log before
//!    it counts as connected. Cut off again, it stops admitting a key of a version retired
//!    meanwhile within the freshness bound (its format is read again, as its cache is).
//!
//! Needs `TEST_DATABASE_URL` (and `TEST_REDIS_URL`); see `common::db`.
#![cfg(all(feature = "postgres", feature = "manage"))]

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use tower::ServiceExt;
use tower_api_keys::invalidate::{Invalidator, PostgresInvalidator, Receipt, Subscription};
use tower_api_keys::key::{FormatSecret, KeyFormat};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::PostgresStore;

use common::db::{PgSchema, Proxy};

/// Generous bound for waits that only guard against hanging (not timing assertions).
const HANG_GUARD: Duration = Duration::from_secs(30);
/// The freshness bound (the resolvers' degraded lifetime, their default).
const BOUND: Duration = Duration::from_secs(1);

/// One instance of the service.
struct Instance {
    name: &'static str,
    app: Router,
    resolver: CachedResolver,
    manager: KeyManager,
    subscription: Subscription,
}

impl Instance {
    async fn start(
        name: &'static str,
        store: PostgresStore,
        invalidator: impl Invalidator,
        subscribe: impl FnOnce(CachedResolver) -> Subscription,
    ) -> Self {
        let format = KeyFormat::keyed("sk_fleet")
            .load_secret_from(&store)
            .await
            .unwrap();
        let resolver = CachedResolver::builder(store)
            .format(format)
            .degraded_time_to_live(BOUND)
            .build();
        let app = Router::new()
            .route(
                "/",
                get(|p: Principal| async move { p.key_id().to_string() }),
            )
            .layer(ApiKeyLayer::new(resolver.clone()));
        let manager = KeyManager::new(resolver.clone()).invalidator(invalidator);
        let subscription = subscribe(resolver.clone());
        tokio::time::timeout(HANG_GUARD, subscription.wait_connected())
            .await
            .expect("the subscription connects");
        Self {
            name,
            app,
            resolver,
            manager,
            subscription,
        }
    }

    /// `"200"`, or `"<status> <code>"` of a refusal.
    async fn answer(&self, key: &str) -> String {
        let request = Request::get("/")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        match response.status().as_u16() {
            200 => "200".into(),
            status => format!("{status} {}", common::error_code(response).await),
        }
    }

    async fn mint(&self) -> String {
        let created = self
            .manager
            .create(&Principal::master(), CreateKey::new(["*:*"]).owner("o"))
            .await
            .unwrap();
        created.key.expose_secret().to_owned()
    }
}

/// Three instances; C's subscription is `c_subscribe`'s (through the proxy).
struct Fleet {
    instances: [Instance; 3],
    proxy: Proxy,
}

impl Fleet {
    fn a(&self) -> &Instance {
        &self.instances[0]
    }

    fn c(&self) -> &Instance {
        &self.instances[2]
    }

    /// What each instance answers for `key`, asked at once.
    async fn answers(&self, key: &str) -> Vec<String> {
        futures_util::future::join_all(self.instances.iter().map(|i| i.answer(key))).await
    }
}

#[track_caller]
fn complete(receipt: &Receipt, what: &str) {
    assert!(
        receipt.is_complete() && receipt.instances == 3,
        "{what}: {receipt:?}"
    );
}

async fn scenario(transport: &str, fleet: Fleet) {
    let a = fleet.a();
    roster_of(&a.manager, 3).await;

    // 1. A new version is admitted everywhere once the addition has answered.
    let old = a.mint().await;
    assert_eq!(fleet.answers(&old).await, ["200"; 3], "cached everywhere");
    let (version, receipt) = a
        .manager
        .add_format_secret(FormatSecret::generate())
        .await
        .unwrap();
    assert_eq!(version, 2);
    complete(&receipt, "add");
    let new = a.mint().await;
    assert_eq!(
        fleet.answers(&new).await,
        ["200"; 3],
        "{transport}: v2 key right after the add"
    );
    assert_eq!(fleet.answers(&old).await, ["200"; 3], "v1 keys still work");

    // 2. A retired version is refused everywhere once the retirement has answered: not once admitted.
    let receipt = a.manager.retire_format_secret(1).await.unwrap();
    complete(&receipt, "retire");
    for round in 0..20 {
        let answers = fleet.answers(&old).await;
        assert!(
            answers.iter().all(|a| a == "401 AUTH_INVALID_API_KEY"),
            "{transport}: round {round} after the retirement: {answers:?}"
        );
    }
    assert_eq!(fleet.answers(&new).await, ["200"; 3]);
    println!(
        "{transport}: retirement acknowledged by {} instances in {:?}",
        receipt.acknowledged, receipt.elapsed
    );

    // 3a. C misses a change while cut off, and catches up from the log when it reconnects.
    let c = fleet.c();
    fleet.proxy.down().await;
    until(|| c.resolver.is_degraded()).await;
    let (version, receipt) = a
        .manager
        .add_format_secret(FormatSecret::generate())
        .await
        .unwrap();
    assert_eq!(version, 3);
    assert!(
        !receipt.laggards.iter().any(|l| l != c.name),
        "only C may lag: {receipt:?}"
    );
    assert_eq!(c.resolver.format().accepted_versions(), [2], "C missed it");
    let connections = c.subscription.status().connections;
    fleet.proxy.up().await;
    tokio::time::timeout(
        HANG_GUARD,
        c.subscription.wait_for_connections(connections + 1),
    )
    .await
    .expect("C reconnects");
    assert_eq!(
        c.resolver.format().accepted_versions(),
        [2, 3],
        "{transport}: C caught up from the log"
    );
    let newest = a.mint().await;
    assert_eq!(fleet.answers(&newest).await, ["200"; 3]);

    // 3b. Cut off again, C stops admitting a key of a version retired meanwhile within the bound.
    assert_eq!(c.answer(&new).await, "200");
    fleet.proxy.down().await;
    until(|| c.resolver.is_degraded()).await;
    a.manager.retire_format_secret(2).await.unwrap();
    let answered = Instant::now();
    let refused_after = loop {
        let answer = c.answer(&new).await;
        if answer != "200" {
            break answered.elapsed();
        }
        assert!(
            answered.elapsed() < HANG_GUARD,
            "C never refused the v2 key"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "{transport}: C, cut off, refused the retired version {refused_after:?} after the answer"
    );
    assert!(
        refused_after <= BOUND + Duration::from_millis(250),
        "{transport}: C refused the retired version only {refused_after:?} after the answer"
    );
    for _ in 0..20 {
        assert_eq!(
            c.answer(&new).await,
            "401 AUTH_INVALID_API_KEY",
            "never admitted again"
        );
    }
    assert_eq!(c.answer(&newest).await, "200", "v3 keys work on C");
    fleet.proxy.up().await;
    tokio::time::timeout(HANG_GUARD, c.subscription.wait_connected())
        .await
        .expect("C reconnects");
    assert_eq!(fleet.answers(&new).await, ["401 AUTH_INVALID_API_KEY"; 3]);
    assert_eq!(fleet.answers(&newest).await, ["200"; 3]);
}

/// Every instance in the roster before the first change: a change that changes nothing (legacy
/// keys are refused already), until `n` instances acknowledge it.
async fn roster_of(manager: &KeyManager, n: usize) {
    let started = Instant::now();
    loop {
        let receipt = manager.set_legacy_keys(false).await.unwrap();
        if receipt.is_complete() && receipt.instances == n {
            return;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "the roster never filled: {receipt:?}"
        );
    }
}

/// Waits (polling) until `what` holds.
async fn until(what: impl Fn() -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !what() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition reached");
}

/// A and B subscribe directly, C through `proxy`: `invalidator(name)` gives each its own (C's
/// through the proxy).
async fn start_fleet<I: Invalidator + Clone>(
    schema: &PgSchema,
    proxy: Proxy,
    invalidator: impl Fn(&'static str) -> I,
    subscribe: impl Fn(&I, CachedResolver) -> Subscription,
) -> Fleet {
    let mut instances = Vec::new();
    for name in ["a", "b", "c"] {
        let invalidator = invalidator(name);
        let subscriber = invalidator.clone();
        let store = schema.store().await;
        instances
            .push(Instance::start(name, store, invalidator, |r| subscribe(&subscriber, r)).await);
    }
    let instances: [Instance; 3] = instances.try_into().ok().unwrap();
    Fleet { instances, proxy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_changes_reach_every_instance_over_listen_notify() {
    let Some(schema) = common::db::pg_schema("format_pg").await else {
        return;
    };
    let channel = common::db::unique("format_pg");
    let direct = schema.store().await;
    let (proxy, through) = common::db::pg_through_proxy(&schema).await;
    let invalidator = |name: &'static str| {
        PostgresInvalidator::from_store(if name == "c" { &through } else { &direct })
            .with_channel(&channel)
            .unwrap()
            .instance_name(name)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    };
    let fleet = start_fleet(&schema, proxy, invalidator, PostgresInvalidator::subscribe).await;
    scenario("LISTEN/NOTIFY", fleet).await;
    schema.drop_schema().await;
}

/// An instance that cannot read the store when a format change reaches it fails closed: it
/// acknowledges, refuses every key with 503 until it can read the store again, then recovers by
/// itself. (LISTEN/NOTIFY; D's subscription is direct, its store behind the proxy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_reload_its_format_refuses_every_key_until_it_can() {
    let Some(schema) = common::db::pg_schema("format_pg_store_down").await else {
        return;
    };
    let channel = common::db::unique("format_pg_store_down");
    let direct = schema.store().await;
    let invalidator = |name: &str| {
        PostgresInvalidator::from_store(&direct)
            .with_channel(&channel)
            .unwrap()
            .instance_name(name)
    };
    let subscriber = invalidator("a");
    let a = Instance::start("a", schema.store().await, subscriber.clone(), |r| {
        subscriber.subscribe(r)
    })
    .await;
    let (proxy, through) = common::db::pg_through_proxy(&schema).await;
    let subscriber = invalidator("d");
    let d = Instance::start("d", through, subscriber.clone(), |r| {
        subscriber.subscribe(r)
    })
    .await;
    roster_of(&a.manager, 2).await;
    let key = a.mint().await;
    assert_eq!(d.answer(&key).await, "200");

    proxy.down().await;
    let (_, receipt) = a
        .manager
        .add_format_secret(FormatSecret::generate())
        .await
        .unwrap();
    assert!(
        receipt.is_complete() && receipt.instances == 2,
        "D acknowledged: {receipt:?}"
    );
    assert_eq!(
        d.answer(&key).await,
        "503 AUTH_UNAVAILABLE",
        "D refuses even its cached key"
    );
    let newer = a.mint().await;
    assert_eq!(a.answer(&newer).await, "200");
    assert_ne!(d.answer(&newer).await, "200", "D has not loaded version 2");

    proxy.up().await;
    let back = Instant::now();
    while d.answer(&newer).await != "200" {
        assert!(back.elapsed() < HANG_GUARD, "D never reloaded its format");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "D reloaded its format {:?} after its store came back",
        back.elapsed()
    );
    assert_eq!(d.answer(&key).await, "200");
    drop((a, d, proxy));
    schema.drop_schema().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_changes_reach_every_instance_over_redis() {
    use tower_api_keys::invalidate::RedisInvalidator;

    let Some(redis_url) = common::db::redis_url("format_redis").await else {
        return;
    };
    let Some(schema) = common::db::pg_schema("format_redis").await else {
        return;
    };
    let channel = common::db::unique("format_redis");
    let (proxy, through) = common::db::redis_through_proxy(&redis_url).await;
    let invalidator = |name: &'static str| {
        RedisInvalidator::open(if name == "c" { &through } else { &redis_url })
            .unwrap()
            .with_channel(channel.as_str())
            .instance_name(name)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    };
    let fleet = start_fleet(&schema, proxy, invalidator, RedisInvalidator::subscribe).await;
    scenario("Redis", fleet).await;
    schema.drop_schema().await;
}
