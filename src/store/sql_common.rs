//! What the SQL stores share: timestamp precision, row decoding, error mapping, and the rules
//! around their statements (a limit, a rotation, an update, a credit adjustment, a budget level).
//!
//! Both SQL stores keep timestamps to the microsecond (PostgreSQL's `TIMESTAMPTZ` precision; SQLite
//! stores integer microseconds since the Unix epoch). Every timestamp is truncated (floored) to the
//! microsecond before it is written *and* before it is compared in SQL (the `now` of a limit check,
//! the times of a last-used batch), so both sides of every comparison have the same precision.

use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use super::credits::{CreditAdjustment, adjust};
use super::params::{KeyUpdate, Rotation};
use super::{StoreError, StoreErrorKind};
use crate::key::{DigestScheme, KeyDigest, KeyId};
use crate::limits::{
    BudgetId, BudgetLevel, Credits, MAX_CREDITS, PoolId, RateLimit, Refill, RefillInterval,
    UsageLimits,
};
use crate::network::Networks;
use crate::record::{KeyChange, KeyRecord, PreviousSecret};
use crate::scope::ScopeSet;

/// `t` floored to the microsecond, in UTC: the precision the SQL stores keep.
pub(crate) fn micros(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    // `nanosecond()` is always below 10^9, so the replacement cannot fail; keep `t` if it ever did.
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// Microseconds since the Unix epoch (floored), SQLite's storage form.
#[cfg(feature = "sqlite")]
pub(crate) fn to_unix_micros(t: OffsetDateTime) -> i64 {
    // i128 -> i64: `time` limits years to ±9999, about ±3.2e17 µs, far inside i64.
    let nanos = t.unix_timestamp_nanos();
    i64::try_from(nanos.div_euclid(1_000)).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

/// The inverse of [`to_unix_micros`]; `Corrupt` when out of `time`'s range.
#[cfg(feature = "sqlite")]
pub(crate) fn from_unix_micros(micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, e))
}

/// Refuses one more active key where `active` already reach `limit`
/// ([`StoreErrorKind::LimitReached`], naming `scope`).
pub(crate) fn check_limit(limit: u32, active: i64, scope: &'static str) -> Result<(), StoreError> {
    if active >= i64::from(limit) {
        return Err(StoreError::from_kind(StoreErrorKind::LimitReached {
            limit,
            scope,
        }));
    }
    Ok(())
}

/// What a rotation of `old` keeps of its secret for a grace period (`None`: nothing), its end
/// floored to the microsecond; [`StoreErrorKind::Revoked`] for a revoked key.
pub(crate) fn rotated_out(
    old: &KeyRecord,
    rotation: &Rotation,
) -> Result<Option<PreviousSecret>, StoreError> {
    if old.revoked_at.is_some() {
        return Err(StoreError::from_kind(StoreErrorKind::Revoked));
    }
    Ok(rotation.previous_valid_until.map(|until| PreviousSecret {
        digest: old.digest,
        digest_scheme: old.digest_scheme,
        valid_until: micros(until),
    }))
}

/// `record` with `update` applied (new credits' `set_at` floored to the microsecond), as a change
/// whose `after` is what to write.
pub(crate) fn updated(mut record: KeyRecord, update: &KeyUpdate) -> KeyChange {
    let before = record.clone();
    update.apply(&mut record);
    if let Some(credits) = record.limits.credits.as_mut() {
        credits.set_at = micros(credits.set_at);
    }
    KeyChange {
        before,
        after: Some(record),
        revoked_descendants: Vec::new(),
    }
}

/// [`adjust`] on the credits of `record` (read under the caller's lock) at `now` floored to the
/// microsecond: `None` for a key without credits, else the outcome and whether the credits changed
/// (and are to be written).
pub(crate) fn adjusted(
    record: &mut KeyRecord,
    delta: i64,
    now: OffsetDateTime,
) -> Option<(CreditAdjustment, bool)> {
    let credits = record.limits.credits.as_mut()?;
    let before = *credits;
    let outcome = adjust(credits, delta, micros(now));
    Some((outcome, *credits != before))
}

/// One row of a `budget_above` statement: `kind` (`key`, `account` or `owner`), its name (a key id
/// or an account) and its limits; `None` for a level without limits.
pub(crate) fn budget_level(
    owner: &Arc<str>,
    kind: &str,
    name: String,
    limits: UsageLimits,
) -> Option<BudgetLevel> {
    let id = match kind {
        "key" => BudgetId::Key(KeyId::new(name)),
        "account" => BudgetId::Pool(PoolId::account(owner.clone(), name)),
        _ => BudgetId::Pool(PoolId::owner(owner.clone())),
    };
    (!limits.is_unlimited()).then_some(BudgetLevel { id, limits })
}

