//! What the broadcasting invalidators share: the subscription handle, its status and the
//! reconnection backoff.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;

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
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
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
