//! The SQL of [`SqliteStore`](super::store::SqliteStore): column lists and shared CTEs (as
//! macros, so that statements are `&'static str`), the migrations, row decoding.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use crate::record::KeyRecord;
use crate::store::sql_common::{LimitColumns, RawRecord, from_unix_micros, map_sqlx_error};
use crate::store::{StoreError, StoreErrorKind};

/// The columns of `api_keys`, in the order [`decode`] reads them.
macro_rules! columns {
    () => {
        "id, name, owner, account, scopes, digest, digest_scheme, masked_key, created_at, \
         expires_at, revoked_at, last_used_at, created_by, rotated_at, previous_digest, \
         previous_digest_scheme, previous_valid_until, rate_limit, rate_period_seconds, \
         credits_remaining, credits_refill_interval, credits_refill_amount, credits_set_at, \
         allowed_networks"
    };
}
pub(super) use columns;

/// The usage-limit columns of `api_keys` and `api_key_pools`, in the order [`decode_limits`]
/// reads them.
macro_rules! limit_columns {
    () => {
        "rate_limit, rate_period_seconds, credits_remaining, credits_refill_interval, \
         credits_refill_amount, credits_set_at"
    };
}
pub(super) use limit_columns;

/// The recursive CTE `tree(id)`: every descendant of the key `?1` (its subtree without itself).
/// Shared by the cascades and [`KeyStore::descendants`](crate::store::KeyStore::descendants).
macro_rules! descendant_tree {
    () => {
        "WITH RECURSIVE tree(id) AS ( \
            SELECT id FROM api_keys WHERE created_by = ?1 \
            UNION SELECT k.id FROM api_keys AS k JOIN tree ON k.created_by = tree.id) "
    };
}
pub(super) use descendant_tree;

/// The recursive CTE `chain(cid, parent, depth)`: the key `{seed}` at depth 1 and its creators
/// up to depth `?2` ([`MAX_DELEGATION_DEPTH`](crate::store::MAX_DELEGATION_DEPTH)); it stops where a creator is gone. Shared by
/// [`KeyStore::ancestors`](crate::store::KeyStore::ancestors) and
/// [`KeyStore::budget_above`](crate::store::KeyStore::budget_above).
macro_rules! ancestor_chain {
    ($seed:literal) => {
        concat!(
            "WITH RECURSIVE chain(cid, parent, depth) AS ( \
                SELECT id, created_by, 1 FROM api_keys WHERE id = ",
            $seed,
            " UNION ALL SELECT k.id, k.created_by, c.depth + 1 FROM api_keys AS k \
                JOIN chain AS c ON k.id = c.parent WHERE c.depth < ?2) "
        )
    };
}
pub(super) use ancestor_chain;

/// The schema's migrations, in order. Versions are never renumbered or edited once released.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "api_keys and api_key_digests",
        r#"
CREATE TABLE api_keys (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT NOT NULL,
    scopes TEXT NOT NULL,
    digest BLOB NOT NULL CHECK (length(digest) = 32),
    digest_scheme INTEGER NOT NULL,
    masked_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    created_by TEXT,
    rotated_at INTEGER,
    previous_digest BLOB CHECK (length(previous_digest) = 32),
    previous_digest_scheme INTEGER,
    previous_valid_until INTEGER,
    CHECK ((previous_digest IS NULL) = (previous_digest_scheme IS NULL)
       AND (previous_digest IS NULL) = (previous_valid_until IS NULL))
) STRICT;
CREATE UNIQUE INDEX api_keys_digest_key ON api_keys (digest);
CREATE UNIQUE INDEX api_keys_previous_digest_key ON api_keys (previous_digest)
    WHERE previous_digest IS NOT NULL;
