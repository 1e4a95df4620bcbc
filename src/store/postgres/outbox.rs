//! The outbox half of webhooks in PostgreSQL: [`enqueue`], called by `audit::append` for every
//! event it writes, on the same transaction: a pending delivery row per subscribed endpoint
//! (`api_key_webhook_deliveries`, migration 8), its message id and body from `delivery`. `s` is
//! the quoted schema name (a checked identifier). The endpoints and their reads live in the
//! `webhooks` module (`webhooks::postgres`).

use sqlx::{AssertSqlSafe, PgConnection};
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::record::MAX_DELEGATION_DEPTH;
use crate::store::StoreError;
use crate::store::delivery::{message_id, payload};
use crate::store::sql_common::{map_sqlx_error, micros};

/// Whether `root` is active at `at` and its subtree holds `key_id`.
async fn in_live_subtree(
    conn: &mut PgConnection,
    s: &str,
    root: &str,
    key_id: &str,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let live: Option<(Option<OffsetDateTime>, Option<OffsetDateTime>)> =
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT revoked_at, expires_at FROM {s}.api_keys WHERE id = $1"
        )))
        .bind(root)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    match live {
        Some((None, expires)) if expires.is_none_or(|e| e > at) => {}
        _ => return Ok(false),
    }
    let mut id = key_id.to_owned();
    for _ in 0..=MAX_DELEGATION_DEPTH + 1 {
        if id == root {
            return Ok(true);
        }
        let parent: Option<Option<String>> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT created_by FROM {s}.api_keys WHERE id = $1"
        )))
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        match parent.flatten() {
            Some(parent) => id = parent,
            None => return Ok(false),
        }
    }
    Ok(false)
}

/// Writes a pending delivery of `event` to each endpoint of its owner subscribed to its type, on
/// the caller's transaction. An endpoint a scoped key registered gets only events about keys of
/// that key's subtree, and only while that key is active.
pub(super) async fn enqueue(
    conn: &mut PgConnection,
    s: &str,
    event: &AuditEvent,
) -> Result<(), StoreError> {
    let endpoints: Vec<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, registered_by FROM {s}.api_key_webhooks \
         WHERE owner_id = $1 AND $2 = ANY(events) ORDER BY id"
    )))
    .bind(&event.owner_id)
    .bind(event.event_type.as_str())
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let mut body = None;
    for (webhook_id, registered_by) in endpoints {
        if let Some(root) = registered_by {
            let Some(key) = event.key_id.as_ref() else {
                continue;
            };
            if !in_live_subtree(conn, s, &root, key.as_str(), event.at).await? {
                continue;
            }
        }
        let body = body.get_or_insert_with(|| payload(event));
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_webhook_deliveries (id, webhook_id, event_id, event_type, \
             payload, status, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)"
        )))
        .bind(message_id())
        .bind(&webhook_id)
        .bind(&event.id)
        .bind(event.event_type.as_str())
        .bind(&*body)
        .bind(micros(event.at))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    }
    Ok(())
}
