//! Leak reports (GitHub's secret-scanning partner protocol, deps.dev headers): a signed report
//! revokes the leaked key and its descendants; a bad, missing or replayed-and-tampered signature
//! and an unknown key identifier change nothing; tokens that are not ours cost no store lookup; the
//! same report twice changes nothing more; the policy per owner; keys fetched from a URL and
//! refreshed on an unknown identifier.
#![cfg(feature = "leaks")]

mod common;
#[path = "leaks/scanner.rs"]
mod scanner;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;
use tower_api_keys::error::{AuthError, ExpiredReason};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::leaks::{
    self, LeakAction, LeakPolicy, LeakReceiver, MAX_REPORT_TOKENS, PublicKeys, Scanner as Origin,
    hex_sha256,
};
use tower_api_keys::manage::{CreateKey, CreatedKey, KeyManager, RotateOptions};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

use common::TestStore;
use scanner::{Scanner, report};

struct Service {
    store: Arc<TestStore>,
    manager: KeyManager,
    app: Router,
}

fn service(format: KeyFormat, keys: PublicKeys, policy: LeakPolicy) -> Service {
    let store = TestStore::wrap(Arc::new(MemoryStore::new()));
    let resolver = CachedResolver::builder(store.clone())
        .format(format)
        .build();
    let manager = KeyManager::new(resolver);
    let receiver = LeakReceiver::builder(manager.clone())
        .keys(Origin::GitHub, keys.clone())
        .keys(Origin::DepsDev, keys)
        .policy(policy)
        .build();
    Service {
        store,
        manager,
        app: leaks::router(receiver),
    }
}

fn keys_of(scanners: &[&Scanner]) -> PublicKeys {
    PublicKeys::from_json(Scanner::document(scanners).as_bytes()).unwrap()
}

/// A key of `owner` made by the master key (may delegate), and a key it created.
async fn family(manager: &KeyManager, owner: &str) -> (CreatedKey, CreatedKey) {
    let parent = manager
        .create(
            &Principal::master(),
            CreateKey::new(["ledgers:read", "api-keys:write"]).owner(owner),
        )
        .await
        .unwrap();
    let acting = manager
        .resolver()
        .authenticate(&parent.key.digest())
        .await
        .unwrap();
    let child = manager
        .create(&acting, CreateKey::new(["ledgers:read"]))
        .await
        .unwrap();
    (parent, child)
}

