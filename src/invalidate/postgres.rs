//! [`PostgresInvalidator`]: broadcast key changes over PostgreSQL `LISTEN`/`NOTIFY` (feature `postgres`).
//!
//! ```no_run
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::invalidate::PostgresInvalidator;
//! use tower_api_keys::store::PostgresStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://app@db.internal/app").await?;
//! let resolver = CachedResolver::new(store.clone());
//!
//! // Every instance publishes its key changes and applies everyone else's.
//! let invalidator = PostgresInvalidator::from_store(&store).with_channel("billing_api_keys")?;
//! let subscription = invalidator.subscribe(resolver.clone());
//! subscription.wait_connected().await;
//! // Give `invalidator` to key management; keep `subscription` alive as long as the service.
//! # let _ = subscription;
//! # Ok(())
//! # }
//! ```
//!
//! Publishing is one transaction: the next sequence number of the channel's revocation log (under
//! a lock, so sequence numbers commit in order), the log row, `SELECT pg_notify(channel, payload)`
//! with the sequenced wire form, and the roster's live instances (see [`Sequenced`]). The tables
//! (`api_key_fleet_log`, `api_key_fleet_roster`) are created on first use, in the store's schema
//! ([`PostgresInvalidator::from_store`]) or the pool's search path ([`PostgresInvalidator::new`]). The subscriber holds one dedicated connection (opened with the pool's connection options,
//! `application_name` set to the channel) that `LISTEN`s on the channel and on its fleet channel (name + `_fleet`), and on that same
//! connection writes its heartbeat (default every 250 ms: roster row + `NOTIFY`), its
//! acknowledgements and its log reads; so a connection that stops forwarding silently is noticed
//! by its heartbeats (a call not answered within the bound, or its own heartbeats not heard back),
//! not only when TCP gives up. The subscribe / catch-up / reconnect loop is the one both
//! broadcasters share ([`Subscription`]): while the connection is down or not yet up the resolver is
//! in degraded mode (cached answers older than its degraded lifetime, default 1 s, are read again);
//! it reconnects with exponential backoff (100 ms doubling to 1 s, with jitter) and, once listening
//! again, catches up from the revocation log (clearing the cache only when the log, kept 10 minutes,
//! no longer reaches back). The loss is logged at `warn`, the recovery at `info`; keys, digests and
//! payloads are never logged.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

#[cfg(doc)]
use super::Invalidation;
use super::Sequenced;
use super::fleet::{FleetConfig, Message, fleet_channel};
use super::member;
use super::subscription::{Backend, Backoff, Beat, LogTail, Subscription};
use crate::resolver::CachedResolver;
use crate::store::StoreError;
use crate::store::postgres::{InvalidIdentifier, PostgresStore, check_identifier};
use crate::store::sql_common::map_sqlx_error;

/// Publishes [`Invalidation`]s with `NOTIFY` and subscribes resolvers with `LISTEN`.
///
/// Cheap to clone. Every instance of a service must use the same channel (and database).
#[derive(Clone)]
pub struct PostgresInvalidator {
    pool: PgPool,
    channel: Arc<str>,
    backoff: Backoff,
    fleet: FleetConfig,
    /// `"<schema>".` when the fleet's tables live in a store's schema; empty: the search path's.
    tables: Arc<str>,
    /// The fleet's tables exist (created on first use).
    ready: Arc<tokio::sync::OnceCell<()>>,
}

