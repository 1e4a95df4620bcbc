//! The webhook handlers (feature `webhooks`): endpoints of an owner and their delivery logs,
//! served from [`KeyManager::webhooks`](super::super::KeyManager::webhooks).
//!
//! | request | does | answers |
//! |---|---|---|
//! | `POST /api-keys/webhooks` `{owner?, url, events}` | register | 201 `{id, owner, url, events, created_at, secret}` |
//! | `GET /api-keys/webhooks?owner=` | list | 200 `{webhooks: [{id, owner, url, events, created_at}]}` |
//! | `DELETE /api-keys/webhooks/{id}` | delete with its log | 204 |
//! | `POST /api-keys/webhooks/{id}/rotate` | new secret | 200 `{..., secret}` |
//! | `GET /api-keys/webhooks/{id}/deliveries?cursor=&limit=` | delivery log, newest first | 200 `{deliveries, next_cursor}` |

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};

use super::super::activity_routes::Acting;
use super::super::manager::KeyManager;
use super::wire::{body_error, no_store, parse_json, query};
use crate::error::AuthError;
use crate::principal::Principal;
use crate::webhooks::{CreatedWebhook, Webhooks};

/// The routes, to merge into the management router.
pub(super) fn routes() -> Router<KeyManager> {
    Router::new()
        .route("/api-keys/webhooks", post(register).get(list))
        .route("/api-keys/webhooks/{id}", delete(remove))
        .route("/api-keys/webhooks/{id}/rotate", post(rotate))
        .route("/api-keys/webhooks/{id}/deliveries", get(deliveries))
}

/// The webhook routes' OpenAPI paths, merged into [`openapi`](super::openapi).
#[derive(OpenApi)]
#[openapi(
    paths(register, list, remove, rotate, deliveries),
    components(schemas(RegisterBody, WebhookBody, WebhookList, DeliveryBody, DeliveryList))
)]
pub(super) struct WebhookDoc;

/// A new endpoint of an owner.
#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    /// The owner (required with the master key; a scoped key: its own).
    owner: Option<String>,
    /// `https` to a public address, unless the application allows more.
    #[serde(default)]
    url: String,
    /// Key event types: `key.created`, `key.rotated`, `key.revoked`, `key.deleted`,
    /// `key.updated`, `key.leaked`, `key.expiring`, `key.idle`.
    #[serde(default)]
    events: Vec<String>,
}

/// An endpoint (with its `secret` only when registered or rotated).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the schema of what `Webhook::to_json` writes
struct WebhookBody {
    id: String,
    owner: String,
    url: String,
    events: Vec<String>,
    created_at: String,
    /// `whsec_...`: shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

/// An owner's endpoints.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
struct WebhookList {
    webhooks: Vec<WebhookBody>,
}

/// One message to one endpoint, and what became of it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // the schema of what `Delivery::to_json` writes
struct DeliveryBody {
    /// The message id: the `webhook-id` header, the same on every attempt.
    id: String,
    event_type: String,
    /// `pending`, `delivered` or `failed`.
    status: String,
    attempts: u32,
    last_status: Option<u16>,
    last_error: Option<String>,
    last_attempt_at: Option<String>,
    next_attempt_at: Option<String>,
    delivered_at: Option<String>,
    created_at: String,
}

/// A page of an endpoint's delivery log, newest first.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
struct DeliveryList {
    deliveries: Vec<DeliveryBody>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct OwnerParams {
    owner: Option<String>,
}

#[derive(Deserialize)]
struct DeliveryParams {
    owner: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// The manager's endpoints, acting for this request's origin (as the key routes do).
fn webhooks(manager: &KeyManager) -> Result<Webhooks, AuthError> {
    let webhooks = manager
        .webhooks
        .as_ref()
        .ok_or(AuthError::WebhookNotFound)?;
    Ok(webhooks.at((*manager.origin).clone()))
}

fn id(path: Result<Path<String>, PathRejection>) -> Result<String, AuthError> {
    path.map(|Path(id)| id)
        .map_err(|_| AuthError::WebhookNotFound)
}

fn with_secret(created: &CreatedWebhook) -> Value {
    let mut body = created.webhook.to_json();
    body["secret"] = json!(created.secret.expose_secret().as_str());
    body
}

/// Registers an owner's endpoint (master key, or `api-keys:write` in that owner: a scoped key's
/// endpoint receives the events of its own subtree only).
#[utoipa::path(post, path = "/api-keys/webhooks", request_body = RegisterBody,
    responses((status = 201, body = WebhookBody, description = "The endpoint and its secret, shown once"),
              (status = 400, description = "APIKEY_INVALID, APIKEY_OWNER_REQUIRED, WEBHOOK_URL_REFUSED"), (status = 401),
              (status = 403), (status = 409, description = "WEBHOOK_LIMIT_REACHED"), (status = 503)))]
async fn register(
    Acting(manager): Acting,
    principal: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let body: RegisterBody = parse_json(&body.map_err(body_error)?, false)?;
    let created = webhooks(&manager)?
        .register(&principal, body.owner.as_deref(), &body.url, &body.events)
        .await?;
    Ok(no_store(StatusCode::CREATED, with_secret(&created)))
}

/// An owner's endpoints the caller may manage, oldest first.
#[utoipa::path(get, path = "/api-keys/webhooks",
    params(("owner" = Option<String>, Query, description = "Whose endpoints (required with the master key)")),
    responses((status = 200, body = WebhookList), (status = 400), (status = 401), (status = 403), (status = 503)))]
