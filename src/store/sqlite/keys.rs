//! The key writes in SQLite: each runs on the connection of the caller's `BEGIN IMMEDIATE`
//! transaction, which SQLite serialises across every connection and process using the file (the
//! store opens it, writes the change's events on it and commits).

use sqlx::SqliteConnection;
use time::OffsetDateTime;

use super::sql::{columns, decode, decode_opt, descendant_tree};
use crate::key::{KeyDigest, KeyId};
use crate::record::{KeyChange, KeyRecord};
use crate::store::params::{KeyLimits, KeyUpdate, Rotation};
use crate::store::sql_common::{
    LimitColumns, check_limit, map_sqlx_error, networks_text, rotated_out, to_unix_micros, updated,
};
use crate::store::{StoreError, StoreErrorKind};

/// Stores `record` unless its id or a digest is taken ([`StoreErrorKind::Conflict`]), its creator
/// is not active at `now`, or `limits` would be exceeded.
pub(super) async fn insert(
    conn: &mut SqliteConnection,
    record: &KeyRecord,
    limits: KeyLimits,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let now = to_unix_micros(now);
    let mut conflict: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1)")
            .bind(record.id.as_str())
            .fetch_one(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    for digest in record.digests() {
        conflict |= sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM api_key_digests WHERE digest = ?1)",
        )
        .bind(&digest.as_bytes()[..])
        .fetch_one(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    }
    if conflict {
        return Err(StoreError::from_kind(StoreErrorKind::Conflict));
    }
    if let Some(creator) = &record.created_by {
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2))",
        )
        .bind(creator.as_str())
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        if !active {
            return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
        }
    }
    for (limit, sql, value, scope) in [
        (
            limits.per_owner,
            "SELECT count(*) FROM api_keys WHERE owner = ?1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2)",
            &record.owner,
            "owner",
        ),
        (
            limits.per_account,
            "SELECT count(*) FROM api_keys WHERE account = ?1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2)",
            &record.account,
            "account",
        ),
    ] {
        let Some(limit) = limit else { continue };
        let active: i64 = sqlx::query_scalar(sql)
            .bind(value.as_str())
            .bind(now)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        check_limit(limit, active, scope)?;
    }
    let previous = record.previous.as_ref();
    let limits_columns = LimitColumns::of(&record.limits);
    sqlx::query(concat!(
        "INSERT INTO api_keys (",
        columns!(),
        ") VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
         ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
    ))
    .bind(record.id.as_str())
    .bind(record.name.as_str())
    .bind(record.owner.as_str())
    .bind(record.account.as_str())
    .bind(scopes_json(record))
    .bind(&record.digest.as_bytes()[..])
    .bind(i64::from(record.digest_scheme.version()))
    .bind(record.masked_key.as_str())
    .bind(to_unix_micros(record.created_at))
    .bind(record.expires_at.map(to_unix_micros))
    .bind(record.revoked_at.map(to_unix_micros))
    .bind(record.last_used_at.map(to_unix_micros))
    .bind(record.created_by.as_ref().map(KeyId::as_str))
    .bind(record.rotated_at.map(to_unix_micros))
    .bind(previous.map(|p| p.digest.as_bytes().to_vec()))
    .bind(previous.map(|p| i64::from(p.digest_scheme.version())))
    .bind(previous.map(|p| to_unix_micros(p.valid_until)))
    .bind(limits_columns.rate_limit)
    .bind(limits_columns.rate_period_seconds)
    .bind(limits_columns.credits_remaining)
    .bind(limits_columns.credits_refill_interval)
    .bind(limits_columns.credits_refill_amount)
    .bind(limits_columns.credits_set_at.map(to_unix_micros))
    .bind(networks_text(record.allowed_networks.as_ref()))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    register_digests(conn, &record.id, record.digests()).await?;
    Ok(())
}

/// Remembers that `notice` was given about key `id` (insert-if-absent): whether it is new.
pub(super) async fn record_notice(
    conn: &mut SqliteConnection,
    id: &KeyId,
    notice: &str,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO api_key_notices (key_id, notice, noticed_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(id.as_str())
    .bind(notice)
    .bind(to_unix_micros(at))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}

/// Revokes the key at `at` (keeping an earlier revocation) and its descendants.
pub(super) async fn revoke(
    conn: &mut SqliteConnection,
    id: &KeyId,
    at: OffsetDateTime,
) -> Result<Option<KeyChange>, StoreError> {
    let Some(before) = fetch(conn, id).await? else {
        return Ok(None);
    };
    let row = sqlx::query(concat!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 RETURNING ",
        columns!(),
        ""
    ))
    .bind(id.as_str())
    .bind(to_unix_micros(at))
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let after = decode_opt(row)?;
    let revoked_descendants = revoke_descendants(conn, id, at).await?;
    Ok(Some(KeyChange {
        before,
        after,
        revoked_descendants,
    }))
}

