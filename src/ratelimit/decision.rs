//! What the limiter decided for one request: the public [`Decision`] and its parts, and what the
//! backends answer it from.

use std::time::Duration;

use crate::error::AuthError;
use crate::limits::{BudgetId, RateLimit, Refill};

/// What to do when a backend (Redis, the key store) fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Admit the request without the check (counted in metrics, logged at `warn` once a second).
    Open,
    /// Refuse it with 503 `AUTH_UNAVAILABLE`.
    Closed,
}

impl FailMode {
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

/// The rate-limit state of one budget level after a decision: the level that refused, or else the
/// most constraining one (the least left).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateStatus {
    /// The limit that applied.
    pub limit: RateLimit,
    /// Units left now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until this request's cost would pass (zero when it passed).
    pub retry_after: Duration,
}

/// The credit state of one budget level after a decision: the level that refused, or else the one
/// with the least left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditStatus {
    /// Credits left now.
    pub remaining: u64,
    /// The level's refill, if any.
    pub refill: Option<Refill>,
    /// Until the next refill, if there is one.
    pub reset: Option<Duration>,
}

/// What the limiter decided for one request, over every level of the key's
/// [`Budget`](crate::limits::Budget). The headers describe the level that refused, or else the most
/// constraining one.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The rate-limit state, when some level has a rate limit and they were checked.
    pub rate: Option<RateStatus>,
    /// The rate limit `RateLimit-Policy` names: the one of `rate` when it was checked, else the
    /// nearest level's.
    pub rate_policy: Option<RateLimit>,
    /// The credit state, when some level has credits and they were checked.
    pub credits: Option<CreditStatus>,
    /// Why the request is refused; `None`: admitted.
    pub refusal: Option<AuthError>,
    /// The budget level that refused it (the key's own, an ancestor's or a pool's), for a refusal
    /// by a rate limit or credits.
    pub refused_by: Option<BudgetId>,
}

impl Decision {
    pub(super) fn unlimited() -> Self {
        Self {
            rate: None,
            rate_policy: None,
            credits: None,
            refusal: None,
            refused_by: None,
        }
    }

    /// Whether the request may go on.
    pub fn is_admitted(&self) -> bool {
        self.refusal.is_none()
    }

    /// Whether any limit applied (and headers are due).
    pub fn is_limited(&self) -> bool {
        self.rate_policy.is_some() || self.credits.is_some()
    }
}

/// The outcome of one rate check by a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RateOutcome {
    pub(crate) allowed: bool,
    pub(crate) remaining: u32,
    pub(crate) reset: Duration,
    pub(crate) retry_after: Duration,
}

impl RateOutcome {
    /// A cost above the whole `limit` (or a limit of 0): it can never pass.
    pub(crate) fn never(limit: RateLimit) -> Self {
        Self {
            allowed: false,
            remaining: 0,
            reset: limit.period(),
            retry_after: limit.period(),
        }
    }
}

/// The outcome of a rate check over a chain of levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RateChain {
    /// Which level (an index into the budget's levels) `outcome` is about: the one that refused,
    /// or else the one with the least left.
    pub(crate) level: usize,
    pub(crate) outcome: RateOutcome,
}

/// The outcome of spending credits over a chain of levels, all or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spend {
    /// Spent at every level that counts credits; `level` has the least left, `remaining`.
    Spent { level: usize, remaining: u64 },
    /// `level` had less than the cost, `remaining`: nothing was spent anywhere.
    Exhausted { level: usize, remaining: u64 },
    /// No level's credits are counted (the store knows none: they were removed since the
    /// principal was loaded).
    NotCounted,
}
