//! The authenticated caller that [`ApiKeyLayer`](crate::layer::ApiKeyLayer) attaches to each request.
//!
//! Handlers read it from the request extensions, or with the axum extractors (feature `axum`):
//!
//! ```
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::error::{AuthError, ErrorCode};
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! async fn whoami(principal: Principal) -> String {
//!     format!("{} acting for {:?}", principal.key_id(), principal.account())
//! }
//!
//! async fn maybe(principal: Option<Principal>) -> &'static str {
//!     if principal.is_some() { "hello, key holder" } else { "hello, stranger" }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let routes = Router::new().route("/whoami", get(whoami)).route("/", get(maybe));
//! let resolver = CachedResolver::new(MemoryStore::new());
//! // An optional layer lets requests without a key through, without a principal.
//! let app = routes.clone().layer(ApiKeyLayer::new(resolver).optional());
//! let get = |uri| Request::get(uri).body(Body::empty());
//!
//! let response = app.clone().oneshot(get("/")?).await?;
//! assert_eq!(response.status(), StatusCode::OK); // "hello, stranger"
//! let response = app.oneshot(get("/whoami")?).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! let code = |response: &http::Response<Body>| response.extensions().get::<AuthError>().map(AuthError::code);
//! assert_eq!(code(&response), Some(ErrorCode::MissingApiKey));
//!
//! // No layer at all: a wiring mistake, told apart from a missing key.
//! let response = routes.oneshot(get("/whoami")?).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(code(&response), Some(ErrorCode::MissingPrincipal));
//! # Ok(())
//! # }
//! ```
//!
//! A `Principal` extractor on a route the layer does not cover answers 401
//! `AUTH_MISSING_PRINCIPAL` instead of axum's 500 for a missing extension.

use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::error::AuthError;
use crate::key::{KeyId, MASTER_KEY_ID};
pub use crate::life::KeyEnded;
use crate::life::Life;
use crate::limits::{Budget, UsageLimits};
use crate::network::Networks;
use crate::scope::{Scope, ScopeSet};

/// Marker [`ApiKeyLayer`](crate::layer::ApiKeyLayer) leaves on requests it let through without a
/// key (an optional layer, a CORS preflight), so that guards and extractors can tell "no key" (401
/// `AUTH_MISSING_API_KEY`) from "no layer" (401 `AUTH_MISSING_PRINCIPAL`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Anonymous;

/// Whether a principal came from the configured master key or from a stored, scoped key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// The master key from server configuration: full access, never stamped as creator.
    Master,
    /// A key from the key store, limited to its scopes.
    Scoped,
}

impl PrincipalKind {
    /// `master` or `scoped`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Scoped => "scoped",
        }
    }
}

/// The authenticated caller: key id, name, owner, account, scopes, kind and expiry.
///
/// A cheap handle (one `Arc`): cloning it, or extracting it in many handlers, costs an atomic increment.
#[derive(Clone)]
pub struct Principal(Arc<Inner>);

#[derive(Clone)]
struct Inner {
    key_id: KeyId,
    name: Arc<str>,
    owner: Option<Arc<str>>,
    account: Option<Arc<str>>,
    scopes: ScopeSet,
    kind: PrincipalKind,
    expires_at: Option<OffsetDateTime>,
    /// `expires_at` in Unix nanoseconds (`i64::MAX`: never), worked out once: the layer compares
    /// it with the clock on every request (the `Sunset` header).
    expires_nanos: i64,
    limits: UsageLimits,
    budget: Budget,
    networks: Option<Networks>,
    /// The liveness of the key this principal was admitted with (`None`: cannot end, e.g. the
    /// master key).
    life: Option<Arc<Life>>,
}

