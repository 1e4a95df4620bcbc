//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `api_key_requests_total` | counter | `outcome`: `ok` or the error code (e.g. `AUTH_INVALID_API_KEY`); `kind` on `ok`: `master`, `scoped` or `anonymous` | every request [`ApiKeyLayer`](crate::layer::ApiKeyLayer) admitted or refused |
//! | `api_key_guard_refusals_total` | counter | `outcome`: the error code (`AUTH_INSUFFICIENT_PERMISSIONS`, `AUTH_MISSING_API_KEY`, `AUTH_MISSING_PRINCIPAL`) | every request a [`RequireScopesLayer`](crate::guard::RequireScopesLayer) guard refused |
//! | `api_key_rate_limit_total` | counter | `outcome`: `admitted`, `RATE_LIMITED`, `USAGE_EXCEEDED` or `AUTH_UNAVAILABLE` | every request of a limited key a [`RateLimitLayer`](crate::ratelimit::RateLimitLayer) decided |
//! | `api_key_rate_limit_backend_errors_total` | counter | `backend`: `rates` or `credits`; `mode`: `open` or `closed` | every failed limiter backend call (Redis, the key store) and how it was handled |
//! | `api_key_lookup_seconds` | histogram | `outcome`: `found`, `unknown`, `error` or `timeout` | latency of key-store lookups (cache misses only) |
//! | `api_key_lookups_shed_total` | counter | | cache misses the resolver's lookup bound answered 503 without asking the store ([`LOOKUPS_SHED_TOTAL`]) |
//! | `api_key_cache_degraded` | gauge | | 1 while a resolver is in degraded mode (an invalidation subscription is down or not yet up), else 0 ([`CACHE_DEGRADED`]) |
//! | `api_key_fleet_instances` | gauge | | live instances a fleet subscription hears heartbeats from, itself included ([`FLEET_INSTANCES`]) |
//! | `api_key_fleet_oldest_unacknowledged_seconds` | gauge | | age of the oldest invalidation published here that a live instance has not acknowledged, 0 when none ([`OLDEST_UNACKNOWLEDGED_SECONDS`]) |
//! | `api_key_fleet_applied_sequence` | gauge | `instance` | the last sequence number of the revocation log this instance applied ([`APPLIED_SEQUENCE`]) |
//! | `api_key_fleet_acknowledgement_seconds` | histogram | | time from publishing an invalidation to its acknowledgement by every live instance (complete receipts) ([`ACKNOWLEDGEMENT_SECONDS`]) |
//! | `api_key_fleet_laggards_total` | counter | `instance` | instances that had not acknowledged an invalidation by the deadline ([`LAGGARDS_TOTAL`]) |
//!
//! `api_key_requests_total` records the authentication decision: a request admitted by the layer and
//! then refused by a [`RequireScopesLayer`](crate::guard::RequireScopesLayer) guard counts as `ok` there, and once in
//! `api_key_guard_refusals_total` (the authorization decision), so neither counter counts a request
//! twice.
//! Anonymous requests are CORS preflights and, with an optional layer, requests without a key.
//!
//! Install any `metrics` recorder (for example `metrics-exporter-prometheus`) and these appear;
//! `describe()` adds their help texts. Every label on the request path is a static string: recording
//! allocates nothing there (the fleet's `instance` labels are recorded off it).
//! Without the feature every helper is an empty inline function: nothing is compiled in.

