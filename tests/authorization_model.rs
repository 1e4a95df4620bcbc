//! The authorization rule of key management, held against a reference model.
//!
//! Random sequences of create / rotate (with and without a grace period, with and without ending
//! the descendants) / revoke / update (`PATCH`, a new name) / delete / get / list / events (`GET
//! /api-keys/{id}/events`), by random callers: the master key, keys of two
//! owners and two accounts (the same account names in both owners) with random scope sets, expired
//! keys, revoked and deleted keys, replaced secrets, old secrets in their grace period and old
//! secrets whose grace is over. Each step goes through the real management router behind
//! `ApiKeyLayer` (in process, `tower::ServiceExt::oneshot`), and the model predicts the status and
//! error code from the rule as DESIGN.md states it ("Who may do what to a key"), written here
//! independently of `manage::authorize` (its own scope matching, its own order of checks).
//!
//! After every step, besides "the model's status equals the server's":
//! - I1, literally: every working secret held by the holder of a key `k` (its seeded secret and
//!   everything obtained with it or with what it obtained) belongs to `k`'s subtree; and every
//!   successful rotate, revoke or update by a scoped key targeted its own subtree (so no
//!   descendant ever changed an ancestor);
//! - no scoped caller obtained a secret whose scopes it does not cover, or that outlives it;
//! - no scoped caller saw (get, list) or changed a key outside its owner and account;
//! - no scoped caller read the events of a key outside its own subtree, and every event a read
//!   returned is about the key asked for;
//! - every secret ever issued authenticates exactly when the model says so, and in particular no
//!   key whose ancestor (through `created_by`) was revoked or deleted authenticates;
//! - a change broadcasts exactly when something changed (a no-op revoke broadcasts nothing).
//!
//! `PROPTEST_CASES` sets the number of sequences (default 128, of 1 to 47 steps each: about 3,000 steps).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::MASTER;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;
use tower_api_keys::invalidate::{Invalidation, Invalidator};
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{
    KeyLimits, KeyRecord, KeyStore, MemoryStore, PreviousSecret, StoreError,
};

const OWNERS: [&str; 2] = ["o1", "o2"];
const ACCOUNTS: [&str; 2] = ["a1", "a2"];
const SCOPES: [&str; 8] = [
    "api-keys:read",
    "api-keys:write",
    "api-keys:*",
    "ledgers:read",
    "ledgers:write",
    "ledgers:*",
    "*:read",
    "*:*",
];
/// Expiries used, in days from the start of a sequence (never, or far enough that none passes
/// during a run, or already past).
const EXPIRIES: [Option<i64>; 4] = [None, Some(2), Some(5), Some(10)];
const GRACE_SECONDS: u64 = 3_600;
/// The delegation depth cap (`store::MAX_DELEGATION_DEPTH`), restated.
const MAX_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// The reference model

/// `resource:action` grants `resource:action`, with `*` matching anything on either side.
fn grants(granted: &str, required: &str) -> bool {
    let (gr, ga) = granted.split_once(':').unwrap();
    let (rr, ra) = required.split_once(':').unwrap();
    (gr == "*" || gr == rr) && (ga == "*" || ga == ra)
}

fn holds(scopes: &BTreeSet<&'static str>, required: &str) -> bool {
    scopes.iter().any(|s| grants(s, required))
}

fn covers(caller: &BTreeSet<&'static str>, target: &BTreeSet<&'static str>) -> bool {
    target.iter().all(|t| holds(caller, t))
}

/// "No later than": `None` is never.
fn no_later(target: Option<OffsetDateTime>, limit: Option<OffsetDateTime>) -> bool {
    match (target, limit) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(t), Some(l)) => t <= l,
    }
}

#[derive(Clone, Debug)]
struct Key {
    id: String,
    owner: &'static str,
    account: &'static str,
    scopes: BTreeSet<&'static str>,
    expires_at: Option<OffsetDateTime>,
    revoked: bool,
    deleted: bool,
    created_by: Option<usize>,
    current: String,
    /// The previous secret and the end of its grace period.
    previous: Option<(String, OffsetDateTime)>,
}

/// A secret ever handed out (or seeded): `key` is `None` for the master key.
///
/// `origin` is who holds it, as an adversary would: the key whose seeded secret started the chain
/// of operations that handed this secret out (`None`: the master key's holder). A secret obtained
/// with a credential of origin `o` has origin `o` too. I1 says: a working secret of origin `o`
/// belongs to `o`'s subtree.
#[derive(Clone, Debug)]
struct Credential {
    secret: String,
    key: Option<usize>,
    origin: Option<usize>,
}

/// Who a credential authenticates as, per the model.
#[derive(Clone, Debug)]
struct Caller {
    key: Option<usize>,
    owner: &'static str,
    account: &'static str,
    scopes: BTreeSet<&'static str>,
    /// Effective expiry.
    expires_at: Option<OffsetDateTime>,
}