/// Removes the key and its digests, and revokes its descendants at `at`.
pub(super) async fn delete(
    conn: &mut SqliteConnection,
    id: &KeyId,
    at: OffsetDateTime,
) -> Result<Option<KeyChange>, StoreError> {
    // Explicitly, rather than through ON DELETE CASCADE: a pool may have foreign keys off.
    sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1")
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let row = sqlx::query(concat!(
        "DELETE FROM api_keys WHERE id = ?1 RETURNING ",
        columns!(),
        ""
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let Some(before) = decode_opt(row)? else {
        return Ok(None);
    };
    let revoked_descendants = revoke_descendants(conn, id, at).await?;
    Ok(Some(KeyChange {
        before,
        after: None,
        revoked_descendants,
    }))
}

/// Replaces the key's secret as `rotation` says.
pub(super) async fn replace_secret(
    conn: &mut SqliteConnection,
    id: &KeyId,
    rotation: &Rotation,
) -> Result<Option<KeyChange>, StoreError> {
    let Some(old) = fetch(conn, id).await? else {
        return Ok(None);
    };
    let previous = rotated_out(&old, rotation)?;
    // Registering the new digest first fails on any digest in use, this key's included.
    register_digests(conn, id, std::iter::once(&rotation.digest)).await?;
    for digest in old.digests() {
        if previous.as_ref().is_some_and(|kept| kept.digest == *digest) {
            continue;
        }
        sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1 AND digest = ?2")
            .bind(id.as_str())
            .bind(&digest.as_bytes()[..])
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    }
    let row = sqlx::query(concat!(
        "UPDATE api_keys SET digest = ?2, digest_scheme = ?3, masked_key = ?4, rotated_at = ?5, \
         previous_digest = ?6, previous_digest_scheme = ?7, previous_valid_until = ?8 \
         WHERE id = ?1 RETURNING ",
        columns!(),
        ""
    ))
    .bind(id.as_str())
    .bind(&rotation.digest.as_bytes()[..])
    .bind(i64::from(rotation.digest_scheme.version()))
    .bind(rotation.masked_key.as_str())
    .bind(to_unix_micros(rotation.rotated_at))
    .bind(previous.as_ref().map(|p| p.digest.as_bytes().to_vec()))
    .bind(
        previous
            .as_ref()
            .map(|p| i64::from(p.digest_scheme.version())),
    )
    .bind(previous.as_ref().map(|p| to_unix_micros(p.valid_until)))
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let after = decode_opt(row)?;
    let revoked_descendants = if rotation.revoke_descendants {
        revoke_descendants(conn, id, rotation.rotated_at).await?
    } else {
        Vec::new()
    };
    Ok(Some(KeyChange {
        before: old,
        after,
        revoked_descendants,
    }))
}

/// Changes the key's name, rate limit or credits.
pub(super) async fn update(
    conn: &mut SqliteConnection,
    id: &KeyId,
    update: &KeyUpdate,
) -> Result<Option<KeyChange>, StoreError> {
    let Some(record) = fetch(conn, id).await? else {
        return Ok(None);
    };
    let change = updated(record, update);
    if let Some(after) = &change.after {
        write_limits(conn, after).await?;
    }
    Ok(Some(change))
}

async fn register_digests<'a>(
    conn: &mut SqliteConnection,
    id: &KeyId,
    digests: impl Iterator<Item = &'a KeyDigest>,
) -> Result<(), StoreError> {
    for digest in digests {
        sqlx::query("INSERT INTO api_key_digests (digest, key_id) VALUES (?1, ?2)")
            .bind(&digest.as_bytes()[..])
            .bind(id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    }
    Ok(())
}

/// The record `id`, read on `conn` (inside the caller's transaction). `None`: no such key.
pub(super) async fn fetch(
    conn: &mut SqliteConnection,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE id = ?1"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// Revokes, at `at`, every descendant of `root` not revoked yet; returns those it revoked.
/// Runs inside the caller's `BEGIN IMMEDIATE` transaction, so no insert interleaves.
async fn revoke_descendants(
    conn: &mut SqliteConnection,
    root: &KeyId,
    at: OffsetDateTime,
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        descendant_tree!(),
        "UPDATE api_keys SET revoked_at = ?2 \
         WHERE revoked_at IS NULL AND id IN (SELECT id FROM tree) RETURNING ",
        columns!(),
        ""
    ))
    .bind(root.as_str())
    .bind(to_unix_micros(at))
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// Writes the name and usage-limit columns of `record`.
pub(super) async fn write_limits(
    conn: &mut SqliteConnection,
    record: &KeyRecord,
) -> Result<(), StoreError> {
    let columns = LimitColumns::of(&record.limits);
    sqlx::query(
        "UPDATE api_keys SET name = ?2, rate_limit = ?3, rate_period_seconds = ?4, \
         credits_remaining = ?5, credits_refill_interval = ?6, credits_refill_amount = ?7, \
         credits_set_at = ?8 WHERE id = ?1",
    )
    .bind(record.id.as_str())
    .bind(record.name.as_str())
    .bind(columns.rate_limit)
    .bind(columns.rate_period_seconds)
    .bind(columns.credits_remaining)
    .bind(columns.credits_refill_interval)
    .bind(columns.credits_refill_amount)
    .bind(columns.credits_set_at.map(to_unix_micros))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(())
}

fn scopes_json(record: &KeyRecord) -> String {
    serde_json::Value::from(record.scopes.to_strings()).to_string()
}
