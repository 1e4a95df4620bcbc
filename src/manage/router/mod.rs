//! The management API as an axum router ([`router`]) and its OpenAPI document ([`openapi`]).

mod fields;
mod keys;
mod overview;
mod pools;
#[cfg(feature = "webhooks")]
mod webhooks;
mod wire;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use utoipa::OpenApi;

use super::manager::KeyManager;
use super::validate::MAX_BODY_BYTES;
use keys::*;
use pools::*;
use wire::*;

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
/// | `GET /api-keys/usage?owner=&from=&to=` | each key's requests over a period (default 7 days) | 200 `{owner, from, to, keys: [{key_id, requests, admitted, refused, last_ip}]}` |
/// | `GET /api-keys/owners` | every owner with its key counts (master key only) | 200 `{owners: [{owner, keys, active_keys}]}` |
/// | `GET /api-keys/openapi.json` | this API's OpenAPI 3.1 document | 200 |
/// | `POST /api-keys/webhooks` `{owner?, url, events}` | register a webhook endpoint (feature `webhooks`) | 201 endpoint with its `secret` |
/// | `GET /api-keys/webhooks?owner=` | list endpoints | 200 `{webhooks}` |
/// | `DELETE /api-keys/webhooks/{id}` | delete an endpoint | 204 |
/// | `POST /api-keys/webhooks/{id}/rotate` | new signing secret | 200 endpoint with its `secret` |
/// | `GET /api-keys/webhooks/{id}/deliveries?cursor=&limit=` | its delivery log | 200 `{deliveries, next_cursor}` |
///
/// `self`, `policy`, `pools`, `events`, `owners`, `usage` and `openapi.json` are not key ids (generated ids start with `key_`).
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
/// The router carries its own state, so it merges into an application's router whatever that
/// router's state type is (`Router<AppState>` as well as `Router<()>`).
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
///     .merge(manage::router(KeyManager::new(resolver.clone())))
///     .layer(
///         ApiKeyLayer::new(resolver)
///             .sources([KeySource::blnk(), KeySource::x_api_key()])
///             .master_key(ApiKey::new("a-long-master-key-from-config")),
///     );
///
/// // An application with state of its own merges it the same way.
/// #[derive(Clone)]
/// struct AppState {
///     name: &'static str,
/// }
/// let store = Arc::new(MemoryStore::new());
/// let resolver = CachedResolver::new(store.clone());
/// let app: Router = Router::new()
///     .route("/name", axum::routing::get(
///         |axum::extract::State(app): axum::extract::State<AppState>| async move { app.name },
///     ))
///     .merge(manage::router(KeyManager::new(resolver)))
///     .with_state(AppState { name: "ledger" });
/// ```
pub fn router<S>(manager: KeyManager) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/api-keys", post(create_key).get(list_keys))
        .route(
            "/api-keys/openapi.json",
            get(|| async { axum::Json(openapi()) }),
        )
        .route("/api-keys/self", get(caller_info))
        .route("/api-keys/policy", get(policy_info))
        .route("/api-keys/pools", get(get_pool).put(set_pool))
        .route("/api-keys/owners", get(overview::list_owners))
        .route("/api-keys/usage", get(overview::usage_summary))
        .route(
            "/api-keys/{id}",
            get(get_key).delete(revoke_key).patch(update_key),
        )
        .route("/api-keys/{id}/rotate", post(rotate_key))
        .merge(super::activity_routes::routes())
        .merge(webhook_routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Its answers are whole and owed even when the operation ended the calling key itself
        // (a key revoking or rotating itself gets its 204, or its new secret): `ApiKeyLayer` does
        // not cut them (I4 ends streams, not answers already made).
        .layer(axum::middleware::map_response(
            |mut response: axum::response::Response| async move {
                response.extensions_mut().insert(crate::layer::Whole);
                response
            },
        ))
        .with_state(manager)
}

/// `/api-keys/webhooks` (feature `webhooks`; see [`KeyManager::webhooks`]).
fn webhook_routes() -> Router<KeyManager> {
    #[cfg(feature = "webhooks")]
    return webhooks::routes();
    #[cfg(not(feature = "webhooks"))]
    Router::new()
}

/// The OpenAPI document of [`router`]'s endpoints, to serve or merge into your own.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(super::activity_routes::ActivityDoc::openapi());
    #[cfg(feature = "webhooks")]
    doc.merge(webhooks::WebhookDoc::openapi());
    // The rotate body is optional (none: rotate at once, keeping descendants). utoipa marks a
    // body required unless its type is an `Option`, which it documents as nullable: the server
    // takes an object or no body, never `null`.
    if let Some(body) = doc
        .paths
        .paths
        .get_mut("/api-keys/{id}/rotate")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut())
    {
        body.required = Some(utoipa::openapi::Required::False);
    }
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tower-api-keys management API", description = "Create, list, revoke, delete and rotate scoped API keys."),
    paths(keys::create_key, keys::list_keys, keys::get_key, keys::update_key, keys::revoke_key,
        keys::rotate_key, keys::caller_info, keys::policy_info, pools::get_pool, pools::set_pool,
        overview::list_owners, overview::usage_summary),
    components(schemas(CreateKeyBody, UpdateKeyBody, RotateBody, KeyResponse, RateLimitBody,
        CreditsBody, CreditsResponse, RefillBody, CallerResponse, PolicyResponse, PoolBody, PoolResponse, ErrorBody, ErrorDetail,
        overview::OwnersResponse, overview::OwnerBody, overview::UsageSummaryResponse, overview::KeyUsageBody)),
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
