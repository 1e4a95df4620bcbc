//! Per-key usage settings: a [`RateLimit`] and [`Credits`], together [`UsageLimits`]: what a
//! [`KeyRecord`](crate::store::KeyRecord) stores, a [`Principal`](crate::principal::Principal)
//! carries and [`ratelimit`](crate::ratelimit) enforces. Plain data, with the bounds and the
//! delegation order (what is "no looser") the management API checks.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::key::KeyId;

/// A usage setting out of bounds; the message names the field and the bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidLimit(String);

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidLimit {}

/// Largest [`RateLimit::limit`].
pub const MAX_LIMIT: u32 = 1_000_000_000;
/// Longest [`RateLimit::period_seconds`]: 366 days.
pub const MAX_PERIOD_SECONDS: u32 = 366 * 86_400;
/// Largest [`Credits::remaining`] and [`Refill::amount`] (10^15, well inside every store's integer).
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

/// At most `limit` units per `period_seconds` (a GCRA bucket: burst `limit`, refilled evenly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Units per period, 1 to [`MAX_LIMIT`].
    pub limit: u32,
    /// The period, 1 to [`MAX_PERIOD_SECONDS`] seconds.
    pub period_seconds: u32,
}

impl RateLimit {
    /// `limit` units per `period_seconds`. Check user input with [`RateLimit::validate`].
    pub const fn new(limit: u32, period_seconds: u32) -> Self {
        Self {
            limit,
            period_seconds,
        }
    }

    /// An error unless both numbers are in range.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(InvalidLimit(format!(
                "rate_limit.limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        if !(1..=MAX_PERIOD_SECONDS).contains(&self.period_seconds) {
            return Err(InvalidLimit(format!(
                "rate_limit.period_seconds must be between 1 and {MAX_PERIOD_SECONDS}"
            )));
        }
        Ok(())
    }

    /// The period as a [`Duration`].
    pub fn period(&self) -> Duration {
        Duration::from_secs(u64::from(self.period_seconds))
    }

    /// Whether this limit is no looser than `other`: no bigger burst and no faster sustained rate.
    /// What a delegated key may get from its creator.
    pub fn within(&self, other: &RateLimit) -> bool {
        self.limit <= other.limit
            && u64::from(self.limit) * u64::from(other.period_seconds)
                <= u64::from(other.limit) * u64::from(self.period_seconds)
    }

    /// The GCRA emission interval (period / limit), at least one nanosecond.
    #[cfg(feature = "ratelimit")]
    pub(crate) fn emission_nanos(&self) -> u64 {
        let period = u64::from(self.period_seconds) * 1_000_000_000;
        (period / u64::from(self.limit.max(1))).max(1)
    }
}

/// When credits are refilled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefillInterval {
    /// At 00:00 UTC every day.
    Daily,
    /// At 00:00 UTC on the 1st of every month.
    Monthly,
}

impl RefillInterval {
    /// `daily` or `monthly`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }

    /// The start of the refill period `now` falls in (UTC midnight, of the 1st for monthly).
    pub fn period_start(self, now: OffsetDateTime) -> OffsetDateTime {
        let day = now.to_offset(time::UtcOffset::UTC).date();
        let day = match self {
            Self::Daily => day,
            Self::Monthly => day.replace_day(1).expect("every month has a 1st"),
        };
        day.midnight().assume_utc()
    }

    /// The next refill after `now`.
    pub fn next_refill(self, now: OffsetDateTime) -> OffsetDateTime {
        let start = self.period_start(now);
        match self {
            Self::Daily => start + time::Duration::DAY,
            Self::Monthly => {
                let date = start.date();
                let (year, month) = match date.month() {
                    time::Month::December => (date.year() + 1, time::Month::January),
                    month => (date.year(), month.next()),
                };
                time::Date::from_calendar_date(year, month, 1)
                    .map_or(start + time::Duration::days(31), |d| {
                        d.midnight().assume_utc()
                    })
            }
        }
    }
}

/// A refill: `remaining` is set to `amount` at every `interval` boundary (it does not add).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    /// Daily or monthly.
    pub interval: RefillInterval,
    /// What `remaining` becomes, 0 to [`MAX_CREDITS`].
    pub amount: u64,
}

/// A key's usage credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Credits {
    /// Units left to spend, as of `set_at` (or as last written by the store).
    pub remaining: u64,
    /// The optional refill.
    pub refill: Option<Refill>,
    /// When `remaining` was last set: by creation, an update, or a refill. A refill is due when a
    /// refill period started after it.
    pub set_at: OffsetDateTime,
}

impl Credits {
    /// `remaining` credits set now, with no refill.
    pub fn new(remaining: u64) -> Self {
        Self {
            remaining,
            refill: None,
            set_at: OffsetDateTime::now_utc(),
        }
    }

    /// Adds a refill.
    #[must_use]
    pub fn refill(mut self, interval: RefillInterval, amount: u64) -> Self {
        self.refill = Some(Refill { interval, amount });
        self
    }

