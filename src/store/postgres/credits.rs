//! Credits and pools in PostgreSQL: [`adjust`] for one key, [`chain`] for the levels of a spend or
//! refund (every level's row locked in one order, so concurrent chains never deadlock on each
//! other), and the pools' rows (`api_key_pools`), each on the caller's connection.

use std::collections::HashMap;

use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;

use super::keys::{lock_row, write_limits};
use super::sql::{Sql, limits_at, query};
use crate::key::KeyId;
use crate::limits::{BudgetId, Credits, PoolId, UsageLimits};
use crate::store::StoreError;
use crate::store::credits::{ChainLevels, CreditAdjustment};
use crate::store::sql_common::{LimitColumns, adjusted, map_sqlx_error, micros, pool_key};

/// [`KeyStore::adjust_credits`](crate::store::KeyStore::adjust_credits) on the key `id`, its row
/// locked: the lock serialises every adjustment of this key across every instance.
pub(super) async fn adjust(
    conn: &mut PgConnection,
    sql: &Sql,
    id: &KeyId,
    delta: i64,
    now: OffsetDateTime,
) -> Result<Option<CreditAdjustment>, StoreError> {
    let Some(mut record) = lock_row(conn, sql, id).await? else {
        return Ok(None);
    };
    let Some((outcome, changed)) = adjusted(&mut record, delta, now) else {
        return Ok(None);
    };
    if changed {
        write_limits(conn, sql, &record).await?;
    }
    Ok(Some(outcome))
}

/// One attempt of a chain (a spend or refund of several levels) in the caller's transaction: lock
/// every level's row in one order, apply `rule`, write the levels it changed.
pub(super) async fn chain<T>(
    conn: &mut PgConnection,
    sql: &Sql,
    levels: &ChainLevels,
    rule: &impl Fn(&mut [Option<Credits>]) -> T,
) -> Result<T, StoreError> {
    let key_ids: Vec<&str> = levels.keys().map(KeyId::as_str).collect();
    let mut keys = HashMap::new();
    if !key_ids.is_empty() {
        let rows = query(&sql.lock_key_credits)
            .bind(&key_ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        for row in &rows {
            let id: String = row.try_get(0).map_err(map_sqlx_error)?;
            keys.insert(id, limits_at(row, 1)?.credits);
        }
    }
    let pool_keys: Vec<(&str, &str, &str)> = levels.pools().map(pool_key).collect();
    let mut pools = HashMap::new();
    if !pool_keys.is_empty() {
        let rows = query(&sql.lock_pool_credits)
            .bind(pool_keys.iter().map(|k| k.0).collect::<Vec<_>>())
            .bind(pool_keys.iter().map(|k| k.1).collect::<Vec<_>>())
            .bind(pool_keys.iter().map(|k| k.2).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        for row in &rows {
            let key: (String, String, String) = (
                row.try_get(0).map_err(map_sqlx_error)?,
                row.try_get(1).map_err(map_sqlx_error)?,
                row.try_get(2).map_err(map_sqlx_error)?,
            );
            pools.insert(key, limits_at(row, 3)?.credits);
        }
    }
    let before: Vec<Option<Credits>> = levels
        .unique
        .iter()
        .map(|level| match level {
            BudgetId::Key(id) => keys.get(id.as_str()).copied().flatten(),
            BudgetId::Pool(pool) => {
                let (owner, kind, account) = pool_key(pool);
                pools
                    .get(&(owner.to_owned(), kind.to_owned(), account.to_owned()))
                    .copied()
                    .flatten()
            }
        })
        .collect();
    let mut after = before.clone();
    let outcome = rule(&mut after);
    let (mut key_writes, mut pool_writes) = (CreditWrites::default(), CreditWrites::default());
    for ((level, old), new) in levels.unique.iter().zip(&before).zip(&after) {
        let Some(new) = new.filter(|new| Some(*new) != *old) else {
            continue;
        };
        match level {
            BudgetId::Key(id) => key_writes.push(id.as_str(), "", "", new),
            BudgetId::Pool(pool) => {
                let (owner, kind, account) = pool_key(pool);
                pool_writes.push(owner, kind, account, new);
            }
        }
    }
    if !key_writes.remaining.is_empty() {
        query(&sql.write_key_credits)
            .bind(&key_writes.owner)
            .bind(&key_writes.remaining)
            .bind(&key_writes.set_at)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    }
    if !pool_writes.remaining.is_empty() {
        query(&sql.write_pool_credits)
            .bind(&pool_writes.owner)
            .bind(&pool_writes.kind)
            .bind(&pool_writes.account)
            .bind(&pool_writes.remaining)
            .bind(&pool_writes.set_at)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
    }
    Ok(outcome)
}

/// The credit columns of the levels one chain changed, as arrays for one `UNNEST` update each
/// (`owner` holds the key id for keys).
#[derive(Default)]
struct CreditWrites<'a> {
    owner: Vec<&'a str>,
    kind: Vec<&'a str>,
    account: Vec<&'a str>,
    remaining: Vec<i64>,
    set_at: Vec<OffsetDateTime>,
}

impl<'a> CreditWrites<'a> {
    fn push(&mut self, owner: &'a str, kind: &'a str, account: &'a str, credits: Credits) {
        let columns = LimitColumns::of(&UsageLimits {
            rate_limit: None,
            credits: Some(credits),
        });
        self.owner.push(owner);
        self.kind.push(kind);
        self.account.push(account);
        self.remaining
            .push(columns.credits_remaining.unwrap_or_default());
        self.set_at.push(micros(credits.set_at));
    }
}

/// The limits of `pool`; `None` when no pool is set.
pub(super) async fn read_pool(
    db: &PgPool,
    sql: &Sql,
    pool: &PoolId,
) -> Result<Option<UsageLimits>, StoreError> {
    let (owner, kind, account) = pool_key(pool);
    let row = query(&sql.pool)
        .bind(owner)
        .bind(kind)
        .bind(account)
        .fetch_optional(db)
        .await
        .map_err(map_sqlx_error)?;
    row.map(|row| limits_at(&row, 0)).transpose()
}

/// Writes or removes a pool on `conn` (inside the caller's transaction); whether it wrote.
pub(super) async fn write_pool(
    conn: &mut PgConnection,
    sql: &Sql,
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
        let done = query(&sql.pool_delete)
            .bind(owner)
            .bind(kind)
            .bind(account)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        return Ok(done.rows_affected() == 1);
    };
    let columns = LimitColumns::of(&limits);
    // Insert-if-absent on the primary key: racing instances wait for the first insert and
    // then do nothing.
    let sql = if if_absent {
        &sql.pool_insert
    } else {
        &sql.pool_upsert
    };
    let done = query(sql)
        .bind(owner)
        .bind(kind)
        .bind(account)
        .bind(columns.rate_limit)
        .bind(columns.rate_period_seconds)
        .bind(columns.credits_remaining)
        .bind(columns.credits_refill_interval)
        .bind(columns.credits_refill_amount)
        .bind(columns.credits_set_at)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    Ok(done.rows_affected() == 1)
}
