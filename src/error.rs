//! Errors, their stable codes, and how rejections are rendered.
//!
//! Every refusal is an [`AuthError`]. Its [`ErrorCode`] is the stable, machine-readable contract
//! (HTTP status, gRPC status and the `code` string in the body). The default rendering,
//! [`JsonRejection`], follows Blnk's body shape so its clients keep working:
//!
//! ```json
//! {"error": "API key has expired or was revoked",
//!  "error_detail": {"code": "AUTH_EXPIRED_API_KEY", "message": "API key has expired or was revoked",
//!                   "details": {"reason": "revoked"}}}
//! ```
//!
//! Plug in your own body with any `Fn(&AuthError) -> Response<B>` (or a type implementing
//! [`RenderRejection`]); whatever renders it, the middleware puts the [`AuthError`] in the response
//! extensions and adds `WWW-Authenticate` to a 401 that lacks one.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_keys::error::{AuthError, ErrorCode};
//! use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let resolver = CachedResolver::new(MemoryStore::new());
//! let layer = ApiKeyLayer::new(resolver).rejection(|error: &AuthError| {
//!     Response::builder()
//!         .status(error.code().http_status())
//!         .body(format!("denied: {}", error.code()))
//!         .unwrap()
//! });
//! let service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_: Request<LiveBody<String>>| async { Ok::<_, Infallible>(Response::new(String::from("hi"))) });
//!
//! let response = service.oneshot(Request::get("/").body(String::new())?).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(response.body().get_ref(), "denied: AUTH_MISSING_API_KEY");
//! // The typed error rides along, and the 401 got its challenge.
//! let error = response.extensions().get::<AuthError>().unwrap();
//! assert_eq!(error.code(), ErrorCode::MissingApiKey);
//! assert!(response.headers().contains_key("www-authenticate"));
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::scope::{ScopeMatch, ScopeSet};
use crate::store::error::StoreError;

/// Declares [`ErrorCode`] from its table: each row is a variant, its string, HTTP status and gRPC
/// code.
///
/// `ErrorCode::ALL`, `as_str`, `http_status` and `grpc_code` all come from that one table, so
/// adding a code is adding a row (and mapping an [`AuthError`] variant to it in
/// [`AuthError::code`], which the compiler checks).
macro_rules! error_codes {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $code:literal, $status:ident, $grpc:literal;
    )+) => {
        /// The stable code of every refusal: a machine-readable string that never changes, with its
        /// HTTP status and gRPC status code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, in declaration order (`ALL[code as usize] == code`).
            pub const ALL: &'static [ErrorCode] = &[$(Self::$variant),+];

            /// The machine-readable code, e.g. `AUTH_INVALID_API_KEY`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)+
                }
            }

            /// The HTTP status.
            pub const fn http_status(self) -> StatusCode {
                match self {
                    $(Self::$variant => StatusCode::$status,)+
                }
            }

            /// The gRPC status code (as in `tonic::Code`).
            pub const fn grpc_code(self) -> i32 {
                match self {
                    $(Self::$variant => $grpc,)+
                }
            }
        }
    };
}

