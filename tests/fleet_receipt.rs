//! Revocation with a receipt (issue #22), end to end: three example servers (`examples/server/`,
//! each its own process) on one PostgreSQL database, invalidations over LISTEN/NOTIFY, then over
//! Redis pub/sub; a load generator keeps every server busy. 200 revocations (`FLEET_REVOCATIONS`):
//! a new key is cached by every server, revoked on another one; once `DELETE` has answered 204
//! with every live instance acknowledged (`Revocation-Acknowledged` = `Revocation-Instances` = 3),
//! every server is asked at once with the revoked key: **no probe is admitted, not one**.
//!
//! Run with `--nocapture` for the figures (BENCHMARKS.md, "Revocation with a receipt";
//! `scripts/fleet.sh`). The fault cases are in `tests/fleet_receipt_faults.rs`. Needs
//! `TEST_DATABASE_URL` (and `TEST_REDIS_URL`); see `common::db`.
#![cfg(all(feature = "postgres", feature = "manage"))]

#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

mod common;
#[path = "common/fleet.rs"]
mod fleet;

use std::time::Duration;

use fleet::{FleetSpec, Load, Server};

/// Serializes the fleets of this binary: each is three servers and a load generator.
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

fn revocations() -> usize {
    std::env::var("FLEET_REVOCATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

/// Load loops per server (`FLEET_LOAD_WORKERS`, default 8).
fn workers() -> usize {
    std::env::var("FLEET_LOAD_WORKERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8)
}

async fn three_servers_under_load(test: &str, redis_url: Option<String>) {
    let Some(schema) = common::db::pg_schema(test).await else {
        return;
    };
    let spec = FleetSpec {
        master: format!("fleet-master-{}", common::db::unique("m")),
        schema: schema.schema.clone(),
        channel: common::db::unique(test),
    };
    let servers: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|name| Server::start(&spec, name, &schema.url, redis_url.as_deref()))
        .collect();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let client = fleet::client();
    // Every server in the roster before the first revoke.
    tokio::time::sleep(Duration::from_millis(800)).await;

    let mut load_keys = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        let (key, _) = fleet::create_key(&client, addr, &spec.master, &format!("load{i}")).await;
        fleet::admitted(&client, addr, &key, Duration::from_secs(10)).await;
        load_keys.push(key);
    }
    let load = Load::start(&addrs, &load_keys, workers());

    let n = revocations();
    let (mut admissions, mut incomplete) = (0, 0);
    let (mut elapsed, mut answered) = (Vec::new(), Vec::new());
    for i in 0..n {
        let round = fleet::round(&client, &addrs, &spec.master, i).await;
        admissions += round.admissions;
        if round.acknowledged == 3.0 && round.instances == 3.0 {
            elapsed.push(round.elapsed_ms);
        } else {
            incomplete += 1;
            println!(
                "round {i}: acknowledged {} of {} (answered in {:?})",
                round.acknowledged, round.instances, round.answered_in
            );
        }
        answered.push(round.answered_in.as_secs_f64() * 1000.0);
    }
    let rates = load.stop().await;
    let (p50, p99, max) = fleet::percentiles(&mut elapsed);
    let (a50, a99, amax) = fleet::percentiles(&mut answered);
    println!(
        "{test}: {n} revocations, {} probes, {admissions} admitted; {incomplete} receipts \
         incomplete; time to full acknowledgement p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; \
         DELETE answered p50 {a50:.2} ms, p99 {a99:.2} ms, max {amax:.2} ms; load per server \
         (200/s, other answers): {rates:?}",
        3 * n
    );
    assert_eq!(
        admissions, 0,
        "a revoked key was admitted after the receipt"
    );
    assert!(
        incomplete <= n / 20,
        "{incomplete} of {n} revocations were not acknowledged by every instance within 1 s"
    );
    for (rate, other) in &rates {
        assert!(*rate > 0.0, "the load was served");
        assert_eq!(*other, 0, "the load key was refused or not answered");
    }
    drop(servers);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_over_listen_notify_admit_no_revoked_key() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    three_servers_under_load("receipt_pg", None).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_over_redis_admit_no_revoked_key() {
    let _fleet = ONE_FLEET_AT_A_TIME.lock().await;
    let Some(redis_url) = common::db::redis_url("receipt_redis").await else {
        return;
    };
    three_servers_under_load("receipt_redis", Some(redis_url)).await;
}
