//! The response future of [`ApiKeyService`](super::ApiKeyService).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::{Response, header};
use pin_project_lite::pin_project;

use super::body::{Guard, InFlight};
use super::mode::{AnyBody, BodyMode};
use crate::error::{AuthError, ExpiredReason, RenderRejection, reject};
use crate::resolver::ResolvedKey;
use crate::usage::{Outcome, UsageRecorder};

pin_project! {
    /// Response future of [`ApiKeyService`](super::ApiKeyService).
    ///
    /// A cached key or a refusal needs no allocation; only a cache miss boxes the store lookup.
    pub struct ResponseFuture<F, B, E, R, M = AnyBody>
    where
        M: BodyMode<B>,
    {
        #[pin]
        kind: Kind<F, B, E, R, M>,
        // The `Sunset` header to add to the inner service's response (`layer::sunset`).
        sunset: Option<http::HeaderValue>,
        tally: Option<Tally>,
    }
}

/// What a [`UsageRecorder`] counts when an admitted request's response head is ready: admitted,
/// or refused for the reason the typed error in the response extensions gives.
pub(crate) struct Tally {
    pub(crate) key: Arc<ResolvedKey>,
    pub(crate) recorder: UsageRecorder,
}

impl Tally {
    /// Counts `outcome` (a refusal the layer itself made).
    pub(crate) fn outcome(self, outcome: Outcome) {
        self.recorder.count(&self.key, outcome);
    }

    fn count<B>(self, response: &Response<B>) {
        let outcome = match response.extensions().get::<AuthError>() {
            None => Some(Outcome::Admitted),
            Some(error) => Outcome::of_refusal(error),
        };
        if let Some(outcome) = outcome {
            self.recorder.count(&self.key, outcome);
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E, R, M>
    where
        M: BodyMode<B>,
    {
        Inner { #[pin] future: F, span: tracing::Span, watch: Option<Watch<R>> },
        Plain { #[pin] future: F, watch: Option<Watch<R>> },
        Lookup { future: BoxFuture<'static, Result<Response<M::Body>, E>> },
        Rejected { response: Option<Response<B>> },
    }
}

/// What the response of a request admitted with a key that can end needs: the principal (its
/// key's life; the request counted in flight until the response is sent) and, for a request with
/// a body, the flag its body sets when the key's end refused a frame, with the renderer of the
/// refusal that then replaces the inner service's answer.
pub(crate) struct Watch<R> {
    pub(crate) principal: InFlight,
    pub(crate) cut: Option<(Arc<AtomicBool>, R)>,
}

impl<R> Watch<R> {
    /// The response to send for the inner service's `response`.
    fn finish<B, M>(self, response: Response<B>) -> Response<M::Body>
    where
        R: RenderRejection<B>,
        M: BodyMode<B>,
        B: http_body::Body,
    {
        let mut shared = None;
        if let Some((cut, rejection)) = self.cut {
            if cut.load(Ordering::Acquire) {
                // The request body was refused: the key's refusal, whatever the handler made of it.
                let reason = self
                    .principal
                    .principal()
                    .life()
                    .and_then(|life| life.ended())
                    .unwrap_or(ExpiredReason::Revoked);
                let error = AuthError::ExpiredKey(reason);
                crate::metrics::rejected(&error);
                return reject(&rejection, error).map(|body| M::hand_on(body, None));
            }
            shared = Some(cut);
        }
        // A refusal (e.g. a handler that stopped on `Principal::ended`) is delivered whole, as is
        // the answer to an operation that ended the key itself (`Whole`), and a body already
        // whole in memory (`is_whole`): the handler had all of it while the key was live.
        if super::body::is_whole(response.body())
            || response.extensions().get::<AuthError>().is_some()
            || response.extensions().get::<super::body::Whole>().is_some()
        {
            return response.map(|body| M::hand_on(body, None));
        }
        let grpc = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        let guard = Guard::new(self.principal, shared, grpc);
        response.map(|body| M::hand_on(body, Some(guard)))
    }
}

impl<F, B, E, R, M: BodyMode<B>> ResponseFuture<F, B, E, R, M> {
    /// The inner service's future, polled inside `span` (none when it is disabled); its response
    /// gets `sunset` (the `Sunset` header, unless it set one itself) and its outcome is counted
    /// with `tally` when the head is ready. Built in one go: the future is large, and every
    /// by-value step would move it.
    pub(crate) fn inner(
        future: F,
        span: tracing::Span,
        watch: Option<Watch<R>>,
        sunset: Option<http::HeaderValue>,
        tally: Option<Tally>,
    ) -> Self {
        Self {
            kind: if span.is_disabled() {
                Kind::Plain { future, watch }
            } else {
                Kind::Inner {
                    future,
                    span,
                    watch,
                }
            },
            sunset,
            tally,
        }
    }

    pub(crate) fn lookup(future: BoxFuture<'static, Result<Response<M::Body>, E>>) -> Self {
        Self {
            kind: Kind::Lookup { future },
            sunset: None,
            tally: None,
        }
    }

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
            sunset: None,
            tally: None,
        }
    }
}

/// The response to send for the inner service's `result`: with the `Sunset` header, watched as
/// `watch` says, its outcome counted with `tally`. In place where it can be: a response is large,
/// and every by-value step would move it.
fn finish<B: http_body::Body, E, R: RenderRejection<B>, M: BodyMode<B>>(
    mut result: Result<Response<B>, E>,
    sunset: &mut Option<http::HeaderValue>,
    watch: &mut Option<Watch<R>>,
    tally: &mut Option<Tally>,
) -> Result<Response<M::Body>, E> {
    if let Ok(response) = &mut result {
        super::sunset::add(sunset, response);
    }
    let output = result.map(|response| match watch.take() {
        Some(watch) => watch.finish::<B, M>(response),
        None => response.map(|body| M::hand_on(body, None)),
    });
    if let (Ok(response), Some(tally)) = (&output, tally.take()) {
        tally.count(response);
    }
    output
}

impl<F, B, E, R, M> Future for ResponseFuture<F, B, E, R, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    R: RenderRejection<B>,
    B: http_body::Body,
    M: BodyMode<B>,
{
    type Output = Result<Response<M::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner {
                future,
                span,
                watch,
            } => {
                let _entered = span.enter();
                let result = ready!(future.poll(cx));
                Poll::Ready(finish::<B, E, R, M>(result, this.sunset, watch, this.tally))
            }
            KindProj::Plain { future, watch } => {
                let result = ready!(future.poll(cx));
                Poll::Ready(finish::<B, E, R, M>(result, this.sunset, watch, this.tally))
            }
            KindProj::Lookup { future } => Poll::Ready(ready!(future.as_mut().poll(cx))),
            KindProj::Rejected { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion")
                .map(|body| M::hand_on(body, None)))),
        }
    }
}
