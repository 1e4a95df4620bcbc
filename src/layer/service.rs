use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, header};
use tower_service::Service;

use std::sync::atomic::AtomicBool;

use http_body::Body;

use super::Config;
use super::body::{Guard, InFlight};
use super::future::{ResponseFuture, Tally, Watch};
use super::mode::{AnyBody, BodyMode};
use super::source;
use crate::error::{AuthError, InvalidKeyReason, RenderRejection, reject};
use crate::key::{KeyDigest, KeyFormatError};
use crate::principal::{Anonymous, Principal};
use crate::resolver::{CacheEntry, ResolvedKey, front_hint};
use crate::usage::{Outcome, Used};

/// Service produced by [`ApiKeyLayer`](super::ApiKeyLayer).
pub struct ApiKeyService<S, R, M = AnyBody> {
    inner: S,
    config: Arc<Config>,
    rejection: R,
    mode: PhantomData<fn() -> M>,
}

impl<S: Clone, R: Clone, M> Clone for ApiKeyService<S, R, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            rejection: self.rejection.clone(),
            mode: PhantomData,
        }
    }
}

inner_service_accessors!(ApiKeyService<S, R, M>);

impl<S: fmt::Debug, R, M> fmt::Debug for ApiKeyService<S, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, R, M> ApiKeyService<S, R, M> {
    pub(super) fn new(inner: S, config: Arc<Config>, rejection: R) -> Self {
        Self {
            inner,
            config,
            rejection,
            mode: PhantomData,
        }
    }
}

/// What authenticating the presented key decided without waiting for anything.
enum Verdict {
    /// Let the request through with this principal (none: anonymous), counting its outcome with
    /// the tally when usage is recorded.
    Admit(Option<Principal>, Option<Tally>),
    /// A well-formed key the cache does not know: ask the store.
    Lookup(KeyDigest),
    /// Refuse the request.
    Refuse(AuthError),
}

impl Config {
    /// The verdict on a request: presented key, optional mode. The key headers are marked
    /// sensitive on the way.
    fn judge<B>(&self, request: &mut Request<B>) -> Verdict {
        match source::extract(&self.sources, request) {
            Err(error) => Verdict::Refuse(error),
            Ok(presented) => match presented.key() {
                Some(key) => self.authenticate(key),
                None if self.optional => Verdict::Admit(None, None),
                None => Verdict::Refuse(AuthError::MissingKey),
            },
        }
    }

    /// The verdict on a presented key, from the master key, its format and the cache.
    fn authenticate(&self, key: &[u8]) -> Verdict {
        let format = self.resolver.format();
        // Shape, and a keyed key's secret version (still accepted), before anything else.
        let shape = format
            .check_shape(key)
            .and_then(|()| format.check_version(key))
            .map_err(format_error);
        if self.master.is_none()
            && let Err(error) = shape
        {
            return Verdict::Refuse(error);
        }
        // A keyed key this thread has not admitted lately (by its hint, known before any digest)
        // has its HMAC tag checked first: a made-up key is refused for the cost of the tag, with no
        // digest and no cache probe. One it has is looked up by digest in the front, whose entries
        // passed the tag when they went in: a hit (the same digest, the same bytes) needs no tag.
        let hint = front_hint(key);
        let mut tag = None;
        if format.is_keyed() && shape.is_ok() && !self.resolver.front_knows(hint) {
            let checked = format.check_checksum(key).map_err(format_error);
            if self.master.is_none()
                && let Err(error) = checked
            {
                return Verdict::Refuse(error);
            }
            tag = Some(checked);
        }
        let digest = KeyDigest::of_bytes(key);
        if self.master.is_some_and(|master| master == digest) {
            return Verdict::Admit(Some(master_principal()), None);
        }
        if let Err(error) = shape {
            return Verdict::Refuse(error);
        }
        let tag_checked = match tag {
            Some(Err(error)) => return Verdict::Refuse(error),
            Some(Ok(())) => true,
            None => false,
        };
        // The checksum (or a tag not checked yet) after the per-thread front and before the shared
        // cache: refusals name the first thing wrong with the key, and nothing with a bad checksum
        // reaches the cache or the store.
        let checksum = || match tag_checked {
            true => Ok(()),
            false => format.check_checksum(key).map_err(format_error),
        };
        let now = crate::clock::now_unix_nanos();
        match self.resolver.admit_cached(
            &digest,
            hint,
            now,
            checksum,
            |key| self.admit(key, now),
            |key| self.refused(key),
        ) {
            Some(Ok((principal, tally))) => Verdict::Admit(Some(principal), tally),
            Some(Err(error)) => Verdict::Refuse(error),
            None => Verdict::Lookup(digest),
        }
    }

