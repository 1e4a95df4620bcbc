//! The whole-owner queries: every owner's key counts, and each key's requests over a period.

use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use time::OffsetDateTime;

use crate::key::KeyId;
use crate::store::overview::{MAX_OWNERS, OwnerSummary};
use crate::store::sql_common::{map_sqlx_error, to_unix_micros};
use crate::store::usage::{OUTCOMES, UsageBucket};
use crate::store::{StoreError, StoreErrorKind};

pub(super) async fn owners(
    pool: &SqlitePool,
    now: OffsetDateTime,
    limit: u32,
) -> Result<Vec<OwnerSummary>, StoreError> {
    let rows = sqlx::query(
        "SELECT owner, count(*), \
         sum(CASE WHEN revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1) THEN 1 ELSE 0 END) \
         FROM api_keys GROUP BY owner ORDER BY owner LIMIT ?2",
    )
    .bind(to_unix_micros(now))
    .bind(i64::from(limit.min(MAX_OWNERS)))
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    Ok(rows
        .iter()
        .map(|row| OwnerSummary {
            owner: row.get(0),
            keys: row.get::<i64, _>(1).max(0) as u64,
            active_keys: row.get::<i64, _>(2).max(0) as u64,
        })
        .collect())
}

pub(super) async fn usage_by_key(
    pool: &SqlitePool,
    owner: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<UsageBucket>, StoreError> {
    // The latest known address: the one of the key's last hour that has one.
    let rows = sqlx::query(
        "SELECT u.key_id, sum(u.admitted), sum(u.invalid), sum(u.expired_or_revoked), \
         sum(u.missing_scope), sum(u.rate_limited), sum(u.out_of_credits), sum(u.network), \
         (SELECT l.last_ip FROM api_key_usage l WHERE l.key_id = u.key_id AND l.hour >= ?2 \
          AND l.hour < ?3 AND l.last_ip IS NOT NULL ORDER BY l.hour DESC LIMIT 1) \
         FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id \
         WHERE k.owner = ?1 AND u.hour >= ?2 AND u.hour < ?3 GROUP BY u.key_id",
    )
    .bind(owner)
    .bind(from.unix_timestamp())
    .bind(to.unix_timestamp())
    .fetch_all(pool)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter()
        .map(|row| {
            let mut counts = [0u64; OUTCOMES];
            for (i, count) in counts.iter_mut().enumerate() {
                *count = row.get::<i64, _>(i + 1).max(0) as u64;
            }
            let ip: Option<String> = row.get(8);
            let id: String = row.get(0);
            if id.is_empty() {
                return Err(StoreError::new(StoreErrorKind::Corrupt, "an empty key id"));
            }
            Ok(UsageBucket {
                key_id: KeyId::new(id),
                hour: from,
                counts,
                last_ip: ip.and_then(|ip| ip.parse().ok()),
            })
        })
        .collect()
}
