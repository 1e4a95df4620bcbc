//! The fleet tests' harness (`tests/fleet_receipt*.rs`): example servers as child processes (the
//! test binary started again, running its ignored `fleet_child` test), a TCP proxy that can stop
//! forwarding without closing (a silent cut), a load generator, and the HTTP calls of a revocation
//! round. Included with `#[path]` by the fleet tests only (it needs their `fleet_child`).
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

pub type HttpClient = Client<HttpConnector, Body>;

/// What every server of one fleet shares.
#[derive(Clone)]
pub struct FleetSpec {
    pub master: String,
    pub schema: String,
    pub channel: String,
}

/// One example server in a child process; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub name: String,
    /// Its stderr (warnings: laggards, degraded mode).
    pub log: PathBuf,
}

impl Server {
    /// Starts `fleet_child` of this test binary as server `name`, on `database_url` (and
    /// `redis_url`: then invalidations go over Redis).
    pub fn start(
        spec: &FleetSpec,
        name: &str,
        database_url: &str,
        redis_url: Option<&str>,
    ) -> Self {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", spec.channel));
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args(["fleet_child", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("FLEET_CHILD", "1")
            .env("DATABASE_URL", database_url)
            .env("API_KEYS_MASTER_KEY", &spec.master)
            .env("API_KEYS_PUBLIC_CHECKSUM", "1")
            .env("API_KEYS_SCHEMA", &spec.schema)
            .env("API_KEYS_CHANNEL", &spec.channel)
            .env("API_KEYS_INSTANCE", name)
            .env("RUST_LOG", "warn,sqlx=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("the server's log file"));
        match redis_url {
            Some(url) => command.env("REDIS_URL", url),
            None => command.env_remove("REDIS_URL"),
        };
        let mut child = command.spawn().expect("start a fleet server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may have written "test fleet_child ... " on the same line.
                if let Some((_, addr)) = line.split_once("LISTENING ")
                    && !sent
                {
                    let _ = found.send(addr.parse::<SocketAddr>().expect("an address"));
                    sent = true;
                }
            }
        });
        let Ok(addr) = address.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server {name} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Self {
            child,
            addr,
            name: name.to_owned(),
            log,
        }
    }

    /// SIGSTOP: the process stops where it is (sockets stay open).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: sends a signal to our own child process; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal the server");
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

/// One HTTP answer: status, the revocation headers, the JSON body (if any).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

impl Reply {
    /// A `Revocation-*` header as a number.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.headers.get(name)?.to_str().ok()?.parse().ok()
    }
}

/// `method path` on `addr` with `key`, and `body` as JSON; `None` if no answer came in `patience`.
pub async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    method: Method,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
    patience: Duration,
) -> Option<Reply> {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("x-api-key", key);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let answer = async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Some(Reply {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(patience, answer).await.ok().flatten()
}

/// Creates a `ledgers:read` key for `owner` with the master key on `addr`: (key, id).
pub async fn create_key(
    client: &HttpClient,
    addr: SocketAddr,
    master: &str,
    owner: &str,
) -> (String, String) {
    let body = serde_json::json!({"name": "fleet", "owner": owner, "scopes": ["ledgers:read"]});
    let reply = call(
        client,
        addr,
        Method::POST,
        "/api-keys",
        master,
        Some(body),
        Duration::from_secs(30),
    )
    .await
    .expect("create answers");
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "create: {:?}",
        reply.body
    );
    (
        reply.body["key"].as_str().unwrap().to_owned(),
        reply.body["api_key_id"].as_str().unwrap().to_owned(),
    )
}

/// `GET /auth/ping` with `key`: its status (`None`: no answer within `patience`).
pub async fn ping(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
    patience: Duration,
) -> Option<StatusCode> {
    call(client, addr, Method::GET, "/auth/ping", key, None, patience)
        .await
        .map(|reply| reply.status)
}

/// Pings until `addr` admits `key` (a new key reaches every instance's cache this way).
pub async fn admitted(client: &HttpClient, addr: SocketAddr, key: &str, within: Duration) {
    let start = Instant::now();
    loop {
        if ping(client, addr, key, Duration::from_secs(5)).await == Some(StatusCode::OK) {
            return;
        }
        assert!(start.elapsed() < within, "{addr} never admitted the key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `DELETE /api-keys/{id}` with the master key: the reply and how long it took.
pub async fn revoke(
    client: &HttpClient,
    addr: SocketAddr,
    master: &str,
    id: &str,
) -> (Reply, Duration) {
    let start = Instant::now();
    let reply = call(
        client,
        addr,
        Method::DELETE,
        &format!("/api-keys/{id}"),
        master,
        None,
        Duration::from_secs(30),
    )
    .await
    .expect("revoke answers");
    (reply, start.elapsed())
}

/// Requests from `workers` loops per server with each server's own key, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Per server: answered 200, answered otherwise.
    counts: Arc<Vec<(AtomicU64, AtomicU64)>>,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addrs: &[SocketAddr], keys: &[String], workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<Vec<(AtomicU64, AtomicU64)>> = Arc::new(
            addrs
                .iter()
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
        );
        let mut tasks = Vec::new();
        for (i, (&addr, key)) in addrs.iter().zip(keys).enumerate() {
            for _ in 0..workers {
                let (stop, counts, key) = (stop.clone(), counts.clone(), key.clone());
                let client = client();
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match ping(&client, addr, &key, Duration::from_secs(5)).await {
                            Some(StatusCode::OK) => counts[i].0.fetch_add(1, Ordering::Relaxed),
                            _ => counts[i].1.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        Self {
            stop,
            counts,
            started: Instant::now(),
            tasks,
        }
    }

    /// Stops; per server, (requests a second answered 200, answered otherwise).
    pub async fn stop(self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        for task in self.tasks {
            let _ = task.await;
        }
        self.counts
            .iter()
            .map(|(ok, other)| {
                (
                    ok.load(Ordering::Relaxed) as f64 / elapsed,
                    other.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// A TCP proxy on 127.0.0.1 that can stop forwarding without closing anything: bytes are held (as
/// a network that drops packets would, TCP retransmitting them later), new connections are
/// accepted and held too. Thawing delivers what was held.
pub struct SilentProxy {
    port: u16,
    frozen: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl SilentProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, watching) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let watching = watching.clone();
                pipes.spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, watching.clone()), pump(ro, wi, watching));
                });
            }
        });
        Self {
            port,
            frozen,
            tasks,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding (nothing is closed).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again, what was held first.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read during a freeze: held until the thaw.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// p50, p99 and max of `values` (sorted in place).
pub fn percentiles(values: &mut [f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
    (at(0.5), at(0.99), values[values.len() - 1])
}

/// The body of a test binary's ignored `fleet_child` test: when started by [`Server::start`],
/// builds the example server (`build` keeps whatever it returns alive) and serves it on a free
/// port, printing `LISTENING <addr>`; otherwise does nothing.
pub fn serve_child<F, Fut>(build: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (axum::Router, Box<dyn std::any::Any>)>,
{
    if std::env::var_os("FLEET_CHILD").is_none() {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (router, _alive) = build().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
}

/// One revocation round: a new key on `servers[i % n]`, admitted by every server (so each caches
/// it), revoked on the next one; then every server is asked at once with the revoked key.
pub struct Round {
    /// Probes admitted (200) right after the revoke answered.
    pub admissions: usize,
    /// `Revocation-Acknowledged`, `Revocation-Instances`, `Revocation-Elapsed-Ms`.
    pub acknowledged: f64,
    pub instances: f64,
    pub elapsed_ms: f64,
    /// How long the `DELETE` took.
    pub answered_in: Duration,
}

pub async fn round(client: &HttpClient, addrs: &[SocketAddr], master: &str, i: usize) -> Round {
    let (key, id) = create_key(client, addrs[i % addrs.len()], master, "fleet").await;
    for &addr in addrs {
        admitted(client, addr, &key, Duration::from_secs(10)).await;
        admitted(client, addr, &key, Duration::from_secs(10)).await;
    }
    let (reply, answered_in) = revoke(client, addrs[(i + 1) % addrs.len()], master, &id).await;
    assert_eq!(
        reply.status,
        StatusCode::NO_CONTENT,
        "revoke: {:?}",
        reply.body
    );
    let probes = futures_util::future::join_all(
        addrs
            .iter()
            .map(|&addr| ping(client, addr, &key, Duration::from_secs(10))),
    )
    .await;
    Round {
        admissions: probes
            .iter()
            .filter(|s| **s == Some(StatusCode::OK))
            .count(),
        acknowledged: reply.number("revocation-acknowledged").unwrap_or(-1.0),
        instances: reply.number("revocation-instances").unwrap_or(-1.0),
        elapsed_ms: reply.number("revocation-elapsed-ms").unwrap_or(-1.0),
        answered_in,
    }
}

/// Probes `addr` with `key` every 20 ms for `during`; the probes admitted (200) after `after`
/// (from now), and every status seen.
pub async fn watch_refused(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
    after: Duration,
    during: Duration,
) -> (usize, Vec<Option<StatusCode>>) {
    let start = Instant::now();
    let mut late_admissions = 0;
    let mut seen = Vec::new();
    while start.elapsed() < during {
        let sent = start.elapsed();
        let status = ping(client, addr, key, Duration::from_secs(10)).await;
        if status == Some(StatusCode::OK) && sent >= after {
            late_admissions += 1;
        }
        seen.push(status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (late_admissions, seen)
}

/// Rounds until one is acknowledged by all three servers (the fleet recovered): how long that took.
/// Failed calls (the store still reconnecting) are retried.
pub async fn recovered(
    client: &HttpClient,
    addrs: &[SocketAddr],
    master: &str,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < within, "the fleet did not recover");
        let body =
            serde_json::json!({"name": "fleet", "owner": "fleet", "scopes": ["ledgers:read"]});
        let created = call(
            client,
            addrs[0],
            Method::POST,
            "/api-keys",
            master,
            Some(body),
            Duration::from_secs(5),
        )
        .await;
        let Some(created) = created.filter(|r| r.status == StatusCode::CREATED) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (key, id) = (
            created.body["key"].as_str().unwrap().to_owned(),
            created.body["api_key_id"].as_str().unwrap().to_owned(),
        );
        for &addr in addrs {
            admitted(client, addr, &key, within).await;
        }
        let (reply, _) = revoke(client, addrs[1], master, &id).await;
        if reply.number("revocation-acknowledged") == Some(addrs.len() as f64) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
