//! The hygiene [`Sweeper`]: one per fleet, it warns before keys expire (`key.expiring`, once per
//! warning window) and about keys nobody used for a long time (`key.idle`, once per idle spell),
//! and can revoke idle keys.
//!
//! **Once, fleet-wide.** Each notice is remembered in the key store with an insert-if-absent write
//! ([`KeyStore::record_notice_with`], which writes its `key.expiring` or `key.idle` audit event,
//! and so its webhooks, in the same transaction) before it is emitted, so two sweepers never emit
//! the same one,
//! whatever happens; a [`Leadership`] (a PostgreSQL advisory lock, a Redis lock, or [`Lone`] for
//! a single instance) spares the other instances the work. A notice is recorded, then emitted: a
//! crash between the two loses that one notice rather than repeating it.
//!
//! **Which window.** A key is warned about the tightest window it is in (a key created with six
//! days left gets the 7-day warning, not the 30-day one too). A key whose expiry changes is warned
//! again (the expiry is part of the notice); a key used again and then idle again, likewise.
//!
//! **Time** is the caller's: [`Sweeper::sweep_at`] takes `now` (tests drive a clock);
//! [`Sweeper::spawn`] sweeps at an interval with the wall clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::audit::{Actor, EventDraft, EventType, Journal, Origin};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::manage::{KeyManager, RevokeReason};
use crate::principal::Principal;
use crate::store::{KeyRecord, KeyStore, StoreError, SweepQuery};

/// Default warning windows before expiry: 30, 7 and 1 days.
pub const DEFAULT_WINDOWS: [Duration; 3] = [
    Duration::from_secs(30 * 86_400),
    Duration::from_secs(7 * 86_400),
    Duration::from_secs(86_400),
];
/// Default idle time: a key unused for 90 days is idle.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(90 * 86_400);
/// Keys read per store query.
const PAGE: u32 = 500;

/// What the sweeper looks for and does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HygienePolicy {
    /// Warning windows before expiry, tightest first.
    windows: Vec<Duration>,
    idle_after: Duration,
    revoke_idle: bool,
}

impl Default for HygienePolicy {
    /// Windows of 30, 7 and 1 days; idle after 90 days; idle keys are not revoked.
    fn default() -> Self {
        Self {
            windows: sorted(DEFAULT_WINDOWS.to_vec()),
            idle_after: DEFAULT_IDLE_AFTER,
            revoke_idle: false,
        }
    }
}

fn sorted(mut windows: Vec<Duration>) -> Vec<Duration> {
    windows.retain(|w| !w.is_zero());
    windows.sort_unstable();
    windows.dedup();
    windows
}

impl HygienePolicy {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// The warning windows before expiry (zero-length windows are ignored; none: no expiry
    /// warnings).
    #[must_use]
    pub fn windows(mut self, windows: impl IntoIterator<Item = Duration>) -> Self {
        self.windows = sorted(windows.into_iter().collect());
        self
    }

    /// How long a key may go unused before it is idle.
    #[must_use]
    pub fn idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = idle;
        self
    }

    /// Also revoke idle keys (with their descendants, reason `idle`). Off by default.
    #[must_use]
    pub fn revoke_idle(mut self, revoke: bool) -> Self {
        self.revoke_idle = revoke;
        self
    }

    /// The tightest window `remaining` falls in.
    fn window_for(&self, remaining: Duration) -> Option<Duration> {
        self.windows.iter().copied().find(|w| remaining <= *w)
    }
}

/// What the sweeper found about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HygieneKind {
    /// `key.expiring`: the key expires within `window`.
    Expiring {
        /// The warning window it entered.
        window: Duration,
    },
    /// `key.idle`: the key was not used for the policy's idle time.
    Idle {
        /// Whether the sweeper revoked it.
        revoked: bool,
    },
}

/// One notice about one key. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HygieneEvent {
    /// What was found.
    pub kind: HygieneKind,
    /// The key.
    pub key_id: KeyId,
    /// Its owner.
    pub owner: String,
    /// Its account.
    pub account: String,
    /// Its name.
    pub name: String,
    /// When it expires.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was last used (never: `None`).
    pub last_used_at: Option<OffsetDateTime>,
    /// When the sweep saw it.
    pub at: OffsetDateTime,
}

impl HygieneEvent {
    /// `key.expiring` or `key.idle`.
    pub fn event_type(&self) -> &'static str {
        match self.kind {
            HygieneKind::Expiring { .. } => "key.expiring",
            HygieneKind::Idle { .. } => "key.idle",
        }
    }

    fn of(record: &KeyRecord, kind: HygieneKind, at: OffsetDateTime) -> Self {
        Self {
            kind,
            key_id: record.id.clone(),
            owner: record.owner.clone(),
            account: record.account.clone(),
            name: record.name.clone(),
            expires_at: record.expires_at,
            last_used_at: record.last_used_at,
            at,
        }
    }
}

/// The audit event of a notice, written with it (and so its webhooks): by the master key, on
/// behalf of the system, when it is written; `as_of` is the sweep's `now`.
fn notice_event(record: &KeyRecord, event_type: EventType, now: OffsetDateTime) -> EventDraft {
    EventDraft::new(
        event_type,
        Actor::master(),
        &Origin::default(),
        &record.owner,
    )
    .about(record)
    .detail("as_of", crate::audit::timestamp(Some(now)))
}

/// Whether this instance sweeps now: one leader per fleet.
#[async_trait::async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Whether this instance leads (taking or keeping the lead when it can). Asked before every
    /// sweep.
    async fn lead(&self) -> Result<bool, StoreError>;
}