/// A row as read from a SQL store, before validation.
pub(crate) struct RawRecord {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) owner: String,
    pub(crate) account: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) digest: Vec<u8>,
    pub(crate) digest_scheme: i64,
    pub(crate) masked_key: String,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) revoked_at: Option<OffsetDateTime>,
    pub(crate) last_used_at: Option<OffsetDateTime>,
    pub(crate) created_by: Option<String>,
    pub(crate) rotated_at: Option<OffsetDateTime>,
    pub(crate) previous_digest: Option<Vec<u8>>,
    pub(crate) previous_digest_scheme: Option<i64>,
    pub(crate) previous_valid_until: Option<OffsetDateTime>,
    pub(crate) limits: LimitColumns,
    /// `allowed_networks` (schema version 5): the [`Networks`] Display form (blocks separated by
    /// spaces), `NULL` for anywhere.
    pub(crate) allowed_networks: Option<String>,
}

/// The usage-limit columns (schema version 4), all nullable: `rate_limit`, `rate_period_seconds`,
/// `credits_remaining`, `credits_refill_interval`, `credits_refill_amount`, `credits_set_at`.
#[derive(Default)]
pub(crate) struct LimitColumns {
    pub(crate) rate_limit: Option<i64>,
    pub(crate) rate_period_seconds: Option<i64>,
    pub(crate) credits_remaining: Option<i64>,
    pub(crate) credits_refill_interval: Option<String>,
    pub(crate) credits_refill_amount: Option<i64>,
    pub(crate) credits_set_at: Option<OffsetDateTime>,
}

impl LimitColumns {
    /// The columns of `limits` (timestamps as given: the caller floors them).
    pub(crate) fn of(limits: &UsageLimits) -> Self {
        let credits = limits.credits.as_ref();
        let refill = credits.and_then(|c| c.refill);
        Self {
            rate_limit: limits.rate_limit.map(|r| i64::from(r.limit)),
            rate_period_seconds: limits.rate_limit.map(|r| i64::from(r.period_seconds)),
            credits_remaining: credits.map(|c| c.remaining.min(MAX_CREDITS) as i64),
            credits_refill_interval: refill.map(|r| r.interval.as_str().to_owned()),
            credits_refill_amount: refill.map(|r| r.amount.min(MAX_CREDITS) as i64),
            credits_set_at: credits.map(|c| micros(c.set_at)),
        }
    }

    /// Validates the columns: each group (rate limit, refill, credits) all set or all null, counts
    /// in range, a known refill interval.
    pub(crate) fn into_limits(self) -> Result<UsageLimits, StoreError> {
        let count = |v: i64, column| u64::try_from(v).map_err(|_| corrupt(column));
        let rate_limit = match (self.rate_limit, self.rate_period_seconds) {
            (None, None) => None,
            (Some(limit), Some(period)) => Some(RateLimit::new(
                u32::try_from(limit).map_err(|_| corrupt("rate_limit"))?,
                u32::try_from(period).map_err(|_| corrupt("rate_period_seconds"))?,
            )),
            _ => return Err(corrupt("rate_limit")),
        };
        let refill = match (self.credits_refill_interval, self.credits_refill_amount) {
            (None, None) => None,
            (Some(interval), Some(amount)) => Some(Refill {
                interval: match interval.as_str() {
                    "daily" => RefillInterval::Daily,
                    "monthly" => RefillInterval::Monthly,
                    _ => return Err(corrupt("credits_refill_interval")),
                },
                amount: count(amount, "credits_refill_amount")?,
            }),
            _ => return Err(corrupt("credits_refill_interval")),
        };
        let credits = match (self.credits_remaining, self.credits_set_at) {
            (None, None) if refill.is_none() => None,
            (Some(remaining), Some(set_at)) => Some(Credits {
                remaining: count(remaining, "credits_remaining")?,
                refill,
                set_at,
            }),
            _ => return Err(corrupt("credits_remaining")),
        };
        Ok(UsageLimits {
            rate_limit,
            credits,
        })
    }
}

/// Why a row could not be turned into a [`KeyRecord`]. Names the column, never its value.
#[derive(Debug)]
struct CorruptRow(&'static str);

impl fmt::Display for CorruptRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable value in column `{}`", self.0)
    }
}

