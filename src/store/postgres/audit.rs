//! Audit events and usage counts in PostgreSQL: `api_key_events`, `api_key_event_chains`,
//! `api_key_usage` (migration 6), in the store's schema. `s` is the quoted schema name (a checked
//! identifier): the only thing formatted into these statements.
//!
//! Every event is written by [`append`], on the connection of the transaction that writes the
//! change it records: the one hook for anything else that must be written with an event (a
//! webhook outbox). An owner's chain head is a row locked `FOR UPDATE` by the appending
//! transaction, after every key row it locks: appends to one chain are serialised, and no lock
//! cycle forms with the key rows.

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};
use time::OffsetDateTime;

use crate::audit::{
    AuditEvent, ChainHash, ChainLink, ChainState, EventDraft, EventQuery, EventType,
};
use crate::key::KeyId;
use crate::store::sql_audit::{RawEvent, details_text};
use crate::store::sql_common::{map_sqlx_error, micros};
use crate::store::usage::{OUTCOMES, UsageBucket};
use crate::store::{StoreError, StoreErrorKind};

/// Migration 6.
pub(super) fn migration(s: &str) -> String {
    format!(
        r#"
CREATE TABLE {s}.api_key_events (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
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
);
CREATE UNIQUE INDEX api_key_events_owner_seq ON {s}.api_key_events (owner_id, seq);
CREATE INDEX api_key_events_key ON {s}.api_key_events (key_id, seq);
CREATE INDEX api_key_events_at ON {s}.api_key_events (at);
CREATE TABLE {s}.api_key_event_chains (
    owner_id TEXT PRIMARY KEY,
    head_seq BIGINT NOT NULL,
    head_hash TEXT NOT NULL,
    anchor_seq BIGINT NOT NULL,
    anchor_hash TEXT NOT NULL
);
CREATE TABLE {s}.api_key_usage (
    key_id TEXT NOT NULL,
    hour TIMESTAMPTZ NOT NULL,
    admitted BIGINT NOT NULL,
    invalid BIGINT NOT NULL,
    expired_or_revoked BIGINT NOT NULL,
    missing_scope BIGINT NOT NULL,
    rate_limited BIGINT NOT NULL,
    out_of_credits BIGINT NOT NULL,
    network BIGINT NOT NULL,
    last_ip TEXT,
    PRIMARY KEY (key_id, hour)
);
CREATE INDEX api_key_usage_hour ON {s}.api_key_usage (hour);
"#
    )
}

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

fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    at: usize,
) -> Result<T, StoreError> {
    row.try_get(at).map_err(map_sqlx_error)
}

/// The chain of `owner` as stored (zeros when it has no events); `lock`: `FOR UPDATE`.
async fn read_chain(
    conn: &mut PgConnection,
    s: &str,
    owner: &str,
    lock: bool,
) -> Result<ChainState, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT head_seq, head_hash, anchor_seq, anchor_hash FROM {s}.api_key_event_chains \
         WHERE owner_id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    )))
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let Some(row) = row else {
        return Ok(ChainState::default());
    };
    Ok(ChainState {
        head: link(get(&row, 0)?, get::<&str>(&row, 1)?)?,
        anchor: link(get(&row, 2)?, get::<&str>(&row, 3)?)?,
    })
}

/// See `KeyStore::chain_state`.
pub(super) async fn chain_state(
    conn: &mut PgConnection,
    s: &str,
    owner: &str,
) -> Result<ChainState, StoreError> {
    read_chain(conn, s, owner, false).await
}

