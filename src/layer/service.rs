use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, header};
use tower_service::Service;

use super::future::ResponseFuture;
use super::{Config, source};
use crate::error::{AuthError, InvalidKeyReason, RenderRejection, reject};
use crate::key::{KeyDigest, KeyFormatError};
use crate::principal::{Anonymous, Principal};
use crate::resolver::ResolvedKey;

/// Service produced by [`ApiKeyLayer`](crate::layer::ApiKeyLayer).
#[derive(Clone)]
pub struct ApiKeyService<S, R> {
    inner: S,
    config: Arc<Config>,
    rejection: R,
}

impl<S: fmt::Debug, R> fmt::Debug for ApiKeyService<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the synchronous part of authentication decided.
enum Decision {
    /// Call the inner service, with this principal if any.
    Pass(Option<Principal>),
    /// The digest is not cached: look it up.
    Lookup(KeyDigest),
    Reject(AuthError),
}

impl<S, R> ApiKeyService<S, R> {
    pub(super) fn new(inner: S, config: Arc<Config>, rejection: R) -> Self {
        Self {
            inner,
            config,
            rejection,
        }
    }

    fn decide<B>(&self, req: &mut Request<B>) -> Decision {
        let config = &*self.config;
        if config.preflight && is_preflight(req) {
            // Browsers send no key on a preflight; should a client send one anyway, it still
            // reaches the inner service hidden.
            source::mark_sensitive(&config.sources, u64::MAX, req.headers_mut());
            return Decision::Pass(None);
        }
        let mut present = 0;
        let decision = self.decide_key(req.headers(), req.uri(), &mut present);
        // Only a request that goes on needs its key hidden from inner layers' logs; only the
        // sources that held a value are looked up again.
        if present != 0 && !matches!(decision, Decision::Reject(_)) {
            source::mark_sensitive(&config.sources, present, req.headers_mut());
        }
        decision
    }

    /// The decision for the presented key; `present` gets a bit per header source holding a value.
    fn decide_key(
        &self,
        headers: &http::HeaderMap,
        uri: &http::Uri,
        present: &mut u64,
    ) -> Decision {
        let config = &*self.config;
        let candidate = match source::extract(&config.sources, headers, uri, present) {
            Err(error) => return Decision::Reject(error),
            Ok(None) if config.optional => return Decision::Pass(None),
            Ok(None) => return Decision::Reject(AuthError::MissingKey),
            Ok(Some(candidate)) => candidate,
        };
        let format = config.resolver.format();
        // A keyed tag is checked with the shape, before any digest or cache probe: a made-up key
        // costs what a malformed one costs. (A public checksum is checked only on a cache miss.)
        let keyed = format.is_keyed();
        let shape = format
            .check_shape(candidate)
            .and_then(|()| match keyed {
                true => format.check_checksum(candidate),
                false => Ok(()),
            })
            .map_err(format_error);
        if config.master.is_none()
            && let Err(error) = shape
        {
            return Decision::Reject(error);
        }
        let digest = KeyDigest::of(candidate);
        if config.master.is_some_and(|master| master == digest) {
            return Decision::Pass(Some(master_principal()));
        }
        if let Err(error) = shape {
            return Decision::Reject(error);
        }
        let checksum = || match keyed {
            true => Ok(()),
            false => format.check_checksum(candidate).map_err(format_error),
        };
        let now = crate::clock::now_unix_nanos();
        // The resolver checks the checksum after its per-thread front (a front hit is a stored
        // key's digest) and before its shared cache: refusals name the first thing wrong with the
        // candidate, and nothing with a bad checksum reaches the cache or the store.
        match config
            .resolver
            .admit_cached(&digest, now, checksum, |key| self.admit(key, now))
        {
            Some(Ok(principal)) => Decision::Pass(Some(principal)),
            Some(Err(error)) => Decision::Reject(error),
            None => Decision::Lookup(digest),
        }
    }

    /// A key that passed the request-time checks: usage recording, and its principal.
    fn admit(&self, key: &Arc<ResolvedKey>, now: i64) -> Principal {
        if let Some(usage) = &self.config.usage {
            usage.touch(key, now / 1_000_000_000);
        }
        key.principal.clone()
    }
}

fn format_error(error: KeyFormatError) -> AuthError {
    AuthError::InvalidKey(match error {
        KeyFormatError::BadChecksum => InvalidKeyReason::BadChecksum,
        _ => InvalidKeyReason::Malformed,
    })
}

fn master_principal() -> Principal {
    static MASTER: std::sync::OnceLock<Principal> = std::sync::OnceLock::new();
    MASTER.get_or_init(Principal::master).clone()
}

fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn span_for(principal: Option<&Principal>) -> tracing::Span {
    // Nothing to record into while no subscriber listens at any level (one relaxed load), which
    // spares `Span::current()`'s dispatcher lookup.
    if !tracing::level_enabled!(tracing::Level::ERROR) {
        return tracing::Span::none();
    }
    match principal {
        Some(principal) => {
            let key_id = principal.key_id().as_str();
            tracing::Span::current().record("api_key_id", key_id);
            tracing::debug_span!(
                "api_key",
                api_key_id = key_id,
                kind = principal.kind().as_str()
            )
        }
        None => tracing::Span::none(),
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
    R: RenderRejection<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.decide(&mut req) {
            Decision::Pass(principal) => {
                crate::metrics::admitted(principal.as_ref());
                let span = span_for(principal.as_ref());
                match principal {
                    Some(principal) => {
                        req.extensions_mut().insert(principal);
                    }
                    None => {
                        req.extensions_mut().insert(Anonymous);
                    }
                }
                ResponseFuture::inner(self.inner.call(req), span)
            }
            Decision::Reject(error) => {
                crate::metrics::rejected(&error);
                ResponseFuture::rejected(reject(&self.rejection, error))
            }
            Decision::Lookup(digest) => {
                // The inner service was polled ready: take it, leave a clone for the next request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let this = ApiKeyService::new((), self.config.clone(), self.rejection.clone());
                ResponseFuture::lookup(Box::pin(async move {
                    let entry = match this.config.resolver.resolve(&digest).await {
                        Ok(entry) => entry,
                        Err(error) => {
                            let error = AuthError::Unavailable(error);
                            crate::metrics::rejected(&error);
                            return Ok(reject(&this.rejection, error));
                        }
                    };
                    let now = crate::clock::now_unix_nanos();
                    match entry.authenticate(now).map(|key| this.admit(key, now)) {
                        Ok(principal) => {
                            crate::metrics::admitted(Some(&principal));
                            let span = span_for(Some(&principal));
                            req.extensions_mut().insert(principal);
                            let future = span.in_scope(|| inner.call(req));
                            tracing::Instrument::instrument(future, span).await
                        }
                        Err(error) => {
                            crate::metrics::rejected(&error);
                            Ok(reject(&this.rejection, error))
                        }
                    }
                }))
            }
        }
    }
}
