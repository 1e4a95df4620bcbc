//! The response future of [`ApiKeyService`](super::ApiKeyService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;
use std::sync::Arc;

use crate::error::AuthError;
use crate::resolver::ResolvedKey;
use crate::usage::{Outcome, UsageRecorder};

pin_project! {
    /// Response future of [`ApiKeyService`](super::ApiKeyService).
    ///
    /// A cached key or a refusal needs no allocation; only a cache miss boxes the store lookup.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
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
    enum Kind<F, B, E> {
        Inner { #[pin] future: F, span: tracing::Span },
        Plain { #[pin] future: F },
        Lookup { future: BoxFuture<'static, Result<Response<B>, E>> },
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// The inner service's future, polled inside `span` (none when it is disabled).
    pub(crate) fn inner(future: F, span: tracing::Span) -> Self {
        Self {
            kind: if span.is_none() {
                Kind::Plain { future }
            } else {
                Kind::Inner { future, span }
            },
            tally: None,
        }
    }

    /// Counts the outcome with `tally` when the response head is ready.
    pub(crate) fn tally(mut self, tally: Option<Tally>) -> Self {
        self.tally = tally;
        self
    }

    pub(crate) fn lookup(future: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Lookup { future },
            tally: None,
        }
    }

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
            tally: None,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let tally = this.tally;
        let mut counted = |poll: Poll<Self::Output>| {
            if let Poll::Ready(Ok(response)) = &poll
                && let Some(tally) = tally.take()
            {
                tally.count(response);
            }
            poll
        };
        match this.kind.project() {
            KindProj::Inner { future, span } => {
                let _entered = span.enter();
                counted(future.poll(cx))
            }
            KindProj::Plain { future } => counted(future.poll(cx)),
            KindProj::Lookup { future } => Poll::Ready(ready!(future.as_mut().poll(cx))),
            KindProj::Rejected { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}