impl fmt::Debug for PostgresInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresInvalidator")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl PostgresInvalidator {
    /// The channel used when none is configured.
    pub const DEFAULT_CHANNEL: &str = "tower_api_keys_invalidation";

    /// An invalidator publishing through `pool` on [`DEFAULT_CHANNEL`](Self::DEFAULT_CHANNEL).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            channel: Self::DEFAULT_CHANNEL.into(),
            backoff: Backoff::default(),
            fleet: FleetConfig::default(),
            tables: "".into(),
            ready: Arc::default(),
        }
    }

    /// An invalidator on the store's database, publishing through its pool; the fleet's tables
    /// (revocation log, roster) live in the store's schema.
    pub fn from_store(store: &PostgresStore) -> Self {
        let mut invalidator = Self::new(store.pool().clone());
        invalidator.tables = format!("\"{}\".", store.schema()).into();
        invalidator
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

    /// How often each subscription beats (default 250 ms): writes its row in the roster and sends
    /// a heartbeat on the fleet channel. Keep it well under the resolver's freshness bound.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.fleet.heartbeat = interval.max(Duration::from_millis(10));
        self
    }

    /// How long an instance stays in the roster after its last heartbeat (default 3 s): a revoke
    /// waits for the acknowledgement of every instance in the roster.
    pub fn roster_ttl(mut self, ttl: Duration) -> Self {
        self.fleet.roster_ttl = ttl.max(Duration::from_millis(10));
        self
    }

    /// The name subscriptions give themselves in the roster, in logs and metrics (default
    /// `<pid>-<random>`). Give each instance its own (e.g. the host name).
    pub fn instance_name(mut self, name: &str) -> Self {
        self.fleet.name = Some(name.into());
        self
    }

    async fn ensure_tables(&self) -> Result<(), StoreError> {
        self.ready
            .get_or_try_init(|| async {
                sqlx::raw_sql(sql(&self.tables, CREATE_TABLES))
                    .execute(&self.pool)
                    .await
                    .map(|_| ())
                    .map_err(map_sqlx_error)
            })
            .await
            .map(|_| ())
    }

    /// Starts a task (on the current tokio runtime) that applies every received [`Invalidation`]
    /// to `resolver`, reconnecting and clearing the cache after a lost connection. The task stops
    /// when the returned handle is dropped or [shut down](Subscription::shutdown).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn subscribe(&self, resolver: CachedResolver) -> Subscription {
        // Named after the channel in `pg_stat_activity`, so operators can find the listener.
        let options = (*self.pool.connect_options())
            .clone()
            .application_name(&self.channel);
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
            fleet_channel: fleet_channel(&self.channel).into(),
            tables: self.tables.clone(),
        };
        member::spawn(
            backend,
            self.channel.clone(),
            resolver,
            self.backoff,
            self.fleet.params(),
        )
    }
}

super::fleet::sequenced_invalidator!(PostgresInvalidator);

impl PostgresInvalidator {
    /// Publishes one message of the revocation log (`payload`: its unsequenced wire form): in one
    /// transaction, under a lock that keeps sequence numbers in commit order, the next sequence
    /// number, the log row, the `NOTIFY`, and the roster's live instances.
    async fn publish_payload(&self, payload: &str) -> Result<Sequenced, StoreError> {
        self.ensure_tables().await?;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        let channel = &*self.channel;
        sqlx::query("SELECT pg_advisory_xact_lock(7305, hashtext($1))")
            .bind(channel)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let seq: i64 = sqlx::query_scalar(sql(
            &self.tables,
            "SELECT coalesce(max(seq), 0) + 1 FROM api_key_fleet_log WHERE channel = $1",
        ))
        .bind(channel)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(sql(
            &self.tables,
            "INSERT INTO api_key_fleet_log (channel, seq, payload) VALUES ($1, $2, $3)",
        ))
        .bind(channel)
        .bind(seq)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let sequence = u64::try_from(seq).unwrap_or_default();
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(Message::sequenced(sequence, payload))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        if sequence % 64 == 0 {
            // The newest row always stays: it carries the sequence on.
            sqlx::query(sql(
                &self.tables,
                "DELETE FROM api_key_fleet_log WHERE channel = $1 AND seq < $2 \
                 AND published_at < now() - make_interval(secs => $3)",
            ))
            .bind(channel)
            .bind(seq)
            .bind(LOG_RETENTION.as_secs_f64())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            sqlx::query(sql(
                &self.tables,
                "DELETE FROM api_key_fleet_roster WHERE channel = $1 \
                 AND beat_at < now() - make_interval(secs => $2)",
            ))
            .bind(channel)
            .bind(LOG_RETENTION.as_secs_f64())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        }
        let live: Vec<String> = sqlx::query_scalar(sql(
            &self.tables,
            "SELECT instance FROM api_key_fleet_roster WHERE channel = $1 \
             AND beat_at > now() - make_interval(secs => $2) ORDER BY instance",
        ))
        .bind(channel)
        .bind(self.fleet.roster_ttl.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Sequenced {
            sequence,
            live,
            published_at: tokio::time::Instant::now(),
        })
    }
}

/// `text` with the fleet's tables in `tables` (`"<schema>".`, or empty for the search path's).
/// The schema name is an identifier the store checked.
fn sql(tables: &str, text: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text.replace("api_key_fleet_", &format!("{tables}api_key_fleet_")))
}

/// How long the revocation log keeps an invalidation (a subscriber disconnected for longer clears
/// its cache when it comes back), and a silent instance's roster row.
const LOG_RETENTION: Duration = Duration::from_secs(600);

/// The fleet's tables, in the schema the pool uses (created under a lock: instances may start
/// together). The log keeps invalidations by sequence number per channel; the roster one row per
/// instance and channel.
const CREATE_TABLES: &str = "BEGIN;
SELECT pg_advisory_xact_lock(7305, 0);
CREATE TABLE IF NOT EXISTS api_key_fleet_log (
    channel TEXT NOT NULL,
    seq BIGINT NOT NULL,
    payload TEXT NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, seq)
);
CREATE TABLE IF NOT EXISTS api_key_fleet_roster (
    channel TEXT NOT NULL,
    instance TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    applied BIGINT NOT NULL,
    beat_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (channel, instance)
);
COMMIT;";

