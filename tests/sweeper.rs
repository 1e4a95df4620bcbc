//! The hygiene sweeper with a controllable clock: `key.expiring` once per warning window (the
//! tightest one a key is in), `key.idle` once per idle spell, idle keys revoked only when asked;
//! the notices remembered in the store (SQLite: across a restart); two instances on one
//! PostgreSQL database emit each event once, with or without a leader; a PostgreSQL advisory lock
//! and a Redis lock each elect one leader, and another takes over when it goes.
#![cfg(feature = "leaks")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tower_api_keys::error::{AuthError, ExpiredReason};
use tower_api_keys::key::KeyId;
use tower_api_keys::leaks::{HygieneEvent, HygieneKind, HygienePolicy, Sweeper};
use tower_api_keys::manage::{CreateKey, CreatedKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

const DAY: Duration = Duration::from_secs(86_400);

type Events = Arc<Mutex<Vec<HygieneEvent>>>;

fn manager(store: Arc<dyn KeyStore>) -> KeyManager {
    KeyManager::new(CachedResolver::new(store))
}

fn sweeper(manager: &KeyManager, events: &Events) -> Sweeper {
    let events = events.clone();
    Sweeper::new(manager.clone()).on_event(move |e| events.lock().unwrap().push(e.clone()))
}

async fn key(manager: &KeyManager, expires_in: Option<Duration>) -> CreatedKey {
    let mut create = CreateKey::new(["ledgers:read", "api-keys:write"]).owner("team");
    if let Some(d) = expires_in {
        create = create.expires_at(OffsetDateTime::now_utc() + d);
    }
    manager.create(&Principal::master(), create).await.unwrap()
}

/// `(event type, key, window in days)` of each event, in order.
fn seen(events: &Events) -> Vec<(&'static str, KeyId, u64)> {
    events
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            let days = match e.kind {
                HygieneKind::Expiring { window } => window.as_secs() / 86_400,
                _ => 0,
            };
            (e.event_type(), e.key_id.clone(), days)
        })
        .collect()
}

#[tokio::test]
async fn expiring_keys_are_warned_once_per_window() {
    let manager = manager(Arc::new(MemoryStore::new()));
    let events = Events::default();
    let sweeper = sweeper(&manager, &events);
    let long = key(&manager, Some(40 * DAY)).await;
    let short = key(&manager, Some(5 * DAY)).await;
    let never = key(&manager, None).await;
    let start = OffsetDateTime::now_utc();
    let long_id = long.info.id.clone();
    let short_id = short.info.id.clone();

    // Day 0: the short key is in the 7-day window (not also the 30-day one).
    let report = sweeper.sweep_at(start).await.unwrap();
    assert!(report.led);
    assert_eq!(seen(&events), [("key.expiring", short_id.clone(), 7)]);
    // Sweeping again (any number of times) changes nothing.
    for _ in 0..3 {
        assert_eq!(sweeper.sweep_at(start).await.unwrap().emitted, 0);
    }
    // The clock moves on: the long key enters 30, 7, 1; the short one 1 then expires.
    for day in [11, 12, 20, 34, 35, 39] {
        sweeper.sweep_at(start + day * DAY).await.unwrap();
    }
    sweeper.sweep_at(start + 4 * DAY + DAY / 2).await.unwrap();
    let all = seen(&events);
    let of = |id: &KeyId| -> Vec<u64> { all.iter().filter(|e| &e.1 == id).map(|e| e.2).collect() };
    assert_eq!(of(&long_id), [30, 7, 1]);
    assert_eq!(of(&short_id), [7, 1]);
    assert!(of(&never.info.id).is_empty());
    assert!(all.iter().all(|e| e.0 == "key.expiring"));
    // The events carry no secret.
    for event in events.lock().unwrap().iter() {
        let text = format!("{event:?}");
        assert!(!text.contains(long.key.expose_secret()));
        assert!(!text.contains(short.key.expose_secret()));
    }
}