/// Name of the request counter.
pub const REQUESTS_TOTAL: &str = "api_key_requests_total";
/// Name of the counter of requests refused by scope guards.
pub const GUARD_REFUSALS_TOTAL: &str = "api_key_guard_refusals_total";
/// Name of the counter of rate-limit decisions, by outcome.
pub const RATE_LIMIT_TOTAL: &str = "api_key_rate_limit_total";
/// Name of the counter of rate-limit backend failures, by backend and fail mode.
pub const RATE_LIMIT_BACKEND_ERRORS_TOTAL: &str = "api_key_rate_limit_backend_errors_total";
/// Name of the store lookup latency histogram, in seconds.
pub const LOOKUP_SECONDS: &str = "api_key_lookup_seconds";
/// Name of the counter of store lookups refused by the resolver's lookup bound.
pub const LOOKUPS_SHED_TOTAL: &str = "api_key_lookups_shed_total";
/// Name of the gauge that is 1 while a resolver is in degraded mode, 0 otherwise.
pub const CACHE_DEGRADED: &str = "api_key_cache_degraded";
/// Name of the gauge of live instances this instance hears heartbeats from (itself included).
pub const FLEET_INSTANCES: &str = "api_key_fleet_instances";
/// Name of the gauge of the age, in seconds, of the oldest invalidation published here that some
/// live instance has not acknowledged yet (0 when none).
pub const OLDEST_UNACKNOWLEDGED_SECONDS: &str = "api_key_fleet_oldest_unacknowledged_seconds";
/// Name of the gauge of the last sequence number an instance applied (label `instance`).
pub const APPLIED_SEQUENCE: &str = "api_key_fleet_applied_sequence";
/// Name of the histogram of the time from publishing an invalidation to its acknowledgement by
/// every live instance, in seconds (only complete receipts are recorded).
pub const ACKNOWLEDGEMENT_SECONDS: &str = "api_key_fleet_acknowledgement_seconds";
/// Name of the counter of instances that had not acknowledged an invalidation by the deadline
/// (label `instance`: the laggard).
pub const LAGGARDS_TOTAL: &str = "api_key_fleet_laggards_total";

/// Every metric the crate records, once: the list [`describe`] describes and the tests check.
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    GUARD_REFUSALS_TOTAL,
    RATE_LIMIT_TOTAL,
    RATE_LIMIT_BACKEND_ERRORS_TOTAL,
    LOOKUP_SECONDS,
    LOOKUPS_SHED_TOTAL,
    CACHE_DEGRADED,
    FLEET_INSTANCES,
    OLDEST_UNACKNOWLEDGED_SECONDS,
    APPLIED_SEQUENCE,
    ACKNOWLEDGEMENT_SECONDS,
    LAGGARDS_TOTAL,
];

#[cfg(feature = "metrics")]
pub use enabled::describe;
#[cfg(feature = "metrics")]
pub(crate) use enabled::{admitted, refused_by_guard, rejected, timed_lookup};

#[cfg(feature = "metrics")]
mod enabled {
    use std::future::Future;
    use std::sync::OnceLock;
    use std::time::Instant;

    use ::metrics::{Key, Label, Level, Metadata};

    use super::{GUARD_REFUSALS_TOTAL, LOOKUP_SECONDS, REQUESTS_TOTAL};
    use crate::error::{AuthError, ErrorCode};
    use crate::principal::{Principal, PrincipalKind};
    use crate::store::{StoreError, StoreErrorKind};

    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    /// A `&'static Key` built at compile time: no allocation when recording.
    macro_rules! key {
        ($name:expr, $($k:literal => $v:expr),+) => {{
            static LABELS: &[Label] = &[$(Label::from_static_parts($k, $v)),+];
            static KEY: Key = Key::from_static_parts($name, LABELS);
            &KEY
        }};
    }