type Expect = Result<(), (StatusCode, &'static str)>;

fn refuse(status: StatusCode, code: &'static str) -> Expect {
    Err((status, code))
}

struct Model {
    keys: Vec<Key>,
    credentials: Vec<Credential>,
    now: OffsetDateTime,
}

impl Model {
    /// The layer's answer for a credential: who it is, or the 401's code.
    fn authenticate(&self, credential: &Credential) -> Result<Option<Caller>, &'static str> {
        let Some(index) = credential.key else {
            return Ok(None);
        };
        let key = &self.keys[index];
        let grace_end = match &key.previous {
            _ if key.deleted => return Err("AUTH_INVALID_API_KEY"),
            _ if key.current == credential.secret => None,
            Some((old, until)) if *old == credential.secret => Some(*until),
            _ => return Err("AUTH_INVALID_API_KEY"),
        };
        if key.revoked {
            return Err("AUTH_EXPIRED_API_KEY");
        }
        let now = OffsetDateTime::now_utc();
        if key.expires_at.is_some_and(|at| at <= now) || grace_end.is_some_and(|at| at <= now) {
            return Err("AUTH_EXPIRED_API_KEY");
        }
        // The effective expiry: an old secret in its grace period acts until the grace end, when
        // that is earlier than the key's own expiry.
        let expires_at = match (key.expires_at, grace_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Some(Caller {
            key: Some(index),
            owner: key.owner,
            account: key.account,
            scopes: key.scopes.clone(),
            expires_at,
        }))
    }

    /// The rule, as DESIGN.md states it, for an id-addressed operation.
    fn judge_key(
        &self,
        caller: &Option<Caller>,
        power: Power,
        target: Option<usize>,
        named_owner: Option<&'static str>,
    ) -> Expect {
        let target_index = target;
        let target = target.map(|t| &self.keys[t]).filter(|k| !k.deleted);
        let Some(caller) = caller else {
            return match target {
                Some(key) if named_owner.is_none_or(|o| o == key.owner) => Ok(()),
                _ => refuse(StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND"),
            };
        };
        match power {
            Power::MasterOnly => {
                return refuse(StatusCode::FORBIDDEN, "AUTH_MASTER_KEY_REQUIRED");
            }
            Power::Read | Power::ReadSubtree
                if !holds(&caller.scopes, "api-keys:read")
                    && !holds(&caller.scopes, "api-keys:write") =>
            {
                return refuse(StatusCode::FORBIDDEN, "AUTH_INSUFFICIENT_PERMISSIONS");
            }
            Power::Write if !holds(&caller.scopes, "api-keys:write") => {
                return refuse(StatusCode::FORBIDDEN, "AUTH_INSUFFICIENT_PERMISSIONS");
            }
            _ => {}
        }
        if named_owner.is_some_and(|o| o != caller.owner) {
            return refuse(StatusCode::FORBIDDEN, "AUTH_CROSS_OWNER_ACCESS");
        }
        let Some(key) = target.filter(|k| k.owner == caller.owner && k.account == caller.account)
        else {
            return refuse(StatusCode::NOT_FOUND, "APIKEY_NOT_FOUND");
        };
        // I1: a scoped key changes (or obtains the secret of) its own subtree only.
        if matches!(power, Power::Write | Power::ReadSubtree)
            && !self.in_subtree(target_index.unwrap(), caller.key.unwrap())
        {
            return refuse(StatusCode::FORBIDDEN, "AUTH_OUTSIDE_SUBTREE");
        }
        if power == Power::Write
            && !(covers(&caller.scopes, &key.scopes) && no_later(key.expires_at, caller.expires_at))
        {
            return refuse(StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION");
        }
        Ok(())
    }

    /// Every descendant of `root` (through `created_by`, deleted keys included).
    fn descendants(&self, root: usize) -> Vec<usize> {
        let mut found = Vec::new();
        let mut pending = vec![root];
        while let Some(parent) = pending.pop() {
            for (i, key) in self.keys.iter().enumerate() {
                if key.created_by == Some(parent) {
                    found.push(i);
                    pending.push(i);
                }
            }
        }
        found
    }

    /// Revokes the descendants of `root`; whether any changed.
    fn revoke_descendants(&mut self, root: usize) -> bool {
        let mut changed = false;
        for i in self.descendants(root) {
            let key = &mut self.keys[i];
            if !key.deleted && !key.revoked {
                key.revoked = true;
                changed = true;
            }
        }
        changed
    }

    /// Whether `key` is `root` or was created by it, directly or through its delegates: the
    /// subtree of `root`. Written from `created_by` links alone, independently of the server's
    /// lineage walk.
    fn in_subtree(&self, key: usize, root: usize) -> bool {
        let mut next = Some(key);
        while let Some(i) = next {
            if i == root {
                return true;
            }
            // A deleted key's record is gone, and the lineage through it with it.
            next = self.keys[i].created_by.filter(|&p| !self.keys[p].deleted);
        }
        false
    }

    /// How many ancestors a key has, up to the first deleted one (whose record is gone).
    fn depth(&self, key: usize) -> usize {
        let mut depth = 0;
        let mut next = self.keys[key].created_by;
        while let Some(i) = next {
            if self.keys[i].deleted {
                break;
            }
            depth += 1;
            next = self.keys[i].created_by;
        }
        depth
    }

    /// Whether a key or one of its ancestors was revoked or deleted.
    fn ancestry_dead(&self, index: usize) -> bool {
        let mut next = Some(index);
        while let Some(i) = next {
            let key = &self.keys[i];
            if key.revoked || key.deleted {
                return true;
            }
            next = key.created_by;
        }
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    Read,
    /// Reading a key's activity: like `Read`, inside the caller's subtree only (I1).
    ReadSubtree,
    Write,
    MasterOnly,
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
struct Seed {
    owner: usize,
    account: usize,
    scopes: Vec<usize>,
    /// Index into `EXPIRIES`, or `None` for an already expired key.
    expiry: Option<usize>,
    /// Revoked when seeded.
    revoked: bool,
    /// Carries a rotated-out secret whose grace period is over.
    stale_previous: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        caller: usize,
        owner: Option<usize>,
        account: Option<usize>,
        scopes: Vec<usize>,
        /// Index into `EXPIRIES` for an explicit expiry (index 0: none asked for), or `None` for one
        /// in the past.
        expiry: Option<usize>,
    },
    Rotate {
        caller: usize,
        target: usize,
        owner: Option<usize>,
        grace: bool,
        revoke_descendants: bool,
    },
    Revoke {
        caller: usize,
        target: usize,
        owner: Option<usize>,
    },
    /// `PATCH /api-keys/{id}` with a new name (`n` makes it differ from every earlier one).
    Update {
        caller: usize,
        target: usize,
        owner: Option<usize>,
        n: u32,
    },
    Delete {
        caller: usize,
        target: usize,
        owner: Option<usize>,
    },
    Events {
        caller: usize,
        target: usize,
        owner: Option<usize>,
    },
    Get {
        caller: usize,
        target: usize,
        owner: Option<usize>,
    },
    List {
        caller: usize,
        owner: Option<usize>,
    },
}

fn scope_set() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..SCOPES.len(), 1..4)
}

fn named_owner() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![3 => Just(None), 1 => (0..2usize).prop_map(Some)]
}

