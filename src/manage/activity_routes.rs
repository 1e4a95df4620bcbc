//! The management routes that read activity (events, their chain, usage), and [`Acting`]: the
//! manager of one request, knowing where it came from.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{OpenApi, ToSchema};

use super::activity::{EventFilter, EventPage, Granularity};
use super::manager::KeyManager;
use crate::audit::{EventType, Origin, Verification};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::usage::Outcome;

/// The manager acting for one request: [`KeyManager::at`] the request's [`Origin`] (the client's
/// address, and a valid `x-request-id`). The address is the one
/// [`ApiKeyLayer`](crate::layer::ApiKeyLayer) worked out from `X-Forwarded-For` when the peer is
/// one of its [`trusted_proxies`](crate::layer::ApiKeyLayer::trusted_proxies), else the peer's
/// (axum's `ConnectInfo<SocketAddr>` or a bare `SocketAddr` extension); a forwarded-for header
/// is never believed here on its own.
pub(super) struct Acting(pub(super) KeyManager);

impl FromRequestParts<KeyManager> for Acting {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        manager: &KeyManager,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(manager.at(origin(parts))))
    }
}

/// Where a request came from, as far as the request itself says.
pub(super) fn origin(parts: &Parts) -> Origin {
    let forwarded = parts
        .extensions
        .get::<crate::layer::ForwardedClient>()
        .map(|client| client.0);
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
        .or_else(|| parts.extensions.get::<SocketAddr>().map(SocketAddr::ip));
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    Origin {
        ip: forwarded.or(peer),
        request_id,
    }
}

/// The activity routes, merged into [`router`](super::router).
pub(super) fn routes() -> Router<KeyManager> {
    Router::new()
        .route("/api-keys/events", get(owner_events))
        .route("/api-keys/events/verify", get(verify_events))
        .route("/api-keys/{id}/events", get(key_events))
        .route("/api-keys/{id}/usage", get(key_usage))
}

#[derive(OpenApi)]
#[openapi(
    paths(owner_events, key_events, verify_events, key_usage),
    components(schemas(
        EventsResponse,
        EventBody,
        ActorBody,
        VerifyResponse,
        UsageResponse,
        UsageBucketBody
    ))
)]
pub(super) struct ActivityDoc;

