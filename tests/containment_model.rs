//! Containment (issue #19) held against a reference model: I1–I3 checked literally after every
//! step of random operation sequences.
//!
//! The system: the management router, a route costing 1 and one costing 3 behind a
//! `RateLimitLayer` (rates in memory, credits counted in the key store: the chain spend), all
//! behind `ApiKeyLayer`, in process; every request carries a peer address. The model: a forest of
//! keys of one owner and account (seeded by the master key, then grown by the keys themselves), each
//! with an optional rate limit, credits and allowed networks, an account pool and an owner pool.
//! Steps, by random callers (the master key, working and dead secrets): create (with or without
//! limits and networks: the model predicts inheritance and refusals), `PATCH` a rate limit or
//! credits, rotate (with or without a grace period), revoke, delete (master), set a pool (master),
//! and requests of cost 1 or 3 from random addresses.
//!
//! Rate limits here are per hour, so no unit comes back during a run (`refilled` below is 0 unless
//! a run lasts longer than an emission interval, which the checks account for): the model predicts
//! every answer exactly, status and code. And after every step, whatever the model predicted:
//! - **I1**: every working secret obtained with a key's secret (however indirectly) belongs to that
//!   key's subtree, and every successful change by a scoped key targeted its own subtree.
//! - **I2**: every key a scoped key created holds grants within its creator's at creation (scopes
//!   here are all equal; limits and networks checked).
//! - **I3**: for every key `K` with a rate limit, the cost admitted for requests made with any key
//!   of `K`'s subtree since `K`'s limit was last set is at most that limit (plus what the elapsed
//!   time refilled); for every key with credits, the cost admitted since they were last set is at
//!   most what they were set to; the same for both pools over every key of the account. A refused
//!   request spent nothing: the stored credits equal what was set minus what was admitted.
//!
//! `PROPTEST_CASES` sets the number of sequences on `MemoryStore` (default 256, of 1 to 60 steps
//! each: about 7,500 steps); SQLite runs a sixteenth of them (at least 8), PostgreSQL a
//! thirty-second (at least 6), each sequence on a store of its own.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use common::MASTER;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;
use tower_api_keys::key::{ApiKey, KeyId};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::ratelimit::{MemoryRates, RateLimiter, StoreCredits};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

const OWNER: &str = "o";
const ACCOUNT: &str = "a";
const PERIOD: u64 = 3_600;
/// Networks a key may be given (by index) and addresses requests come from.
const NETS: [&str; 4] = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/16"];
const FROM: [&str; 4] = ["10.1.2.3", "10.9.9.9", "192.168.1.1", "172.16.0.1"];
const GRACE_SECONDS: u64 = 3_600;
const MAX_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// The reference model

/// Whether network `inner` (an index into `NETS`) lies inside network `outer`.
fn net_within(inner: usize, outer: usize) -> bool {
    let (i, o) = (NETS[inner], NETS[outer]);
    let (ia, il) = i.split_once('/').unwrap();
    let (oa, ol) = o.split_once('/').unwrap();
    let (il, ol): (u32, u32) = (il.parse().unwrap(), ol.parse().unwrap());
    let bits = |a: &str| -> u32 {
        a.split('.')
            .fold(0u32, |acc, part| (acc << 8) | part.parse::<u32>().unwrap())
    };
    il >= ol && (bits(ia) ^ bits(oa)) >> (32 - ol) == 0
}

/// Whether address `from` (an index into `FROM`) lies inside network `net`.
fn addr_in(from: usize, net: usize) -> bool {
    let (na, nl) = NETS[net].split_once('/').unwrap();
    let nl: u32 = nl.parse().unwrap();
    let bits = |a: &str| -> u32 {
        a.split('.')
            .fold(0u32, |acc, part| (acc << 8) | part.parse::<u32>().unwrap())
    };
    (bits(FROM[from]) ^ bits(na)) >> (32 - nl) == 0
}

fn nets_within(child: &Option<Vec<usize>>, parent: &Option<Vec<usize>>) -> bool {
    match (child, parent) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(c), Some(p)) => c.iter().all(|&c| p.iter().any(|&p| net_within(c, p))),
    }
}