async fn post(app: &Router, headers: &[(&str, &str)], body: &str) -> (StatusCode, Value) {
    let mut request = Request::post("/api-keys/leaks").header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn signed(app: &Router, scanner: &Scanner, body: &str) -> (StatusCode, Value) {
    let signature = scanner.sign(body.as_bytes());
    post(
        app,
        &[
            ("Github-Public-Key-Identifier", &scanner.identifier),
            ("Github-Public-Key-Signature", &signature),
        ],
        body,
    )
    .await
}

async fn works(manager: &KeyManager, key: &ApiKey) -> Result<Principal, AuthError> {
    manager.resolver().authenticate(&key.digest()).await
}

fn revoked(result: Result<Principal, AuthError>) -> bool {
    matches!(result, Err(AuthError::ExpiredKey(ExpiredReason::Revoked)))
}

#[tokio::test]
async fn a_signed_report_revokes_the_key_and_its_descendants_and_answers_feedback() {
    let github = Scanner::new("github-key-1");
    let s = service(KeyFormat::default(), keys_of(&[&github]), LeakPolicy::new());
    let (parent, child) = family(&s.manager, "payments").await;
    let (other, _) = family(&s.manager, "ledger").await;
    works(&s.manager, &child.key).await.unwrap();

    let stranger = "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB";
    let body = report(&[parent.key.expose_secret(), stranger]);
    let (status, feedback) = signed(&s.app, &github, &body).await;
    assert_eq!(status, StatusCode::OK, "{feedback}");
    assert_eq!(
        feedback,
        serde_json::json!([
            {"token_hash": hex_sha256(parent.key.expose_secret().as_bytes()), "token_type": "tower_api_key", "label": "true_positive"},
            {"token_hash": hex_sha256(stranger.as_bytes()), "token_type": "tower_api_key", "label": "false_positive"},
        ])
    );
    assert!(revoked(works(&s.manager, &parent.key).await));
    assert!(
        revoked(works(&s.manager, &child.key).await),
        "descendants too"
    );
    assert!(
        works(&s.manager, &other.key).await.is_ok(),
        "other keys untouched"
    );
    let info = s
        .manager
        .get(&Principal::master(), &parent.info.id)
        .await
        .unwrap();
    assert!(info.revoked_at.is_some(), "listed as revoked");

    // The same report again: same answer, nothing more changes.
    let (status, again) = signed(&s.app, &github, &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, feedback);
    let after = s
        .manager
        .get(&Principal::master(), &parent.info.id)
        .await
        .unwrap();
    assert_eq!(
        after.revoked_at, info.revoked_at,
        "the first revocation stands"
    );
}

#[tokio::test]
async fn unverified_reports_change_nothing() {
    let github = Scanner::new("github-key-1");
    let impostor = Scanner::new("github-key-1");
    let unknown = Scanner::new("github-key-2");
    let s = service(KeyFormat::default(), keys_of(&[&github]), LeakPolicy::new());
    let (parent, child) = family(&s.manager, "payments").await;
    let body = report(&[parent.key.expose_secret()]);
    let lookups = s.store.lookups();

    let good_signature = github.sign(body.as_bytes());
    // A replayed signature over a tampered body (one more token, same signature).
    let tampered = report(&[parent.key.expose_secret(), child.key.expose_secret()]);
    let impostor_signature = impostor.sign(body.as_bytes());
    let unknown_signature = unknown.sign(body.as_bytes());
    let id = github.identifier.as_str();
    // (case, headers, body, the reason refused)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("no headers", vec![], &body, "missing_signature"),
        (
            "identifier only",
            vec![("Github-Public-Key-Identifier", id)],
            &body,
            "missing_signature",
        ),
        (
            "replayed signature, tampered body",
            vec![
                ("Github-Public-Key-Identifier", id),
                ("Github-Public-Key-Signature", &good_signature),
            ],
            &tampered,
            "bad_signature",
        ),
        (
            "signed by another key under a known identifier",
            vec![
                ("Github-Public-Key-Identifier", id),
                ("Github-Public-Key-Signature", &impostor_signature),
            ],
            &body,
            "bad_signature",
        ),
        (
            "unknown identifier",
            vec![
                ("Github-Public-Key-Identifier", "github-key-2"),
                ("Github-Public-Key-Signature", &unknown_signature),
            ],
            &body,
            "unknown_key_identifier",
        ),
        (
            "not base64",
            vec![
                ("Github-Public-Key-Identifier", id),
                ("Github-Public-Key-Signature", "!!!"),
            ],
            &body,
            "malformed_signature",
        ),
        (
            "headers of both scanners",
            vec![
                ("Github-Public-Key-Identifier", id),
                ("Github-Public-Key-Signature", &good_signature),
                ("GOSST-Public-Key-Identifier", id),
                ("GOSST-Public-Key-Signature", &good_signature),
            ],
            &body,
            "malformed_headers",
        ),
    ];
    for (case, headers, body, reason) in cases {
        let (status, answer) = post(&s.app, &headers, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {answer}");
        assert_eq!(
            answer["error_detail"]["code"], "LEAK_REPORT_UNVERIFIED",
            "{case}"
        );
        assert_eq!(
            answer["error_detail"]["details"]["reason"], reason,
            "{case}"
        );
        assert!(
            !answer.to_string().contains(parent.key.expose_secret()),
            "{case}: never echoed"
        );
    }
    assert_eq!(
        s.store.lookups(),
        lookups,
        "no store lookup for any of them"
    );
    works(&s.manager, &parent.key).await.unwrap();
    works(&s.manager, &child.key).await.unwrap();

    // The genuine report still works afterwards.
    let (status, _) = signed(&s.app, &github, &body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked(works(&s.manager, &parent.key).await));
}

#[tokio::test]
async fn deps_dev_headers_are_accepted() {
    let depsdev = Scanner::new("depsdev-1");
    let s = service(
        KeyFormat::default(),
        keys_of(&[&depsdev]),
        LeakPolicy::new(),
    );
    let (parent, _) = family(&s.manager, "payments").await;
    let body = report(&[parent.key.expose_secret()]);
    let signature = depsdev.sign(body.as_bytes());
    let (status, feedback) = post(
        &s.app,
        &[
            ("GOSST-Public-Key-Identifier", &depsdev.identifier),
            ("GOSST-Public-Key-Signature", &signature),
        ],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{feedback}");
    assert_eq!(feedback[0]["label"], "true_positive");
    assert!(revoked(works(&s.manager, &parent.key).await));
}

#[tokio::test]
async fn tokens_that_are_not_ours_cost_no_store_lookup() {
    let github = Scanner::new("github-key-1");
    for format in [
        KeyFormat::new("sk_live").unwrap(),
        KeyFormat::keyed("sk_live")
            .secret(1, tower_api_keys::key::FormatSecret::generate())
            .build()
            .unwrap(),
    ] {
        let s = service(format.clone(), keys_of(&[&github]), LeakPolicy::new());
        let (parent, _) = family(&s.manager, "payments").await;
        // Right prefix and shape, wrong checksum or tag; another prefix; other vendors' tokens; a
        // huge string.
        let mut typo = parent.key.expose_secret().to_owned();
        let last = typo.pop().unwrap();
        typo.push(if last == 'A' { 'B' } else { 'A' });
        let made_up = format!(
            "sk_live_{}",
            "x".repeat(format.key_len() - "sk_live_".len())
        );
        let other_prefix = KeyFormat::new("pk_test").unwrap().generate();
        let huge = "sk_live_".to_owned() + &"a".repeat(10_000);
        let not_ours = [
            typo.as_str(),
            made_up.as_str(),
            other_prefix.expose_secret(),
            "AKIAIOSFODNN7EXAMPLE",
            "xoxb-123456789012-123456789012-abcdefghijklmnopqrstuvwx",
            huge.as_str(),
        ];
        let lookups = s.store.lookups();
        let (status, feedback) = signed(&s.app, &github, &report(&not_ours)).await;
        assert_eq!(status, StatusCode::OK);
        for entry in feedback.as_array().unwrap() {
            assert_eq!(entry["label"], "false_positive");
        }
        assert_eq!(s.store.lookups(), lookups, "{format:?}: no store lookup");
        works(&s.manager, &parent.key).await.unwrap();

        // A well-formed key that passes the check but that no store holds: one lookup, false
        // positive.
        let unknown = format.generate();
        let (_, feedback) = signed(&s.app, &github, &report(&[unknown.expose_secret()])).await;
        assert_eq!(feedback[0]["label"], "false_positive");
        assert_eq!(s.store.lookups(), lookups + 1);
    }
}

#[tokio::test]
async fn the_policy_per_owner_notifies_ends_the_secret_or_revokes() {
    let github = Scanner::new("github-key-1");
    let policy = LeakPolicy::new()
        .owner("quiet", LeakAction::Notify)
        .owner("gentle", LeakAction::EndSecret);
    let s = service(KeyFormat::default(), keys_of(&[&github]), policy);
    let (quiet, quiet_child) = family(&s.manager, "quiet").await;
    let (gentle, gentle_child) = family(&s.manager, "gentle").await;
    let (strict, strict_child) = family(&s.manager, "strict").await;
    let body = report(&[
        quiet.key.expose_secret(),
        gentle.key.expose_secret(),
        strict.key.expose_secret(),
    ]);
    let (status, feedback) = signed(&s.app, &github, &body).await;
    assert_eq!(status, StatusCode::OK);
    for entry in feedback.as_array().unwrap() {
        assert_eq!(entry["label"], "true_positive");
    }
    // Notify: nothing changes.
    works(&s.manager, &quiet.key).await.unwrap();
    works(&s.manager, &quiet_child.key).await.unwrap();
    // EndSecret: the leaked secret stops, the key stays (not revoked), its child keeps working.
    assert!(matches!(
        works(&s.manager, &gentle.key).await,
        Err(AuthError::InvalidKey(_))
    ));
    let info = s
        .manager
        .get(&Principal::master(), &gentle.info.id)
        .await
        .unwrap();
    assert!(info.revoked_at.is_none());
    assert_ne!(info.masked_key, gentle.info.masked_key, "a new secret");
    works(&s.manager, &gentle_child.key).await.unwrap();
    let rotated = s
        .manager
        .rotate(&Principal::master(), &gentle.info.id, RotateOptions::new())
        .await
        .unwrap();
    works(&s.manager, &rotated.key).await.unwrap();
    // The default: revoked with descendants.
    assert!(revoked(works(&s.manager, &strict.key).await));
    assert!(revoked(works(&s.manager, &strict_child.key).await));
}

#[tokio::test]
async fn reports_are_bounded() {
    let github = Scanner::new("github-key-1");
    let s = service(KeyFormat::default(), keys_of(&[&github]), LeakPolicy::new());
    let token = KeyFormat::default().generate();
    let many = vec![token.expose_secret(); MAX_REPORT_TOKENS + 1];
    let (status, answer) = signed(&s.app, &github, &report(&many)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let huge = format!("[{}]", " ".repeat(leaks::MAX_REPORT_BYTES));
    let (status, _) = signed(&s.app, &github, &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = signed(&s.app, &github, r#"{"token": "x"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "not an array");
}

/// Serves `document()` on 127.0.0.1, counting fetches.
async fn key_server(
    document: Arc<std::sync::Mutex<String>>,
    fetches: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/keys",
        axum::routing::get(move || {
            let document = document.clone();
            let fetches = fetches.clone();
            async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = document.lock().unwrap().clone();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn keys_from_a_url_are_cached_and_refreshed_on_an_unknown_identifier() {
    let first = Scanner::new("github-key-1");
    let second = Scanner::new("github-key-2");
    let document = Arc::new(std::sync::Mutex::new(Scanner::document(&[&first])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let addr = key_server(document.clone(), fetches.clone()).await;

    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(CachedResolver::new(store.clone()));
    let receiver = LeakReceiver::builder(manager.clone())
        .refresh_interval(Duration::ZERO)
        .keys_url(Origin::GitHub, format!("http://{addr}/keys"))
        .build();
    let app = leaks::router(receiver);
    let (a, _) = family(&manager, "payments").await;
    let (b, _) = family(&manager, "payments").await;

    let (status, _) = signed(&app, &first, &report(&[a.key.expose_secret()])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "fetched on the first report"
    );
    let (status, _) = signed(&app, &first, &report(&[a.key.expose_secret()])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "then cached");

    // The scanner rotates its key: a report with the new identifier triggers one refresh.
    let (status, answer) = signed(&app, &second, &report(&[b.key.expose_secret()])).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "not published yet: {answer}"
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert!(works(&manager, &b.key).await.is_ok());
    *document.lock().unwrap() = Scanner::document(&[&first, &second]);
    let (status, _) = signed(&app, &second, &report(&[b.key.expose_secret()])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetches.load(Ordering::SeqCst), 3);
    assert!(revoked(works(&manager, &b.key).await));
    let _ = store.get(&b.info.id).await.unwrap();
}

#[tokio::test]
async fn unknown_identifiers_cannot_make_the_receiver_fetch_in_a_loop() {
    let first = Scanner::new("github-key-1");
    let document = Arc::new(std::sync::Mutex::new(Scanner::document(&[&first])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let addr = key_server(document, fetches.clone()).await;
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(CachedResolver::new(store));
    let receiver = LeakReceiver::builder(manager)
        .keys_url(Origin::GitHub, format!("http://{addr}/keys"))
        .build();
    let app = leaks::router(receiver);
    for i in 0..5 {
        let made_up = Scanner::new(&format!("made-up-{i}"));
        let (status, _) = signed(&app, &made_up, "[]").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "one fetch per refresh interval"
    );
}
