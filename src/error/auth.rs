//! [`AuthError`]: every refusal the crate produces, and its JSON body.

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;
use http::StatusCode;

use super::store::StoreError;
use crate::scope::{ScopeMatch, ScopeSet};

use super::code::{ErrorCode, ExpiredReason, InvalidKeyReason};

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
    pub(super) fn json_body(&self) -> Bytes {
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
    pub(super) fn fixed_body(&self) -> Option<usize> {
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

    /// The body of [`JsonRejection`](super::JsonRejection): `{"error", "error_detail": {"code", "message", "details"?}}`.
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
pub(super) const FIXED_BODIES: usize = 13;

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e)
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
