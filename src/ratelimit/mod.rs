//! [`RateLimitLayer`]: per-key rate limits and usage credits, after [`ApiKeyLayer`](crate::layer::ApiKeyLayer).
//!
//! ```
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::key::ApiKey;
//! use tower_api_keys::limits::RateLimit;
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
//! Layer order: `ApiKeyLayer` outside (it puts the [`Principal`](crate::principal::Principal) in
//! the extensions), this layer inside it; per route with `route_layer(limiter.layer().cost(5))`, where a request costs 5 units.
//! Requests without a principal (anonymous ones an optional `ApiKeyLayer` let through) pass
//! unlimited.
//!
//! ## What is limited
//! Each stored key carries two optional settings ([`UsageLimits`](crate::limits::UsageLimits),
//! filled from its record):
//! - [`RateLimit`](crate::limits::RateLimit) `{limit, period_seconds}`: a GCRA bucket (as in `governor`) of `limit` units,
//!   refilled evenly over `period_seconds`: a burst of `limit` at once, then `limit` per period
//!   sustained. A request costs [`RateLimitLayer::cost`] units (default 1); a cost above the key's
//!   `limit` can never pass.
//! - [`Credits`](crate::limits::Credits) `{remaining, refill}`: a number of units to spend,
//!   decremented exactly; with a [`Refill`](crate::limits::Refill), `remaining` is *set* to `amount` at 00:00 UTC each day, or on the 1st of each month.
//!
//! ## A budget binds a subtree (invariant I3)
//! A request counts against every level of its key's [`Budget`](crate::limits::Budget)
//! ([`Principal::budget`](crate::principal::Principal::budget)): the key's own limits, each
//! limited ancestor's (nearest first), then the account pool's and the owner pool's. It is
//! admitted only if **every** level admits it (rate limit and credits), and then spends its cost
//! at every level; **a refused request spends nothing anywhere**. So whatever a subtree does, its
//! requests together never pass the limits of the key at its root. Credits are spent first, at
//! every level at once or nowhere, and given back if a rate limit then refuses; the rate limits of
//! all levels are decided in one atomic step (in memory under the levels' locks, taken in chain
//! order; on Redis in one script call). A key with no limit anywhere in its chain costs one
//! branch. The master key is not limited unless [`RateLimiter::master`] gives it a rate limit.
//!
//! ## Responses
//! | situation | HTTP | code | gRPC |
//! |---|---|---|---|
//! | over the rate limit | 429, `Retry-After` | `RATE_LIMITED` | RESOURCE_EXHAUSTED |
//! | out of credits | 429, `Retry-After` (until the next refill, if any) | `USAGE_EXCEEDED` | RESOURCE_EXHAUSTED |
//! | a backend failed and its mode is closed | 503 | `AUTH_UNAVAILABLE` | UNAVAILABLE |
//!
//! Every response of a limited key, admitted or refused, carries the IETF fields, describing the
//! level that refused, or else the most constraining level (the least left):
//! (draft-ietf-httpapi-ratelimit-headers): `RateLimit-Policy: "rate";q=100;w=60` (plus
//! `"credits";q=<amount>;w=<refill period>` for refilled credits) and
//! `RateLimit: "rate";r=42;t=17, "credits";r=900;t=3600`, where `r` is what is left now and `t` the
//! seconds until the bucket is full again (or until the next refill). Refusals are rendered like the
//! rest of the crate's ([`JsonRejection`](crate::error::JsonRejection) by default,
//! [`GrpcRejection`](crate::error::GrpcRejection) with [`RateLimitLayer::rejection`]).
//!
//! ## Where the state lives
//! - **One instance**: [`MemoryRates`], a GCRA bucket per budget level in a bounded `moka` cache
//!   behind a small per-thread front (a million levels cost bounded memory; an evicted level starts
//!   again with a full bucket), and [`MemoryCredits`], an exact decrement per level.
//! - **A fleet** (feature `redis`): `RedisRates`, one Lua script call per decision whatever the
//!   depth of the chain (GCRA on Redis's clock, every level in one call), pipelined on a
//!   multiplexed connection (or a small pool of them), so N instances together never admit more than any level's limit; credits in
//!   the key store ([`StoreCredits`]), every level of the chain in one transaction.
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

mod backends;
mod bucket;
mod credits;
mod decision;
mod front;
pub mod future;
mod gcra;
mod headers;
#[cfg(feature = "redis")]
mod lanes;
mod layer;
mod limiter;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod service;

pub use backends::{CreditBackend, RateBackend, StoreCredits};
pub use credits::MemoryCredits;
pub use decision::{CreditStatus, Decision, FailMode, RateStatus};
pub use layer::RateLimitLayer;
pub use limiter::RateLimiter;
pub use memory::{DEFAULT_MAX_KEYS, ManualClock, MemoryRates};
#[cfg(feature = "redis")]
pub use redis::{
    DEFAULT_CONNECTIONS as DEFAULT_REDIS_CONNECTIONS, DEFAULT_PREFIX as DEFAULT_REDIS_PREFIX,
    DEFAULT_TIMEOUT as DEFAULT_REDIS_TIMEOUT, GCRA_SCRIPT as REDIS_GCRA_SCRIPT, RedisRates,
};
pub use service::RateLimitService;
