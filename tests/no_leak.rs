//! Secrets never leak: every `tracing` event of a full key lifecycle (create, use, rotate, revoke,
//! failures), captured at TRACE level, contains no plaintext key and no digest; `Debug` output of the
//! types that hold secrets is redacted.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::MASTER;
use http::Request;
use tower::ServiceExt;
use tower_api_keys::key::ApiKey;
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{self, CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;
use tower_api_keys::usage::UsageRecorder;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_full_lifecycle_logs_no_key_and_no_digest() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver.clone());
    let usage = UsageRecorder::new(store.clone());
    let app = Router::new()
        .route(
            "/whoami",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .merge(manage::router(manager.clone()))
        .layer(
            ApiKeyLayer::new(resolver.clone())
                .sources([KeySource::x_api_key(), KeySource::bearer()])
                .master_key(ApiKey::new(MASTER))
                .usage(usage.clone()),
        );
    let send = |uri: &str, method: &str, key: &str| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap();
        let app = app.clone();
        async move { app.oneshot(request).await.unwrap().status() }
    };

    let mut secrets: Vec<String> = vec![MASTER.to_owned()];
    let created = manager
        .create(&Principal::master(), CreateKey::new(["*:*"]).owner("o"))
        .await
        .unwrap();
    secrets.push(created.key.expose_secret().to_owned());
    tracing::debug!(?created, "debug of a created key");
    assert!(
        send("/whoami", "GET", created.key.expose_secret())
            .await
            .is_success()
    );
    let rotated = manager
        .rotate(
            &Principal::master(),
            &created.info.id,
            Some(std::time::Duration::from_secs(60)),
        )
        .await
        .unwrap();
    secrets.push(rotated.key.expose_secret().to_owned());
    assert!(
        send("/whoami", "GET", rotated.key.expose_secret())
            .await
            .is_success()
    );
    // Failures: a typo, an unknown key, a revoked key, a bad management call.
    let mut typo = rotated.key.expose_secret().to_owned();
    typo.pop();
    typo.push('0');
    secrets.push(typo.clone());
    assert_eq!(send("/whoami", "GET", &typo).await, 401);
    let stranger = resolver.format().generate();
    secrets.push(stranger.expose_secret().to_owned());
    assert_eq!(send("/whoami", "GET", stranger.expose_secret()).await, 401);
    manager
        .revoke(&Principal::master(), &created.info.id)
        .await
        .unwrap();
    assert_eq!(
        send("/whoami", "GET", rotated.key.expose_secret()).await,
        401
    );
    assert_eq!(
        send("/api-keys?owner=o", "GET", rotated.key.expose_secret()).await,
        401
    );
    usage.flush().await.unwrap();
    tracing::trace!(layer = ?ApiKeyLayer::new(resolver.clone()).master_key(ApiKey::new(MASTER)), ?resolver, ?manager, "debug of configuration");

    drop(_guard);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains(created.info.id.as_str()),
        "key ids are logged, so the capture works:\n{logs}"
    );
    for secret in &secrets {
        let body = secret.rsplit('_').next().unwrap();
        assert!(
            !logs.contains(body),
            "a secret appears in the logs:\n{logs}"
        );
        let digest = ApiKey::new(secret.clone()).digest();
        assert!(
            !logs.contains(&hex(digest.as_bytes())),
            "a digest appears in the logs"
        );
        assert!(
            !logs.contains(&hex(&digest.as_bytes()[..8])),
            "part of a digest appears in the logs"
        );
    }
}

#[test]
fn debug_output_of_secret_holders_is_redacted() {
    let key = ApiKey::new("sk_live_SuperSecretBodyThatMustNeverShow0123456789abcdefABC");
    let shown = [
        format!("{key:?}"),
        format!("{key}"),
        format!("{:?}", key.digest()),
        format!(
            "{:?}",
            ApiKeyLayer::new(CachedResolver::new(MemoryStore::new())).master_key(key.clone())
        ),
    ];
    for text in shown {
        assert!(!text.contains("SuperSecret"), "{text}");
        assert!(
            !text.contains(&hex(&key.digest().as_bytes()[..4])),
            "{text}"
        );
    }
}

/// The keyed format's secrets, created in and read back from a SQLite store, rotated, used to mint
/// and check keys and misconfigured: no log line, `Debug` or error message holds any of them.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn the_key_format_secret_never_appears_in_logs() {
    use tower_api_keys::key::{FormatSecret, KeyFormat};
    use tower_api_keys::store::{KeyStore, SqliteStore};

    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = SqliteStore::in_memory().await.unwrap();
    let first = KeyFormat::keyed("sk_live")
        .load_secret_from(&store)
        .await
        .unwrap();
    store
        .add_format_secret(&FormatSecret::generate(), time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    let builder = KeyFormat::keyed("sk_live").accept_legacy(false);
    tracing::debug!(?builder, "debug of a keyed format builder");
    let format = builder.load_secret_from(&store).await.unwrap();
    let resolver = CachedResolver::builder(Arc::new(store.clone()))
        .format(format.clone())
        .build();
    let manager = KeyManager::new(resolver.clone());
    let app = Router::new()
        .route(
            "/whoami",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .layer(ApiKeyLayer::new(resolver.clone()));
    let created = manager
        .create(&Principal::master(), CreateKey::new(["*:*"]).owner("o"))
        .await
        .unwrap();
    let stranger = KeyFormat::keyed("sk_live")
        .secret(2, FormatSecret::generate())
        .build()
        .unwrap()
        .generate();
    for (key, status) in [
        (created.key.expose_secret(), 200),
        (first.generate().expose_secret(), 401),
        (stranger.expose_secret(), 401),
    ] {
        let request = Request::get("/whoami")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.clone().oneshot(request).await.unwrap().status(), status);
    }
    // A misconfiguration: version 1 given here and also found in the store.
    let error = KeyFormat::keyed("sk_live")
        .secret(1, FormatSecret::generate())
        .load_secret_from(&store)
        .await
        .unwrap_err();
    tracing::error!(%error, ?error, "a configuration error");
    tracing::trace!(
        ?format,
        ?first,
        ?resolver,
        ?manager,
        "debug of configuration"
    );
    let stored = store
        .format_secrets(&FormatSecret::generate(), time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    tracing::trace!(?stored, "debug of the stored secrets");

    drop(_guard);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains(created.info.id.as_str()) && logs.contains("secret: FormatSecret(..)"),
        "key ids and the stored secrets' Debug are logged, so the capture works:\n{logs}"
    );
    let raw: Vec<Vec<u8>> = sqlx::query_scalar("SELECT secret FROM api_key_format_secrets")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(raw.len(), 2);
    for secret in &raw {
        let shown_as = [
            hex(secret),
            hex(&secret[..6]),
            hex(&secret[26..]),
            format!("{:?}", &secret[..6])
                .trim_end_matches(']')
                .to_owned(),
            String::from_utf8_lossy(&secret[..6]).into_owned(),
        ];
        for form in &shown_as {
            assert!(
                !logs.contains(form.as_str()),
                "a format secret appears in the logs ({form})"
            );
        }
    }
}
