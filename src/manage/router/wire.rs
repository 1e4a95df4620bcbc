//! The management API's wire format: request bodies, responses, parameters and the helpers that
//! read and write them (Blnk's field names), shared by the key and pool handlers.

use axum::extract::Path;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

use super::super::types::{CreatedKey, KeyInfo};
use super::super::validate::{MAX_BODY_BYTES, MAX_KEY_ID_LEN};
use super::fields::{
    networks_schema, new_name_schema, present, reason_schema, renamed_schema, scopes_schema, whole,
    whole_or_null,
};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::limits::{Credits, RateLimit, Refill, RefillInterval, UsageLimits};

/// `last_used_at` of a key that was never used, as Blnk reports it.
pub(super) const NEVER: &str = "0001-01-01T00:00:00Z";

/// Body of `POST /api-keys`.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(examples(
    json!({"name": "payments reader", "owner": "payments", "scopes": ["ledgers:read"],
           "allowed_networks": ["203.0.113.0/24", "2001:db8::/32"]}),
    json!({"name": "ledger reader", "scopes": ["ledgers:read"]}),
))]
pub(super) struct CreateKeyBody {
    /// Display name (default: timestamp-based).
    #[schema(schema_with = new_name_schema)]
    pub(super) name: Option<String>,
    /// Owner (team, service or tenant). Required with the master key; a scoped key may only name
    /// its own.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) owner: Option<String>,
    /// Account the key acts inside (default: the caller's, or the owner).
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) account: Option<String>,
    /// 1 to 64 scopes in `resource:action` form (`[a-z0-9_-]+` or `*` each side; `*` alone is
    /// `*:*`), each at most 128 characters, covered by the caller's own.
    #[schema(schema_with = scopes_schema)]
    pub(super) scopes: Vec<String>,
    /// RFC 3339 expiry, in the future (and within the server's maximum lifetime, if any: see
    /// `GET /api-keys/policy`).
    #[schema(format = DateTime)]
    pub(super) expires_at: Option<String>,
    /// At most `limit` requests (or cost units) per `period_seconds` (default: the server's
    /// policy; a delegated key's is never looser than its creator's).
    pub(super) rate_limit: Option<RateLimitBody>,
    /// Usage credits (default: the server's policy; a delegated key never gets more than its
    /// creator has left).
    pub(super) credits: Option<CreditsBody>,
    /// Where the key may be used from (see the schema's description).
    #[schema(schema_with = networks_schema)]
    pub(super) allowed_networks: Option<Vec<String>>,
}

/// A rate limit: `limit` units per `period_seconds` (a bucket of `limit`, refilled evenly).
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitBody {
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub(super) limit: u32,
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 31_622_400)]
    pub(super) period_seconds: u32,
}

/// A refill: `remaining` is set to `amount` at 00:00 UTC daily, or on the 1st monthly.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RefillBody {
    #[schema(value_type = String, pattern = "^(daily|monthly)$")]
    pub(super) interval: RefillInterval,
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_u64)]
    pub(super) amount: u64,
}

/// Usage credits to set.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct CreditsBody {
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_u64)]
    pub(super) remaining: u64,
    pub(super) refill: Option<RefillBody>,
}

/// Usage credits as they stand.
#[derive(Serialize, ToSchema)]
pub(super) struct CreditsResponse {
    /// Credits left now (a due refill applied).
    pub(super) remaining: u64,
    pub(super) refill: Option<RefillBody>,
}

pub(super) fn rate_limit_body(limits: &UsageLimits) -> Option<RateLimitBody> {
    limits.rate_limit.map(|r| RateLimitBody {
        limit: r.limit,
        period_seconds: r.period_seconds,
    })
}

pub(super) fn credits_body(limits: &UsageLimits) -> Option<CreditsResponse> {
    limits.credits.map(|c| CreditsResponse {
        remaining: c.remaining,
        refill: c.refill.map(|r: Refill| RefillBody {
            interval: r.interval,
            amount: r.amount,
        }),
    })
}

impl From<RateLimitBody> for RateLimit {
    fn from(b: RateLimitBody) -> Self {
        RateLimit::new(b.limit, b.period_seconds)
    }
}

impl From<CreditsBody> for Credits {
    fn from(b: CreditsBody) -> Self {
        let credits = Credits::new(b.remaining);
        match b.refill {
            Some(refill) => credits.refill(refill.interval, refill.amount),
            None => credits,
        }
    }
}

/// Body of `PATCH /api-keys/{id}`: fields left out stay as they are.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateKeyBody {
    /// A new name (same rules as on create).
    #[schema(schema_with = renamed_schema)]
    pub(super) name: Option<String>,
    /// A new rate limit; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    pub(super) rate_limit: Option<Option<RateLimitBody>>,
    /// New credits (replacing the count); `null` removes them.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    pub(super) credits: Option<Option<CreditsBody>>,
}

