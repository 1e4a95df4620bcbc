use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_service::Service;

use super::Config;
use super::future::ResponseFuture;
use crate::error::{AuthError, RenderRejection, reject};
use crate::key::KeyId;
use crate::principal::Principal;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Service produced by [`ProvenanceLayer`](crate::provenance::ProvenanceLayer).
#[derive(Clone)]
pub struct ProvenanceService<S, R> {
    inner: S,
    config: Arc<Config>,
    rejection: R,
}

inner_service_accessors!(ProvenanceService<S, R>);

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
        req.extensions()
            .get::<Principal>()?
            .provenance_id()
            .cloned()
    }
}

/// What the headers of a request to stamp declare about its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declared {
    /// One JSON media type (with at most a `charset=utf-8`), no content coding.
    Json,
    /// No `Content-Type`: only an empty body is accepted (a JSON object is stamped when the layer
    /// passes unstampable bodies through).
    Nothing,
}

/// Why the headers rule out stamping. Each is the message of the 415; none echoes a header value.
const TWO_CONTENT_TYPES: &str = "more than one Content-Type header: this route takes one JSON body, to record the key that \
     creates it";
const NOT_JSON: &str = "this route takes JSON only (to record the key that creates a record): \
     Content-Type application/json or application/*+json, with no parameter but charset=utf-8";
const ENCODED: &str = "this route cannot record the key that creates a record in an encoded body: \
     send it without Content-Encoding";
const TWO_ENCODINGS: &str = "more than one Content-Encoding header: this route takes an \
     unencoded JSON body, to record the key that creates it";
const TRANSFER_CODING: &str = "Transfer-Encoding other than chunked: this route takes a JSON body \
     it can read as sent, to record the key that creates it";
const NO_CONTENT_TYPE: &str = "a body without Content-Type: this route takes JSON only (to record \
     the key that creates a record); send Content-Type: application/json";
const NOT_AN_OBJECT: &str = "the body is not a UTF-8 JSON object: this route records the key that \
     creates a record in a JSON object only";

/// The one rule for which bodies the layer can stamp, judged from the headers alone: at most one
/// `Content-Type`, a JSON one; no content coding but `identity` (in one header); no transfer coding
/// but `chunked` (in one header).
fn declared(headers: &HeaderMap) -> Result<Declared, &'static str> {
    match one(headers, &CONTENT_ENCODING) {
        Ok(None) => {}
        Ok(Some(coding)) if trim_ows(coding.as_bytes()).eq_ignore_ascii_case(b"identity") => {}
        Ok(Some(_)) => return Err(ENCODED),
        Err(()) => return Err(TWO_ENCODINGS),
    }
    match one(headers, &TRANSFER_ENCODING) {
        Ok(None) => {}
        Ok(Some(coding)) if trim_ows(coding.as_bytes()).eq_ignore_ascii_case(b"chunked") => {}
        _ => return Err(TRANSFER_CODING),
    }
    match one(headers, &CONTENT_TYPE) {
        Ok(None) => Ok(Declared::Nothing),
        Ok(Some(value)) if is_json_media_type(value.as_bytes()) => Ok(Declared::Json),
        Ok(Some(_)) => Err(NOT_JSON),
        Err(()) => Err(TWO_CONTENT_TYPES),
    }
}

/// The header's value if it appears at most once; `Err` if it appears more than once.
fn one<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(()),
    }
}

/// `application/json` or `application/<name>+json` (case-insensitive), optionally with one
/// `charset=utf-8` parameter; nothing else (RFC 9110 media type syntax, strictly).
fn is_json_media_type(value: &[u8]) -> bool {
    let mut parts = trim_ows(value).split(|&b| b == b';');
    let essence = trim_ows(parts.next().unwrap_or_default());
    let Some(slash) = essence.iter().position(|&b| b == b'/') else {
        return false;
    };
    let (kind, subtype) = (&essence[..slash], &essence[slash + 1..]);
    if !is_token(kind) || !is_token(subtype) || !kind.eq_ignore_ascii_case(b"application") {
        return false;
    }
    let json = subtype.eq_ignore_ascii_case(b"json")
        || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json");
    let mut charsets = 0;
    json && parts.map(trim_ows).all(|parameter| {
        if parameter.is_empty() {
            return true; // `application/json;` (RFC 9110 allows empty parameters)
        }
        let Some(eq) = parameter.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (name, value) = (&parameter[..eq], &parameter[eq + 1..]);
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        charsets += 1;
        charsets == 1
            && name.eq_ignore_ascii_case(b"charset")
            && value.eq_ignore_ascii_case(b"utf-8")
    })
}

