//! What the broadcasting invalidators share: the subscribe / reconnect-with-backoff / clear-cache
//! loop ([`spawn`]), the subscription handle, its status and the reconnection backoff. A backend
//! ([`Backend`]: PostgreSQL `LISTEN`, Redis `SUBSCRIBE`) supplies only how to connect and how to
//! receive the next message.
//!
//! The loop keeps the resolver's degraded mode (its invariant 8) in step with the connection: the
//! resolver is degraded from the moment the subscription is requested until the first connection is
//! up, and again from a loss until the next connection is up; each time a connection comes up, the
//! cache is cleared once (messages may have been missed) before degraded mode ends.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Invalidation;
use crate::resolver::CachedResolver;

/// The state of a subscription, as reported by [`Subscription::status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStatus {
    /// Whether the subscriber is connected and listening right now.
    pub connected: bool,
    /// How many times a connection was established (1 after the first; each reconnection adds one
    /// and has cleared the cache before it is counted).
    pub connections: u64,
}

/// A running subscription: stops its task when dropped.
pub struct Subscription {
    task: tokio::task::JoinHandle<()>,
    status: watch::Receiver<SubscriptionStatus>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) fn new(
        task: tokio::task::JoinHandle<()>,
        status: watch::Receiver<SubscriptionStatus>,
    ) -> Self {
        Self { task, status }
    }

    /// The current state.
    pub fn status(&self) -> SubscriptionStatus {
        *self.status.borrow()
    }

    /// Waits until the subscriber is connected (at once if it is). Invalidations published before
    /// that may be missed, but then the cache is cleared when it connects after a failure.
    pub async fn wait_connected(&self) {
        self.wait_for(|s| s.connected).await;
    }

    /// Waits until at least `n` connections have been established (e.g. `n = 2`: the first
    /// reconnection, whose cache clearing has then happened).
    pub async fn wait_for_connections(&self, n: u64) {
        self.wait_for(|s| s.connected && s.connections >= n).await;
    }

    async fn wait_for(&self, done: impl FnMut(&SubscriptionStatus) -> bool) {
        let mut status = self.status.clone();
        // An error means the task ended, which only happens once the handle is gone.
        let _ = status.wait_for(done).await;
    }

    /// Stops the subscriber and waits for its task to end.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Exponential reconnection backoff with jitter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 1 s: recovery after an outage takes about a second.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(1))
    }
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            max: max.max(initial),
        }
    }

    /// `delay` shortened by a random fraction of up to a half.
    pub(crate) fn jittered(delay: Duration) -> Duration {
        let mut byte = [0u8; 1];
        let fraction = match getrandom::fill(&mut byte) {
            Ok(()) => f64::from(byte[0]) / 255.0,
            Err(_) => 0.0,
        };
        delay.mul_f64(1.0 - fraction / 2.0)
    }
}

/// One broadcast backend: how to connect (and subscribe), and how to receive.
pub(crate) trait Backend: Send + Sync + 'static {
    /// A connection that is subscribed.
    type Connection: Send;
    /// Why connecting failed or a connection ended (logged; never holds a payload).
    type Error: fmt::Display + Send;

    /// Connects and subscribes; once this returns, every message published afterwards is received.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Self::Error>> + Send;

    /// The next message: `Ok(Some(payload))`, `Ok(None)` for one that is not text, `Err` when the
    /// connection is lost.
    fn receive(
        &self,
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send;
}

/// Starts the subscriber task for `backend` on the current tokio runtime; the resolver is degraded
/// until it is connected.
pub(crate) fn spawn<B: Backend>(
    backend: B,
    channel: Arc<str>,
    resolver: CachedResolver,
    backoff: Backoff,
) -> Subscription {
    let (status, watcher) = watch::channel(SubscriptionStatus::default());
    let health = Health::new(resolver);
    let task = tokio::spawn(run(backend, channel, health, backoff, status));
    Subscription::new(task, watcher)
}

/// The resolver's view of one subscription: degraded while down. Dropped with the task (shutdown,
/// abort), it gives the degraded mark back.
struct Health {
    resolver: CachedResolver,
    down: bool,
}

impl Health {
    fn new(resolver: CachedResolver) -> Self {
        resolver.subscription_down();
        Self {
            resolver,
            down: true,
        }
    }

    /// A connection is up: what was cached meanwhile may have missed messages, so it goes, then
    /// degraded mode ends.
    fn up(&mut self) {
        if self.down {
            self.resolver.invalidate_all();
            self.resolver.subscription_up();
            self.down = false;
        }
    }

    fn down(&mut self) {
        if !self.down {
            self.resolver.subscription_down();
            self.down = true;
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        if self.down {
            self.resolver.subscription_up();
        }
    }
}

/// The subscriber task: connect, apply, and on any loss reconnect (with backoff) and clear the cache.
async fn run<B: Backend>(
    backend: B,
    channel: Arc<str>,
    mut health: Health,
    backoff: Backoff,
    status: watch::Sender<SubscriptionStatus>,
) {
    let channel = &*channel;
    let mut delay = backoff.initial;
    // Failed attempts since the last connection: the first is logged at `warn`, the rest at `debug`.
    let mut failures = 0u64;
    let mut connections = 0u64;
    loop {
        let mut connection = match backend.connect().await {
            Ok(connection) => connection,
            Err(error) => {
                if failures == 0 {
                    tracing::warn!(%error, channel, "API key invalidation subscriber cannot connect; retrying");
                } else {
                    tracing::debug!(%error, channel, "API key invalidation subscriber still cannot connect");
                }
                failures += 1;
                tokio::time::sleep(Backoff::jittered(delay)).await;
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        health.up();
        connections += 1;
        if connections > 1 || failures > 0 {
            tracing::info!(
                channel,
                "API key invalidation subscriber connected after a failure; cleared the key cache"
            );
        }
        failures = 0;
        status.send_modify(|s| {
            s.connected = true;
            s.connections += 1;
        });
        let connected_at = Instant::now();
        let lost = loop {
            match backend.receive(&mut connection).await {
                Ok(Some(payload)) => {
                    apply(Invalidation::from_json(&payload), &health.resolver, channel)
                }
                Ok(None) => apply(None, &health.resolver, channel),
                Err(error) => break error,
            }
        };
        drop(connection);
        health.down();
        status.send_modify(|s| s.connected = false);
        tracing::warn!(error = %lost, channel, "API key invalidation subscriber lost its connection; reconnecting");
        // A connection that dies at once must not turn into a busy loop.
        if connected_at.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Backoff::jittered(delay)).await;
            delay = (delay * 2).min(backoff.max);
        } else {
            delay = backoff.initial;
        }
    }
}

fn apply(invalidation: Option<Invalidation>, resolver: &CachedResolver, channel: &str) {
    match invalidation {
        Some(invalidation) => invalidation.apply(resolver),
        None => {
            // Unreadable (another version, another user of the channel): be safe, forget everything.
            resolver.invalidate_all();
            tracing::warn!(
                channel,
                "unreadable API key invalidation message; cleared the key cache"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;

    /// A backend driven by the test: each `connect` takes the next outcome from a channel, and a
    /// connection yields the messages sent to it until its sender is dropped.
    struct Scripted {
        attempts:
            tokio::sync::Mutex<mpsc::UnboundedReceiver<Option<mpsc::UnboundedReceiver<String>>>>,
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
        let subscription = spawn(backend, "test".into(), resolver.clone(), backoff);
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
}
