use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A request body that is either the original body, untouched, or a buffered (stamped) one.
    ///
    /// [`ProvenanceService`](crate::provenance::ProvenanceService) hands the inner service the same body type it
    /// received and builds stamped bodies with `From<Bytes>`. axum's body has that conversion; for a
    /// body type that has not (hyper's `Incoming`, a `StreamBody`, ...), wrap it first with
    /// [`ProvenanceBody::new`] (e.g. `req.map(ProvenanceBody::new)`, or tower-http's
    /// `MapRequestBodyLayer::new(ProvenanceBody::new)`). Wrapping moves the body; nothing is boxed or
    /// buffered.
    #[derive(Debug)]
    pub struct ProvenanceBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Original { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

impl<B> ProvenanceBody<B> {
    /// Wraps `body`; it is passed through untouched unless the request gets stamped.
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Original { body },
        }
    }

    /// The original body, or `None` if this body was buffered (stamped).
    pub fn into_original(self) -> Option<B> {
        match self.kind {
            Kind::Original { body } => Some(body),
            Kind::Buffered { .. } => None,
        }
    }
}

impl<B> From<Bytes> for ProvenanceBody<B> {
    fn from(data: Bytes) -> Self {
        Self {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ProvenanceBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Original { body } => body.poll_frame(cx),
            KindProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Original { body } => body.is_end_stream(),
            Kind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Original { body } => body.size_hint(),
            Kind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn both_kinds_yield_their_bytes() {
        let original = ProvenanceBody::new(Full::new(Bytes::from_static(b"abc")));
        assert_eq!(original.size_hint().exact(), Some(3));
        assert_eq!(original.collect().await.unwrap().to_bytes(), "abc");

        let buffered = ProvenanceBody::<Full<Bytes>>::from(Bytes::from_static(b"xyz"));
        assert!(!buffered.is_end_stream());
        assert_eq!(buffered.size_hint().exact(), Some(3));
        assert!(buffered.into_original().is_none());
        let buffered = ProvenanceBody::<Full<Bytes>>::from(Bytes::from_static(b"xyz"));
        assert_eq!(buffered.collect().await.unwrap().to_bytes(), "xyz");

        let empty = ProvenanceBody::<Full<Bytes>>::from(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }
}
