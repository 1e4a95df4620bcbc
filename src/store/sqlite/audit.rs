//! Audit events and usage counts in SQLite: `api_key_events`, `api_key_event_chains`,
//! `api_key_usage` (migration 6).
//!
//! Every event is written by [`append`], on the connection of the transaction that writes the
//! change it records: the one hook for anything else that must be written with an event (a
//! webhook outbox).

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row, SqliteConnection};
use time::OffsetDateTime;

use crate::audit::{
    AuditEvent, ChainHash, ChainLink, ChainState, EventDraft, EventQuery, EventType,
};
use crate::key::KeyId;
use crate::store::sql_audit::{RawEvent, details_text};
use crate::store::sql_common::{from_unix_micros, map_sqlx_error, to_unix_micros};
use crate::store::usage::{OUTCOMES, UsageBucket};
use crate::store::{StoreError, StoreErrorKind};

/// Migration 6.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE api_key_events (
    id TEXT NOT NULL PRIMARY KEY,
    owner_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    at INTEGER NOT NULL,
    actor_kind TEXT NOT NULL,
    actor_key_id TEXT,
    actor_name TEXT,
    ip TEXT,
    request_id TEXT,
    key_id TEXT,
    account_id TEXT,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX api_key_events_owner_seq ON api_key_events (owner_id, seq);
CREATE INDEX api_key_events_key ON api_key_events (key_id, seq);
CREATE INDEX api_key_events_at ON api_key_events (at);
CREATE TABLE api_key_event_chains (
    owner_id TEXT NOT NULL PRIMARY KEY,
    head_seq INTEGER NOT NULL,
    head_hash TEXT NOT NULL,
    anchor_seq INTEGER NOT NULL,
    anchor_hash TEXT NOT NULL
) STRICT;
CREATE TABLE api_key_usage (
    key_id TEXT NOT NULL,
    hour INTEGER NOT NULL,
    admitted INTEGER NOT NULL,
    invalid INTEGER NOT NULL,
    expired_or_revoked INTEGER NOT NULL,
    missing_scope INTEGER NOT NULL,
    rate_limited INTEGER NOT NULL,
    out_of_credits INTEGER NOT NULL,
    network INTEGER NOT NULL,
    last_ip TEXT,
    PRIMARY KEY (key_id, hour)
) STRICT;
CREATE INDEX api_key_usage_hour ON api_key_usage (hour);
"#;

const EVENT_COLUMNS: &str = "id, owner_id, seq, type, at, actor_kind, actor_key_id, actor_name, \
    ip, request_id, key_id, account_id, details, prev_hash, hash";

fn corrupt(what: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, what)
}

fn link(seq: i64, hash: &str) -> Result<ChainLink, StoreError> {
    Ok(ChainLink {
        seq: u64::try_from(seq).map_err(|_| corrupt("negative chain position"))?,
        hash: ChainHash::from_hex(hash).ok_or_else(|| corrupt("bad chain hash"))?,
    })
}

/// The chain of `owner` as stored (zeros when it has no events).
pub(super) async fn chain_state(
    conn: &mut SqliteConnection,
    owner: &str,
) -> Result<ChainState, StoreError> {
    let row = sqlx::query(
        "SELECT head_seq, head_hash, anchor_seq, anchor_hash FROM api_key_event_chains \
         WHERE owner_id = ?1",
    )
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let Some(row) = row else {
        return Ok(ChainState::default());
    };
    Ok(ChainState {
        head: link(row.get(0), row.get(1))?,
        anchor: link(row.get(2), row.get(3))?,
    })
}

