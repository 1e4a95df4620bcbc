//! [`RateLimitLayer`]: per-key rate limits and usage credits, after [`ApiKeyLayer`](crate::layer::ApiKeyLayer).
//!
//! ```
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::key::ApiKey;
//! use tower_api_keys::quota::RateLimit;
//! use tower_api_keys::ratelimit::RateLimiter;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let master = ApiKey::new("change-me-to-a-long-random-string");
//! // One instance, in memory. The master key is limited only because this asks for it; stored keys
//! // carry their own `rate_limit` and `credits` (see `UsageLimits`).
//! let limiter = RateLimiter::in_memory().master(RateLimit::new(2, 60));
//! let app = Router::new()
//!     .route("/ledgers", get(|| async { "ledgers" }))
//!     .layer(limiter.layer())
//!     .layer(ApiKeyLayer::new(CachedResolver::new(MemoryStore::new())).master_key(master));
//!
//! let request = || {
//!     Request::get("/ledgers")
//!         .header("x-api-key", "change-me-to-a-long-random-string")
//!         .body(Body::empty())
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::OK);
//! assert_eq!(first.headers()["ratelimit-policy"], "\"rate\";q=2;w=60");
//! assert_eq!(first.headers()["ratelimit"], "\"rate\";r=1;t=30");
//! app.clone().oneshot(request()).await.unwrap();
//! let third = app.oneshot(request()).await.unwrap();
//! assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(third.headers()["retry-after"], "30");
//! # }
//! ```
//!
//! Layer order: `ApiKeyLayer` outside (it puts the [`Principal`] in the extensions), this layer
//! inside it; per route with `route_layer(limiter.layer().cost(5))`, where a request costs 5 units.
//! Requests without a principal (anonymous ones an optional `ApiKeyLayer` let through) pass
//! unlimited.
//!
//! ## What is limited
//! Each stored key carries two optional settings ([`UsageLimits`], filled from its record):
//! - [`RateLimit`] `{limit, period_seconds}`: a GCRA bucket (as in `governor`) of `limit` units,
//!   refilled evenly over `period_seconds`: a burst of `limit` at once, then `limit` per period
//!   sustained. A request costs [`RateLimitLayer::cost`] units (default 1); a cost above the key's
//!   `limit` can never pass.
//! - [`Credits`] `{remaining, refill}`: a number of units to spend, decremented exactly; with a
//!   [`Refill`], `remaining` is *set* to `amount` at 00:00 UTC each day, or on the 1st of each month.
//!
//! The master key is not limited unless [`RateLimiter::master`] gives it a rate limit. A refused
//! request consumes nothing: credits are spent first and given back if the rate limit then refuses.
//!
//! ## Responses
//! | situation | HTTP | code | gRPC |
//! |---|---|---|---|
//! | over the rate limit | 429, `Retry-After` | `RATE_LIMITED` | RESOURCE_EXHAUSTED |
//! | out of credits | 429, `Retry-After` (until the next refill, if any) | `USAGE_EXCEEDED` | RESOURCE_EXHAUSTED |
//! | a backend failed and its mode is closed | 503 | `AUTH_UNAVAILABLE` | UNAVAILABLE |
//!
//! Every response of a limited key, admitted or refused, carries the IETF fields
//! (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "rate";q=100;w=60` (plus
//! `"credits";q=<amount>;w=<refill period>` for refilled credits) and
//! `RateLimit: "rate";r=42;t=17, "credits";r=900;t=3600`, where `r` is what is left now and `t` the
//! seconds until the bucket is full again (or until the next refill). Refusals are rendered like the
//! rest of the crate's ([`JsonRejection`](crate::error::JsonRejection) by default,
//! [`GrpcRejection`](crate::error::GrpcRejection) with [`RateLimitLayer::rejection`]).
//!
//! ## Where the state lives
//! - **One instance**: [`MemoryRates`], one `governor` limiter per key in a bounded `moka` cache
//!   (a million keys cost bounded memory; an evicted key starts again with a full bucket), and
//!   [`MemoryCredits`], an exact atomic decrement per key.
//! - **A fleet** (feature `redis`): `RedisRates`, one Lua script call per decision (GCRA on Redis's
//!   clock), so N instances together never admit more than the limit.
//!
//! ## When a backend fails
//! Configurable per kind with [`FailMode`]: by default rate limits fail **open** (the request is
//! admitted, counted in metrics) and credits fail **closed** (503 `AUTH_UNAVAILABLE`). Failures
//! are logged at `warn` at most once a second per backend, with how many were left out since (an
//! outage under load does not write a line per request). Nothing is remembered about the failure:
//! the next request asks the backend again, so the layer recovers by itself.
//!
//! ## Metrics (feature `metrics`)
//! `api_key_rate_limit_total{outcome}`: `admitted`, `RATE_LIMITED`, `USAGE_EXCEEDED` or
//! `AUTH_UNAVAILABLE`, for each request of a limited key; `api_key_rate_limit_backend_errors_total
//! {backend="rates"|"credits", mode="open"|"closed"}`: backend failures and what was done.

