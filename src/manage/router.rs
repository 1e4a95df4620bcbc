use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::quota::{Credits, RateLimit, Refill, RefillInterval, UsageLimits};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{OpenApi, ToSchema};

use super::activity_routes::Acting;
use super::{
    CreateKey, CreatedKey, DEFAULT_PAGE_SIZE, KeyInfo, KeyManager, MAX_BODY_BYTES, MAX_KEY_ID_LEN,
    RotateOptions, UpdateKey,
};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::network::Networks;
use crate::principal::Principal;

/// `last_used_at` of a key that was never used, as Blnk reports it.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// The management API, Blnk-compatible, to merge into your router behind
/// [`ApiKeyLayer`](crate::layer::ApiKeyLayer):
///
/// | request | does | answers |
/// |---|---|---|
/// | `POST /api-keys` `{name?, owner?, account?, scopes, expires_at?, rate_limit?, credits?}` | create | 201 key with plaintext `key` |
/// | `GET /api-keys?owner=&limit=&before=` | list, newest first | 200 array; `x-next-cursor` header if more |
/// | `GET /api-keys/{id}` | get | 200 key |
/// | `PATCH /api-keys/{id}` `{name?, rate_limit?, credits?}` (`null` removes a limit) | update | 200 key |
/// | `DELETE /api-keys/{id}?reason=` | revoke (soft), with every key it created | 204 |
/// | `DELETE /api-keys/{id}?permanent=true` | delete the record (master key only), revoke every key it created | 204 |
/// | `POST /api-keys/{id}/rotate` `{grace_period_seconds?, revoke_descendants?}` | new secret, same id | 200 key with plaintext `key` |
/// | `GET /api-keys/self` | who the calling key is (any valid key) | 200 caller |
/// | `GET /api-keys/policy?owner=` | lifetime policy, and the owner's active keys against the limit | 200 policy |
/// | `GET /api-keys/events?owner=&key_id=&type=&since=&until=&cursor=&limit=` | an owner's audit events, newest first (a scoped key: its subtree's only) | 200 `{events, next_cursor}` |
/// | `GET /api-keys/{id}/events` | one key's audit events, newest first | 200 `{events, next_cursor}` |
/// | `GET /api-keys/events/verify?owner=` | check the owner's hash chain (master key only) | 200 `{valid, checked, first_invalid?}` |
/// | `GET /api-keys/{id}/usage?from=&to=&granularity=hour\|day` | requests per period by outcome | 200 `{key_id, granularity, buckets, last_ip}` |
/// | `GET /api-keys/openapi.json` | this API's OpenAPI 3.1 document | 200 |
///
/// `self`, `policy`, `pools`, `events` and `openapi.json` are not key ids (generated ids start with `key_`).
///
/// Every id-addressed route accepts `?owner=<owner>` (Blnk revokes with
/// `DELETE /api-keys/{id}?owner=<owner>`): when given, it must be the key's owner, or the answer is
/// 404 (403 `AUTH_CROSS_OWNER_ACCESS` for a scoped key naming another owner than its own). Who may
/// do what is [`authorize`](super::authorize)'s table.
///
/// Errors use the crate's JSON error body; malformed JSON, unknown fields and wrong types are 400
/// `APIKEY_INVALID`, never a 500 or a plain-text rejection. Every input is bounded (see the limits
/// in the [module docs](super)); a body over [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES) is 413
/// `REQUEST_BODY_TOO_LARGE`.
///
/// ```
/// use std::sync::Arc;
/// use axum::Router;
/// use tower_api_keys::manage::{self, KeyManager};
/// use tower_api_keys::key::ApiKey;
/// use tower_api_keys::layer::{ApiKeyLayer, KeySource};
/// use tower_api_keys::resolver::CachedResolver;
/// use tower_api_keys::store::MemoryStore;
///
/// let store = Arc::new(MemoryStore::new());
/// let resolver = CachedResolver::new(store.clone());
/// let app: Router = Router::new()
///     .merge(manage::router(KeyManager::new(store, resolver.clone())))
///     .layer(
///         ApiKeyLayer::new(resolver)
///             .sources([KeySource::blnk(), KeySource::x_api_key()])
///             .master_key(ApiKey::new("a-long-master-key-from-config")),
///     );
/// ```
pub fn router(manager: KeyManager) -> Router {
    Router::new()
        .route("/api-keys", post(create_key).get(list_keys))
        .route(
            "/api-keys/openapi.json",
            get(|| async { axum::Json(openapi()) }),
        )
        .route("/api-keys/self", get(caller_info))
        .route("/api-keys/policy", get(policy_info))
        .route("/api-keys/pools", get(get_pool).put(set_pool))
        .route(
            "/api-keys/{id}",
            get(get_key).delete(revoke_key).patch(update_key),
        )
        .route("/api-keys/{id}/rotate", post(rotate_key))
        .merge(super::activity_routes::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(manager)
}

/// The OpenAPI document of [`router`]'s endpoints, to serve or merge into your own.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(super::activity_routes::ActivityDoc::openapi());
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tower-api-keys management API", description = "Create, list, revoke, delete and rotate scoped API keys."),
    paths(create_key, list_keys, get_key, update_key, revoke_key, rotate_key, caller_info, policy_info, get_pool, set_pool),
    components(schemas(CreateKeyBody, UpdateKeyBody, RotateBody, KeyResponse, RateLimitBody,
        CreditsBody, CreditsResponse, RefillBody, CallerResponse, PolicyResponse, PoolBody, PoolResponse, ErrorBody, ErrorDetail)),
    modifiers(&Security),
    security(("api_key" = []), ("blnk_key" = []), ("bearer" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "blnk_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-blnk-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Body of `POST /api-keys`.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    /// Display name (default: timestamp-based). At most 128 characters, not blank, no control,
    /// bidirectional-control or invisible (zero-width) characters; surrounding whitespace is
    /// trimmed.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0][^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*$"
    )]
    name: Option<String>,
    /// Owner (team, service or tenant). Required with the master key; a scoped key may only name
    /// its own.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    owner: Option<String>,
    /// Account the key acts inside (default: the caller's, or the owner).
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    account: Option<String>,
    /// 1 to 64 scopes in `resource:action` form (`[a-z0-9_-]+` or `*` each side; `*` alone is
    /// `*:*`), each at most 128 characters, covered by the caller's own.
    #[schema(schema_with = scopes_schema)]
    scopes: Vec<String>,
    /// RFC 3339 expiry, in the future (and within the server's maximum lifetime, if any).
    #[schema(format = DateTime, example = "2030-03-11T00:00:00Z")]
    expires_at: Option<String>,
    /// At most `limit` requests (or cost units) per `period_seconds` (default: the server's
    /// policy; a delegated key's is never looser than its creator's).
    rate_limit: Option<RateLimitBody>,
    /// Usage credits (default: the server's policy; a delegated key never gets more than its
    /// creator has left).
    credits: Option<CreditsBody>,
    /// Where the key may be used from: 1 to 32 IPv4 or IPv6 networks in CIDR notation (a bare
    /// address is one host). Default: anywhere, or a delegated key's creator's networks; a
    /// delegated key's must lie within its creator's. Requests from elsewhere get 403
    /// `AUTH_NETWORK_NOT_ALLOWED`.
    #[schema(min_items = 1, max_items = 32, example = json!(["203.0.113.0/24", "2001:db8::/32"]))]
    allowed_networks: Option<Vec<String>>,
}

