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
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::KeyManager;
use super::super::activity_routes::Acting;
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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    owner: Option<String>,
    #[serde(default)]
    url: String,
    #[serde(default)]
    events: Vec<String>,
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
        .webhook_endpoints()
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
