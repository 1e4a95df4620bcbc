//! [`ErrorCode`]: the one table of stable codes, and the reasons shown as `details.reason`.

use std::fmt;

use http::StatusCode;

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
