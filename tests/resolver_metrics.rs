//! What shows the resolver's state: its metrics (feature `metrics`), through a Prometheus recorder
//! installed for this test binary alone, and its logs. The degraded-mode gauge and a `warn` line
//! follow a subscription that cannot connect; the shed counter counts what the lookup bound refused.
#![cfg(all(feature = "metrics", feature = "redis"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::gate::GateStore;
use metrics_exporter_prometheus::PrometheusBuilder;
use tower_api_keys::error::AuthError;
use tower_api_keys::invalidate::RedisInvalidator;
use tower_api_keys::key::KeyFormat;
use tower_api_keys::metrics::{CACHE_DEGRADED as DEGRADED, LOOKUPS_SHED_TOTAL};
use tower_api_keys::resolver::CachedResolver;

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The value of an unlabelled metric in the rendered text, if present.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_gauge_and_shed_counter() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");

    let store = Arc::new(GateStore::default());
    let format = KeyFormat::default();
    let (first, _) = common::issue(&*store, &format, "ledgers:read").await;
    let resolver = CachedResolver::builder(store.clone())
        .lookup_limit(1, 0)
        .build();

    // Degraded while a subscription cannot connect (a closed port), back to 0 once it is gone.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let invalidator = RedisInvalidator::open(&format!("redis://127.0.0.1:{port}")).unwrap();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let subscription =
        tracing::subscriber::with_default(subscriber, || invalidator.subscribe(resolver.clone()));
    assert_eq!(value(&handle.render(), DEGRADED), Some(1.0));
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("API key cache degraded"),
        "{text}"
    );
    subscription.shutdown().await;
    assert_eq!(value(&handle.render(), DEGRADED), Some(0.0));

    // One lookup in flight, no queue: a second distinct miss is shed and counted.
    store.hold_next(1);
    let held = tokio::spawn({
        let resolver = resolver.clone();
        let digest = first.digest();
        async move { resolver.authenticate(&digest).await }
    });
    store.wait_held(1).await;
    let shed = resolver
        .authenticate(&format.generate().digest())
        .await
        .unwrap_err();
    assert!(matches!(shed, AuthError::Unavailable(_)), "{shed:?}");
    assert_eq!(value(&handle.render(), LOOKUPS_SHED_TOTAL), Some(1.0));
    store.release(1);
    held.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
}