/// Seals `drafts` onto their owners' chains and writes them on `conn`, inside the caller's
/// `BEGIN IMMEDIATE` transaction (which serialises every chain).
pub(super) async fn append(
    conn: &mut SqliteConnection,
    drafts: Vec<EventDraft>,
) -> Result<Vec<AuditEvent>, StoreError> {
    let mut sealed = Vec::with_capacity(drafts.len());
    for draft in drafts {
        let state = chain_state(conn, &draft.owner_id).await?;
        let event = draft.seal(state.head);
        // Only constants are formatted into the statements of this module.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_key_events ({EVENT_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        )))
        .bind(&event.id)
        .bind(&event.owner_id)
        .bind(event.seq as i64)
        .bind(event.event_type.as_str())
        .bind(to_unix_micros(event.at))
        .bind(event.actor.kind.as_str())
        .bind(event.actor.key_id.as_ref().map(KeyId::as_str))
        .bind(event.actor.name.as_deref())
        .bind(event.ip.map(|ip| ip.to_string()))
        .bind(event.request_id.as_deref())
        .bind(event.key_id.as_ref().map(KeyId::as_str))
        .bind(event.account_id.as_deref())
        .bind(details_text(&event))
        .bind(event.prev_hash.to_hex())
        .bind(event.hash.to_hex())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(
            "INSERT INTO api_key_event_chains (owner_id, head_seq, head_hash, anchor_seq, anchor_hash) \
             VALUES (?1, ?2, ?3, 0, ?4) ON CONFLICT (owner_id) DO UPDATE SET \
             head_seq = excluded.head_seq, head_hash = excluded.head_hash",
        )
        .bind(&event.owner_id)
        .bind(event.seq as i64)
        .bind(event.hash.to_hex())
        .bind(ChainHash::ZERO.to_hex())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        #[cfg(feature = "webhooks")]
        super::outbox::enqueue(conn, &event).await?;
        sealed.push(event);
    }
    Ok(sealed)
}

fn decode(row: &SqliteRow) -> Result<AuditEvent, StoreError> {
    RawEvent {
        id: row.get(0),
        owner_id: row.get(1),
        seq: row.get(2),
        event_type: row.get(3),
        at: from_unix_micros(row.get(4))?,
        actor_kind: row.get(5),
        actor_key_id: row.get(6),
        actor_name: row.get(7),
        ip: row.get(8),
        request_id: row.get(9),
        key_id: row.get(10),
        account_id: row.get(11),
        details: row.get(12),
        prev_hash: row.get(13),
        hash: row.get(14),
    }
    .into_event()
}

/// See `KeyStore::events`.
pub(super) async fn events(
    conn: &mut SqliteConnection,
    q: &EventQuery,
) -> Result<Vec<AuditEvent>, StoreError> {
    let ids = q.key_ids.as_ref().map(|ids| {
        serde_json::Value::from(ids.iter().map(KeyId::as_str).collect::<Vec<_>>()).to_string()
    });
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM api_key_events WHERE owner_id = ?1 \
         AND (?2 IS NULL OR key_id IN (SELECT value FROM json_each(?2))) \
         AND (?3 IS NULL OR type = ?3) AND (?4 IS NULL OR at >= ?4) \
         AND (?5 IS NULL OR at < ?5) AND (?6 IS NULL OR seq < ?6) \
         ORDER BY seq DESC LIMIT ?7"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(&q.owner)
        .bind(ids)
        .bind(q.event_type.as_ref().map(EventType::as_str))
        .bind(q.since.map(to_unix_micros))
        .bind(q.until.map(to_unix_micros))
        .bind(q.before_seq.map(|s| s.min(i64::MAX as u64) as i64))
        .bind(i64::from(q.limit))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// See `KeyStore::chain_events`.
pub(super) async fn chain_events(
    conn: &mut SqliteConnection,
    owner: &str,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditEvent>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM api_key_events WHERE owner_id = ?1 AND seq > ?2 \
         ORDER BY seq LIMIT ?3"
    )))
    .bind(owner)
    .bind(after_seq.min(i64::MAX as u64) as i64)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// See `KeyStore::purge_events`: inside the caller's transaction.