impl std::error::Error for CorruptRow {}

fn corrupt(column: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, CorruptRow(column))
}

fn digest(bytes: &[u8], column: &'static str) -> Result<KeyDigest, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(KeyDigest::from_bytes)
        .map_err(|_| corrupt(column))
}

fn scheme(version: i64, column: &'static str) -> Result<DigestScheme, StoreError> {
    u16::try_from(version)
        .ok()
        .and_then(DigestScheme::from_version)
        .ok_or_else(|| corrupt(column))
}

impl RawRecord {
    /// Validates the row: digests are 32 bytes, schemes known, scopes valid, and the three
    /// previous-secret columns all set or all null.
    pub(crate) fn into_record(self) -> Result<KeyRecord, StoreError> {
        let previous = match (
            self.previous_digest,
            self.previous_digest_scheme,
            self.previous_valid_until,
        ) {
            (None, None, None) => None,
            (Some(d), Some(s), Some(valid_until)) => Some(PreviousSecret {
                digest: digest(&d, "previous_digest")?,
                digest_scheme: scheme(s, "previous_digest_scheme")?,
                valid_until,
            }),
            _ => return Err(corrupt("previous_digest")),
        };
        Ok(KeyRecord {
            id: KeyId::new(self.id),
            name: self.name,
            owner: self.owner,
            account: self.account,
            scopes: ScopeSet::parse(&self.scopes).map_err(|_| corrupt("scopes"))?,
            digest: digest(&self.digest, "digest")?,
            digest_scheme: scheme(self.digest_scheme, "digest_scheme")?,
            masked_key: self.masked_key,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            last_used_at: self.last_used_at,
            created_by: self.created_by.map(KeyId::new),
            rotated_at: self.rotated_at,
            previous,
            limits: self.limits.into_limits()?,
            allowed_networks: self
                .allowed_networks
                .map(|text| text.parse::<Networks>())
                .transpose()
                .map_err(|_| corrupt("allowed_networks"))?,
        })
    }
}

/// A database error reduced to what is safe to show: its SQLSTATE / result code and message.
/// Details (which may quote the offending values, e.g. a digest in a unique violation) are dropped.
#[derive(Debug)]
struct DatabaseFailure {
    code: Option<String>,
    message: String,
}

impl fmt::Display for DatabaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "database error {code}: {}", self.message),
            None => write!(f, "database error: {}", self.message),
        }
    }
}

impl std::error::Error for DatabaseFailure {}

/// Whether `error` is SQLite's "database is busy / locked" (primary result codes 5 and 6): another
/// connection holds a lock that the busy handler could not wait out (e.g. while several processes
/// switch a new database to WAL at once). Worth a retry at start-up.
#[cfg(feature = "sqlite")]
pub(crate) fn is_sqlite_busy(error: &StoreError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<DatabaseFailure>())
        .and_then(|failure| failure.code.as_deref()?.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// Whether `error` is PostgreSQL's deadlock (`40P01`) or serialization failure (`40001`): the
/// transaction was rolled back as a whole, and running it again is safe.
#[cfg(feature = "postgres")]
pub(crate) fn is_pg_retryable(error: &StoreError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<DatabaseFailure>())
        .is_some_and(|failure| matches!(failure.code.as_deref(), Some("40P01" | "40001")))
}

/// A pool's row key in `api_key_pools`: `(owner, kind, account)`, `kind` being `owner` (with
/// `account` empty) or `account`. An owner's pool and the pool of its account `""` are two rows.
pub(crate) fn pool_key(pool: &PoolId) -> (&str, &'static str, &str) {
    match &pool.account {
        None => (&*pool.owner, "owner", ""),
        Some(account) => (&*pool.owner, "account", &**account),
    }
}

/// The stored form of `networks` (see [`RawRecord::allowed_networks`]).
pub(crate) fn networks_text(networks: Option<&Networks>) -> Option<String> {
    networks.map(Networks::to_string)
}

