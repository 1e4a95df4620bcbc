//! The whole-owner queries: every owner's key counts, and each key's requests over a period.

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;

use crate::key::KeyId;
use crate::store::StoreError;
use crate::store::overview::{MAX_OWNERS, OwnerSummary};
use crate::store::sql_common::map_sqlx_error;
use crate::store::usage::{OUTCOMES, UsageBucket};

fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    at: usize,
) -> Result<T, StoreError> {
    row.try_get(at).map_err(map_sqlx_error)
}

/// `s`: the quoted schema.
pub(super) async fn owners(
    pool: &PgPool,
    s: &str,
    now: OffsetDateTime,
    limit: u32,
) -> Result<Vec<OwnerSummary>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT owner, count(*), count(*) FILTER (WHERE revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $1)) \
         FROM {s}.api_keys GROUP BY owner ORDER BY owner COLLATE \"C\" LIMIT $2"
    )))
    .bind(now)
    .bind(i64::from(limit.min(MAX_OWNERS)))
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter()
        .map(|row| {
            Ok(OwnerSummary {
                owner: get(row, 0)?,
                keys: get::<i64>(row, 1)?.max(0) as u64,
                active_keys: get::<i64>(row, 2)?.max(0) as u64,
            })
        })
        .collect()
}

/// `s`: the quoted schema.
pub(super) async fn usage_by_key(
    pool: &PgPool,
    s: &str,
    owner: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<UsageBucket>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT u.key_id, sum(u.admitted)::bigint, sum(u.invalid)::bigint, \
         sum(u.expired_or_revoked)::bigint, sum(u.missing_scope)::bigint, \
         sum(u.rate_limited)::bigint, sum(u.out_of_credits)::bigint, sum(u.network)::bigint, \
         (array_agg(u.last_ip ORDER BY u.hour DESC) FILTER (WHERE u.last_ip IS NOT NULL))[1] \
         FROM {s}.api_key_usage u JOIN {s}.api_keys k ON k.id = u.key_id \
         WHERE k.owner = $1 AND u.hour >= $2 AND u.hour < $3 GROUP BY u.key_id"
    )))
    .bind(owner)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter()
        .map(|row| {
            let mut counts = [0u64; OUTCOMES];
            for (i, count) in counts.iter_mut().enumerate() {
                *count = get::<i64>(row, i + 1)?.max(0) as u64;
            }
            let ip: Option<String> = get(row, 8)?;
            Ok(UsageBucket {
                key_id: KeyId::new(get::<String>(row, 0)?),
                hour: from,
                counts,
                last_ip: ip.and_then(|ip| ip.parse().ok()),
            })
        })
        .collect()
}
