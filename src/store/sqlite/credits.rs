//! Credits and pools in SQLite: [`adjust`] for one key, [`chain`] for the levels of a spend or
//! refund, and the pools' rows (`api_key_pools`), each on the connection of the caller's
//! `BEGIN IMMEDIATE` transaction, which serialises every writer of the file: read, apply the rule,
//! write.

use sqlx::SqliteConnection;
use time::OffsetDateTime;

use super::keys::{fetch, write_limits};
use super::sql::{decode_limits, limit_columns};
use crate::key::KeyId;
use crate::limits::{BudgetId, Credits, PoolId, UsageLimits};
use crate::store::StoreError;
use crate::store::credits::{ChainLevels, CreditAdjustment};
use crate::store::sql_common::{LimitColumns, adjusted, map_sqlx_error, pool_key, to_unix_micros};

/// [`KeyStore::adjust_credits`](crate::store::KeyStore::adjust_credits) on the key `id`.
pub(super) async fn adjust(
    conn: &mut SqliteConnection,
    id: &KeyId,
    delta: i64,
    now: OffsetDateTime,
) -> Result<Option<CreditAdjustment>, StoreError> {
    let Some(mut record) = fetch(conn, id).await? else {
        return Ok(None);
    };
    let Some((outcome, changed)) = adjusted(&mut record, delta, now) else {
        return Ok(None);
    };
    if changed {
        write_limits(conn, &record).await?;
    }
    Ok(Some(outcome))
}

/// Reads the credits of every level of `levels`, applies `rule` (a spend or a refund), and writes
/// the levels it changed.
pub(super) async fn chain<T>(
    conn: &mut SqliteConnection,
    levels: &ChainLevels,
    rule: impl FnOnce(&mut [Option<Credits>]) -> T,
) -> Result<T, StoreError> {
    let before = read_credits(conn, levels).await?;
    let mut after = before.clone();
    let outcome = rule(&mut after);
    write_credits(conn, levels, &before, &after).await?;
    Ok(outcome)
}

/// The limits of `pool`, read on `conn`; `None` when no pool is set.
pub(super) async fn read_pool(
    conn: &mut SqliteConnection,
    pool: &PoolId,
) -> Result<Option<UsageLimits>, StoreError> {
    let (owner, kind, account) = pool_key(pool);
    let row = sqlx::query(concat!(
        "SELECT ",
        limit_columns!(),
        " FROM api_key_pools WHERE owner = ?1 AND kind = ?2 AND account = ?3"
    ))
    .bind(owner)
    .bind(kind)
    .bind(account)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    row.map(|row| decode_limits(&row, 0)?.into_limits())
        .transpose()
}

/// The credits of every level of `levels` (`None`: unknown, or without credits), inside the
/// caller's transaction.
async fn read_credits(
    conn: &mut SqliteConnection,
    levels: &ChainLevels,
) -> Result<Vec<Option<Credits>>, StoreError> {
    let mut credits = Vec::with_capacity(levels.unique.len());
    for level in &levels.unique {
        let limits = match level {
            BudgetId::Key(id) => {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    limit_columns!(),
                    " FROM api_keys WHERE id = ?1"
                ))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(map_sqlx_error)?;
                row.map(|row| decode_limits(&row, 0)?.into_limits())
                    .transpose()?
            }
            BudgetId::Pool(pool) => read_pool(conn, pool).await?,
        };
        credits.push(limits.and_then(|l| l.credits));
    }
    Ok(credits)
}

/// Writes `remaining` and `set_at` of every level whose credits changed from `before`.
async fn write_credits(
    conn: &mut SqliteConnection,
    levels: &ChainLevels,
    before: &[Option<Credits>],
    after: &[Option<Credits>],
) -> Result<(), StoreError> {
    for ((level, old), new) in levels.unique.iter().zip(before).zip(after) {
        let Some(new) = new.filter(|new| Some(*new) != *old) else {
            continue;
        };
        let remaining = LimitColumns::of(&UsageLimits {
            rate_limit: None,
            credits: Some(new),
        });
        let query = match level {
            BudgetId::Key(id) => sqlx::query(
                "UPDATE api_keys SET credits_remaining = ?1, credits_set_at = ?2 WHERE id = ?3",
            )
            .bind(remaining.credits_remaining)
            .bind(remaining.credits_set_at.map(to_unix_micros))
            .bind(id.as_str()),
            BudgetId::Pool(pool) => {
                let (owner, kind, account) = pool_key(pool);
                sqlx::query(
                    "UPDATE api_key_pools SET credits_remaining = ?1, credits_set_at = ?2 \
                     WHERE owner = ?3 AND kind = ?4 AND account = ?5",
                )
                .bind(remaining.credits_remaining)
                .bind(remaining.credits_set_at.map(to_unix_micros))
                .bind(owner)
                .bind(kind)
                .bind(account)
            }
        };
        query.execute(&mut *conn).await.map_err(map_sqlx_error)?;
    }
    Ok(())
}

/// Writes or removes a pool on `conn` (inside the caller's transaction); whether it wrote.
pub(super) async fn write_pool(
    conn: &mut SqliteConnection,
    pool: &PoolId,
    limits: Option<UsageLimits>,
    if_absent: bool,
) -> Result<bool, StoreError> {
    let (owner, kind, account) = pool_key(pool);
    let Some(limits) = limits else {
        if if_absent {
            // Removing only what is absent removes nothing.
            return Ok(false);
        }
        let done = sqlx::query(
            "DELETE FROM api_key_pools WHERE owner = ?1 AND kind = ?2 AND account = ?3",
        )
        .bind(owner)
        .bind(kind)
        .bind(account)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        return Ok(done.rows_affected() == 1);
    };
    let columns = LimitColumns::of(&limits);
    let sql = if if_absent {
        concat!(
            "INSERT INTO api_key_pools (owner, kind, account, ",
            limit_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (owner, kind, account) DO NOTHING"
        )
    } else {
        concat!(
            "INSERT INTO api_key_pools (owner, kind, account, ",
            limit_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (owner, kind, account) DO UPDATE SET \
             rate_limit = excluded.rate_limit, \
             rate_period_seconds = excluded.rate_period_seconds, \
             credits_remaining = excluded.credits_remaining, \
             credits_refill_interval = excluded.credits_refill_interval, \
             credits_refill_amount = excluded.credits_refill_amount, \
             credits_set_at = excluded.credits_set_at"
        )
    };
    let done = sqlx::query(sql)
        .bind(owner)
        .bind(kind)
        .bind(account)
        .bind(columns.rate_limit)
        .bind(columns.rate_period_seconds)
        .bind(columns.credits_remaining)
        .bind(columns.credits_refill_interval)
        .bind(columns.credits_refill_amount)
        .bind(columns.credits_set_at.map(to_unix_micros))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}
