//! How [`ApiKeyLayer`](super::ApiKeyLayer) hands bodies on: in a [`LiveBody`] around any body
//! type ([`AnyBody`], the default), or as axum's own `Body` ([`AxumBody`]).

#[cfg(feature = "axum")]
use http_body::Body;

#[cfg(feature = "axum")]
use super::body::BoxError;
use super::body::{Guard, LiveBody};

/// How [`ApiKeyLayer`](super::ApiKeyLayer) hands a body on to the inner service (request) or back
/// to the client (response): [`AnyBody`] or [`AxumBody`]. Sealed: the crate's two modes are the
/// only ones.
pub trait BodyMode<B>: sealed::Sealed {
    /// The body type handed on.
    type Body;

    #[doc(hidden)]
    fn hand_on(body: B, guard: Option<Guard>) -> Self::Body;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::AnyBody {}
    #[cfg(feature = "axum")]
    impl Sealed for super::AxumBody {}
}

/// The default [`BodyMode`]: every body, whatever its type, is handed on in a [`LiveBody`]
/// (watched when its request was admitted with a key that can end, passed through otherwise).
/// For any tower service: hyper, tonic, or your own body types.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnyBody;

impl<B> BodyMode<B> for AnyBody {
    type Body = LiveBody<B>;

    #[inline]
    fn hand_on(body: B, guard: Option<Guard>) -> LiveBody<B> {
        match guard {
            Some(guard) => LiveBody::guarded(body, guard),
            None => LiveBody::plain(body),
        }
    }
}

/// The [`BodyMode`] for axum (feature `axum`), chosen with
/// [`ApiKeyLayer::axum_body`](super::ApiKeyLayer::axum_body): bodies are handed on as axum's own
/// [`Body`](axum_core::body::Body), and only a body with something to watch is wrapped (a
/// [`LiveBody`] inside axum's `Body`).
///
/// axum boxes every body whose type is not its own `Body` (the request body on its way into the
/// route, the response body on its way out): with [`AnyBody`] that is two allocations per
/// request. Here a request without a body, and a response whose body is already whole (see
/// [`LiveBody`]), go through untouched. What is watched, and what a client sees when a key ends,
/// is the same in both modes.
#[cfg(feature = "axum")]
#[derive(Clone, Copy, Debug, Default)]
pub struct AxumBody;

#[cfg(feature = "axum")]
impl<B> BodyMode<B> for AxumBody
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Body = axum_core::body::Body;

    #[inline]
    fn hand_on(body: B, guard: Option<Guard>) -> axum_core::body::Body {
        match guard {
            // `Body::new` takes an axum `Body` back as it is, without a new box.
            None => axum_core::body::Body::new(body),
            Some(guard) => axum_core::body::Body::new(LiveBody::guarded(body, guard)),
        }
    }
}

/// The [`AuthError`](crate::error::AuthError) that ended a key, if it is what failed a body:
/// directly (a [`LiveBody`]) or as the source of a wrapping error (axum's `Body` wraps its inner
/// body's error).
#[cfg_attr(not(feature = "provenance"), allow(dead_code))]
pub(crate) fn key_end<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a crate::error::AuthError> {
    let mut error = Some(error);
    while let Some(current) = error {
        if let Some(ended) = current.downcast_ref::<crate::error::AuthError>() {
            return Some(ended);
        }
        error = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{AuthError, ExpiredReason};
    use crate::layer::BoxError;

    #[test]
    fn the_key_end_is_found_through_wrapping_errors() {
        let ended: BoxError = Box::new(AuthError::ExpiredKey(ExpiredReason::Revoked));
        assert!(key_end(ended.as_ref()).is_some());
        #[cfg(feature = "axum")]
        {
            let wrapped = axum_core::Error::new(AuthError::ExpiredKey(ExpiredReason::Revoked));
            assert!(
                key_end(&wrapped).is_some(),
                "axum's error keeps it as its source"
            );
        }
        let other: BoxError = "connection reset".into();
        assert!(key_end(other.as_ref()).is_none());
    }
}
