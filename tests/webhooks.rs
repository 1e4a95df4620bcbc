//! Signed webhooks over real HTTP, on SQLite and PostgreSQL: every key event reaches a local
//! receiver on 127.0.0.1 with a valid Standard Webhooks signature; an event committed while no
//! deliverer runs is delivered by a new instance on the same store (a crash loses nothing); a
//! receiver answering 500 gets retries with exponential backoff (a driven clock) until it answers
//! or the retry horizon passes; a private URL is refused at registration and at delivery unless
//! allowed; two deliverers on one store deliver each message once.
#![cfg(all(feature = "webhooks", feature = "sqlite"))]

mod common;
#[path = "leaks/scanner.rs"]
mod scanner;
#[path = "webhooks/support.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;
use tower_api_keys::error::AuthError;
use tower_api_keys::leaks::{HygienePolicy, LeakReceiver, PublicKeys, Scanner, Sweeper};
use tower_api_keys::manage::{CreateKey, RotateOptions, UpdateKey};
use tower_api_keys::principal::Principal;
use tower_api_keys::webhooks::{DeliveryStatus, EVENT_TYPES, UrlPolicy};

use support::{Backend, Instance, Receiver, local};

const DAY: Duration = Duration::from_secs(86_400);

fn all_events() -> Vec<String> {
    EVENT_TYPES.iter().map(|t| t.as_str().to_owned()).collect()
}

/// Runs `scenario` on SQLite, and on PostgreSQL when reachable.
macro_rules! on_both {
    ($scenario:ident, $sqlite:ident, $pg:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let backend = Backend::sqlite();
            $scenario(&backend).await;
            backend.cleanup().await;
        }

        #[cfg(feature = "postgres")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            let Some(backend) = Backend::pg(stringify!($pg)).await else {
                return;
            };
            $scenario(&backend).await;
            backend.cleanup().await;
        }
    };
}

/// `t` floored to the microsecond: what the stores keep.
fn micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap()
}

/// Delivers until nothing is due (at most `rounds` passes).
async fn drain(instance: &Instance, rounds: usize) {
    let deliverer = instance.webhooks.deliverer();
    for _ in 0..rounds {
        if deliverer.deliver_due().await.unwrap().claimed == 0 {
            return;
        }
    }
}

async fn every_key_event_arrives_signed(backend: &Backend) {
    let server = backend.open(local()).await;
    let receiver = Receiver::start().await;
    let master = Principal::master();
    let endpoint = server
        .webhooks
        .register(&master, Some("team"), &receiver.url(), &all_events())
        .await
        .unwrap();
    let m = &server.manager;
    let soon = OffsetDateTime::now_utc() + 5 * DAY;
    let key = m
        .create(
            &master,
            CreateKey::new(["ledgers:read"])
                .owner("team")
                .expires_at(soon),
        )
        .await
        .unwrap();
    let rename = UpdateKey {
        name: Some("renamed".into()),
        ..UpdateKey::default()
    };
    m.update(&master, &key.info.id, rename).await.unwrap();
    m.rotate(&master, &key.info.id, RotateOptions::new())
        .await
        .unwrap();
    // The sweeper: expiring (inside the 7-day window), then idle (never used, two days on).
    let sweeper = Sweeper::new(m.clone()).policy(HygienePolicy::new().idle_after(90 * DAY));
    sweeper.sweep_at(OffsetDateTime::now_utc()).await.unwrap();
    let other = m
        .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
        .await
        .unwrap();
    Sweeper::new(m.clone())
        .policy(HygienePolicy::new().windows([]).idle_after(DAY))
        .sweep_at(OffsetDateTime::now_utc() + 2 * DAY)
        .await
        .unwrap();
    m.revoke(&master, &key.info.id).await.unwrap();
    m.delete(&master, &other.info.id).await.unwrap();
    // A leak report names a third key: `key.leaked`, then its revocation (once, even reported
    // twice).
    let leaked = m
        .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
        .await
        .unwrap();
    let github = scanner::Scanner::new("test-key-1");
    let leaks = LeakReceiver::builder(m.clone())
        .keys(
            Scanner::GitHub,
            PublicKeys::from_json(scanner::Scanner::document(&[&github]).as_bytes()).unwrap(),
        )
        .build();
    let body = scanner::report(&[leaked.key.expose_secret()]);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "Github-Public-Key-Identifier",
        github.identifier.parse().unwrap(),
    );
    headers.insert(
        "Github-Public-Key-Signature",
        github.sign(body.as_bytes()).parse().unwrap(),
    );
    leaks.receive(&headers, body.as_bytes()).await.unwrap();
    leaks.receive(&headers, body.as_bytes()).await.unwrap();
    // Another owner's events go elsewhere.
    m.create(&master, CreateKey::new(["ledgers:read"]).owner("elsewhere"))
        .await
        .unwrap();

    drain(&server, 10).await;
    let got = receiver.got();
    receiver.assert_all_signed(&endpoint.secret);
    let mut types: Vec<String> = got
        .iter()
        .map(|g| g.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "key.leaked").count(),
        1,
        "{types:?}"
    );
    types.sort();
    types.dedup();
    let mut expected: Vec<String> = all_events();
    expected.sort();
    assert_eq!(types, expected);
    for g in &got {
        let body = g.json();
        assert_eq!(body["data"]["owner_id"], "team");
        assert_eq!(body["data"]["type"], body["type"]);
        assert!(body["timestamp"].is_string());
        assert!(g.id.starts_with("msg_"));
        assert!(
            !String::from_utf8_lossy(&g.body).contains("sk_"),
            "no secret in a body"
        );
    }
    // The log says delivered, once each, with the message ids the receiver saw.
    let log = server
        .webhooks
        .deliveries(&master, &endpoint.webhook.id, None, None, None)
        .await
        .unwrap();
    assert_eq!(log.deliveries.len(), got.len());
    for d in &log.deliveries {
        assert_eq!(d.status, DeliveryStatus::Delivered, "{d:?}");
        assert_eq!((d.attempts, d.last_status), (1, Some(200)));
        assert!(got.iter().any(|g| g.id == d.id));
    }
}
on_both!(
    every_key_event_arrives_signed,
    every_key_event_arrives_signed_sqlite,
    every_key_event_arrives_signed_pg
);

