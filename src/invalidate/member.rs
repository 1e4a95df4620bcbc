//! One member of the fleet: the subscriber task behind a [`Subscription`](super::Subscription).
//! Connect, catch up from the revocation log, apply and acknowledge invalidations, beat, vouch for
//! the resolver's cache while its own heartbeats come back; on any loss, reconnect with backoff.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::fleet::{FleetParams, Message};
use super::subscription::{Backend, Backoff, Beat, Subscription, SubscriptionStatus};
use crate::clock::now_unix_nanos;
use crate::resolver::CachedResolver;

/// Starts the subscriber task for `backend` on the current tokio runtime; the resolver is degraded
/// until it is connected.
pub(crate) fn spawn<B: Backend>(
    backend: B,
    channel: Arc<str>,
    resolver: CachedResolver,
    backoff: Backoff,
    fleet: FleetParams,
) -> Subscription {
    let (status, watcher) = watch::channel(SubscriptionStatus::default());
    let health = Health::new(resolver);
    let task = tokio::spawn(run(backend, channel, health, backoff, status, fleet));
    Subscription::new(task, watcher)
}

/// The resolver's view of one subscription: degraded while down. Dropped with the task (shutdown,
/// abort), it gives the degraded mark back and leaves the fleet.
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

    /// A connection is up and has caught up (or cleared the cache): degraded mode ends, and the
    /// fleet vouches for the cache for one bound from now.
    fn up(&mut self) {
        if self.down {
            self.resolver.join_fleet(now_unix_nanos());
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
        self.resolver.leave_fleet();
    }
}

/// Why a connection was given up.
enum Ended<E> {
    Backend(E),
    /// A call to the backend did not answer in time.
    TimedOut,
    /// This instance's own heartbeats stopped coming back.
    Silent,
}

impl<E: fmt::Display> fmt::Display for Ended<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backend(error) => fmt::Display::fmt(error, f),
            Self::TimedOut => f.write_str("the broadcaster did not answer in time"),
            Self::Silent => f.write_str("this instance's heartbeats stopped coming back"),
        }
    }
}

/// A subscription's fleet state across connections.
struct Local<'a, B: Backend> {
    backend: &'a B,
    health: &'a mut Health,
    fleet: &'a FleetParams,
    channel: &'a str,
    /// Everything up to this sequence number has been applied.
    applied: u64,
    /// Whether a connection was up before (then `applied` is known).
    caught_up_before: bool,
    started_at: i64,
    /// How long a call to the backend may take.
    patience: Duration,
}

