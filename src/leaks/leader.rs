//! Fleet leadership for the [`Sweeper`](super::Sweeper): a PostgreSQL advisory lock or a Redis
//! lock. Either way the store's insert-if-absent notices keep events single; the lock only keeps
//! the other instances from doing the same work.

#[cfg(feature = "redis")]
pub use self::redis::RedisLeader;
#[cfg(feature = "postgres")]
pub use pg::PostgresLeader;

use sha2::{Digest as _, Sha256};

/// A 64-bit lock id from a name.
#[cfg(feature = "postgres")]
fn lock_id(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("32 bytes"))
}

/// A random token naming this instance's hold on a lock.
#[cfg(feature = "redis")]
fn token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's CSPRNG is unavailable");
    let digest = Sha256::digest(bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(feature = "postgres")]
mod pg {
    use sqlx::Connection as _;
    use sqlx::postgres::{PgConnection, PgPool};
    use tokio::sync::Mutex;

    use super::super::sweeper::Leadership;
    use crate::store::sql_common::map_sqlx_error;
    use crate::store::{PostgresStore, StoreError};

    /// Leads while it holds a PostgreSQL session advisory lock (`pg_try_advisory_lock`), on a
    /// connection of its own taken out of the store's pool: the lock ends when that connection
    /// does (the instance stops, the network cuts), and another instance takes it at its next
    /// sweep.
    pub struct PostgresLeader {
        pool: PgPool,
        lock: i64,
        held: Mutex<Option<PgConnection>>,
    }

    impl std::fmt::Debug for PostgresLeader {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PostgresLeader")
                .field("lock", &self.lock)
                .finish_non_exhaustive()
        }
    }

    impl PostgresLeader {
        /// Competes for the lock named `name` (every instance of a fleet uses the same name) on
        /// `store`'s database.
        pub fn new(store: &PostgresStore, name: &str) -> Self {
            Self {
                pool: store.pool().clone(),
                lock: super::lock_id(name),
                held: Mutex::new(None),
            }
        }
    }

    #[async_trait::async_trait]
    impl Leadership for PostgresLeader {
        async fn lead(&self) -> Result<bool, StoreError> {
            let mut held = self.held.lock().await;
            if let Some(connection) = held.as_mut() {
                if connection.ping().await.is_ok() {
                    return Ok(true);
                }
                // The connection (and with it the lock) is gone: compete again.
                *held = None;
            }
            let mut connection = self.pool.acquire().await.map_err(map_sqlx_error)?;
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.lock)
                .fetch_one(&mut *connection)
                .await
                .map_err(map_sqlx_error)?;
            if got {
                // Out of the pool: it must never go back holding the lock.
                *held = Some(connection.detach());
            }
            Ok(got)
        }
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::time::Duration;

    use ::redis::aio::MultiplexedConnection;
    use tokio::sync::Mutex;

    use super::super::sweeper::Leadership;
    use crate::store::StoreError;

    /// Take the lock if free, or extend it if this instance holds it; 1 when it leads.
    const SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"#;

    /// Leads while it holds a Redis key (`SET NX PX`, extended at each sweep). Give it a time to
    /// live longer than the sweep interval; when the leader stops, another instance takes over
    /// once the key expires.
    pub struct RedisLeader {
        client: ::redis::Client,
        key: String,
        token: String,
        ttl: Duration,
        connection: Mutex<Option<MultiplexedConnection>>,
        script: ::redis::Script,
    }

    impl std::fmt::Debug for RedisLeader {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedisLeader")
                .field("key", &self.key)
                .field("ttl", &self.ttl)
                .finish_non_exhaustive()
        }
    }

    impl RedisLeader {
        /// Competes for the Redis key `key` (every instance of a fleet uses the same one), held
        /// for `ttl` after each sweep.
        pub fn new(client: ::redis::Client, key: impl Into<String>, ttl: Duration) -> Self {
            Self {
                client,
                key: key.into(),
                token: super::token(),
                ttl,
                connection: Mutex::new(None),
                script: ::redis::Script::new(SCRIPT),
            }
        }
    }

    #[async_trait::async_trait]
    impl Leadership for RedisLeader {
        async fn lead(&self) -> Result<bool, StoreError> {
            let mut slot = self.connection.lock().await;
            let connection = match slot.as_mut() {
                Some(connection) => connection,
                None => slot.insert(
                    self.client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(StoreError::unavailable)?,
                ),
            };
            let ttl = u64::try_from(self.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let led: i64 = match self
                .script
                .key(&self.key)
                .arg(&self.token)
                .arg(ttl)
                .invoke_async(connection)
                .await
            {
                Ok(led) => led,
                Err(error) => {
                    *slot = None;
                    return Err(StoreError::unavailable(error));
                }
            };
            Ok(led == 1)
        }
    }
}
