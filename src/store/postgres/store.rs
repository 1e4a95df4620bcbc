//! [`PostgresStore`]: its pool and schema, and the transactions its
//! [`KeyStore`](crate::store::KeyStore) implementation (`key_store.rs`) runs in: a change's events
//! are written in the same transaction, and a chain of credits is run again when PostgreSQL rolled
//! it back.
use std::fmt;
use std::sync::Arc;

use sqlx::Transaction;
use sqlx::postgres::{PgPool, Postgres};
use tokio::sync::OnceCell;

use super::sql::Sql;
use super::{audit, credits};
use crate::audit::Journal;
#[cfg(feature = "webhooks")]
use crate::audit::{AuditEvent, EventDraft};
use crate::limits::Credits;
use crate::record::KeyChange;
#[cfg(doc)]
use crate::store::KeyStore;
use crate::store::StoreError;
use crate::store::credits::ChainLevels;
use crate::store::sql_common::{is_pg_retryable, map_sqlx_error};

/// How many times a chain spend or refund runs again after PostgreSQL chose it as a deadlock
/// victim (its row locks crossed a cascade's) or failed it for serialization.
const CHAIN_ATTEMPTS: u32 = 3;

/// A [`KeyStore`] in PostgreSQL: persistent and shared by every instance of a service.
///
/// Cheap to clone (clones share the pool).
///
/// ```no_run
/// use tower_api_keys::resolver::CachedResolver;
/// use tower_api_keys::store::PostgresStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // Connects and brings the schema up to date (versioned migrations under an advisory lock).
/// let store = PostgresStore::connect("postgres://app@db.internal/app").await?;
/// let resolver = CachedResolver::new(store.clone());
///
/// // Or in a dedicated schema, with a smaller pool:
/// let store = PostgresStore::builder()
///     .schema("billing_keys")?
///     .max_connections(4)
///     .connect("postgres://app@db.internal/app")
///     .await?;
/// # let _ = (resolver, store);
/// # Ok(())
/// # }
/// ```
///
/// # Layout
/// Everything lives in one schema (default `tower_api_keys`, created if missing):
/// - `api_keys`: one row per key. Digests are `BYTEA` (32 bytes) next to their scheme version
///   (`digest_scheme`, and `previous_digest_scheme` for a rotation grace period); scopes are a
///   `TEXT[]` in the set's sorted order; timestamps are `TIMESTAMPTZ`. No plaintext secret is stored.
/// - `api_key_digests`: every digest currently identifying a key (current and grace-period previous),
///   primary-keyed on the digest, so that a digest identifies at most one key across both columns.
/// - `api_key_pools`: the shared pools ([`KeyStore::set_pool`]), keyed by owner, `kind` (`owner`
///   or `account`) and account (empty for an owner's pool), with the usage-limit columns of
///   `api_keys`. A key's `allowed_networks` is a nullable `TEXT` of CIDR blocks separated by spaces.
/// - `api_key_migrations`: the applied schema versions.
///
/// # Guarantees
/// - Migrations run at start-up in one transaction holding a transaction-level advisory lock, so
///   instances starting together apply them once; they are idempotent.
/// - [`KeyStore::insert`] takes a transaction-level advisory lock per owner (and per account) before
///   counting active keys, so concurrent inserts from any number of instances never overshoot a limit.
/// - [`KeyStore::spend_credits`] locks every level's row (keys by id, then pools) in that one order
///   in one transaction, so concurrent chains never deadlock on each other and never overspend;
///   a chain PostgreSQL picks as a deadlock victim against a cascade is run again (it kept nothing).
/// - Timestamps keep PostgreSQL's microsecond precision: they are floored to the microsecond when
///   written and when compared (see [`KeyStore`]'s contract; records read back equal the inserted ones
///   when their times are whole microseconds).
/// - Connection failures are
///   [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable), duplicates
///   [`StoreErrorKind::Conflict`](crate::store::StoreErrorKind::Conflict), unreadable rows (an
///   unknown digest scheme, a bad scope)
///   [`StoreErrorKind::Corrupt`](crate::store::StoreErrorKind::Corrupt). Errors never quote the
///   offending values.
///
/// TLS: enable one of sqlx's TLS features (e.g. `sqlx = { version = "0.9", features =
/// ["tls-rustls"] }`) in your own `Cargo.toml`; feature unification applies it here.
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
    pub(super) sql: Arc<Sql>,
    pub(super) migrated: Arc<OnceCell<()>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The schema used when none is configured.
    pub const DEFAULT_SCHEMA: &str = "tower_api_keys";

    pub(super) fn new(pool: PgPool, schema: &str) -> Self {
        Self {
            pool,
            sql: Arc::new(Sql::new(schema)),
            migrated: Arc::new(OnceCell::new()),
        }
    }

    /// The connection pool (e.g. to share it with [`PostgresInvalidator`](crate::invalidate::PostgresInvalidator)).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The schema's name quoted for SQL (a checked identifier), for the webhooks' statements
    /// (`webhooks::postgres`), which read and write this store's tables.
    #[cfg(feature = "webhooks")]
    pub(crate) fn quoted_schema(&self) -> &str {
        &self.sql.quoted
    }

    /// Seals `events` onto their owners' chains and writes them on `conn`, inside the caller's
    /// transaction, with their outbox rows: how the webhooks' changes write their events.
    #[cfg(feature = "webhooks")]
    pub(crate) async fn append_in(
        &self,
        conn: &mut sqlx::PgConnection,
        events: Vec<EventDraft>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        audit::append(conn, &self.sql.quoted, events).await
    }

    /// Brings the schema up to date. Runs once per store (again only after a failure); constructors
    /// other than the lazy ones already call it. Safe to run from several instances at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| self.run_migrations())
            .await
            .map(|_| ())
    }
}

impl PostgresStore {
    /// Runs `chain` (a spend or refund of several levels) in its own transaction, again when
    /// PostgreSQL rolled it back as a deadlock victim or for serialization: nothing of a
    /// rolled-back attempt was kept, so running it again spends once.
    pub(super) async fn chain_transaction<T>(
        &self,
        levels: &ChainLevels,
        rule: impl Fn(&mut [Option<Credits>]) -> T,
    ) -> Result<T, StoreError> {
        self.migrate().await?;
        let mut attempt = 1;
        loop {
            match self.chain_attempt(levels, &rule).await {
                Err(error) if attempt < CHAIN_ATTEMPTS && is_pg_retryable(&error) => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One attempt of [`chain_transaction`](Self::chain_transaction), in a transaction of its own.
    async fn chain_attempt<T>(
        &self,
        levels: &ChainLevels,
        rule: &impl Fn(&mut [Option<Credits>]) -> T,
    ) -> Result<T, StoreError> {
        let mut tx = self.begin().await?;
        let outcome = credits::chain(&mut tx, &self.sql, levels, rule).await?;
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(outcome)
    }

    pub(super) async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(map_sqlx_error)
    }

    /// Writes `change`'s events (`journal`) on `tx` when there is a change, and commits.
    pub(super) async fn commit_change(
        &self,
        mut tx: Transaction<'static, Postgres>,
        change: Option<KeyChange>,
        journal: &Journal,
    ) -> Result<Option<KeyChange>, StoreError> {
        if let Some(change) = &change {
            audit::append(&mut tx, &self.sql.quoted, journal.for_change(change)).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(change)
    }
}
