//! A fleet: rate-limit state in Redis (feature `redis`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{RateLimit, RateOutcome};
use crate::key::KeyId;
use crate::store::{StoreError, StoreErrorKind};

/// The prefix of bucket keys when none is configured: `tower_api_keys:rl:<key id>`.
pub const DEFAULT_PREFIX: &str = "tower_api_keys:rl";

/// How long one decision may take before it counts as a failure, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// The Lua script [`RedisRates`] runs: GCRA on Redis's clock, one atomic call per decision. The
/// bucket is the key's theoretical arrival time (TAT) in microseconds; it expires when the bucket
/// is full again.
///
/// `KEYS[1]` the bucket; `ARGV[1]` the emission interval in whole microseconds (the period over
/// the limit, rounded up); `ARGV[2]` the limit; `ARGV[3]` the cost (at most the limit: a larger
/// cost never reaches Redis). Returns one integer, `d`: admitted, the microseconds until the bucket
/// is full again after this request (`d ≥ 0`); refused, `-1 - d` with `d` the same for the bucket
/// as it stays (nothing is written). The rest of the decision (what is left, when to retry) follows from `d`,
/// the limit and the cost on the caller's side: the script does only what must be atomic.
///
/// Time is counted in whole microseconds (Redis's clock, exact in a Lua number), so all of the
/// arithmetic is exact. The emission interval is rounded up to a whole microsecond: a limit of a
/// million units per second per key or more is enforced as at most that, otherwise the refill is
/// slower than asked by less than a microsecond per unit; never looser.
pub const GCRA_SCRIPT: &str = r#"
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
local emission = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + emission * ARGV[3]
if new_tat - emission * ARGV[2] > now then return now - tat - 1 end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', string.format('%d', math.ceil((new_tat - now) / 1000)))
return new_tat - now
"#;

/// Rate-limit state in Redis, shared by every instance using the same server and prefix: each
/// decision is one `EVALSHA` of a GCRA script (the same algorithm as
/// [`MemoryRates`](super::MemoryRates)) using Redis's clock, so instances' clocks do not matter
/// and N instances together never admit more than the limit.
///
/// The connection is opened on first use and reopened after a failure; a decision that fails or
/// takes longer than the timeout (default [`DEFAULT_TIMEOUT`]) is handled as the limiter's
/// [`FailMode`](super::FailMode) says. Cheap to clone.
#[derive(Clone)]
pub struct RedisRates {
    client: ::redis::Client,
    connection: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    script: Arc<::redis::Script>,
}

impl fmt::Debug for RedisRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRates")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisRates {
    /// State on `client`'s server under [`DEFAULT_PREFIX`]. Nothing connects yet. Must be called
    /// inside a Tokio runtime.
    pub fn new(client: ::redis::Client) -> Result<Self, StoreError> {
        Ok(Self {
            connection: Self::connect(&client, DEFAULT_TIMEOUT)?,
            client,
            prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            script: Arc::new(::redis::Script::new(GCRA_SCRIPT)),
        })
    }

    /// State on the server at `url` (`redis://host:6379`).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))?;
        Self::new(client)
    }

    /// Bucket keys are `<prefix>:<key id>`. Every instance of a service must use the same prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one decision (and connecting) may take before it counts as a failure.
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, StoreError> {
        self.connection = Self::connect(&self.client, timeout)?;
        self.timeout = timeout;
        Ok(self)
    }

    /// A lazily connecting manager that reconnects after a failure, giving up on an attempt after
    /// `timeout` (the next decision tries again).
    fn connect(
        client: &::redis::Client,
        timeout: Duration,
    ) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))
    }

    pub(crate) async fn check(
        &self,
        key: &KeyId,
        limit: RateLimit,
        cost: u32,
    ) -> Result<RateOutcome, StoreError> {
        if cost > limit.limit {
            // More than the whole bucket: it can never pass, and Redis need not be asked.
            return Ok(RateOutcome::never(limit));
        }
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("{}:{}", self.prefix, key.as_str()));
        invocation
            .arg(emission_micros(limit))
            .arg(limit.limit)
            .arg(cost);
        let call = invocation.invoke_async::<i64>(&mut connection);
        let reply = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|elapsed| StoreError::new(StoreErrorKind::Timeout, elapsed))?
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))?;
        Ok(outcome(limit, cost, reply))
    }
}

/// The emission interval the script counts with: whole microseconds, rounded up.
fn emission_micros(limit: RateLimit) -> u64 {
    limit.emission_nanos().div_ceil(1000)
}

/// The decision the script's reply stands for (see [`GCRA_SCRIPT`]). Any reply decodes without
/// overflow, whatever a server sends.
fn outcome(limit: RateLimit, cost: u32, reply: i64) -> RateOutcome {
    let allowed = reply >= 0;
    let until_full_us = if allowed { reply } else { -1 - reply };
    let until_full = u64::try_from(until_full_us)
        .unwrap_or(0)
        .saturating_mul(1000);
    let emission = emission_micros(limit) * 1000;
    let tau = emission.saturating_mul(limit.limit.into());
    let remaining = tau.saturating_sub(until_full) / emission;
    // Refused: the cost passes once the bucket has drained to `tau - cost × emission`.
    let retry_after = match allowed {
        true => 0,
        false => until_full
            .saturating_add(emission.saturating_mul(cost.into()))
            .saturating_sub(tau),
    };
    RateOutcome {
        allowed,
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        reset: Duration::from_nanos(until_full),
        retry_after: Duration::from_nanos(retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply decoded for 10 per 60 s (one unit per 6 s): what is left and when to retry.
    #[test]
    fn replies_decode_to_the_decision() {
        let limit = RateLimit::new(10, 60);
        let secs = Duration::from_secs;
        // Admitted, first request of a full bucket: one unit in use for 6 s.
        let first = outcome(limit, 1, 6_000_000);
        assert_eq!(
            (
                first.allowed,
                first.remaining,
                first.reset,
                first.retry_after
            ),
            (true, 9, secs(6), Duration::ZERO)
        );
        // Admitted, emptied the bucket: 60 s until full, nothing left.
        let last = outcome(limit, 1, 60_000_000);
        assert_eq!(
            (last.allowed, last.remaining, last.reset),
            (true, 0, secs(60))
        );
        // Refused with the bucket 57 s from full: the next unit frees in 3 s.
        let refused = outcome(limit, 1, -1 - 57_000_000);
        assert_eq!(
            (
                refused.allowed,
                refused.remaining,
                refused.reset,
                refused.retry_after
            ),
            (false, 0, secs(57), secs(3))
        );
        // Refused at cost 3 with one unit left (54 s from full): two more must free, 12 s.
        let costly = outcome(limit, 3, -1 - 54_000_000);
        assert_eq!(
            (costly.allowed, costly.remaining, costly.retry_after),
            (false, 1, secs(12))
        );
        // Whatever a server sends decodes: nothing left, never a panic.
        for reply in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX] {
            for limit in [
                RateLimit::new(1, 1),
                RateLimit::new(1_000_000_000, 31_622_400),
            ] {
                let decoded = outcome(limit, limit.limit, reply);
                assert!(decoded.remaining <= limit.limit, "{reply}: {decoded:?}");
            }
        }
    }
}
