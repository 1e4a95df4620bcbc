//! The response future of the scope guards.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::refusal::OrRefused;

pin_project! {
    /// Response future of [`RequireScopesService`](super::RequireScopesService) and
    /// [`MethodScopesService`](super::MethodScopesService).
    ///
    /// Either the inner service's future, untouched, or a refusal that is ready at once: a guard
    /// never allocates.
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: OrRefused<F, B>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    /// The scopes were granted: the inner service answers.
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: OrRefused::inner(future),
        }
    }

    /// The scopes were not granted: `response` is the refusal.
    pub(crate) fn refused(response: Response<B>) -> Self {
        Self {
            kind: OrRefused::refused(response),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().kind.poll(cx)
    }
}