mod bucket;
mod front;
mod future;
mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod service;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use http::{HeaderMap, HeaderName, HeaderValue};
use time::OffsetDateTime;

#[cfg(feature = "redis")]
pub use self::redis::{
    DEFAULT_PREFIX as DEFAULT_REDIS_PREFIX, DEFAULT_TIMEOUT as DEFAULT_REDIS_TIMEOUT,
    GCRA_SCRIPT as REDIS_GCRA_SCRIPT, RedisRates,
};
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use memory::{DEFAULT_MAX_KEYS, MemoryCredits, MemoryRates};
// `StoreCredits` is defined below.
pub use service::RateLimitService;

use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::quota::{Credits, RateLimit, Refill, RefillInterval, UsageLimits};
use crate::store::{CreditAdjustment, KeyStore, StoreError};
use crate::throttle::Throttle;

/// What to do when a backend (Redis, the key store) fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Admit the request without the check (counted in metrics, logged at `warn` once a second).
    Open,
    /// Refuse it with 503 `AUTH_UNAVAILABLE`.
    Closed,
}

impl FailMode {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

/// The rate-limit state of a key after a decision.
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

/// The credit state of a key after a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditStatus {
    /// Credits left now.
    pub remaining: u64,
    /// The key's refill, if any.
    pub refill: Option<Refill>,
    /// Until the next refill, if there is one.
    pub reset: Option<Duration>,
}

/// What the limiter decided for one request.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The rate-limit state, when the key has a rate limit and it was checked.
    pub rate: Option<RateStatus>,
    /// The configured rate limit (for `RateLimit-Policy`), even when it was not checked.
    pub rate_policy: Option<RateLimit>,
    /// The credit state, when the key has credits and they were checked.
    pub credits: Option<CreditStatus>,
    /// Why the request is refused; `None`: admitted.
    pub refusal: Option<AuthError>,
}

impl Decision {
    fn unlimited() -> Self {
        Self {
            rate: None,
            rate_policy: None,
            credits: None,
            refusal: None,
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

    /// Adds `RateLimit-Policy`, `RateLimit` and, on a 429, `Retry-After`.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let (policy, state) = Lines::with(|lines| {
            let policy = match (self.rate_policy, self.credits) {
                (Some(limit), None) => Some(rate_policy(limit, lines)),
                (rate, Some(credits)) => {
                    if let Some(limit) = rate {
                        write_rate_policy(lines, limit);
                    }
                    if let Some(refill) = credits.refill {
                        let window = match refill.interval {
                            RefillInterval::Daily => 86_400,
                            RefillInterval::Monthly => 30 * 86_400,
                        };
                        lines.separate();
                        lines.push("\"credits\";q=");
                        lines.push_u64(refill.amount);
                        lines.push(";w=");
                        lines.push_u64(window);
                    }
                    lines.cut()
                }
                (None, None) => None,
            };
            if let Some(rate) = self.rate {
                lines.push("\"rate\";r=");
                lines.push_u64(rate.remaining.into());
                lines.push(";t=");
                lines.push_u64(ceil_secs(rate.reset));
            }
            if let Some(credits) = self.credits {
                lines.separate();
                lines.push("\"credits\";r=");
                lines.push_u64(credits.remaining);
                if let Some(reset) = credits.reset {
                    lines.push(";t=");
                    lines.push_u64(ceil_secs(reset));
                }
            }
            (policy, lines.cut())
        });
        if let Some(value) = policy {
            headers.insert(RATELIMIT_POLICY, value);
        }
        if let Some(value) = state {
            headers.insert(RATELIMIT, value);
        }
        if let Some(retry_after) = self.refusal.as_ref().and_then(AuthError::retry_after) {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
    }
}

