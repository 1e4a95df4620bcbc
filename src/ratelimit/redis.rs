//! A fleet: rate-limit state in Redis (feature `redis`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::decision::{RateChain, RateOutcome};
use super::lanes::Lanes;
use crate::limits::{BudgetLevel, RateLimit};
use crate::store::{StoreError, StoreErrorKind};

/// The prefix of bucket keys when none is configured: `tower_api_keys:rl:<budget level>`.
pub const DEFAULT_PREFIX: &str = "tower_api_keys:rl";

/// How long one decision may take before it counts as a failure, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Connections [`RedisRates`] spreads its decisions over, by default: one multiplexed connection,
/// on which decisions in flight are pipelined (on a small shared machine a pool of 4 measured
/// slower, BENCHMARKS.md; a Redis on its own cores may gain from [`RedisRates::connections`]).
pub const DEFAULT_CONNECTIONS: usize = 1;

/// The Lua script [`RedisRates`] runs: GCRA on Redis's clock over every rate-limited level of a
/// request's budget chain, all or nothing, in one atomic call whatever the depth; several
/// decisions over the same chain (coalesced, see [`RedisRates::coalesce`]) are made one after the
/// other in the same call. Each level's bucket is its theoretical arrival time (TAT) in
/// microseconds; it expires when the bucket is full again.
///
/// `KEYS[i]` the bucket of level `i` (in chain order); `ARGV[2i - 1]` level `i`'s emission
/// interval in whole microseconds (its period over its limit, rounded up), `ARGV[2i]` its limit;
/// after the levels' pairs, the cost of each decision, in order (each at most every level's
/// limit: a larger cost never reaches Redis). For each decision in turn, every level is checked
/// before any is spent: the first level the cost does not fit refuses it, and then it spends
/// nothing anywhere; the next decision sees what the ones before it spent. The levels are written
/// once at the end, if any decision was admitted. Returns, one decision after the other, a flat
/// array of integers: admitted, `-1, d1, d2, ...` with `di` the microseconds until level `i` is
/// full again after that decision; refused, `i - 1, d` with `i - 1` the refusing level (counted
/// from 0) and `d` the same for its bucket as it stays. The rest of the decision (what is left,
/// when to retry, which level is the most constraining) follows from these on the caller's side:
/// the script does only what must be atomic.
///
/// Time is counted in whole microseconds (Redis's clock, exact in a Lua number), so all of the
/// arithmetic is exact. The emission interval is rounded up to a whole microsecond: a limit of a
/// million units per second or more is enforced as at most that, otherwise the refill is slower
/// than asked by less than a microsecond per unit; never looser.
pub const GCRA_SCRIPT: &str = r#"
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
local levels = #KEYS
local tats, emissions, taus = {}, {}, {}
for i = 1, levels do
  local emission = tonumber(ARGV[2 * i - 1])
  emissions[i] = emission
  taus[i] = emission * tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat
