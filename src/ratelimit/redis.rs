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

/// The Lua script [`RedisRates`] runs: GCRA on Redis's clock, one atomic call per decision. The bucket is the key's theoretical
/// arrival time (TAT) in microseconds; it expires when the bucket is full again.
///
/// `KEYS[1]` the bucket; `ARGV[1]` emission interval (µs, may be fractional); `ARGV[2]` limit; `ARGV[3]`
/// cost. Returns {allowed (0/1), remaining, µs until full, µs until this cost would pass}.
pub const GCRA_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local emission = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tau = emission * limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local function left(at) return math.max(0, math.floor((now + tau - at) / emission + 1e-9)) end
if cost > limit then
  return {0, left(tat), math.ceil(tat - now), math.ceil(tau)}
end
local new_tat = math.ceil(tat + emission * cost)
local allow_at = new_tat - tau
if allow_at > now then
  return {0, left(tat), math.ceil(tat - now), math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, left(new_tat), new_tat - now, 0}
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
        let emission_us = limit.emission_nanos() as f64 / 1000.0;
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("{}:{}", self.prefix, key.as_str()));
        invocation
            .arg(format!("{emission_us:.3}"))
            .arg(limit.limit)
            .arg(cost);
        let call = invocation.invoke_async::<(i64, i64, i64, i64)>(&mut connection);
        let (allowed, remaining, reset_us, retry_us) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|elapsed| StoreError::new(StoreErrorKind::Timeout, elapsed))?
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Ok(RateOutcome {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            reset: micros(reset_us),
            retry_after: micros(retry_us),
        })
    }
}