// gRPC codes: 3 INVALID_ARGUMENT, 5 NOT_FOUND, 7 PERMISSION_DENIED, 8 RESOURCE_EXHAUSTED,
// 14 UNAVAILABLE, 16 UNAUTHENTICATED.
error_codes! {
    /// `AUTH_MISSING_API_KEY`: no key on a protected route (401).
    MissingApiKey = "AUTH_MISSING_API_KEY", UNAUTHORIZED, 16;
    /// `AUTH_INVALID_API_KEY`: malformed, bad checksum or unknown key (401).
    InvalidApiKey = "AUTH_INVALID_API_KEY", UNAUTHORIZED, 16;
    /// `AUTH_EXPIRED_API_KEY`: expired or revoked key (401).
    ExpiredApiKey = "AUTH_EXPIRED_API_KEY", UNAUTHORIZED, 16;
    /// `LEAK_REPORT_UNVERIFIED`: a secret scanner's leak report whose signature is missing, malformed,
    /// made with an unknown key or wrong; it changed nothing (401).
    LeakReportUnverified = "LEAK_REPORT_UNVERIFIED", UNAUTHORIZED, 16;
    /// `AUTH_MISSING_PRINCIPAL`: a guard or extractor ran but no layer authenticated the request (401).
    MissingPrincipal = "AUTH_MISSING_PRINCIPAL", UNAUTHORIZED, 16;
    /// `AUTH_INSUFFICIENT_PERMISSIONS`: valid key, missing scope (403).
    InsufficientPermissions = "AUTH_INSUFFICIENT_PERMISSIONS", FORBIDDEN, 7;
    /// `AUTH_CROSS_OWNER_ACCESS`: managing another owner's keys (403).
    CrossOwnerAccess = "AUTH_CROSS_OWNER_ACCESS", FORBIDDEN, 7;
    /// `AUTH_SCOPE_ESCALATION`: granting scopes or an expiry beyond the caller's own (403).
    ScopeEscalation = "AUTH_SCOPE_ESCALATION", FORBIDDEN, 7;
    /// `AUTH_OUTSIDE_SUBTREE`: changing, or obtaining the secret of, a key the caller did not
    /// create (directly or through its delegates): a scoped key governs its own subtree only (403).
    OutsideSubtree = "AUTH_OUTSIDE_SUBTREE", FORBIDDEN, 7;
    /// `AUTH_NETWORK_NOT_ALLOWED`: the request comes from outside the key's allowed networks (403).
    NetworkNotAllowed = "AUTH_NETWORK_NOT_ALLOWED", FORBIDDEN, 7;
    /// `AUTH_MASTER_KEY_REQUIRED`: only the master key may do this (403).
    MasterKeyRequired = "AUTH_MASTER_KEY_REQUIRED", FORBIDDEN, 7;
    /// `APIKEY_OWNER_REQUIRED`: a master-key call that names no owner (400).
    OwnerRequired = "APIKEY_OWNER_REQUIRED", BAD_REQUEST, 3;
    /// `APIKEY_INVALID`: a bad request body or parameter (400).
    InvalidRequest = "APIKEY_INVALID", BAD_REQUEST, 3;
    /// `APIKEY_LIMIT_REACHED`: the owner's or account's active-key limit is reached (409).
    LimitReached = "APIKEY_LIMIT_REACHED", CONFLICT, 8;
    /// `APIKEY_NOT_FOUND`: unknown key id, or another owner's (404).
    NotFound = "APIKEY_NOT_FOUND", NOT_FOUND, 5;
    /// `WEBHOOK_URL_REFUSED`: a webhook URL that is malformed, not https, or resolves to a
    /// loopback, private, link-local, metadata or otherwise non-public address, unless the
    /// application allows those (400; `details.reason` says which).
    WebhookUrlRefused = "WEBHOOK_URL_REFUSED", BAD_REQUEST, 3;
    /// `WEBHOOK_NOT_FOUND`: unknown webhook endpoint id, or one the caller may not see (404).
    WebhookNotFound = "WEBHOOK_NOT_FOUND", NOT_FOUND, 5;
    /// `WEBHOOK_LIMIT_REACHED`: the owner has as many webhook endpoints as allowed (409).
    WebhookLimitReached = "WEBHOOK_LIMIT_REACHED", CONFLICT, 8;
    /// `REQUEST_BODY_TOO_LARGE`: a body the middleware must read is over its limit (413).
    PayloadTooLarge = "REQUEST_BODY_TOO_LARGE", PAYLOAD_TOO_LARGE, 8;
    /// `REQUEST_INVALID_METADATA`: a JSON body's metadata field is not an object, so provenance
    /// cannot be stamped into it (400).
    InvalidMetadata = "REQUEST_INVALID_METADATA", BAD_REQUEST, 3;
    /// `REQUEST_AMBIGUOUS_METADATA`: a JSON body that readers could understand in two ways: two
    /// metadata members equal under ASCII case folding, or a member named like the provenance
    /// stamp where the layer does not write it (400).
    AmbiguousMetadata = "REQUEST_AMBIGUOUS_METADATA", BAD_REQUEST, 3;
    /// `REQUEST_UNSUPPORTED_MEDIA_TYPE`: a stamped route got a body it cannot stamp (not a JSON
    /// object by media type or content, an encoding, ambiguous framing headers) from a scoped key (415).
    UnsupportedMediaType = "REQUEST_UNSUPPORTED_MEDIA_TYPE", UNSUPPORTED_MEDIA_TYPE, 3;
    /// `AUTH_UNAVAILABLE`: the key store cannot answer and nothing is cached (503).
    Unavailable = "AUTH_UNAVAILABLE", SERVICE_UNAVAILABLE, 14;
    /// `RATE_LIMITED`: over the key's rate limit (429, `Retry-After`).
    RateLimited = "RATE_LIMITED", TOO_MANY_REQUESTS, 8;
    /// `USAGE_EXCEEDED`: the key's credits are spent (429, `Retry-After` until a refill).
    UsageExceeded = "USAGE_EXCEEDED", TOO_MANY_REQUESTS, 8;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a presented key was refused as invalid.
///
/// Shown as `details.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKeyReason {
    /// Not of the configured format (prefix, length, alphabet), or not visible ASCII.
    Malformed,
    /// Well-formed but the checksum does not match: a typo or a made-up key.
    BadChecksum,
    /// Two different keys in one request.
    Ambiguous,
    /// Well-formed, but no store knows it.
    Unknown,
}

