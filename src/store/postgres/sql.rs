//! The SQL of [`PostgresStore`](super::store::PostgresStore): identifiers, migrations, every statement
//! with the schema spliced in once, and row decoding.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};

use crate::limits::UsageLimits;
use crate::record::KeyRecord;
use crate::store::StoreError;
use crate::store::sql_common::{LimitColumns, RawRecord, map_sqlx_error};

/// A schema or channel name that is not a plain PostgreSQL identifier: 1 to 63 bytes of ASCII
/// letters, digits, `_` or `$`, not starting with a digit or `$`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidIdentifier {
    what: &'static str,
}

impl fmt::Display for InvalidIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid PostgreSQL {} name: use 1 to 63 ASCII letters, digits, `_` or `$`, \
             not starting with a digit or `$`",
            self.what
        )
    }
}

impl std::error::Error for InvalidIdentifier {}

/// Checks a name for use as a (quoted) identifier; `what` names it in the error.
pub(crate) fn check_identifier(name: &str, what: &'static str) -> Result<(), InvalidIdentifier> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$');
    if ok {
        Ok(())
    } else {
        Err(InvalidIdentifier { what })
    }
}

/// A stable 64-bit advisory lock key for `parts` (the same in every instance and every version).
pub(super) fn lock_key(parts: &[&str]) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(b"tower-api-keys");
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    i64::from_be_bytes(first)
}

pub(super) const COLUMNS: &str = "id, name, owner, account, scopes, digest, digest_scheme, masked_key, \
    created_at, expires_at, revoked_at, last_used_at, created_by, rotated_at, previous_digest, \
    previous_digest_scheme, previous_valid_until, rate_limit, rate_period_seconds, \
    credits_remaining, credits_refill_interval, credits_refill_amount, credits_set_at, \
    allowed_networks";

/// The usage-limit columns of `api_keys` and `api_key_pools`, in the order [`decode_limits`]
/// reads them.
pub(super) const LIMIT_COLUMNS: &str = "rate_limit, rate_period_seconds, credits_remaining, \
    credits_refill_interval, credits_refill_amount, credits_set_at";

