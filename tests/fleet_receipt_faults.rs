//! Revocation with a receipt (issue #22) when something fails: three example servers (child
//! processes) on one PostgreSQL database, one fault per test. In each: the revoke answers within the
//! deadline (1 s, plus slack for a noisy machine), naming the laggard if there is one; no server
//! admits the revoked key once the bound (1 s) has passed since the revoke answered; and the fleet
//! recovers by itself (a later revoke is acknowledged by all three, and then no server admits it).
//!
//! - **Redis stopped**: every server's Redis goes through a proxy that is taken down (the machine's
//!   Redis serves other tests).
//! - **Silent cut**: one server's database connections (its store and its LISTEN connection) go
//!   through a proxy that stops forwarding without closing anything.
//! - **Paused**: one server is stopped with SIGSTOP for 2 s, then resumed.
//! - **PostgreSQL restart**: simulated by a proxy in front of PostgreSQL for every server, taken
//!   down (every connection cut, new ones refused) for 1.5 s and brought back. Restarting the
//!   machine's PostgreSQL would break the tests running beside these.
//!
//! Needs `TEST_DATABASE_URL` (and `TEST_REDIS_URL`); see `common::db`.
#![cfg(all(feature = "postgres", feature = "manage"))]

#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

mod common;
#[path = "common/fleet.rs"]
mod fleet;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use http::StatusCode;
use sqlx::postgres::PgConnectOptions;

use fleet::{FleetSpec, Server, SilentProxy};

static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The freshness bound, and what the coarse clock and scheduling may add to it.
const BOUND: Duration = Duration::from_millis(1050);
/// How long a revoke may take when an instance does not answer: the 1 s deadline, plus slack.
const ANSWER_WITHIN: Duration = Duration::from_millis(2500);
const RECOVERY: Duration = Duration::from_secs(30);

#[test]
#[ignore = "a server of the fleet tests, which start it in a child process"]
fn fleet_child() {
    fleet::serve_child(|| async {
        let demo = server::build(server::Config::from_env())
            .await
            .expect("the example server builds");
        (
            demo.router,
            Box::new((demo._subscriptions, demo.usage)) as _,
        )
    });
}

/// A fleet of three: server `i` on `database[i]` (and `redis[i]`).
struct Fleet {
    spec: FleetSpec,
    servers: Vec<Server>,
    addrs: Vec<SocketAddr>,
    client: fleet::HttpClient,
}

impl Fleet {
    async fn start(
        test: &str,
        schema: &str,
        database: [&str; 3],
        redis: [Option<&str>; 3],
    ) -> Self {
        let spec = FleetSpec {
            master: format!("fleet-master-{}", common::db::unique("m")),
            schema: schema.to_owned(),
            channel: common::db::unique(test),
        };
        let servers: Vec<Server> = ["a", "b", "c"]
            .iter()
            .zip(database.iter().zip(redis))
            .map(|(name, (db, redis))| Server::start(&spec, name, db, redis))
            .collect();
        let addrs = servers.iter().map(|s| s.addr).collect();
        // Every server in the roster.
        tokio::time::sleep(Duration::from_millis(800)).await;
        Self {
            spec,
            servers,
            addrs,
            client: fleet::client(),
        }
    }

    /// A key every server has admitted (and so caches): (key, id).
    async fn cached_key(&self) -> (String, String) {
        let (key, id) =
            fleet::create_key(&self.client, self.addrs[0], &self.spec.master, "fleet").await;
        for &addr in &self.addrs {
            fleet::admitted(&self.client, addr, &key, Duration::from_secs(10)).await;
            fleet::admitted(&self.client, addr, &key, Duration::from_secs(10)).await;
        }
        (key, id)
    }

    /// Revokes on A (which is never the faulty one); the reply and how long it took.
    async fn revoke(&self, id: &str) -> (fleet::Reply, Duration) {
        let (reply, took) = fleet::revoke(&self.client, self.addrs[0], &self.spec.master, id).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{:?}", reply.body);
        assert!(took < ANSWER_WITHIN, "the revoke took {took:?}");
        (reply, took)
    }

    /// Probes every server for `during` from now: the admissions after the bound.
    async fn late_admissions(&self, key: &str, during: Duration) -> Vec<usize> {
        let probes = self
            .addrs
            .iter()
            .map(|&addr| fleet::watch_refused(&self.client, addr, key, BOUND, during));
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .map(|(late, _)| late)
            .collect()
    }

    /// Recovery, then five rounds each acknowledged by all three and admitted by none.
    async fn recovers(&self, test: &str) {
        let took = fleet::recovered(&self.client, &self.addrs, &self.spec.master, RECOVERY).await;
        let mut admissions = 0;
        for i in 0..5 {
            let round = fleet::round(&self.client, &self.addrs, &self.spec.master, i).await;
            assert_eq!(
                (round.acknowledged, round.instances),
                (3.0, 3.0),
                "{test}: after recovery"
            );
            admissions += round.admissions;
        }
        println!(
            "{test}: recovered (a revoke acknowledged by all three) {took:?} after the fault ended"
        );
        assert_eq!(admissions, 0, "{test}: admitted after recovery");
    }
}