/// A level's rate limit (units per hour).
#[derive(Clone, Copy, Debug)]
struct Rate {
    /// The limit now.
    limit: u64,
    /// The cost admitted since the master key last set it (or since the key was made).
    used: u64,
    /// The largest limit it had since then: a key changing its own limit (or a creator its
    /// delegate's) never gains a fresh window by it, so `used` stays within this.
    most: u64,
    /// Whether it changed since then: the exact remainder then depends on how the limiter carries
    /// a window across a change, which the model does not predict (either answer is accepted; the
    /// bound is checked).
    changed: bool,
}

impl Rate {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            used: 0,
            most: limit,
            changed: false,
        }
    }

    /// Set by a scoped key: the window goes on.
    fn change(&mut self, limit: u64) {
        if limit != self.limit {
            self.limit = limit;
            self.most = self.most.max(limit);
            self.changed = true;
        }
    }

    /// Set by the master key: a new budget (the master key may give anything).
    fn reset(old: Option<Self>, limit: u64) -> Self {
        match old {
            Some(old) if old.limit == limit => old,
            _ => Self {
                changed: old.is_some(),
                ..Self::new(limit)
            },
        }
    }
}

/// A budget level's state: its limit or credits as last set, and what was admitted since.
#[derive(Clone, Debug, Default)]
struct Level {
    rate: Option<Rate>,
    /// Whether it ever had a rate limit (a pool can be removed and set again).
    ever_rated: bool,
    /// Credits as last set, and the cost admitted since.
    credits: Option<(u64, u64)>,
}

impl Level {
    fn credits_left(&self) -> Option<u64> {
        self.credits.map(|(set, spent)| set - spent)
    }
}

#[derive(Clone, Debug)]
struct Key {
    id: String,
    parent: Option<usize>,
    level: Level,
    networks: Option<Vec<usize>>,
    revoked: bool,
    deleted: bool,
    current: String,
    previous: Option<String>,
    /// Its expiry: a key created with a secret in its rotation grace period gets that grace end.
    expires_at: Option<OffsetDateTime>,
    /// The end of the previous secret's grace period.
    grace_until: Option<OffsetDateTime>,
}

#[derive(Clone, Debug)]
struct Credential {
    secret: String,
    key: Option<usize>,
    /// The key whose seeded secret started the chain that obtained this one (`None`: master).
    origin: Option<usize>,
}

struct Model {
    keys: Vec<Key>,
    credentials: Vec<Credential>,
    account_pool: Level,
    owner_pool: Level,
}

impl Model {
    /// Whether `key` is `root` or was created by it, directly or through its delegates. A deleted
    /// key's record is gone, and with it the lineage through it: the keys below it (all revoked by
    /// the deletion) are no longer anyone's subtree but their own.
    fn in_subtree(&self, key: usize, root: usize) -> bool {
        let mut next = Some(key);
        while let Some(i) = next {
            if i == root {
                return true;
            }
            next = self.keys[i].parent.filter(|&p| !self.keys[p].deleted);
        }
        false
    }

    fn ancestors(&self, key: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut next = self.keys[key].parent;
        while let Some(i) = next {
            out.push(i);
            next = self.keys[i].parent;
        }
        out
    }

