//! [`PostgresStoreBuilder`]: schema, pool size, timeouts, lazy connection.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::sql::{InvalidIdentifier, check_identifier, lock_key, migrations};
use super::store::PostgresStore;
use crate::store::StoreError;
use crate::store::sql_common::map_sqlx_error;

/// Configures a [`PostgresStore`]; see [`PostgresStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct PostgresStoreBuilder {
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
}

// The constructors that go through the builder live beside it, so that the store does not import
// back up from here.
impl PostgresStore {
    /// Connects to `url` with default settings (schema [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Uses an existing pool (schema [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)) and runs the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        Self::builder().from_pool(pool).await
    }

    /// A builder: schema, pool size, timeouts, lazy connection.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// Brings the schema up to date: versioned migrations in one transaction holding an advisory
    /// lock, so that instances starting together apply them once.
    pub(super) async fn run_migrations(&self) -> Result<(), StoreError> {
        let schema = &self.sql.schema;
        let s = &self.sql.quoted;
        let mut tx = self.pool.begin().await.map_err(map_sqlx_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key(&["migrate", schema]))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        // Check first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when it exists.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {s}")))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {s}.api_key_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let current: i32 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COALESCE(max(version), 0) FROM {s}.api_key_migrations"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        for (version, description, sql) in migrations(s) {
            if version <= current {
                continue;
            }
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx_error)?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {s}.api_key_migrations (version, description) VALUES ($1, $2)"
            )))
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
            tracing::info!(schema = %schema, version, "API key store migrated");
        }
        tx.commit().await.map_err(map_sqlx_error)
    }
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            schema: PostgresStore::DEFAULT_SCHEMA.to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema holding the tables (default [`DEFAULT_SCHEMA`](PostgresStore::DEFAULT_SCHEMA)); created if missing. Several
    /// independent key sets can share a database by using different schemas.
    pub fn schema(mut self, schema: &str) -> Result<Self, InvalidIdentifier> {
        check_identifier(schema, "schema")?;
        self.schema = schema.to_owned();
        Ok(self)
    }

    /// Most connections the pool opens (default 10). Ignored by [`from_pool`](Self::from_pool).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long an operation waits for a connection before failing with
    /// [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable) (default 5 s); a refused connection is retried until then.
    /// Ignored by [`from_pool`](Self::from_pool).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
    }

    fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
        url.parse::<PgConnectOptions>().map_err(map_sqlx_error)
    }

    /// Connects to `url` and runs the migrations; fails if the database cannot be reached.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        self.connect_with(Self::options(url)?).await
    }

    /// Like [`connect`](Self::connect), with parsed connection options.
    pub async fn connect_with(
        self,
        options: PgConnectOptions,
    ) -> Result<PostgresStore, StoreError> {
        let store = self.connect_lazy_with(options);
        store.migrate().await?;
        Ok(store)
    }

    /// A store that connects on first use (no I/O here); the migrations run before the first
    /// operation. Until the database can be reached, every operation fails with
    /// [`StoreErrorKind::Unavailable`](crate::store::StoreErrorKind::Unavailable): a service can start while its database is down.
    pub fn connect_lazy(self, url: &str) -> Result<PostgresStore, StoreError> {
        Ok(self.connect_lazy_with(Self::options(url)?))
    }

    /// Like [`connect_lazy`](Self::connect_lazy), with parsed connection options.
    pub fn connect_lazy_with(self, options: PgConnectOptions) -> PostgresStore {
        let pool = self.pool_options().connect_lazy_with(options);
        PostgresStore::new(pool, &self.schema)
    }

    /// Uses an existing pool and runs the migrations.
    pub async fn from_pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::new(pool, &self.schema);
        store.migrate().await?;
        Ok(store)
    }
}
