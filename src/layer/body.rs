//! [`LiveBody`]: the request and response bodies of a request admitted with a key that can end.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::{AuthError, ExpiredReason, GrpcRejection, RenderRejection};
use crate::principal::Principal;

/// The error type of a [`LiveBody`]: the inner body's error, or the [`AuthError`] that ended the
/// key (`AUTH_EXPIRED_API_KEY`; find it with `error.downcast_ref::<AuthError>()`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The body of a request [`ApiKeyLayer`](super::ApiKeyLayer) admitted, and of its response: a
    /// request lives no longer than its key (invariant I4).
    ///
    /// While the key is live it passes every frame through, at the cost of one atomic load per
    /// frame. Once the key has ended (revoked, deleted, expired, past a rotation's grace period,
    /// under a revoked ancestor: see [`Principal::is_live`]), the next frame is dropped unseen and:
    ///
    /// - **request body**: reading fails with the [`AuthError`] (`AUTH_EXPIRED_API_KEY`), and
    ///   whatever the inner service answers is replaced by the layer's refusal for that error: HTTP
    ///   401 `AUTH_EXPIRED_API_KEY` with its JSON body (or, with [`GrpcRejection`], gRPC
    ///   `UNAUTHENTICATED`), never an extractor's 400. A handler that already stored something
    ///   from earlier frames of a streaming body did so while the key was live.
    /// - **gRPC response** (`content-type: application/grpc…`): the stream ends with trailers
    ///   `grpc-status: 16` (UNAUTHENTICATED) and the stable message
    ///   `AUTH_EXPIRED_API_KEY: API key expired or revoked`; a client sees the call fail
    ///   UNAUTHENTICATED after the messages it had received.
    /// - **other response** (chunked downloads, SSE): the body ends with the error. The server
    ///   cannot change a status already sent, so the client sees a truncated message: over
    ///   HTTP/1.1 the connection closes before the last chunk (hyper clients report an incomplete
    ///   message), over HTTP/2 the stream is reset (`RST_STREAM`). Frames sent before the key
    ///   ended were delivered; a refusal (a response carrying an [`AuthError`], such as a handler
    ///   returning the error of [`Principal::ended`]) is never cut.
    ///
    /// A connection upgraded to another protocol (a WebSocket after its `101`) is no longer HTTP:
    /// no frame of it passes through here, so the task that serves it must select on
    /// [`Principal::ended`] itself.
    ///
    /// A request with no body, anonymous requests and the master key's are not watched, and
    /// neither is a response body that is already whole: its exact length known and at most
    /// [`WHOLE_BODY_LIMIT`](super::WHOLE_BODY_LIMIT) bytes (a handler's `String`, JSON or
    /// `Bytes`: what it holds was made while the key was live; it costs nothing to send on).
    pub struct LiveBody<B> {
        #[pin]
        inner: B,
        guard: Option<Guard>,
    }
}

/// Longest response body (exact length known) that [`ApiKeyLayer`](super::ApiKeyLayer) sends
/// whole, unwatched: 64 KiB. Such a body is already in the handler's hands; what is longer, or of
/// unknown length (a stream, a download, SSE, gRPC), is watched.
pub const WHOLE_BODY_LIMIT: u64 = 64 * 1024;

/// Whether a response `body` is already whole (see [`WHOLE_BODY_LIMIT`]).
#[inline]
pub(crate) fn is_whole<B: Body>(body: &B) -> bool {
    body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|len| len <= WHOLE_BODY_LIMIT)
}

/// Marks a response whose body is whole and owed to the client even if the key ends while it is
/// sent: the answer to the very operation that ended the key (a key revoking or rotating itself
/// must receive the 204, or its new secret). The management router puts it on its responses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Whole;

/// What a watched body looks at. (Public in a private module: it appears in
/// [`BodyMode`](super::BodyMode)'s hidden method, and nothing outside the crate can name or make it.)
pub struct Guard {
    principal: InFlight,
    /// Shared by the request body and the response of one request: set once the key's end cut it
    /// (counted once per request).
    cut: Option<Arc<AtomicBool>>,
    /// End a response with gRPC trailers rather than an error.
    grpc: bool,
    /// The end was reported: nothing more comes.
    done: bool,
}