    /// The key a credential authenticates as, or the 401's code; `Ok(None)` for the master key.
    fn authenticate(&self, credential: &Credential) -> Result<Option<usize>, &'static str> {
        let Some(k) = credential.key else {
            return Ok(None);
        };
        let key = &self.keys[k];
        if key.deleted
            || (key.current != credential.secret
                && key.previous.as_deref() != Some(credential.secret.as_str()))
        {
            return Err("AUTH_INVALID_API_KEY");
        }
        let dead = std::iter::once(k)
            .chain(self.ancestors(k))
            .any(|i| self.keys[i].revoked || self.keys[i].deleted);
        if dead {
            return Err("AUTH_EXPIRED_API_KEY");
        }
        Ok(Some(k))
    }

    /// Every level a request of key `k` counts against, as mutable references are not needed:
    /// indices (`Some(key)`, `None` for the pools handled apart).
    fn chain(&self, k: usize) -> Vec<usize> {
        std::iter::once(k).chain(self.ancestors(k)).collect()
    }

    /// The answer to a request of `cost` from key `k`: admitted, or the refusal's code.
    fn judge_request(&self, k: usize, cost: u64, from: usize) -> Result<(), &'static str> {
        let key = &self.keys[k];
        if let Some(nets) = &key.networks
            && !nets.iter().any(|&n| addr_in(from, n))
        {
            return Err("AUTH_NETWORK_NOT_ALLOWED");
        }
        let levels: Vec<&Level> = self
            .chain(k)
            .into_iter()
            .map(|i| &self.keys[i].level)
            .chain([&self.account_pool, &self.owner_pool])
            .collect();
        // Credits are asked first; a rate refusal gives them back.
        if levels
            .iter()
            .any(|l| l.credits_left().is_some_and(|left| left < cost))
        {
            return Err("USAGE_EXCEEDED");
        }
        if levels.iter().any(|l| {
            l.rate
                .is_some_and(|r| !r.changed && r.used + cost > r.limit)
        }) {
            return Err("RATE_LIMITED");
        }
        Ok(())
    }

    /// The effective expiry of a credential: the key's, or the end of the grace period when it is
    /// the previous secret (I2: a grace end counts).
    fn effective_expiry(&self, credential: &Credential) -> Option<OffsetDateTime> {
        let key = &self.keys[credential.key?];
        let grace = (key.previous.as_deref() == Some(credential.secret.as_str())
            && key.current != credential.secret)
            .then_some(key.grace_until)
            .flatten();
        match (key.expires_at, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a power operation of `credential` on `target` would leave it outliving the caller.
    fn outlives(&self, credential: &Credential, target: usize) -> bool {
        self.effective_expiry(credential)
            .is_some_and(|limit| self.keys[target].expires_at.is_none_or(|at| at > limit))
    }

    /// Whether a level on `k`'s chain has a changed rate limit (its remainder is not predicted).
    fn uncertain(&self, k: usize) -> bool {
        self.chain(k)
            .into_iter()
            .map(|i| &self.keys[i].level)
            .chain([&self.account_pool, &self.owner_pool])
            .any(|l| l.rate.is_some_and(|r| r.changed))
    }

    /// The refusal a scoped key gets before anything else when it calls from `from` outside its
    /// networks.
    fn network_refusal(&self, key: Option<usize>, from: usize) -> bool {
        key.and_then(|k| self.keys[k].networks.as_ref())
            .is_some_and(|nets| !nets.iter().any(|&n| addr_in(from, n)))
    }

    fn admit(&mut self, k: usize, cost: u64) {
        for i in self.chain(k) {
            spend(&mut self.keys[i].level, cost);
        }
        spend(&mut self.account_pool, cost);
        spend(&mut self.owner_pool, cost);
    }
}

fn spend(level: &mut Level, cost: u64) {
    if let Some(rate) = &mut level.rate {
        rate.used += cost;
    }
    if let Some((_, spent)) = &mut level.credits {
        *spent += cost;
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
enum Op {
    Create {
        caller: usize,
        rate: Option<u64>,
        credits: Option<u64>,
        networks: Option<Vec<usize>>,
    },
    Patch {
        caller: usize,
        target: usize,
        rate: Option<u64>,
        credits: Option<u64>,
    },
    Rotate {
        caller: usize,
        target: usize,
        grace: bool,
    },
    Revoke {
        caller: usize,
        target: usize,
    },
    Delete {
        target: usize,
    },
    SetPool {
        account: bool,
        rate: Option<u64>,
        credits: Option<u64>,
    },
    Request {
        caller: usize,
        cost: u64,
        from: usize,
    },
}

fn small() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![2 => Just(None), 1 => (1..12u64).prop_map(Some)]
}

fn op() -> impl Strategy<Value = Op> {
    let who = any::<u16>().prop_map(usize::from);
    prop_oneof![
        4 => (who.clone(), small(), small(), prop_oneof![2 => Just(None), 1 => prop::collection::vec(0..NETS.len(), 1..3).prop_map(Some)])
            .prop_map(|(caller, rate, credits, networks)| Op::Create { caller, rate, credits, networks }),
        2 => (who.clone(), who.clone(), small(), small())
            .prop_map(|(caller, target, rate, credits)| Op::Patch { caller, target, rate, credits }),
        2 => (who.clone(), who.clone(), any::<bool>()).prop_map(|(caller, target, grace)| Op::Rotate { caller, target, grace }),
        1 => (who.clone(), who.clone()).prop_map(|(caller, target)| Op::Revoke { caller, target }),
        1 => who.clone().prop_map(|target| Op::Delete { target }),
        1 => (any::<bool>(), small(), small()).prop_map(|(account, rate, credits)| Op::SetPool { account, rate, credits }),
        8 => (who, prop_oneof![3 => Just(1u64), 1 => Just(3u64)], 0..FROM.len())
            .prop_map(|(caller, cost, from)| Op::Request { caller, cost, from }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The system under test

struct System {
    app: Router,
    store: Arc<dyn KeyStore>,
}

fn system(store: Arc<dyn KeyStore>) -> System {
    let resolver = CachedResolver::new(store.clone());
    let limiter = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let app = Router::new()
        .route(
            "/work1",
            get(|| async { "done" }).route_layer(limiter.layer()),
        )
        .route(
            "/work3",
            get(|| async { "done" }).route_layer(limiter.layer().cost(3)),
        )
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)));
    System { app, store }
}

impl System {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        key: &str,
        from: usize,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", key);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let mut request = request.body(body).unwrap();
        let peer: SocketAddr = format!("{}:40000", FROM[from]).parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn code(json: &Value) -> &str {
    json["error_detail"]["code"].as_str().unwrap_or("")
}

fn rate_body(rate: u64) -> Value {
    json!({"limit": rate, "period_seconds": PERIOD})
}

// ---------------------------------------------------------------------------------------------
// One sequence

/// Address 0 is inside every seeded network choice below; management calls come from it.
const HOME: usize = 0;

async fn run(
    store: Arc<dyn KeyStore>,
    seeds: Vec<(Option<u64>, Option<u64>)>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let sys = system(store);
    let started = Instant::now();
    let mut model = Model {
        keys: Vec::new(),
        credentials: vec![Credential {
            secret: MASTER.into(),
            key: None,
            origin: None,
        }],
        account_pool: Level::default(),
        owner_pool: Level::default(),
    };
    // Seeds: made by the master key, with `api-keys:write` so that they delegate.
    for (rate, credits) in seeds {
        let mut body =
            json!({"owner": OWNER, "account": ACCOUNT, "scopes": ["api-keys:write", "work:read"]});
        if let Some(rate) = rate {
            body["rate_limit"] = rate_body(rate);
        }
        if let Some(credits) = credits {
            body["credits"] = json!({"remaining": credits});
        }
        let (status, json) = sys
            .send("POST", "/api-keys", MASTER, HOME, Some(body))
            .await;
        prop_assert_eq!(status, StatusCode::CREATED, "{}", json);
        let index = model.keys.len();
        let secret = json["key"].as_str().unwrap().to_owned();
        model.keys.push(Key {
            id: json["api_key_id"].as_str().unwrap().to_owned(),
            parent: None,
            level: Level {
                rate: rate.map(Rate::new),
                credits: credits.map(|c| (c, 0)),
                ever_rated: rate.is_some(),
            },
            networks: None,
            revoked: false,
            deleted: false,
            current: secret.clone(),
            previous: None,
            expires_at: None,
            grace_until: None,
        });
        model.credentials.push(Credential {
            secret,
            key: Some(index),
            origin: Some(index),
        });
    }
    for (n, op) in ops.iter().enumerate() {
        let step = format!("step {n} {op:?}");
        apply(&sys, &mut model, op, &step).await?;
        invariants(&sys, &model, started, &step).await?;
    }
    Ok(())
}

/// The caller of a step: three in four among working secrets (the master key included), the rest
/// among every secret ever handed out.
fn pick(model: &Model, who: usize) -> Credential {
    let live: Vec<&Credential> = model
        .credentials
        .iter()
        .filter(|c| model.authenticate(c).is_ok())
        .collect();
    if who.is_multiple_of(4) {
        model.credentials[who / 4 % model.credentials.len()].clone()
    } else {
        live[who / 4 % live.len()].clone()
    }
}

fn target_of(model: &Model, who: usize) -> usize {
    who % model.keys.len()
}

async fn apply(sys: &System, model: &mut Model, op: &Op, step: &str) -> Result<(), TestCaseError> {
    match op {
        Op::Request { caller, cost, from } => {
            let credential = pick(model, *caller);
            let path = if *cost == 1 { "/work1" } else { "/work3" };
            let (status, json) = sys.send("GET", path, &credential.secret, *from, None).await;
            let expect = match model.authenticate(&credential) {
                Err(code) => Err((StatusCode::UNAUTHORIZED, code)),
                Ok(None) => Ok(()),
                Ok(Some(k)) => model.judge_request(k, *cost, *from).map_err(|code| {
                    let status = match code {
                        "AUTH_NETWORK_NOT_ALLOWED" => StatusCode::FORBIDDEN,
                        _ => StatusCode::TOO_MANY_REQUESTS,
                    };
                    (status, code)
                }),
            };
            let key = model.authenticate(&credential).ok().flatten();
            match expect {
                // A changed rate limit somewhere on the chain: its remainder is the limiter's.
                Ok(())
                    if key.is_some_and(|k| model.uncertain(k))
                        && status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    prop_assert_eq!(code(&json), "RATE_LIMITED", "{}", step);
                }
                Ok(()) => {
                    prop_assert_eq!(status, StatusCode::OK, "{}: {}", step, json);
                    if let Some(k) = key {
                        model.admit(k, *cost);
                    }
                }
                Err((want, want_code)) => {
                    prop_assert_eq!((status, code(&json)), (want, want_code), "{}", step);
                }
            }
        }
        Op::Create {
            caller,
            rate,
            credits,
            networks,
        } => {
            let credential = pick(model, *caller);
            let Ok(caller_key) = model.authenticate(&credential) else {
                return Ok(());
            };
            let mut body = json!({"scopes": ["api-keys:write", "work:read"]});
            if caller_key.is_none() {
                body["owner"] = json!(OWNER);
                body["account"] = json!(ACCOUNT);
            }
            if let Some(rate) = rate {
                body["rate_limit"] = rate_body(*rate);
            }
            if let Some(credits) = credits {
                body["credits"] = json!({"remaining": credits});
            }
            if let Some(nets) = networks {
                body["allowed_networks"] = json!(nets.iter().map(|&i| NETS[i]).collect::<Vec<_>>());
            }
            let (status, json) = sys
                .send("POST", "/api-keys", &credential.secret, HOME, Some(body))
                .await;
            // What the new key gets: what is asked, else what a scoped creator has.
            let parent = caller_key.map(|k| &model.keys[k]);
            let got_rate = rate.or(parent.and_then(|p| p.level.rate.map(|r| r.limit)));
            let got_credits = credits.or(parent.and_then(|p| p.level.credits_left()));
            let got_networks = networks.clone().or(parent.and_then(|p| p.networks.clone()));
            let expect = match parent {
                None => Ok(()),
                Some(_) if model.network_refusal(caller_key, HOME) => {
                    Err("AUTH_NETWORK_NOT_ALLOWED")
                }
                Some(_) if model.ancestors(caller_key.unwrap()).len() + 1 > MAX_DEPTH => {
                    Err("AUTH_SCOPE_ESCALATION")
                }
                Some(p) => {
                    let rate_ok = p
                        .level
                        .rate
                        .is_none_or(|own| got_rate.is_some_and(|r| r <= own.limit));
                    let credits_ok = p
                        .level
                        .credits_left()
                        .is_none_or(|left| got_credits.is_some_and(|c| c <= left));
                    if rate_ok && credits_ok && nets_within(&got_networks, &p.networks) {
                        Ok(())
                    } else {
                        Err("AUTH_SCOPE_ESCALATION")
                    }
                }
            };
            match expect {
                Err(want) => {
                    prop_assert_eq!(
                        (status, code(&json)),
                        (StatusCode::FORBIDDEN, want),
                        "{}",
                        step
                    );
                }
                Ok(()) => {
                    prop_assert_eq!(status, StatusCode::CREATED, "{}: {}", step, json);
                    // I2, literally: within the creator's grants.
                    if let Some(p) = parent {
                        prop_assert!(nets_within(&got_networks, &p.networks), "{}", step);
                    }
                    let secret = json["key"].as_str().unwrap().to_owned();
                    let index = model.keys.len();
                    model.keys.push(Key {
                        id: json["api_key_id"].as_str().unwrap().to_owned(),
                        parent: caller_key,
                        level: Level {
                            rate: got_rate.map(Rate::new),
                            credits: got_credits.map(|c| (c, 0)),
                            ever_rated: got_rate.is_some(),
                        },
                        networks: got_networks,
                        revoked: false,
                        deleted: false,
                        current: secret.clone(),
                        previous: None,
                        // No lifetime policy: a delegate gets its creator's effective expiry.
                        expires_at: model.effective_expiry(&credential),
                        grace_until: None,
                    });
                    model.credentials.push(Credential {
                        secret,
                        key: Some(index),
                        origin: credential.origin,
                    });
                }
            }
        }
        Op::Patch {
            caller,
            target,
            rate,
            credits,
        } => {
            if rate.is_none() && credits.is_none() {
                return Ok(());
            }
            let credential = pick(model, *caller);
            let Ok(caller_key) = model.authenticate(&credential) else {
                return Ok(());
            };
            let t = target_of(model, *target);
            let mut body = json!({});
            if let Some(rate) = rate {
                body["rate_limit"] = rate_body(*rate);
            }
            if let Some(credits) = credits {
                body["credits"] = json!({"remaining": credits});
            }
            let uri = format!("/api-keys/{}", model.keys[t].id);
            let (status, json) = sys
                .send("PATCH", &uri, &credential.secret, HOME, Some(body))
                .await;
            let expect = match caller_key {
                _ if model.network_refusal(caller_key, HOME) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_NETWORK_NOT_ALLOWED"))
                }
                _ if model.keys[t].deleted => Err((StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND")),
                None => Ok(()),
                Some(c) if !model.in_subtree(t, c) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"))
                }
                Some(c) => {
                    let own = &model.keys[c].level;
                    let rate_ok =
                        rate.is_none() || own.rate.is_none_or(|own| rate.unwrap() <= own.limit);
                    let credits_ok = credits.is_none()
                        || own
                            .credits_left()
                            .is_none_or(|left| credits.unwrap() <= left);
                    if rate_ok && credits_ok && !model.outlives(&credential, t) {
                        Ok(())
                    } else {
                        Err((StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION"))
                    }
                }
            };
            match expect {
                Err((want, want_code)) => {
                    prop_assert_eq!(
                        (status, code(&json)),
                        (want, want_code),
                        "{}: {}",
                        step,
                        json
                    )
                }
                Ok(()) => {
                    prop_assert_eq!(status, StatusCode::OK, "{}: {}", step, json);
                    if let Some(c) = caller_key {
                        prop_assert!(model.in_subtree(t, c), "{}: changed outside", step);
                    }
                    let level = &mut model.keys[t].level;
                    if let Some(rate) = *rate {
                        level.rate = match (level.rate, caller_key) {
                            (Some(mut old), Some(_)) => {
                                old.change(rate);
                                Some(old)
                            }
                            (old, _) => Some(Rate::reset(old, rate)),
                        };
                    }
                    if let Some(credits) = credits {
                        level.credits = Some((*credits, 0));
                    }
                }
            }
        }
        Op::Rotate {
            caller,
            target,
            grace,
        } => {
            let credential = pick(model, *caller);
            let Ok(caller_key) = model.authenticate(&credential) else {
                return Ok(());
            };
            let t = target_of(model, *target);
            let uri = format!("/api-keys/{}/rotate", model.keys[t].id);
            let body = grace.then(|| json!({"grace_period_seconds": GRACE_SECONDS}));
            let (status, json) = sys.send("POST", &uri, &credential.secret, HOME, body).await;
            let dead = model.keys[t].revoked
                || model
                    .ancestors(t)
                    .iter()
                    .any(|&a| model.keys[a].revoked || model.keys[a].deleted);
            let expect = match caller_key {
                _ if model.network_refusal(caller_key, HOME) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_NETWORK_NOT_ALLOWED"))
                }
                _ if model.keys[t].deleted => Err((StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND")),
                Some(c) if !model.in_subtree(t, c) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"))
                }
                Some(_) if model.outlives(&credential, t) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION"))
                }
                _ if dead => Err((StatusCode::BAD_REQUEST, "APIKEY_INVALID")),
                _ => Ok(()),
            };
            match expect {
                Err((want, want_code)) => {
                    prop_assert_eq!(
                        (status, code(&json)),
                        (want, want_code),
                        "{}: {}",
                        step,
                        json
                    );
                    prop_assert!(json.get("key").is_none());
                }
                Ok(()) => {
                    prop_assert_eq!(status, StatusCode::OK, "{}: {}", step, json);
                    if let Some(c) = caller_key {
                        prop_assert!(model.in_subtree(t, c), "{}: rotated outside", step);
                    }
                    let secret = json["key"].as_str().unwrap().to_owned();
                    let grace_until = match grace {
                        true => {
                            let id = KeyId::new(&*model.keys[t].id);
                            let record = sys.store.get(&id).await.unwrap().unwrap();
                            Some(record.previous.expect("a grace period").valid_until)
                        }
                        false => None,
                    };
                    let key = &mut model.keys[t];
                    key.previous = grace.then(|| key.current.clone());
                    key.grace_until = grace_until;
                    key.current = secret.clone();
                    model.credentials.push(Credential {
                        secret,
                        key: Some(t),
                        origin: credential.origin,
                    });
                }
            }
        }
        Op::Revoke { caller, target } => {
            let credential = pick(model, *caller);
            let Ok(caller_key) = model.authenticate(&credential) else {
                return Ok(());
            };
            let t = target_of(model, *target);
            let uri = format!("/api-keys/{}", model.keys[t].id);
            let (status, json) = sys
                .send("DELETE", &uri, &credential.secret, HOME, None)
                .await;
            let expect = match caller_key {
                _ if model.network_refusal(caller_key, HOME) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_NETWORK_NOT_ALLOWED"))
                }
                _ if model.keys[t].deleted => Err((StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND")),
                Some(c) if !model.in_subtree(t, c) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE"))
                }
                Some(_) if model.outlives(&credential, t) => {
                    Err((StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION"))
                }
                _ => Ok(()),
            };
            match expect {
                Err((want, want_code)) => {
                    prop_assert_eq!(
                        (status, code(&json)),
                        (want, want_code),
                        "{}: {}",
                        step,
                        json
                    )
                }
                Ok(()) => {
                    prop_assert_eq!(status, StatusCode::NO_CONTENT, "{}: {}", step, json);
                    model.keys[t].revoked = true;
                }
            }
        }
        Op::Delete { target } => {
            let t = target_of(model, *target);
            let uri = format!("/api-keys/{}?permanent=true", model.keys[t].id);
            let (status, _) = sys.send("DELETE", &uri, MASTER, HOME, None).await;
            if model.keys[t].deleted {
                prop_assert_eq!(status, StatusCode::NOT_FOUND, "{}", step);
            } else {
                prop_assert_eq!(status, StatusCode::NO_CONTENT, "{}", step);
                model.keys[t].deleted = true;
            }
        }
        Op::SetPool {
            account,
            rate,
            credits,
        } => {
            let mut body = json!({"owner": OWNER});
            if *account {
                body["account"] = json!(ACCOUNT);
            }
            if let Some(rate) = rate {
                body["rate_limit"] = rate_body(*rate);
            }
            if let Some(credits) = credits {
                body["credits"] = json!({"remaining": credits});
            }
            let (status, json) = sys
                .send("PUT", "/api-keys/pools", MASTER, HOME, Some(body))
                .await;
            prop_assert_eq!(status, StatusCode::OK, "{}: {}", step, json);
            let pool = if *account {
                &mut model.account_pool
            } else {
                &mut model.owner_pool
            };
            // A pool removed and set again may go on from its old window (the limiter keeps a
            // level's state while it is cached): not predicted, the bound still checked.
            let was = pool.rate.is_some() || pool.ever_rated;
            pool.rate = rate.map(|r| Rate {
                changed: was && pool.rate.is_none_or(|old| old.limit != r)
                    || pool.rate.is_some_and(|old| old.changed && old.limit == r),
                ..Rate::reset(pool.rate, r)
            });
            pool.ever_rated |= rate.is_some();
            pool.credits = credits.map(|c| (c, 0));
        }
    }
    Ok(())
}

/// I1 and I3 after every step, from what the server answered.
async fn invariants(
    sys: &System,
    model: &Model,
    started: Instant,
    step: &str,
) -> Result<(), TestCaseError> {
    // I1: every working secret a holder obtained belongs to its subtree.
    for credential in &model.credentials {
        if let (Some(origin), Ok(Some(key))) = (credential.origin, model.authenticate(credential)) {
            prop_assert!(
                model.in_subtree(key, origin),
                "{}: the holder of key {} holds a working secret of key {}",
                step,
                origin,
                key
            );
        }
    }
    // I3: no level admitted more than its limit since it was set (plus what time refilled), nor
    // spent more than its credits; the store's count of credits agrees.
    let elapsed = started.elapsed().as_secs_f64();
    let levels = model
        .keys
        .iter()
        .map(|k| (Some(k), &k.level))
        .chain([(None, &model.account_pool), (None, &model.owner_pool)]);
    for (key, level) in levels {
        if let Some(rate) = level.rate {
            let refilled = (elapsed * rate.most as f64 / PERIOD as f64).floor() as u64;
            prop_assert!(
                rate.used <= rate.most + refilled,
                "{}: {} admitted on a rate limit of at most {} since the master key set it",
                step,
                rate.used,
                rate.most
            );
        }
        if let Some((set, spent)) = level.credits {
            prop_assert!(spent <= set, "{}: {} spent of {} credits", step, spent, set);
            if let Some(key) = key
                && !key.deleted
            {
                let record = sys.store.get(&KeyId::new(&*key.id)).await.unwrap().unwrap();
                let stored = record.limits.credits.map(|c| c.remaining);
                prop_assert_eq!(
                    stored,
                    Some(set - spent),
                    "{}: the store counts what was admitted, nothing for refusals",
                    step
                );
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn budgets_and_secrets_stay_inside_their_subtree(
        seeds in prop::collection::vec((small(), small()), 1..4),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(Arc::new(MemoryStore::new()), seeds, ops))?;
    }
}

// The same on the SQL stores, fewer sequences (each opens and migrates a store of its own).

#[cfg(feature = "sqlite")]
proptest! {
    #![proptest_config(ProptestConfig { cases: (cases() / 16).max(8), ..ProptestConfig::default() })]

    #[test]
    fn on_sqlite(
        seeds in prop::collection::vec((small(), small()), 1..4),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        use tower_api_keys::store::SqliteStore;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let path = std::env::temp_dir().join(format!("{}.db", common::db::unique("containment")));
        let result = runtime.block_on(async {
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let store = SqliteStore::connect(&url).await.expect("open SQLite file");
            let result = run(Arc::new(store.clone()), seeds, ops).await;
            store.pool().close().await;
            result
        });
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
        result?;
    }
}

#[cfg(feature = "postgres")]
proptest! {
    #![proptest_config(ProptestConfig { cases: (cases() / 32).max(6), ..ProptestConfig::default() })]

    #[test]
    fn on_postgres(
        seeds in prop::collection::vec((small(), small()), 1..4),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let Some(schema) = common::db::pg_schema("containment_model").await else {
                return Ok(());
            };
            let store = schema.store().await;
            let result = run(Arc::new(store.clone()), seeds, ops).await;
            store.pool().close().await;
            schema.drop_schema().await;
            result
        })?;
    }
}