fn write_rate_policy(lines: &mut Lines, limit: RateLimit) {
    lines.push("\"rate\";q=");
    lines.push_u64(limit.limit.into());
    lines.push(";w=");
    lines.push_u64(limit.period_seconds.into());
}

/// `RateLimit-Policy` for a rate limit alone: the value this thread made last time when the limit
/// is the same (a clone shares its bytes), else a new one.
fn rate_policy(limit: RateLimit, lines: &mut Lines) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(RateLimit, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let kept = LAST.try_with(|last| match &*last.try_borrow().ok()? {
        Some((seen, value)) if *seen == limit => Some(value.clone()),
        _ => None,
    });
    if let Ok(Some(value)) = kept {
        return value;
    }
    write_rate_policy(lines, limit);
    let value = lines.cut().expect("a policy was written");
    let _ = LAST.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = Some((limit, value.clone()));
        }
    });
    value
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Bytes of the slab each thread writes header values into.
const SLAB_BYTES: usize = 1024;

/// The longest line written (two items with 20-digit numbers are about 100 bytes).
const LINE_BYTES: usize = 128;

/// Header values being written, straight into this thread's slab, and cut from it once written:
/// one allocation per slab (some 20 to 40 values) instead of one per value, and no copy. A slab's
/// memory is freed once the last value cut from it is dropped (servers drop a response's headers
/// once they have written them).
struct Lines {
    slab: bytes::BytesMut,
    /// Whether something was written since the last cut.
    started: bool,
}

impl Lines {
    /// Calls `f` with this thread's slab (or a fresh one, during thread teardown or re-entry).
    fn with<R>(f: impl FnOnce(&mut Lines) -> R) -> R {
        thread_local! {
            static SLAB: std::cell::RefCell<Lines> =
                std::cell::RefCell::new(Lines { slab: bytes::BytesMut::new(), started: false });
        }
        let mut f = Some(f);
        let on_slab = SLAB.try_with(|slab| {
            let mut lines = slab.try_borrow_mut().ok()?;
            let f = f.take()?;
            Some(f(&mut lines))
        });
        match (on_slab, f) {
            (Ok(Some(out)), _) => out,
            (_, Some(f)) => f(&mut Lines {
                slab: bytes::BytesMut::new(),
                started: false,
            }),
            (_, None) => unreachable!("`f` runs only when the slab is borrowed, and then returns"),
        }
    }

    /// Appends `s`; the first write of a line makes sure the slab holds a whole line.
    fn push(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if !self.started {
            self.started = true;
            if self.slab.capacity() - self.slab.len() < LINE_BYTES {
                self.slab.reserve(SLAB_BYTES);
            }
        }
        self.slab.extend_from_slice(bytes);
    }

    /// `", "` when something was written since the last cut.
    fn separate(&mut self) {
        if self.started {
            self.push(", ");
        }
    }

    /// Appends `n` in decimal.
    fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_bytes(&digits[start..]);
    }

    /// What was written since the last cut, as a header value (`None`: nothing).
    fn cut(&mut self) -> Option<HeaderValue> {
        if !std::mem::take(&mut self.started) {
            return None;
        }
        let line = self.slab.split().freeze();
        // Only digits, quotes, `;`, `=`, `,` and spaces are ever written.
        Some(HeaderValue::from_maybe_shared(line).expect("a valid header value"))
    }
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
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

/// The outcome of spending credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spend {
    /// Spent; this is what is left.
    Spent { remaining: u64 },
    /// Not enough left: nothing spent.
    Exhausted { remaining: u64 },
    /// The store knows no credits for the key (they were removed since its principal was loaded).
    NotCounted,
}

/// Where rate-limit state lives: [`MemoryRates`] or `RedisRates`.
#[derive(Clone, Debug)]
pub struct RateBackend(RateKind);

#[derive(Clone, Debug)]
enum RateKind {
    Memory(MemoryRates),
    #[cfg(feature = "redis")]
    Redis(RedisRates),
}

impl From<MemoryRates> for RateBackend {
    fn from(rates: MemoryRates) -> Self {
        Self(RateKind::Memory(rates))
    }
}

