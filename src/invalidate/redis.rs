//! [`RedisInvalidator`]: broadcast key changes over Redis pub/sub (feature `redis`).
//!
//! ```no_run
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//! use tower_api_keys::invalidate::RedisInvalidator;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let store = MemoryStore::new();
//! let resolver = CachedResolver::new(store);
//!
//! // Every instance publishes its key changes and applies everyone else's.
//! let invalidator = RedisInvalidator::open("redis://cache.internal:6379")?
//!     .with_channel("billing:api-keys");
//! let subscription = invalidator.subscribe(resolver.clone());
//! subscription.wait_connected().await;
//! // Give `invalidator` to key management; keep `subscription` alive as long as the service.
//! # let _ = subscription;
//! # Ok(())
//! # }
//! ```
//!
//! Publishing is `PUBLISH channel payload` with the [`Invalidation::to_json`] wire form, over one
//! multiplexed connection opened on first use and reopened after a failure. The subscriber holds a
//! dedicated pub/sub connection and pings it periodically (default every 500 ms; a ping unanswered
//! within twice that, at least 1 s, counts as a loss), so a silently dead connection is noticed
//! too. The subscribe / reconnect / clear-cache loop is the one both broadcasters share
//! ([`Subscription`]): while the connection is down or not yet up the resolver is in degraded mode
//! (cached answers older than its degraded lifetime, default 1 s, are read again); it reconnects
//! with exponential backoff (100 ms doubling to 1 s, with jitter) and, once subscribed again,
//! clears the whole resolver cache, since messages sent in
//! between are lost. The loss is logged at `warn`, the recovery at `info`; keys, digests and payloads
//! are never logged.

use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use futures_util::StreamExt;
use futures_util::future::{self, Either};
use tokio::time::{Instant, timeout};

#[cfg(doc)]
use super::Invalidation;
use super::Sequenced;
use super::fleet::{FleetConfig, fleet_channel};
use super::member;
use super::subscription::{Backend, Backoff, Beat, LogTail, Subscription};
use crate::resolver::CachedResolver;
use crate::store::{StoreError, StoreErrorKind};

/// How long connecting (to publish) or publishing may take before it counts as a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a subscriber's connection and subscription may take: short, so that retries stay about
/// a second apart even when the network drops packets.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes [`Invalidation`]s with `PUBLISH` and subscribes resolvers with `SUBSCRIBE`.
///
/// Cheap to clone; clones share the publishing connection. Every instance of a service must use the
/// same channel (and Redis).
#[derive(Clone)]
pub struct RedisInvalidator {
    client: ::redis::Client,
    channel: Arc<str>,
    backoff: Backoff,
    ping_interval: Duration,
    publisher: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    fleet: FleetConfig,
}

