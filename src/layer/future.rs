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
        // The `Sunset` header to add to the inner service's response (`layer::sunset`).
        sunset: Option<http::HeaderValue>,
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
            sunset: None,
        }
    }

    pub(crate) fn lookup(future: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Lookup { future },
            sunset: None,
        }
    }

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
            sunset: None,
        }
    }

    /// Adds `sunset` (if any) to the inner service's response, unless it set one itself.
    pub(crate) fn sunset(mut self, sunset: Option<http::HeaderValue>) -> Self {
        self.sunset = sunset;
        self
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { future, span } => {
                let _entered = span.enter();
                let result = ready!(future.poll(cx));
                Poll::Ready(super::sunset::add(this.sunset, result))
            }
            KindProj::Plain { future } => {
                let result = ready!(future.poll(cx));
                Poll::Ready(super::sunset::add(this.sunset, result))
            }
            KindProj::Lookup { future } => Poll::Ready(ready!(future.as_mut().poll(cx))),
            KindProj::Rejected { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
        }
    }
}
