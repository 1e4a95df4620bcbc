//! Route-level authorization: [`RequireScopesLayer`] (a layer) and [`Scoped`] (a typed extractor).
//!
//! ```
//! use std::sync::Arc;
//!
//! use axum::{body::Body, routing::{get, post}, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::guard::RequireScopesLayer;
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::manage::{CreateKey, KeyManager};
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let app = Router::new()
//!     .route("/ledgers", post(|| async { "created" }))
//!     .route_layer(RequireScopesLayer::all(["ledgers:write"]))
//!     .route("/balances", get(|| async { "balances" }))
//!     .route_layer(RequireScopesLayer::any(["balances:read", "ledgers:read"]))
//!     .layer(ApiKeyLayer::new(resolver.clone()));
//!
//! let manager = KeyManager::new(resolver);
//! let reader = manager
//!     .create(&Principal::master(), CreateKey::new(["ledgers:read"]).owner("billing"))
//!     .await?;
//! let send = |method: &str, uri: &str| {
//!     Request::builder()
//!         .method(method)
//!         .uri(uri)
//!         .header("x-api-key", reader.key.expose_secret())
//!         .body(Body::empty())
//! };
//!
//! // `ledgers:read` is one of the scopes `/balances` accepts...
//! let response = app.clone().oneshot(send("GET", "/balances")?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! // ...but creating a ledger needs `ledgers:write`: 403 AUTH_INSUFFICIENT_PERMISSIONS.
//! let response = app.oneshot(send("POST", "/ledgers")?).await?;
//! assert_eq!(response.status(), StatusCode::FORBIDDEN);
//! # Ok(())
//! # }
//! ```
//!
//! Scope strings are validated when the guard is built (so when the router is built): an invalid
//! scope panics at start-up with a clear message rather than refusing every request later. Use the
//! `try_` constructors to handle the error yourself.
//!
//! Mind axum's `route_layer` semantics: a guard covers the routes added *before* it, and a path that
//! matches no route answers 404 without running the guard.
//!
//! ## Scopes by HTTP method
//!
//! [`RequireScopesLayer::by_method`]`("ledgers")` requires `ledgers:read` for GET and HEAD, `ledgers:write`
//! for POST, PUT and PATCH, `ledgers:delete` for DELETE, and `ledgers:*` for any other method.
//!
//! ## Scopes in the handler signature
//!
//! Declare a marker with [`scopes!`](crate::scopes) and take [`Scoped<Marker>`](Scoped) in the handler:
//! the signature states the scopes, and the scope strings are checked at compile time.
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_api_keys::guard::Scoped;
//! use tower_api_keys::scopes;
//!
//! scopes! {
//!     /// Creating ledgers.
//!     pub LedgersWrite = all("ledgers:write");
//!     /// Reading anything about money.
//!     pub MoneyRead = any("ledgers:read", "balances:read");
//! }
//!
//! async fn create_ledger(auth: Scoped<LedgersWrite>) -> String {
//!     format!("created by {}", auth.key_id())
//! }
//!
//! let app: Router = Router::new().route("/ledgers", post(create_ledger));
//! ```
//!
//! ```compile_fail
//! tower_api_keys::scopes! { Bad = all("Ledgers:Write"); } // not a valid scope: a compile error
//! ```
//!
//! ## Scopes per gRPC method
//!
//! A tonic server has no router to hang guards on: [`MethodScopesLayer`] picks the [`RequireScopesLayer`] of
//! each method from the request path, and a method nobody declared fails closed.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower_service::Service;

use crate::error::{AuthError, JsonRejection, RenderRejection, reject};
use crate::principal::Principal;
use crate::scope::{Scope, ScopeError, ScopeMatch, ScopeSet};
use future::ResponseFuture;

pub mod future;
mod method;
pub use method::{MethodScopesLayer, MethodScopesService};

#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Scopes(ScopeSet, ScopeMatch),
    ByMethod {
        read: ScopeSet,
        write: ScopeSet,
        delete: ScopeSet,
        other: ScopeSet,
    },
}

