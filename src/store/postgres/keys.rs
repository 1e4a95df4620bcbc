//! The key writes in PostgreSQL, each on the connection of the caller's transaction (the store
//! opens it, writes the change's events on it and commits), with the locks that keep concurrent
//! writers from any number of instances exact: per-owner and per-account advisory locks for
//! inserts, row locks, and the per-owner cascade lock.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgConnection};
use time::OffsetDateTime;

use super::sql::{Sql, decode, decode_opt, lock_key, query};
use crate::key::{KeyDigest, KeyId};
use crate::record::{KeyChange, KeyRecord};
use crate::store::params::{KeyLimits, KeyUpdate, Rotation};
use crate::store::sql_common::{
    LimitColumns, check_limit, map_sqlx_error, micros, networks_text, rotated_out, updated,
};
use crate::store::{StoreError, StoreErrorKind};

/// Stores `record` unless its id or a digest is taken ([`StoreErrorKind::Conflict`]), its creator
/// is not active at `now`, or `limits` would be exceeded.
pub(super) async fn insert(
    conn: &mut PgConnection,
    sql: &Sql,
    record: &KeyRecord,
    limits: KeyLimits,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let schema = sql.schema.as_str();
    let now = micros(now);
    let digests = digest_list(record.digests());
    // Lock order is always owner, then account, so two inserts never wait on each other in a
    // cycle. The locks are held until commit; the counts below see every earlier holder's insert.
    if limits.per_owner.is_some() {
        lock(conn, &["owner", schema, &record.owner]).await?;
    }
    if limits.per_account.is_some() {
        lock(conn, &["account", schema, &record.account]).await?;
    }
    let exists: bool = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.exists)))
        .bind(record.id.as_str())
        .bind(&digests)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    if exists {
        return Err(StoreError::from_kind(StoreErrorKind::Conflict));
    }
    if let Some(creator) = &record.created_by {
        let active = query(&sql.creator_active)
            .bind(creator.as_str())
            .bind(now)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        if active.is_none() {
            return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
        }
    }
    for (limit, sql, value, scope) in [
        (limits.per_owner, &sql.count_owner, &record.owner, "owner"),
        (
            limits.per_account,
            &sql.count_account,
            &record.account,
            "account",
        ),
    ] {
        let Some(limit) = limit else { continue };
        let active: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(sql)))
            .bind(value.as_str())
            .bind(now)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        check_limit(limit, active, scope)?;
    }
    let previous = record.previous.as_ref();
    let limits_columns = LimitColumns::of(&record.limits);
    query(&sql.insert)
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(record.owner.as_str())
        .bind(record.account.as_str())
        .bind(record.scopes.to_strings())
        .bind(&record.digest.as_bytes()[..])
        .bind(i32::from(record.digest_scheme.version()))
        .bind(record.masked_key.as_str())
        .bind(micros(record.created_at))
        .bind(record.expires_at.map(micros))
        .bind(record.revoked_at.map(micros))
        .bind(record.last_used_at.map(micros))
        .bind(record.created_by.as_ref().map(KeyId::as_str))
        .bind(record.rotated_at.map(micros))
        .bind(previous.map(|p| p.digest.as_bytes().to_vec()))
        .bind(previous.map(|p| i32::from(p.digest_scheme.version())))
        .bind(previous.map(|p| micros(p.valid_until)))
        .bind(limits_columns.rate_limit)
        .bind(limits_columns.rate_period_seconds)
        .bind(limits_columns.credits_remaining)
        .bind(limits_columns.credits_refill_interval)
        .bind(limits_columns.credits_refill_amount)
        .bind(limits_columns.credits_set_at)
        .bind(networks_text(record.allowed_networks.as_ref()))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    query(&sql.insert_digests)
        .bind(&digests)
        .bind(record.id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    Ok(())
}

/// Remembers that `notice` was given about key `id` (insert-if-absent): whether it is new.
pub(super) async fn record_notice(
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    notice: &str,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let s = &sql.quoted;
    let done = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_notices (key_id, notice, noticed_at) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING"
    )))
    .bind(id.as_str())
    .bind(notice)
    .bind(micros(at))
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}

/// Revokes the key at `at` (keeping an earlier revocation) and its descendants.
pub(super) async fn revoke(
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    at: OffsetDateTime,
) -> Result<Option<KeyChange>, StoreError> {
    let Some(before) = begin_cascade(conn, sql, id).await? else {
        return Ok(None);
    };
    let row = query(&sql.revoke)
        .bind(id.as_str())
        .bind(micros(at))
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let after = decode_opt(row)?;
    let revoked_descendants = revoke_descendants(conn, sql, id, at).await?;
    Ok(Some(KeyChange {
        before,
        after,
        revoked_descendants,
    }))
}