/// A rate limit: `limit` units per `period_seconds` (a bucket of `limit`, refilled evenly).
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RateLimitBody {
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    limit: u32,
    #[schema(minimum = 1, maximum = 31_622_400)]
    period_seconds: u32,
}

/// A refill: `remaining` is set to `amount` at 00:00 UTC daily, or on the 1st monthly.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RefillBody {
    #[schema(value_type = String, pattern = "^(daily|monthly)$")]
    interval: RefillInterval,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_u64)]
    amount: u64,
}

/// Usage credits to set.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct CreditsBody {
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_u64)]
    remaining: u64,
    refill: Option<RefillBody>,
}

/// Usage credits as they stand.
#[derive(Serialize, ToSchema)]
struct CreditsResponse {
    /// Credits left now (a due refill applied).
    remaining: u64,
    refill: Option<RefillBody>,
}

fn rate_limit_body(limits: &UsageLimits) -> Option<RateLimitBody> {
    limits.rate_limit.map(|r| RateLimitBody {
        limit: r.limit,
        period_seconds: r.period_seconds,
    })
}

fn credits_body(limits: &UsageLimits) -> Option<CreditsResponse> {
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
struct UpdateKeyBody {
    /// A new name (same rules as on create).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0][^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*$"
    )]
    name: Option<String>,
    /// A new rate limit; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    rate_limit: Option<Option<RateLimitBody>>,
    /// New credits (replacing the count); `null` removes them.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    credits: Option<Option<CreditsBody>>,
}

