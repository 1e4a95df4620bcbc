//! [`SqliteStore`] and its [`KeyStore`] implementation.

use std::fmt;
use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::audit;
use super::sql::{
    ancestor_chain, columns, decode, decode_limits, decode_opt, descendant_tree, limit_columns,
};
use crate::audit::{AuditEvent, ChainState, EventDraft, EventQuery, Journal};
use crate::key::{FormatSecret, KeyDigest, KeyId, MAX_SECRET_VERSION};
use crate::quota::{BudgetId, BudgetLevel, Credits, PoolId, UsageLimits};
use crate::store::credits::{ChainLevels, ChainSpend, CreditAdjustment};
use crate::store::error::{StoreError, StoreErrorKind};
use crate::store::format::{FormatSecrets, StoredSecret};
use crate::store::key_store::KeyStore;
use crate::store::params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
use crate::store::record::{KeyChange, KeyRecord, MAX_DELEGATION_DEPTH};
use crate::store::sql_common::{
    LimitColumns, from_unix_micros, map_sqlx_error, micros, networks_text, pool_key, to_unix_micros,
};
use crate::usage::UsageBucket;

/// A [`KeyStore`] in a SQLite database: persistent, embedded, for one host.
///
/// Cheap to clone (clones share the pool). Several stores (or processes) may open the same file;
/// limits stay exact because checked writes are serialised by SQLite.
///
/// ```no_run
/// use tower_api_keys::resolver::CachedResolver;
/// use tower_api_keys::store::SqliteStore;
///
/// # async fn run() -> Result<(), tower_api_keys::store::StoreError> {
/// // `mode=rwc` creates the file if missing; the schema is migrated at start-up.
/// let store = SqliteStore::connect("sqlite://keys.db?mode=rwc").await?;
/// let resolver = CachedResolver::new(store.clone());
/// # let _ = resolver;
/// # Ok(())
/// # }
/// ```
///
/// # Layout
/// - `api_keys` (a `STRICT` table): digests are 32-byte `BLOB`s next to their scheme version
///   (`digest_scheme`, and `previous_digest_scheme` for a rotation grace period); scopes are a JSON
///   array of strings in the set's sorted order; timestamps are `INTEGER` microseconds since the Unix
///   epoch (UTC). No plaintext secret is stored.
/// - `api_key_digests`: every digest currently identifying a key, primary-keyed on the digest.
/// - `api_key_pools`: the shared pools ([`KeyStore::set_pool`]), keyed by owner, `kind` (`owner`
///   or `account`) and account (empty for an owner's pool), with the usage-limit columns of
///   `api_keys`. A key's `allowed_networks` is a nullable `TEXT` of CIDR blocks separated by spaces.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Writes that check before they write (limits, conflicts, rotation) run in `BEGIN IMMEDIATE`
///   transactions, which SQLite serialises across every connection and process using the file:
///   concurrent inserts never overshoot a limit.
/// - [`KeyStore::spend_credits`] and [`KeyStore::refund_credits`] read and write every level of a
///   chain in one `BEGIN IMMEDIATE` transaction: all or nothing, never more than there is.
/// - Timestamps are floored to the microsecond when written and when compared, like
///   `PostgresStore`.
/// - File databases are switched to WAL mode by [`SqliteStore::connect`], so readers do not wait for
///   writers. Busy connections wait up to 5 s (sqlx's `busy_timeout`) before failing.
#[derive(Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    pub(super) migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Seals `events` onto their owners' chains and writes them on `conn`, inside the caller's
    /// transaction, with their outbox rows: how the webhooks' changes write their events.
    #[cfg(feature = "webhooks")]
    pub(crate) async fn append_in(
        conn: &mut SqliteConnection,
        events: Vec<EventDraft>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        audit::append(conn, events).await
    }

    /// A transaction holding SQLite's write lock from its first statement.
    pub(crate) async fn begin_immediate(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_sqlx_error)
    }

    async fn register_digests<'a>(
        conn: &mut SqliteConnection,
        id: &KeyId,
        digests: impl Iterator<Item = &'a KeyDigest>,
    ) -> Result<(), StoreError> {
        for digest in digests {
            sqlx::query("INSERT INTO api_key_digests (digest, key_id) VALUES (?1, ?2)")
                .bind(&digest.as_bytes()[..])
                .bind(id.as_str())
                .execute(&mut *conn)
                .await
                .map_err(map_sqlx_error)?;
        }
        Ok(())
    }

    /// The record `id`, read on `conn` (inside the caller's transaction). `None`: no such key.
    async fn fetch(
        conn: &mut SqliteConnection,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    /// Revokes, at `at`, every descendant of `root` not revoked yet; returns those it revoked.
    /// Runs inside the caller's `BEGIN IMMEDIATE` transaction, so no insert interleaves.
    async fn revoke_descendants(
        conn: &mut SqliteConnection,
        root: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            descendant_tree!(),
            "UPDATE api_keys SET revoked_at = ?2 \
             WHERE revoked_at IS NULL AND id IN (SELECT id FROM tree) RETURNING ",
            columns!(),
            ""
        ))
        .bind(root.as_str())
        .bind(to_unix_micros(at))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }
}