end
local out = {}
local spent = false
for d = 2 * levels + 1, #ARGV do
  local cost = tonumber(ARGV[d])
  local refused = nil
  for i = 1, levels do
    if tats[i] + emissions[i] * cost - taus[i] > now then refused = i break end
  end
  if refused then
    out[#out + 1] = refused - 1
    out[#out + 1] = tats[refused] - now
  else
    out[#out + 1] = -1
    for i = 1, levels do
      tats[i] = tats[i] + emissions[i] * cost
      out[#out + 1] = tats[i] - now
    end
    spent = true
  end
end
if spent then
  for i = 1, levels do
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', string.format('%d', math.ceil((tats[i] - now) / 1000)))
  end
end
return out
"#;

/// [`GCRA_SCRIPT`] for one decision, what most calls are (a decision alone on its chain): the same
/// arguments (the levels' pairs, then the one cost) and the same reply, with less Lua (no tables of
/// every level's state, and a refusal returns at the level that refuses, before reading the
/// others). `tests/ratelimit_fleet.rs` holds both to the same exactness.
const GCRA_ONE_SCRIPT: &str = r#"
local now = redis.call('TIME')
now = now[1] * 1000000 + now[2]
local levels = #KEYS
local cost = tonumber(ARGV[2 * levels + 1])
local tats = {}
for i = 1, levels do
  local emission = tonumber(ARGV[2 * i - 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if tat + emission * cost - emission * tonumber(ARGV[2 * i]) > now then return {i - 1, tat - now} end
  tats[i] = tat + emission * cost
end
local out = {-1}
for i = 1, levels do
  redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', string.format('%d', math.ceil((tats[i] - now) / 1000)))
  out[i + 1] = tats[i] - now
end
return out
"#;

/// Rate-limit state in Redis, shared by every instance using the same server and prefix: each
/// decision is one `EVALSHA` of a GCRA script (the same algorithm as
/// [`MemoryRates`](super::MemoryRates)) over every level of the request's budget chain, using
/// Redis's clock, so instances' clocks do not matter and N instances together never admit more
/// than any level's limit. Bucket keys are `<prefix>:<level>` (`key:<key id>`, or `pool:...`):
/// every level of a chain is one key, all in one script call, so a Redis Cluster would need them
/// in one hash slot (a prefix with a hash tag, `{rl}`); a single server or a replicated primary
/// needs nothing.
///
/// Decisions in flight are pipelined on a multiplexed connection, those over the same chain
/// coalesced into one call while another is in flight ([`coalesce`](Self::coalesce), exact), and
/// calls can be spread over a small pool of connections ([`connections`](Self::connections); default [`DEFAULT_CONNECTIONS`]). Each connection is opened on first use and reopened after a
/// failure (after an outage, each connection's first decision fails before it reconnects: up to
/// as many decisions as there are connections fail as the fail mode says); a decision that fails or takes longer than the timeout (default [`DEFAULT_TIMEOUT`])
/// is handled as the limiter's [`FailMode`](super::FailMode) says. Cheap to clone.
#[derive(Clone)]
pub struct RedisRates {
    client: ::redis::Client,
    connections: Arc<[ConnectionManager]>,
    next: Arc<AtomicUsize>,
    prefix: Arc<str>,
    timeout: Duration,
    script: Arc<::redis::Script>,
    /// [`GCRA_ONE_SCRIPT`]: a call for one decision.
    script_one: Arc<::redis::Script>,
    /// Decisions over the same chain, coalesced while a call for it is in flight (`None`: off).
    lanes: Option<Arc<Lanes>>,
}

impl fmt::Debug for RedisRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRates")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections.len())
            .field("coalesce", &self.lanes.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisRates {
    /// State on `client`'s server under [`DEFAULT_PREFIX`]. Nothing connects yet. Must be called
    /// inside a Tokio runtime.
    pub fn new(client: ::redis::Client) -> Result<Self, StoreError> {
        Ok(Self {
            connections: Self::connect(&client, DEFAULT_TIMEOUT, DEFAULT_CONNECTIONS)?,
            next: Arc::new(AtomicUsize::new(0)),
            client,
            prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            script: Arc::new(::redis::Script::new(GCRA_SCRIPT)),
            script_one: Arc::new(::redis::Script::new(GCRA_ONE_SCRIPT)),
            lanes: Some(Arc::default()),
        })
    }

    /// State on the server at `url` (`redis://host:6379`).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))?;
        Self::new(client)
    }

    /// Bucket keys are `<prefix>:<level>`. Every instance of a service must use the same prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one decision (and connecting) may take before it counts as a failure.
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, StoreError> {
        self.connections = Self::connect(&self.client, timeout, self.connections.len())?;
        self.timeout = timeout;
        Ok(self)
    }

    /// Spreads decisions over `n` multiplexed connections (at least 1; default
    /// [`DEFAULT_CONNECTIONS`]), taken in turn.
    pub fn connections(mut self, n: usize) -> Result<Self, StoreError> {
        self.connections = Self::connect(&self.client, self.timeout, n.max(1))?;
        Ok(self)
    }

    /// Whether decisions over the same chain of levels that overlap in time go to Redis together
    /// (default: yes). While a script call for a chain is in flight, the decisions that arrive for
    /// the same chain (the same key and ancestors, at the same limits) wait for it to be answered,
    /// and then go as one call, which decides them one after the other in the order they arrived,
    /// atomically: each outcome is exactly what it would have been with one call each, back to
    /// back, so exactness across instances is kept. A decision alone on its chain is sent at once.
    /// Under load on one key, this makes one script call (one Lua run, one write per level) serve
    /// many requests instead of one each; a waiting decision may wait up to one call longer.
    /// Off: one call per decision.
    #[must_use]
    pub fn coalesce(mut self, coalesce: bool) -> Self {
        self.lanes = coalesce.then(Arc::default);
        self
    }

    /// `n` lazily connecting managers that reconnect after a failure, giving up on an attempt after
    /// `timeout` (the next decision tries again).
    fn connect(
        client: &::redis::Client,
        timeout: Duration,
        n: usize,
    ) -> Result<Arc<[ConnectionManager]>, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        (0..n)
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))
            })
            .collect()
    }

    /// Decides `cost` units over every rate-limited level of `levels` in one script call, all or
    /// nothing; `None` when no level has a rate limit. A cost above some level's whole limit never
    /// passes (the first such level refuses it) and never reaches Redis.
    pub(crate) async fn check(
        &self,
        levels: &[BudgetLevel],
        cost: u32,
    ) -> Result<Option<RateChain>, StoreError> {
        let mut keys = Vec::new();
        let mut args = Vec::new();
        for (level, budget) in levels.iter().enumerate() {
            let Some(limit) = budget.limits.rate_limit else {
                continue;
            };
            if cost > limit.limit {
                return Ok(Some(RateChain {
                    level,
                    outcome: RateOutcome::never(limit),
                }));
            }
            keys.push(format!("{}:{}", self.prefix, budget.id));
            args.push(emission_micros(limit));
            args.push(limit.limit.into());
        }
        if keys.is_empty() {
            return Ok(None);
        }
        let decide = async {
            match &self.lanes {
                Some(lanes) => {
                    let lane = lane(&keys, &args);
                    lanes
                        .decide(lane, cost, |costs| self.call(&keys, &args, costs))
                        .await
                }
                None => self
                    .call(&keys, &args, vec![cost])
                    .await?
                    .pop()
                    .ok_or_else(|| StoreError::new(StoreErrorKind::Unavailable, UnexpectedReply)),
            }
        };
        let reply = tokio::time::timeout(self.timeout, decide)
            .await
            .map_err(|elapsed| StoreError::new(StoreErrorKind::Timeout, elapsed))??;
        chain_outcome(levels, cost, &reply)
            .map(Some)
            .ok_or_else(|| StoreError::new(StoreErrorKind::Unavailable, UnexpectedReply))
    }

    /// One script call deciding `costs` in turn over the levels `keys` (with their emission
    /// intervals and limits, `args`): each decision's part of the reply, in order.
    async fn call(
        &self,
        keys: &[String],
        args: &[u64],
        costs: Vec<u32>,
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let script = match costs.len() {
            1 => &self.script_one,
            _ => &self.script,
        };
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        for cost in &costs {
            invocation.arg(cost);
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut connection = self.connections[turn].clone();
        let reply = invocation
            .invoke_async::<Vec<i64>>(&mut connection)
            .await
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e))?;
        split(&reply, keys.len(), costs.len())
            .ok_or_else(|| StoreError::new(StoreErrorKind::Unavailable, UnexpectedReply))
    }
}