/// The schema's migrations, in order. Versions are never renumbered or edited once released.
pub(super) fn migrations(s: &str) -> [(i32, &'static str, String); 8] {
    [
        (
            1,
            "api_keys and api_key_digests",
            format!(
                r#"
CREATE TABLE {s}.api_keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    account TEXT NOT NULL,
    scopes TEXT[] NOT NULL,
    digest BYTEA NOT NULL CHECK (octet_length(digest) = 32),
    digest_scheme INTEGER NOT NULL,
    masked_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    created_by TEXT,
    rotated_at TIMESTAMPTZ,
    previous_digest BYTEA CHECK (octet_length(previous_digest) = 32),
    previous_digest_scheme INTEGER,
    previous_valid_until TIMESTAMPTZ,
    CHECK ((previous_digest IS NULL) = (previous_digest_scheme IS NULL)
       AND (previous_digest IS NULL) = (previous_valid_until IS NULL))
);
CREATE UNIQUE INDEX api_keys_digest_key ON {s}.api_keys (digest);
CREATE UNIQUE INDEX api_keys_previous_digest_key ON {s}.api_keys (previous_digest)
    WHERE previous_digest IS NOT NULL;
CREATE INDEX api_keys_owner_id_idx ON {s}.api_keys (owner, id);
CREATE INDEX api_keys_account_idx ON {s}.api_keys (account);
CREATE TABLE {s}.api_key_digests (
    digest BYTEA PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL REFERENCES {s}.api_keys (id) ON DELETE CASCADE
);
CREATE INDEX api_key_digests_key_id_idx ON {s}.api_key_digests (key_id);
"#
            ),
        ),
        (
            2,
            "api_keys.created_by index (cascading revocation)",
            format!(
                "CREATE INDEX api_keys_created_by_idx ON {s}.api_keys (created_by) \
                 WHERE created_by IS NOT NULL;"
            ),
        ),
        (
            3,
            "api_key_format and api_key_format_secrets (keyed key format)",
            format!(
                r#"
CREATE TABLE {s}.api_key_format (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    legacy_keys BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE {s}.api_key_format_secrets (
    version INTEGER PRIMARY KEY CHECK (version BETWEEN 1 AND 61),
    secret BYTEA NOT NULL CHECK (octet_length(secret) >= 32),
    created_at TIMESTAMPTZ NOT NULL,
    retired_at TIMESTAMPTZ
);
"#
            ),
        ),
        (
            4,
            "per-key rate limits and credits",
            // Existing keys get NULLs: no limit.
            format!(
                r#"
ALTER TABLE {s}.api_keys
    ADD COLUMN rate_limit BIGINT,
    ADD COLUMN rate_period_seconds BIGINT,
    ADD COLUMN credits_remaining BIGINT,
    ADD COLUMN credits_refill_interval TEXT,
    ADD COLUMN credits_refill_amount BIGINT,
    ADD COLUMN credits_set_at TIMESTAMPTZ;
"#
            ),
        ),
        (
            5,
            "allowed networks and shared pools (containment)",
            // Existing keys get NULL: usable from anywhere. A pool is an owner's (`kind` 'owner',
            // `account` '') or one account's; its limit columns are those of `api_keys`.
            format!(
                r#"
ALTER TABLE {s}.api_keys ADD COLUMN allowed_networks TEXT;
CREATE TABLE {s}.api_key_pools (
    owner TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL CHECK (kind IN ('owner', 'account')),
    account TEXT COLLATE "C" NOT NULL,
    rate_limit BIGINT,
    rate_period_seconds BIGINT,
    credits_remaining BIGINT,
    credits_refill_interval TEXT,
    credits_refill_amount BIGINT,
    credits_set_at TIMESTAMPTZ,
    CHECK (kind = 'account' OR account = ''),
    PRIMARY KEY (owner, kind, account)
);
"#
            ),
        ),
        (
            6,
            "audit events (hash-chained per owner) and hourly usage counts",
            super::audit::migration(s),
        ),
        (
            7,
            "hygiene notices (the sweeper's memory)",
            // One row per notice given about a key: the primary key makes the write
            // insert-if-absent, so two sweepers never give the same notice twice.
            format!(
                r#"
CREATE TABLE IF NOT EXISTS {s}.api_key_notices (
    key_id TEXT COLLATE "C" NOT NULL,
    notice TEXT COLLATE "C" NOT NULL,
    noticed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_id, notice)
);
"#
            ),
        ),
        (
            8,
            "webhook endpoints and their outbox",
            // Written by every build; filled by `outbox::enqueue` in the transaction of each
            // audit event.
            webhooks_migration(s),
        ),
    ]
}