/// A field that is present (possibly `null`), as opposed to left out.
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

fn scopes_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^(\*|(\*|[a-z0-9_-]+):(\*|[a-z0-9_-]+))$"))
                .max_length(Some(crate::scope::MAX_SCOPE_LEN)),
        )
        .min_items(Some(1))
        .max_items(Some(super::MAX_SCOPES))
        .examples([serde_json::json!(["ledgers:read", "balances:write"])])
        .build()
}

/// Body of `POST /api-keys/{id}/rotate` (optional).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Seconds the old secret keeps working (default 0: it stops at once; at most 30 days).
    #[schema(minimum = 0, maximum = 2_592_000)]
    grace_period_seconds: Option<u64>,
    /// Also revoke every key this key created, transitively (default `false`: a routine rotation
    /// keeps delegated keys working). Set it when the secret may have leaked, with no grace period.
    revoke_descendants: Option<bool>,
}

/// A key as the API shows it. `key` (the plaintext) appears only on create and rotate.
#[derive(Serialize, ToSchema)]
struct KeyResponse {
    api_key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    name: String,
    owner_id: String,
    account_id: String,
    scopes: Vec<String>,
    /// Masked secret, e.g. `sk_live_Ab3d…x9Qz`.
    masked_key: String,
    expires_at: Option<String>,
    created_at: String,
    /// `0001-01-01T00:00:00Z` when never used.
    last_used_at: String,
    is_revoked: bool,
    revoked_at: Option<String>,
    rotated_at: Option<String>,
    created_by: Option<String>,
    /// The key's rate limit, if any.
    rate_limit: Option<RateLimitBody>,
    /// The key's credits, if any, with what is left now.
    credits: Option<CreditsResponse>,
    /// Where the key may be used from (`null`: anywhere).
    allowed_networks: Option<Vec<String>>,
}

/// The calling key, as `GET /api-keys/self` shows it: what the console needs to offer only what
/// the key may do.
#[derive(Serialize, ToSchema)]
struct CallerResponse {
    /// `master` or `scoped`.
    #[schema(example = "scoped")]
    kind: &'static str,
    /// `master` for the master key.
    api_key_id: String,
    name: String,
    /// `null` for the master key, which acts for any owner.
    owner_id: Option<String>,
    /// `null` for the master key.
    account_id: Option<String>,
    scopes: Vec<String>,
    /// When the calling key stops working (a rotation grace end counts), if ever: no key it creates
    /// may expire later.
    expires_at: Option<String>,
    /// The calling key's rate limit, if any: no key it creates or changes may get a looser one.
    rate_limit: Option<RateLimitBody>,
    /// The calling key's credits as its record had them when it was loaded, if any: no key it
    /// creates or changes may get more, or a bigger or more frequent refill.
    credits: Option<CreditsResponse>,
}

/// The rules for new keys, as `GET /api-keys/policy` shows them to the calling key.
#[derive(Serialize, ToSchema)]
struct PolicyResponse {
    /// The owner the counts are for.
    owner_id: String,
    /// The owner's active (unrevoked, unexpired) keys.
    active_keys: u64,
    /// Most active keys per owner, if limited.
    max_active_per_owner: Option<u32>,
    /// Most active keys per account, if limited.
    max_active_per_account: Option<u32>,
    /// Lifetime of a key created without `expires_at`, if set.
    default_lifetime_seconds: Option<u64>,
    /// Longest lifetime of a key, if limited.
    max_lifetime_seconds: Option<u64>,
    /// What a key created now without `expires_at` would get from this caller (`null`: never expires).
    default_expires_at: Option<String>,
    /// The latest `expires_at` this caller may give a key created now (`null`: no bound).
    latest_expires_at: Option<String>,
    /// Whether this caller may create a key that never expires.
    never_expires_allowed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyParams {
    owner: Option<String>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: String,
    error_detail: ErrorDetail,
}

/// Machine-readable error detail.
#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable code, e.g. `AUTH_SCOPE_ESCALATION`.
    code: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

/// The `{id}` path parameter, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)]
struct KeyIdParam(
    /// The key's id (`api_key_id`); an id longer than 128 characters is unknown (404).
    #[param(min_length = 1, max_length = 128)]
    String,
);

/// The `owner` query parameter of the id-addressed routes, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct OwnerQuery {
    /// The key's owner (Blnk sends it when revoking). When given it must match: another owner's
    /// key is 404, and a scoped key naming an owner other than its own gets 403
    /// `AUTH_CROSS_OWNER_ACCESS`. 1 to 128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    owner: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    owner: Option<String>,
    limit: Option<u32>,
    before: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    #[serde(default)]
    permanent: bool,
    owner: Option<String>,
    reason: Option<String>,
}