    /// Registers the help texts of the crate's metrics with the installed recorder.
    pub fn describe() {
        ::metrics::describe_counter!(
            REQUESTS_TOTAL,
            "Requests the API-key layer admitted (outcome=ok) or refused (outcome=error code)"
        );
        ::metrics::describe_counter!(
            GUARD_REFUSALS_TOTAL,
            "Requests a scope guard refused, by error code"
        );
        ::metrics::describe_counter!(
            super::RATE_LIMIT_TOTAL,
            "Requests of rate-limited or credited keys, admitted or refused, by outcome"
        );
        ::metrics::describe_counter!(
            super::RATE_LIMIT_BACKEND_ERRORS_TOTAL,
            "Rate-limit backend failures (Redis, the key store), by backend and fail mode"
        );
        ::metrics::describe_histogram!(
            LOOKUP_SECONDS,
            ::metrics::Unit::Seconds,
            "Latency of key-store lookups on cache misses"
        );
        ::metrics::describe_counter!(
            super::LOOKUPS_SHED_TOTAL,
            "Cache misses the resolver's lookup bound answered 503 without asking the store"
        );
        ::metrics::describe_gauge!(
            super::CACHE_DEGRADED,
            "1 while a resolver is in degraded mode (not vouched for by its fleet), else 0"
        );
        ::metrics::describe_gauge!(
            super::FLEET_INSTANCES,
            "Live instances this fleet subscription hears heartbeats from, itself included"
        );
        ::metrics::describe_gauge!(
            super::OLDEST_UNACKNOWLEDGED_SECONDS,
            ::metrics::Unit::Seconds,
            "Age of the oldest invalidation published here that a live instance has not acknowledged"
        );
        ::metrics::describe_gauge!(
            super::APPLIED_SEQUENCE,
            "Last revocation-log sequence number this instance applied"
        );
        ::metrics::describe_histogram!(
            super::ACKNOWLEDGEMENT_SECONDS,
            ::metrics::Unit::Seconds,
            "Time from publishing an invalidation to its acknowledgement by every live instance"
        );
        ::metrics::describe_counter!(
            super::LAGGARDS_TOTAL,
            "Instances that had not acknowledged an invalidation by the deadline"
        );
    }

    fn count(key: &'static Key) {
        ::metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA).increment(1));
    }

    /// A request the layer let through, with its principal (none: anonymous).
    #[inline]
    pub(crate) fn admitted(principal: Option<&Principal>) {
        count(match principal.map(Principal::kind) {
            Some(PrincipalKind::Master) => {
                key!(REQUESTS_TOTAL, "outcome" => "ok", "kind" => "master")
            }
            Some(PrincipalKind::Scoped) => {
                key!(REQUESTS_TOTAL, "outcome" => "ok", "kind" => "scoped")
            }
            None => key!(REQUESTS_TOTAL, "outcome" => "ok", "kind" => "anonymous"),
        });
    }

    /// The key of counter `name` labelled with `error`'s code.
    ///
    /// The keys of every code in [`ErrorCode::ALL`] are built at the first refusal, so recording
    /// allocates nothing.
    fn by_code(
        table: &'static OnceLock<Box<[Key]>>,
        name: &'static str,
        error: &AuthError,
    ) -> &'static Key {
        let keys = table.get_or_init(|| {
            ErrorCode::ALL
                .iter()
                .map(|code| {
                    Key::from_parts(
                        name,
                        vec![Label::from_static_parts("outcome", code.as_str())],
                    )
                })
                .collect()
        });
        &keys[error.code() as usize]
    }

    /// A request the layer refused.
    #[inline]
    pub(crate) fn rejected(error: &AuthError) {
        static KEYS: OnceLock<Box<[Key]>> = OnceLock::new();
        count(by_code(&KEYS, REQUESTS_TOTAL, error));
    }

    /// A request a scope guard refused.
    #[inline]
    pub(crate) fn refused_by_guard(error: &AuthError) {
        static KEYS: OnceLock<Box<[Key]>> = OnceLock::new();
        count(by_code(&KEYS, GUARD_REFUSALS_TOTAL, error));
    }

    /// Times a store lookup (already wrapped in its timeout) and records its outcome.
    pub(crate) async fn timed_lookup<T, E>(
        lookup: impl Future<Output = Result<Result<Option<T>, StoreError>, E>>,
    ) -> Result<Result<Option<T>, StoreError>, E> {
        let started = Instant::now();
        let result = lookup.await;
        let key = match &result {
            Ok(Ok(Some(_))) => key!(LOOKUP_SECONDS, "outcome" => "found"),
            Ok(Ok(None)) => key!(LOOKUP_SECONDS, "outcome" => "unknown"),
            Ok(Err(e)) if e.kind() == StoreErrorKind::Timeout => {
                key!(LOOKUP_SECONDS, "outcome" => "timeout")
            }
            Ok(Err(_)) => key!(LOOKUP_SECONDS, "outcome" => "error"),
            Err(_) => key!(LOOKUP_SECONDS, "outcome" => "timeout"),
        };
        let seconds = started.elapsed().as_secs_f64();
        ::metrics::with_recorder(|recorder| {
            recorder.register_histogram(key, &METADATA).record(seconds)
        });
        result
    }
}

