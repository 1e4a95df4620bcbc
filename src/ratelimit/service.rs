use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::decision::Decision;
use super::future::ResponseFuture;
use super::limiter::RateLimiter;
use crate::error::{RenderRejection, reject};
use crate::principal::Principal;

/// Service produced by [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Clone, Debug)]
pub struct RateLimitService<S, R> {
    inner: S,
    limiter: RateLimiter,
    cost: u32,
    rejection: R,
}

inner_service_accessors!(RateLimitService<S, R>);

impl<S, R> RateLimitService<S, R> {
    pub(super) fn new(inner: S, limiter: RateLimiter, cost: u32, rejection: R) -> Self {
        Self {
            inner,
            limiter,
            cost,
            rejection,
        }
    }
}

/// The refusal response: rendered like every refusal, plus the rate-limit headers.
fn refuse<B, R: RenderRejection<B>>(rejection: &R, mut decision: Decision) -> Response<B> {
    let error = decision
        .refusal
        .clone()
        .expect("only refusals are rendered");
    let mut response = reject(rejection, error);
    decision.write_headers(response.headers_mut());
    decision.refusal = None;
    response
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S, R>
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

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let principal = match req.extensions().get::<Principal>() {
            Some(principal) if self.limiter.applies_to(principal) => principal,
            // Anonymous requests and keys without limits pass untouched.
            _ => return ResponseFuture::plain(self.inner.call(req)),
        };
        if let Some(decision) = self.limiter.check_now(principal, self.cost) {
            return if decision.is_admitted() {
                // The header values now: the future keeps them, not the whole decision.
                let fields = decision.fields();
                ResponseFuture::limited(self.inner.call(req), fields)
            } else {
                ResponseFuture::rejected(refuse(&self.rejection, decision))
            };
        }
        let principal = principal.clone();
        // The inner service was polled ready: take it, leave a clone for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let rejection = self.rejection.clone();
        let cost = self.cost;
        ResponseFuture::pending(Box::pin(async move {
            let decision = limiter.check_waiting(&principal, cost).await;
            if !decision.is_admitted() {
                return Ok(refuse(&rejection, decision));
            }
            let mut response = inner.call(req).await?;
            decision.write_headers(response.headers_mut());
            Ok(response)
        }))
    }
}