/// `?owner=` of the other id-addressed routes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerParam {
    owner: Option<String>,
}

fn query<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, AuthError> {
    params
        .map(|Query(params)| params)
        .map_err(|e| AuthError::invalid(format!("invalid query: {}", e.body_text())))
}

fn timestamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| NEVER.to_owned())
}

impl KeyResponse {
    fn new(info: KeyInfo, key: Option<String>) -> Self {
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

    fn created(created: CreatedKey) -> Self {
        Self::new(created.info, Some(created.key.expose_secret().to_owned()))
    }
}

/// JSON response that is never cached by intermediaries (it may hold a plaintext key).
fn no_store(status: StatusCode, body: impl Serialize) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(
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

fn body_error(rejection: BytesRejection) -> AuthError {
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

fn key_id(path: Result<Path<String>, PathRejection>) -> Result<KeyId, AuthError> {
    let Path(id) = path.map_err(|_| AuthError::NotFound)?;
    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
        return Err(AuthError::NotFound);
    }
    Ok(KeyId::new(id))
}

// 415 for bodies a provenance layer cannot stamp: the provenance work (#12 item 4) adds that
// response to the POST operations below (create, rotate) when the management routes sit behind it.
#[utoipa::path(post, path = "/api-keys", request_body = CreateKeyBody,
    responses((status = 201, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn create_key(
    Acting(manager): Acting,
    principal: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let body: CreateKeyBody = parse_json(&body.map_err(body_error)?, false)?;
    let expires_at = body
        .expires_at
        .map(|at| {
            OffsetDateTime::parse(&at, &Rfc3339).map_err(|_| {
                AuthError::invalid(
                    "expires_at must be an RFC 3339 timestamp, e.g. 2030-03-11T00:00:00Z",
                )
            })
        })
        .transpose()?;
    let request = CreateKey {
        name: body.name,
        owner: body.owner,
        account: body.account,
        scopes: body.scopes,
        expires_at,
        rate_limit: body.rate_limit.map(Into::into),
        credits: body.credits.map(Into::into),
        allowed_networks: body
            .allowed_networks
            .map(Networks::parse)
            .transpose()
            .map_err(|e| AuthError::invalid(e.to_string()))?,
    };
    let created = manager.create(&principal, request).await?;
    Ok(no_store(StatusCode::CREATED, KeyResponse::created(created)))
}

#[utoipa::path(get, path = "/api-keys",
    params(("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$",
            description = "Whose keys: 1 to 128 visible ASCII characters. Required with the master key; a scoped key may only name its own owner (else 403 AUTH_CROSS_OWNER_ACCESS), and sees only its own account's keys"),
           ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1 to 100 (default 50); outside that range is a 400"),
           ("before" = Option<String>, Query, max_length = 128, pattern = "^[!-~]+$", description = "Cursor: the x-next-cursor of the previous page")),
    responses((status = 200, body = Vec<KeyResponse>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list_keys(
    State(manager): State<KeyManager>,
    principal: Principal,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let params = query(params)?;
    let page = manager
        .list(
            &principal,
            params.owner.as_deref(),
            params.before.map(KeyId::new),
            params.limit.unwrap_or(DEFAULT_PAGE_SIZE),
        )
        .await?;
    let keys: Vec<KeyResponse> = page
        .keys
        .into_iter()
        .map(|k| KeyResponse::new(k, None))
        .collect();
    let mut response = no_store(StatusCode::OK, keys);
    if let Some(cursor) = page
        .next_cursor
        .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
    {
        response.headers_mut().insert("x-next-cursor", cursor);
    }
    Ok(response)
}

#[utoipa::path(get, path = "/api-keys/{id}", params(KeyIdParam, OwnerQuery),
    responses((status = 200, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_key(
    State(manager): State<KeyManager>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<OwnerParam>, QueryRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let params = query(params)?;
    let info = manager
        .get_in(&principal, &id, params.owner.as_deref())
        .await?;
    Ok(no_store(StatusCode::OK, KeyResponse::new(info, None)))
}

#[utoipa::path(patch, path = "/api-keys/{id}", params(KeyIdParam, OwnerQuery), request_body = UpdateKeyBody,
    responses((status = 200, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn update_key(
    Acting(manager): Acting,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<OwnerParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let params = query(params)?;
    let body: UpdateKeyBody = parse_json(&body.map_err(body_error)?, false)?;
    let request = UpdateKey {
        name: body.name,
        rate_limit: body.rate_limit.map(|r| r.map(Into::into)),
        credits: body.credits.map(|c| c.map(Into::into)),
    };
    let info = manager
        .update_in(&principal, &id, params.owner.as_deref(), request)
        .await?;
    Ok(no_store(StatusCode::OK, KeyResponse::new(info, None)))
}

#[utoipa::path(delete, path = "/api-keys/{id}",
    params(KeyIdParam, ("permanent" = Option<bool>, Query, description = "Delete the record instead of revoking (master key only)"), OwnerQuery,
           ("reason" = Option<String>, Query, max_length = 200, description = "Why (recorded in the key.revoked event; default `requested`)")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn revoke_key(
    Acting(manager): Acting,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<DeleteParams>, QueryRejection>,
) -> Result<StatusCode, AuthError> {
    let id = key_id(id)?;
    let params = query(params)?;
    let owner = params.owner.as_deref();
    if params.permanent {
        manager.delete_in(&principal, &id, owner).await?;
    } else {
        manager
            .revoke_because(&principal, &id, owner, params.reason.as_deref())
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api-keys/{id}/rotate", params(KeyIdParam, OwnerQuery), request_body(content = Option<RotateBody>),
    responses((status = 200, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn rotate_key(
    Acting(manager): Acting,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<OwnerParam>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let params = query(params)?;
    let body: RotateBody = parse_json(&body.map_err(body_error)?, true)?;
    let options = RotateOptions {
        grace: body
            .grace_period_seconds
            .map(std::time::Duration::from_secs),
        revoke_descendants: body.revoke_descendants.unwrap_or(false),
    };
    let created = manager
        .rotate_in(&principal, &id, params.owner.as_deref(), options)
        .await?;
    Ok(no_store(StatusCode::OK, KeyResponse::created(created)))
}

#[utoipa::path(get, path = "/api-keys/self",
    responses((status = 200, body = CallerResponse), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn caller_info(principal: Principal) -> Response {
    let body = CallerResponse {
        kind: if principal.is_master() {
            "master"
        } else {
            "scoped"
        },
        api_key_id: principal.key_id().to_string(),
        name: principal.name().to_owned(),
        owner_id: principal.owner().map(str::to_owned),
        account_id: principal.account().map(str::to_owned),
        scopes: principal.scopes().to_strings(),
        expires_at: principal.expires_at().map(timestamp),
        rate_limit: rate_limit_body(principal.limits()),
        credits: credits_body(principal.limits()),
    };
    no_store(StatusCode::OK, body)
}

#[utoipa::path(get, path = "/api-keys/policy",
    params(("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$",
            description = "Whose keys to count: 1 to 128 visible ASCII characters (required with the master key; a scoped key may only name its own owner, and counts its own account's keys)")),
    responses((status = 200, body = PolicyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn policy_info(
    State(manager): State<KeyManager>,
    principal: Principal,
    params: Result<Query<PolicyParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let Query(params) =
        params.map_err(|e| AuthError::invalid(format!("invalid query: {}", e.body_text())))?;
    let now = OffsetDateTime::now_utc();
    // Allowed exactly when listing is (the same rule decides).
    let active_keys = manager
        .count_active(&principal, params.owner.as_deref(), now)
        .await?;
    // The count refused a call without an owner to act for.
    let owner = params
        .owner
        .or_else(|| principal.owner().map(str::to_owned))
        .ok_or(AuthError::OwnerRequired)?;
    let policy = manager.key_policy();
    let default_expires_at = manager.expiry(&principal, None, now)?;
    let latest_expires_at = match (
        policy.lifetime_max().map(|max| now + max),
        principal.expires_at(),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let body = PolicyResponse {
        owner_id: owner,
        active_keys,
        max_active_per_owner: policy.limits().per_owner,
        max_active_per_account: policy.limits().per_account,
        default_lifetime_seconds: policy.lifetime_default().map(|d| d.as_secs()),
        max_lifetime_seconds: policy.lifetime_max().map(|d| d.as_secs()),
        default_expires_at: default_expires_at.map(timestamp),
        latest_expires_at: latest_expires_at.map(timestamp),
        never_expires_allowed: default_expires_at.is_none(),
    };
    Ok(no_store(StatusCode::OK, body))
}

/// Body of `PUT /api-keys/pools`: the pool's limits, replacing what it had (credits are set now).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct PoolBody {
    /// The owner whose pool this is. Required.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    owner: Option<String>,
    /// The account, for an account's pool; left out for the owner's pool.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    account: Option<String>,
    /// The pool's rate limit, shared by every key of the owner (account).
    rate_limit: Option<RateLimitBody>,
    /// The pool's credits, shared by every key of the owner (account).
    credits: Option<CreditsBody>,
}

/// A shared pool as it stands.
#[derive(Serialize, ToSchema)]
struct PoolResponse {
    owner_id: String,
    /// `null` for the owner's pool.
    account_id: Option<String>,
    /// `null` when no pool is set.
    rate_limit: Option<RateLimitBody>,
    /// `null` when no pool is set, else with what is left now.
    credits: Option<CreditsResponse>,
}

impl PoolResponse {
    fn new(owner: &str, account: Option<&str>, limits: Option<UsageLimits>) -> Self {
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
struct PoolParams {
    owner: Option<String>,
    account: Option<String>,
}

/// `?owner=` and `?account=` of `GET /api-keys/pools`, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct PoolQuery {
    /// The owner (required with the master key; a scoped key may name only its own).
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    owner: Option<String>,
    /// The account, for an account's pool; left out for the owner's pool.
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    account: Option<String>,
}

/// Every key of an owner, or of one of its accounts, counts against the pool's rate limit and
/// spends its credits, beside its own and its ancestors' (a budget binds a subtree, and a pool
/// binds them all). Read with `api-keys:read` (a scoped key: its own owner and account).
#[utoipa::path(get, path = "/api-keys/pools", params(PoolQuery),
    responses((status = 200, body = PoolResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_pool(
    State(manager): State<KeyManager>,
    principal: Principal,
    params: Result<Query<PoolParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let params = query(params)?;
    let owner = params
        .owner
        .as_deref()
        .or(principal.owner())
        .map(str::to_owned);
    let limits = manager
        .pool(
            &principal,
            params.owner.as_deref(),
            params.account.as_deref(),
        )
        .await?;
    let owner = owner.unwrap_or_default();
    Ok(no_store(
        StatusCode::OK,
        PoolResponse::new(&owner, params.account.as_deref(), limits),
    ))
}

/// Sets an owner's or account's shared pool (no `rate_limit` and no `credits`: removes it).
/// Master key only: a pool binds keys outside any scoped key's subtree.
#[utoipa::path(put, path = "/api-keys/pools", request_body = PoolBody,
    responses((status = 200, body = PoolResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn set_pool(
    Acting(manager): Acting,
    principal: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let body: PoolBody = parse_json(&body.map_err(body_error)?, false)?;
    let owner = body
        .owner
        .as_deref()
        .or(principal.owner())
        .ok_or(AuthError::OwnerRequired)?
        .to_owned();
    let limits = UsageLimits {
        rate_limit: body.rate_limit.map(Into::into),
        credits: body.credits.map(Into::into),
    };
    let limits = (!limits.is_unlimited()).then_some(limits);
    let set = manager
        .set_pool(&principal, Some(&owner), body.account.as_deref(), limits)
        .await?;
    Ok(no_store(
        StatusCode::OK,
        PoolResponse::new(&owner, body.account.as_deref(), set),
    ))
}