#[cfg(not(feature = "metrics"))]
mod disabled {
    use crate::error::AuthError;
    use crate::principal::Principal;

    #[inline(always)]
    pub(crate) fn admitted(_: Option<&Principal>) {}

    #[inline(always)]
    pub(crate) fn rejected(_: &AuthError) {}

    #[inline(always)]
    pub(crate) fn refused_by_guard(_: &AuthError) {}

    /// The lookup itself, untouched.
    #[inline(always)]
    pub(crate) fn timed_lookup<F>(lookup: F) -> F {
        lookup
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::{admitted, refused_by_guard, rejected, timed_lookup};

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use ::metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use crate::error::{AuthError, ErrorCode};
    use crate::principal::Principal;

    /// Keeps the key of every counter registered through it, and every name described.
    #[derive(Default)]
    struct Keys(Arc<Mutex<Vec<Key>>>, Arc<Mutex<Vec<String>>>);

    impl Recorder for Keys {
        fn describe_counter(&self, name: KeyName, _: Option<Unit>, _: SharedString) {
            self.1.lock().unwrap().push(name.as_str().to_owned());
        }
        fn describe_gauge(&self, name: KeyName, _: Option<Unit>, _: SharedString) {
            self.1.lock().unwrap().push(name.as_str().to_owned());
        }
        fn describe_histogram(&self, name: KeyName, _: Option<Unit>, _: SharedString) {
            self.1.lock().unwrap().push(name.as_str().to_owned());
        }
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.0.lock().unwrap().push(key.clone());
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// `(name, [(label, value)])` of every counter `record` increments.
    fn recorded(record: impl FnOnce()) -> Vec<(String, Vec<(String, String)>)> {
        let recorder = Keys::default();
        ::metrics::with_local_recorder(&recorder, record);
        let keys = recorder.0.lock().unwrap();
        keys.iter()
            .map(|key| {
                let labels = key.labels();
                let labels = labels.map(|l| (l.key().to_owned(), l.value().to_owned()));
                (key.name().to_owned(), labels.collect())
            })
            .collect()
    }

    fn outcome(code: &str) -> Vec<(String, String)> {
        vec![("outcome".to_owned(), code.to_owned())]
    }

    /// `describe` describes every metric of [`super::ALL`], each once, and nothing else.
    #[test]
    fn every_metric_is_described_once() {
        let recorder = Keys::default();
        ::metrics::with_local_recorder(&recorder, super::describe);
        let mut described = recorder.1.lock().unwrap().clone();
        described.sort();
        let mut all: Vec<String> = super::ALL.iter().map(|&n| n.to_owned()).collect();
        all.sort();
        assert_eq!(described, all);
        all.dedup();
        assert_eq!(all.len(), super::ALL.len(), "a name twice in ALL");
    }

    #[test]
    fn labels_cover_every_code_and_kind() {
        for &code in ErrorCode::ALL {
            let error = AuthError::example(code);
            assert_eq!(
                recorded(|| super::rejected(&error)),
                [(super::REQUESTS_TOTAL.to_owned(), outcome(code.as_str()))],
                "{code}"
            );
            assert_eq!(
                recorded(|| super::refused_by_guard(&error)),
                [(
                    super::GUARD_REFUSALS_TOTAL.to_owned(),
                    outcome(code.as_str())
                )],
                "{code}"
            );
        }
        let kind = |kind: &str| {
            vec![
                ("outcome".to_owned(), "ok".to_owned()),
                ("kind".to_owned(), kind.to_owned()),
            ]
        };
        let requests = super::REQUESTS_TOTAL.to_owned();
        assert_eq!(
            recorded(|| super::admitted(None)),
            [(requests.clone(), kind("anonymous"))]
        );
        assert_eq!(
            recorded(|| super::admitted(Some(&Principal::master()))),
            [(requests, kind("master"))]
        );
    }
}