impl InvalidKeyReason {
    /// `malformed`, `checksum`, `ambiguous` or `unknown`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadChecksum => "checksum",
            Self::Ambiguous => "ambiguous",
            Self::Unknown => "unknown",
        }
    }
}

/// Why a known key no longer works.
///
/// Shown as `details.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiredReason {
    /// Its expiry (or the grace period of a rotated secret) has passed.
    Expired,
    /// It was revoked.
    Revoked,
}

impl ExpiredReason {
    /// `expired` or `revoked`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

/// Every refusal the crate produces.
///
/// Cheap to clone; never contains a key or a digest.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No key was presented on a protected route.
    #[error("API key is missing")]
    MissingKey,
    /// The presented key is malformed, fails its checksum, or is unknown.
    #[error("API key is invalid")]
    InvalidKey(InvalidKeyReason),
    /// The presented key expired or was revoked.
    #[error("API key has expired or was revoked")]
    ExpiredKey(ExpiredReason),
    /// A leak report's signature was not accepted; `details.reason` says why (a stable name such
    /// as `bad_signature` or `unknown_key_identifier`).
    #[error("the leak report's signature could not be verified")]
    LeakReportUnverified(&'static str),
    /// A guard or extractor found no principal: the authentication layer is not in front of it.
    #[error(
        "no authenticated principal on this request; is ApiKeyLayer installed in front of this route?"
    )]
    MissingPrincipal,
    /// The key lacks the scopes the route requires.
    #[error("API key lacks the required scopes")]
    InsufficientPermissions {
        /// The scopes the route asked for.
        required: ScopeSet,
        /// Whether all or any of them were needed.
        mode: ScopeMatch,
    },
    /// The caller tried to manage keys of another owner.
    #[error("API keys of another owner cannot be managed with this key")]
    CrossOwnerAccess,
    /// The caller tried to grant more than it holds.
    #[error("{0}")]
    ScopeEscalation(Cow<'static, str>),
    /// A power operation on a key outside the caller's subtree (invariant I1); the message names
    /// the operation.
    #[error("{0}")]
    OutsideSubtree(Cow<'static, str>),
    /// The request comes from outside the key's allowed networks.
    #[error("API key is not allowed from this network")]
    NetworkNotAllowed,
    /// The operation needs the master key.
    #[error("this operation requires the master key")]
    MasterKeyRequired,
    /// A master-key call did not name an owner.
    #[error("an owner is required when using the master key")]
    OwnerRequired,
    /// A bad request body or parameter; the message says what is wrong (never echoing a secret).
    #[error("{0}")]
    InvalidRequest(Cow<'static, str>),
    /// The active-key limit is reached.
    #[error("active API key limit of {limit} reached for this {scope}")]
    LimitReached {
        /// The configured maximum.
        limit: u32,
        /// `owner` or `account`.
        scope: &'static str,
    },
    /// No such key (or it belongs to another owner).
    #[error("API key not found")]
    NotFound,
    /// A webhook URL the [`UrlPolicy`](crate::webhooks::UrlPolicy) refuses; `details.reason`
    /// says why (a stable name: `malformed`, `not_https`, `credentials`, `private_address`,
    /// `unresolvable`).
    #[error("the webhook URL is not allowed")]
    WebhookUrlRefused(&'static str),
    /// No such webhook endpoint (or the caller may not see it).
    #[error("webhook not found")]
    WebhookNotFound,
    /// The owner's webhook endpoint limit is reached.
    #[error("webhook limit of {limit} reached for this owner")]
    WebhookLimitReached {
        /// The maximum.
        limit: u32,
    },
    /// A body the middleware had to read exceeded its limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A JSON body's metadata field is not an object (provenance cannot be stamped).
    #[error("{0}")]
    InvalidMetadata(Cow<'static, str>),
    /// A JSON body with metadata or stamp members that readers could match in two ways; the message
    /// says which (never echoing the body).
    #[error("{0}")]
    AmbiguousMetadata(Cow<'static, str>),
    /// A stamped route got a body it cannot stamp; the message says why (never echoing the body).
    #[error("{0}")]
    UnsupportedMediaType(Cow<'static, str>),
    /// The key store failed or timed out and nothing was cached.
    ///
    /// The store error is kept for logs; it is never shown to clients.
    #[error("authentication is temporarily unavailable")]
    Unavailable(#[source] StoreError),
    /// Over the key's rate limit.
    #[error("rate limit exceeded; retry in {retry_after} s")]
    RateLimited {
        /// Seconds until the request would pass (the `Retry-After` value).
        retry_after: u64,
    },
    /// The key's usage credits are spent.
    #[error("usage credits exhausted")]
    UsageExceeded {
        /// Seconds until the next refill, if the credits refill.
        retry_after: Option<u64>,
    },
}

impl AuthError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingKey => ErrorCode::MissingApiKey,
            Self::InvalidKey(_) => ErrorCode::InvalidApiKey,
            Self::ExpiredKey(_) => ErrorCode::ExpiredApiKey,
            Self::MissingPrincipal => ErrorCode::MissingPrincipal,
            Self::LeakReportUnverified(_) => ErrorCode::LeakReportUnverified,
            Self::InsufficientPermissions { .. } => ErrorCode::InsufficientPermissions,
            Self::CrossOwnerAccess => ErrorCode::CrossOwnerAccess,
            Self::ScopeEscalation(_) => ErrorCode::ScopeEscalation,
            Self::OutsideSubtree(_) => ErrorCode::OutsideSubtree,
            Self::NetworkNotAllowed => ErrorCode::NetworkNotAllowed,
            Self::MasterKeyRequired => ErrorCode::MasterKeyRequired,
            Self::OwnerRequired => ErrorCode::OwnerRequired,
            Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::LimitReached { .. } => ErrorCode::LimitReached,
            Self::NotFound => ErrorCode::NotFound,
            Self::WebhookUrlRefused(_) => ErrorCode::WebhookUrlRefused,
            Self::WebhookNotFound => ErrorCode::WebhookNotFound,
            Self::WebhookLimitReached { .. } => ErrorCode::WebhookLimitReached,
            Self::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::InvalidMetadata(_) => ErrorCode::InvalidMetadata,
            Self::AmbiguousMetadata(_) => ErrorCode::AmbiguousMetadata,
            Self::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::UsageExceeded { .. } => ErrorCode::UsageExceeded,
        }
    }

    /// Shorthand for [`ErrorCode::http_status`].
    pub fn http_status(&self) -> StatusCode {
        self.code().http_status()
    }

    /// Structured details for the body's `error_detail.details`, if any.
    pub fn details(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        match self {
            Self::InvalidKey(reason) => Some(json!({ "reason": reason.as_str() })),
            Self::ExpiredKey(reason) => Some(json!({ "reason": reason.as_str() })),
            Self::LeakReportUnverified(reason) => Some(json!({ "reason": reason })),
            Self::InsufficientPermissions { required, mode } => {
                Some(json!({ "required": required, "match": mode.as_str() }))
            }
            Self::LimitReached { limit, scope } => Some(json!({ "limit": limit, "per": scope })),
            Self::WebhookUrlRefused(reason) => Some(json!({ "reason": reason })),
            Self::WebhookLimitReached { limit } => Some(json!({ "limit": limit, "per": "owner" })),
            Self::PayloadTooLarge { limit } => Some(json!({ "limit": limit })),
            Self::RateLimited { retry_after } => Some(json!({ "retry_after": retry_after })),
            Self::UsageExceeded {
                retry_after: Some(retry_after),
            } => Some(json!({ "retry_after": retry_after })),
            _ => None,
        }
    }

    /// The `Retry-After` seconds of a rate-limit or credit refusal.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::UsageExceeded { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// The serialised body of [`JsonRejection`].
    ///
    /// The bodies that never change (a missing, malformed, unknown, expired or revoked key, a store
    /// outage, ...) are serialised once per process: they are what an attacker can make a server
    /// send, so refusing must cost less than admitting.
    fn json_body(&self) -> Bytes {
        static FIXED: [OnceLock<&'static [u8]>; FIXED_BODIES] =
            [const { OnceLock::new() }; FIXED_BODIES];
        let render =
            || serde_json::to_vec(&self.to_json()).expect("a JSON value always serialises");
        match self.fixed_body() {
            Some(i) => Bytes::from_static(FIXED[i].get_or_init(|| render().leak())),
            None => Bytes::from(render()),
        }
    }

    /// Where this error's body sits among the bodies that depend on nothing but the error's kind.
    fn fixed_body(&self) -> Option<usize> {
        use ExpiredReason as E;
        use InvalidKeyReason as I;
        Some(match self {
            Self::MissingKey => 0,
            Self::InvalidKey(I::Malformed) => 1,
            Self::InvalidKey(I::BadChecksum) => 2,
            Self::InvalidKey(I::Ambiguous) => 3,
            Self::InvalidKey(I::Unknown) => 4,
            Self::ExpiredKey(E::Expired) => 5,
            Self::ExpiredKey(E::Revoked) => 6,
            Self::MissingPrincipal => 7,
            Self::CrossOwnerAccess => 8,
            Self::MasterKeyRequired => 9,
            Self::OwnerRequired => 10,
            Self::NotFound => 11,
            // The store error is kept for logs, never shown: the body is always the same.
            Self::Unavailable(_) => 12,
            _ => return None,
        })
    }

    /// The body of [`JsonRejection`]: `{"error", "error_detail": {"code", "message", "details"?}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let message = self.to_string();
        let mut detail = serde_json::Map::new();
        detail.insert("code".into(), self.code().as_str().into());
        detail.insert("message".into(), message.clone().into());
        if let Some(details) = self.details() {
            detail.insert("details".into(), details);
        }
        serde_json::json!({ "error": message, "error_detail": detail })
    }

    /// Builds an [`AuthError::InvalidRequest`].
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidRequest(message.into())
    }
}

/// How many refusal bodies [`AuthError::fixed_body`] numbers.
const FIXED_BODIES: usize = 13;

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e)
    }
}

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
fn percent_encode_grpc(message: &str) -> String {
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

#[cfg(test)]
impl AuthError {
    /// An error of `code`, for tests that must cover every code: a new code fails to compile here
    /// until it has an example.
    pub(crate) fn example(code: ErrorCode) -> Self {
        match code {
            ErrorCode::MissingApiKey => Self::MissingKey,
            ErrorCode::InvalidApiKey => Self::InvalidKey(InvalidKeyReason::Unknown),
            ErrorCode::ExpiredApiKey => Self::ExpiredKey(ExpiredReason::Revoked),
            ErrorCode::MissingPrincipal => Self::MissingPrincipal,
            ErrorCode::LeakReportUnverified => Self::LeakReportUnverified("bad_signature"),
            ErrorCode::InsufficientPermissions => Self::InsufficientPermissions {
                required: ScopeSet::parse(["ledgers:write"]).unwrap(),
                mode: ScopeMatch::All,
            },
            ErrorCode::CrossOwnerAccess => Self::CrossOwnerAccess,
            ErrorCode::ScopeEscalation => Self::ScopeEscalation("scope ledgers:write".into()),
            ErrorCode::MasterKeyRequired => Self::MasterKeyRequired,
            ErrorCode::OwnerRequired => Self::OwnerRequired,
            ErrorCode::InvalidRequest => Self::invalid("name: too long"),
            ErrorCode::LimitReached => Self::LimitReached {
                limit: 3,
                scope: "owner",
            },
            ErrorCode::NotFound => Self::NotFound,
            ErrorCode::WebhookUrlRefused => Self::WebhookUrlRefused("private_address"),
            ErrorCode::WebhookNotFound => Self::WebhookNotFound,
            ErrorCode::WebhookLimitReached => Self::WebhookLimitReached { limit: 16 },
            ErrorCode::PayloadTooLarge => Self::PayloadTooLarge { limit: 1024 },
            ErrorCode::InvalidMetadata => Self::InvalidMetadata("meta_data: not an object".into()),
            ErrorCode::UnsupportedMediaType => {
                Self::UnsupportedMediaType("the body is not a JSON object".into())
            }
            ErrorCode::AmbiguousMetadata => {
                Self::AmbiguousMetadata("meta_data appears twice under ASCII case folding".into())
            }
            ErrorCode::OutsideSubtree => {
                Self::OutsideSubtree("cannot rotate a key outside the calling key's subtree".into())
            }
            ErrorCode::NetworkNotAllowed => Self::NetworkNotAllowed,
            ErrorCode::Unavailable => Self::Unavailable(StoreError::unavailable("refused")),
            ErrorCode::RateLimited => Self::RateLimited { retry_after: 3 },
            ErrorCode::UsageExceeded => Self::UsageExceeded {
                retry_after: Some(60),
            },
        }
    }
}

#[cfg(test)]
mod tests;
