//! What the broadcasting invalidators share: the subscription handle, its status and the
//! reconnection backoff (the subscribe / catch-up / beat / reconnect-with-backoff loop itself is in
//! `member.rs`). A backend ([`Backend`]: PostgreSQL `LISTEN`, Redis `SUBSCRIBE`) supplies
//! how to connect, receive, beat, acknowledge and read the revocation log.
//!
//! The loop keeps the resolver's degraded mode (its invariant 8) in step with the connection: the
//! resolver is degraded from the moment the subscription is requested until the first connection is
//! up, and again from a loss until the next connection is up. The first connection starts from the
//! log's head with an empty cache; each later one first catches up from the revocation log (and
//! clears the cache only when the log no longer reaches back). While connected, the fleet vouches
//! for the cache until one bound after the sending time of the last own heartbeat heard back
//! (everything published before it has been received by then); see the module docs above.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

#[cfg(doc)]
use super::{Invalidation, fleet::Message};

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

/// What the log holds after a sequence number.
#[derive(Debug, Default)]
pub(crate) struct LogTail {
    /// The highest sequence number given out so far (0: none).
    pub(crate) head: u64,
    /// The invalidations after the one asked for, in order (wire form of [`Invalidation`]).
    pub(crate) entries: Vec<(u64, String)>,
    /// Whether the log still reaches back to the one right after the one asked for (else entries
    /// were pruned, and the cache must be cleared).
    pub(crate) complete: bool,
}

/// One heartbeat, as the backend writes it to the roster and sends it on the fleet channel.
pub(crate) struct Beat<'a> {
    pub(crate) instance: &'a str,
    /// When this instance started (Unix seconds): a column of the PostgreSQL roster, a hash beside
    /// the Redis roster (whose applied sequence travels in the prefix).
    pub(crate) started_at: i64,
    /// The message without its `head` ([`Message::beat_prefix`]).
    pub(crate) prefix: String,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) applied: u64,
}

/// One broadcast backend: how to connect (and subscribe), receive, and speak the fleet protocol.
pub(crate) trait Backend: Send + Sync + 'static {
    /// A connection that is subscribed (to the invalidation and the fleet channel).
    type Connection: Send;
    /// Why connecting failed or a connection ended (logged; never holds a payload).
    type Error: fmt::Display + Send;

    /// Connects and subscribes; once this returns, every message published afterwards is received.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Self::Error>> + Send;

    /// The next message: `Ok(Some(payload))`, `Ok(None)` for one that is not text, `Err` when the
    /// connection is lost. Dropped when a heartbeat is due: it must lose nothing then.
    fn receive(
        &self,
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send;

    /// Writes this instance into the roster and sends the heartbeat, with the log's head as of
    /// the same moment, on the fleet channel.
    fn beat(
        &self,
        connection: &mut Self::Connection,
        beat: &Beat<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Sends an acknowledgement (its wire form) on the fleet channel.
    fn ack(
        &self,
        connection: &mut Self::Connection,
        text: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The log after `after` (`None`: only the head).
    fn log_after(
        &self,
        connection: &mut Self::Connection,
        after: Option<u64>,
    ) -> impl Future<Output = Result<LogTail, Self::Error>> + Send;
}