/// Seals `drafts` onto their owners' chains and writes them on `conn`, inside the caller's
/// transaction.
pub(super) async fn append(
    conn: &mut PgConnection,
    s: &str,
    drafts: Vec<EventDraft>,
) -> Result<Vec<AuditEvent>, StoreError> {
    let mut sealed = Vec::with_capacity(drafts.len());
    for draft in drafts {
        // The head row exists before it is locked, so that two first events of an owner queue on
        // it like any others.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_event_chains \
             (owner_id, head_seq, head_hash, anchor_seq, anchor_hash) \
             VALUES ($1, 0, $2, 0, $2) ON CONFLICT (owner_id) DO NOTHING"
        )))
        .bind(&draft.owner_id)
        .bind(ChainHash::ZERO.to_hex())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        let state = read_chain(conn, s, &draft.owner_id, true).await?;
        let event = draft.seal(state.head);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_events ({EVENT_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        )))
        .bind(&event.id)
        .bind(&event.owner_id)
        .bind(event.seq as i64)
        .bind(event.event_type.as_str())
        .bind(micros(event.at))
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
        #[cfg(feature = "webhooks")]
        super::outbox::enqueue(conn, s, &event).await?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_event_chains SET head_seq = $2, head_hash = $3 WHERE owner_id = $1"
        )))
        .bind(&event.owner_id)
        .bind(event.seq as i64)
        .bind(event.hash.to_hex())
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        sealed.push(event);
    }
    Ok(sealed)
}

fn decode(row: &PgRow) -> Result<AuditEvent, StoreError> {
    RawEvent {
        id: get(row, 0)?,
        owner_id: get(row, 1)?,
        seq: get(row, 2)?,
        event_type: get(row, 3)?,
        at: get(row, 4)?,
        actor_kind: get(row, 5)?,
        actor_key_id: get(row, 6)?,
        actor_name: get(row, 7)?,
        ip: get(row, 8)?,
        request_id: get(row, 9)?,
        key_id: get(row, 10)?,
        account_id: get(row, 11)?,
        details: get(row, 12)?,
        prev_hash: get(row, 13)?,
        hash: get(row, 14)?,
    }
    .into_event()
}

/// See `KeyStore::events`.
pub(super) async fn events(
    conn: &mut PgConnection,
    s: &str,
    q: &EventQuery,
) -> Result<Vec<AuditEvent>, StoreError> {
    let ids: Option<Vec<&str>> = q
        .key_ids
        .as_ref()
        .map(|ids| ids.iter().map(KeyId::as_str).collect());
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM {s}.api_key_events WHERE owner_id = $1 \
         AND ($2::text[] IS NULL OR key_id = ANY($2)) AND ($3::text IS NULL OR type = $3) \
         AND ($4::timestamptz IS NULL OR at >= $4) AND ($5::timestamptz IS NULL OR at < $5) \
         AND ($6::bigint IS NULL OR seq < $6) ORDER BY seq DESC LIMIT $7"
    )))
    .bind(&q.owner)
    .bind(ids)
    .bind(q.event_type.as_ref().map(EventType::as_str))
    .bind(q.since.map(micros))
    .bind(q.until.map(micros))
    .bind(q.before_seq.map(|s| s.min(i64::MAX as u64) as i64))
    .bind(i64::from(q.limit))
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// See `KeyStore::chain_events`.
pub(super) async fn chain_events(
    conn: &mut PgConnection,
    s: &str,
    owner: &str,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditEvent>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM {s}.api_key_events WHERE owner_id = $1 AND seq > $2 \
         ORDER BY seq LIMIT $3"
    )))
    .bind(owner)
    .bind(after_seq.min(i64::MAX as u64) as i64)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    rows.iter().map(decode).collect()
}

