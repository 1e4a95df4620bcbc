//! Opening a [`SqliteStore`]: connection options, WAL, the single-connection in-memory pool, and
//! the migrations.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::sql::MIGRATIONS;
use super::store::SqliteStore;
use crate::store::StoreError;
use crate::store::sql_common::{is_sqlite_busy, map_sqlx_error, to_unix_micros};

/// How many times [`SqliteStore::connect_with`] tries a file database that answers "busy".
const START_ATTEMPTS: u64 = 10;

impl SqliteStore {
    /// Opens the database at `url` (e.g. `sqlite://keys.db?mode=rwc` to create it if missing),
    /// switches a file database to WAL mode and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url).map_err(map_sqlx_error)?;
        Self::connect_with(options).await
    }

    /// Like [`connect`](Self::connect), with parsed options. A `:memory:` database gets a single
    /// connection that is never closed (see [`in_memory`](Self::in_memory)).
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let in_memory = options.get_filename().as_os_str() == ":memory:"
            || options
                .get_filename()
                .to_str()
                .is_some_and(|f| f.starts_with("file:sqlx-in-memory-"));
        if in_memory {
            let pool = Self::memory_pool_options()
                .connect_with(options)
                .await
                .map_err(map_sqlx_error)?;
            return Self::from_pool(pool).await;
        }
        let options = options.journal_mode(SqliteJournalMode::Wal);
        // Instances starting together on a new file contend for the lock that switches it to WAL,
        // and SQLite answers some of those contentions "busy" at once, without waiting: retry.
        let mut attempt = 1;
        loop {
            let started = async {
                let pool = SqlitePoolOptions::new()
                    .connect_with(options.clone())
                    .await
                    .map_err(map_sqlx_error)?;
                Self::from_pool(pool).await
            };
            match started.await {
                Err(error) if attempt < START_ATTEMPTS && is_sqlite_busy(&error) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// A private in-memory database, gone when the store (and its clones) are dropped. Handy for
    /// tests; use [`MemoryStore`](crate::store::MemoryStore) when persistence does not matter at all.
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(map_sqlx_error)?;
        let pool = Self::memory_pool_options()
            .connect_with(options)
            .await
            .map_err(map_sqlx_error)?;
        Self::from_pool(pool).await
    }

    /// One connection, kept open: an in-memory database lives only as long as a connection to it.
    fn memory_pool_options() -> SqlitePoolOptions {
        SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    }

    /// Uses an existing pool and runs the migrations.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        let store = Self {
            pool,
            migrated: Arc::new(OnceCell::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Brings the schema up to date (constructors already call it). Idempotent, and safe when
    /// several processes open the same file at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| self.run_migrations())
            .await
            .map(|_| ())
    }

    async fn run_migrations(&self) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS api_key_migrations (
                version INTEGER NOT NULL PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at INTEGER NOT NULL
            ) STRICT",
        )
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM api_key_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        for &(version, description, sql) in MIGRATIONS {
            if version <= current {
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            sqlx::query(
                "INSERT INTO api_key_migrations (version, description, applied_at) VALUES (?1, ?2, ?3)",
            )
            .bind(version)
            .bind(description)
            .bind(to_unix_micros(OffsetDateTime::now_utc()))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            tracing::info!(version, "API key store migrated");
        }
        tx.commit().await.map_err(map_sqlx_error)
    }
}
