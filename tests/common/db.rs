//! Helpers for the tests that need PostgreSQL or Redis: environment lookup with skip-or-fail,
//! unique names for isolation, a throwaway schema, and a TCP proxy that can simulate an outage.
//!
//! The tests read `TEST_DATABASE_URL` and `TEST_REDIS_URL`, and use the usual local services when
//! they are unset (`postgres://postgres@127.0.0.1:5432/test`, `redis://127.0.0.1:6379`). When a
//! server cannot be reached, a test prints `SKIPPED: <test>: <reason>` to stderr and returns, unless
//! the environment variable `CI` is `true`, in which case it fails.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::sync::atomic::{AtomicU64, Ordering};

/// Skips the test loudly, or fails it under `CI=true`.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {reason} (CI=true: the test services are required)");
    }
    // Straight to the process's stderr: `eprintln!` would be captured by the test harness.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

/// The value of `var`, or the usual local service's URL when it is unset or empty.
pub fn env_url(test: &str, var: &str) -> Option<String> {
    let _ = test;
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => Some(
            match var {
                "TEST_DATABASE_URL" => "postgres://postgres@127.0.0.1:5432/test",
                "TEST_REDIS_URL" => "redis://127.0.0.1:6379",
                other => panic!("no default for {other}"),
            }
            .to_owned(),
        ),
    }
}

/// A name no other test, run or process uses: `<prefix>_<pid>_<time>_<n>`, lowercase, at most 63
/// bytes (a valid PostgreSQL identifier when `prefix` is one).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    let suffix = format!(
        "_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(63 - suffix.len())
        .collect();
    format!("{prefix}{suffix}")
}

#[cfg(feature = "postgres")]
pub use pg::*;

#[cfg(feature = "postgres")]
mod pg {
    use std::time::Duration;

    use tower_api_keys::store::PostgresStore;

    use super::{env_url, skip, unique};

    /// A schema of its own on the test database, for one test.
    pub struct PgSchema {
        pub url: String,
        pub schema: String,
    }

    impl PgSchema {
        /// A new store instance (its own pool) on this schema.
        pub async fn store(&self) -> PostgresStore {
            PostgresStore::builder()
                .schema(&self.schema)
                .expect("valid schema name")
                .max_connections(5)
                .connect(&self.url)
                .await
                .expect("connect to the test database")
        }

        /// Drops the schema and everything in it.
        pub async fn drop_schema(self) {
            let pool = sqlx::PgPool::connect(&self.url)
                .await
                .expect("connect to drop the schema");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            )))
            .execute(&pool)
            .await
            .expect("drop the test schema");
            pool.close().await;
        }
    }

    /// A [`Proxy`](super::Proxy) in front of the schema's database, and a store on the schema
    /// whose (lazy) pool goes through it: a subscription of an invalidator made from it can be
    /// cut off while everything else keeps the database.
    pub async fn pg_through_proxy(schema: &PgSchema) -> (super::Proxy, PostgresStore) {
        use std::net::ToSocketAddrs;
        let options: sqlx::postgres::PgConnectOptions = schema.url.parse().unwrap();
        let target = (options.get_host(), options.get_port())
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap();
        let proxy = super::Proxy::start(target).await;
        let store = PostgresStore::builder()
            .schema(&schema.schema)
            .unwrap()
            .connect_lazy_with(options.host("127.0.0.1").port(proxy.port()));
        (proxy, store)
    }

    /// A fresh schema for `test`, or `None` (after [`skip`]) without a reachable database.
    pub async fn pg_schema(test: &str) -> Option<PgSchema> {
        let url = env_url(test, "TEST_DATABASE_URL")?;
        let schema = unique(&format!("t_{test}"));
        let probe = PostgresStore::builder()
            .schema(&schema)
            .expect("valid schema name")
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await;
        match probe {
            Ok(store) => {
                store.pool().close().await;
                Some(PgSchema { url, schema })
            }
            Err(error) => {
                skip(
                    test,
                    &format!("cannot connect to TEST_DATABASE_URL: {error}"),
                );
                None
            }
        }
    }
}

#[cfg(feature = "redis")]
/// `TEST_REDIS_URL` if its server answers PING, or `None` after [`skip`].
pub async fn redis_url(test: &str) -> Option<String> {
    let url = env_url(test, "TEST_REDIS_URL")?;
    let ping = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Some(url),
        Ok(Err(error)) => {
            skip(test, &format!("cannot connect to TEST_REDIS_URL: {error}"));
            None
        }
        Err(_) => {
            skip(test, "TEST_REDIS_URL did not answer within 5 s");
            None
        }
    }
}

#[cfg(all(feature = "redis", feature = "postgres"))]
/// A [`Proxy`] in front of the Redis server at `url`, and the URL through it.
pub async fn redis_through_proxy(url: &str) -> (Proxy, String) {
    use std::net::ToSocketAddrs;
    let mut through = url::Url::parse(url).expect("TEST_REDIS_URL is a URL");
    let target = (
        through.host_str().expect("TEST_REDIS_URL has a host"),
        through.port().unwrap_or(6379),
    )
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(target).await;
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port())).unwrap();
    (proxy, through.to_string())
}

#[cfg(feature = "postgres")]
/// A TCP proxy on 127.0.0.1 in front of `target`, which can be taken down (every connection cut,
/// new ones refused) and brought back up on the same port: a database outage and its recovery.
pub struct Proxy {
    target: std::net::SocketAddr,
    port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

#[cfg(feature = "postgres")]
impl Proxy {
    /// Starts a proxy to `target` on a free port.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Self {
            target,
            port,
            tasks: Default::default(),
        };
        proxy.serve(listener);
        proxy
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(pipe);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Cuts every connection and stops listening: new connections are refused.
    pub async fn down(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind the proxy port");
        self.serve(listener);
    }
}

#[cfg(feature = "postgres")]
impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}