/// See `KeyStore::purge_events`: inside the caller's transaction, one owner at a time with its
/// chain head locked.
pub(super) async fn purge_events(
    conn: &mut PgConnection,
    s: &str,
    before: OffsetDateTime,
) -> Result<u64, StoreError> {
    let before = micros(before);
    let owners: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT owner_id FROM {s}.api_key_events WHERE at < $1"
    )))
    .bind(before)
    .fetch_all(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    let mut removed = 0;
    for owner in owners {
        read_chain(conn, s, &owner, true).await?;
        // Everything below the first event not older than `before` (all, if none is).
        let last = sqlx::query(AssertSqlSafe(format!(
            "SELECT seq, hash FROM {s}.api_key_events WHERE owner_id = $1 AND seq < \
             COALESCE((SELECT min(seq) FROM {s}.api_key_events WHERE owner_id = $1 AND at >= $2), \
                      9223372036854775807) ORDER BY seq DESC LIMIT 1"
        )))
        .bind(&owner)
        .bind(before)
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        let Some(last) = last else { continue };
        let (seq, hash): (i64, String) = (get(&last, 0)?, get(&last, 1)?);
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {s}.api_key_events WHERE owner_id = $1 AND seq <= $2"
        )))
        .bind(&owner)
        .bind(seq)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_event_chains SET anchor_seq = $2, anchor_hash = $3 \
             WHERE owner_id = $1"
        )))
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

/// See `KeyStore::record_usage`: one statement for the batch (summed per key and hour first, so
/// that no row is touched twice).
pub(super) async fn record_usage(
    conn: &mut PgConnection,
    s: &str,
    buckets: &[UsageBucket],
) -> Result<(), StoreError> {
    let mut merged: std::collections::BTreeMap<(&str, i64), UsageBucket> = Default::default();
    for b in buckets {
        merged
            .entry((b.key_id.as_str(), b.hour.unix_timestamp()))
            .and_modify(|m| m.merge(b))
            .or_insert_with(|| b.clone());
    }
    let ids: Vec<&str> = merged.keys().map(|k| k.0).collect();
    let hours: Vec<OffsetDateTime> = merged.values().map(|b| b.hour).collect();
    let count = |i: usize| -> Vec<i64> {
        merged
            .values()
            .map(|b| b.counts[i].min(i64::MAX as u64) as i64)
            .collect()
    };
    let ips: Vec<Option<String>> = merged
        .values()
        .map(|b| b.last_ip.map(|ip| ip.to_string()))
        .collect();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.api_key_usage AS u (key_id, hour, admitted, invalid, expired_or_revoked, \
         missing_scope, rate_limited, out_of_credits, network, last_ip) \
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[], \
           $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[]) \
         ON CONFLICT (key_id, hour) DO UPDATE SET \
         admitted = u.admitted + excluded.admitted, invalid = u.invalid + excluded.invalid, \
         expired_or_revoked = u.expired_or_revoked + excluded.expired_or_revoked, \
         missing_scope = u.missing_scope + excluded.missing_scope, \
         rate_limited = u.rate_limited + excluded.rate_limited, \
         out_of_credits = u.out_of_credits + excluded.out_of_credits, \
         network = u.network + excluded.network, \
         last_ip = COALESCE(excluded.last_ip, u.last_ip)"
    )))
    .bind(ids)
    .bind(hours)
    .bind(count(0))
    .bind(count(1))
    .bind(count(2))
    .bind(count(3))
    .bind(count(4))
    .bind(count(5))
    .bind(count(6))
    .bind(ips)
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(())
}

/// See `KeyStore::usage`.
pub(super) async fn usage(
    conn: &mut PgConnection,
    s: &str,
    key_id: &KeyId,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<UsageBucket>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT hour, admitted, invalid, expired_or_revoked, missing_scope, rate_limited, \
         out_of_credits, network, last_ip FROM {s}.api_key_usage \
         WHERE key_id = $1 AND hour >= $2 AND hour < $3 ORDER BY hour"
    )))
    .bind(key_id.as_str())
    .bind(from)
    .bind(to)
    .fetch_all(&mut *conn)
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
                key_id: key_id.clone(),
                hour: get(row, 0)?,
                counts,
                last_ip: ip.and_then(|ip| ip.parse().ok()),
            })
        })
        .collect()
}

/// See `KeyStore::purge_usage`.
pub(super) async fn purge_usage(
    conn: &mut PgConnection,
    s: &str,
    before: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {s}.api_key_usage WHERE hour < $1"
    )))
    .bind(before)
    .execute(&mut *conn)
    .await
    .map_err(map_sqlx_error)?;
    Ok(done.rows_affected())
}
