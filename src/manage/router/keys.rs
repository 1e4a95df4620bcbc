//! The key handlers: create, list, get, update, revoke (and delete), rotate, the caller and the
//! policy.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::super::activity_routes::Acting;
use super::super::manager::KeyManager;
use super::super::types::{CreateKey, RotateOptions, UpdateKey};
use super::super::validate::DEFAULT_PAGE_SIZE;
use super::wire::*;
use crate::error::AuthError;
use crate::key::KeyId;
use crate::network::Networks;
use crate::principal::Principal;

#[utoipa::path(post, path = "/api-keys", request_body = CreateKeyBody,
    responses((status = 201, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub(super) async fn create_key(
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
pub(super) async fn list_keys(
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
pub(super) async fn get_key(
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
pub(super) async fn update_key(
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
    params(KeyIdParam, DeleteParams),
    responses((status = 204, description = "Revoked (or deleted). With a fleet roster, the headers `Revocation-Acknowledged` (instances that applied it), `Revocation-Instances` (live instances), `Revocation-Elapsed-Ms` and `Revocation-Sequence` say how far it got before the answer; `Revocation-Requests-Ended` how many requests in flight under the key and its subtree were ended (summed over this instance and those that acknowledged)",
                headers(("Revocation-Acknowledged" = u32), ("Revocation-Instances" = u32), ("Revocation-Elapsed-Ms" = String), ("Revocation-Sequence" = u64), ("Revocation-Requests-Ended" = u64))),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn revoke_key(
    Acting(manager): Acting,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<DeleteParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let params = query(params)?;
    let owner = params.owner.as_deref();
    let receipt = if params.permanent {
        manager.delete_with_receipt(&principal, &id, owner).await?
    } else {
        manager
            .revoke_with_receipt(&principal, &id, owner, params.reason.as_deref())
            .await?
            .1
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().extend(receipt.headers());
    Ok(response)
}

#[utoipa::path(post, path = "/api-keys/{id}/rotate", params(KeyIdParam, OwnerQuery), request_body(content = RotateBody, description = "Optional: no body rotates at once, keeping descendants"),
    responses((status = 200, body = KeyResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub(super) async fn rotate_key(
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
pub(super) async fn caller_info(principal: Principal) -> Response {
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
pub(super) async fn policy_info(
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
    let policy = &manager.policy;
    let default_expires_at = manager.expiry(&principal, None, now)?;
    let latest_expires_at = match (
        policy.max_lifetime.map(|max| now + max),
        principal.expires_at(),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let owner_pool = manager
        .pool(&principal, Some(&owner), None)
        .await?
        .map(|limits| PoolResponse::new(&owner, None, Some(limits)));
    let account_pool = match principal.account() {
        Some(account) => manager
            .pool(&principal, Some(&owner), Some(account))
            .await?
            .map(|limits| PoolResponse::new(&owner, Some(account), Some(limits))),
        None => None,
    };
    let body = PolicyResponse {
        owner_pool,
        account_pool,
        owner_id: owner,
        active_keys,
        max_active_per_owner: policy.max_active_per_owner,
        max_active_per_account: policy.max_active_per_account,
        default_lifetime_seconds: policy.default_lifetime.map(|d| d.as_secs()),
        max_lifetime_seconds: policy.max_lifetime.map(|d| d.as_secs()),
        default_expires_at: default_expires_at.map(timestamp),
        latest_expires_at: latest_expires_at.map(timestamp),
        never_expires_allowed: default_expires_at.is_none(),
    };
    Ok(no_store(StatusCode::OK, body))
}
