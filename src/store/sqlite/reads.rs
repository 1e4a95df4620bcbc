//! The key reads in SQLite, straight on the pool: by digest, by id, by owner, the sweeper's
//! query, and the delegation tree (ancestors, descendants, the budget levels above a key).

use std::sync::Arc;

use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use time::OffsetDateTime;

use super::sql::{
    ancestor_chain, columns, decode, decode_limits, decode_opt, descendant_tree, limit_columns,
};
use crate::key::{KeyDigest, KeyId};
use crate::limits::BudgetLevel;
use crate::record::{KeyRecord, MAX_DELEGATION_DEPTH};
use crate::store::StoreError;
use crate::store::params::{ListQuery, SweepQuery};
use crate::store::sql_common::{budget_level, map_sqlx_error, to_unix_micros};

/// The record whose current or grace-period previous digest is `digest`.
pub(super) async fn find_by_digest(
    pool: &SqlitePool,
    digest: &KeyDigest,
) -> Result<Option<KeyRecord>, StoreError> {
    // Two unique-index lookups, whatever the planner's statistics say.
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE digest = ?1 UNION ALL SELECT ",
        columns!(),
        " FROM api_keys WHERE previous_digest = ?1 LIMIT 1"
    ))
    .bind(&digest.as_bytes()[..])
    .fetch_optional(pool)
    .await
    .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// The record `id`.
pub(super) async fn get(pool: &SqlitePool, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE id = ?1"
    ))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
    .map_err(map_sqlx_error)?;
    decode_opt(row)
}

/// One page of an owner's keys, newest first.
pub(super) async fn list(pool: &SqlitePool, q: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE owner = ?1 AND (?2 IS NULL OR id < ?2) \
         AND (?4 IS NULL OR account = ?4) ORDER BY id DESC LIMIT ?3"
    ))
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
    pool: &SqlitePool,
    owner: &str,
    account: Option<&str>,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE owner = ?1 AND (?2 IS NULL OR account = ?2) \
         AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)",
    )
    .bind(owner)
    .bind(account)
    .bind(to_unix_micros(now))
    .fetch_one(pool)
    .await
    .map_err(map_sqlx_error)?;
    Ok(active.max(0) as u64)
}

/// The keys the hygiene sweeper asks for.
pub(super) async fn sweep(pool: &SqlitePool, q: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1) \
          AND (expires_at <= ?2 OR coalesce(last_used_at, created_at) <= ?3) \
          AND (?4 IS NULL OR id > ?4) ORDER BY id LIMIT ?5"
    ))
    .bind(to_unix_micros(q.now))
    .bind(to_unix_micros(q.expiring_before))
    .bind(to_unix_micros(q.idle_before))
    .bind(q.after.as_ref().map(KeyId::as_str))
    .bind(i64::from(q.limit))
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// The key's ancestors, nearest first.
pub(super) async fn ancestors(pool: &SqlitePool, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        ancestor_chain!("(SELECT created_by FROM api_keys WHERE id = ?1)"),
        "SELECT ",
        columns!(),
        " FROM chain JOIN api_keys ON api_keys.id = chain.cid ORDER BY chain.depth"
    ))
    .bind(id.as_str())
    .bind(MAX_DELEGATION_DEPTH as i64)
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// Every key `id` created, transitively.
pub(super) async fn descendants(
    pool: &SqlitePool,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    let rows = sqlx::query(concat!(
        descendant_tree!(),
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE id IN (SELECT id FROM tree)"
    ))
    .bind(id.as_str())
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// The levels above `record`'s key that have limits, in one statement.
pub(super) async fn budget_above(
    pool: &SqlitePool,
    record: &KeyRecord,
) -> Result<Vec<BudgetLevel>, StoreError> {
    // One statement: the ancestors (depth 1 up), then the account pool, then the owner pool.
    let rows = sqlx::query(concat!(
        ancestor_chain!("?1"),
        "SELECT 'key', cid, depth, ",
        limit_columns!(),
        " FROM chain JOIN api_keys ON api_keys.id = chain.cid \
         UNION ALL SELECT kind, account, CASE kind WHEN 'account' THEN ?2 + 1 ELSE ?2 + 2 END, ",
        limit_columns!(),
        " FROM api_key_pools WHERE owner = ?3 AND (kind = 'owner' OR account = ?4) \
         ORDER BY 3"
    ))
    .bind(record.created_by.as_ref().map(KeyId::as_str))
    .bind(MAX_DELEGATION_DEPTH as i64)
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
        let limits = decode_limits(row, 3)?.into_limits()?;
        levels.extend(budget_level(&owner, &kind, name, limits));
    }
    Ok(levels)
}