#[cfg(feature = "redis")]
impl From<RedisRates> for RateBackend {
    fn from(rates: RedisRates) -> Self {
        Self(RateKind::Redis(rates))
    }
}

impl RateBackend {
    async fn check(
        &self,
        key: &KeyId,
        limit: RateLimit,
        cost: u32,
    ) -> Result<RateOutcome, StoreError> {
        match &self.0 {
            RateKind::Memory(rates) => Ok(rates.check(key, limit, cost)),
            #[cfg(feature = "redis")]
            RateKind::Redis(rates) => rates.check(key, limit, cost).await,
        }
    }
}

/// Where credits are counted: [`MemoryCredits`] or [`StoreCredits`].
#[derive(Clone, Debug)]
pub struct CreditBackend(CreditKind);

#[derive(Clone)]
enum CreditKind {
    Memory(MemoryCredits),
    Store(StoreCredits),
}

impl fmt::Debug for CreditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory(m) => m.fmt(f),
            Self::Store(s) => s.fmt(f),
        }
    }
}

/// Credits counted in the key store itself ([`KeyStore::adjust_credits`]): every spend is one
/// atomic conditional update of the key's record, so instances sharing the store (PostgreSQL, a
/// SQLite file) never spend more than there is together, `remaining` is always current in the
/// management API, and it survives restarts of anything but the store. It costs one store write
/// per request of a key with credits (none for keys without).
#[derive(Clone)]
pub struct StoreCredits {
    store: Arc<dyn KeyStore>,
}

impl fmt::Debug for StoreCredits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCredits").finish_non_exhaustive()
    }
}

impl StoreCredits {
    /// Counts credits in `store` (the one keys are created in).
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self { store }
    }
}

impl From<StoreCredits> for CreditBackend {
    fn from(credits: StoreCredits) -> Self {
        Self(CreditKind::Store(credits))
    }
}

impl From<MemoryCredits> for CreditBackend {
    fn from(credits: MemoryCredits) -> Self {
        Self(CreditKind::Memory(credits))
    }
}

impl CreditBackend {
    async fn spend(
        &self,
        key: &KeyId,
        credits: &Credits,
        cost: u32,
        now: OffsetDateTime,
    ) -> Result<Spend, StoreError> {
        match &self.0 {
            CreditKind::Memory(ledger) => Ok(ledger.spend(key, credits, cost, now)),
            CreditKind::Store(ledger) => Ok(
                match ledger
                    .store
                    .adjust_credits(key, -i64::from(cost), now)
                    .await?
                {
                    Some(CreditAdjustment::Applied { remaining }) => Spend::Spent { remaining },
                    Some(CreditAdjustment::Insufficient { remaining }) => {
                        Spend::Exhausted { remaining }
                    }
                    None => Spend::NotCounted,
                },
            ),
        }
    }

    async fn refund(&self, key: &KeyId, cost: u32, now: OffsetDateTime) -> Result<(), StoreError> {
        match &self.0 {
            CreditKind::Memory(ledger) => {
                ledger.refund(key, cost, now);
                Ok(())
            }
            CreditKind::Store(ledger) => ledger
                .store
                .adjust_credits(key, i64::from(cost), now)
                .await
                .map(drop),
        }
    }
}