/// Emits a constructor or setter public with the `test-util` feature (and in the crate's own
/// tests), crate-private otherwise: the layer makes principals; other code should not forge them.
macro_rules! test_util_pub {
    ($(#[$meta:meta])* fn $($rest:tt)*) => {
        $(#[$meta])*
        #[cfg(any(test, feature = "test-util"))]
        pub fn $($rest)*

        $(#[$meta])*
        #[cfg(not(any(test, feature = "test-util")))]
        #[allow(dead_code)]
        pub(crate) fn $($rest)*
    };
}

impl Principal {
    /// The principal of the master key: every scope, no owner, no account, never expires.
    pub fn master() -> Self {
        Self(Arc::new(Inner {
            key_id: KeyId::new(MASTER_KEY_ID),
            name: "master key".into(),
            owner: None,
            account: None,
            scopes: ScopeSet::from(Scope::everything()),
            kind: PrincipalKind::Master,
            expires_at: None,
            expires_nanos: i64::MAX,
            limits: UsageLimits::NONE,
            budget: Budget::NONE,
            networks: None,
            life: None,
        }))
    }

    test_util_pub! {
        /// The principal of a scoped key, made by hand (feature `test-util`: for tests and benches;
        /// the layer makes the real ones).
        fn scoped(
            key_id: KeyId,
            name: impl Into<Arc<str>>,
            owner: impl Into<Arc<str>>,
            account: impl Into<Arc<str>>,
            scopes: ScopeSet,
            expires_at: Option<OffsetDateTime>,
        ) -> Self {
            Self(Arc::new(Inner {
                key_id,
                name: name.into(),
                owner: Some(owner.into()),
                account: Some(account.into()),
                scopes,
                kind: PrincipalKind::Scoped,
                expires_at,
                expires_nanos: expires_at.map_or(i64::MAX, crate::clock::nanos_of),
                limits: UsageLimits::NONE,
                budget: Budget::NONE,
                networks: None,
                life: None,
            }))
        }
    }

    test_util_pub! {
        /// The same principal carrying the key's rate limit and credits (what
        /// [`RateLimitLayer`](crate::ratelimit::RateLimitLayer) enforces).
        #[must_use]
        fn with_limits(mut self, limits: UsageLimits) -> Self {
            Arc::make_mut(&mut self.0).limits = limits;
            self
        }
    }

    test_util_pub! {
        /// The same principal with the chain of budgets its requests count against (see [`Budget`]):
        /// the key's own limits, its limited ancestors' and the pools'. What
        /// [`RateLimitLayer`](crate::ratelimit::RateLimitLayer) enforces.
        #[must_use]
        fn with_budget(mut self, budget: Budget) -> Self {
            Arc::make_mut(&mut self.0).budget = budget;
            self
        }
    }

    test_util_pub! {
        /// The same principal allowed only from `networks`.
        #[must_use]
        fn with_networks(mut self, networks: Option<Networks>) -> Self {
            Arc::make_mut(&mut self.0).networks = networks;
            self
        }
    }

    /// The same principal, ending with `life`.
    #[must_use]
    pub(crate) fn with_life(mut self, life: Arc<Life>) -> Self {
        Arc::make_mut(&mut self.0).life = Some(life);
        self
    }

    /// The liveness handle, if the key can end.
    #[inline]
    pub(crate) fn life(&self) -> Option<&Arc<Life>> {
        self.0.life.as_ref()
    }

    /// Whether the key is still live: not revoked, deleted, expired, past a rotation's grace
    /// period, nor under a revoked ancestor, as far as this instance knows (one atomic load, no I/O).
    ///
    /// The layer admitted the request with a live key; this turns `false` when the key ends while the
    /// request runs: at once on the instance that revoked it, within the invalidation bound on the
    /// others, and at the expiry instant (a timer) for expiry and grace ends. The master key never
    /// ends. See [`ended`](Self::ended) to wait for it.
    #[inline]
    pub fn is_live(&self) -> bool {
        self.0
            .life
            .as_ref()
            .is_none_or(|life| life.ended().is_none())
    }

    /// The refusal for a request whose key has ended (counted as a request the end cut short), or
    /// `None` while it is live.
    #[cfg(feature = "provenance")]
    pub(crate) fn cut_if_ended(&self) -> Option<AuthError> {
        let life = self.0.life.as_ref()?;
        let reason = life.ended()?;
        life.count_cut();
        Some(AuthError::ExpiredKey(reason))
    }

    /// A future that resolves when the key ends, with the refusal a new request would get (401
    /// `AUTH_EXPIRED_API_KEY`, `details.reason` = `revoked` or `expired`): for handlers that run
    /// long, to stop working for a key that no longer exists.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_api_keys::error::AuthError;
    /// use tower_api_keys::principal::Principal;
    ///
    /// async fn long_report(principal: Principal) -> Result<String, AuthError> {
    ///     let work = async {
    ///         tokio::time::sleep(Duration::from_millis(10)).await; // the long part
    ///         format!("report for {:?}", principal.account())
    ///     };
    ///     tokio::select! {
    ///         report = work => Ok(report),
    ///         // The key was revoked (or expired) meanwhile: stop, answer 401.
    ///         ended = principal.ended() => Err(ended),
    ///     }
    /// }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // The master key never ends.
    /// assert!(long_report(Principal::master()).await.is_ok());
    /// # }
    /// ```
    ///
    /// Never resolves for the master key. Allocates once per call; waiting costs nothing per
    /// request otherwise.
    pub fn ended(&self) -> KeyEnded {
        KeyEnded::new(self.0.life.as_ref())
    }

    /// Every budget a request of this key counts against, in order (empty: no limit anywhere).
    pub fn budget(&self) -> &Budget {
        &self.0.budget
    }

    /// Where the key may be used from (`None`: anywhere).
    pub fn allowed_networks(&self) -> Option<&Networks> {
        self.0.networks.as_ref()
    }

    /// The key's rate limit and credits, as its record had them when it was loaded (the live credit
    /// count is the limiter's).
    pub fn limits(&self) -> &UsageLimits {
        &self.0.limits
    }

    /// The principal [`ApiKeyLayer`](crate::layer::ApiKeyLayer) put in a request's extensions, for
    /// code outside axum (hyper services, tonic interceptors).
    ///
    /// Fails with `AUTH_MISSING_API_KEY` for an anonymous request let through by an optional layer,
    /// and `AUTH_MISSING_PRINCIPAL` when no layer ran.
    pub fn from_extensions(extensions: &http::Extensions) -> Result<&Principal, AuthError> {
        match extensions.get::<Principal>() {
            Some(principal) => Ok(principal),
            None if extensions.get::<Anonymous>().is_some() => Err(AuthError::MissingKey),
            None => Err(AuthError::MissingPrincipal),
        }
    }

    /// The key's public id (`master` for the master key).
    pub fn key_id(&self) -> &KeyId {
        &self.0.key_id
    }

    /// The key's human-readable name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The team, service or tenant that manages the key; `None` for the master key.
    pub fn owner(&self) -> Option<&str> {
        self.0.owner.as_deref()
    }

    /// The tenancy boundary the key acts inside; `None` for the master key.
    pub fn account(&self) -> Option<&str> {
        self.0.account.as_deref()
    }

    /// The scopes the key holds (`*:*` for the master key).
    pub fn scopes(&self) -> &ScopeSet {
        &self.0.scopes
    }

    /// Master or scoped.
    pub fn kind(&self) -> PrincipalKind {
        self.0.kind
    }

    /// Whether this is the master key.
    pub fn is_master(&self) -> bool {
        self.0.kind == PrincipalKind::Master
    }

    /// When the key stops working, if ever.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.0.expires_at
    }

    /// [`expires_at`](Self::expires_at) in Unix nanoseconds; `i64::MAX`: never.
    pub(crate) fn expires_nanos(&self) -> i64 {
        self.0.expires_nanos
    }

    /// Whether the key holds a scope granting `required`.
    pub fn allows(&self, required: &Scope) -> bool {
        self.0.scopes.allows(required)
    }

    /// The key id to stamp on records this principal creates: `None` for the master key.
    pub fn provenance_id(&self) -> Option<&KeyId> {
        (self.0.kind == PrincipalKind::Scoped).then_some(&self.0.key_id)
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.0.key_id)
            .field("name", &self.0.name)
            .field("owner", &self.0.owner)
            .field("account", &self.0.account)
            .field("scopes", &self.0.scopes)
            .field("kind", &self.0.kind)
            .field("expires_at", &self.0.expires_at)
            .field("limits", &self.0.limits)
            .field("budget", &self.0.budget)
            .field("allowed_networks", &self.0.networks)
            .field("live", &self.is_live())
            .finish()
    }
}

impl PartialEq for Principal {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.key_id == other.0.key_id
                && self.0.kind == other.0.kind
                && self.0.scopes == other.0.scopes
                && self.0.owner == other.0.owner
                && self.0.account == other.0.account
                && self.0.expires_at == other.0.expires_at
                && self.0.name == other.0.name
                && self.0.limits == other.0.limits
                && self.0.budget == other.0.budget
                && self.0.networks == other.0.networks)
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use http::request::Parts;

    use super::Principal;
    use crate::error::AuthError;

    impl<S: Send + Sync> FromRequestParts<S> for Principal {
        type Rejection = AuthError;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Self, Self::Rejection> {
            Principal::from_extensions(&parts.extensions).cloned()
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Principal>().cloned())
        }
    }
}