/// The PostgreSQL side of the shared subscription loop: `LISTEN` on one dedicated connection, which
/// also carries the heartbeats, acknowledgements and log reads (so a cut connection cannot beat).
struct PgBackend {
    pool: PgPool,
    channel: Arc<str>,
    fleet_channel: Arc<str>,
    tables: Arc<str>,
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
        sqlx::raw_sql(sql(&self.tables, CREATE_TABLES))
            .execute(&mut listener)
            .await
            .map_err(Lost::Sql)?;
        listener
            .listen_all([&*self.channel, &*self.fleet_channel])
            .await
            .map_err(Lost::Sql)?;
        Ok(listener)
    }

    async fn receive(&self, listener: &mut PgListener) -> Result<Option<String>, Lost> {
        match listener.try_recv().await {
            Ok(Some(notification)) => Ok(Some(notification.payload().to_owned())),
            Ok(None) => Err(Lost::Closed),
            Err(error) => Err(Lost::Sql(error)),
        }
    }

    async fn beat(&self, listener: &mut PgListener, beat: &Beat<'_>) -> Result<(), Lost> {
        sqlx::query(sql(
            &self.tables,
            "WITH up AS (
                 INSERT INTO api_key_fleet_roster (channel, instance, started_at, applied, beat_at)
                 VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (channel, instance)
                 DO UPDATE SET applied = EXCLUDED.applied, beat_at = EXCLUDED.beat_at
                 RETURNING 1)
             SELECT pg_notify($5, $6 || ',\"head\":' || (SELECT coalesce(max(seq), 0)
                 FROM api_key_fleet_log WHERE channel = $1) || '}') FROM up",
        ))
        .bind(&*self.channel)
        .bind(beat.instance)
        .bind(beat.started_at)
        .bind(i64::try_from(beat.applied).unwrap_or(i64::MAX))
        .bind(&*self.fleet_channel)
        .bind(&beat.prefix)
        .execute(listener)
        .await
        .map(|_| ())
        .map_err(Lost::Sql)
    }

    async fn ack(&self, listener: &mut PgListener, text: &str) -> Result<(), Lost> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&*self.fleet_channel)
            .bind(text)
            .execute(listener)
            .await
            .map(|_| ())
            .map_err(Lost::Sql)
    }

    async fn log_after(
        &self,
        listener: &mut PgListener,
        after: Option<u64>,
    ) -> Result<LogTail, Lost> {
        let (head, first): (i64, i64) = sqlx::query_as(sql(
            &self.tables,
            "SELECT coalesce(max(seq), 0), coalesce(min(seq), 0) FROM api_key_fleet_log \
             WHERE channel = $1",
        ))
        .bind(&*self.channel)
        .fetch_one(&mut *listener)
        .await
        .map_err(Lost::Sql)?;
        let head = u64::try_from(head).unwrap_or_default();
        let Some(after) = after else {
            return Ok(LogTail {
                head,
                entries: Vec::new(),
                complete: true,
            });
        };
        let reaches_back = head <= after || u64::try_from(first).unwrap_or_default() <= after + 1;
        if !reaches_back || head - after > MAX_CATCH_UP {
            return Ok(LogTail {
                head,
                entries: Vec::new(),
                complete: false,
            });
        }
        let rows: Vec<(i64, String)> = sqlx::query_as(sql(
            &self.tables,
            "SELECT seq, payload FROM api_key_fleet_log WHERE channel = $1 AND seq > $2 \
             ORDER BY seq",
        ))
        .bind(&*self.channel)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .fetch_all(&mut *listener)
        .await
        .map_err(Lost::Sql)?;
        let entries: Vec<(u64, String)> = rows
            .into_iter()
            .map(|(seq, payload)| (u64::try_from(seq).unwrap_or_default(), payload))
            .collect();
        Ok(LogTail {
            head: head.max(entries.last().map_or(0, |(seq, _)| *seq)),
            entries,
            complete: true,
        })
    }
}

/// Most invalidations a subscriber applies one by one when it catches up; beyond, it clears its
/// cache (cheaper).
const MAX_CATCH_UP: u64 = 10_000;

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
        let invalidator = PostgresInvalidator::new(pool);
        assert_eq!(invalidator.channel(), PostgresInvalidator::DEFAULT_CHANNEL);
        assert!(invalidator.clone().with_channel("bad name").is_err());
        assert_eq!(invalidator.with_channel("ok_1").unwrap().channel(), "ok_1");
    }
}