fn scopes_json(record: &KeyRecord) -> String {
    serde_json::Value::from(record.scopes.to_strings()).to_string()
}

#[async_trait::async_trait]
impl KeyStore for SqliteStore {
    async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        // Two unique-index lookups, whatever the planner's statistics say.
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE digest = ?1 UNION ALL SELECT ",
            columns!(),
            " FROM api_keys WHERE previous_digest = ?1 LIMIT 1"
        ))
        .bind(&digest.as_bytes()[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn sweep(&self, q: &SweepQuery) -> Result<Vec<KeyRecord>, StoreError> {
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
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn record_notice(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO api_key_notices (key_id, notice, noticed_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.as_str())
        .bind(notice)
        .bind(to_unix_micros(at))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_notice_with(
        &self,
        id: &KeyId,
        notice: &str,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let done = sqlx::query(
            "INSERT INTO api_key_notices (key_id, notice, noticed_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.as_str())
        .bind(notice)
        .bind(to_unix_micros(at))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let fresh = done.rows_affected() == 1;
        if fresh {
            audit::append(&mut tx, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(fresh)
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        decode_opt(row)
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<KeyRecord>, StoreError> {
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
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn count_active(
        &self,
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
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        Ok(active.max(0) as u64)
    }

    async fn insert(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.insert_with(record, limits, now, &Journal::none())
            .await
    }

    async fn insert_with(
        &self,
        record: &KeyRecord,
        limits: KeyLimits,
        now: OffsetDateTime,
        journal: &Journal,
    ) -> Result<(), StoreError> {
        let now = to_unix_micros(now);
        let mut tx = self.begin_immediate().await?;
        let mut conflict: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1)")
                .bind(record.id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        for digest in record.digests() {
            conflict |= sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM api_key_digests WHERE digest = ?1)",
            )
            .bind(&digest.as_bytes()[..])
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        }
        if conflict {
            return Err(StoreError::from_kind(StoreErrorKind::Conflict));
        }
        if let Some(creator) = &record.created_by {
            let active: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2))",
            )
            .bind(creator.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            if !active {
                return Err(StoreError::from_kind(StoreErrorKind::CreatorInactive));
            }
        }
        for (limit, sql, value, scope) in [
            (
                limits.per_owner,
                "SELECT count(*) FROM api_keys WHERE owner = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2)",
                &record.owner,
                "owner",
            ),
            (
                limits.per_account,
                "SELECT count(*) FROM api_keys WHERE account = ?1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?2)",
                &record.account,
                "account",
            ),
        ] {
            let Some(limit) = limit else { continue };
            let active: i64 = sqlx::query_scalar(sql)
                .bind(value.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            if active >= i64::from(limit) {
                return Err(StoreError::from_kind(StoreErrorKind::LimitReached {
                    limit,
                    scope,
                }));
            }
        }
        let previous = record.previous.as_ref();
        let limits_columns = LimitColumns::of(&record.limits);
        sqlx::query(concat!(
            "INSERT INTO api_keys (",
            columns!(),
            ") VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
        ))
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(record.owner.as_str())
        .bind(record.account.as_str())
        .bind(scopes_json(record))
        .bind(&record.digest.as_bytes()[..])
        .bind(i64::from(record.digest_scheme.version()))
        .bind(record.masked_key.as_str())
        .bind(to_unix_micros(record.created_at))
        .bind(record.expires_at.map(to_unix_micros))
        .bind(record.revoked_at.map(to_unix_micros))
        .bind(record.last_used_at.map(to_unix_micros))
        .bind(record.created_by.as_ref().map(KeyId::as_str))
        .bind(record.rotated_at.map(to_unix_micros))
        .bind(previous.map(|p| p.digest.as_bytes().to_vec()))
        .bind(previous.map(|p| i64::from(p.digest_scheme.version())))
        .bind(previous.map(|p| to_unix_micros(p.valid_until)))
        .bind(limits_columns.rate_limit)
        .bind(limits_columns.rate_period_seconds)
        .bind(limits_columns.credits_remaining)
        .bind(limits_columns.credits_refill_interval)
        .bind(limits_columns.credits_refill_amount)
        .bind(limits_columns.credits_set_at.map(to_unix_micros))
        .bind(networks_text(record.allowed_networks.as_ref()))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        Self::register_digests(&mut tx, &record.id, record.digests()).await?;
        audit::append(&mut tx, journal.events().to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn revoke(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.revoke_with(id, at, &Journal::none()).await
    }

    async fn revoke_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let Some(before) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        let row = sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.as_str())
        .bind(to_unix_micros(at))
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = Self::revoke_descendants(&mut tx, id, at).await?;
        let change = KeyChange {
            before,
            after,
            revoked_descendants,
        };
        audit::append(&mut tx, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
    }

    async fn delete(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.delete_with(id, at, &Journal::none()).await
    }

    async fn delete_with(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        // Explicitly, rather than through ON DELETE CASCADE: a pool may have foreign keys off.
        sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let row = sqlx::query(concat!(
            "DELETE FROM api_keys WHERE id = ?1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let Some(before) = decode_opt(row)? else {
            return Ok(None);
        };
        let revoked_descendants = Self::revoke_descendants(&mut tx, id, at).await?;
        let change = KeyChange {
            before,
            after: None,
            revoked_descendants,
        };
        audit::append(&mut tx, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
    }

    async fn replace_secret(
        &self,
        id: &KeyId,
        rotation: &Rotation,
    ) -> Result<Option<KeyChange>, StoreError> {
        self.replace_secret_with(id, rotation, &Journal::none())
            .await
    }

    async fn replace_secret_with(
        &self,
        id: &KeyId,
        rotation: &Rotation,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let Some(old) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        if old.revoked_at.is_some() {
            return Err(StoreError::from_kind(StoreErrorKind::Revoked));
        }
        // Registering the new digest first fails on any digest in use, this key's included.
        Self::register_digests(&mut tx, id, std::iter::once(&rotation.digest)).await?;
        let previous = rotation
            .previous_valid_until
            .map(|until| (old.digest, old.digest_scheme, to_unix_micros(until)));
        for digest in old.digests() {
            if previous.as_ref().is_some_and(|(kept, _, _)| kept == digest) {
                continue;
            }
            sqlx::query("DELETE FROM api_key_digests WHERE key_id = ?1 AND digest = ?2")
                .bind(id.as_str())
                .bind(&digest.as_bytes()[..])
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        let row = sqlx::query(concat!("UPDATE api_keys SET digest = ?2, digest_scheme = ?3, masked_key = ?4, rotated_at = ?5, \
             previous_digest = ?6, previous_digest_scheme = ?7, previous_valid_until = ?8 \
             WHERE id = ?1 RETURNING ", columns!(), ""))
        .bind(id.as_str())
        .bind(&rotation.digest.as_bytes()[..])
        .bind(i64::from(rotation.digest_scheme.version()))
        .bind(rotation.masked_key.as_str())
        .bind(to_unix_micros(rotation.rotated_at))
        .bind(previous.map(|(d, _, _)| d.as_bytes().to_vec()))
        .bind(previous.map(|(_, s, _)| i64::from(s.version())))
        .bind(previous.map(|(_, _, until)| until))
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let after = decode_opt(row)?;
        let revoked_descendants = if rotation.revoke_descendants {
            Self::revoke_descendants(&mut tx, id, rotation.rotated_at).await?
        } else {
            Vec::new()
        };
        let change = KeyChange {
            before: old,
            after,
            revoked_descendants,
        };
        audit::append(&mut tx, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(change))
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let batch: Vec<serde_json::Value> = uses
            .iter()
            .map(|(id, at)| serde_json::json!([id.as_str(), to_unix_micros(*at)]))
            .collect();
        sqlx::query(
            "UPDATE api_keys SET last_used_at = u.at \
             FROM (SELECT json_extract(value, '$[0]') AS id, max(json_extract(value, '$[1]')) AS at \
                   FROM json_each(?1) GROUP BY 1) AS u \
             WHERE api_keys.id = u.id \
               AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < u.at)",
        )
        .bind(serde_json::Value::from(batch).to_string())
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(map_sqlx_error)
    }

    async fn format_secrets(
        &self,
        initial: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, StoreError> {
        let now = to_unix_micros(now);
        // Insert-if-absent, then read, in one write transaction: SQLite serialises them across
        // processes, and whichever instance comes first writes the row every other one reads.
        let mut tx = self.begin_immediate().await?;
        sqlx::query(
            "INSERT INTO api_key_format (id, legacy_keys, created_at) \
             SELECT 1, EXISTS (SELECT 1 FROM api_keys), ?1 WHERE true ON CONFLICT (id) DO NOTHING",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        sqlx::query(
            "INSERT INTO api_key_format_secrets (version, secret, created_at) \
             SELECT 1, ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM api_key_format_secrets) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(initial.expose_secret())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let legacy: i64 = sqlx::query_scalar("SELECT legacy_keys FROM api_key_format WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let rows = sqlx::query(
            "SELECT version, secret, created_at, retired_at FROM api_key_format_secrets \
             ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        let secrets = rows
            .iter()
            .map(|row| {
                let time = |i: usize| -> Result<Option<OffsetDateTime>, StoreError> {
                    row.try_get::<Option<i64>, _>(i)
                        .map_err(map_sqlx_error)?
                        .map(from_unix_micros)
                        .transpose()
                };
                StoredSecret::from_row(
                    row.try_get(0).map_err(map_sqlx_error)?,
                    row.try_get(1).map_err(map_sqlx_error)?,
                    time(2)?.ok_or_else(|| StoreError::from_kind(StoreErrorKind::Corrupt))?,
                    time(3)?,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(FormatSecrets {
            secrets,
            legacy_keys: legacy != 0,
        })
    }

    async fn add_format_secret(
        &self,
        secret: &FormatSecret,
        now: OffsetDateTime,
    ) -> Result<u8, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(version), 0) + 1 FROM api_key_format_secrets")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        let version = u8::try_from(version)
            .ok()
            .filter(|v| *v <= MAX_SECRET_VERSION)
            .ok_or_else(|| {
                StoreError::new(StoreErrorKind::Conflict, "every secret version is used")
            })?;
        sqlx::query(
            "INSERT INTO api_key_format_secrets (version, secret, created_at) VALUES (?1, ?2, ?3)",
        )
        .bind(i64::from(version))
        .bind(secret.expose_secret())
        .bind(to_unix_micros(now))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(version)
    }

    async fn retire_format_secret(
        &self,
        version: u8,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_key_format_secrets SET retired_at = ?2 \
             WHERE version = ?1 AND retired_at IS NULL AND EXISTS (\
               SELECT 1 FROM api_key_format_secrets WHERE version <> ?1 AND retired_at IS NULL)",
        )
        .bind(i64::from(version))
        .bind(to_unix_micros(now))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_legacy_keys(&self, accept: bool, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_key_format (id, legacy_keys, created_at) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET legacy_keys = excluded.legacy_keys",
        )
        .bind(i64::from(accept))
        .bind(to_unix_micros(now))
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(map_sqlx_error)
    }

    async fn update(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.update_with(id, update, &Journal::none()).await
    }

    async fn update_with(
        &self,
        id: &KeyId,
        update: &KeyUpdate,
        journal: &Journal,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let Some(mut record) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        let before = record.clone();
        update.apply(&mut record);
        if let Some(credits) = record.limits.credits.as_mut() {
            credits.set_at = micros(credits.set_at);
        }
        Self::write_limits(&mut tx, &record).await?;
        let change = KeyChange {
            before,
            after: Some(record),
            revoked_descendants: Vec::new(),
        };
        audit::append(&mut tx, journal.for_change(&change)).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(change.after)
    }

    async fn adjust_credits(
        &self,
        id: &KeyId,
        delta: i64,
        now: OffsetDateTime,
    ) -> Result<Option<CreditAdjustment>, StoreError> {
        // BEGIN IMMEDIATE serialises every writer of the file: read, apply the rule, write.
        let mut tx = self.begin_immediate().await?;
        let Some(mut record) = Self::fetch(&mut tx, id).await? else {
            return Ok(None);
        };
        let Some(credits) = record.limits.credits.as_mut() else {
            return Ok(None);
        };
        let before = *credits;
        let outcome = crate::store::credits::adjust(credits, delta, micros(now));
        if *credits != before {
            Self::write_limits(&mut tx, &record).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(Some(outcome))
    }

    async fn ancestors(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            ancestor_chain!("(SELECT created_by FROM api_keys WHERE id = ?1)"),
            "SELECT ",
            columns!(),
            " FROM chain JOIN api_keys ON api_keys.id = chain.cid ORDER BY chain.depth"
        ))
        .bind(id.as_str())
        .bind(MAX_DELEGATION_DEPTH as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn descendants(&self, id: &KeyId) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            descendant_tree!(),
            "SELECT ",
            columns!(),
            " FROM api_keys WHERE id IN (SELECT id FROM tree)"
        ))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode).collect()
    }

    async fn budget_above(&self, record: &KeyRecord) -> Result<Vec<BudgetLevel>, StoreError> {
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
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx_error)?;
        let owner: Arc<str> = record.owner.as_str().into();
        let mut levels = Vec::with_capacity(rows.len());
        for row in &rows {
            let kind: String = row.try_get(0).map_err(map_sqlx_error)?;
            let name: String = row.try_get(1).map_err(map_sqlx_error)?;
            let id = match kind.as_str() {
                "key" => BudgetId::Key(KeyId::new(name)),
                "account" => BudgetId::Pool(PoolId::account(owner.clone(), name)),
                _ => BudgetId::Pool(PoolId::owner(owner.clone())),
            };
            let limits = decode_limits(row, 3)?.into_limits()?;
            if !limits.is_unlimited() {
                levels.push(BudgetLevel { id, limits });
            }
        }
        Ok(levels)
    }

    async fn pool(&self, pool: &PoolId) -> Result<Option<UsageLimits>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        Self::read_pool(&mut conn, pool).await
    }

    async fn set_pool(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.set_pool_with(pool, limits, if_absent, &Journal::none())
            .await
    }

    async fn set_pool_with(
        &self,
        pool: &PoolId,
        limits: Option<UsageLimits>,
        if_absent: bool,
        journal: &Journal,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let wrote = write_pool(&mut tx, pool, limits, if_absent).await?;
        if wrote {
            audit::append(&mut tx, journal.events().to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(wrote)
    }

    async fn append_events(&self, events: &[EventDraft]) -> Result<Vec<AuditEvent>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let sealed = audit::append(&mut tx, events.to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(sealed)
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::events(&mut conn, query).await
    }

    async fn chain_state(&self, owner: &str) -> Result<ChainState, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_state(&mut conn, owner).await
    }

    async fn chain_events(
        &self,
        owner: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::chain_events(&mut conn, owner, after_seq, limit).await
    }

    async fn purge_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let removed = audit::purge_events(&mut tx, before).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(removed)
    }

    async fn record_usage(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        audit::record_usage(&mut tx, buckets).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn usage(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx_error)?;
        audit::usage(&mut conn, key_id, from, to).await
    }

    async fn purge_usage(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM api_key_usage WHERE hour < ?1")
            .bind(before.unix_timestamp())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx_error)?;
        Ok(done.rows_affected())
    }

    async fn usage_by_key(
        &self,
        owner: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageBucket>, StoreError> {
        super::overview::usage_by_key(&self.pool, owner, from, to).await
    }

    async fn owners(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<crate::store::overview::OwnerSummary>, StoreError> {
        super::overview::owners(&self.pool, now, limit).await
    }

    async fn spend_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<ChainSpend, StoreError> {
        if levels.is_empty() {
            // Nothing to count: no transaction (and, in SQLite, no write lock).
            return Ok(ChainSpend::Spent {
                remaining: Vec::new(),
            });
        }
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        // BEGIN IMMEDIATE serialises every writer of the file: read every level, decide, write.
        let mut tx = self.begin_immediate().await?;
        let mut credits = Self::read_credits(&mut tx, &levels).await?;
        let before = credits.clone();
        let outcome = levels.spend(&mut credits, cost, now);
        Self::write_credits(&mut tx, &levels, &before, &credits).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    async fn refund_credits(
        &self,
        levels: &[BudgetId],
        cost: u64,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if levels.is_empty() {
            return Ok(());
        }
        let levels = ChainLevels::new(levels);
        let now = micros(now);
        let mut tx = self.begin_immediate().await?;
        let mut credits = Self::read_credits(&mut tx, &levels).await?;
        let before = credits.clone();
        levels.refund(&mut credits, cost, now);
        Self::write_credits(&mut tx, &levels, &before, &credits).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }
}

impl SqliteStore {
    /// The limits of `pool`, read on `conn`; `None` when no pool is set.
    async fn read_pool(
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
                BudgetId::Pool(pool) => Self::read_pool(conn, pool).await?,
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

    /// Writes the name and usage-limit columns of `record`.
    async fn write_limits(
        conn: &mut SqliteConnection,
        record: &KeyRecord,
    ) -> Result<(), StoreError> {
        let columns = LimitColumns::of(&record.limits);
        sqlx::query(
            "UPDATE api_keys SET name = ?2, rate_limit = ?3, rate_period_seconds = ?4, \
             credits_remaining = ?5, credits_refill_interval = ?6, credits_refill_amount = ?7, \
             credits_set_at = ?8 WHERE id = ?1",
        )
        .bind(record.id.as_str())
        .bind(record.name.as_str())
        .bind(columns.rate_limit)
        .bind(columns.rate_period_seconds)
        .bind(columns.credits_remaining)
        .bind(columns.credits_refill_interval)
        .bind(columns.credits_refill_amount)
        .bind(columns.credits_set_at.map(to_unix_micros))
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx_error)?;
        Ok(())
    }
}

/// Writes or removes a pool on `conn` (inside the caller's transaction); whether it wrote.
async fn write_pool(
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
