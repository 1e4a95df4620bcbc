//! [`OrRefused`]: the inner service's future, or a refusal that is ready at once. What a
//! middleware's response future holds when it adds nothing to the inner service's answer: the scope
//! guards' is this alone, the provenance layer's this or its stamping, the rate limiter's this, its
//! decision's headers added to the answer, or a decision waiting on a backend.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

pin_project! {
    /// The inner service's future, untouched, or a refusal that is ready at once (no allocation).
    #[project = OrRefusedProj]
    pub(crate) enum OrRefused<F, B> {
        /// The middleware let the request through: the inner service answers.
        Inner { #[pin] future: F },
        /// The middleware refused: `response` is the refusal, taken by the one poll that answers.
        Refused { response: Option<Response<B>> },
    }
}

impl<F, B> OrRefused<F, B> {
    /// The inner service answers.
    pub(crate) fn inner(future: F) -> Self {
        Self::Inner { future }
    }

    /// `response` answers.
    pub(crate) fn refused(response: Response<B>) -> Self {
        Self::Refused {
            response: Some(response),
        }
    }
}

impl<F, B, E> Future for OrRefused<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            OrRefusedProj::Inner { future } => future.poll(cx),
            OrRefusedProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}