impl fmt::Debug for RedisInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisInvalidator")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl RedisInvalidator {
    /// The channel used when none is configured.
    pub const DEFAULT_CHANNEL: &str = "tower_api_keys:invalidation";

    /// An invalidator using `client`'s server, on [`DEFAULT_CHANNEL`](Self::DEFAULT_CHANNEL). Nothing connects yet.
    pub fn new(client: ::redis::Client) -> Self {
        Self {
            client,
            channel: Self::DEFAULT_CHANNEL.into(),
            backoff: Backoff::default(),
            ping_interval: Duration::from_millis(500),
            publisher: Arc::default(),
            fleet: FleetConfig::default(),
        }
    }

    /// An invalidator for the server at `url` (e.g. `redis://127.0.0.1:6379`). Fails only on a
    /// malformed URL; nothing connects yet.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        ::redis::Client::open(url)
            .map(Self::new)
            .map_err(StoreError::unavailable)
    }

    /// Uses another channel (any name; e.g. one per environment sharing a server, or per test).
    pub fn with_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into().into();
        self
    }

    /// Reconnection delays of subscribers: the first retry waits `initial`, each further one twice
    /// as long, up to `max` (defaults 100 ms and 1 s); each delay is randomly shortened by up to
    /// half so that a fleet does not reconnect in lockstep.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// How often a subscriber pings its connection to detect a silent loss (default 500 ms).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// How often each subscription beats (default 250 ms): refreshes its place in the roster and
    /// sends a heartbeat on the fleet channel. Keep it well under the resolver's freshness bound.
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

    /// Starts a task (on the current tokio runtime) that applies every received [`Invalidation`]
    /// to `resolver`, reconnecting and clearing the cache after a lost connection. The task stops
    /// when the returned handle is dropped or [shut down](Subscription::shutdown).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn subscribe(&self, resolver: CachedResolver) -> Subscription {
        let backend = RedisBackend {
            client: self.client.clone(),
            channel: self.channel.clone(),
            fleet_channel: fleet_channel(&self.channel).into(),
            keys: Keys::of(&self.channel),
            ping_interval: self.ping_interval,
        };
        member::spawn(
            backend,
            self.channel.clone(),
            resolver,
            self.backoff,
            self.fleet.params(),
        )
    }

    async fn publisher(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut slot = self.publisher.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = timeout(IO_TIMEOUT, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| StoreError::from_kind(StoreErrorKind::Timeout))?
            .map_err(StoreError::unavailable)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

super::fleet::sequenced_invalidator!(RedisInvalidator);

impl RedisInvalidator {
    /// Publishes one message of the revocation log (`payload`: its unsequenced wire form): one
    /// script (atomic, so sequence numbers are published in order), the next sequence number, the
    /// log entry, the `PUBLISH`, and the roster's live instances.
    async fn publish_payload(&self, payload: &str) -> Result<Sequenced, StoreError> {
        let keys = Keys::of(&self.channel);
        let mut last = None;
        // A connection that broke since the last publish is replaced once.
        for _ in 0..2 {
            let mut conn = self.publisher().await?;
            let sent = timeout(
                IO_TIMEOUT,
                PUBLISH
                    .key(&keys.seq)
                    .key(&keys.log)
                    .key(&keys.roster)
                    .arg(&*self.channel)
                    .arg(payload)
                    .arg(millis(self.fleet.roster_ttl))
                    .arg(LOG_ENTRIES)
                    .invoke_async::<(u64, Vec<String>)>(&mut conn),
            )
            .await;
            match sent {
                Ok(Ok((sequence, mut live))) => {
                    live.sort();
                    return Ok(Sequenced {
                        sequence,
                        live,
                        published_at: Instant::now(),
                    });
                }
                Ok(Err(error)) => {
                    let retry = error.is_io_error() || error.is_connection_dropped();
                    *self.publisher.lock().await = None;
                    last = Some(StoreError::unavailable(error));
                    if !retry {
                        break;
                    }
                }
                Err(_) => {
                    *self.publisher.lock().await = None;
                    last = Some(StoreError::from_kind(StoreErrorKind::Timeout));
                    break;
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::from_kind(StoreErrorKind::Unavailable)))
    }
}

/// The keys of a channel's fleet state (one hash tag: one cluster slot): the sequence number, the
/// revocation log, the roster (instance → last beat, a sorted set) and each instance's start time
/// (instance → Unix seconds, a hash pruned with the roster).
struct Keys {
    seq: String,
    log: String,
    roster: String,
    started: String,
}

impl Keys {
    fn of(channel: &str) -> Self {
        Self {
            seq: format!("{{{channel}}}:seq"),
            log: format!("{{{channel}}}:log"),
            roster: format!("{{{channel}}}:roster"),
            started: format!("{{{channel}}}:started"),
        }
    }
}

/// Invalidations the log keeps (a subscriber further behind clears its cache when it comes back).
const LOG_ENTRIES: u64 = 10_000;

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// KEYS: seq, log, roster. ARGV: channel, invalidation JSON, roster lifetime (ms), log length.
/// Returns the sequence number and the live instances.
static PUBLISH: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, seq .. '|' .. ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
redis.call('PUBLISH', ARGV[1], string.sub(ARGV[2], 1, -2) .. ',"seq":' .. seq .. '}')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {seq, redis.call('ZRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[3]), '+inf')}
"#,
    )
});

/// KEYS: seq, roster, started. ARGV: fleet channel, heartbeat prefix, instance, its start time
/// (Unix seconds). Returns the head. Instances silent for 10 minutes leave the roster and the start
/// times.
static BEAT: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - 600000, 'LIMIT', 0, 100)
for _, instance in ipairs(gone) do
  redis.call('ZREM', KEYS[2], instance)
  redis.call('HDEL', KEYS[3], instance)
end
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
local head = redis.call('GET', KEYS[1]) or '0'
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ',"head":' .. head .. '}')
return tonumber(head)
"#,
    )
});

/// KEYS: seq, log. ARGV: after, most entries. Returns the head, the oldest sequence number kept,
/// and the entries after `after` (`<seq>|<payload>`).
static LOG_AFTER: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local oldest = tonumber(first[2] or '0')
local entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
return {head, oldest, entries}
"#,
    )
});

/// Why a subscription attempt or connection ended (for the logs; never contains a payload).
enum Lost {
    Redis(::redis::RedisError),
    TimedOut,
    Closed,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => fmt::Display::fmt(error, f),
            Self::TimedOut => f.write_str("timed out"),
            Self::Closed => f.write_str("connection closed"),
        }
    }
}

/// The Redis side of the shared subscription loop: `SUBSCRIBE` on a dedicated pub/sub connection
/// (the channel and its fleet channel), and a command connection of its own for heartbeats,
/// acknowledgements and log reads. The pub/sub connection is pinged every `ping_interval`; the
/// heartbeats coming back prove it delivers.
struct RedisBackend {
    client: ::redis::Client,
    channel: Arc<str>,
    fleet_channel: Arc<str>,
    keys: Keys,
    ping_interval: Duration,
}

