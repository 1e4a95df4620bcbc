//! Rendering an [`AuthError`] into a response: [`RenderRejection`], [`JsonRejection`],
//! [`GrpcRejection`].

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use super::auth::AuthError;

/// Turns an [`AuthError`] into a response.
///
/// Implemented by [`JsonRejection`] (the default), [`GrpcRejection`], and every `Fn(&AuthError) ->
/// Response<B> + Clone + Send + Sync + 'static`.
pub trait RenderRejection<B>: Clone + Send + Sync + 'static {
    /// Renders the refusal.
    ///
    /// The caller adds the error to the response extensions.
    fn render(&self, error: &AuthError) -> Response<B>;
}

impl<B, F> RenderRejection<B> for F
where
    F: Fn(&AuthError) -> Response<B> + Clone + Send + Sync + 'static,
{
    fn render(&self, error: &AuthError) -> Response<B> {
        self(error)
    }
}

/// The default rendering: Blnk-compatible JSON with the status of the error's code and a
/// `WWW-Authenticate` challenge on 401.
#[derive(Clone, Debug)]
pub struct JsonRejection {
    challenge: HeaderValue,
}

impl Default for JsonRejection {
    fn default() -> Self {
        Self {
            challenge: HeaderValue::from_static(DEFAULT_CHALLENGE),
        }
    }
}

pub(crate) const DEFAULT_CHALLENGE: &str = "ApiKey realm=\"api\"";

impl JsonRejection {
    /// The default rendering.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the `WWW-Authenticate` value sent with 401s (default `ApiKey realm="api"`).
    #[must_use]
    pub fn challenge(mut self, challenge: HeaderValue) -> Self {
        self.challenge = challenge;
        self
    }

    /// Renders into a [`Bytes`] body; the building block for any body type.
    pub fn render_bytes(&self, error: &AuthError) -> Response<Bytes> {
        let mut response = Response::new(error.json_body());
        *response.status_mut() = error.http_status();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if response.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, self.challenge.clone());
        }
        response
    }
}

impl<B: From<Bytes>> RenderRejection<B> for JsonRejection {
    fn render(&self, error: &AuthError) -> Response<B> {
        self.render_bytes(error).map(B::from)
    }
}

/// Renders refusals the gRPC way: HTTP 200, `content-type: application/grpc`, and `grpc-status` /
/// `grpc-message` headers (a trailers-only response), with an empty body.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcRejection;

impl<B: Default> RenderRejection<B> for GrpcRejection {
    fn render(&self, error: &AuthError) -> Response<B> {
        let mut response = Response::new(B::default());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(error.code().grpc_code()));
        let message = format!("{}: {}", error.code().as_str(), error);
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&percent_encode_grpc(&message))
                .unwrap_or_else(|_| HeaderValue::from_static("error")),
        );
        response
    }
}

/// gRPC's message encoding: printable ASCII except '%' as is, everything else `%XX`.
pub(super) fn percent_encode_grpc(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Renders `error` with `renderer` and applies what every rejection carries: the error itself in the
/// response extensions and a `WWW-Authenticate` challenge on 401.
pub(crate) fn reject<B, R: RenderRejection<B>>(renderer: &R, error: AuthError) -> Response<B> {
    let mut response = renderer.render(&error);
    if response.status() == StatusCode::UNAUTHORIZED
        && !response.headers().contains_key(WWW_AUTHENTICATE)
    {
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(DEFAULT_CHALLENGE),
        );
    }
    response.extensions_mut().insert(error);
    response
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for AuthError {
    fn into_response(self) -> axum_core::response::Response {
        reject::<axum_core::body::Body, _>(&JsonRejection::default(), self)
    }
}
