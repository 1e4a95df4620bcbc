//! The key reads in PostgreSQL, straight on the pool: by digest, by id, by owner, the sweeper's
//! query, and the delegation tree (ancestors, descendants, the budget levels above a key).

use std::sync::Arc;

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;

use super::sql::{COLUMNS, Sql, decode, decode_opt, limits_at, query};
use crate::key::{KeyDigest, KeyId};
use crate::limits::BudgetLevel;
use crate::record::{KeyRecord, MAX_DELEGATION_DEPTH};
use crate::store::StoreError;
use crate::store::params::{ListQuery, SweepQuery};
use crate::store::sql_common::{budget_level, map_sqlx_error, micros};

/// The record whose current or grace-period previous digest is `digest`.
pub(super) async fn find_by_digest(
    pool: &PgPool,
    sql: &Sql,
    digest: &KeyDigest,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = query(&sql.find_by_digest)
        .bind(&digest.as_bytes()[..])
        .fetch_optional(pool)
        .await
        .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// The record `id`.
pub(super) async fn get(
    pool: &PgPool,
    sql: &Sql,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = query(&sql.get)
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
        .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// One page of an owner's keys, newest first.
pub(super) async fn list(
    pool: &PgPool,
    sql: &Sql,
    q: &ListQuery,
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = query(&sql.list)
        .bind(q.owner.as_str())
        .bind(q.before.as_ref().map(KeyId::as_str))
        .bind(i64::from(q.limit))
        .bind(q.account.as_deref())
        .fetch_all(pool)
        .await
        .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// How many of the owner's (account's) keys are active at `now`.
pub(super) async fn count_active(
    pool: &PgPool,
    sql: &Sql,
    owner: &str,
    account: Option<&str>,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let active: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.count_active)))
        .bind(owner)
        .bind(account)
        .bind(micros(now))
        .fetch_one(pool)
        .await
        .map_err(map_sqlx_error)?;
    Ok(active.max(0) as u64)
}

/// The keys the hygiene sweeper asks for.
pub(super) async fn sweep(
    pool: &PgPool,
    sql: &Sql,
    q: &SweepQuery,
) -> Result<Vec<KeyRecord>, StoreError> {
    let s = &sql.quoted;
    let sql: Arc<str> = format!(
        "SELECT {COLUMNS} FROM {s}.api_keys WHERE revoked_at IS NULL \
           AND (expires_at IS NULL OR expires_at > $1) \
           AND (expires_at <= $2 OR coalesce(last_used_at, created_at) <= $3) \
           AND ($4::text IS NULL OR id > $4) ORDER BY id LIMIT $5"
    )
    .into();
    let rows = query(&sql)
        .bind(micros(q.now))
        .bind(micros(q.expiring_before))
        .bind(micros(q.idle_before))
        .bind(q.after.as_ref().map(KeyId::as_str))
        .bind(i64::from(q.limit))
        .fetch_all(pool)
        .await
        .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// The key's ancestors, nearest first.
pub(super) async fn ancestors(
    pool: &PgPool,
    sql: &Sql,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = query(&sql.ancestors)
        .bind(id.as_str())
        .bind(MAX_DELEGATION_DEPTH as i32)
        .fetch_all(pool)
        .await
        .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// Every key `id` created, transitively.
pub(super) async fn descendants(
    pool: &PgPool,
    sql: &Sql,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = query(&sql.descendants)
        .bind(id.as_str())
        .fetch_all(pool)
        .await
        .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// The levels above `record`'s key that have limits, in one statement.
pub(super) async fn budget_above(
    pool: &PgPool,
    sql: &Sql,
    record: &KeyRecord,
) -> Result<Vec<BudgetLevel>, StoreError> {
    let rows = query(&sql.budget_above)
        .bind(record.created_by.as_ref().map(KeyId::as_str))
        .bind(MAX_DELEGATION_DEPTH as i32)
        .bind(record.owner.as_str())
        .bind(record.account.as_str())
        .fetch_all(pool)
        .await
        .map_err(map_sqlx_error)?;
    let owner: Arc<str> = record.owner.as_str().into();
    let mut levels = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = row.try_get(0).map_err(map_sqlx_error)?;
        let name: String = row.try_get(1).map_err(map_sqlx_error)?;
        levels.extend(budget_level(&owner, &kind, name, limits_at(row, 3)?));
    }
    Ok(levels)
}