async fn a_crash_before_delivery_loses_nothing(backend: &Backend) {
    let receiver = Receiver::start().await;
    let master = Principal::master();
    let (secret, key_id) = {
        // The first server registers, changes a key, and dies before any deliverer ran.
        let server = backend.open(local()).await;
        let endpoint = server
            .webhooks
            .register(&master, Some("team"), &receiver.url(), &all_events())
            .await
            .unwrap();
        let key = server
            .manager
            .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
            .await
            .unwrap();
        server.manager.revoke(&master, &key.info.id).await.unwrap();
        (endpoint.secret, key.info.id)
    };
    assert!(receiver.got().is_empty());
    // A new instance on the same store delivers both.
    let restarted = backend.open(local()).await;
    drain(&restarted, 5).await;
    let got = receiver.got();
    receiver.assert_all_signed(&secret);
    let types: Vec<_> = got.iter().map(|g| g.json()["type"].clone()).collect();
    assert_eq!(types.len(), 2, "{types:?}");
    assert!(types.contains(&"key.created".into()) && types.contains(&"key.revoked".into()));
    assert!(
        got.iter()
            .all(|g| g.json()["data"]["key_id"] == key_id.as_str())
    );
}
on_both!(
    a_crash_before_delivery_loses_nothing,
    a_crash_before_delivery_loses_nothing_sqlite,
    a_crash_before_delivery_loses_nothing_pg
);