    /// Sets when `remaining` was set.
    #[must_use]
    pub fn set_at(mut self, at: OffsetDateTime) -> Self {
        self.set_at = at;
        self
    }

    /// An error unless `remaining` and the refill amount are at most [`MAX_CREDITS`].
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        if self.remaining > MAX_CREDITS || self.refill.is_some_and(|r| r.amount > MAX_CREDITS) {
            return Err(InvalidLimit(format!(
                "credits must be between 0 and {MAX_CREDITS}"
            )));
        }
        Ok(())
    }

    /// Whether these credits are no more than `other`'s at `now`: no more remaining than it has
    /// left, and no refill bigger or more frequent than its own. What a delegated key may get.
    pub fn within(&self, other: &Credits, now: OffsetDateTime) -> bool {
        let refill = match (self.refill, other.refill) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => {
                mine.amount <= theirs.amount
                    && (mine.interval == theirs.interval
                        || mine.interval == RefillInterval::Monthly)
            }
        };
        refill && self.current(now) <= other.current(now)
    }

    /// Whether a refill period started after `set_at` (so `remaining` is `amount` at `now`).
    pub fn refill_due(&self, now: OffsetDateTime) -> bool {
        self.refill
            .is_some_and(|r| r.interval.period_start(now) > self.set_at)
    }

    /// What is left at `now`, a due refill applied.
    pub fn current(&self, now: OffsetDateTime) -> u64 {
        match self.refill {
            Some(refill) if self.refill_due(now) => refill.amount,
            _ => self.remaining,
        }
    }

    /// The state after a due refill at `now` (unchanged when none is due).
    pub fn refreshed(&self, now: OffsetDateTime) -> Self {
        if self.refill_due(now) {
            Self {
                remaining: self.current(now),
                refill: self.refill,
                set_at: now,
            }
        } else {
            *self
        }
    }
}

/// A key's per-key usage settings; what [`KeyRecord`](crate::store::KeyRecord) stores and the
/// [`Principal`](crate::principal::Principal) carries. The default is no limit at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsageLimits {
    /// The rate limit, if any.
    pub rate_limit: Option<RateLimit>,
    /// The credits, if any.
    pub credits: Option<Credits>,
}

impl UsageLimits {
    /// No limit.
    pub const NONE: Self = Self {
        rate_limit: None,
        credits: None,
    };

    /// Whether neither is set.
    pub fn is_unlimited(&self) -> bool {
        self.rate_limit.is_none() && self.credits.is_none()
    }

    /// What in these limits is looser than `other`'s at `now` (`None`: nothing, they are within
    /// it). Where `other` has no limit, anything is within it; where it has one, none is looser.
    pub fn looser_than(&self, other: &UsageLimits, now: OffsetDateTime) -> Option<&'static str> {
        if let Some(theirs) = &other.rate_limit
            && !self.rate_limit.is_some_and(|mine| mine.within(theirs))
        {
            return Some("rate limit");
        }
        if let Some(theirs) = &other.credits
            && !self.credits.is_some_and(|mine| mine.within(theirs, now))
        {
            return Some("credits");
        }
        None
    }
}

/// A shared pool of usage: every key of one account, or of one owner, counts against it (what
/// other platforms call identities or consumer groups: twenty keys cannot route around it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId {
    /// The owner.
    pub owner: Arc<str>,
    /// The account, for an account pool; `None` for the owner's pool.
    pub account: Option<Arc<str>>,
}

impl PoolId {
    /// The pool of every key of `owner`.
    pub fn owner(owner: impl Into<Arc<str>>) -> Self {
        Self {
            owner: owner.into(),
            account: None,
        }
    }

    /// The pool of every key of `owner` acting in `account`.
    pub fn account(owner: impl Into<Arc<str>>, account: impl Into<Arc<str>>) -> Self {
        Self {
            owner: owner.into(),
            account: Some(account.into()),
        }
    }
}

/// Whose usage one level of a [`Budget`] counts: a key's (the key itself or an ancestor), or a
/// pool's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetId {
    /// A key's own rate limit and credits.
    Key(KeyId),
    /// A shared pool.
    Pool(PoolId),
}

impl fmt::Display for BudgetId {
    /// `key:<id>`, `pool:<owner>` or `pool:<owner>/<account>` (owners and accounts are visible
    /// ASCII; this form is for logs and backend keys, it is not parsed back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(id) => write!(f, "key:{id}"),
            Self::Pool(PoolId {
                owner,
                account: None,
            }) => write!(f, "pool:{}:{owner}", owner.len()),
            Self::Pool(PoolId {
                owner,
                account: Some(account),
            }) => write!(f, "pool:{}:{owner}/{account}", owner.len()),
        }
    }
}