fn seed() -> impl Strategy<Value = Seed> {
    (
        0..2usize,
        0..2usize,
        // Seeded keys are more often key managers, so that scoped callers have something to do.
        prop_oneof![
            2 => scope_set().prop_map(|mut s| { s.push(1); s }),
            1 => scope_set(),
        ],
        prop_oneof![6 => (0..EXPIRIES.len()).prop_map(Some), 1 => Just(None)],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(owner, account, scopes, expiry, revoked, stale_previous)| Seed {
                owner,
                account,
                scopes,
                expiry,
                revoked,
                stale_previous,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let caller = any::<u8>().prop_map(usize::from);
    let target = any::<u8>().prop_map(usize::from);
    prop_oneof![
        4 => (
            caller.clone(),
            prop_oneof![2 => Just(None), 1 => (0..2usize).prop_map(Some)],
            prop_oneof![3 => Just(None), 1 => (0..2usize).prop_map(Some)],
            scope_set(),
            prop_oneof![8 => (0..EXPIRIES.len()).prop_map(Some), 1 => Just(None)],
        )
            .prop_map(|(caller, owner, account, scopes, expiry)| Op::Create { caller, owner, account, scopes, expiry }),
        3 => (caller.clone(), target.clone(), named_owner(), any::<bool>(), prop::bool::weighted(0.3))
            .prop_map(|(caller, target, owner, grace, revoke_descendants)| Op::Rotate { caller, target, owner, grace, revoke_descendants }),
        2 => (caller.clone(), target.clone(), named_owner()).prop_map(|(caller, target, owner)| Op::Revoke { caller, target, owner }),
        1 => (caller.clone(), target.clone(), named_owner(), any::<u32>()).prop_map(|(caller, target, owner, n)| Op::Update { caller, target, owner, n }),
        1 => (caller.clone(), target.clone(), named_owner()).prop_map(|(caller, target, owner)| Op::Delete { caller, target, owner }),
        2 => (caller.clone(), target.clone(), named_owner()).prop_map(|(caller, target, owner)| Op::Get { caller, target, owner }),
        2 => (caller.clone(), target.clone(), named_owner()).prop_map(|(caller, target, owner)| Op::Events { caller, target, owner }),
        1 => (caller, named_owner()).prop_map(|(caller, owner)| Op::List { caller, owner }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The system under test

#[derive(Clone, Default)]
struct Broadcasts(Arc<Mutex<usize>>);

#[async_trait::async_trait]
impl Invalidator for Broadcasts {
    async fn publish(&self, _: &Invalidation) -> Result<(), StoreError> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

impl Broadcasts {
    fn count(&self) -> usize {
        *self.0.lock().unwrap()
    }
}

struct System {
    app: Router,
    store: Arc<MemoryStore>,
    format: KeyFormat,
    broadcasts: Broadcasts,
}

fn system() -> System {
    let store = Arc::new(MemoryStore::new());
    let format = KeyFormat::new("sk_model").unwrap();
    let resolver = CachedResolver::builder(store.clone())
        .format(format.clone())
        .build();
    let broadcasts = Broadcasts::default();
    let manager = KeyManager::new(resolver.clone()).invalidator(broadcasts.clone());
    let app = Router::new()
        .route(
            "/whoami",
            get(|p: Principal| async move { p.key_id().to_string() }),
        )
        .merge(manage::router(manager))
        .layer(
            ApiKeyLayer::new(resolver)
                .sources([KeySource::x_api_key()])
                .master_key(ApiKey::new(MASTER)),
        );
    System {
        app,
        store,
        format,
        broadcasts,
    }
}

impl System {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        key: &str,
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
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    async fn record(&self, id: &str) -> KeyRecord {
        self.store
            .get(&KeyId::new(id))
            .await
            .unwrap()
            .expect("a stored record")
    }
}

fn code_of(json: &Value) -> &str {
    json["error_detail"]["code"].as_str().unwrap_or("")
}

fn scopes_of(json: &Value) -> BTreeSet<String> {
    json["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn time_of(value: &Value) -> Option<OffsetDateTime> {
    value
        .as_str()
        .map(|s| OffsetDateTime::parse(s, &Rfc3339).unwrap())
}

fn set(indices: &[usize]) -> BTreeSet<&'static str> {
    indices.iter().map(|&i| SCOPES[i]).collect()
}

/// Checks the server's answer against the model's; returns whether the operation succeeded.
fn check(
    step: &str,
    expect: Expect,
    status: StatusCode,
    json: &Value,
    ok: StatusCode,
) -> Result<bool, TestCaseError> {
    match expect {
        Ok(()) => {
            prop_assert_eq!(
                status,
                ok,
                "{}: the model allows it; server said {}",
                step,
                json
            );
            Ok(true)
        }
        Err((want, code)) => {
            prop_assert_eq!((status, code_of(json)), (want, code), "{}: {}", step, json);
            Ok(false)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One sequence

async fn run(seeds: Vec<Seed>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sys = system();
    let now = OffsetDateTime::now_utc();
    let mut model = Model {
        keys: Vec::new(),
        credentials: vec![Credential {
            secret: MASTER.to_owned(),
            key: None,
            origin: None,
        }],
        now,
    };
    // Seeds go straight into the store, as the master key would have created them (or as time and
    // an earlier rotation left them: expired, revoked, with a stale previous secret).
    for (i, seed) in seeds.iter().enumerate() {
        let key = sys.format.generate();
        let expires_at = match seed.expiry {
            Some(e) => EXPIRIES[e].map(|d| now + time::Duration::days(d)),
            None => Some(now - time::Duration::hours(1)),
        };
        let stale = seed.stale_previous.then(|| sys.format.generate());
        let record = KeyRecord {
            id: KeyId::new(format!("key_seed{i:02}")),
            name: format!("seed {i}"),
            owner: OWNERS[seed.owner].to_owned(),
            account: ACCOUNTS[seed.account].to_owned(),
            scopes: ScopeSet::parse(seed.scopes.iter().map(|&s| SCOPES[s])).unwrap(),
            digest: key.digest(),
            digest_scheme: Default::default(),
            masked_key: sys.format.mask(&key).unwrap(),
            created_at: now,
            expires_at,
            revoked_at: seed.revoked.then_some(now),
            last_used_at: None,
            created_by: None,
            rotated_at: None,
            previous: stale.as_ref().map(|old| PreviousSecret {
                digest: old.digest(),
                digest_scheme: Default::default(),
                valid_until: now - time::Duration::minutes(1),
            }),
            limits: Default::default(),
            allowed_networks: None,
        };
        sys.store
            .insert(&record, KeyLimits::default(), now)
            .await
            .unwrap();
        let index = model.keys.len();
        model.keys.push(Key {
            id: record.id.to_string(),
            owner: OWNERS[seed.owner],
            account: ACCOUNTS[seed.account],
            scopes: set(&seed.scopes),
            expires_at,
            revoked: seed.revoked,
            deleted: false,
            created_by: None,
            current: key.expose_secret().to_owned(),
            previous: stale.as_ref().map(|old| {
                (
                    old.expose_secret().to_owned(),
                    now - time::Duration::minutes(1),
                )
            }),
        });
        model.credentials.push(Credential {
            secret: key.expose_secret().to_owned(),
            key: Some(index),
            origin: Some(index),
        });
        if let Some(old) = stale {
            model.credentials.push(Credential {
                secret: old.expose_secret().to_owned(),
                key: Some(index),
                origin: Some(index),
            });
        }
    }

    for (n, op) in ops.iter().enumerate() {
        let step = format!("step {n} {op:?}");
        let broadcasts = sys.broadcasts.count();
        let changed = apply(&sys, &mut model, op, &step).await?;
        prop_assert_eq!(
            sys.broadcasts.count() > broadcasts,
            changed,
            "{}: a broadcast exactly when something changed",
            step
        );
        invariants(&sys, &model, &step).await?;
    }
    Ok(())
}

/// Runs one operation on the server and the model; returns whether it changed any key.
async fn apply(
    sys: &System,
    model: &mut Model,
    op: &Op,
    step: &str,
) -> Result<bool, TestCaseError> {
    // Two in three callers are picked among the secrets that work (the master key included), the
    // rest among every secret ever issued.
    let credential = |caller: usize| {
        let live: Vec<&Credential> = model
            .credentials
            .iter()
            .filter(|c| model.authenticate(c).is_ok())
            .collect();
        if caller.is_multiple_of(3) {
            model.credentials[caller / 3 % model.credentials.len()].clone()
        } else {
            live[caller / 3 % live.len()].clone()
        }
    };
    let target_of = |target: usize| {
        let t = target % (model.keys.len() + 1);
        (t < model.keys.len()).then_some(t)
    };
    let id_of =
        |t: Option<usize>| t.map_or_else(|| "key_unknown".to_owned(), |t| model.keys[t].id.clone());
    let owner_query =
        |owner: &Option<usize>| owner.map_or_else(String::new, |o| format!("?owner={}", OWNERS[o]));
    let (caller_credential, auth) = match op {
        Op::Create { caller, .. }
        | Op::Rotate { caller, .. }
        | Op::Revoke { caller, .. }
        | Op::Update { caller, .. }
        | Op::Delete { caller, .. }
        | Op::Get { caller, .. }
        | Op::Events { caller, .. }
        | Op::List { caller, .. } => {
            let c = credential(*caller);
            let auth = model.authenticate(&c);
            (c, auth)
        }
    };
    let secret = caller_credential.secret.as_str();
    let (method, uri, body, ok) = match op {
        Op::Create {
            owner,
            account,
            scopes,
            expiry,
            ..
        } => {
            let mut body = json!({"scopes": scopes.iter().map(|&s| SCOPES[s]).collect::<Vec<_>>()});
            if let Some(o) = owner {
                body["owner"] = json!(OWNERS[*o]);
            }
            if let Some(a) = account {
                body["account"] = json!(ACCOUNTS[*a]);
            }
            match expiry {
                Some(e) => {
                    if let Some(days) = EXPIRIES[*e] {
                        body["expires_at"] = json!(
                            (model.now + time::Duration::days(days))
                                .format(&Rfc3339)
                                .unwrap()
                        );
                    }
                }
                None => {
                    body["expires_at"] = json!(
                        (model.now - time::Duration::days(1))
                            .format(&Rfc3339)
                            .unwrap()
                    )
                }
            }
            (
                "POST",
                "/api-keys".to_owned(),
                Some(body),
                StatusCode::CREATED,
            )
        }
        Op::Rotate {
            target,
            owner,
            grace,
            revoke_descendants,
            ..
        } => {
            let mut body = json!({});
            if *grace {
                body["grace_period_seconds"] = json!(GRACE_SECONDS);
            }
            if *revoke_descendants {
                body["revoke_descendants"] = json!(true);
            }
            let uri = format!(
                "/api-keys/{}/rotate{}",
                id_of(target_of(*target)),
                owner_query(owner)
            );
            ("POST", uri, Some(body), StatusCode::OK)
        }
        Op::Revoke { target, owner, .. } => (
            "DELETE",
            format!(
                "/api-keys/{}{}",
                id_of(target_of(*target)),
                owner_query(owner)
            ),
            None,
            StatusCode::NO_CONTENT,
        ),
        Op::Update {
            target, owner, n, ..
        } => (
            "PATCH",
            format!(
                "/api-keys/{}{}",
                id_of(target_of(*target)),
                owner_query(owner)
            ),
            Some(json!({"name": format!("renamed {n}")})),
            StatusCode::OK,
        ),
        Op::Delete { target, owner, .. } => {
            let owner = owner.map_or_else(String::new, |o| format!("&owner={}", OWNERS[o]));
            (
                "DELETE",
                format!(
                    "/api-keys/{}?permanent=true{owner}",
                    id_of(target_of(*target))
                ),
                None,
                StatusCode::NO_CONTENT,
            )
        }
        Op::Get { target, owner, .. } => (
            "GET",
            format!(
                "/api-keys/{}{}",
                id_of(target_of(*target)),
                owner_query(owner)
            ),
            None,
            StatusCode::OK,
        ),
        Op::Events { target, owner, .. } => (
            "GET",
            format!(
                "/api-keys/{}/events{}",
                id_of(target_of(*target)),
                owner_query(owner)
            ),
            None,
            StatusCode::OK,
        ),
        Op::List { owner, .. } => {
            let owner = owner.map_or_else(String::new, |o| format!("&owner={}", OWNERS[o]));
            (
                "GET",
                format!("/api-keys?limit=100{owner}"),
                None,
                StatusCode::OK,
            )
        }
    };
    let before = OffsetDateTime::now_utc();
    let (status, json) = sys.send(method, &uri, secret, body).await;
    let after = OffsetDateTime::now_utc();
    let caller = match auth {
        Err(code) => {
            prop_assert_eq!(
                (status, code_of(&json)),
                (StatusCode::UNAUTHORIZED, code),
                "{}",
                step
            );
            return Ok(false);
        }
        Ok(caller) => caller,
    };

    match op {
        Op::Create {
            owner,
            account,
            scopes,
            expiry,
            ..
        } => {
            let owner = match (owner, &caller) {
                (Some(o), _) => OWNERS[*o],
                (None, Some(c)) => c.owner,
                (None, None) => {
                    check(
                        step,
                        refuse(StatusCode::BAD_REQUEST, "APIKEY_OWNER_REQUIRED"),
                        status,
                        &json,
                        ok,
                    )?;
                    return Ok(false);
                }
            };
            let account = match (account, &caller) {
                (Some(a), _) => ACCOUNTS[*a],
                (None, Some(c)) => c.account,
                (None, None) => owner,
            };
            let requested = match expiry {
                None => {
                    check(
                        step,
                        refuse(StatusCode::BAD_REQUEST, "APIKEY_INVALID"),
                        status,
                        &json,
                        ok,
                    )?;
                    return Ok(false);
                }
                Some(e) => EXPIRIES[*e].map(|d| model.now + time::Duration::days(d)),
            };
            let wanted = set(scopes);
            let expires_at = requested.or(caller.as_ref().and_then(|c| c.expires_at));
            let expect = match &caller {
                None => Ok(()),
                Some(c) if !holds(&c.scopes, "api-keys:write") => {
                    refuse(StatusCode::FORBIDDEN, "AUTH_INSUFFICIENT_PERMISSIONS")
                }
                Some(c) if owner != c.owner || account != c.account => {
                    refuse(StatusCode::FORBIDDEN, "AUTH_CROSS_OWNER_ACCESS")
                }
                Some(c) if !covers(&c.scopes, &wanted) || !no_later(expires_at, c.expires_at) => {
                    refuse(StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION")
                }
                // The delegation depth is capped at 8 ancestors.
                Some(c) if model.depth(c.key.unwrap()) + 1 > MAX_DEPTH => {
                    refuse(StatusCode::FORBIDDEN, "AUTH_SCOPE_ESCALATION")
                }
                Some(_) => Ok(()),
            };
            if !check(step, expect, status, &json, ok)? {
                prop_assert!(json.get("key").is_none());
                return Ok(false);
            }
            let got_scopes = scopes_of(&json);
            prop_assert_eq!(
                &got_scopes,
                &wanted
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<BTreeSet<_>>(),
                "{}",
                step
            );
            prop_assert_eq!(time_of(&json["expires_at"]), expires_at, "{}: expiry", step);
            prop_assert_eq!(
                (json["owner_id"].as_str(), json["account_id"].as_str()),
                (Some(owner), Some(account)),
                "{}",
                step
            );
            if let Some(c) = &caller {
                // The invariant, stated directly: nothing the caller does not cover, nothing later.
                prop_assert!(
                    covers(&c.scopes, &wanted) && no_later(expires_at, c.expires_at),
                    "{}: escalated",
                    step
                );
                prop_assert_eq!(
                    json["created_by"].as_str(),
                    Some(model.keys[c.key.unwrap()].id.as_str())
                );
            }
            let secret = json["key"].as_str().unwrap().to_owned();
            let index = model.keys.len();
            model.keys.push(Key {
                id: json["api_key_id"].as_str().unwrap().to_owned(),
                owner,
                account,
                scopes: wanted,
                expires_at,
                revoked: false,
                deleted: false,
                created_by: caller.as_ref().and_then(|c| c.key),
                current: secret.clone(),
                previous: None,
            });
            model.credentials.push(Credential {
                secret,
                key: Some(index),
                origin: caller_credential.origin,
            });
            Ok(false)
        }
        Op::Rotate {
            target,
            owner,
            grace,
            revoke_descendants,
            ..
        } => {
            let t = target_of(*target);
            let named = owner.map(|o| OWNERS[o]);
            let mut expect = model.judge_key(&caller, Power::Write, t, named);
            if expect.is_ok() {
                let key = &model.keys[t.unwrap()];
                if key.revoked || key.expires_at.is_some_and(|at| at <= after) {
                    expect = refuse(StatusCode::BAD_REQUEST, "APIKEY_INVALID");
                }
            }
            if !check(step, expect, status, &json, ok)? {
                prop_assert!(json.get("key").is_none());
                return Ok(false);
            }
            let t = t.unwrap();
            if let Some(c) = &caller {
                let key = &model.keys[t];
                prop_assert!(
                    covers(&c.scopes, &key.scopes) && no_later(key.expires_at, c.expires_at),
                    "{}: escalated",
                    step
                );
                // I1, literally: a scoped caller obtained the secret of its own subtree only.
                prop_assert!(
                    model.in_subtree(t, c.key.unwrap()),
                    "{}: rotated outside its subtree",
                    step
                );
            }
            let secret = json["key"].as_str().unwrap().to_owned();
            prop_assert_eq!(json["api_key_id"].as_str(), Some(model.keys[t].id.as_str()));
            let previous = if *grace {
                let until = sys
                    .record(&model.keys[t].id)
                    .await
                    .previous
                    .expect("a grace period")
                    .valid_until;
                let g = time::Duration::seconds(GRACE_SECONDS as i64);
                prop_assert!(
                    before + g <= until && until <= after + g,
                    "{}: grace end {}",
                    step,
                    until
                );
                Some((model.keys[t].current.clone(), until))
            } else {
                None
            };
            let key = &mut model.keys[t];
            key.previous = previous;
            key.current = secret.clone();
            model.credentials.push(Credential {
                secret,
                key: Some(t),
                origin: caller_credential.origin,
            });
            if *revoke_descendants {
                model.revoke_descendants(t);
            }
            Ok(true)
        }
        Op::Revoke { target, owner, .. } => {
            let t = target_of(*target);
            let expect = model.judge_key(&caller, Power::Write, t, owner.map(|o| OWNERS[o]));
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let t = t.unwrap();
            if let Some(c) = &caller {
                prop_assert!(
                    model.in_subtree(t, c.key.unwrap()),
                    "{}: revoked outside its subtree",
                    step
                );
            }
            let newly = !model.keys[t].revoked;
            model.keys[t].revoked = true;
            let descendants = model.revoke_descendants(t);
            Ok(newly || descendants)
        }
        Op::Update {
            target, owner, n, ..
        } => {
            // Changing a key is a power operation like revoking it: the same rule.
            let t = target_of(*target);
            let expect = model.judge_key(&caller, Power::Write, t, owner.map(|o| OWNERS[o]));
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let key = &model.keys[t.unwrap()];
            if let Some(c) = &caller {
                prop_assert_eq!(
                    (key.owner, key.account),
                    (c.owner, c.account),
                    "{}: changed outside its owner/account",
                    step
                );
                // No descendant changes an ancestor (I2), nor anything else outside (I1).
                prop_assert!(
                    model.in_subtree(t.unwrap(), c.key.unwrap()),
                    "{}: changed outside its subtree",
                    step
                );
            }
            prop_assert!(
                json.get("key").is_none(),
                "{}: an update shows no secret",
                step
            );
            prop_assert_eq!(json["api_key_id"].as_str(), Some(key.id.as_str()));
            let name = format!("renamed {n}");
            prop_assert_eq!(json["name"].as_str(), Some(name.as_str()), "{}", step);
            Ok(true)
        }
        Op::Delete { target, owner, .. } => {
            let t = target_of(*target);
            let expect = model.judge_key(&caller, Power::MasterOnly, t, owner.map(|o| OWNERS[o]));
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let t = t.unwrap();
            model.keys[t].deleted = true;
            model.revoke_descendants(t);
            Ok(true)
        }
        Op::Events { target, owner, .. } => {
            let t = target_of(*target);
            let named = owner.map(|o| OWNERS[o]);
            // The master key also reads a deleted key's events, naming its owner.
            let deleted_for_master = caller.is_none()
                && t.is_some_and(|t| model.keys[t].deleted && named == Some(model.keys[t].owner));
            let expect = if deleted_for_master {
                Ok(())
            } else {
                model.judge_key(&caller, Power::ReadSubtree, t, named)
            };
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let t = t.unwrap();
            if let Some(c) = &caller {
                prop_assert!(
                    model.in_subtree(t, c.key.unwrap()),
                    "{}: read the events of a key outside its subtree",
                    step
                );
            }
            let events = json["events"].as_array().cloned().unwrap_or_default();
            for event in &events {
                prop_assert_eq!(
                    event["key_id"].as_str(),
                    Some(model.keys[t].id.as_str()),
                    "{}: an event about another key",
                    step
                );
            }
            Ok(false)
        }
        Op::Get { target, owner, .. } => {
            let t = target_of(*target);
            let expect = model.judge_key(&caller, Power::Read, t, owner.map(|o| OWNERS[o]));
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let key = &model.keys[t.unwrap()];
            if let Some(c) = &caller {
                prop_assert_eq!(
                    (key.owner, key.account),
                    (c.owner, c.account),
                    "{}: saw outside its owner/account",
                    step
                );
            }
            prop_assert_eq!(json["api_key_id"].as_str(), Some(key.id.as_str()));
            prop_assert_eq!(json["is_revoked"].as_bool(), Some(key.revoked), "{}", step);
            prop_assert_eq!(
                scopes_of(&json),
                key.scopes
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<BTreeSet<_>>()
            );
            prop_assert_eq!(time_of(&json["expires_at"]), key.expires_at);
            prop_assert!(json.get("key").is_none(), "{}: a secret in a read", step);
            Ok(false)
        }
        Op::List { owner, .. } => {
            let owner = match (owner, &caller) {
                (Some(o), _) => OWNERS[*o],
                (None, Some(c)) => c.owner,
                (None, None) => {
                    check(
                        step,
                        refuse(StatusCode::BAD_REQUEST, "APIKEY_OWNER_REQUIRED"),
                        status,
                        &json,
                        ok,
                    )?;
                    return Ok(false);
                }
            };
            let expect = match &caller {
                None => Ok(()),
                Some(c)
                    if !holds(&c.scopes, "api-keys:read")
                        && !holds(&c.scopes, "api-keys:write") =>
                {
                    refuse(StatusCode::FORBIDDEN, "AUTH_INSUFFICIENT_PERMISSIONS")
                }
                Some(c) if owner != c.owner => {
                    refuse(StatusCode::FORBIDDEN, "AUTH_CROSS_OWNER_ACCESS")
                }
                Some(_) => Ok(()),
            };
            if !check(step, expect, status, &json, ok)? {
                return Ok(false);
            }
            let expected: BTreeSet<&str> = model
                .keys
                .iter()
                .filter(|k| {
                    !k.deleted
                        && k.owner == owner
                        && caller.as_ref().is_none_or(|c| c.account == k.account)
                })
                .map(|k| k.id.as_str())
                .collect();
            let listed: BTreeSet<&str> = json
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["api_key_id"].as_str().unwrap())
                .collect();
            prop_assert_eq!(&listed, &expected, "{}", step);
            if let Some(c) = &caller {
                for k in json.as_array().unwrap() {
                    prop_assert_eq!(
                        (k["owner_id"].as_str(), k["account_id"].as_str()),
                        (Some(c.owner), Some(c.account)),
                        "{}: listed outside",
                        step
                    );
                }
            }
            Ok(false)
        }
    }
}

/// After every step: each secret authenticates exactly as the model says, and none whose key or
/// an ancestor was revoked or deleted does.
async fn invariants(sys: &System, model: &Model, step: &str) -> Result<(), TestCaseError> {
    for credential in &model.credentials {
        let (status, json) = sys.send("GET", "/whoami", &credential.secret, None).await;
        match model.authenticate(credential) {
            Ok(_) => prop_assert_eq!(
                status,
                StatusCode::OK,
                "{}: {:?} refused: {}",
                step,
                credential.key,
                json
            ),
            Err(code) => prop_assert_eq!(
                (status, code_of(&json)),
                (StatusCode::UNAUTHORIZED, code),
                "{}: {:?}",
                step,
                credential.key
            ),
        }
        // I1: every working secret an adversary holds (obtained, however indirectly, with the
        // secret of key `origin`) belongs to `origin`'s subtree; so revoking `origin` ends them all.
        if status == StatusCode::OK
            && let (Some(origin), Some(key)) = (credential.origin, credential.key)
        {
            prop_assert!(
                model.in_subtree(key, origin),
                "{}: the holder of key {} holds a working secret of key {} outside its subtree",
                step,
                origin,
                key
            );
        }
        if let Some(key) = credential.key
            && model.ancestry_dead(key)
        {
            prop_assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{}: key {} outlived its ancestor",
                step,
                key
            );
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(128)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn every_operation_follows_the_rule(
        seeds in prop::collection::vec(seed(), 3..8),
        ops in prop::collection::vec(op(), 1..48),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(seeds, ops))?;
    }
}