/// A subscribed connection, its ping timer, and the command connection.
struct RedisConnection {
    sink: PubSubSink,
    messages: PubSubStream,
    ping: tokio::time::Interval,
    commands: MultiplexedConnection,
}

impl Backend for RedisBackend {
    type Connection = RedisConnection;
    type Error = Lost;

    async fn connect(&self) -> Result<RedisConnection, Lost> {
        let attempt = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&*self.channel).await?;
            pubsub.subscribe(&*self.fleet_channel).await?;
            let commands = self.client.get_multiplexed_async_connection().await?;
            Ok::<_, ::redis::RedisError>((pubsub, commands))
        };
        let (pubsub, commands) = match timeout(SUBSCRIBE_TIMEOUT, attempt).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => return Err(Lost::Redis(error)),
            Err(_) => return Err(Lost::TimedOut),
        };
        let (sink, messages) = pubsub.split();
        let first = Instant::now() + self.ping_interval;
        Ok(RedisConnection {
            sink,
            messages,
            ping: tokio::time::interval_at(first, self.ping_interval),
            commands,
        })
    }

    async fn receive(&self, connection: &mut RedisConnection) -> Result<Option<String>, Lost> {
        loop {
            let next = pin!(connection.messages.next());
            let tick = pin!(connection.ping.tick());
            match future::select(next, tick).await {
                Either::Left((Some(message), _)) => {
                    return Ok(message.get_payload::<String>().ok());
                }
                Either::Left((None, _)) => return Err(Lost::Closed),
                Either::Right(_) => {
                    // A ping answered late counts as a loss: degraded mode must start in time.
                    let patience = (self.ping_interval * 2).max(Duration::from_secs(1));
                    match timeout(patience, connection.sink.ping::<::redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(Lost::Redis(error)),
                        Err(_) => return Err(Lost::TimedOut),
                    }
                }
            }
        }
    }

    async fn beat(&self, connection: &mut RedisConnection, beat: &Beat<'_>) -> Result<(), Lost> {
        BEAT.key(&self.keys.seq)
            .key(&self.keys.roster)
            .key(&self.keys.started)
            .arg(&*self.fleet_channel)
            .arg(&beat.prefix)
            .arg(beat.instance)
            .arg(beat.started_at)
            .invoke_async::<u64>(&mut connection.commands)
            .await
            .map(|_| ())
            .map_err(Lost::Redis)
    }

    async fn ack(&self, connection: &mut RedisConnection, text: &str) -> Result<(), Lost> {
        ::redis::cmd("PUBLISH")
            .arg(&*self.fleet_channel)
            .arg(text)
            .query_async::<i64>(&mut connection.commands)
            .await
            .map(|_| ())
            .map_err(Lost::Redis)
    }

    async fn log_after(
        &self,
        connection: &mut RedisConnection,
        after: Option<u64>,
    ) -> Result<LogTail, Lost> {
        let (head, oldest, entries): (u64, u64, Vec<String>) = LOG_AFTER
            .key(&self.keys.seq)
            .key(&self.keys.log)
            .arg(after.unwrap_or(u64::MAX >> 11))
            .arg(LOG_ENTRIES)
            .invoke_async(&mut connection.commands)
            .await
            .map_err(Lost::Redis)?;
        let Some(after) = after else {
            return Ok(LogTail {
                head,
                entries: Vec::new(),
                complete: true,
            });
        };
        let entries: Vec<(u64, String)> = entries
            .into_iter()
            .filter_map(|entry| {
                let (seq, payload) = entry.split_once('|')?;
                Some((seq.parse().ok()?, payload.to_owned()))
            })
            .collect();
        let complete = head <= after || (oldest != 0 && oldest <= after + 1);
        Ok(LogTail {
            head,
            entries: if complete { entries } else { Vec::new() },
            complete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidate::{Invalidation, Invalidator};

    #[test]
    fn configuration() {
        let invalidator = RedisInvalidator::open("redis://127.0.0.1:1").unwrap();
        assert_eq!(invalidator.channel(), RedisInvalidator::DEFAULT_CHANNEL);
        let invalidator = invalidator
            .with_channel("a:b")
            .ping_interval(Duration::ZERO)
            .reconnect_backoff(Duration::ZERO, Duration::ZERO);
        assert_eq!(invalidator.channel(), "a:b");
        assert_eq!(invalidator.ping_interval, Duration::from_millis(10));
        assert!(RedisInvalidator::open("not a url").is_err());
        for _ in 0..100 {
            let d = Backoff::jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn publishing_to_a_closed_port_is_unavailable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let invalidator = RedisInvalidator::open(&format!("redis://127.0.0.1:{port}")).unwrap();
        let event = Invalidation {
            key_id: crate::key::KeyId::new("key_1"),
            digests: vec![],
        };
        let err = invalidator.publish(&event).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    }
}