impl<B: Backend> Local<'_, B> {
    fn resolver(&self) -> &CachedResolver {
        &self.health.resolver
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, B::Error>>,
    ) -> Result<T, Ended<B::Error>> {
        match tokio::time::timeout(self.patience, call).await {
            Ok(result) => result.map_err(Ended::Backend),
            Err(_) => Err(Ended::TimedOut),
        }
    }

    /// Applies what the log holds after `applied` (clears the cache if it no longer reaches back),
    /// up to at least `head`.
    async fn catch_up(&mut self, connection: &mut B::Connection) -> Result<(), Ended<B::Error>> {
        let tail = self
            .call(self.backend.log_after(connection, Some(self.applied)))
            .await?;
        if tail.head < self.applied {
            // The log was reset (its tables recreated): start again from its head.
            self.resolver().invalidate_all();
            self.applied = tail.head;
            reload_format(self.resolver()).await;
            return Ok(());
        }
        if tail.complete {
            let mut format = false;
            for (_, text) in &tail.entries {
                format |= apply(Message::parse(text), self.resolver(), self.channel);
            }
            if format {
                reload_format(self.resolver()).await;
            }
            if !tail.entries.is_empty() {
                tracing::info!(
                    channel = self.channel,
                    from = self.applied,
                    to = tail.head,
                    "API key invalidation subscriber caught up from the revocation log"
                );
            }
        } else {
            self.resolver().invalidate_all();
            tracing::warn!(
                channel = self.channel,
                applied = self.applied,
                "the revocation log no longer reaches back to the last applied invalidation; cleared the key cache"
            );
            reload_format(self.resolver()).await;
        }
        self.applied = self.applied.max(tail.head);
        Ok(())
    }

    fn applied_now(&self) {
        self.fleet.board.record(&self.fleet.instance, self.applied);
        #[cfg(feature = "metrics")]
        ::metrics::gauge!(crate::metrics::APPLIED_SEQUENCE, "instance" => self.fleet.instance.clone())
            .set(self.applied as f64);
    }

    async fn beat(&self, connection: &mut B::Connection) -> Result<(), Ended<B::Error>> {
        let beat = Beat {
            instance: &self.fleet.instance,
            started_at: self.started_at,
            prefix: Message::beat_prefix(
                &self.fleet.instance,
                self.fleet.token,
                now_unix_nanos(),
                self.applied,
            ),
            applied: self.applied,
        };
        self.call(self.backend.beat(connection, &beat)).await
    }

    /// The first connection starts from the log's head with an empty cache and the key format
    /// read again (a change may have come before it); a later one catches up from the log.
    async fn start(&mut self, connection: &mut B::Connection) -> Result<(), Ended<B::Error>> {
        if self.caught_up_before {
            self.catch_up(connection).await?;
        } else {
            let tail = self.call(self.backend.log_after(connection, None)).await?;
            self.resolver().invalidate_all();
            reload_format(self.resolver()).await;
            self.applied = tail.head;
            self.caught_up_before = true;
        }
        Ok(())
    }

    /// Serves one connection until it is lost.
    async fn serve(&mut self, connection: &mut B::Connection) -> Ended<B::Error> {
        let bound = self.resolver().bound();
        // Own heartbeats not heard back for this long: the connection is given up.
        let silent_after = (bound * 2)
            .max(self.fleet.heartbeat * 4)
            .max(Duration::from_secs(2));
        let mut last_heard = Instant::now();
        let mut ticks = tokio::time::interval(self.fleet.heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                received = self.backend.receive(connection) => match received {
                    Ok(message) => message,
                    Err(error) => return Ended::Backend(error),
                },
                _ = ticks.tick() => {
                    if last_heard.elapsed() > silent_after {
                        return Ended::Silent;
                    }
                    if let Err(ended) = self.beat(connection).await {
                        return ended;
                    }
                    let (_live, _oldest) = self.fleet.board.survey(self.fleet.roster_ttl);
                    #[cfg(feature = "metrics")]
                    {
                        ::metrics::gauge!(crate::metrics::FLEET_INSTANCES).set(_live as f64);
                        ::metrics::gauge!(crate::metrics::OLDEST_UNACKNOWLEDGED_SECONDS)
                            .set(_oldest.as_secs_f64());
                    }
                    continue;
                }
            };
            let handled = match message.as_deref().map(Message::parse) {
                Some(Some(Message::Invalidate { seq, invalidation })) => {
                    invalidation.apply(self.resolver());
                    match seq {
                        Some(seq) => self.invalidated(connection, seq).await,
                        None => Ok(()),
                    }
                }
                Some(Some(Message::Format { seq })) => {
                    // Swapped (or, if the store cannot be read, refusing every key) before the
                    // acknowledgement.
                    reload_format(self.resolver()).await;
                    match seq {
                        Some(seq) => self.invalidated(connection, seq).await,
                        None => Ok(()),
                    }
                }
                Some(Some(Message::Beat {
                    instance,
                    token,
                    at,
                    head,
                    applied,
                })) => {
                    let own = instance == self.fleet.instance;
                    if own && token != self.fleet.token {
                        static SHARED_NAME: crate::throttle::Throttle =
                            crate::throttle::Throttle::new();
                        if SHARED_NAME.admit().is_some() {
                            tracing::warn!(
                                channel = self.channel,
                                instance,
                                "another instance of the fleet uses this instance's name: \
                                 acknowledgements cannot tell them apart; give each its own"
                            );
                        }
                    }
                    self.fleet.board.record(&instance, applied);
                    let mut caught_up = Ok(());
                    if head > self.applied {
                        caught_up = self.catch_up(connection).await;
                        self.applied_now();
                    }
                    if caught_up.is_ok() && own && token == self.fleet.token {
                        // Everything published before this beat was sent has been applied. (Its
                        // sending time is our own clock's; never later than now.)
                        last_heard = Instant::now();
                        let sent = at.min(now_unix_nanos());
                        self.resolver()
                            .vouch_until(sent.saturating_add(saturating_nanos(bound)));
                    }
                    caught_up
                }
                Some(Some(Message::Ack { instance, seq })) => {
                    self.fleet.board.record(&instance, seq);
                    Ok(())
                }
                Some(None) | None => {
                    apply(None, self.resolver(), self.channel);
                    reload_format(self.resolver()).await;
                    Ok(())
                }
            };
            if let Err(ended) = handled {
                return ended;
            }
        }
    }

    /// A sequenced invalidation was applied: fill a gap from the log, then acknowledge.
    async fn invalidated(
        &mut self,
        connection: &mut B::Connection,
        seq: u64,
    ) -> Result<(), Ended<B::Error>> {
        if seq > self.applied.saturating_add(1) {
            self.catch_up(connection).await?;
        }
        self.applied = self.applied.max(seq);
        self.applied_now();
        let ack = Message::ack(&self.fleet.instance, self.applied);
        self.call(self.backend.ack(connection, &ack)).await
    }
}

