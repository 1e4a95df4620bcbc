//! The response future of [`ApiKeyService`](super::ApiKeyService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

pin_project! {
    /// Response future of [`ApiKeyService`](super::ApiKeyService).
    ///
    /// A cached key or a refusal needs no allocation; only a cache miss boxes the store lookup.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
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
        }
    }

    pub(crate) fn lookup(future: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Lookup { future },
        }
    }

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future, span } => {
                let _entered = span.enter();
                future.poll(cx)
            }
            KindProj::Plain { future } => future.poll(cx),
            KindProj::Lookup { future } => Poll::Ready(ready!(future.as_mut().poll(cx))),
            KindProj::Rejected { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}