/// The principal of a request admitted with a key that can end, and, when `counted`, the request
/// itself as one in flight under the key (from admission until its response is sent in full or
/// dropped: what a revocation's receipt reports as ended).
pub(crate) struct InFlight {
    principal: Principal,
    counted: bool,
}

impl InFlight {
    /// Counts the request in flight under `principal`'s key (if it can end) while this lives.
    #[inline]
    pub(crate) fn counted(principal: Principal) -> Self {
        let counted = match principal.life() {
            Some(life) => {
                life.enter();
                true
            }
            None => false,
        };
        Self { principal, counted }
    }

    /// `principal` without counting (the request body's copy: the response counts the request).
    #[inline]
    pub(crate) fn uncounted(principal: Principal) -> Self {
        Self {
            principal,
            counted: false,
        }
    }

    #[inline]
    pub(crate) fn principal(&self) -> &Principal {
        &self.principal
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        if self.counted
            && let Some(life) = self.principal.life()
        {
            life.leave();
        }
    }
}

impl Guard {
    pub(crate) fn new(principal: InFlight, cut: Option<Arc<AtomicBool>>, grpc: bool) -> Self {
        Self {
            principal,
            cut,
            grpc,
            done: false,
        }
    }

    #[inline]
    fn ended(&self) -> Option<ExpiredReason> {
        self.principal
            .principal()
            .life()
            .and_then(|life| life.ended())
    }

    /// Records that the key's end cut this request (once per request).
    fn cut(&mut self) {
        self.done = true;
        let first = match &self.cut {
            Some(cut) => !cut.swap(true, Ordering::AcqRel),
            None => true,
        };
        if let Some(life) = self.principal.principal().life()
            && first
        {
            life.count_cut();
        }
    }
}

impl<B> LiveBody<B> {
    /// A body passed through untouched.
    pub(crate) fn plain(inner: B) -> Self {
        Self { inner, guard: None }
    }

    pub(crate) fn guarded(inner: B, guard: Guard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body, no longer watched.
    pub fn into_inner(self) -> B {
        self.inner
    }

    /// Whether this body is watched (its request was admitted with a key that can end).
    pub fn is_watched(&self) -> bool {
        self.guard.is_some()
    }
}

/// A body made from bytes already in memory (e.g. a stamped request body) has nothing left to
/// watch.
impl<B: From<bytes::Bytes>> From<bytes::Bytes> for LiveBody<B> {
    fn from(bytes: bytes::Bytes) -> Self {
        Self::plain(B::from(bytes))
    }
}

impl<B: Default> Default for LiveBody<B> {
    fn default() -> Self {
        Self::plain(B::default())
    }
}

impl<B: fmt::Debug> fmt::Debug for LiveBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveBody")
            .field("inner", &self.inner)
            .field("watched", &self.guard.is_some())
            .finish()
    }
}

/// The trailers that end a gRPC stream whose key ended: `grpc-status: 16` and the stable message.
fn grpc_trailers(error: &AuthError) -> HeaderMap {
    let rendered: http::Response<()> = GrpcRejection.render(error);
    let mut trailers = HeaderMap::new();
    for name in ["grpc-status", "grpc-message"] {
        if let Some(value) = rendered.headers().get(name) {
            trailers.insert(name, value.clone());
        }
    }
    trailers
}

impl<B> Body for LiveBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let Some(guard) = this.guard else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        if guard.done {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        };
        // The one atomic load per frame.
        let Some(reason) = guard.ended() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        // The frame came after the key ended: it is dropped unseen.
        drop(frame);
        guard.cut();
        let error = AuthError::ExpiredKey(reason);
        if guard.grpc {
            Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(&error)))))
        } else {
            Poll::Ready(Some(Err(Box::new(error))))
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.guard {
            Some(guard) if guard.done => true,
            _ => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.guard {
            Some(guard) if guard.done => SizeHint::with_exact(0),
            _ => self.inner.size_hint(),
        }
    }
}