/// A page of audit events, newest first.
#[derive(Serialize, ToSchema)]
struct EventsResponse {
    events: Vec<EventBody>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// One audit event.
#[derive(Serialize, ToSchema)]
struct EventBody {
    /// `evt_...`.
    id: String,
    /// `key.created`, `key.rotated`, `key.revoked`, `key.deleted`, `key.updated`, `key.refused`,
    /// `pool.set`, ...
    #[serde(rename = "type")]
    event_type: String,
    /// RFC 3339.
    at: String,
    actor: ActorBody,
    /// The actor's address, when known.
    ip: Option<String>,
    request_id: Option<String>,
    key_id: Option<String>,
    owner_id: String,
    account_id: Option<String>,
    /// Type-specific: scopes and limits (created), `grace_until` (rotated), `reason` and
    /// `descendants_revoked` (revoked), `changes` with `before`/`after` (updated), `operation`
    /// and `code` (refused). Never a secret.
    #[schema(value_type = Object)]
    details: Map<String, Value>,
}

/// Who acted.
#[derive(Serialize, ToSchema)]
struct ActorBody {
    /// `master` or `key`.
    kind: String,
    key_id: Option<String>,
    name: Option<String>,
}

impl EventsResponse {
    fn new(page: EventPage) -> Self {
        Self {
            events: page
                .events
                .into_iter()
                .map(|e| EventBody {
                    id: e.id.clone(),
                    event_type: e.event_type.to_string(),
                    at: e.at.format(&Rfc3339).unwrap_or_default(),
                    actor: ActorBody {
                        kind: e.actor.kind.as_str().to_owned(),
                        key_id: e.actor.key_id.as_ref().map(ToString::to_string),
                        name: e.actor.name.clone(),
                    },
                    ip: e.ip.map(|ip| ip.to_string()),
                    request_id: e.request_id.clone(),
                    key_id: e.key_id.as_ref().map(ToString::to_string),
                    owner_id: e.owner_id.clone(),
                    account_id: e.account_id.clone(),
                    details: e.draft.details,
                })
                .collect(),
            next_cursor: page.next_cursor,
        }
    }
}

/// The answer of a chain check.
#[derive(Serialize, ToSchema)]
struct VerifyResponse {
    valid: bool,
    /// Events checked (and found valid, when `valid` is false: those before the break).
    checked: u64,
    /// The first event that does not fit (null when events at the end are missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    first_invalid: Option<Option<String>>,
    /// Its position in the owner's chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// `hash` (changed), `link` (an event before it missing or moved), `missing` (at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// A key's usage.
#[derive(Serialize, ToSchema)]
struct UsageResponse {
    key_id: String,
    /// `hour` or `day`.
    granularity: &'static str,
    /// Oldest first; periods without requests are left out.
    buckets: Vec<UsageBucketBody>,
    /// The address the key was last used from in the range, when known.
    last_ip: Option<String>,
}

/// One period's requests.
#[derive(Serialize, ToSchema)]
struct UsageBucketBody {
    /// RFC 3339 start of the hour or UTC day.
    start: String,
    admitted: u64,
    /// Refused requests by reason: `invalid`, `expired_or_revoked`, `missing_scope`,
    /// `rate_limited`, `out_of_credits`, `network` (all present).
    #[schema(value_type = Object)]
    refused: Map<String, Value>,
}

fn query<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, AuthError> {
    params
        .map(|Query(params)| params)
        .map_err(|e| AuthError::invalid(format!("invalid query: {}", e.body_text())))
}

pub(super) fn time_param(
    name: &str,
    value: Option<String>,
) -> Result<Option<OffsetDateTime>, AuthError> {
    value
        .map(|v| {
            OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| {
                AuthError::invalid(format!(
                    "{name} must be an RFC 3339 timestamp, e.g. 2030-03-11T00:00:00Z"
                ))
            })
        })
        .transpose()
}

fn key_id(path: Result<Path<String>, PathRejection>) -> Result<KeyId, AuthError> {
    let Path(id) = path.map_err(|_| AuthError::NotFound)?;
    if id.is_empty() || id.len() > super::validate::MAX_KEY_ID_LEN {
        return Err(AuthError::NotFound);
    }
    Ok(KeyId::new(id))
}

fn no_store(body: impl Serialize) -> Response {
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    owner: Option<String>,
    key_id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

impl EventParams {
    fn filter(self) -> Result<EventFilter, AuthError> {
        Ok(EventFilter {
            key_id: self.key_id.map(KeyId::new),
            event_type: self
                .event_type
                .map(|t| {
                    EventType::new(t).ok_or_else(|| AuthError::invalid("type: not an event type"))
                })
                .transpose()?,
            since: time_param("since", self.since)?,
            until: time_param("until", self.until)?,
            cursor: self.cursor,
            limit: self.limit,
        })
    }
}

/// The query parameters of the event routes, as documented.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct EventQueryDoc {
    /// Only of this type (`key.created`, `key.revoked`, ...): `[a-z0-9_]+` parts joined by dots, at
    /// most 64 characters.
    #[param(
        rename = "type",
        max_length = 64,
        pattern = r"^[a-z0-9_]+(\.[a-z0-9_]+)*$"
    )]
    event_type: Option<String>,
    /// RFC 3339: only at or after.
    #[param(format = DateTime)]
    since: Option<String>,
    /// RFC 3339: only before.
    #[param(format = DateTime)]
    until: Option<String>,
    /// The `next_cursor` of the previous page (a sequence number).
    #[param(pattern = "^[0-9]{1,20}$")]
    cursor: Option<String>,
    /// Page size, 1 to 100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api-keys/events",
    params(("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Whose events (required with the master key)"),
           ("key_id" = Option<String>, Query, description = "Only events about this key"), EventQueryDoc),
    responses((status = 200, body = EventsResponse, description = "Newest first. A scoped key (api-keys:read) sees the events of its own subtree only: its key and the keys it created, transitively"),
              (status = 400, description = "APIKEY_INVALID"), (status = 401), (status = 403), (status = 503)))]