/// Migration 8: webhook endpoints (`events` the subscribed types) and their deliveries, leased
/// to one deliverer at a time (`lease_until`, `lease_token`).
fn webhooks_migration(s: &str) -> String {
    format!(
        r#"
CREATE TABLE IF NOT EXISTS {s}.api_key_webhooks (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner_id TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT[] NOT NULL,
    secret TEXT NOT NULL,
    registered_by TEXT,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS api_key_webhooks_owner ON {s}.api_key_webhooks (owner_id, id);
CREATE TABLE IF NOT EXISTS {s}.api_key_webhook_deliveries (
    id TEXT COLLATE "C" PRIMARY KEY,
    webhook_id TEXT COLLATE "C" NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    last_attempt_at TIMESTAMPTZ,
    next_attempt_at TIMESTAMPTZ,
    delivered_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL DEFAULT 'epoch',
    lease_token TEXT
);
CREATE INDEX IF NOT EXISTS api_key_webhook_deliveries_due ON {s}.api_key_webhook_deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS api_key_webhook_deliveries_webhook ON {s}.api_key_webhook_deliveries (webhook_id, id);
"#
    )
}

/// Every statement, with the schema spliced in once (the schema name is a checked identifier).
pub(super) struct Sql {
    pub(super) schema: String,
    pub(super) quoted: String,
    pub(super) find_by_digest: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) get_for_update: Arc<str>,
    pub(super) list: Arc<str>,
    pub(super) exists: Arc<str>,
    pub(super) creator_active: Arc<str>,
    pub(super) revoke_descendants: Arc<str>,
    pub(super) count_owner: Arc<str>,
    pub(super) count_account: Arc<str>,
    pub(super) count_active: Arc<str>,
    pub(super) insert: Arc<str>,
    pub(super) insert_digests: Arc<str>,
    pub(super) revoke: Arc<str>,
    pub(super) delete: Arc<str>,
    pub(super) drop_digests: Arc<str>,
    pub(super) rotate: Arc<str>,
    pub(super) last_used: Arc<str>,
    pub(super) write_limits: Arc<str>,
    pub(super) ancestors: Arc<str>,
    pub(super) descendants: Arc<str>,
    pub(super) budget_above: Arc<str>,
    pub(super) pool: Arc<str>,
    pub(super) pool_insert: Arc<str>,
    pub(super) pool_upsert: Arc<str>,
    pub(super) pool_delete: Arc<str>,
    pub(super) lock_key_credits: Arc<str>,
    pub(super) lock_pool_credits: Arc<str>,
    pub(super) write_key_credits: Arc<str>,
    pub(super) write_pool_credits: Arc<str>,
}

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let sql = |text: String| -> Arc<str> { text.into() };
        // Every descendant of the key `$1`: shared by the cascades and `descendants`.
        let tree = format!(
            "WITH RECURSIVE tree(id) AS ( \
                SELECT id FROM {s}.api_keys WHERE created_by = $1 \
                UNION SELECT k.id FROM {s}.api_keys AS k JOIN tree ON k.created_by = tree.id) "
        );
        // The key `seed` at depth 1 and its creators up to depth `$2`; stops at a creator that
        // is gone. Shared by `ancestors` and `budget_above`.
        let chain = |seed: &str| {
            format!(
                "WITH RECURSIVE chain(cid, parent, depth) AS ( \
                    SELECT id, created_by, 1 FROM {s}.api_keys WHERE id = {seed} \
                    UNION ALL SELECT k.id, k.created_by, c.depth + 1 FROM {s}.api_keys AS k \
                    JOIN chain AS c ON k.id = c.parent WHERE c.depth < $2) "
            )
        };
        let pool_upsert_tail = "DO UPDATE SET rate_limit = excluded.rate_limit, \
            rate_period_seconds = excluded.rate_period_seconds, \
            credits_remaining = excluded.credits_remaining, \
            credits_refill_interval = excluded.credits_refill_interval, \
            credits_refill_amount = excluded.credits_refill_amount, \
            credits_set_at = excluded.credits_set_at";
        let pool_insert = |tail: &str| {
            format!(
                "INSERT INTO {s}.api_key_pools (owner, kind, account, {LIMIT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (owner, kind, account) {tail}"
            )
        };
        Self {
            ancestors: sql(format!(
                "{}SELECT {COLUMNS} FROM chain JOIN {s}.api_keys AS k ON k.id = chain.cid \
                 ORDER BY chain.depth",
                chain(&format!(
                    "(SELECT created_by FROM {s}.api_keys WHERE id = $1)"
                ))
            )),
            descendants: sql(format!(
                "{tree}SELECT {COLUMNS} FROM {s}.api_keys WHERE id IN (SELECT id FROM tree)"
            )),
            // The ancestors (depth 1 up), then the account pool, then the owner pool.
            budget_above: sql(format!(
                "{}SELECT 'key', chain.cid, chain.depth, {LIMIT_COLUMNS} \
                 FROM chain JOIN {s}.api_keys AS k ON k.id = chain.cid \
                 UNION ALL SELECT kind, account, \
                   CASE kind WHEN 'account' THEN $2 + 1 ELSE $2 + 2 END, {LIMIT_COLUMNS} \
                 FROM {s}.api_key_pools WHERE owner = $3 AND (kind = 'owner' OR account = $4) \
                 ORDER BY 3",
                chain("$1")
            )),
            pool: sql(format!(
                "SELECT {LIMIT_COLUMNS} FROM {s}.api_key_pools \
                 WHERE owner = $1 AND kind = $2 AND account = $3"
            )),
            pool_insert: sql(pool_insert("DO NOTHING")),
            pool_upsert: sql(pool_insert(pool_upsert_tail)),
            pool_delete: sql(format!(
                "DELETE FROM {s}.api_key_pools WHERE owner = $1 AND kind = $2 AND account = $3"
            )),
            // Rows locked in one order (keys by id, then pools by their key), so that concurrent
            // chains never wait on each other in a cycle. Credits are not key columns: NO KEY
            // UPDATE leaves digest inserts referencing the key alone.
            lock_key_credits: sql(format!(
                "SELECT k.id, {LIMIT_COLUMNS} FROM {s}.api_keys AS k WHERE k.id = ANY($1) \
                 ORDER BY k.id FOR NO KEY UPDATE OF k"
            )),
            lock_pool_credits: sql(format!(
                "SELECT p.owner, p.kind, p.account, {LIMIT_COLUMNS} FROM {s}.api_key_pools AS p \
                 JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS u(owner, kind, account) \
                   ON p.owner = u.owner AND p.kind = u.kind AND p.account = u.account \
                 ORDER BY p.owner, p.kind, p.account FOR NO KEY UPDATE OF p"
            )),
            write_key_credits: sql(format!(
                "UPDATE {s}.api_keys AS k SET credits_remaining = u.remaining, credits_set_at = u.set_at \
                 FROM UNNEST($1::text[], $2::bigint[], $3::timestamptz[]) AS u(id, remaining, set_at) \
                 WHERE k.id = u.id"
            )),
            write_pool_credits: sql(format!(
                "UPDATE {s}.api_key_pools AS p SET credits_remaining = u.remaining, credits_set_at = u.set_at \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[]) \
                   AS u(owner, kind, account, remaining, set_at) \
                 WHERE p.owner = u.owner AND p.kind = u.kind AND p.account = u.account"
            )),
            find_by_digest: sql(format!(
                // Two unique-index lookups: an `OR` with `LIMIT 1` may be planned as a sequential
                // scan (cheap for a hit near the start, slow for every miss) before statistics exist.
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE digest = $1 \
                 UNION ALL SELECT {COLUMNS} FROM {s}.api_keys WHERE previous_digest = $1 LIMIT 1"
            )),
            get: sql(format!("SELECT {COLUMNS} FROM {s}.api_keys WHERE id = $1")),
            get_for_update: sql(format!(
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE id = $1 FOR UPDATE"
            )),
            list: sql(format!(
                "SELECT {COLUMNS} FROM {s}.api_keys WHERE owner = $1 AND ($2::text IS NULL OR id < $2) \
                 AND ($4::text IS NULL OR account = $4) ORDER BY id DESC LIMIT $3"
            )),
            exists: sql(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.api_keys WHERE id = $1) \
                 OR EXISTS (SELECT 1 FROM {s}.api_key_digests WHERE digest = ANY($2))"
            )),
            // FOR SHARE: a concurrent revocation (an UPDATE) of the creator waits for this insert
            // to commit, or this insert waits for it and then sees the creator revoked.
            creator_active: sql(format!(
                "SELECT 1 FROM {s}.api_keys WHERE id = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2) FOR SHARE"
            )),
            revoke_descendants: sql(format!(
                "{tree}UPDATE {s}.api_keys SET revoked_at = $2 \
                 WHERE revoked_at IS NULL AND id IN (SELECT id FROM tree) RETURNING {COLUMNS}"
            )),
            count_owner: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE owner = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2)"
            )),
            count_account: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE account = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2)"
            )),
            count_active: sql(format!(
                "SELECT count(*) FROM {s}.api_keys WHERE owner = $1 \
                 AND ($2::text IS NULL OR account = $2) AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $3)"
            )),
            insert: sql(format!(
                "INSERT INTO {s}.api_keys ({COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18, $19, $20, $21, $22, $23, $24)"
            )),
            insert_digests: sql(format!(
                "INSERT INTO {s}.api_key_digests (digest, key_id) SELECT d, $2 FROM UNNEST($1::bytea[]) AS t(d)"
            )),
            revoke: sql(format!(
                "UPDATE {s}.api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING {COLUMNS}"
            )),
            delete: sql(format!(
                "DELETE FROM {s}.api_keys WHERE id = $1 RETURNING {COLUMNS}"
            )),
            drop_digests: sql(format!(
                "DELETE FROM {s}.api_key_digests WHERE key_id = $1 AND NOT (digest = ANY($2::bytea[]))"
            )),
            rotate: sql(format!(
                "UPDATE {s}.api_keys SET digest = $2, digest_scheme = $3, masked_key = $4, rotated_at = $5, \
                 previous_digest = $6, previous_digest_scheme = $7, previous_valid_until = $8 \
                 WHERE id = $1 RETURNING {COLUMNS}"
            )),
            last_used: sql(format!(
                "UPDATE {s}.api_keys AS k SET last_used_at = u.at \
                 FROM (SELECT id, max(at) AS at FROM UNNEST($1::text[], $2::timestamptz[]) AS t(id, at) \
                       GROUP BY id) AS u \
                 WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)"
            )),
            write_limits: sql(format!(
                "UPDATE {s}.api_keys SET name = $2, rate_limit = $3, rate_period_seconds = $4, \
                 credits_remaining = $5, credits_refill_interval = $6, credits_refill_amount = $7, \
                 credits_set_at = $8 WHERE id = $1"
            )),
            schema: schema.to_owned(),
            quoted: s,
        }
    }
}

