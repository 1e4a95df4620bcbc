use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_service::Service;

use super::Config;
use super::future::ResponseFuture;
use crate::error::{AuthError, RenderRejection, reject};
use crate::key::KeyId;
use crate::principal::Principal;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Service produced by [`Provenance`](crate::provenance::Provenance).
#[derive(Clone)]
pub struct ProvenanceService<S, R> {
    inner: S,
    config: Arc<Config>,
    rejection: R,
}

impl<S: fmt::Debug, R> fmt::Debug for ProvenanceService<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvenanceService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, R> ProvenanceService<S, R> {
    pub(super) fn new(inner: S, config: Arc<Config>, rejection: R) -> Self {
        Self {
            inner,
            config,
            rejection,
        }
    }

    /// The key id to stamp, if this request is to be stamped.
    fn key_to_stamp<B>(&self, req: &Request<B>) -> Option<KeyId> {
        if !self.config.methods.contains(req.method()) {
            return None;
        }
        let key_id = req.extensions().get::<Principal>()?.provenance_id()?;
        may_be_json(req.headers()).then(|| key_id.clone())
    }
}

/// Whether the body may be JSON that we can read: a JSON media type (or none), not encoded.
fn may_be_json(headers: &HeaderMap) -> bool {
    if headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return false;
    }
    match headers.get(CONTENT_TYPE) {
        None => true,
        Some(value) => value.to_str().is_ok_and(is_json_media_type),
    }
}

/// `application/json` or `application/<anything>+json`, with any parameters.
fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype
                .len()
                .checked_sub(5)
                .and_then(|at| subtype.get(at..))
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json")))
}

/// The declared length, if the header is present and readable.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for ProvenanceService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Send + 'static,
    R: RenderRejection<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(key_id) = self.key_to_stamp(&req) else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        let limit = self.config.max_body_bytes;
        if content_length(req.headers()).is_some_and(|len| len > limit as u64) {
            return ResponseFuture::refused(reject(
                &self.rejection,
                AuthError::PayloadTooLarge { limit },
            ));
        }
        if req.body().is_end_stream() {
            // Nothing to read and nothing to stamp: the handler refuses an empty JSON body.
            return ResponseFuture::inner(self.inner.call(req));
        }

        // The ready service handles this request; the clone waits for the next `poll_ready`.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let rejection = self.rejection.clone();
        ResponseFuture::stamping(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let error = if error.is::<LengthLimitError>() {
                        AuthError::PayloadTooLarge { limit }
                    } else {
                        tracing::debug!(%error, "failed to read the request body to stamp it");
                        AuthError::invalid("the request body could not be read")
                    };
                    return Ok(reject(&rejection, error));
                }
            };
            let body = match config.stamp(&bytes, &key_id) {
                Ok(Some(stamped)) => {
                    parts.headers.remove(TRANSFER_ENCODING);
                    parts
                        .headers
                        .insert(CONTENT_LENGTH, HeaderValue::from(stamped.len()));
                    ReqBody::from(Bytes::from(stamped))
                }
                Ok(None) => ReqBody::from(bytes),
                Err(error) => return Ok(reject(&rejection, error)),
            };
            inner.call(Request::from_parts(parts, body)).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;",
            "application/vnd.api+json",
            "application/merge-patch+JSON",
        ] {
            assert!(is_json_media_type(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "text/json",
            "application/+jsonx",
            "json",
            "",
        ] {
            assert!(!is_json_media_type(no), "{no}");
        }
    }

    #[test]
    fn which_bodies_are_read() {
        let mut headers = HeaderMap::new();
        assert!(may_be_json(&headers), "no content type: sniffed");
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(may_be_json(&headers));
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert!(may_be_json(&headers));
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!may_be_json(&headers), "encoded bodies cannot be stamped");
        headers.remove(CONTENT_ENCODING);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!may_be_json(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_bytes(b"\xff").unwrap());
        assert!(!may_be_json(&headers));
    }

    #[test]
    fn declared_length() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), None);
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(content_length(&headers), Some(42));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert_eq!(content_length(&headers), None);
    }
}
