//! The response future of [`ProvenanceService`](super::ProvenanceService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

use crate::refusal::OrRefused;

pin_project! {
    /// Response future of [`ProvenanceService`](super::ProvenanceService).
    ///
    /// A request that is not stamped goes straight to the inner service's future, unboxed; only a
    /// request whose body is read and stamped boxes that work.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Direct { #[pin] future: OrRefused<F, B> },
        Stamping { future: BoxFuture<'static, Result<Response<B>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// Nothing to stamp: the inner service answers.
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Direct {
                future: OrRefused::inner(future),
            },
        }
    }

    /// Reads and stamps the body, then calls the inner service.
    pub(crate) fn stamping(future: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Stamping { future },
        }
    }

    /// Refused before the body was read.
    pub(crate) fn refused(response: Response<B>) -> Self {
        Self {
            kind: Kind::Direct {
                future: OrRefused::refused(response),
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
            KindProj::Direct { future } => future.poll(cx),
            KindProj::Stamping { future } => future.as_mut().poll(cx),
        }
    }
}