fn target(url: &str) -> (PgConnectOptions, SocketAddr) {
    let options: PgConnectOptions = url.parse().unwrap();
    let addr = (options.get_host(), options.get_port())
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    (options, addr)
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn through(url: &str, port: u16) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some("127.0.0.1")).unwrap();
    parsed.set_port(Some(port)).unwrap();
    parsed.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_cut_of_one_server() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    let Some(schema) = common::db::pg_schema("receipt_cut").await else {
        return;
    };
    let (_, addr) = target(&schema.url);
    let proxy = SilentProxy::start(addr).await;
    let cut = through(&schema.url, proxy.port());
    let fleet = Fleet::start(
        "receipt_cut",
        &schema.schema,
        [&schema.url, &schema.url, &cut],
        [None; 3],
    )
    .await;
    let (key, id) = fleet.cached_key().await;
    proxy.freeze();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (reply, took) = fleet.revoke(&id).await;
    let late = fleet.late_admissions(&key, Duration::from_secs(4)).await;
    println!(
        "silent cut: revoke answered in {took:?}, acknowledged {:?} of {:?}; admissions after the bound: {late:?}",
        reply.number("revocation-acknowledged"),
        reply.number("revocation-instances")
    );
    assert_eq!(reply.number("revocation-acknowledged"), Some(2.0));
    assert_eq!(reply.number("revocation-instances"), Some(3.0));
    assert!(
        fleet.servers[0]
            .log_text()
            .lines()
            .any(|l| l.contains("not acknowledged") && l.contains("instance=c")),
        "A names the laggard: {}",
        fleet.servers[0].log_text()
    );
    assert_eq!(late, [0, 0, 0], "admitted after the bound");
    proxy.thaw();
    fleet.recovers("silent cut").await;
    drop(fleet);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_paused_for_two_seconds() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    let Some(schema) = common::db::pg_schema("receipt_pause").await else {
        return;
    };
    let url = schema.url.as_str();
    let fleet = Fleet::start("receipt_pause", &schema.schema, [url; 3], [None; 3]).await;
    let (key, id) = fleet.cached_key().await;
    let paused_at = Instant::now();
    fleet.servers[2].pause();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (reply, took) = fleet.revoke(&id).await;
    // Asked while paused: answered once it runs again, more than the bound after the revoke.
    let (client, c, probe_key) = (fleet.client.clone(), fleet.addrs[2], key.clone());
    let asked_while_paused =
        tokio::spawn(
            async move { fleet::ping(&client, c, &probe_key, Duration::from_secs(15)).await },
        );
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(paused_at.elapsed())).await;
    fleet.servers[2].resume();
    let while_paused = asked_while_paused.await.unwrap();
    let late = fleet.late_admissions(&key, Duration::from_secs(2)).await;
    println!(
        "paused: revoke answered in {took:?}, acknowledged {:?} of {:?}; the paused server answered \
         {while_paused:?} to a probe sent while paused; admissions after the bound: {late:?}",
        reply.number("revocation-acknowledged"),
        reply.number("revocation-instances")
    );
    assert_eq!(reply.number("revocation-acknowledged"), Some(2.0));
    assert_ne!(
        while_paused,
        Some(StatusCode::OK),
        "admitted when it resumed"
    );
    assert_eq!(late, [0, 0, 0], "admitted after the bound");
    fleet.recovers("paused").await;
    drop(fleet);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_through_a_proxy() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    let Some(schema) = common::db::pg_schema("receipt_restart").await else {
        return;
    };
    let (_, addr) = target(&schema.url);
    let proxy = common::db::Proxy::start(addr).await;
    let url = through(&schema.url, proxy.port());
    let url = url.as_str();
    let fleet = Fleet::start("receipt_restart", &schema.schema, [url; 3], [None; 3]).await;
    // A revoke just before the restart: nobody admits it after the bound, whatever follows.
    let (revoked, id) = fleet.cached_key().await;
    let (reply, _) = fleet.revoke(&id).await;
    assert_eq!(reply.number("revocation-acknowledged"), Some(3.0));
    let (live, _) = fleet.cached_key().await;
    proxy.down().await;
    let went_down = Instant::now();
    // While the database is down, a cached key is served for the bound, then 503: no instance
    // vouches for its cache (the revoked key stays refused).
    let (late, seen) = fleet::watch_refused(
        &fleet.client,
        fleet.addrs[0],
        &live,
        BOUND,
        Duration::from_millis(1500),
    )
    .await;
    let revoked_late = fleet.late_admissions(&revoked, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(went_down.elapsed())).await;
    proxy.up().await;
    println!(
        "PostgreSQL down: a live cached key answered {:?} during the outage",
        seen.iter()
            .map(|s| s.map_or(0, |s| s.as_u16()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        late, 0,
        "a cached key was vouched for after the bound without the fleet"
    );
    assert!(seen.contains(&Some(StatusCode::SERVICE_UNAVAILABLE)));
    assert_eq!(revoked_late, [0, 0, 0]);
    fleet.recovers("PostgreSQL restart").await;
    for &addr in &fleet.addrs {
        fleet::admitted(&fleet.client, addr, &live, RECOVERY).await;
    }
    drop(fleet);
    schema.drop_schema().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    let Some(redis_url) = common::db::redis_url("receipt_redis_down").await else {
        return;
    };
    let Some(schema) = common::db::pg_schema("receipt_redis_down").await else {
        return;
    };
    let (proxy, redis) = common::db::redis_through_proxy(&redis_url).await;
    let url = schema.url.as_str();
    let fleet = Fleet::start(
        "receipt_redis_down",
        &schema.schema,
        [url; 3],
        [Some(redis.as_str()); 3],
    )
    .await;
    let (key, id) = fleet.cached_key().await;
    proxy.down().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (reply, took) = fleet.revoke(&id).await;
    let late = fleet
        .late_admissions(&key, Duration::from_millis(2500))
        .await;
    println!(
        "Redis stopped: revoke answered in {took:?} (acknowledged: {:?}); admissions after the bound: {late:?}",
        reply.number("revocation-acknowledged")
    );
    assert_eq!(late, [0, 0, 0], "admitted after the bound");
    proxy.up().await;
    fleet.recovers("Redis stopped").await;
    drop(fleet);
    schema.drop_schema().await;
}