    /// A key that passed the request-time checks at `now`: its use is recorded, its principal
    /// taken, and (with a recorder) a tally made to count the request's outcome.
    fn admit(&self, key: &Arc<ResolvedKey>, now: i64) -> (Principal, Option<Tally>) {
        let tally = self.usage.as_ref().map(|usage| {
            usage.touch(key, now / 1_000_000_000);
            Tally {
                key: key.clone(),
                recorder: usage.clone(),
            }
        });
        (key.principal.clone(), tally)
    }

    /// A known key refused at the request-time checks (expired or revoked): counted.
    fn refused(&self, key: &Arc<ResolvedKey>) {
        if let Some(usage) = &self.usage {
            usage.count(key, Outcome::ExpiredOrRevoked);
        }
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

/// Hands an admitted request to `inner`, carrying `principal` (none: the anonymous marker), inside
/// the `api_key` span. A principal whose key can end has its request body (if it has one) and its
/// response body watched (see [`LiveBody`](super::LiveBody)); a key in its last warning window
/// gets a `Sunset` header. Bodies are handed on the way `M` says.
fn forward<S, B, ResBody, R, M>(
    config: &Config,
    inner: &mut S,
    req: Request<B>,
    principal: Option<Principal>,
    tally: Option<Tally>,
    rejection: &R,
) -> ResponseFuture<S::Future, ResBody, S::Error, R, M>
where
    S: Service<Request<<M as BodyMode<B>>::Body>, Response = Response<ResBody>>,
    B: Body,
    R: Clone,
    M: BodyMode<B> + BodyMode<ResBody>,
{
    // Behind trusted proxies, the client's address, worked out once: for whoever records it
    // (audit events) and for the key's last-used address. Without, the peer's is in the request.
    let forwarded = config
        .client
        .trusted_proxies
        .as_ref()
        .and_then(|_| config.client.client(req.headers(), req.extensions()));
    if let Some(tally) = &tally
        && tally
            .key
            .usage()
            .ip_due(crate::clock::now_unix_nanos() / 1_000_000_000)
        && let Some(ip) =
            forwarded.or_else(|| config.client.client(req.headers(), req.extensions()))
    {
        tally.key.usage().set_ip(ip);
    }
    crate::metrics::admitted(principal.as_ref());
    let sunset = super::sunset::header(config.sunset, principal.as_ref());
    let span = span_for(principal.as_ref());
    let (mut parts, body) = req.into_parts();
    if let Some(ip) = forwarded {
        parts.extensions.insert(super::network::ForwardedClient(ip));
    }
    let (body, watch) = match principal {
        Some(principal) => {
            let watch = principal.life().is_some().then(|| {
                // Only a request with a body pays for the flag its body shares with the response.
                let cut = (!body.is_end_stream())
                    .then(|| (Arc::new(AtomicBool::new(false)), rejection.clone()));
                Watch {
                    principal: InFlight::counted(principal.clone()),
                    cut,
                }
            });
            let guard = match &watch {
                Some(Watch {
                    principal,
                    cut: Some((cut, _)),
                }) => Some(Guard::new(
                    InFlight::uncounted(principal.principal().clone()),
                    Some(cut.clone()),
                    false,
                )),
                _ => None,
            };
            parts.extensions.insert(principal);
            (<M as BodyMode<B>>::hand_on(body, guard), watch)
        }
        None => {
            parts.extensions.insert(Anonymous);
            (<M as BodyMode<B>>::hand_on(body, None), None)
        }
    };
    let req = Request::from_parts(parts, body);
    // A span nobody records (no subscriber, or `api_key` filtered out: most servers log at `info`)
    // is not entered: the call is made directly (a closure would move the request once more).
    let future = if span.is_disabled() {
        inner.call(req)
    } else {
        span.in_scope(|| inner.call(req))
    };
    ResponseFuture::inner(future, span, watch, sunset, tally)
}

/// The refusal of a request, rendered by `rejection`.
fn refuse<B, R: RenderRejection<B>>(rejection: &R, error: AuthError) -> Response<B> {
    crate::metrics::rejected(&error);
    reject(rejection, error)
}

impl<S, R, M, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyService<S, R, M>
where
    S: Service<Request<<M as BodyMode<ReqBody>>::Body>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    R: RenderRejection<ResBody>,
    M: BodyMode<ReqBody> + BodyMode<ResBody> + 'static,
    <M as BodyMode<ResBody>>::Body: Send + 'static,
{
    type Response = Response<<M as BodyMode<ResBody>>::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error, R, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &*self.config;
        let verdict = if config.preflight && is_preflight(&req) {
            // Browsers send no key on a preflight; should a client send one anyway, it still
            // reaches the inner service hidden.
            source::hide_all(&config.sources, req.headers_mut());
            Verdict::Admit(None, None)
        } else {
            config.judge(&mut req)
        };
        let digest = match verdict {
            Verdict::Refuse(error) => {
                return ResponseFuture::rejected(refuse(&self.rejection, error));
            }
            Verdict::Admit(principal, tally) => {
                if let Some(principal) = &principal
                    && let Err(error) =
                        config
                            .client
                            .admit(principal, req.headers(), req.extensions())
                {
                    if let Some(tally) = tally {
                        tally.outcome(Outcome::Network);
                    }
                    return ResponseFuture::rejected(refuse(&self.rejection, error));
                }
                return forward::<_, _, _, _, M>(
                    config,
                    &mut self.inner,
                    req,
                    principal,
                    tally,
                    &self.rejection,
                );
            }
            Verdict::Lookup(digest) => digest,
        };
        // The inner service was polled ready: take it, leave a clone for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let rejection = self.rejection.clone();
        ResponseFuture::lookup(Box::pin(async move {
            let admitted = match config.resolver.resolve(&digest).await {
                Ok(entry) => {
                    let now = crate::clock::now_unix_nanos();
                    let admitted = entry.authenticate(now).map(|key| config.admit(key, now));
                    if let (Err(_), CacheEntry::Known(key)) = (&admitted, &entry) {
                        config.refused(key);
                    }
                    admitted
                }
                Err(error) => Err(AuthError::Unavailable(error)),
            }
            .and_then(|(principal, tally)| {
                match config
                    .client
                    .admit(&principal, req.headers(), req.extensions())
                {
                    Ok(()) => Ok((principal, tally)),
                    Err(error) => {
                        if let Some(tally) = tally {
                            tally.outcome(Outcome::Network);
                        }
                        Err(error)
                    }
                }
            });
            match admitted {
                Ok((principal, tally)) => {
                    forward::<_, _, _, _, M>(
                        &config,
                        &mut inner,
                        req,
                        Some(principal),
                        tally,
                        &rejection,
                    )
                    .await
                }
                Err(error) => Ok(refuse(&rejection, error)
                    .map(|body| <M as BodyMode<ResBody>>::hand_on(body, None))),
            }
        }))
    }
}
