//! [`Deliverer`]: takes due deliveries from the outbox, signs and sends them, and records each
//! attempt.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use time::OffsetDateTime;

use super::store::WebhookStore;
use super::types::{AttemptOutcome, Claimed, DeliveryStatus};
use super::url::UrlPolicy;
use crate::store::StoreError;

/// Default first retry delay; each further one doubles.
pub const DEFAULT_FIRST_RETRY: Duration = Duration::from_secs(5);
/// Default longest retry delay.
pub const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(3600);
/// Default retry horizon: a delivery not done this long after its event is given up.
pub const DEFAULT_RETRY_HORIZON: Duration = Duration::from_secs(3 * 86_400);

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Deliveries this deliverer claimed.
    pub claimed: usize,
    /// Answered 2xx.
    pub delivered: usize,
    /// Failed and scheduled again.
    pub retrying: usize,
    /// Failed for good (past the retry horizon).
    pub failed: usize,
}

/// Delivers the outbox of a [`WebhookStore`]: at least once, with exponential backoff up to a
/// retry horizon, one deliverer per delivery at a time (claimed with a lease), surviving restarts
/// (the outbox is the store's). Any number of instances may run one on the same store.
///
/// Each attempt resolves the endpoint's host, checks every address against the [`UrlPolicy`]
/// and connects to the address it checked; sends `POST` with the Standard Webhooks headers
/// (`webhook-id`: the message id, the same on every attempt; `webhook-timestamp`: the attempt's
/// Unix time; `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` keyed
/// with the endpoint's current secret); and counts any 2xx as delivered. Redirects are not
/// followed.
#[derive(Clone)]
pub struct Deliverer {
    store: Arc<dyn WebhookStore>,
    urls: UrlPolicy,
    first_retry: Duration,
    max_retry: Duration,
    horizon: Duration,
    timeout: Duration,
    lease: Duration,
    batch: u32,
    token: Arc<str>,
}

impl fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliverer")
            .field("urls", &self.urls)
            .field("first_retry", &self.first_retry)
            .field("horizon", &self.horizon)
            .finish_non_exhaustive()
    }
}

impl Deliverer {
    /// A deliverer over `store` with the strict [`UrlPolicy`], retries from
    /// [`DEFAULT_FIRST_RETRY`] doubling up to [`DEFAULT_MAX_RETRY`] within
    /// [`DEFAULT_RETRY_HORIZON`], a 10 s timeout per attempt, and batches of 32.
    pub fn new(store: Arc<dyn WebhookStore>) -> Self {
        Self {
            store,
            urls: UrlPolicy::default(),
            first_retry: DEFAULT_FIRST_RETRY,
            max_retry: DEFAULT_MAX_RETRY,
            horizon: DEFAULT_RETRY_HORIZON,
            timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            batch: 32,
            token: super::types::new_id("dlv_").into(),
        }
    }

    /// Which URLs may be called (checked again at each attempt).
    #[must_use]
    pub fn urls(mut self, urls: UrlPolicy) -> Self {
        self.urls = urls;
        self
    }