/// Removes the key (its digests go with it) and revokes its descendants at `at`.
pub(super) async fn delete(
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    at: OffsetDateTime,
) -> Result<Option<KeyChange>, StoreError> {
    if begin_cascade(conn, sql, id).await?.is_none() {
        return Ok(None);
    }
    // `api_key_digests` rows go with it (ON DELETE CASCADE).
    let row = query(&sql.delete)
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let Some(before) = decode_opt(row)? else {
        return Ok(None);
    };
    let revoked_descendants = revoke_descendants(conn, sql, id, at).await?;
    Ok(Some(KeyChange {
        before,
        after: None,
        revoked_descendants,
    }))
}

/// Replaces the key's secret as `rotation` says.
pub(super) async fn replace_secret(
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    rotation: &Rotation,
) -> Result<Option<KeyChange>, StoreError> {
    let old = if rotation.revoke_descendants {
        begin_cascade(conn, sql, id).await?
    } else {
        lock_row(conn, sql, id).await?
    };
    let Some(old) = old else {
        return Ok(None);
    };
    let previous = rotated_out(&old, rotation)?;
    // Registering the new digest first fails on any digest in use, this key's included.
    query(&sql.insert_digests)
        .bind(vec![rotation.digest.as_bytes().to_vec()])
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let keep =
        digest_list(std::iter::once(&rotation.digest).chain(previous.as_ref().map(|p| &p.digest)));
    query(&sql.drop_digests)
        .bind(id.as_str())
        .bind(keep)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let row = query(&sql.rotate)
        .bind(id.as_str())
        .bind(&rotation.digest.as_bytes()[..])
        .bind(i32::from(rotation.digest_scheme.version()))
        .bind(rotation.masked_key.as_str())
        .bind(micros(rotation.rotated_at))
        .bind(previous.as_ref().map(|p| p.digest.as_bytes().to_vec()))
        .bind(
            previous
                .as_ref()
                .map(|p| i32::from(p.digest_scheme.version())),
        )
        .bind(previous.as_ref().map(|p| p.valid_until))
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let after = decode_opt(row)?;
    let revoked_descendants = if rotation.revoke_descendants {
        revoke_descendants(conn, sql, id, rotation.rotated_at).await?
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
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    update: &KeyUpdate,
) -> Result<Option<KeyChange>, StoreError> {
    let Some(record) = lock_row(conn, sql, id).await? else {
        return Ok(None);
    };
    let change = updated(record, update);
    if let Some(after) = &change.after {
        write_limits(conn, sql, after).await?;
    }
    Ok(Some(change))
}

/// Writes the name and usage-limit columns of `record`.
pub(super) async fn write_limits(
    conn: &mut PgConnection,
    sql: &Sql,
    record: &KeyRecord,
) -> Result<(), StoreError> {
    let columns = LimitColumns::of(&record.limits);
    query(&sql.write_limits)
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(columns.rate_limit)
        .bind(columns.rate_period_seconds)
        .bind(columns.credits_remaining)
        .bind(columns.credits_refill_interval)
        .bind(columns.credits_refill_amount)
        .bind(columns.credits_set_at)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    Ok(())
}

pub(super) async fn lock(tx: &mut PgConnection, parts: &[&str]) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(parts))
        .execute(tx)
        .await
        .map(|_| ())
        .map_err(map_sqlx_error)
}

/// The key `id`, its row locked `FOR UPDATE` until `tx` ends. `None`: no such key.
pub(super) async fn lock_row(
    tx: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = query(&sql.get_for_update)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// Starts a cascade (revoke, delete, rotate ending the descendants) on key `id`: takes the
/// per-owner cascade lock, so that two cascades over overlapping trees run one after the other
/// instead of deadlocking on each other's rows, then locks the key's row. `None`: no such key.
pub(super) async fn begin_cascade(
    tx: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = query(&sql.get)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
    let Some(unlocked) = decode_opt(row)? else {
        return Ok(None);
    };
    // A key's owner never changes, so the lock read above is the lock of the row read below.
    lock(tx, &["cascade", &sql.schema, &unlocked.owner]).await?;
    lock_row(tx, sql, id).await
}

/// Revokes, at `at`, every descendant of `root` not revoked yet; returns those it revoked.
///
/// Repeated until a pass revokes nothing. Under READ COMMITTED each pass sees what committed
/// before it started; a delegated insert holds its creator `FOR SHARE`, so a pass revoking that
/// creator waits for the insert to commit, and the next pass sees the new child. The last, empty
/// pass starts once every key of the tree is revoked (by this transaction, which holds their rows
/// until it commits, or by a committed one): from then on, an insert under any of them fails.
async fn revoke_descendants(
    tx: &mut PgConnection,
    sql: &Sql,
    root: &KeyId,
    at: OffsetDateTime,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut revoked = Vec::new();
    loop {
        let rows = query(&sql.revoke_descendants)
            .bind(root.as_str())
            .bind(micros(at))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        if rows.is_empty() {
            return Ok(revoked);
        }
        for row in &rows {
            revoked.push(decode(row)?);
        }
    }
}

fn digest_list<'a>(digests: impl Iterator<Item = &'a KeyDigest>) -> Vec<Vec<u8>> {
    digests.map(|d| d.as_bytes().to_vec()).collect()
}