/// A lone instance: always its own leader.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lone;

#[async_trait::async_trait]
impl Leadership for Lone {
    async fn lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether this instance led (a follower does nothing).
    pub led: bool,
    /// Keys looked at.
    pub examined: usize,
    /// Notices emitted (each once, fleet-wide).
    pub emitted: usize,
    /// Idle keys revoked.
    pub revoked: usize,
}

type Sink = Arc<dyn Fn(&HygieneEvent) + Send + Sync>;

/// The hygiene sweeper. Cheap to clone.
#[derive(Clone)]
pub struct Sweeper {
    store: Arc<dyn KeyStore>,
    manager: KeyManager,
    policy: HygienePolicy,
    leadership: Arc<dyn Leadership>,
    sink: Sink,
}

impl fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sweeper")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Sweeper {
    /// A sweeper over `manager`'s store, a [`Lone`] leader, the default policy, and events written
    /// to the log only.
    pub fn new(manager: KeyManager) -> Self {
        Self {
            store: manager.resolver().store().clone(),
            manager,
            policy: HygienePolicy::default(),
            leadership: Arc::new(Lone),
            sink: Arc::new(|_| {}),
        }
    }

    /// The policy.
    #[must_use]
    pub fn policy(mut self, policy: HygienePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How this instance learns whether it leads the fleet.
    #[must_use]
    pub fn leadership(mut self, leadership: impl Leadership) -> Self {
        self.leadership = Arc::new(leadership);
        self
    }

    /// Where events go (besides the log): called once per notice, fleet-wide.
    #[must_use]
    pub fn on_event(mut self, sink: impl Fn(&HygieneEvent) + Send + Sync + 'static) -> Self {
        self.sink = Arc::new(sink);
        self
    }

    /// Sweeps every `interval` with the wall clock, until the returned task is aborted. Failures
    /// are logged and retried at the next tick.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = self.sweep_at(OffsetDateTime::now_utc()).await {
                    tracing::warn!(%error, "the hygiene sweep failed; retrying at the next tick");
                }
            }
        })
    }

    /// One sweep as of `now`, if this instance leads.
    pub async fn sweep_at(&self, now: OffsetDateTime) -> Result<SweepReport, AuthError> {
        let mut report = SweepReport::default();
        if !self.leadership.lead().await? {
            return Ok(report);
        }
        report.led = true;
        let widest = self.policy.windows.last().copied().unwrap_or_default();
        let mut query = SweepQuery {
            now,
            expiring_before: now + widest,
            idle_before: now - self.policy.idle_after,
            after: None,
            limit: PAGE,
        };
        loop {
            let page = self.store.sweep(&query).await?;
            for record in &page {
                report.examined += 1;
                self.expiring(record, now, &mut report).await?;
                self.idle(record, &query, &mut report).await?;
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => query.after = Some(last.id.clone()),
                _ => return Ok(report),
            }
        }
    }

    async fn expiring(
        &self,
        record: &KeyRecord,
        now: OffsetDateTime,
        report: &mut SweepReport,
    ) -> Result<(), AuthError> {
        let Some(expires_at) = record.expires_at else {
            return Ok(());
        };
        let Ok(remaining) = Duration::try_from(expires_at - now) else {
            return Ok(()); // already expired
        };
        let Some(window) = self.policy.window_for(remaining) else {
            return Ok(());
        };
        let notice = format!(
            "expiring:{}:{}",
            window.as_secs(),
            expires_at.unix_timestamp()
        );
        let journal = notice_event(record, EventType::KEY_EXPIRING, now)
            .detail("window_seconds", window.as_secs())
            .detail("expires_at", crate::audit::timestamp(Some(expires_at)));
        if self
            .store
            .record_notice_with(&record.id, &notice, now, &Journal::of(journal))
            .await?
        {
            self.emit(HygieneEvent::of(
                record,
                HygieneKind::Expiring { window },
                now,
            ));
            report.emitted += 1;
        }
        Ok(())
    }

    async fn idle(
        &self,
        record: &KeyRecord,
        query: &SweepQuery,
        report: &mut SweepReport,
    ) -> Result<(), AuthError> {
        let last = record.last_used_at.unwrap_or(record.created_at);
        if last > query.idle_before {
            return Ok(());
        }
        let notice = format!("idle:{}", last.unix_timestamp());
        let journal = notice_event(record, EventType::KEY_IDLE, query.now)
            .detail("last_used_at", crate::audit::timestamp(record.last_used_at))
            .detail("revoke", self.policy.revoke_idle);
        if !self
            .store
            .record_notice_with(&record.id, &notice, query.now, &Journal::of(journal))
            .await?
        {
            return Ok(());
        }
        let revoked = self.policy.revoke_idle && {
            self.manager
                .revoke_because(
                    &Principal::master(),
                    &record.id,
                    Some(&record.owner),
                    Some(RevokeReason::Idle.as_str()),
                )
                .await?;
            true
        };
        report.revoked += usize::from(revoked);
        self.emit(HygieneEvent::of(
            record,
            HygieneKind::Idle { revoked },
            query.now,
        ));
        report.emitted += 1;
        Ok(())
    }

    fn emit(&self, event: HygieneEvent) {
        tracing::info!(
            event = event.event_type(),
            api_key_id = %event.key_id,
            owner = %event.owner,
            expires_at = ?event.expires_at,
            last_used_at = ?event.last_used_at,
            "API key hygiene"
        );
        (self.sink)(&event);
    }
}