type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The backends one decision asks. [`RateLimiter::decide`] is written once against this; the
/// configured backends ([`Engine`]) may wait on I/O, [`InMemory`] ones answer at once, so a
/// decision on them runs to completion in one poll without a boxed or large future.
trait Backends {
    fn spend(
        &self,
        key: &KeyId,
        credits: &Credits,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send;

    fn refund(
        &self,
        key: &KeyId,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn rate(
        &self,
        key: &KeyId,
        limit: RateLimit,
        cost: u32,
    ) -> impl Future<Output = Result<RateOutcome, StoreError>> + Send;
}

impl Backends for Engine {
    fn spend(
        &self,
        key: &KeyId,
        credits: &Credits,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send {
        self.credits.spend(key, credits, cost, now)
    }

    fn refund(
        &self,
        key: &KeyId,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.credits.refund(key, cost, now)
    }

    fn rate(
        &self,
        key: &KeyId,
        limit: RateLimit,
        cost: u32,
    ) -> impl Future<Output = Result<RateOutcome, StoreError>> + Send {
        self.rates.check(key, limit, cost)
    }
}

/// The backends of a decision that asks only memory: in-memory rates, and in-memory credits or
/// none (a key without credits never asks the credit backend, wherever it is).
struct InMemory<'a> {
    rates: &'a MemoryRates,
    credits: Option<&'a MemoryCredits>,
}

impl Backends for InMemory<'_> {
    fn spend(
        &self,
        key: &KeyId,
        credits: &Credits,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Spend, StoreError>> + Send {
        // `None` only for keys without credits, which are never spent for.
        std::future::ready(Ok(match self.credits {
            Some(ledger) => ledger.spend(key, credits, cost, now),
            None => Spend::NotCounted,
        }))
    }

    fn refund(
        &self,
        key: &KeyId,
        cost: u32,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Some(ledger) = self.credits {
            ledger.refund(key, cost, now);
        }
        std::future::ready(Ok(()))
    }

    fn rate(
        &self,
        key: &KeyId,
        limit: RateLimit,
        cost: u32,
    ) -> impl Future<Output = Result<RateOutcome, StoreError>> + Send {
        std::future::ready(Ok(self.rates.check(key, limit, cost)))
    }
}

#[derive(Clone)]
struct Engine {
    rates: RateBackend,
    credits: CreditBackend,
    master: Option<RateLimit>,
    rate_failure: FailMode,
    credit_failure: FailMode,
    clock: Clock,
}

/// Decides, per request, whether a key is within its rate limit and credits. Cheap to clone (one
/// `Arc`); clones share their state. Make layers with [`RateLimiter::layer`].
#[derive(Clone)]
pub struct RateLimiter(Arc<Engine>);

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rates", &self.0.rates)
            .field("credits", &self.0.credits)
            .field("master", &self.0.master)
            .field("rate_failure", &self.0.rate_failure)
            .field("credit_failure", &self.0.credit_failure)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter keeping rate-limit state in `rates` and counting credits in `credits`.
    pub fn new(rates: impl Into<RateBackend>, credits: impl Into<CreditBackend>) -> Self {
        let rates = rates.into();
        let credits = credits.into();
        Self(Arc::new(Engine {
            rates,
            credits,
            master: None,
            rate_failure: FailMode::Open,
            credit_failure: FailMode::Closed,
            clock: Arc::new(OffsetDateTime::now_utc),
        }))
    }

    /// One instance, all in memory: [`MemoryRates`] and [`MemoryCredits`].
    pub fn in_memory() -> Self {
        Self::new(MemoryRates::new(), MemoryCredits::new())
    }

    /// A changed copy (clones made before keep the old settings; the state is shared).
    fn edit(mut self, f: impl FnOnce(&mut Engine)) -> Self {
        f(Arc::make_mut(&mut self.0));
        self
    }

    /// Limits the master key too (by default it is not limited).
    #[must_use]
    pub fn master(self, limit: RateLimit) -> Self {
        self.edit(|e| e.master = Some(limit))
    }

    /// What to do when the rate-limit backend fails (default [`FailMode::Open`]).
    #[must_use]
    pub fn on_rate_error(self, mode: FailMode) -> Self {
        self.edit(|e| e.rate_failure = mode)
    }

    /// What to do when the credit backend fails (default [`FailMode::Closed`]).
    #[must_use]
    pub fn on_credit_error(self, mode: FailMode) -> Self {
        self.edit(|e| e.credit_failure = mode)
    }

    /// The wall clock used for credit refills (default `OffsetDateTime::now_utc`); for tests.
    #[must_use]
    pub fn clock(self, clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        self.edit(|e| e.clock = Arc::new(clock))
    }

    /// A layer limiting each request at cost 1 (change with [`RateLimitLayer::cost`]).
    pub fn layer(&self) -> RateLimitLayer {
        RateLimitLayer::new(self.clone())
    }

    /// The decision for one request, made now, when it asks only in-memory backends (rates in
    /// memory, and credits in memory or a key without credits); `None` when it would wait on I/O
    /// (then [`check`](Self::check) it).
    pub(crate) fn check_now(&self, principal: &Principal, cost: u32) -> Option<Decision> {
        let rates = match &self.0.rates.0 {
            RateKind::Memory(rates) => rates,
            #[cfg(feature = "redis")]
            RateKind::Redis(_) => return None,
        };
        let limits = self.limits_of(principal);
        let credits = match (&self.0.credits.0, limits.credits) {
            (CreditKind::Memory(ledger), _) => Some(ledger),
            (CreditKind::Store(_), None) => None,
            (CreditKind::Store(_), Some(_)) => return None,
        };
        let backends = InMemory { rates, credits };
        let decision = self
            .decide(&backends, principal.key_id(), limits, cost)
            .now_or_never();
        Some(decision.expect("in-memory backends answer without waiting"))
    }

    /// The limits that apply to `principal`.
    fn limits_of(&self, principal: &Principal) -> UsageLimits {
        if principal.is_master() {
            UsageLimits {
                rate_limit: self.0.master,
                credits: None,
            }
        } else {
            *principal.limits()
        }
    }

    /// Whether `principal` is limited at all (a request of an unlimited key costs one branch).
    pub fn applies_to(&self, principal: &Principal) -> bool {
        !self.limits_of(principal).is_unlimited()
    }

    /// Decides one request of `principal` costing `cost` units, and spends them if admitted.
    pub async fn check(&self, principal: &Principal, cost: u32) -> Decision {
        match self.check_now(principal, cost) {
            Some(decision) => decision,
            None => {
                let limits = self.limits_of(principal);
                self.decide(&*self.0, principal.key_id(), limits, cost)
                    .await
            }
        }
    }

    /// The one decision for a request of `key` under `limits` (those of its principal), whatever
    /// the backends: [`check`](Self::check) awaits it on the configured ones,
    /// [`check_now`](Self::check_now) runs it to completion on in-memory ones.
    async fn decide<B: Backends>(
        &self,
        backends: &B,
        key: &KeyId,
        limits: UsageLimits,
        cost: u32,
    ) -> Decision {
        if limits.is_unlimited() {
            return Decision::unlimited();
        }
        let engine = &*self.0;
        let mut decision = Decision {
            rate_policy: limits.rate_limit,
            ..Decision::unlimited()
        };
        // The wall clock is for refills: read only for a key with credits.
        let now = match limits.credits {
            Some(_) => (engine.clock)(),
            None => OffsetDateTime::UNIX_EPOCH,
        };
        let mut spent = false;
        if let Some(credits) = &limits.credits {
            let reset = credits
                .refill
                .map(|r| (r.interval.next_refill(now) - now).unsigned_abs());
            match backends.spend(key, credits, cost, now).await {
                Ok(Spend::Spent { remaining }) => {
                    spent = true;
                    decision.credits = Some(CreditStatus {
                        remaining,
                        refill: credits.refill,
                        reset,
                    });
                }
                Ok(Spend::NotCounted) => {}
                Ok(Spend::Exhausted { remaining }) => {
                    decision.credits = Some(CreditStatus {
                        remaining,
                        refill: credits.refill,
                        reset,
                    });
                    decision.refusal = Some(AuthError::UsageExceeded {
                        retry_after: reset.map(ceil_secs),
                    });
                    return self.finish(decision);
                }
                Err(error) => {
                    backend_failed("credits", engine.credit_failure, &error);
                    if engine.credit_failure == FailMode::Closed {
                        decision.refusal = Some(AuthError::Unavailable(error));
                        return self.finish(decision);
                    }
                }
            }
        }
        if let Some(limit) = limits.rate_limit {
            match backends.rate(key, limit, cost).await {
                Ok(outcome) => {
                    decision.rate = Some(RateStatus {
                        limit,
                        remaining: outcome.remaining,
                        reset: outcome.reset,
                        retry_after: outcome.retry_after,
                    });
                    if !outcome.allowed {
                        decision.refusal = Some(AuthError::RateLimited {
                            retry_after: ceil_secs(outcome.retry_after).max(1),
                        });
                    }
                }
                Err(error) => {
                    backend_failed("rates", engine.rate_failure, &error);
                    if engine.rate_failure == FailMode::Closed {
                        decision.refusal = Some(AuthError::Unavailable(error));
                    }
                }
            }
            if decision.refusal.is_some() && spent {
                // A refused request consumes nothing: give the credits back.
                match backends.refund(key, cost, now).await {
                    Ok(()) => {
                        if let Some(credits) = &mut decision.credits {
                            credits.remaining = credits.remaining.saturating_add(cost.into());
                        }
                    }
                    Err(error) => {
                        static REFUND: Throttle = Throttle::new();
                        if let Some(left_out) = REFUND.admit() {
                            tracing::warn!(
                                api_key_id = key.as_str(),
                                error = %error,
                                left_out,
                                "could not give back the credits of a rate-limited request"
                            );
                        }
                    }
                }
            }
        }
        self.finish(decision)
    }

    fn finish(&self, decision: Decision) -> Decision {
        metrics::decided(&decision);
        decision
    }
}

/// A backend failure: counted every time, logged at most once a second per backend (an outage
/// under load would otherwise write a line per request), with how many were left out.
fn backend_failed(backend: &'static str, mode: FailMode, error: &StoreError) {
    static RATES: Throttle = Throttle::new();
    static CREDITS: Throttle = Throttle::new();
    let throttle = if backend == "rates" { &RATES } else { &CREDITS };
    if let Some(left_out) = throttle.admit() {
        tracing::warn!(
            backend,
            mode = mode.as_str(),
            error = %error,
            left_out,
            "rate-limit backend failed; failing {}",
            mode.as_str()
        );
    }
    metrics::backend_error(backend, mode);
}

#[cfg(feature = "metrics")]
mod metrics {
    use ::metrics::{Key, Label, Level, Metadata};

