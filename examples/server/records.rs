//! The demo's records: ledgers, balances and transactions, kept as the JSON the client sent (plus
//! the provenance stamp) in the same database as the keys, and the handlers that create and read
//! them.
//!
//! What the handlers enforce, for every caller:
//! - **JSON only**: a body that is not `application/json` (or `application/*+json`) is a 415, so a
//!   body that `ProvenanceLayer` could not stamp is never read as JSON here either.
//! - **The server owns ids and timestamps**: a client-sent `<kind>_id` or `created_at` is a 400, so
//!   the stored record never holds either twice.
//! - **Records belong to the caller's owner and account**: a scoped key creates records in its
//!   owner's account and sees, lists and fetches only those (another owner's or account's record
//!   is a 404, like a missing one). Both count: account names are chosen per owner (an account
//!   defaults to its owner's name), so owner `acct-1` and owner `team-a`'s account `acct-1` are two
//!   different places. The master key sees every record; records it creates belong to no one.
//! - **Bounded depth**: a body nested deeper than [`MAX_RECORD_DEPTH`] levels is a 400
//!   `RECORD_TOO_DEEP`, so no stored record is too deep for the clients that read listings.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_api_keys::error::AuthError;
use tower_api_keys::key::KeyId;
use tower_api_keys::principal::Principal;

use super::{MAX_RECORD_BYTES, MAX_RECORD_DEPTH};

/// Where the demo keeps its ledgers, balances and transactions: the same database as the keys.
#[derive(Clone)]
pub(crate) enum Records {
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

#[derive(Debug)]
struct Record {
    id: String,
    body: String,
    created_at: String,
}

impl Records {
    pub(crate) async fn migrate(&self) -> Result<(), sqlx::Error> {
        // `owner` and `account` are NULL for the master key's records.
        const DDL: &str = "CREATE TABLE IF NOT EXISTS demo_owned_records (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT, account TEXT, body TEXT NOT NULL,
            created_at TEXT NOT NULL)";
        match self {
            Self::Sqlite(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
        }
    }

    async fn insert(
        &self,
        kind: &str,
        place: Option<Place<'_>>,
        record: &Record,
    ) -> Result<(), sqlx::Error> {
        macro_rules! insert {
            ($pool:expr, $sql:literal) => {
                sqlx::query($sql)
                    .bind(&record.id)
                    .bind(kind)
                    .bind(place.map(|p| p.owner))
                    .bind(place.map(|p| p.account))
                    .bind(&record.body)
                    .bind(&record.created_at)
                    .execute($pool)
                    .await
                    .map(drop)
            };
        }
        match self {
            Self::Sqlite(pool) => insert!(
                pool,
                "INSERT INTO demo_owned_records (id, kind, owner, account, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?)"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => insert!(
                pool,
                "INSERT INTO demo_owned_records (id, kind, owner, account, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
        }
    }

    /// The newest 100 records of `kind` (or the one with `id`), in `place` if it is `Some`.
    async fn find(
        &self,
        kind: &str,
        place: Option<Place<'_>>,
        id: Option<&str>,
    ) -> Result<Vec<Record>, sqlx::Error> {
        use sqlx::Row;
        macro_rules! find {
            ($pool:expr, $sql:literal) => {{
                let rows = sqlx::query($sql)
                    .bind(kind)
                    .bind(place.map(|p| p.owner))
                    .bind(place.map(|p| p.account))
                    .bind(id)
                    .fetch_all($pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Record {
                            id: row.try_get("id")?,
                            body: row.try_get("body")?,
                            created_at: row.try_get("created_at")?,
                        })
                    })
                    .collect()
            }};
        }
        match self {
            Self::Sqlite(pool) => find!(
                pool,
                "SELECT id, body, created_at FROM demo_owned_records
                 WHERE kind = ?1 AND (?2 IS NULL OR (owner = ?2 AND account = ?3))
                   AND (?4 IS NULL OR id = ?4)
                 ORDER BY id DESC LIMIT 100"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => find!(
                pool,
                "SELECT id, body, created_at FROM demo_owned_records
                 WHERE kind = $1 AND ($2::text IS NULL OR (owner = $2 AND account = $3::text))
                   AND ($4::text IS NULL OR id = $4)
                 ORDER BY id DESC LIMIT 100"
            ),
        }
    }
}

/// Where a scoped key's records live: its owner and its account (both: account names are per owner).
#[derive(Clone, Copy, Debug)]
struct Place<'a> {
    owner: &'a str,
    account: &'a str,
}

impl<'a> Place<'a> {
    /// A scoped key's place; `None` for the master key (every record, and its own belong to no one).
    fn of(principal: &'a Principal) -> Option<Self> {
        let owner = principal.owner()?;
        Some(Self {
            owner,
            // A scoped key always has an account (it defaults to the owner's name).
            account: principal.account().unwrap_or(owner),
        })
    }
}

/// Whether `json` (valid JSON text) nests objects and arrays deeper than `max` levels. One pass,
/// no recursion: brackets inside strings are skipped.
fn deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