/// Maps a sqlx error to a [`StoreError`]: unique violations are `Conflict`, undecodable data is
/// `Corrupt`, everything else (connection refused, pool timeout, I/O, server errors) `Unavailable`.
pub(crate) fn map_sqlx_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Database(db) => {
            if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
                return StoreError::from_kind(StoreErrorKind::Conflict);
            }
            StoreError::unavailable(DatabaseFailure {
                code: db.code().map(|c| c.into_owned()),
                message: db.message().to_owned(),
            })
        }
        e @ (sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }) => StoreError::new(StoreErrorKind::Corrupt, e),
        e => StoreError::unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "sqlite")]
    #[test]
    fn busy_and_locked_are_told_apart_from_other_failures() {
        let failure = |code: Option<&str>| {
            StoreError::unavailable(DatabaseFailure {
                code: code.map(str::to_owned),
                message: "m".into(),
            })
        };
        for busy in ["5", "6", "261", "517"] {
            assert!(is_sqlite_busy(&failure(Some(busy))), "{busy}");
        }
        for other in [Some("19"), Some("2067"), Some("x"), None] {
            assert!(!is_sqlite_busy(&failure(other)), "{other:?}");
        }
        assert!(!is_sqlite_busy(&StoreError::from_kind(
            StoreErrorKind::Timeout
        )));
    }

    #[test]
    fn micros_floors_and_keeps_the_instant_otherwise() {
        let t = time::macros::datetime!(2024-05-06 07:08:09.123_456_789 +02:00);
        let m = micros(t);
        assert_eq!(m, time::macros::datetime!(2024-05-06 05:08:09.123_456 UTC));
        assert_eq!(micros(m), m);
        let before_epoch = time::macros::datetime!(1960-01-01 00:00:00.000_000_999 UTC);
        assert_eq!(
            micros(before_epoch),
            time::macros::datetime!(1960-01-01 00:00:00 UTC)
        );
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn unix_micros_round_trip() {
        for t in [
            time::macros::datetime!(2024-05-06 07:08:09.123_456 UTC),
            time::macros::datetime!(1960-01-01 00:00:00.000_001 UTC),
            OffsetDateTime::UNIX_EPOCH,
        ] {
            assert_eq!(from_unix_micros(to_unix_micros(t)).unwrap(), t);
        }
        assert_eq!(
            to_unix_micros(time::macros::datetime!(1969-12-31 23:59:59.999_999_5 UTC)),
            -1
        );
        assert!(from_unix_micros(i64::MAX).is_err());
    }

    #[test]
    fn bad_rows_are_corrupt_not_panics() {
        let good = || RawRecord {
            id: "key_1".into(),
            name: "n".into(),
            owner: "o".into(),
            account: "a".into(),
            scopes: vec!["ledgers:read".into()],
            digest: vec![7; 32],
            digest_scheme: 1,
            masked_key: "sk_…".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            created_by: None,
            rotated_at: None,
            previous_digest: None,
            previous_digest_scheme: None,
            previous_valid_until: None,
            limits: LimitColumns::default(),
            allowed_networks: Some("10.0.0.0/8 2001:db8::/32".into()),
        };
        assert_eq!(
            good()
                .into_record()
                .unwrap()
                .allowed_networks
                .unwrap()
                .to_string(),
            "10.0.0.0/8 2001:db8::/32"
        );
        type Spoil = Box<dyn Fn(&mut RawRecord)>;
        let bad: Vec<Spoil> = vec![
            Box::new(|r| r.digest = vec![1; 31]),
            Box::new(|r| r.digest_scheme = 99),
            Box::new(|r| r.digest_scheme = -1),
            Box::new(|r| r.scopes = vec!["not a scope".into()]),
            Box::new(|r| r.limits.rate_limit = Some(10)),
            Box::new(|r| {
                r.limits.rate_limit = Some(-1);
                r.limits.rate_period_seconds = Some(60);
            }),
            Box::new(|r| r.limits.credits_remaining = Some(5)),
            Box::new(|r| {
                r.limits.credits_remaining = Some(-5);
                r.limits.credits_set_at = Some(OffsetDateTime::UNIX_EPOCH);
            }),
            Box::new(|r| {
                r.limits.credits_remaining = Some(5);
                r.limits.credits_set_at = Some(OffsetDateTime::UNIX_EPOCH);
                r.limits.credits_refill_interval = Some("hourly".into());
                r.limits.credits_refill_amount = Some(5);
            }),
            Box::new(|r| r.previous_digest = Some(vec![1; 32])),
            Box::new(|r| r.allowed_networks = Some("10.0.0.0/33".into())),
            Box::new(|r| r.allowed_networks = Some(String::new())),
            Box::new(|r| {
                r.previous_digest = Some(vec![1; 32]);
                r.previous_digest_scheme = Some(70_000);
                r.previous_valid_until = Some(OffsetDateTime::UNIX_EPOCH);
            }),
        ];
        for (i, spoil) in bad.iter().enumerate() {
            let mut row = good();
            spoil(&mut row);
            let err = row.into_record().unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt, "case {i}");
        }
    }
}