    use super::{Decision, FailMode};
    use crate::error::ErrorCode;

    use crate::metrics::{
        RATE_LIMIT_BACKEND_ERRORS_TOTAL as BACKEND_ERRORS_TOTAL,
        RATE_LIMIT_TOTAL as DECISIONS_TOTAL,
    };

    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    macro_rules! key {
        ($name:expr, $($k:literal => $v:expr),+) => {{
            static LABELS: &[Label] = &[$(Label::from_static_parts($k, $v)),+];
            static KEY: Key = Key::from_static_parts($name, LABELS);
            &KEY
        }};
    }

    fn count(key: &'static Key) {
        ::metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA).increment(1));
    }

    pub(super) fn decided(decision: &Decision) {
        if !decision.is_limited() {
            return;
        }
        count(match decision.refusal.as_ref().map(|e| e.code()) {
            None => key!(DECISIONS_TOTAL, "outcome" => "admitted"),
            Some(ErrorCode::RateLimited) => {
                key!(DECISIONS_TOTAL, "outcome" => ErrorCode::RateLimited.as_str())
            }
            Some(ErrorCode::UsageExceeded) => {
                key!(DECISIONS_TOTAL, "outcome" => ErrorCode::UsageExceeded.as_str())
            }
            Some(_) => key!(DECISIONS_TOTAL, "outcome" => ErrorCode::Unavailable.as_str()),
        });
    }

    pub(super) fn backend_error(backend: &'static str, mode: FailMode) {
        count(match (backend, mode) {
            ("rates", FailMode::Open) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "rates", "mode" => "open")
            }
            ("rates", FailMode::Closed) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "rates", "mode" => "closed")
            }
            (_, FailMode::Open) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "credits", "mode" => "open")
            }
            (_, FailMode::Closed) => {
                key!(BACKEND_ERRORS_TOTAL, "backend" => "credits", "mode" => "closed")
            }
        });
    }
}