/// Body of `POST /api-keys/{id}/rotate` (optional).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateBody {
    /// Seconds the old secret keeps working (default 0: it stops at once; at most 30 days).
    #[serde(default, deserialize_with = "whole_or_null")]
    #[schema(minimum = 0, maximum = 2_592_000)]
    pub(super) grace_period_seconds: Option<u64>,
    /// Also revoke every key this key created, transitively (default `false`: a routine rotation
    /// keeps delegated keys working). Set it when the secret may have leaked, with no grace period.
    pub(super) revoke_descendants: Option<bool>,
}

/// A key as the API shows it. `key` (the plaintext) appears only on create and rotate.
#[derive(Serialize, ToSchema)]
pub(super) struct KeyResponse {
    pub(super) api_key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<String>,
    pub(super) name: String,
    pub(super) owner_id: String,
    pub(super) account_id: String,
    pub(super) scopes: Vec<String>,
    /// Masked secret, e.g. `sk_live_Ab3d…x9Qz`.
    pub(super) masked_key: String,
    pub(super) expires_at: Option<String>,
    pub(super) created_at: String,
    /// `0001-01-01T00:00:00Z` when never used.
    pub(super) last_used_at: String,
    pub(super) is_revoked: bool,
    pub(super) revoked_at: Option<String>,
    pub(super) rotated_at: Option<String>,
    pub(super) created_by: Option<String>,
    /// The key's rate limit, if any.
    pub(super) rate_limit: Option<RateLimitBody>,
    /// The key's credits, if any, with what is left now.
    pub(super) credits: Option<CreditsResponse>,
    /// Where the key may be used from (`null`: anywhere).
    pub(super) allowed_networks: Option<Vec<String>>,
}

/// The calling key, as `GET /api-keys/self` shows it: what the console needs to offer only what
/// the key may do.
#[derive(Serialize, ToSchema)]
pub(super) struct CallerResponse {
    /// `master` or `scoped`.
    #[schema(example = "scoped")]
    pub(super) kind: &'static str,
    /// `master` for the master key.
    pub(super) api_key_id: String,
    pub(super) name: String,
    /// `null` for the master key, which acts for any owner.
    pub(super) owner_id: Option<String>,
    /// `null` for the master key.
    pub(super) account_id: Option<String>,
    pub(super) scopes: Vec<String>,
    /// When the calling key stops working (a rotation grace end counts), if ever: no key it creates
    /// may expire later.
    pub(super) expires_at: Option<String>,
    /// The calling key's rate limit, if any: no key it creates or changes may get a looser one.
    pub(super) rate_limit: Option<RateLimitBody>,
    /// The calling key's credits as its record had them when it was loaded, if any: no key it
    /// creates or changes may get more, or a bigger or more frequent refill.
    pub(super) credits: Option<CreditsResponse>,
}

/// The rules for new keys, as `GET /api-keys/policy` shows them to the calling key.
#[derive(Serialize, ToSchema)]
pub(super) struct PolicyResponse {
    /// The owner the counts are for.
    pub(super) owner_id: String,
    /// The owner's active (unrevoked, unexpired) keys.
    pub(super) active_keys: u64,
    /// Most active keys per owner, if limited.
    pub(super) max_active_per_owner: Option<u32>,
    /// Most active keys per account, if limited.
    pub(super) max_active_per_account: Option<u32>,
    /// Lifetime of a key created without `expires_at`, if set.
    pub(super) default_lifetime_seconds: Option<u64>,
    /// Longest lifetime of a key, if limited.
    pub(super) max_lifetime_seconds: Option<u64>,
    /// What a key created now without `expires_at` would get from this caller (`null`: never expires).
    pub(super) default_expires_at: Option<String>,
    /// The latest `expires_at` this caller may give a key created now (`null`: no bound).
    pub(super) latest_expires_at: Option<String>,
    /// Whether this caller may create a key that never expires.
    pub(super) never_expires_allowed: bool,
    /// The owner's shared pool (every key of the owner counts against it), `null` when none.
    pub(super) owner_pool: Option<PoolResponse>,
    /// The shared pool of the calling key's account (a scoped key), `null` when none or for the
    /// master key.
    pub(super) account_pool: Option<PoolResponse>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyParams {
    pub(super) owner: Option<String>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    pub(super) error: String,
    pub(super) error_detail: ErrorDetail,
}

/// Machine-readable error detail.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// Stable code, e.g. `AUTH_SCOPE_ESCALATION`.
    pub(super) code: String,
    pub(super) message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) details: Option<serde_json::Value>,
}

/// The `{id}` path parameter, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct KeyIdParam(
    /// The key's id (`api_key_id`); an id longer than 128 characters is unknown (404).
    #[param(min_length = 1, max_length = 128)]
    String,
);

/// The `owner` query parameter of the id-addressed routes, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct OwnerQuery {
    /// The key's owner (Blnk sends it when revoking). When given it must match: another owner's
    /// key is 404, and a scoped key naming an owner other than its own gets 403
    /// `AUTH_CROSS_OWNER_ACCESS`. 1 to 128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) owner: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    pub(super) owner: Option<String>,
    pub(super) limit: Option<u32>,
    pub(super) before: Option<String>,
}