impl Requirement {
    fn for_method(&self, method: &Method) -> (&ScopeSet, ScopeMatch) {
        match self {
            Self::Scopes(set, mode) => (set, *mode),
            Self::ByMethod {
                read,
                write,
                delete,
                other,
            } => {
                let set = match *method {
                    Method::GET | Method::HEAD => read,
                    Method::POST | Method::PUT | Method::PATCH => write,
                    Method::DELETE => delete,
                    _ => other,
                };
                (set, ScopeMatch::All)
            }
        }
    }
}

/// Checks that the request's [`Principal`] holds the scopes a route requires.
///
/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct RequireScopesLayer<R = JsonRejection> {
    requirement: Arc<Requirement>,
    rejection: R,
}

impl<R> fmt::Debug for RequireScopesLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireScopesLayer")
            .field("requirement", &self.requirement)
            .finish_non_exhaustive()
    }
}

fn parse_all<I, S>(scopes: I) -> Result<ScopeSet, ScopeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    ScopeSet::parse(scopes)
}

impl RequireScopesLayer {
    /// Requires every one of `scopes`.
    ///
    /// # Panics
    ///
    /// If a scope is invalid (at router build time); see [`try_all`](Self::try_all).
    pub fn all<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::try_all(scopes).unwrap_or_else(|e| panic!("RequireScopesLayer::all: {e}"))
    }

    /// Requires at least one of `scopes`.
    ///
    /// # Panics
    ///
    /// If a scope is invalid or none is given; see [`try_any`](Self::try_any).
    pub fn any<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::try_any(scopes).unwrap_or_else(|e| panic!("RequireScopesLayer::any: {e}"))
    }

    /// Requires `<resource>:read` for GET/HEAD, `:write` for POST/PUT/PATCH, `:delete` for DELETE and
    /// `:*` for other methods.
    ///
    /// # Panics
    ///
    /// If `resource` is not a valid resource name; see [`try_by_method`](Self::try_by_method).
    pub fn by_method(resource: &str) -> Self {
        Self::try_by_method(resource)
            .unwrap_or_else(|e| panic!("RequireScopesLayer::by_method: {e}"))
    }

    /// Fallible [`all`](Self::all).
    pub fn try_all<I, S>(scopes: I) -> Result<Self, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::from_requirement(Requirement::Scopes(
            parse_all(scopes)?,
            ScopeMatch::All,
        )))
    }

    /// Fallible [`any`](Self::any).
    ///
    /// An empty list is an error: it could never be satisfied.
    pub fn try_any<I, S>(scopes: I) -> Result<Self, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set = parse_all(scopes)?;
        if set.is_empty() {
            return Err(ScopeError::new(
                "",
                "RequireScopesLayer::any needs at least one scope",
            ));
        }
        Ok(Self::from_requirement(Requirement::Scopes(
            set,
            ScopeMatch::Any,
        )))
    }

    /// Fallible [`by_method`](Self::by_method).
    pub fn try_by_method(resource: &str) -> Result<Self, ScopeError> {
        let one = |action: &str| Scope::new(resource, action).map(ScopeSet::from);
        Ok(Self::from_requirement(Requirement::ByMethod {
            read: one("read")?,
            write: one("write")?,
            delete: one("delete")?,
            other: one("*")?,
        }))
    }

    fn from_requirement(requirement: Requirement) -> Self {
        Self {
            requirement: Arc::new(requirement),
            rejection: JsonRejection::default(),
        }
    }
}

impl<R> RequireScopesLayer<R> {
    /// Renders refusals with `rejection` instead of [`JsonRejection`].
    pub fn rejection<R2>(self, rejection: R2) -> RequireScopesLayer<R2> {
        RequireScopesLayer {
            requirement: self.requirement,
            rejection,
        }
    }

    fn check(&self, method: &Method, extensions: &http::Extensions) -> Result<(), AuthError> {
        let principal = Principal::from_extensions(extensions)?;
        let (required, mode) = self.requirement.for_method(method);
        let granted = match mode {
            ScopeMatch::All => principal.scopes().allows_all(required),
            ScopeMatch::Any => principal.scopes().allows_any(required),
        };
        if granted {
            Ok(())
        } else {
            Err(AuthError::InsufficientPermissions {
                required: required.clone(),
                mode,
            })
        }
    }
}