    /// Retry delays: `first` after the first failure, doubling after each further one, never more
    /// than `max`.
    #[must_use]
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_retry = first;
        self.max_retry = max.max(first);
        self
    }

    /// How long after its event a delivery is still tried; past it, it is `failed`.
    #[must_use]
    pub fn retry_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// The limit of one attempt (resolving, connecting, sending, the answer's head). The lease
    /// on a claimed delivery is at least six times this long.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.lease = self.lease.max(timeout * 6);
        self
    }

    /// How many deliveries one pass claims at most.
    #[must_use]
    pub fn batch(mut self, batch: u32) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The delay after the `attempts`-th failed attempt.
    fn delay(&self, attempts: u32) -> Duration {
        backoff(self.first_retry, self.max_retry, attempts)
    }

    /// One pass with the wall clock: every due delivery it can claim, attempted once.
    pub async fn deliver_due(&self) -> Result<DeliveryReport, StoreError> {
        self.deliver_due_at(OffsetDateTime::now_utc()).await
    }

    /// One pass as of `now` (tests drive the clock; the signature's timestamp is `now` too).
    pub async fn deliver_due_at(&self, now: OffsetDateTime) -> Result<DeliveryReport, StoreError> {
        let lease_until = now + self.lease;
        let claimed = self
            .store
            .claim(now, lease_until, &self.token, self.batch)
            .await?;
        let mut report = DeliveryReport {
            claimed: claimed.len(),
            ..DeliveryReport::default()
        };
        let attempts = claimed.iter().map(|c| self.attempt(c, now));
        for (claimed, outcome) in claimed
            .iter()
            .zip(futures_util::future::join_all(attempts).await)
        {
            match outcome.status {
                DeliveryStatus::Delivered => report.delivered += 1,
                DeliveryStatus::Pending => report.retrying += 1,
                DeliveryStatus::Failed => report.failed += 1,
            }
            self.store
                .finish(&claimed.id, &self.token, &outcome)
                .await?;
        }
        Ok(report)
    }

    /// Passes every `interval` with the wall clock (immediately again after a full batch), until
    /// the returned task is aborted. Failures are logged and retried at the next tick.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.deliver_due().await {
                    Ok(report) if report.claimed == self.batch as usize => continue,
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "webhook delivery pass failed"),
                }
                tokio::time::sleep(interval).await;
            }
        })
    }

    async fn attempt(&self, claimed: &Claimed, now: OffsetDateTime) -> AttemptOutcome {
        if claimed.registrar_ended {
            // What a key obtained ends with it: its endpoint gets nothing more, queued or not.
            return AttemptOutcome {
                status: DeliveryStatus::Failed,
                http_status: None,
                error: Some("the key that registered the endpoint is no longer active".into()),
                at: now,
                next_attempt_at: None,
            };
        }
        let result = tokio::time::timeout(self.timeout, self.send(claimed, now))
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        let (http_status, error) = match result {
            Ok(status) if (200..300).contains(&status) => {
                tracing::debug!(webhook_id = %claimed.webhook_id, message_id = %claimed.id, status, "webhook delivered");
                return AttemptOutcome {
                    status: DeliveryStatus::Delivered,
                    http_status: Some(status),
                    error: None,
                    at: now,
                    next_attempt_at: None,
                };
            }
            Ok(status) => (Some(status), format!("the endpoint answered {status}")),
            Err(error) => (None, error),
        };
        let attempts = claimed.attempts.saturating_add(1);
        let next = now + self.delay(attempts);
        let give_up = next > claimed.created_at + self.horizon;
        tracing::info!(webhook_id = %claimed.webhook_id, message_id = %claimed.id, attempts, %error, give_up, "webhook delivery failed");
        AttemptOutcome {
            status: if give_up {
                DeliveryStatus::Failed
            } else {
                DeliveryStatus::Pending
            },
            http_status,
            error: Some(error),
            at: now,
            next_attempt_at: (!give_up).then_some(next),
        }
    }

    /// Sends one attempt; the answer's status, or why there was none (never a secret).
    async fn send(&self, claimed: &Claimed, now: OffsetDateTime) -> Result<u16, String> {
        let dest = self.urls.resolve(&claimed.url).await.map_err(|e| match e {
            crate::error::AuthError::WebhookUrlRefused(reason) => format!("refused: {reason}"),
            other => other.to_string(),
        })?;
        let timestamp = now.unix_timestamp();
        let body = Bytes::from(claimed.payload.clone());
        let signature = claimed.secret.sign(&claimed.id, timestamp, &body);
        let request = Request::post(dest.path_and_query.as_str())
            .header(header::HOST, dest.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "tower-api-keys-webhooks")
            .header("webhook-id", claimed.id.as_str())
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(body))
            .map_err(|_| "bad request".to_owned())?;
        if dest.https {
            let tls = crate::https::connect(&dest.host, dest.addr).await?;
            status(crate::https::send(tls, request).await)
        } else {
            let tcp = tokio::net::TcpStream::connect(dest.addr)
                .await
                .map_err(|e| format!("connect: {}", e.kind()))?;
            status(crate::https::send(tcp, request).await)
        }
    }
}

/// The status of an answer, or why there was none.
fn status(answer: Result<http::Response<hyper::body::Incoming>, String>) -> Result<u16, String> {
    answer.map(|response| response.status().as_u16())
}

/// Exponential backoff: `first` after the first failed attempt, doubling each time, at most `max`.
fn backoff(first: Duration, max: Duration, attempts: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first.checked_mul(factor).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let delays: Vec<u64> = (1..=6).map(|a| backoff(first, max, a).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(first, max, 200).as_secs(), 60);
    }
}
