//! The subscriber loop against a scripted backend.

use super::*;
use crate::invalidate::subscription::LogTail;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// A backend driven by the test: each `connect` takes the next outcome from a channel, and a
/// connection yields the messages sent to it until its sender is dropped.
struct Scripted {
    attempts: tokio::sync::Mutex<mpsc::UnboundedReceiver<Option<mpsc::UnboundedReceiver<String>>>>,
    connects: AtomicUsize,
}

impl Backend for Scripted {
    type Connection = mpsc::UnboundedReceiver<String>;
    type Error = &'static str;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        match self.attempts.lock().await.recv().await {
            Some(Some(connection)) => Ok(connection),
            _ => Err("refused"),
        }
    }

    async fn receive(
        &self,
        connection: &mut Self::Connection,
    ) -> Result<Option<String>, Self::Error> {
        connection.recv().await.map(Some).ok_or("closed")
    }

    async fn beat(&self, _: &mut Self::Connection, _: &Beat<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn ack(&self, _: &mut Self::Connection, _: &str) -> Result<(), Self::Error> {
        Ok(())
    }

    /// An empty log that never reaches back: every connection clears the cache.
    async fn log_after(
        &self,
        _: &mut Self::Connection,
        _: Option<u64>,
    ) -> Result<LogTail, Self::Error> {
        Ok(LogTail::default())
    }
}

fn params() -> FleetParams {
    FleetParams {
        board: Arc::default(),
        instance: "test".into(),
        token: 1,
        heartbeat: Duration::from_millis(250),
        roster_ttl: Duration::from_secs(3),
    }
}

async fn until(what: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !what() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("condition reached");
}

/// Degraded before the first connection and after a loss; each connection clears the cache
/// once; a failed attempt is retried; dropping the subscription ends degraded mode.
#[tokio::test]
async fn the_loop_keeps_degraded_mode_in_step() {
    let store = crate::store::MemoryStore::new();
    let resolver = CachedResolver::new(store);
    let digest = crate::key::KeyDigest::of("unknown");
    let (attempts, script) = mpsc::unbounded_channel();
    let backend = Scripted {
        attempts: tokio::sync::Mutex::new(script),
        connects: AtomicUsize::new(0),
    };
    let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
    let subscription = spawn(backend, "test".into(), resolver.clone(), backoff, params());
    assert!(
        resolver.is_degraded(),
        "degraded before the first connection"
    );
    attempts.send(None).unwrap();
    let (first, messages) = mpsc::unbounded_channel();
    attempts.send(Some(messages)).unwrap();
    subscription.wait_connected().await;
    assert!(!resolver.is_degraded());
    // A message is applied; an unreadable one clears the cache.
    resolver.authenticate(&digest).await.unwrap_err();
    assert_eq!(resolver.cached_entries(), 1);
    first.send("not json".into()).unwrap();
    until(|| resolver.cached_entries() == 0).await;
    resolver.authenticate(&digest).await.unwrap_err();
    // The connection is lost: degraded until the next one, which clears the cache.
    drop(first);
    until(|| resolver.is_degraded()).await;
    assert_eq!(resolver.cached_entries(), 1, "a loss alone clears nothing");
    let (_second, messages) = mpsc::unbounded_channel();
    attempts.send(Some(messages)).unwrap();
    subscription.wait_for_connections(2).await;
    assert!(!resolver.is_degraded());
    assert_eq!(resolver.cached_entries(), 0, "cleared on reconnect");
    drop(attempts);
    subscription.shutdown().await;
    assert!(!resolver.is_degraded());
}

/// A format change is applied before it is acknowledged: the resolver's format is read again
/// from the store.
#[tokio::test]
async fn a_format_change_is_reloaded_before_it_is_acknowledged() {
    use crate::invalidate::fleet::FORMAT_PAYLOAD;
    let store = Arc::new(crate::store::MemoryStore::new());
    let format = crate::key::KeyFormat::keyed("sk")
        .load_secret_from(&*store)
        .await
        .unwrap();
    let resolver = CachedResolver::builder(store.clone())
        .format(format)
        .build();
    let (attempts, script) = mpsc::unbounded_channel();
    let backend = Scripted {
        attempts: tokio::sync::Mutex::new(script),
        connects: AtomicUsize::new(0),
    };
    let fleet = params();
    let board = fleet.board.clone();
    let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
    let subscription = spawn(backend, "test".into(), resolver.clone(), backoff, fleet);
    let (messages, connection) = mpsc::unbounded_channel();
    attempts.send(Some(connection)).unwrap();
    subscription.wait_connected().await;
    let secret = crate::key::FormatSecret::generate();
    let now = time::OffsetDateTime::now_utc();
    crate::store::KeyStore::add_format_secret(&*store, &secret, now)
        .await
        .unwrap();
    messages
        .send(Message::sequenced(1, FORMAT_PAYLOAD))
        .unwrap();
    let published = crate::invalidate::Sequenced {
        sequence: 1,
        live: vec!["test".into()],
        published_at: Instant::now(),
    };
    let receipt = board.wait(&published, Duration::from_secs(5)).await;
    assert!(receipt.is_complete(), "{receipt:?}");
    assert_eq!(resolver.format().accepted_versions(), [1, 2]);
    subscription.shutdown().await;
}
