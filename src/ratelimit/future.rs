//! The response future of [`RateLimitService`](super::RateLimitService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::Response;
use pin_project_lite::pin_project;

use super::headers::Fields;
use crate::refusal::OrRefused;

pin_project! {
    /// Response future of [`RateLimitService`](super::RateLimitService).
    ///
    /// In-memory decisions and unlimited keys need no allocation; a decision that waits on a
    /// backend (Redis, a store) boxes it.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Direct { #[pin] future: OrRefused<F, B> },
        Limited { #[pin] future: F, fields: Option<Fields> },
        Pending { future: BoxFuture<'static, Result<Response<B>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(super) fn plain(future: F) -> Self {
        Self {
            kind: Kind::Direct {
                future: OrRefused::inner(future),
            },
        }
    }

    pub(super) fn limited(future: F, fields: Fields) -> Self {
        Self {
            kind: Kind::Limited {
                future,
                fields: Some(fields),
            },
        }
    }

    pub(super) fn pending(future: BoxFuture<'static, Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Pending { future },
        }
    }

    pub(super) fn rejected(response: Response<B>) -> Self {
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
            KindProj::Limited { future, fields } => {
                let mut response = ready!(future.poll(cx))?;
                if let Some(fields) = fields.take() {
                    fields.write(response.headers_mut());
                }
                Poll::Ready(Ok(response))
            }
            KindProj::Pending { future } => future.as_mut().poll(cx),
        }
    }
}
