//! The demo's records: ledgers, balances and transactions, kept as the JSON the client sent (plus
//! the provenance stamp) in the same database as the keys, and the handlers that create and read
//! them.
//!
//! What the handlers enforce, for every caller:
//! - **JSON only**: a body that is not `application/json` (or `application/*+json`) is a 415, so a
//!   body that `Provenance` could not stamp is never read as JSON here either.
//! - **The server owns ids and timestamps**: a client-sent `<kind>_id` or `created_at` is a 400, so
//!   the stored record never holds either twice.
//! - **Records belong to the caller's account**: a scoped key creates records in its account and
//!   sees, lists and fetches only those (another account's record is a 404, like a missing one);
//!   the master key sees every record, and records it creates belong to no account.

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

use super::MAX_RECORD_BYTES;

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
        // `account` is NULL for the master key's records.
        const DDL: &str = "CREATE TABLE IF NOT EXISTS demo_account_records (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, account TEXT, body TEXT NOT NULL,
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
        account: Option<&str>,
        record: &Record,
    ) -> Result<(), sqlx::Error> {
        macro_rules! insert {
            ($pool:expr, $sql:literal) => {
                sqlx::query($sql)
                    .bind(&record.id)
                    .bind(kind)
                    .bind(account)
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
                "INSERT INTO demo_account_records (id, kind, account, body, created_at)
                 VALUES (?, ?, ?, ?, ?)"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => insert!(
                pool,
                "INSERT INTO demo_account_records (id, kind, account, body, created_at)
                 VALUES ($1, $2, $3, $4, $5)"
            ),
        }
    }

    /// The newest 100 records of `kind` (or the one with `id`), in `account` if it is `Some`.
    async fn find(
        &self,
        kind: &str,
        account: Option<&str>,
        id: Option<&str>,
    ) -> Result<Vec<Record>, sqlx::Error> {
        use sqlx::Row;
        macro_rules! find {
            ($pool:expr, $sql:literal) => {{
                let rows = sqlx::query($sql)
                    .bind(kind)
                    .bind(account)
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
                "SELECT id, body, created_at FROM demo_account_records
                 WHERE kind = ?1 AND (?2 IS NULL OR account = ?2) AND (?3 IS NULL OR id = ?3)
                 ORDER BY id DESC LIMIT 100"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => find!(
                pool,
                "SELECT id, body, created_at FROM demo_account_records
                 WHERE kind = $1 AND ($2::text IS NULL OR account = $2)
                   AND ($3::text IS NULL OR id = $3)
                 ORDER BY id DESC LIMIT 100"
            ),
        }
    }
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

/// `POST /<plural>`: stores the JSON object as sent (for a scoped key, as `Provenance` stamped it),
/// in the caller's account.
pub(crate) async fn create(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
    body: Result<Json<Box<RawValue>>, JsonRejection>,
) -> Result<Response, Response> {
    // axum's `Json` reads only `application/json` and `application/*+json` bodies; `RawValue`
    // keeps the text as sent (numbers, key order, the stamp).
    let Json(body) = body.map_err(|rejection| match rejection {
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
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(body.get())
        .map_err(|_| invalid("the body must be a JSON object".into()))?;
    // The server owns the record's id and timestamp: never two of either in the stored JSON.
    for owned in [format!("{kind}_id"), "created_at".to_owned()] {
        if fields.contains_key(&owned) {
            return Err(invalid(format!("`{owned}` is set by the server")));
        }
    }
    // The same rule as `Provenance` for every caller: the master key's bodies are not stamped,
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
        .insert(kind, principal.account(), &record)
        .await
        .map_err(storage_error)?;
    tracing::info!(record = %record.id, by = %principal.key_id(), "created");
    Ok(json_response(StatusCode::CREATED, record.to_json(kind)))
}

/// `GET /<plural>`: the newest 100 the caller may see (its account's; all for the master key).
pub(crate) async fn list(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
) -> Result<Response, Response> {
    let found = records
        .find(kind, principal.account(), None)
        .await
        .map_err(storage_error)?;
    let items: Vec<String> = found.iter().map(|r| r.to_json(kind)).collect();
    Ok(json_response(
        StatusCode::OK,
        format!("[{}]", items.join(",")),
    ))
}

/// `GET /<plural>/{id}`: another account's record is not found, like a missing one.
pub(crate) async fn get_one(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, Response> {
    let found = records
        .find(kind, principal.account(), Some(&id))
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
