//! The keyed key format's secrets in PostgreSQL (`api_key_format`, `api_key_format_secrets`).
//! `s` is the quoted schema name (a checked identifier).

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use time::OffsetDateTime;

use super::keys::lock;
use super::sql::Sql;
use crate::key::{FormatSecret, MAX_SECRET_VERSION};
use crate::store::format::{FormatSecrets, StoredSecret};
use crate::store::sql_common::{map_sqlx_error, micros};
use crate::store::{StoreError, StoreErrorKind};

/// The secrets, storing `initial` as version 1 in a store holding none.
pub(super) async fn load(
    pool: &PgPool,
    sql: &Sql,
    initial: &FormatSecret,
    now: OffsetDateTime,
) -> Result<FormatSecrets, StoreError> {
    let s = &sql.quoted;
    let now = micros(now);
    // Insert-if-absent, then read. Instances starting together race on the primary keys: the
    // losers' inserts wait for the winner's and do nothing, and every SELECT sees the winner's rows.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_format (id, legacy_keys, created_at) \
         SELECT 1, EXISTS (SELECT 1 FROM {s}.api_keys), $1 ON CONFLICT (id) DO NOTHING"
    )))
    .bind(now)
    .execute(pool)
    .await
    .map_err(map_sqlx_error)?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_format_secrets (version, secret, created_at) \
         SELECT 1, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM {s}.api_key_format_secrets) \
         ON CONFLICT (version) DO NOTHING"
    )))
    .bind(initial.expose_secret())
    .bind(now)
    .execute(pool)
    .await
    .map_err(map_sqlx_error)?;
    let legacy_keys: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT legacy_keys FROM {s}.api_key_format WHERE id = 1"
    )))
    .fetch_one(pool)
    .await
    .map_err(map_sqlx_error)?;
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, secret, created_at, retired_at FROM {s}.api_key_format_secrets \
         ORDER BY version"
    )))
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    let secrets = rows
        .iter()
        .map(|row| {
            let version: i32 = row.try_get(0).map_err(map_sqlx_error)?;
            StoredSecret::from_row(
                i64::from(version),
                row.try_get(1).map_err(map_sqlx_error)?,
                row.try_get(2).map_err(map_sqlx_error)?,
                row.try_get(3).map_err(map_sqlx_error)?,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(FormatSecrets {
        secrets,
        legacy_keys,
    })
}

/// Stores `secret` as the next version.
pub(super) async fn add(
    pool: &PgPool,
    sql: &Sql,
    secret: &FormatSecret,
    now: OffsetDateTime,
) -> Result<u8, StoreError> {
    let s = &sql.quoted;
    let version: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_format_secrets (version, secret, created_at) \
         SELECT COALESCE(max(version), 0) + 1, $1, $2 FROM {s}.api_key_format_secrets \
         HAVING COALESCE(max(version), 0) < $3 RETURNING version"
    )))
    .bind(secret.expose_secret())
    .bind(micros(now))
    .bind(i32::from(MAX_SECRET_VERSION))
    .fetch_optional(pool)
    .await
    .map_err(map_sqlx_error)?;
    version
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| StoreError::new(StoreErrorKind::Conflict, "every secret version is used"))
}

/// Retires `version` unless it is the last one not retired, in the caller's transaction.
pub(super) async fn retire(
    conn: &mut PgConnection,
    sql: &Sql,
    version: u8,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let s = &sql.quoted;
    // Serialised, so that two retirements cannot each leave the other's version as the last one.
    lock(conn, &["format_secrets", &sql.schema]).await?;
    let done = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {s}.api_key_format_secrets SET retired_at = $2 \
         WHERE version = $1 AND retired_at IS NULL AND EXISTS (\
           SELECT 1 FROM {s}.api_key_format_secrets WHERE version <> $1 AND retired_at IS NULL)"
    )))
    .bind(i32::from(version))
    .bind(micros(now))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}

/// Records whether legacy keys are accepted.
pub(super) async fn set_legacy_keys(
    pool: &PgPool,
    sql: &Sql,
    accept: bool,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let s = &sql.quoted;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_format (id, legacy_keys, created_at) VALUES (1, $1, $2) \
         ON CONFLICT (id) DO UPDATE SET legacy_keys = excluded.legacy_keys"
    )))
    .bind(accept)
    .bind(micros(now))
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(map_sqlx_error)
}