impl Record {
    /// The stored JSON object with `<kind>_id` and `created_at` put in front; every byte the client
    /// sent (numbers, key order, the provenance stamp) is kept as received.
    fn to_json(&self, kind: &str) -> String {
        let rest = self
            .body
            .trim_start()
            .strip_prefix('{')
            .unwrap_or("}")
            .trim_start();
        let separator = if rest.starts_with('}') { "" } else { "," };
        format!(
            r#"{{"{kind}_id":"{}","created_at":"{}"{separator}{rest}"#,
            self.id, self.created_at
        )
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A demo error in the crate's body shape (`{"error", "error_detail": {"code", "message"}}`), for
/// refusals that are not the key layer's: `RECORD_INVALID` (400) and `RECORD_NOT_FOUND` (404).
fn demo_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "error": message,
        "error_detail": {"code": code, "message": message},
    });
    json_response(status, body.to_string())
}

fn invalid(message: String) -> Response {
    demo_error(StatusCode::BAD_REQUEST, "RECORD_INVALID", message)
}

fn too_deep() -> Response {
    demo_error(
        StatusCode::BAD_REQUEST,
        "RECORD_TOO_DEEP",
        format!("records nest at most {MAX_RECORD_DEPTH} levels of objects and arrays"),
    )
}

fn storage_error(error: sqlx::Error) -> Response {
    tracing::error!(%error, "demo record storage failed");
    AuthError::Unavailable(tower_api_keys::store::StoreError::unavailable(error)).into_response()
}

/// One resource's state: which kind of record its routes create and read, and where.
#[derive(Clone)]
pub(crate) struct Resource {
    pub(crate) kind: &'static str,
    pub(crate) records: Records,
}

/// `POST /<plural>`: stores the JSON object as sent (for a scoped key, as `ProvenanceLayer` stamped it),
/// in the caller's account.
pub(crate) async fn create(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
    body: Result<Json<Box<RawValue>>, JsonRejection>,
) -> Result<Response, Response> {
    // axum's `Json` reads only `application/json` and `application/*+json` bodies; `RawValue`
    // keeps the text as sent (numbers, key order, the stamp).
    let Json(body) = body.map_err(|rejection| match rejection {
        // serde_json gives up past 128 levels, before the depth check below.
        rejection if rejection.body_text().contains("recursion limit") => too_deep(),
        JsonRejection::MissingJsonContentType(_) => AuthError::UnsupportedMediaType(
            "records are JSON: send Content-Type: application/json".into(),
        )
        .into_response(),
        rejection if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            AuthError::PayloadTooLarge {
                limit: MAX_RECORD_BYTES,
            }
            .into_response()
        }
        rejection => invalid(format!("invalid JSON body: {}", rejection.body_text())),
    })?;
    if deeper_than(body.get().as_bytes(), MAX_RECORD_DEPTH) {
        return Err(too_deep());
    }
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(body.get())
        .map_err(|_| invalid("the body must be a JSON object".into()))?;
    // The server owns the record's id and timestamp: never two of either in the stored JSON.
    for owned in [format!("{kind}_id"), "created_at".to_owned()] {
        if fields.contains_key(&owned) {
            return Err(invalid(format!("`{owned}` is set by the server")));
        }
    }
    // The same rule as `ProvenanceLayer` for every caller: the master key's bodies are not stamped,
    // and must not store a metadata field that a stamp could not go into.
    if fields
        .get("meta_data")
        .is_some_and(|m| !matches!(m.get().as_bytes()[0], b'{' | b'n'))
    {
        return Err(
            AuthError::InvalidMetadata("meta_data must be a JSON object".into()).into_response(),
        );
    }
    let record = Record {
        id: format!(
            "{kind}_{}",
            KeyId::generate()
                .as_str()
                .trim_start_matches("key_")
                .to_lowercase()
        ),
        body: body.get().to_owned(),
        created_at: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
    };
    records
        .insert(kind, Place::of(&principal), &record)
        .await
        .map_err(storage_error)?;
    tracing::info!(record = %record.id, by = %principal.key_id(), "created");
    Ok(json_response(StatusCode::CREATED, record.to_json(kind)))
}

/// `GET /<plural>`: the newest 100 the caller may see (its owner's account's; all for the master
/// key).
pub(crate) async fn list(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
) -> Result<Response, Response> {
    let found = records
        .find(kind, Place::of(&principal), None)
        .await
        .map_err(storage_error)?;
    let items: Vec<String> = found.iter().map(|r| r.to_json(kind)).collect();
    Ok(json_response(
        StatusCode::OK,
        format!("[{}]", items.join(",")),
    ))
}

/// `GET /<plural>/{id}`: another owner's or account's record is not found, like a missing one.
pub(crate) async fn get_one(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, Response> {
    let found = records
        .find(kind, Place::of(&principal), Some(&id))
        .await
        .map_err(storage_error)?;
    match found.first() {
        Some(record) => Ok(json_response(StatusCode::OK, record.to_json(kind))),
        None => Err(demo_error(
            StatusCode::NOT_FOUND,
            "RECORD_NOT_FOUND",
            format!("{kind} not found"),
        )),
    }
}
