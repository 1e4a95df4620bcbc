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
                Some(Some(Message::Invalidate {
                    seq: Some(seq),
                    invalidation,
                })) => {
                    // The requests in flight under the keys end before the acknowledgement, and
                    // the receipt learns how many there were.
                    let ended = settle(self.resolver(), &invalidation).await;
                    self.fleet
                        .board
                        .record_ended(&self.fleet.instance, seq, ended);
                    self.invalidated(connection, seq, Some((seq, ended))).await
                }
                Some(Some(Message::Invalidate {
                    seq: None,
                    invalidation,
                })) => {
                    invalidation.apply(self.resolver());
                    Ok(())
                }
                Some(Some(Message::Format { seq })) => {
                    // Swapped (or, if the store cannot be read, refusing every key) before the
                    // acknowledgement.
                    reload_format(self.resolver()).await;
                    match seq {
                        Some(seq) => self.invalidated(connection, seq, None).await,
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
                Some(Some(Message::Ack {
                    instance,
                    seq,
                    ended,
                })) => {
                    if let Some((of, requests)) = ended
                        && instance != self.fleet.instance
                    {
                        self.fleet.board.record_ended(&instance, of, requests);
                    }
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

    /// A sequenced message was applied: fill a gap from the log, then acknowledge (with the
    /// requests in flight it ended, for an invalidation).
    async fn invalidated(
        &mut self,
        connection: &mut B::Connection,
        seq: u64,
        ended: Option<(u64, u64)>,
    ) -> Result<(), Ended<B::Error>> {
        if seq > self.applied.saturating_add(1) {
            self.catch_up(connection).await?;
        }
        self.applied = self.applied.max(seq);
        self.applied_now();
        let ack = Message::ack(&self.fleet.instance, self.applied, ended);
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
    let _listening = super::board::Listening::new(fleet.board.clone(), &fleet.instance);
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

/// Applies a sequenced invalidation here and ends the requests in flight under its keys (those
/// the store says ended) before it is acknowledged; returns how many requests were in flight under
/// them. The store is given half the freshness bound (the acknowledgement is awaited for one);
/// past it the judging goes on in the background, and the count is what was known by then.
async fn settle(resolver: &CachedResolver, invalidation: &super::Invalidation) -> u64 {
    let lives = invalidation.forget(resolver);
    if lives.is_empty() {
        // Nothing in flight under the keys here (the usual case): no store read.
        return 0;
    }
    let patience = (resolver.bound() / 2).max(Duration::from_millis(100));
    let judged = {
        let (resolver, lives) = (resolver.clone(), lives.clone());
        tokio::spawn(async move { resolver.settle(lives).await })
    };
    match tokio::time::timeout(patience, judged).await {
        Ok(Ok(ended)) => ended,
        _ => crate::life::in_flight_ended(&lives),
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
mod tests;