/// The name of a chain's lane: its bucket keys and their arguments (decisions coalesce only when
/// both are the same).
fn lane(keys: &[String], args: &[u64]) -> String {
    use std::fmt::Write;
    let mut lane =
        String::with_capacity(keys.iter().map(|k| k.len() + 1).sum::<usize>() + 21 * args.len());
    for key in keys {
        lane.push_str(key);
        lane.push('\n');
    }
    for arg in args {
        let _ = write!(lane, "{arg} ");
    }
    lane
}

/// A reply of [`GCRA_SCRIPT`] for `decisions` decisions over `levels` levels, cut into each
/// decision's part (`-1, d1, ..., d_levels` or `i, d`); `None` for a reply of another shape.
fn split(reply: &[i64], levels: usize, decisions: usize) -> Option<Vec<Vec<i64>>> {
    let mut parts = Vec::with_capacity(decisions);
    let mut rest = reply;
    for _ in 0..decisions {
        let len = if *rest.first()? == -1 { levels + 1 } else { 2 };
        let (part, after) = rest.split_at_checked(len)?;
        parts.push(part.to_vec());
        rest = after;
    }
    rest.is_empty().then_some(parts)
}

/// A script reply of another shape than [`GCRA_SCRIPT`]'s.
#[derive(Debug)]
struct UnexpectedReply;