impl<S, R: Clone> tower_layer::Layer<S> for RequireScopesLayer<R> {
    type Service = RequireScopesService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopesService {
            inner,
            guard: self.clone(),
        }
    }
}

/// Service produced by [`RequireScopesLayer`].
#[derive(Clone, Debug)]
pub struct RequireScopesService<S, R = JsonRejection> {
    inner: S,
    guard: RequireScopesLayer<R>,
}

inner_service_accessors!(RequireScopesService<S, R>);

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScopesService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    R: RenderRejection<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.guard.check(req.method(), req.extensions()) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(error) => {
                crate::metrics::refused_by_guard(&error);
                ResponseFuture::refused(reject(&self.guard.rejection, error))
            }
        }
    }
}

/// Scopes a handler requires, declared with [`scopes!`](crate::scopes) and enforced by [`Scoped`].
pub trait ScopeRequirement: Send + Sync + 'static {
    /// The scope strings (validated at compile time by [`scopes!`](crate::scopes)).
    const SCOPES: &'static [&'static str];
    /// Whether all or any of them are needed.
    const MATCH: ScopeMatch;
}

/// Declares scope markers for [`Scoped`]: `Name = all("a:b", ...)` or `Name = any(...)`.
///
/// Invalid scope strings are compile errors.
///
/// ```
/// tower_api_keys::scopes! {
///     pub LedgersWrite = all("ledgers:write");
///     pub(crate) Reporting = any("*:read", "reports:*");
/// }
/// use tower_api_keys::guard::ScopeRequirement;
/// assert_eq!(LedgersWrite::SCOPES, ["ledgers:write"]);
/// ```
#[macro_export]
macro_rules! scopes {
    ($( $(#[$meta:meta])* $vis:vis $name:ident = $mode:ident ( $($scope:literal),+ $(,)? ) ; )+) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        impl $crate::guard::ScopeRequirement for $name {
            const SCOPES: &'static [&'static str] = &[$($scope),+];
            const MATCH: $crate::scope::ScopeMatch = $crate::scopes!(@mode $mode);
        }

        const _: () = {$(
            assert!($crate::scope::is_valid_scope($scope), concat!("invalid scope in scopes!: ", $scope));
        )+};
    )+};
    (@mode all) => { $crate::scope::ScopeMatch::All };
    (@mode any) => { $crate::scope::ScopeMatch::Any };
}

/// An axum extractor that succeeds only if the request's principal holds the scopes of `M` (see
/// [`scopes!`](crate::scopes)).
///
/// Dereferences to the [`Principal`].
#[cfg(feature = "axum")]
pub struct Scoped<M> {
    principal: Principal,
    _marker: std::marker::PhantomData<fn() -> M>,
}

#[cfg(feature = "axum")]
impl<M> Scoped<M> {
    /// The authenticated principal.
    pub fn into_principal(self) -> Principal {
        self.principal
    }
}

#[cfg(feature = "axum")]
impl<M> std::ops::Deref for Scoped<M> {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.principal
    }
}

#[cfg(feature = "axum")]
impl<M> fmt::Debug for Scoped<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scoped").field(&self.principal).finish()
    }
}

#[cfg(feature = "axum")]
impl<M: ScopeRequirement, S: Send + Sync> axum_core::extract::FromRequestParts<S> for Scoped<M> {
    type Rejection = AuthError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, AuthError> {
        let checked = Principal::from_extensions(&parts.extensions).and_then(|principal| {
            let scopes = principal.scopes();
            let granted = match M::MATCH {
                ScopeMatch::All => M::SCOPES.iter().all(|s| scopes.allows_str(s)),
                ScopeMatch::Any => M::SCOPES.iter().any(|s| scopes.allows_str(s)),
            };
            if granted {
                Ok(Self {
                    principal: principal.clone(),
                    _marker: std::marker::PhantomData,
                })
            } else {
                Err(AuthError::InsufficientPermissions {
                    required: ScopeSet::parse(M::SCOPES).unwrap_or_default(),
                    mode: M::MATCH,
                })
            }
        });
        if let Err(error) = &checked {
            crate::metrics::refused_by_guard(error);
        }
        checked
    }
}
