//! Whole-owner views for the console: every owner with its key counts
//! ([`KeyStore::owners`](super::KeyStore::owners)) and each key's requests over a period
//! ([`KeyStore::usage_by_key`](super::KeyStore::usage_by_key)), and `sum`, a key's hours added up.

use time::OffsetDateTime;

use crate::store::usage::UsageBucket;

/// The most owners [`KeyStore::owners`](super::KeyStore::owners) answers.
pub const MAX_OWNERS: u32 = 1_000;

/// One owner and how many keys it has ([`KeyStore::owners`](super::KeyStore::owners)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSummary {
    /// The owner.
    pub owner: String,
    /// Its keys, revoked and expired ones included.
    pub keys: u64,
    /// Its keys active at the time asked ([`KeyRecord::is_active`](super::KeyRecord::is_active)).
    pub active_keys: u64,
}

/// One key's hourly buckets (oldest first) summed into one starting at `from`, keeping the latest
/// address; `None` without buckets.
pub(crate) fn sum(buckets: Vec<UsageBucket>, from: OffsetDateTime) -> Option<UsageBucket> {
    let mut buckets = buckets.into_iter();
    let mut total = buckets.next()?;
    for bucket in buckets {
        total.merge(&bucket);
    }
    total.hour = from;
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;
    use crate::store::usage::OUTCOMES;

    fn bucket(hour: i64, admitted: u64, ip: Option<&str>) -> UsageBucket {
        let mut counts = [0; OUTCOMES];
        counts[0] = admitted;
        counts[4] = 1;
        UsageBucket {
            key_id: KeyId::new("key_a"),
            hour: OffsetDateTime::from_unix_timestamp(hour * 3600).unwrap(),
            counts,
            last_ip: ip.map(|ip| ip.parse().unwrap()),
        }
    }

    #[test]
    fn sum_adds_every_outcome_and_keeps_the_latest_address() {
        let from = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(sum(Vec::new(), from), None);
        let total = sum(
            vec![
                bucket(1, 2, Some("10.0.0.1")),
                bucket(2, 3, Some("10.0.0.2")),
                bucket(3, 4, None),
            ],
            from,
        )
        .unwrap();
        assert_eq!(total.hour, from);
        assert_eq!(total.counts[0], 9);
        assert_eq!(total.counts[4], 3);
        assert_eq!(total.last_ip, Some("10.0.0.2".parse().unwrap()));
    }
}