/// RFC 9110 `token`: one or more `tchar`.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Without leading and trailing spaces and tabs (RFC 9110 `OWS`).
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
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
        let pass_through = self.config.pass_through_unstampable;
        let declared = match declared(req.headers()) {
            Ok(declared) => declared,
            Err(_) if pass_through => {
                return ResponseFuture::inner(self.inner.call(req));
            }
            Err(why) => {
                return ResponseFuture::refused(reject(
                    &self.rejection,
                    AuthError::UnsupportedMediaType(Cow::Borrowed(why)),
                ));
            }
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
                    } else if let Some(ended) = crate::layer::key_end(error.as_ref()) {
                        // The key ended while the body came (the API key layer's `LiveBody`).
                        ended.clone()
                    } else {
                        tracing::debug!(%error, "failed to read the request body to stamp it");
                        AuthError::invalid("the request body could not be read")
                    };
                    return Ok(reject(&rejection, error));
                }
            };
            // The key may have ended while the body was read: nothing is stamped or forwarded
            // for a key that no longer exists (I4).
            if let Some(ended) = parts
                .extensions
                .get::<Principal>()
                .and_then(Principal::cut_if_ended)
            {
                return Ok(reject(&rejection, ended));
            }
            let unstampable = |why| {
                Ok(reject(
                    &rejection,
                    AuthError::UnsupportedMediaType(Cow::Borrowed(why)),
                ))
            };
            // An empty body carries no stamp, forged or not: it goes on as it is.
            if !bytes.is_empty() && declared == Declared::Nothing && !pass_through {
                return unstampable(NO_CONTENT_TYPE);
            }
            let body = match config.stamp(&bytes, &key_id) {
                Ok(Some(stamped)) => {
                    parts.headers.remove(TRANSFER_ENCODING);
                    parts
                        .headers
                        .insert(CONTENT_LENGTH, HeaderValue::from(stamped.len()));
                    ReqBody::from(Bytes::from(stamped))
                }
                Ok(None) if bytes.is_empty() || pass_through => ReqBody::from(bytes),
                Ok(None) => return unstampable(NOT_AN_OBJECT),
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
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
            " application/json ;",
            "\tapplication/json\t",
            "application/vnd.api+json",
            "application/merge-patch+JSON",
            "application/problem+json; charset=utf-8",
        ] {
            assert!(is_json_media_type(yes.as_bytes()), "{yes}");
        }
        for no in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/json-seq",
            "text/json",
            "application/+json",
            "application/+jsonx",
            "application /json",
            "application/ json",
            "application/json, text/plain",
            "application/json; charset=utf-16",
            "application/json; charset=latin1",
            "application/json; charset=utf-8; charset=utf-16",
            "application/json; charset=utf-8; charset=utf-8",
            "application/json; profile=x",
            "application/json; charset",
            "application/json; =utf-8",
            "application/json; charset= utf-8",
            "application/json\x00",
            "application/json\u{e9}",
            "json",
            "/json",
            "application/",
            "",
        ] {
            assert!(!is_json_media_type(no.as_bytes()), "{no:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn which_headers_allow_stamping() {
        use Declared::*;
        const JSON: (&str, &str) = ("content-type", "application/json");
        type Case = (
            &'static [(&'static str, &'static str)],
            Result<Declared, &'static str>,
        );
        let cases: &[Case] = &[
            (&[], Ok(Nothing)),
            (&[JSON], Ok(Json)),
            (&[JSON, ("content-encoding", "identity")], Ok(Json)),
            (&[JSON, ("content-encoding", " IDENTITY ")], Ok(Json)),
            (&[JSON, ("transfer-encoding", "chunked")], Ok(Json)),
            (&[JSON, ("transfer-encoding", "Chunked")], Ok(Json)),
            (&[("content-type", "text/plain")], Err(NOT_JSON)),
            (
                &[JSON, ("content-type", "application/JSON")],
                Err(TWO_CONTENT_TYPES),
            ),
            (
                &[JSON, ("content-type", "text/plain")],
                Err(TWO_CONTENT_TYPES),
            ),
            (&[JSON, ("content-encoding", "gzip")], Err(ENCODED)),
            (
                &[JSON, ("content-encoding", "identity, gzip")],
                Err(ENCODED),
            ),
            (&[JSON, ("content-encoding", "")], Err(ENCODED)),
            (&[("content-encoding", "gzip")], Err(ENCODED)),
            (
                &[
                    JSON,
                    ("content-encoding", "identity"),
                    ("content-encoding", "identity"),
                ],
                Err(TWO_ENCODINGS),
            ),
            (
                &[JSON, ("transfer-encoding", "gzip, chunked")],
                Err(TRANSFER_CODING),
            ),
            (
                &[JSON, ("transfer-encoding", "identity")],
                Err(TRANSFER_CODING),
            ),
            (
                &[
                    JSON,
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                Err(TRANSFER_CODING),
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(declared(&headers(pairs)), *expected, "{pairs:?}");
        }
        let mut invalid = HeaderMap::new();
        invalid.insert(CONTENT_TYPE, HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(declared(&invalid), Err(NOT_JSON));
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