async fn a_failing_receiver_gets_retries_with_backoff(backend: &Backend) {
    let server = backend.open(local()).await;
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let master = Principal::master();
    let endpoint = server
        .webhooks
        .register(
            &master,
            Some("team"),
            &receiver.url(),
            &["key.created".into()],
        )
        .await
        .unwrap();
    server
        .manager
        .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
        .await
        .unwrap();
    let deliverer = server
        .webhooks
        .deliverer()
        .backoff(Duration::from_secs(10), Duration::from_secs(40))
        .retry_horizon(Duration::from_secs(600));
    let t0 = micros(OffsetDateTime::now_utc() + Duration::from_millis(10));
    let at = |s: u64| t0 + Duration::from_secs(s);
    let log = || async {
        server
            .webhooks
            .deliveries(&master, &endpoint.webhook.id, None, None, None)
            .await
            .unwrap()
            .deliveries
            .remove(0)
    };
    // Attempts at 0, 10, 30 (delays 10, 20), nothing in between.
    let mut attempts_at = Vec::new();
    for s in [0, 5, 10, 15, 29, 30] {
        if deliverer.deliver_due_at(at(s)).await.unwrap().claimed == 1 {
            attempts_at.push(s);
        }
    }
    assert_eq!(attempts_at, [0, 10, 30]);
    let d = log().await;
    assert_eq!(
        (d.status, d.attempts, d.last_status),
        (DeliveryStatus::Pending, 3, Some(500))
    );
    assert_eq!(d.next_attempt_at, Some(at(30) + Duration::from_secs(40)));
    assert_eq!(d.last_error.as_deref(), Some("the endpoint answered 500"));
    // The receiver recovers: the next attempt (the same message id) delivers it.
    receiver.answer(204);
    assert_eq!(deliverer.deliver_due_at(at(70)).await.unwrap().delivered, 1);
    let got = receiver.got();
    assert_eq!(got.len(), 4);
    assert!(
        got.iter().all(|g| g.id == got[0].id),
        "one webhook-id across retries"
    );
    receiver.assert_all_signed(&endpoint.secret);
    let d = log().await;
    assert_eq!(
        (d.status, d.attempts, d.last_status),
        (DeliveryStatus::Delivered, 4, Some(204))
    );
    assert!(d.delivered_at.is_some() && d.next_attempt_at.is_none());

    // Past the retry horizon it is given up.
    receiver.answer(500);
    server
        .manager
        .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
        .await
        .unwrap();
    let short = deliverer.retry_horizon(Duration::from_secs(15));
    let t1 = micros(OffsetDateTime::now_utc() + Duration::from_millis(10));
    assert_eq!(short.deliver_due_at(t1).await.unwrap().retrying, 1);
    let report = short
        .deliver_due_at(t1 + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(log().await.status, DeliveryStatus::Failed);
    assert_eq!(short.deliver_due_at(t1 + DAY).await.unwrap().claimed, 0);
}
on_both!(
    a_failing_receiver_gets_retries_with_backoff,
    a_failing_receiver_gets_retries_with_backoff_sqlite,
    a_failing_receiver_gets_retries_with_backoff_pg
);

async fn private_urls_are_refused_unless_allowed(backend: &Backend) {
    let receiver = Receiver::start().await;
    let master = Principal::master();
    let strict = backend.open(UrlPolicy::new()).await;
    let refused = |r: Result<_, AuthError>| match r {
        Err(AuthError::WebhookUrlRefused(reason)) => reason,
        other => panic!(
            "{:?}",
            other.map(|_: tower_api_keys::webhooks::CreatedWebhook| ())
        ),
    };
    let events = ["key.created".to_owned()];
    let port = receiver.addr.port();
    for (url, reason) in [
        (receiver.url(), "not_https"),
        (format!("https://127.0.0.1:{port}/hook"), "private_address"),
        (format!("https://[::1]:{port}/hook"), "private_address"),
        (
            format!("https://[::ffff:127.0.0.1]:{port}/hook"),
            "private_address",
        ),
        (
            "https://169.254.169.254/latest/meta-data".to_owned(),
            "private_address",
        ),
        ("https://10.0.0.8/hook".to_owned(), "private_address"),
        ("https://localhost/hook".to_owned(), "private_address"),
    ] {
        let r = strict
            .webhooks
            .register(&master, Some("team"), &url, &events)
            .await;
        assert_eq!(refused(r), reason, "{url}");
    }
    // https alone is not enough for a private address; allowing private is.
    let https_only = backend.open(UrlPolicy::new().allow_private(true)).await;
    assert!(
        https_only
            .webhooks
            .register(
                &master,
                Some("team"),
                &format!("https://127.0.0.1:{port}/hook"),
                &events
            )
            .await
            .is_ok()
    );
    // Registered while allowed, delivered by a strict deliverer: refused at the attempt, the
    // receiver never called.
    let allowed = backend.open(local()).await;
    let endpoint = allowed
        .webhooks
        .register(&master, Some("team"), &receiver.url(), &events)
        .await
        .unwrap();
    allowed
        .manager
        .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
        .await
        .unwrap();
    strict.webhooks.deliverer().deliver_due().await.unwrap();
    assert!(receiver.got().is_empty());
    let log = allowed
        .webhooks
        .deliveries(&master, &endpoint.webhook.id, None, None, None)
        .await
        .unwrap();
    let d = &log.deliveries[0];
    assert_eq!(d.status, DeliveryStatus::Pending);
    assert_eq!(d.last_error.as_deref(), Some("refused: not_https"));
}
on_both!(
    private_urls_are_refused_unless_allowed,
    private_urls_are_refused_unless_allowed_sqlite,
    private_urls_are_refused_unless_allowed_pg
);

async fn two_deliverers_deliver_each_message_once(backend: &Backend) {
    let receiver = Receiver::start().await;
    let master = Principal::master();
    let (a, b) = (backend.open(local()).await, backend.open(local()).await);
    let endpoint = a
        .webhooks
        .register(&master, Some("team"), &receiver.url(), &all_events())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..30 {
        let key = a
            .manager
            .create(&master, CreateKey::new(["ledgers:read"]).owner("team"))
            .await
            .unwrap();
        ids.push(key.info.id);
    }
    let (da, db) = (
        a.webhooks.deliverer().batch(4),
        b.webhooks.deliverer().batch(4),
    );
    let run = |d: tower_api_keys::webhooks::Deliverer| async move {
        let mut claimed = 0;
        for _ in 0..40 {
            claimed += d.deliver_due().await.unwrap().claimed;
        }
        claimed
    };
    let (ca, cb) = tokio::join!(run(da), run(db));
    assert_eq!(ca + cb, 30, "every delivery claimed once ({ca} + {cb})");
    let got = receiver.got();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for g in &got {
        *per_id.entry(g.id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 30);
    assert!(
        per_id.values().all(|n| *n == 1),
        "a message delivered twice"
    );
    receiver.assert_all_signed(&endpoint.secret);
}
on_both!(
    two_deliverers_deliver_each_message_once,
    two_deliverers_deliver_each_message_once_sqlite,
    two_deliverers_deliver_each_message_once_pg
);