#[cfg(not(feature = "metrics"))]
mod metrics {
    use super::{Decision, FailMode};

    #[inline(always)]
    pub(super) fn decided(_: &Decision) {}

    #[inline(always)]
    pub(super) fn backend_error(_: &'static str, _: FailMode) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "metrics")]
    #[test]
    fn metrics_count_admitted_and_refused_by_reason() {
        use futures_util::FutureExt;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let limiter = RateLimiter::in_memory();
        let principal = |id: &str, limits| {
            Principal::scoped(KeyId::new(id), "n", "o", "a", Default::default(), None)
                .with_limits(limits)
        };
        let rated = principal(
            "key_r",
            UsageLimits {
                rate_limit: Some(RateLimit::new(2, 60)),
                credits: None,
            },
        );
        let paid = principal(
            "key_c",
            UsageLimits {
                rate_limit: None,
                credits: Some(Credits::new(1)),
            },
        );
        let free = principal("key_f", UsageLimits::NONE);
        ::metrics::with_local_recorder(&recorder, || {
            for p in [&rated, &rated, &rated, &paid, &paid, &free] {
                limiter.check(p, 1).now_or_never().unwrap();
            }
        });
        let text = handle.render();
        let count = |outcome: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "api_key_rate_limit_total{{outcome=\"{outcome}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.to_owned())
        };
        assert_eq!(count("admitted").as_deref(), Some("3"), "{text}");
        assert_eq!(count("RATE_LIMITED").as_deref(), Some("1"), "{text}");
        assert_eq!(count("USAGE_EXCEEDED").as_deref(), Some("1"), "{text}");
    }