async fn list(
    Acting(manager): Acting,
    principal: Principal,
    params: Result<Query<OwnerParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let params = query(params)?;
    let list = webhooks(&manager)?
        .list(&principal, params.owner.as_deref())
        .await?;
    let list: Vec<Value> = list.iter().map(|w| w.to_json()).collect();
    Ok(no_store(StatusCode::OK, json!({ "webhooks": list })))
}

/// Deletes an endpoint and its delivery log.
#[utoipa::path(delete, path = "/api-keys/webhooks/{id}",
    params(("id" = String, Path, description = "The endpoint's id"), ("owner" = Option<String>, Query, description = "When given, the endpoint's owner")),
    responses((status = 204), (status = 401), (status = 403), (status = 404, description = "WEBHOOK_NOT_FOUND"), (status = 503)))]
async fn remove(
    Acting(manager): Acting,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<OwnerParams>, QueryRejection>,
) -> Result<StatusCode, AuthError> {
    let (id, params) = (id(path)?, query(params)?);
    webhooks(&manager)?
        .delete(&principal, &id, params.owner.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Gives an endpoint a new signing secret, shown once.
#[utoipa::path(post, path = "/api-keys/webhooks/{id}/rotate",
    params(("id" = String, Path, description = "The endpoint's id"), ("owner" = Option<String>, Query, description = "When given, the endpoint's owner")),
    responses((status = 200, body = WebhookBody), (status = 401), (status = 403), (status = 404, description = "WEBHOOK_NOT_FOUND"), (status = 503)))]
async fn rotate(
    Acting(manager): Acting,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<OwnerParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let (id, params) = (id(path)?, query(params)?);
    let rotated = webhooks(&manager)?
        .rotate(&principal, &id, params.owner.as_deref())
        .await?;
    Ok(no_store(StatusCode::OK, with_secret(&rotated)))
}

/// An endpoint's delivery log, newest first.
#[utoipa::path(get, path = "/api-keys/webhooks/{id}/deliveries",
    params(("id" = String, Path, description = "The endpoint's id"), ("owner" = Option<String>, Query, description = "When given, the endpoint's owner"),
           ("cursor" = Option<String>, Query, description = "A previous page's next_cursor"), ("limit" = Option<u32>, Query, description = "1 to 100, default 50")),
    responses((status = 200, body = DeliveryList), (status = 400), (status = 401), (status = 403), (status = 404, description = "WEBHOOK_NOT_FOUND"), (status = 503)))]
async fn deliveries(
    Acting(manager): Acting,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<DeliveryParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let (id, params) = (id(path)?, query(params)?);
    let page = webhooks(&manager)?
        .deliveries(
            &principal,
            &id,
            params.owner.as_deref(),
            params.cursor.as_deref(),
            params.limit,
        )
        .await?;
    let list: Vec<Value> = page.deliveries.iter().map(|d| d.to_json()).collect();
    Ok(no_store(
        StatusCode::OK,
        json!({ "deliveries": list, "next_cursor": page.next_cursor }),
    ))
}
