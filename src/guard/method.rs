//! [`MethodScopesLayer`]: the scopes each gRPC method (or any exact request path) needs, for services
//! without a router to hang [`RequireScopesLayer`] on, such as a tonic server.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::RequireScopesLayer;
use super::future::ResponseFuture;
#[cfg(doc)]
use crate::error::GrpcRejection;
use crate::error::{JsonRejection, RenderRejection};

/// Scopes per gRPC method: a layer that picks the [`RequireScopesLayer`] guard of the request's method
/// from its path (`/package.Service/Method`) and runs it.
///
/// Put it inside [`ApiKeyLayer`](crate::layer::ApiKeyLayer).
///
/// A method without an entry requires `*:*` (the master key, or a key granted everything), unless
/// [`fallback`](Self::fallback) says otherwise: a new RPC whose scopes nobody declared fails closed.
/// Refusals, the error in the response extensions and the "no key" / "no layer" distinction are
/// exactly those of [`RequireScopesLayer`], which does the checking.
///
/// ```
/// use tower_api_keys::error::GrpcRejection;
/// use tower_api_keys::guard::{MethodScopesLayer, RequireScopesLayer};
///
/// let scopes = MethodScopesLayer::new()
///     .method("/ledger.v1.Ledgers/GetLedger", RequireScopesLayer::all(["ledgers:read"]))
///     .method("/ledger.v1.Ledgers/CreateLedger", RequireScopesLayer::all(["ledgers:write"]))
///     .rejection(GrpcRejection);
/// // tonic: Server::builder().layer(ApiKeyLayer::new(resolver).rejection(GrpcRejection))
/// //            .layer(scopes).add_service(...)
/// # let _ = scopes;
/// ```
#[derive(Clone)]
#[must_use]
pub struct MethodScopesLayer<R = JsonRejection> {
    methods: HashMap<Box<str>, RequireScopesLayer>,
    fallback: RequireScopesLayer,
    rejection: R,
}

impl Default for MethodScopesLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl MethodScopesLayer {
    /// No method declared yet: every method requires `*:*`.
    pub fn new() -> Self {
        Self {
            methods: HashMap::new(),
            fallback: RequireScopesLayer::all(["*:*"]),
            rejection: JsonRejection::default(),
        }
    }
}

impl<R> MethodScopesLayer<R> {
    /// Guards the method whose request path is `path`, e.g. `/ledger.v1.Ledgers/GetLedger`.
    ///
    /// # Panics
    ///
    /// If `path` is not of the form `/<service>/<method>`, or was already declared: both are
    /// wiring mistakes best found at start-up.
    pub fn method(mut self, path: &str, guard: RequireScopesLayer) -> Self {
        let well_formed = path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(service, method)| {
                !service.is_empty() && !method.is_empty() && !method.contains('/')
            });
        assert!(
            well_formed,
            "MethodScopesLayer::method: {path:?} is not a gRPC method path like \"/package.Service/Method\""
        );
        let previous = self.methods.insert(path.into(), guard);
        assert!(
            previous.is_none(),
            "MethodScopesLayer::method: {path:?} is declared twice"
        );
        self
    }

    /// The guard of methods without an entry (default: `RequireScopesLayer::all(["*:*"])`).
    pub fn fallback(mut self, guard: RequireScopesLayer) -> Self {
        self.fallback = guard;
        self
    }

    /// Renders refusals with `rejection` ([`GrpcRejection`] for gRPC) instead of [`JsonRejection`].
    pub fn rejection<R2>(self, rejection: R2) -> MethodScopesLayer<R2> {
        MethodScopesLayer {
            methods: self.methods,
            fallback: self.fallback,
            rejection,
        }
    }
}

impl<R> fmt::Debug for MethodScopesLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodScopesLayer")
            .field("methods", &self.methods)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

struct Guards<R> {
    methods: HashMap<Box<str>, RequireScopesLayer<R>>,
    fallback: RequireScopesLayer<R>,
}

impl<S, R: Clone> Layer<S> for MethodScopesLayer<R> {
    type Service = MethodScopesService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        let with_rejection =
            |guard: &RequireScopesLayer| guard.clone().rejection(self.rejection.clone());
        let guards = Guards {
            methods: self
                .methods
                .iter()
                .map(|(path, guard)| (path.clone(), with_rejection(guard)))
                .collect(),
            fallback: with_rejection(&self.fallback),
        };
        MethodScopesService {
            inner,
            guards: Arc::new(guards),
        }
    }
}

/// Service produced by [`MethodScopesLayer`].
pub struct MethodScopesService<S, R> {
    inner: S,
    guards: Arc<Guards<R>>,
}

inner_service_accessors!(MethodScopesService<S, R>);

impl<S: Clone, R> Clone for MethodScopesService<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guards: self.guards.clone(),
        }
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for MethodScopesService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    R: RenderRejection<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let guards = &*self.guards;
        let guard = guards
            .methods
            .get(req.uri().path())
            .unwrap_or(&guards.fallback);
        // `self.inner` was polled ready: hand it to the guard, keep a clone for the next request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        guard.layer(inner).call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "is not a gRPC method path")]
    fn a_path_that_is_not_a_method_is_refused_at_start_up() {
        let _ =
            MethodScopesLayer::new().method("/ledger.v1.Ledgers", RequireScopesLayer::all(["a:b"]));
    }

    #[test]
    #[should_panic(expected = "declared twice")]
    fn a_method_declared_twice_is_refused_at_start_up() {
        let _ = MethodScopesLayer::new()
            .method("/s.S/M", RequireScopesLayer::all(["a:read"]))
            .method("/s.S/M", RequireScopesLayer::all(["a:write"]));
    }
}
