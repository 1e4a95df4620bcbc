//! What a fleet said about an invalidation: the [`Receipt`] a revocation answers with, the response
//! headers that carry it, and its report in the logs and metrics.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

#[allow(unused_imports)] // used with `metrics`
use crate::metrics::{ACKNOWLEDGEMENT_SECONDS, LAGGARDS_TOTAL};

/// Response header of an acknowledged revocation (`DELETE /api-keys/{id}`, 204): how many of the
/// live instances acknowledged it before the answer.
pub const ACKNOWLEDGED_HEADER: &str = "revocation-acknowledged";
/// Response header: how many instances were live (in the roster) when it was published.
pub const INSTANCES_HEADER: &str = "revocation-instances";
/// Response header: milliseconds (three decimals) from publishing to the last acknowledgement, or
/// to the deadline when one was missing.
pub const ELAPSED_HEADER: &str = "revocation-elapsed-ms";
/// Response header: the sequence number of the (last) invalidation in the fleet's revocation log.
pub const SEQUENCE_HEADER: &str = "revocation-sequence";
/// Response header: how many requests in flight under the key and its subtree the change ended,
/// over every instance that reported (see [`Receipt::requests_ended`]).
pub const REQUESTS_ENDED_HEADER: &str = "revocation-requests-ended";

/// An invalidation as published: its sequence number, when, and the instances that were live then
/// (the ones a [`Receipt`] waits for).
#[derive(Clone, Debug)]
pub struct Sequenced {
    /// The sequence number the shared log gave it.
    pub sequence: u64,
    /// The roster when it was published: instances that had beaten within the roster's lifetime.
    pub live: Vec<String>,
    /// When it was published (this process's clock).
    pub published_at: Instant,
}

/// What a fleet said about an invalidation: how many of the instances live when it was published
/// have applied it, and which have not (the laggards), after how long.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Receipt {
    /// The highest sequence number waited for (`None`: the invalidator does not sequence, or
    /// publishing failed).
    pub sequence: Option<u64>,
    /// Instances live when it was published.
    pub instances: usize,
    /// Of those, how many acknowledged it by the deadline.
    pub acknowledged: usize,
    /// The instances that had not (their ids, sorted).
    pub laggards: Vec<String>,
    /// From publishing to the last acknowledgement, or to the deadline if one was missing.
    pub elapsed: Duration,
    /// Requests in flight under the key and its subtree that the change ended, per instance (its
    /// id): the revoking instance's, ended before the change was broadcast, and each acknowledging
    /// instance's, ended before it acknowledged. An instance that had none reports 0; one that
    /// did not acknowledge is absent (its requests end within the freshness bound all the same).
    ///
    /// "Ended" is what [`LiveBody`](crate::layer::LiveBody) does to a request in flight when its
    /// key ends: no further request-body frame reaches the handler (the answer is 401
    /// `AUTH_EXPIRED_API_KEY`) and a streaming response stops at its next frame. A handler that
    /// had its whole request before the end still finishes its work and sends an answer it holds
    /// whole; [`Principal::ended`](crate::principal::Principal::ended) lets a long one stop.
    pub requests_ended: BTreeMap<String, u64>,
}

impl Receipt {
    /// [`requests_ended`](Self::requests_ended) summed over the instances.
    pub fn requests_ended_total(&self) -> u64 {
        self.requests_ended.values().sum()
    }

    /// Adds `requests` ended on `instance`.
    pub(crate) fn count_ended(&mut self, instance: &str, requests: u64) {
        *self.requests_ended.entry(instance.to_owned()).or_default() += requests;
    }

    /// Every live instance acknowledged (and there was a sequenced publication, and a roster: an
    /// empty one, before any instance has beaten, vouches for nobody).
    pub fn is_complete(&self) -> bool {
        self.sequence.is_some() && self.instances > 0 && self.laggards.is_empty()
    }

    /// The response headers that report it: see [`ACKNOWLEDGED_HEADER`], [`INSTANCES_HEADER`],
    /// [`ELAPSED_HEADER`], [`SEQUENCE_HEADER`] (none of those when nothing was sequenced), and
    /// [`REQUESTS_ENDED_HEADER`] (whenever some instance reported).
    pub fn headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let mut headers = Vec::with_capacity(5);
        if let Some(sequence) = self.sequence {
            let elapsed = format!("{:.3}", self.elapsed.as_secs_f64() * 1000.0);
            headers.extend([
                (ACKNOWLEDGED_HEADER, self.acknowledged.to_string()),
                (INSTANCES_HEADER, self.instances.to_string()),
                (ELAPSED_HEADER, elapsed),
                (SEQUENCE_HEADER, sequence.to_string()),
            ]);
        }
        if !self.requests_ended.is_empty() {
            headers.push((
                REQUESTS_ENDED_HEADER,
                self.requests_ended_total().to_string(),
            ));
        }
        headers
            .into_iter()
            .filter_map(|(name, value)| {
                Some((
                    http::HeaderName::from_static(name),
                    http::HeaderValue::try_from(value).ok()?,
                ))
            })
            .collect()
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acknowledged by {} of {} instances in {:?}",
            self.acknowledged, self.instances, self.elapsed
        )?;
        if !self.requests_ended.is_empty() {
            f.write_str("; requests in flight ended:")?;
            for (i, (instance, requests)) in self.requests_ended.iter().enumerate() {
                let sep = if i == 0 { " " } else { ", " };
                write!(f, "{sep}{instance} {requests}")?;
            }
        }
        Ok(())
    }
}

/// Records the metrics of a finished receipt and logs its laggards.
pub(crate) fn report(receipt: &Receipt) {
    if receipt.is_complete() {
        #[cfg(feature = "metrics")]
        ::metrics::histogram!(ACKNOWLEDGEMENT_SECONDS).record(receipt.elapsed.as_secs_f64());
        tracing::debug!(sequence = receipt.sequence, %receipt, "API key invalidation acknowledged by every live instance");
    } else if receipt.sequence.is_some() {
        for laggard in &receipt.laggards {
            #[cfg(feature = "metrics")]
            ::metrics::counter!(LAGGARDS_TOTAL, "instance" => laggard.clone()).increment(1);
            tracing::warn!(
                sequence = receipt.sequence,
                instance = %laggard,
                "API key invalidation not acknowledged by this instance before the deadline; it stops \
                 vouching for its cache within the freshness bound"
            );
        }
    }
}