pub(super) fn query(
    sql: &Arc<str>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

pub(super) fn decode(row: &PgRow) -> Result<KeyRecord, StoreError> {
    let raw = (|| -> Result<RawRecord, sqlx::Error> {
        Ok(RawRecord {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            owner: row.try_get(2)?,
            account: row.try_get(3)?,
            scopes: row.try_get(4)?,
            digest: row.try_get(5)?,
            digest_scheme: i64::from(row.try_get::<i32, _>(6)?),
            masked_key: row.try_get(7)?,
            created_at: row.try_get(8)?,
            expires_at: row.try_get(9)?,
            revoked_at: row.try_get(10)?,
            last_used_at: row.try_get(11)?,
            created_by: row.try_get(12)?,
            rotated_at: row.try_get(13)?,
            previous_digest: row.try_get(14)?,
            previous_digest_scheme: row.try_get::<Option<i32>, _>(15)?.map(i64::from),
            previous_valid_until: row.try_get(16)?,
            limits: decode_limits(row, 17)?,
            allowed_networks: row.try_get(23)?,
        })
    })()
    .map_err(map_sqlx_error)?;
    raw.into_record()
}

/// The [`LIMIT_COLUMNS`] starting at column `at`.
pub(super) fn decode_limits(row: &PgRow, at: usize) -> Result<LimitColumns, sqlx::Error> {
    Ok(LimitColumns {
        rate_limit: row.try_get(at)?,
        rate_period_seconds: row.try_get(at + 1)?,
        credits_remaining: row.try_get(at + 2)?,
        credits_refill_interval: row.try_get(at + 3)?,
        credits_refill_amount: row.try_get(at + 4)?,
        credits_set_at: row.try_get(at + 5)?,
    })
}

/// The limits read at column `at` of `row`, validated.
pub(super) fn limits_at(row: &PgRow, at: usize) -> Result<UsageLimits, StoreError> {
    decode_limits(row, at)
        .map_err(map_sqlx_error)?
        .into_limits()
}

pub(super) fn decode_opt(row: Option<PgRow>) -> Result<Option<KeyRecord>, StoreError> {
    row.as_ref().map(decode).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        for good in ["a", "tower_api_keys", "_x1", "T$1", &"a".repeat(63)] {
            assert!(check_identifier(good, "schema").is_ok(), "{good}");
        }
        for bad in ["", "1a", "$a", "a-b", "a\"b", "a b", "é", &"a".repeat(64)] {
            assert!(check_identifier(bad, "schema").is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_keys_are_stable_and_unambiguous() {
        assert_eq!(
            lock_key(&["owner", "s", "o"]),
            lock_key(&["owner", "s", "o"])
        );
        assert_ne!(
            lock_key(&["owner", "s", "ab"]),
            lock_key(&["owner", "sa", "b"])
        );
        assert_ne!(
            lock_key(&["owner", "s", "x"]),
            lock_key(&["account", "s", "x"])
        );
    }
}