async fn owner_events(
    State(manager): State<KeyManager>,
    principal: Principal,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let mut params = query(params)?;
    let owner = params.owner.take();
    let page = manager
        .events(&principal, owner.as_deref(), params.filter()?)
        .await?;
    Ok(no_store(EventsResponse::new(page)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEventParams {
    owner: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api-keys/{id}/events",
    params(("id" = String, Path, min_length = 1, max_length = 128, description = "The key's id (longer than 128 characters: unknown, 404)"),
           ("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "When given, the key's owner"), EventQueryDoc),
    responses((status = 200, body = EventsResponse, description = "The key's events, newest first"),
              (status = 400), (status = 401), (status = 403, description = "AUTH_OUTSIDE_SUBTREE: a key outside the calling key's subtree"),
              (status = 404), (status = 503)))]
async fn key_events(
    State(manager): State<KeyManager>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<KeyEventParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let p = query(params)?;
    let filter = EventParams {
        owner: None,
        key_id: None,
        event_type: p.event_type,
        since: p.since,
        until: p.until,
        cursor: p.cursor,
        limit: p.limit,
    }
    .filter()?;
    let page = manager
        .key_events(&principal, &id, p.owner.as_deref(), filter)
        .await?;
    Ok(no_store(EventsResponse::new(page)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    owner: Option<String>,
}

#[utoipa::path(get, path = "/api-keys/events/verify",
    params(("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Whose chain (required with the master key)")),
    responses((status = 200, body = VerifyResponse, description = "`{\"valid\": true, \"checked\": N}`, or `valid: false` with the first event that does not fit"),
              (status = 400), (status = 401), (status = 403, description = "AUTH_MASTER_KEY_REQUIRED"), (status = 503)))]
async fn verify_events(
    Acting(manager): Acting,
    principal: Principal,
    params: Result<Query<VerifyParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let params = query(params)?;
    let body = match manager
        .verify_events(&principal, params.owner.as_deref())
        .await?
    {
        Verification::Valid { checked } => VerifyResponse {
            valid: true,
            checked,
            first_invalid: None,
            seq: None,
            reason: None,
        },
        Verification::Invalid {
            first_invalid,
            seq,
            reason,
            checked,
        } => VerifyResponse {
            valid: false,
            checked,
            first_invalid: Some(first_invalid),
            seq: Some(seq),
            reason: Some(reason),
        },
    };
    Ok(no_store(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    owner: Option<String>,
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

#[utoipa::path(get, path = "/api-keys/{id}/usage",
    params(("id" = String, Path, min_length = 1, max_length = 128, description = "The key's id (longer than 128 characters: unknown, 404)"),
           ("owner" = Option<String>, Query, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "When given, the key's owner"),
           ("from" = Option<String>, Query, format = DateTime, description = "RFC 3339 (default: 24 hours before `to`)"),
           ("to" = Option<String>, Query, format = DateTime, description = "RFC 3339 (default: now); at most 92 days after `from`"),
           ("granularity" = Option<String>, Query, pattern = "^(hour|day)$", description = "`hour` (default) or `day`")),
    responses((status = 200, body = UsageResponse, description = "Requests per period by outcome, as last flushed"),
              (status = 400), (status = 401), (status = 403, description = "AUTH_OUTSIDE_SUBTREE: a key outside the calling key's subtree"),
              (status = 404), (status = 503)))]
async fn key_usage(
    State(manager): State<KeyManager>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, AuthError> {
    let id = key_id(id)?;
    let p = query(params)?;
    let to = time_param("to", p.to)?.unwrap_or_else(OffsetDateTime::now_utc);
    let from = time_param("from", p.from)?.unwrap_or(to - time::Duration::hours(24));
    let granularity = match p.granularity.as_deref() {
        None | Some("hour") => Granularity::Hour,
        Some("day") => Granularity::Day,
        Some(_) => return Err(AuthError::invalid("granularity must be hour or day")),
    };
    let buckets = manager
        .usage(&principal, &id, p.owner.as_deref(), from, to, granularity)
        .await?;
    let last_ip = buckets
        .iter()
        .rev()
        .find_map(|b| b.last_ip)
        .map(|ip| ip.to_string());
    Ok(no_store(UsageResponse {
        key_id: id.to_string(),
        granularity: match granularity {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        },
        buckets: buckets
            .into_iter()
            .map(|b| UsageBucketBody {
                start: b.hour.format(&Rfc3339).unwrap_or_default(),
                admitted: b.count(Outcome::Admitted),
                refused: Outcome::ALL[1..]
                    .iter()
                    .map(|o| (o.as_str().to_owned(), b.count(*o).into()))
                    .collect(),
            })
            .collect(),
        last_ip,
    }))
}
