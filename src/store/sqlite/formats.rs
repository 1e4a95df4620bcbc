//! The keyed key format's secrets in SQLite (`api_key_format`, `api_key_format_secrets`).

use sqlx::sqlite::SqlitePool;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;

use crate::key::{FormatSecret, MAX_SECRET_VERSION};
use crate::store::format::{FormatSecrets, StoredSecret};
use crate::store::sql_common::{from_unix_micros, map_sqlx_error, to_unix_micros};
use crate::store::{StoreError, StoreErrorKind};

/// The secrets, storing `initial` as version 1 in a store holding none: insert-if-absent, then
/// read, on the connection of the caller's write transaction (SQLite serialises them across
/// processes, and whichever instance comes first writes the row every other one reads).
pub(super) async fn load(
    conn: &mut SqliteConnection,
    initial: &FormatSecret,
    now: OffsetDateTime,
) -> Result<FormatSecrets, StoreError> {
    let now = to_unix_micros(now);
    sqlx::query(
        "INSERT INTO api_key_format (id, legacy_keys, created_at) \
         SELECT 1, EXISTS (SELECT 1 FROM api_keys), ?1 WHERE true ON CONFLICT (id) DO NOTHING",
    )
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    sqlx::query(
        "INSERT INTO api_key_format_secrets (version, secret, created_at) \
         SELECT 1, ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM api_key_format_secrets) \
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(initial.expose_secret())
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let legacy: i64 = sqlx::query_scalar("SELECT legacy_keys FROM api_key_format WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let rows = sqlx::query(
        "SELECT version, secret, created_at, retired_at FROM api_key_format_secrets \
         ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let secrets = rows
        .iter()
        .map(|row| {
            let time = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
                row.try_get::<Option<i64>, _>(i)
                    .map_err(map_sqlx_error)?
                    .map(from_unix_micros)
                    .transpose()
            };
            StoredSecret::from_row(
                row.try_get(0).map_err(map_sqlx_error)?,
                row.try_get(1).map_err(map_sqlx_error)?,
                time(2)?.ok_or_else(|| StoreError::from_kind(StoreErrorKind::Corrupt))?,
                time(3)?,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(FormatSecrets {
        secrets,
        legacy_keys: legacy != 0,
    })
}

/// Stores `secret` as the next version, in the caller's write transaction.
pub(super) async fn add(
    conn: &mut SqliteConnection,
    secret: &FormatSecret,
    now: OffsetDateTime,
) -> Result<u8, StoreError> {
    let version: i64 =
        sqlx::query_scalar("SELECT COALESCE(max(version), 0) + 1 FROM api_key_format_secrets")
            .fetch_one(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    let version = u8::try_from(version)
        .ok()
        .filter(|v| *v <= MAX_SECRET_VERSION)
        .ok_or_else(|| StoreError::new(StoreErrorKind::Conflict, "every secret version is used"))?;
    sqlx::query(
        "INSERT INTO api_key_format_secrets (version, secret, created_at) VALUES (?1, ?2, ?3)",
    )
    .bind(i64::from(version))
    .bind(secret.expose_secret())
    .bind(to_unix_micros(now))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(version)
}

/// Retires `version` unless it is the last one not retired.
pub(super) async fn retire(
    pool: &SqlitePool,
    version: u8,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE api_key_format_secrets SET retired_at = ?2 \
         WHERE version = ?1 AND retired_at IS NULL AND EXISTS (\
           SELECT 1 FROM api_key_format_secrets WHERE version <> ?1 AND retired_at IS NULL)",
    )
    .bind(i64::from(version))
    .bind(to_unix_micros(now))
    .execute(pool)
    .await
    .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}

/// Records whether legacy keys are accepted.
pub(super) async fn set_legacy_keys(
    pool: &SqlitePool,
    accept: bool,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_key_format (id, legacy_keys, created_at) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET legacy_keys = excluded.legacy_keys",
    )
    .bind(i64::from(accept))
    .bind(to_unix_micros(now))
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(map_sqlx_error)
}