/// The query of `DELETE /api-keys/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteParams {
    /// Delete the record instead of revoking (master key only).
    #[serde(default)]
    #[param(value_type = Option<bool>)]
    pub(super) permanent: bool,
    /// The key's owner (see `GET /api-keys/{id}`). 1 to 128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) owner: Option<String>,
    /// Why (recorded in the `key.revoked` event; default `requested`): the rules of a key name.
    #[param(schema_with = reason_schema)]
    pub(super) reason: Option<String>,
}

/// `?owner=` of the other id-addressed routes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OwnerParam {
    pub(super) owner: Option<String>,
}

pub(super) fn query<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, AuthError> {
    params
        .map(|Query(params)| params)
        .map_err(|e| AuthError::invalid(format!("invalid query: {}", e.body_text())))
}

pub(super) fn timestamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| NEVER.to_owned())
}

impl KeyResponse {
    pub(super) fn new(info: KeyInfo, key: Option<String>) -> Self {
        Self {
            api_key_id: info.id.to_string(),
            key,
            name: info.name,
            owner_id: info.owner,
            account_id: info.account,
            scopes: info.scopes.to_strings(),
            masked_key: info.masked_key,
            expires_at: info.expires_at.map(timestamp),
            created_at: timestamp(info.created_at),
            last_used_at: info
                .last_used_at
                .map_or_else(|| NEVER.to_owned(), timestamp),
            is_revoked: info.revoked_at.is_some(),
            revoked_at: info.revoked_at.map(timestamp),
            rotated_at: info.rotated_at.map(timestamp),
            created_by: info.created_by.map(|id| id.to_string()),
            rate_limit: rate_limit_body(&info.limits),
            credits: credits_body(&info.limits),
            allowed_networks: info
                .allowed_networks
                .map(|n| n.as_slice().iter().map(ToString::to_string).collect()),
        }
    }

    pub(super) fn created(created: CreatedKey) -> Self {
        Self::new(created.info, Some(created.key.expose_secret().to_owned()))
    }
}

/// JSON response that is never cached by intermediaries (it may hold a plaintext key).
pub(super) fn no_store(status: StatusCode, body: impl Serialize) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

pub(super) fn parse_json<T: for<'de> Deserialize<'de> + Default>(
    body: &[u8],
    empty_ok: bool,
) -> Result<T, AuthError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(AuthError::invalid("request body must be a JSON object"))
        };
    }
    // serde reads a struct from a JSON array too (`["renamed"]` would rename a key): the API
    // takes objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AuthError::invalid("request body must be a JSON object"));
    }
    serde_json::from_slice(body)
        .map_err(|e| AuthError::invalid(format!("invalid request body: {e}")))
}

pub(super) fn body_error(rejection: BytesRejection) -> AuthError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return AuthError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        };
    }
    AuthError::invalid(format!(
        "unreadable request body: {}",
        rejection.body_text()
    ))
}

pub(super) fn key_id(path: Result<Path<String>, PathRejection>) -> Result<KeyId, AuthError> {
    let Path(id) = path.map_err(|_| AuthError::NotFound)?;
    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
        return Err(AuthError::NotFound);
    }
    Ok(KeyId::new(id))
}

// 415 for bodies a provenance layer cannot stamp: the provenance work (#12 item 4) adds that
// response to the POST operations below (create, rotate) when the management routes sit behind it.

/// Body of `PUT /api-keys/pools`: the pool's limits, replacing what it had (credits are set now).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolBody {
    /// The owner whose pool this is. Required.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) owner: Option<String>,
    /// The account, for an account's pool; left out for the owner's pool.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) account: Option<String>,
    /// The pool's rate limit, shared by every key of the owner (account).
    pub(super) rate_limit: Option<RateLimitBody>,
    /// The pool's credits, shared by every key of the owner (account).
    pub(super) credits: Option<CreditsBody>,
}

/// A shared pool as it stands.
#[derive(Serialize, ToSchema)]
pub(super) struct PoolResponse {
    pub(super) owner_id: String,
    /// `null` for the owner's pool.
    pub(super) account_id: Option<String>,
    /// `null` when no pool is set.
    pub(super) rate_limit: Option<RateLimitBody>,
    /// `null` when no pool is set, else with what is left now.
    pub(super) credits: Option<CreditsResponse>,
}

impl PoolResponse {
    pub(super) fn new(owner: &str, account: Option<&str>, limits: Option<UsageLimits>) -> Self {
        let limits = limits.unwrap_or_default();
        let credits = limits
            .credits
            .map(|c| c.refreshed(OffsetDateTime::now_utc()));
        Self {
            owner_id: owner.to_owned(),
            account_id: account.map(str::to_owned),
            rate_limit: rate_limit_body(&limits),
            credits: credits_body(&UsageLimits { credits, ..limits }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolParams {
    pub(super) owner: Option<String>,
    pub(super) account: Option<String>,
}

/// `?owner=` and `?account=` of `GET /api-keys/pools`, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct PoolQuery {
    /// The owner (required with the master key; a scoped key may name only its own).
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) owner: Option<String>,
    /// The account, for an account's pool; left out for the owner's pool.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub(super) account: Option<String>,
}