pub(super) async fn purge_events(
    conn: &mut SqliteConnection,
    before: OffsetDateTime,
) -> Result<u64, StoreError> {
    // Per owner, everything below the first event not older than `before` (all, if none is).
    let cut = "SELECT e.owner_id, COALESCE((SELECT min(k.seq) FROM api_key_events k \
               WHERE k.owner_id = e.owner_id AND k.at >= ?1), max(e.seq) + 1) AS keep_from \
               FROM api_key_events e WHERE e.at < ?1 GROUP BY e.owner_id";
    let cuts = sqlx::query(cut)
        .bind(to_unix_micros(before))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    let mut removed = 0;
    for row in cuts {
        let owner: String = row.get(0);
        let keep_from: i64 = row.get(1);
        let last = sqlx::query(
            "SELECT seq, hash FROM api_key_events WHERE owner_id = ?1 AND seq < ?2 \
             ORDER BY seq DESC LIMIT 1",
        )
        .bind(&owner)
        .bind(keep_from)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        let Some(last) = last else { continue };
        let (seq, hash): (i64, String) = (last.get(0), last.get(1));
        let done = sqlx::query("DELETE FROM api_key_events WHERE owner_id = ?1 AND seq <= ?2")
            .bind(&owner)
            .bind(seq)
            .execute(&mut *conn)
            .await
            .map_err(map_sqlx_error)?;
        sqlx::query(
            "UPDATE api_key_event_chains SET anchor_seq = ?2, anchor_hash = ?3 WHERE owner_id = ?1",
        )
        .bind(&owner)
        .bind(seq)
        .bind(hash)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        removed += done.rows_affected();
    }
    Ok(removed)
}

/// See `KeyStore::record_usage`: inside the caller's transaction.
pub(super) async fn record_usage(
    conn: &mut SqliteConnection,
    buckets: &[UsageBucket],
) -> Result<(), StoreError> {
    for b in buckets {
        let c = b.counts.map(|n| n.min(i64::MAX as u64) as i64);
        sqlx::query(
            "INSERT INTO api_key_usage (key_id, hour, admitted, invalid, expired_or_revoked, \
             missing_scope, rate_limited, out_of_credits, network, last_ip) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (key_id, hour) DO UPDATE SET \
             admitted = admitted + excluded.admitted, invalid = invalid + excluded.invalid, \
             expired_or_revoked = expired_or_revoked + excluded.expired_or_revoked, \
             missing_scope = missing_scope + excluded.missing_scope, \
             rate_limited = rate_limited + excluded.rate_limited, \
             out_of_credits = out_of_credits + excluded.out_of_credits, \
             network = network + excluded.network, \
             last_ip = COALESCE(excluded.last_ip, last_ip)",
        )
        .bind(b.key_id.as_str())
        .bind(b.hour.unix_timestamp())
        .bind(c[0])
        .bind(c[1])
        .bind(c[2])
        .bind(c[3])
        .bind(c[4])
        .bind(c[5])
        .bind(c[6])
        .bind(b.last_ip.map(|ip| ip.to_string()))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
    }
    Ok(())
}

/// See `KeyStore::usage`.
pub(super) async fn usage(
    conn: &mut SqliteConnection,
    key_id: &KeyId,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<UsageBucket>, StoreError> {
    let rows = sqlx::query(
        "SELECT hour, admitted, invalid, expired_or_revoked, missing_scope, rate_limited, \
         out_of_credits, network, last_ip FROM api_key_usage \
         WHERE key_id = ?1 AND hour >= ?2 AND hour < ?3 ORDER BY hour",
    )
    .bind(key_id.as_str())
    .bind(from.unix_timestamp())
    .bind(to.unix_timestamp())
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter()
        .map(|row| {
            let mut counts = [0u64; OUTCOMES];
            for (i, count) in counts.iter_mut().enumerate() {
                *count = row.get::<i64, _>(i + 1).max(0) as u64;
            }
            let ip: Option<String> = row.get(8);
            Ok(UsageBucket {
                key_id: key_id.clone(),
                hour: OffsetDateTime::from_unix_timestamp(row.get(0))
                    .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, e))?,
                counts,
                last_ip: ip.and_then(|ip| ip.parse().ok()),
            })
        })
        .collect()
}
