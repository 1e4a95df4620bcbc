//! [`PgInvalidator`]: broadcast key changes over PostgreSQL `LISTEN`/`NOTIFY` (feature `postgres`).
//!
//! ```no_run
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::invalidate::PgInvalidator;
//! use tower_api_keys::store::PostgresStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://app@db.internal/app").await?;
//! let resolver = CachedResolver::new(store.clone());
//!
//! // Every instance publishes its key changes and applies everyone else's.
//! let invalidator = PgInvalidator::from_store(&store).with_channel("billing_api_keys")?;
//! let subscription = invalidator.subscribe(resolver.clone());
//! subscription.wait_connected().await;
//! // Give `invalidator` to key management; keep `subscription` alive as long as the service.
//! # let _ = subscription;
//! # Ok(())
//! # }
//! ```
//!
//! Publishing is `SELECT pg_notify(channel, payload)` on the given pool, with the
//! [`Invalidation::to_json`] wire form as payload. The subscriber holds one dedicated connection
//! (opened with the pool's connection options) that `LISTEN`s on the channel. The subscribe /
//! reconnect / clear-cache loop is the one both broadcasters share ([`Subscription`]): while the
//! connection is down or not yet up the resolver is in degraded mode (cached answers older than its
//! degraded lifetime, default 1 s, are read again); it reconnects with exponential backoff (100 ms
//! doubling to 1 s, with jitter) and, once listening again, clears the whole resolver cache, since
//! notifications sent in between are lost. A loss is noticed when the connection reports it (a
//! closed socket, a terminated backend); a silent network cut only once TCP gives up. The loss is logged at `warn`,
//! the recovery at `info`; keys, digests and payloads are never logged.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::subscription::{self, Backend, Backoff, Subscription};

use super::{Invalidation, Invalidator};
use crate::resolver::CachedResolver;
use crate::store::StoreError;
use crate::store::postgres::{InvalidIdentifier, PostgresStore, check_identifier};
use crate::store::sql_common::map_sqlx_error;

/// Publishes [`Invalidation`]s with `NOTIFY` and subscribes resolvers with `LISTEN`.
///
/// Cheap to clone. Every instance of a service must use the same channel (and database).
#[derive(Clone)]
pub struct PgInvalidator {
    pool: PgPool,
    channel: Arc<str>,
    backoff: Backoff,
}

impl fmt::Debug for PgInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgInvalidator")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl PgInvalidator {
    /// The channel used when none is configured.
    pub const DEFAULT_CHANNEL: &str = "tower_api_keys_invalidation";

    /// An invalidator publishing through `pool` on [`DEFAULT_CHANNEL`](Self::DEFAULT_CHANNEL).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            channel: Self::DEFAULT_CHANNEL.into(),
            backoff: Backoff::default(),
        }
    }

    /// An invalidator on the store's database, publishing through its pool.
    pub fn from_store(store: &PostgresStore) -> Self {
        Self::new(store.pool().clone())
    }

    /// Uses another channel: 1 to 63 ASCII letters, digits, `_` or `$`, not starting with a digit
    /// or `$` (e.g. one per environment sharing a database, or one per test).
    pub fn with_channel(mut self, channel: &str) -> Result<Self, InvalidIdentifier> {
        check_identifier(channel, "channel")?;
        self.channel = channel.into();
        Ok(self)
    }

    /// Reconnection delays of subscribers: the first retry waits `initial`, each further one twice
    /// as long, up to `max` (defaults 100 ms and 1 s); each delay is randomly shortened by up to
    /// half so that a fleet does not reconnect in lockstep.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// The channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Starts a task (on the current tokio runtime) that applies every received [`Invalidation`]
    /// to `resolver`, reconnecting and clearing the cache after a lost connection. The task stops
    /// when the returned handle is dropped or [shut down](Subscription::shutdown).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn subscribe(&self, resolver: CachedResolver) -> Subscription {
        let options = (*self.pool.connect_options()).clone();
        // One dedicated connection; connecting waits at most 2 s before counting as a failure, so
        // that retries stay about a second apart even when the network drops packets.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let backend = PgBackend {
            pool,
            channel: self.channel.clone(),
        };
        subscription::spawn(backend, self.channel.clone(), resolver, self.backoff)
    }
}

#[async_trait::async_trait]
impl Invalidator for PgInvalidator {
    async fn publish(&self, invalidation: &Invalidation) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&*self.channel)
            .bind(invalidation.to_json())
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_sqlx_error)
    }
}

/// The PostgreSQL side of the shared subscription loop: `LISTEN` on one dedicated connection.
struct PgBackend {
    pool: PgPool,
    channel: Arc<str>,
}

/// Why listening failed or stopped (for the logs).
enum Lost {
    Sql(sqlx::Error),
    Closed,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sql(error) => fmt::Display::fmt(error, f),
            Self::Closed => f.write_str("connection closed"),
        }
    }
}

impl Backend for PgBackend {
    type Connection = PgListener;
    type Error = Lost;

    async fn connect(&self) -> Result<PgListener, Lost> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(Lost::Sql)?;
        // Report a lost connection instead of silently reconnecting: the loop must clear the cache.
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        listener.listen(&self.channel).await.map_err(Lost::Sql)?;
        Ok(listener)
    }

    async fn receive(&self, listener: &mut PgListener) -> Result<Option<String>, Lost> {
        match listener.try_recv().await {
            Ok(Some(notification)) => Ok(Some(notification.payload().to_owned())),
            Ok(None) => Err(Lost::Closed),
            Err(error) => Err(Lost::Sql(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jitter_only_shortens() {
        let b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.initial, Duration::from_millis(1));
        assert_eq!(b.max, Duration::from_millis(1));
        for _ in 0..100 {
            let d = Backoff::jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn channel_names_are_checked() {
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        let invalidator = PgInvalidator::new(pool);
        assert_eq!(invalidator.channel(), PgInvalidator::DEFAULT_CHANNEL);
        assert!(invalidator.clone().with_channel("bad name").is_err());
        assert_eq!(invalidator.with_channel("ok_1").unwrap().channel(), "ok_1");
    }
}