impl fmt::Display for UnexpectedReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unexpected reply from the rate-limit script")
    }
}

impl std::error::Error for UnexpectedReply {}

/// The decision a reply of [`GCRA_SCRIPT`] stands for over `levels`: the refusing level's, or the
/// most constraining admitted level's (the least left, then the longest until full). `None` for a
/// reply of another shape.
fn chain_outcome(levels: &[BudgetLevel], cost: u32, reply: &[i64]) -> Option<RateChain> {
    let rated: Vec<(usize, RateLimit)> = levels
        .iter()
        .enumerate()
        .filter_map(|(i, level)| level.limits.rate_limit.map(|limit| (i, limit)))
        .collect();
    match *reply {
        [-1, ref until_full @ ..] if until_full.len() == rated.len() => rated
            .iter()
            .zip(until_full)
            .map(|(&(level, limit), &d)| RateChain {
                level,
                outcome: outcome(limit, cost, d.max(0)),
            })
            .min_by_key(|chain| {
                (
                    chain.outcome.remaining,
                    std::cmp::Reverse(chain.outcome.reset),
                )
            }),
        [refused, d] => {
            let &(level, limit) = rated.get(usize::try_from(refused).ok()?)?;
            Some(RateChain {
                level,
                outcome: outcome(limit, cost, -1 - d.max(0)),
            })
        }
        _ => None,
    }
}

/// The emission interval the script counts with: whole microseconds, rounded up.
fn emission_micros(limit: RateLimit) -> u64 {
    limit.emission_nanos().div_ceil(1000)
}

/// The decision for one level: `reply` is `d ≥ 0`, admitted and full again in `d` µs, or `-1 - d`,
/// refused and full again in `d` µs (see [`GCRA_SCRIPT`]). Any reply decodes without overflow,
/// whatever a server sends.
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

    /// A reply for several coalesced decisions cuts into each one's part; any other shape is an
    /// error, never a panic.
    #[test]
    fn batch_replies_split_per_decision() {
        assert_eq!(
            split(&[-1, 5, 6, 0, 7, -1, 8, 9], 2, 3),
            Some(vec![vec![-1, 5, 6], vec![0, 7], vec![-1, 8, 9]])
        );
        assert_eq!(split(&[1, 4], 2, 1), Some(vec![vec![1, 4]]));
        for (reply, decisions) in [
            (&[-1, 5][..], 1),
            (&[-1, 5, 6, 1][..], 1),
            (&[][..], 1),
            (&[0, 1][..], 2),
        ] {
            assert_eq!(split(reply, 2, decisions), None, "{reply:?}");
        }
    }

    /// A chain's reply: the refusing level by its index among the rate-limited levels, else the
    /// level with the least left; replies of another shape are errors, never a panic.
    #[test]
    fn chain_replies_name_the_level() {
        use crate::key::KeyId;
        use crate::limits::{BudgetId, UsageLimits};
        let level = |id: &str, limit: Option<RateLimit>| BudgetLevel {
            id: BudgetId::Key(KeyId::new(id)),
            limits: UsageLimits {
                rate_limit: limit,
                credits: None,
            },
        };
        let levels = [
            level("key_child", Some(RateLimit::new(10, 60))),
            level("key_unlimited", None),
            level("key_parent", Some(RateLimit::new(4, 60))),
        ];
        // Admitted: the child has 9 left (6 s to full), the parent 2 (30 s): the parent.
        let admitted = chain_outcome(&levels, 1, &[-1, 6_000_000, 30_000_000]).unwrap();
        assert_eq!(admitted.level, 2);
        assert_eq!(admitted.outcome.remaining, 2);
        assert!(admitted.outcome.allowed);
        // Refused by the second rate-limited level: the parent, full again in 60 s.
        let refused = chain_outcome(&levels, 1, &[1, 60_000_000]).unwrap();
        assert_eq!(refused.level, 2);
        assert!(!refused.outcome.allowed);
        assert_eq!(refused.outcome.retry_after, Duration::from_secs(15));
        for reply in [
            &[][..],
            &[-1],
            &[-1, 1],
            &[2, 1],
            &[-5, 1],
            &[0, 1, 2],
            &[i64::MIN, 0],
        ] {
            assert!(chain_outcome(&levels, 1, reply).is_none(), "{reply:?}");
        }
    }
}
