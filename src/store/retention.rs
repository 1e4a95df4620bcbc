//! [`Retention`]: purging a store's old audit events and usage counts in the background.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::{KeyStore, StoreError};

/// How long audit events and usage counts are kept, and how often the purge runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this are purged (default 90 days). The chain stays checkable from the
    /// first kept event: the store records the last purged one as its anchor.
    pub events: Duration,
    /// Hourly usage counts older than this are purged (default 90 days).
    pub usage: Duration,
    /// How often the purge runs (default hourly).
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            events: Duration::from_secs(90 * 86_400),
            usage: Duration::from_secs(90 * 86_400),
            every: Duration::from_secs(3_600),
        }
    }
}

impl Retention {
    /// Purges once, as of `now`: returns how many events and usage rows were removed.
    pub async fn purge(
        &self,
        store: &dyn KeyStore,
        now: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let events = store.purge_events(now - self.events).await?;
        let usage = store.purge_usage(now - self.usage).await?;
        Ok((events, usage))
    }

    /// Purges every [`every`](Self::every) on the current tokio runtime, the first time at once,
    /// until the returned handle is aborted or dropped with the runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self, store: Arc<dyn KeyStore>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match self.purge(&*store, OffsetDateTime::now_utc()).await {
                    Ok((events, usage)) if events + usage > 0 => {
                        tracing::info!(
                            events,
                            usage,
                            "purged audit events and usage past retention"
                        );
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "purging audit events and usage failed; will retry")
                    }
                }
            }
        })
    }
}