    /// Values cut from one slab and from the next ones keep their own bytes, however many are cut
    /// and whichever are dropped first.
    #[test]
    fn header_values_from_the_slab_keep_their_bytes() {
        let mut kept = Vec::new();
        for i in 0..(3 * SLAB_BYTES as u64) {
            let value = Lines::with(|lines| {
                lines.push("\"rate\";r=");
                lines.push_u64(i);
                lines.push(";t=");
                lines.push_u64(u64::MAX - i);
                lines.cut().unwrap()
            });
            assert_eq!(value, format!("\"rate\";r={i};t={}", u64::MAX - i));
            if i % 7 == 0 {
                kept.push((i, value));
            }
        }
        for (i, value) in kept.iter().rev() {
            assert_eq!(value, &format!("\"rate\";r={i};t={}", u64::MAX - i));
        }
        assert_eq!(Lines::with(|lines| lines.cut()), None);
    }

    #[test]
    fn headers_follow_the_draft() {
        let decision = Decision {
            rate: Some(RateStatus {
                limit: RateLimit::new(100, 60),
                remaining: 42,
                reset: Duration::from_millis(16_200),
                retry_after: Duration::ZERO,
            }),
            rate_policy: Some(RateLimit::new(100, 60)),
            credits: Some(CreditStatus {
                remaining: 900,
                refill: Some(Refill {
                    interval: RefillInterval::Daily,
                    amount: 1000,
                }),
                reset: Some(Duration::from_secs(3600)),
            }),
            refusal: None,
        };
        let mut headers = HeaderMap::new();
        decision.write_headers(&mut headers);
        assert_eq!(
            headers["ratelimit-policy"],
            "\"rate\";q=100;w=60, \"credits\";q=1000;w=86400"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"rate\";r=42;t=17, \"credits\";r=900;t=3600"
        );
        assert!(!headers.contains_key("retry-after"));
        let refused = Decision {
            refusal: Some(AuthError::RateLimited { retry_after: 7 }),
            ..decision
        };
        let mut headers = HeaderMap::new();
        refused.write_headers(&mut headers);
        assert_eq!(headers["retry-after"], "7");
    }

    #[test]
    fn rate_only_headers_follow_the_limit_of_each_decision() {
        let decision = |limit: RateLimit, remaining: u32, reset: Duration| Decision {
            rate: Some(RateStatus {
                limit,
                remaining,
                reset,
                retry_after: Duration::ZERO,
            }),
            rate_policy: Some(limit),
            credits: None,
            refusal: None,
        };
        // The same limit twice (the thread's kept policy value), another, then the first again.
        let cases = [
            (
                RateLimit::new(100, 60),
                0,
                Duration::ZERO,
                "q=100;w=60",
                "r=0;t=0",
            ),
            (
                RateLimit::new(100, 60),
                99,
                Duration::from_millis(1),
                "q=100;w=60",
                "r=99;t=1",
            ),
            (
                RateLimit::new(4_294_967_295, 1),
                4_294_967_295,
                Duration::from_secs(18_446_744_073_709_551_615),
                "q=4294967295;w=1",
                "r=4294967295;t=18446744073709551615",
            ),
            (
                RateLimit::new(100, 60),
                7,
                Duration::from_secs(3),
                "q=100;w=60",
                "r=7;t=3",
            ),
        ];
        for (limit, remaining, reset, policy, state) in cases {
            let mut headers = HeaderMap::new();
            decision(limit, remaining, reset).write_headers(&mut headers);
            assert_eq!(headers["ratelimit-policy"], format!("\"rate\";{policy}"));
            assert_eq!(headers["ratelimit"], format!("\"rate\";{state}"));
        }
    }
}
