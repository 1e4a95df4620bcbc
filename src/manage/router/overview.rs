//! The console's whole-owner views: every owner with its key counts, and each key's requests
//! over a period.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

use super::super::activity_routes::{Acting, time_param};
use super::super::manager::KeyManager;
use super::wire::{ErrorBody, no_store, query};
use crate::error::AuthError;
use crate::principal::Principal;
use crate::usage::Outcome;

/// Every owner with at least one key.
#[derive(Serialize, ToSchema)]
pub(super) struct OwnersResponse {
    /// In owner order, at most 1,000.
    owners: Vec<OwnerBody>,
}

/// One owner's key counts.
#[derive(Serialize, ToSchema)]
pub(super) struct OwnerBody {
    owner: String,
    /// Every key, revoked and expired ones included.
    keys: u64,
    /// Keys active now.
    active_keys: u64,
}

/// Lists every owner with its key counts: what the console offers the master key to pick from.
/// Master key only.
#[utoipa::path(get, path = "/api-keys/owners",
    responses((status = 200, body = OwnersResponse), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody, description = "AUTH_MASTER_KEY_REQUIRED"),
              (status = 503, body = ErrorBody)))]
pub(super) async fn list_owners(
    Acting(manager): Acting,
    principal: Principal,
) -> Result<Response, AuthError> {
    let owners = manager.owners(&principal).await?;
    Ok(no_store(
        StatusCode::OK,
        OwnersResponse {
            owners: owners
                .into_iter()
                .map(|o| OwnerBody {
                    owner: o.owner,
                    keys: o.keys,
                    active_keys: o.active_keys,
                })
                .collect(),
        },
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageSummaryParams {
    /// Whose keys (required with the master key).
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    owner: Option<String>,
    /// RFC 3339 (default: 7 days before `to`).
    #[param(format = DateTime)]
    from: Option<String>,
    /// RFC 3339 (default: now); at most 92 days after `from`.
    #[param(format = DateTime)]
    to: Option<String>,
}

/// Each key's requests over a period.
#[derive(Serialize, ToSchema)]
pub(super) struct UsageSummaryResponse {
    owner: String,
    /// RFC 3339, floored to the hour.
    from: String,
    /// RFC 3339.
    to: String,
    /// The keys that had requests (a key left out had none), in key id order.
    keys: Vec<KeyUsageBody>,
}

/// One key's requests over the period.
#[derive(Serialize, ToSchema)]
pub(super) struct KeyUsageBody {
    key_id: String,
    /// Admitted and refused together.
    requests: u64,
    admitted: u64,
    /// Refused requests by reason (all present), as in `GET /api-keys/{id}/usage`.
    #[schema(value_type = Object)]
    refused: Map<String, Value>,
    /// The address the key was last used from in the period, when known.
    last_ip: Option<String>,
}

/// Each of an owner's keys' requests over a period (default: the last 7 days), as last flushed:
/// the console's "Requests (7 d)" column in one call. Read like `GET /api-keys/events`: a scoped
/// key (`api-keys:read`) sees its own subtree's keys only.
#[utoipa::path(get, path = "/api-keys/usage", params(UsageSummaryParams),
    responses((status = 200, body = UsageSummaryResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub(super) async fn usage_summary(
    State(manager): State<KeyManager>,
    principal: Principal,
    params: Result<Query<UsageSummaryParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let p = query(params)?;
    let to = time_param("to", p.to)?.unwrap_or_else(OffsetDateTime::now_utc);
    let from = time_param("from", p.from)?.unwrap_or(to - time::Duration::days(7));
    let owner = p
        .owner
        .clone()
        .or_else(|| principal.owner().map(str::to_owned));
    let totals = manager
        .usage_by_key(&principal, p.owner.as_deref(), from, to)
        .await?;
    let keys = totals
        .into_iter()
        .map(|t| KeyUsageBody {
            key_id: t.key_id.to_string(),
            requests: t.counts.iter().fold(0u64, |a, n| a.saturating_add(*n)),
            admitted: t.count(Outcome::Admitted),
            refused: Outcome::ALL[1..]
                .iter()
                .map(|o| (o.as_str().to_owned(), t.count(*o).into()))
                .collect(),
            last_ip: t.last_ip.map(|ip| ip.to_string()),
        })
        .collect();
    Ok(no_store(
        StatusCode::OK,
        UsageSummaryResponse {
            owner: owner.unwrap_or_default(),
            from: crate::usage::hour_of(from)
                .format(&Rfc3339)
                .unwrap_or_default(),
            to: to.format(&Rfc3339).unwrap_or_default(),
            keys,
        },
    ))
}