/// How long connecting, subscribing and catching up may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The subscriber task: connect, catch up, apply and acknowledge, beat; on any loss reconnect (with
/// backoff) and catch up from the log.
async fn run<B: Backend>(
    backend: B,
    channel: Arc<str>,
    mut health: Health,
    backoff: Backoff,
    status: watch::Sender<SubscriptionStatus>,
    fleet: FleetParams,
) {
    let channel = &*channel;
    let patience = health.resolver.bound().max(Duration::from_millis(500));
    let _listening = super::fleet::Listening::new(fleet.board.clone());
    let mut local = Local {
        backend: &backend,
        health: &mut health,
        fleet: &fleet,
        channel,
        applied: 0,
        caught_up_before: false,
        started_at: now_unix_nanos() / 1_000_000_000,
        patience,
    };
    let mut delay = backoff.initial;
    // Failed attempts since the last connection: the first is logged at `warn`, the rest at `debug`.
    let mut failures = 0u64;
    let mut connections = 0u64;
    loop {
        // Connecting, subscribing and catching up, within a bound of their own: a connection
        // that stops forwarding half-way must not hold the loop.
        let attempt = async {
            match local.backend.connect().await {
                Ok(mut connection) => match local.start(&mut connection).await {
                    Ok(()) => Ok(connection),
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            }
        };
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err("connecting took too long".to_owned()));
        let mut connection = match connected {
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
        local.health.up();
        local.applied_now();
        connections += 1;
        if connections > 1 || failures > 0 {
            tracing::info!(
                channel,
                applied = local.applied,
                "API key invalidation subscriber connected after a failure and caught up"
            );
        }
        failures = 0;
        status.send_modify(|s| {
            s.connected = true;
            s.connections += 1;
        });
        let connected_at = Instant::now();
        let lost = local.serve(&mut connection).await;
        drop(connection);
        local.health.down();
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

/// Applies one entry of the revocation log (or an unreadable message); `true` when the key format
/// must be read again (a format change, or something unreadable that may have been one).
fn apply(message: Option<Message>, resolver: &CachedResolver, channel: &str) -> bool {
    match message {
        Some(Message::Invalidate { invalidation, .. }) => {
            invalidation.apply(resolver);
            false
        }
        Some(Message::Format { .. }) => true,
        _ => {
            // Unreadable (another version, another user of the channel): be safe, forget everything.
            resolver.invalidate_all();
            tracing::warn!(
                channel,
                "unreadable API key invalidation message; cleared the key cache"
            );
            true
        }
    }
}

/// Reads the key format again ([`CachedResolver::reload_format`]: it logs a failure, and then
/// refuses every key until a reload succeeds).
async fn reload_format(resolver: &CachedResolver) {
    if let Err(error) = resolver.reload_format().await {
        tracing::debug!(%error, "reloading the API key format failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidate::subscription::LogTail;
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
}
