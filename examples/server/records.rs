//! The demo's records: ledgers, balances and transactions, kept as the JSON the client sent (plus
//! the provenance stamp) in the same database as the keys, and the handlers that create and read
//! them.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
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
        const DDL: &str = "CREATE TABLE IF NOT EXISTS demo_records (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, created_at TEXT NOT NULL)";
        match self {
            Self::Sqlite(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => sqlx::query(DDL).execute(pool).await.map(drop),
        }
    }

    async fn insert(&self, kind: &str, record: &Record) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(pool) => sqlx::query(
                "INSERT INTO demo_records (id, kind, body, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(&record.id)
            .bind(kind)
            .bind(&record.body)
            .bind(&record.created_at)
            .execute(pool)
            .await
            .map(drop),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => sqlx::query(
                "INSERT INTO demo_records (id, kind, body, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&record.id)
            .bind(kind)
            .bind(&record.body)
            .bind(&record.created_at)
            .execute(pool)
            .await
            .map(drop),
        }
    }

    async fn list(&self, kind: &str, id: Option<&str>) -> Result<Vec<Record>, sqlx::Error> {
        use sqlx::Row;
        macro_rules! fetch {
            ($pool:expr, $by_kind:literal, $by_id:literal) => {{
                let rows = match id {
                    Some(id) => {
                        sqlx::query($by_id)
                            .bind(kind)
                            .bind(id)
                            .fetch_all($pool)
                            .await?
                    }
                    None => sqlx::query($by_kind).bind(kind).fetch_all($pool).await?,
                };
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
            Self::Sqlite(pool) => fetch!(
                pool,
                "SELECT id, body, created_at FROM demo_records WHERE kind = ? ORDER BY id DESC LIMIT 100",
                "SELECT id, body, created_at FROM demo_records WHERE kind = ? AND id = ?"
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => fetch!(
                pool,
                "SELECT id, body, created_at FROM demo_records WHERE kind = $1 ORDER BY id DESC LIMIT 100",
                "SELECT id, body, created_at FROM demo_records WHERE kind = $1 AND id = $2"
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
/// refusals that are not the key layer's.
fn demo_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "error": message,
        "error_detail": {"code": code, "message": message},
    });
    json_response(status, body.to_string())
}

fn storage_error(error: sqlx::Error) -> AuthError {
    tracing::error!(%error, "demo record storage failed");
    AuthError::Unavailable(tower_api_keys::store::StoreError::unavailable(error))
}

/// One resource's state: which kind of record its routes create and read, and where.
#[derive(Clone)]
pub(crate) struct Resource {
    pub(crate) kind: &'static str,
    pub(crate) records: Records,
}

/// `POST /<plural>`: stores the JSON object as sent (already stamped by `Provenance`).
pub(crate) async fn create(
    State(Resource { kind, records }): State<Resource>,
    principal: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AuthError::PayloadTooLarge {
                limit: MAX_RECORD_BYTES,
            }
        } else {
            AuthError::invalid("unreadable request body")
        }
    })?;
    let text =
        std::str::from_utf8(&body).map_err(|_| AuthError::invalid("body must be UTF-8 JSON"))?;
    let value: &serde_json::value::RawValue = serde_json::from_str(text)
        .map_err(|e| AuthError::invalid(format!("invalid JSON body: {e}")))?;
    if !value.get().starts_with('{') {
        return Err(AuthError::invalid("body must be a JSON object"));
    }
    // The same rule for every caller: `Provenance` refuses a non-object `meta_data` from scoped
    // keys, and the master key's requests (which it does not stamp) must not slip past it.
    #[derive(serde::Deserialize)]
    struct Metadata<'a> {
        #[serde(borrow, default)]
        meta_data: Option<&'a serde_json::value::RawValue>,
    }
    let metadata: Metadata<'_> = serde_json::from_str(text)
        .map_err(|e| AuthError::invalid(format!("invalid JSON body: {e}")))?;
    if metadata
        .meta_data
        .is_some_and(|m| !m.get().starts_with('{'))
    {
        return Err(AuthError::InvalidMetadata(
            "meta_data must be a JSON object".into(),
        ));
    }
    let record = Record {
        id: format!(
            "{kind}_{}",
            KeyId::generate()
                .as_str()
                .trim_start_matches("key_")
                .to_lowercase()
        ),
        body: value.get().to_owned(),
        created_at: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
    };
    records.insert(kind, &record).await.map_err(storage_error)?;
    tracing::info!(record = %record.id, by = %principal.key_id(), "created");
    Ok(json_response(StatusCode::CREATED, record.to_json(kind)))
}

/// `GET /<plural>`: the newest 100.
pub(crate) async fn list(
    State(Resource { kind, records }): State<Resource>,
) -> Result<Response, AuthError> {
    let all = records.list(kind, None).await.map_err(storage_error)?;
    let items: Vec<String> = all.iter().map(|r| r.to_json(kind)).collect();
    Ok(json_response(
        StatusCode::OK,
        format!("[{}]", items.join(",")),
    ))
}

/// `GET /<plural>/{id}`.
pub(crate) async fn get_one(
    State(Resource { kind, records }): State<Resource>,
    Path(id): Path<String>,
) -> Result<Response, AuthError> {
    let found = records.list(kind, Some(&id)).await.map_err(storage_error)?;
    match found.first() {
        Some(record) => Ok(json_response(StatusCode::OK, record.to_json(kind))),
        None => Ok(demo_error(
            StatusCode::NOT_FOUND,
            "RECORD_NOT_FOUND",
            format!("{kind} not found"),
        )),
    }
}