#[tokio::test]
async fn windows_are_configurable() {
    let manager = manager(Arc::new(MemoryStore::new()));
    let events = Events::default();
    let sweeper = sweeper(&manager, &events).policy(
        HygienePolicy::new()
            .windows([3 * DAY])
            .idle_after(1000 * DAY),
    );
    let k = key(&manager, Some(10 * DAY)).await;
    let start = OffsetDateTime::now_utc();
    sweeper.sweep_at(start).await.unwrap();
    assert!(
        seen(&events).is_empty(),
        "10 days left: outside a 3-day window"
    );
    sweeper.sweep_at(start + 8 * DAY).await.unwrap();
    assert_eq!(seen(&events), [("key.expiring", k.info.id.clone(), 3)]);
}

#[tokio::test]
async fn idle_keys_are_reported_once_and_revoked_only_when_asked() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let manager = manager(store.clone());
    let events = Events::default();
    let idle = key(&manager, None).await;
    let used = key(&manager, None).await;
    let acting = manager
        .resolver()
        .authenticate(&idle.key.digest())
        .await
        .unwrap();
    let child = manager
        .create(&acting, CreateKey::new(["ledgers:read"]))
        .await
        .unwrap();
    let start = OffsetDateTime::now_utc();
    // `used` was used on day 80.
    store
        .record_last_used(&[(used.info.id.clone(), start + 80 * DAY)])
        .await
        .unwrap();

    let reporting = sweeper(&manager, &events);
    reporting.sweep_at(start + 89 * DAY).await.unwrap();
    assert!(seen(&events).is_empty(), "not idle for 90 days yet");
    reporting.sweep_at(start + 91 * DAY).await.unwrap();
    let mut idle_ids: Vec<KeyId> = seen(&events).into_iter().map(|e| e.1).collect();
    idle_ids.sort();
    let mut expected = vec![idle.info.id.clone(), child.info.id.clone()];
    expected.sort();
    assert_eq!(idle_ids, expected, "the used key is not idle");
    assert!(seen(&events).iter().all(|e| e.0 == "key.idle"));
    reporting.sweep_at(start + 92 * DAY).await.unwrap();
    assert_eq!(seen(&events).len(), 2, "once per idle spell");
    // Off by default: still working.
    manager
        .resolver()
        .authenticate(&idle.key.digest())
        .await
        .unwrap();

    // Asked to revoke: the next idle key (used on day 80, idle from day 170) is revoked, with
    // reason idle.
    let revoking = sweeper(&manager, &events).policy(HygienePolicy::new().revoke_idle(true));
    let report = revoking.sweep_at(start + 171 * DAY).await.unwrap();
    assert_eq!(report.revoked, 1);
    assert!(matches!(
        manager.resolver().authenticate(&used.key.digest()).await,
        Err(AuthError::ExpiredKey(ExpiredReason::Revoked))
    ));
    let last = events.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.key_id, used.info.id);
    assert_eq!(last.kind, HygieneKind::Idle { revoked: true });
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn notices_survive_a_restart_on_sqlite() {
    use tower_api_keys::store::SqliteStore;
    let path =
        std::env::temp_dir().join(format!("tower-api-keys-sweeper-{}.db", std::process::id()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let events = Events::default();
    let start = OffsetDateTime::now_utc();
    {
        let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::connect(&url).await.unwrap());
        let manager = manager(store);
        key(&manager, Some(2 * DAY)).await;
        let report = sweeper(&manager, &events).sweep_at(start).await.unwrap();
        assert_eq!(report.emitted, 1);
    }
    let store: Arc<dyn KeyStore> = Arc::new(SqliteStore::connect(&url).await.unwrap());
    let manager = manager(store);
    let report = sweeper(&manager, &events).sweep_at(start).await.unwrap();
    assert_eq!((report.examined, report.emitted), (1, 0), "remembered");
    let _ = std::fs::remove_file(&path);
}

#[cfg(feature = "postgres")]
mod fleet {
    use super::*;
    use tower_api_keys::leaks::PostgresLeader;

    /// Two instances (each its own pool and manager) on one schema sweep the same days at the
    /// same time, as lone leaders: the store's notices alone keep each event single.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_emit_each_event_once() {
        let Some(schema) = common::db::pg_schema("sweeper_fleet").await else {
            return;
        };
        let events = Events::default();
        let a = manager(Arc::new(schema.store().await));
        let b = manager(Arc::new(schema.store().await));
        let mut ids = Vec::new();
        for days in [40, 20, 5, 2] {
            ids.push(key(&a, Some(days * DAY)).await.info.id);
        }
        let (sa, sb) = (sweeper(&a, &events), sweeper(&b, &events));
        let start = OffsetDateTime::now_utc();
        for day in 0..45 {
            for hour in [0, 12] {
                let now = start + day * DAY + hour * Duration::from_secs(3600);
                let (ra, rb) = tokio::join!(sa.sweep_at(now), sb.sweep_at(now));
                ra.unwrap();
                rb.unwrap();
            }
        }
        let all = seen(&events);
        let of =
            |id: &KeyId| -> Vec<u64> { all.iter().filter(|e| &e.1 == id).map(|e| e.2).collect() };
        assert_eq!(of(&ids[0]), [30, 7, 1]);
        assert_eq!(of(&ids[1]), [30, 7, 1]);
        assert_eq!(of(&ids[2]), [7, 1]);
        assert_eq!(of(&ids[3]), [7, 1]);
        assert_eq!(all.len(), 10, "no duplicates: {all:?}");
        schema.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_advisory_lock_elects_one_leader_and_another_takes_over() {
        let Some(schema) = common::db::pg_schema("sweeper_leader").await else {
            return;
        };
        let events = Events::default();
        let (sa, sb) = (schema.store().await, schema.store().await);
        let a = manager(Arc::new(sa.clone()));
        let b = manager(Arc::new(sb.clone()));
        let lock = common::db::unique("sweeper_leader");
        key(&a, Some(2 * DAY)).await;
        let first = sweeper(&a, &events).leadership(PostgresLeader::new(&sa, &lock));
        let second = sweeper(&b, &events).leadership(PostgresLeader::new(&sb, &lock));
        let now = OffsetDateTime::now_utc();
        let one = first.sweep_at(now).await.unwrap();
        let two = second.sweep_at(now).await.unwrap();
        assert!(one.led && !two.led, "one leader: {one:?} {two:?}");
        assert_eq!(one.emitted, 1);
        assert!(first.sweep_at(now).await.unwrap().led, "it keeps the lead");
        assert!(!second.sweep_at(now).await.unwrap().led);
        // The leader goes (its lock connection closes): the other takes over.
        drop(first);
        let taken = loop {
            let report = second.sweep_at(now + DAY / 2).await.unwrap();
            if report.led {
                break report;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            taken.emitted, 0,
            "the notice given by the first leader stands"
        );
        assert_eq!(seen(&events).len(), 1);
        schema.drop_schema().await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_lock_elects_one_leader_and_another_takes_over() {
        use tower_api_keys::leaks::{Leadership, RedisLeader};
        let Some(url) = common::db::redis_url("sweeper_redis_leader").await else {
            return;
        };
        let key = common::db::unique("sweeper_redis_leader");
        let client = || redis::Client::open(url.as_str()).unwrap();
        let ttl = Duration::from_millis(300);
        let first = RedisLeader::new(client(), &key, ttl);
        let second = RedisLeader::new(client(), &key, ttl);
        assert!(first.lead().await.unwrap());
        assert!(!second.lead().await.unwrap());
        assert!(first.lead().await.unwrap(), "extends its own lock");
        tokio::time::sleep(ttl / 2).await;
        assert!(first.lead().await.unwrap());
        assert!(!second.lead().await.unwrap(), "extended: still held");
        drop(first);
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        assert!(second.lead().await.unwrap(), "expired: taken over");
    }
}