CREATE INDEX api_keys_owner_id_idx ON api_keys (owner, id);
CREATE INDEX api_keys_account_idx ON api_keys (account);
CREATE TABLE api_key_digests (
    digest BLOB NOT NULL PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE
) STRICT;
CREATE INDEX api_key_digests_key_id_idx ON api_key_digests (key_id);
"#,
    ),
    (
        2,
        "api_keys.created_by index (cascading revocation)",
        "CREATE INDEX api_keys_created_by_idx ON api_keys (created_by) WHERE created_by IS NOT NULL;",
    ),
    (
        3,
        "api_key_format and api_key_format_secrets (keyed key format)",
        r#"
CREATE TABLE api_key_format (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    legacy_keys INTEGER NOT NULL CHECK (legacy_keys IN (0, 1)),
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE api_key_format_secrets (
    version INTEGER NOT NULL PRIMARY KEY CHECK (version BETWEEN 1 AND 61),
    secret BLOB NOT NULL CHECK (length(secret) >= 32),
    created_at INTEGER NOT NULL,
    retired_at INTEGER
) STRICT;
"#,
    ),
    (
        4,
        "per-key rate limits and credits",
        // Existing keys get NULLs: no limit.
        r#"
ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN rate_period_seconds INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_remaining INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_refill_interval TEXT;
ALTER TABLE api_keys ADD COLUMN credits_refill_amount INTEGER;
ALTER TABLE api_keys ADD COLUMN credits_set_at INTEGER;
"#,
    ),
    (
        5,
        "allowed networks and shared pools (containment)",
        // Existing keys get NULL: usable from anywhere. A pool is an owner's (`kind` 'owner',
        // `account` '') or one account's; its limit columns are those of `api_keys`.
        r#"
ALTER TABLE api_keys ADD COLUMN allowed_networks TEXT;
CREATE TABLE api_key_pools (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('owner', 'account')),
    account TEXT NOT NULL,
    rate_limit INTEGER,
    rate_period_seconds INTEGER,
    credits_remaining INTEGER,
    credits_refill_interval TEXT,
    credits_refill_amount INTEGER,
    credits_set_at INTEGER,
    CHECK (kind = 'account' OR account = ''),
    PRIMARY KEY (owner, kind, account)
) STRICT;
"#,
    ),
    (
        6,
        "audit events (hash-chained per owner) and hourly usage counts",
        super::audit::MIGRATION,
    ),
    (
        7,
        "hygiene notices (the sweeper's memory)",
        // One row per notice given about a key: the primary key makes the write insert-if-absent,
        // so two sweepers never give the same notice twice.
        r#"
CREATE TABLE IF NOT EXISTS api_key_notices (
    key_id TEXT NOT NULL,
    notice TEXT NOT NULL,
    noticed_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, notice)
) STRICT;
"#,
    ),
    (
        8,
        "webhook endpoints and their outbox",
        // Written by every build (the tables are the outbox even where the `webhooks` feature is
        // off); filled by `outbox::enqueue` in the transaction of each audit event.
        r#"
CREATE TABLE IF NOT EXISTS api_key_webhooks (
    id TEXT NOT NULL PRIMARY KEY,
    owner_id TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    registered_by TEXT,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS api_key_webhooks_owner ON api_key_webhooks (owner_id, id);
CREATE TABLE IF NOT EXISTS api_key_webhook_deliveries (
    id TEXT NOT NULL PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    last_attempt_at INTEGER,
    next_attempt_at INTEGER,
    delivered_at INTEGER,
    created_at INTEGER NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS api_key_webhook_deliveries_due ON api_key_webhook_deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS api_key_webhook_deliveries_webhook ON api_key_webhook_deliveries (webhook_id, id);
"#,
    ),
];

pub(super) fn decode(row: &SqliteRow) -> Result<KeyRecord, StoreError> {
    let time = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
        row.try_get::<Option<i64>, _>(i)
            .map_err(map_sqlx_error)?
            .map(from_unix_micros)
            .transpose()
    };
    let text = |i: usize| row.try_get::<String, _>(i).map_err(map_sqlx_error);
    let scopes: Vec<String> =
        serde_json::from_str(&text(4)?).map_err(|e| StoreError::new(StoreErrorKind::Corrupt, e))?;
    let created_at = time(8)?.ok_or_else(|| StoreError::from_kind(StoreErrorKind::Corrupt))?;
    let raw = RawRecord {
        id: text(0)?,
        name: text(1)?,
        owner: text(2)?,
        account: text(3)?,
        scopes,
        digest: row.try_get(5).map_err(map_sqlx_error)?,
        digest_scheme: row.try_get(6).map_err(map_sqlx_error)?,
        masked_key: text(7)?,
        created_at,
        expires_at: time(9)?,
        revoked_at: time(10)?,
        last_used_at: time(11)?,
        created_by: row.try_get(12).map_err(map_sqlx_error)?,
        rotated_at: time(13)?,
        previous_digest: row.try_get(14).map_err(map_sqlx_error)?,
        previous_digest_scheme: row.try_get(15).map_err(map_sqlx_error)?,
        previous_valid_until: time(16)?,
        limits: decode_limits(row, 17)?,
        allowed_networks: row.try_get(23).map_err(map_sqlx_error)?,
    };
    raw.into_record()
}

/// The six [`limit_columns`] starting at column `at`.
pub(super) fn decode_limits(row: &SqliteRow, at: usize) -> Result<LimitColumns, StoreError> {
    let get = |i: usize| {
        row.try_get::<Option<i64>, _>(at + i)
            .map_err(map_sqlx_error)
    };
    Ok(LimitColumns {
        rate_limit: get(0)?,
        rate_period_seconds: get(1)?,
        credits_remaining: get(2)?,
        credits_refill_interval: row.try_get(at + 3).map_err(map_sqlx_error)?,
        credits_refill_amount: get(4)?,
        credits_set_at: get(5)?.map(from_unix_micros).transpose()?,
    })
}

pub(super) fn decode_opt(row: Option<SqliteRow>) -> Result<Option<KeyRecord>, StoreError> {
    row.as_ref().map(decode).transpose()
}
