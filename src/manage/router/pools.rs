//! The pool handlers: read and set an owner's or account's shared pool.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::super::activity_routes::Acting;
use super::super::manager::KeyManager;
use super::wire::*;
use crate::error::AuthError;
use crate::limits::UsageLimits;
use crate::principal::Principal;

/// Every key of an owner, or of one of its accounts, counts against the pool's rate limit and
/// spends its credits, beside its own and its ancestors' (a budget binds a subtree, and a pool
/// binds them all). Read with `api-keys:read` (a scoped key: its own owner and account).
#[utoipa::path(get, path = "/api-keys/pools", params(PoolQuery),
    responses((status = 200, body = PoolResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn get_pool(
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
pub(super) async fn set_pool(
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