/// One level of a [`Budget`]: whose, and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BudgetLevel {
    /// Whose usage this level counts.
    pub id: BudgetId,
    /// Its rate limit and credits (at least one is set).
    pub limits: UsageLimits,
}

/// Every budget a request of one key counts against, in order: the key's own (when it has
/// limits), each ancestor's that has limits (nearest first), then the account pool and the owner
/// pool when set. A request is admitted only if every level admits it, and then spends at every
/// level (I3: a budget binds its whole subtree). Empty for a key with no limit anywhere in its
/// chain, which then costs the limiter one branch. Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Budget(Option<Arc<[BudgetLevel]>>);

impl Budget {
    /// No limit anywhere.
    pub const NONE: Self = Self(None);

    /// The levels that have a limit, in the order given (levels without one are dropped).
    pub fn new(levels: impl IntoIterator<Item = BudgetLevel>) -> Self {
        let levels: Vec<BudgetLevel> = levels
            .into_iter()
            .filter(|level| !level.limits.is_unlimited())
            .collect();
        if levels.is_empty() {
            Self(None)
        } else {
            Self(Some(levels.into()))
        }
    }

    /// The levels, in order.
    pub fn levels(&self) -> &[BudgetLevel] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// Whether no level limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.0.is_none()
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.levels()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn refill_boundaries_are_utc_midnights() {
        let now = datetime!(2026-12-31 23:59:59 UTC);
        assert_eq!(
            RefillInterval::Daily.period_start(now),
            datetime!(2026-12-31 0:00 UTC)
        );
        assert_eq!(
            RefillInterval::Daily.next_refill(now),
            datetime!(2027-01-01 0:00 UTC)
        );
        assert_eq!(
            RefillInterval::Monthly.period_start(now),
            datetime!(2026-12-01 0:00 UTC)
        );
        assert_eq!(
            RefillInterval::Monthly.next_refill(now),
            datetime!(2027-01-01 0:00 UTC)
        );
        assert_eq!(
            RefillInterval::Monthly.next_refill(datetime!(2026-02-10 12:00 UTC)),
            datetime!(2026-03-01 0:00 UTC)
        );
        // Another offset names the same instant.
        let local = datetime!(2026-06-01 01:30 +02:00);
        assert_eq!(
            RefillInterval::Monthly.period_start(local),
            datetime!(2026-05-01 0:00 UTC)
        );
    }

    #[test]
    fn a_refill_sets_remaining() {
        let credits = Credits::new(3)
            .refill(RefillInterval::Daily, 100)
            .set_at(datetime!(2026-03-04 10:00 UTC));
        assert_eq!(credits.current(datetime!(2026-03-04 23:59 UTC)), 3);
        assert_eq!(credits.current(datetime!(2026-03-05 0:00 UTC)), 100);
        let refreshed = credits.refreshed(datetime!(2026-03-06 8:00 UTC));
        assert_eq!(refreshed.remaining, 100);
        assert!(!refreshed.refill_due(datetime!(2026-03-06 23:00 UTC)));
        assert_eq!(Credits::new(3).current(datetime!(2099-01-01 0:00 UTC)), 3);
    }

    #[test]
    fn validation_and_delegation_bounds() {
        let now = OffsetDateTime::now_utc();
        let own = UsageLimits {
            rate_limit: Some(RateLimit::new(10, 60)),
            credits: Some(Credits::new(50).refill(RefillInterval::Monthly, 100)),
        };
        assert_eq!(UsageLimits::NONE.looser_than(&own, now), Some("rate limit"));
        assert_eq!(own.looser_than(&UsageLimits::NONE, now), None);
        assert_eq!(own.looser_than(&own, now), None);
        let more = UsageLimits {
            credits: Some(Credits::new(51)),
            ..own
        };
        assert_eq!(more.looser_than(&own, now), Some("credits"));
        let daily = UsageLimits {
            credits: Some(Credits::new(1).refill(RefillInterval::Daily, 100)),
            ..own
        };
        assert_eq!(daily.looser_than(&own, now), Some("credits"));
        assert!(RateLimit::new(0, 60).validate().is_err());
        assert!(RateLimit::new(1, 0).validate().is_err());
        assert!(
            RateLimit::new(MAX_LIMIT, MAX_PERIOD_SECONDS)
                .validate()
                .is_ok()
        );
        assert!(
            RateLimit::new(MAX_LIMIT + 1, 1)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("rate_limit.limit")
        );
        assert!(Credits::new(MAX_CREDITS).validate().is_ok());
        assert!(Credits::new(MAX_CREDITS + 1).validate().is_err());
        let parent = RateLimit::new(100, 60);
        assert!(RateLimit::new(100, 60).within(&parent));
        assert!(RateLimit::new(10, 60).within(&parent));
        assert!(RateLimit::new(100, 120).within(&parent));
        assert!(!RateLimit::new(101, 120).within(&parent), "bigger burst");
        assert!(!RateLimit::new(50, 20).within(&parent), "faster rate");
    }
}
