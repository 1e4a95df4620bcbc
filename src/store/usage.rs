//! Per-key usage counts by hour and outcome: what the recorder flushes and the stores keep. Public
//! as `usage::UsageBucket` and so on; defined here, below the recorder, because the stores keep them.

use std::net::IpAddr;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{AuthError, ErrorCode};
use crate::key::KeyId;

/// How a request made with a key ended, as usage counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Admitted (the handler ran).
    Admitted,
    /// Refused: the key did not authenticate (a rotated-out secret, a key the store no longer
    /// knows after it was cached).
    Invalid,
    /// Refused: the key was expired or revoked (also when it ended while the request ran).
    ExpiredOrRevoked,
    /// Refused: the key lacks a scope the route requires.
    MissingScope,
    /// Refused: over the key's rate limit.
    RateLimited,
    /// Refused: out of credits.
    OutOfCredits,
    /// Refused: the request came from outside the key's allowed networks.
    Network,
}

/// How many [`Outcome`]s there are: the length of [`UsageBucket::counts`].
pub const OUTCOMES: usize = 7;

impl Outcome {
    /// Every outcome, in [`UsageBucket::counts`] order.
    pub const ALL: [Self; OUTCOMES] = [
        Self::Admitted,
        Self::Invalid,
        Self::ExpiredOrRevoked,
        Self::MissingScope,
        Self::RateLimited,
        Self::OutOfCredits,
        Self::Network,
    ];

    /// Its index in [`UsageBucket::counts`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Its name in the API (`admitted`, `invalid`, `expired_or_revoked`, ...) and the SQL column
    /// holding its count.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Invalid => "invalid",
            Self::ExpiredOrRevoked => "expired_or_revoked",
            Self::MissingScope => "missing_scope",
            Self::RateLimited => "rate_limited",
            Self::OutOfCredits => "out_of_credits",
            Self::Network => "network",
        }
    }

    /// The outcome a refusal of a known key counts as; `None` for refusals that are not about the
    /// key (a malformed request, a store outage, a body the route refuses).
    pub fn of_refusal(error: &AuthError) -> Option<Self> {
        Some(match error.code() {
            ErrorCode::InvalidApiKey => Self::Invalid,
            ErrorCode::ExpiredApiKey => Self::ExpiredOrRevoked,
            ErrorCode::InsufficientPermissions => Self::MissingScope,
            ErrorCode::RateLimited => Self::RateLimited,
            ErrorCode::UsageExceeded => Self::OutOfCredits,
            ErrorCode::NetworkNotAllowed => Self::Network,
            _ => return None,
        })
    }
}

/// One key's counts for one hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageBucket {
    /// The key.
    pub key_id: KeyId,
    /// The start of the hour (UTC).
    pub hour: OffsetDateTime,
    /// Requests per [`Outcome`], indexed by [`Outcome::index`].
    pub counts: [u64; OUTCOMES],
    /// The address the key was last used from in that hour, when known.
    pub last_ip: Option<IpAddr>,
}

impl UsageBucket {
    /// The count of `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counts[outcome.index()]
    }

    /// Adds `other`'s counts (and takes its address when it has one): what a store does when a
    /// second flush writes the same key and hour.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine = mine.saturating_add(theirs);
        }
        if other.last_ip.is_some() {
            self.last_ip = other.last_ip;
        }
    }
}

/// The start of the hour holding `at`.
pub fn hour_of(at: OffsetDateTime) -> OffsetDateTime {
    let seconds = at.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(seconds - seconds.rem_euclid(3_600)).unwrap_or(at)
}
