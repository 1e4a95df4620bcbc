//! Per-key rate limits and credits on one instance (in memory), through real HTTP: exact under
//! concurrency, a refused request consumes nothing, windows and refills restore a key, the master
//! key is limited only when configured, and the management API creates, shows and changes limits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::ratelimit::*;
use common::*;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt;
use tower_api_keys::error::GrpcRejection;
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::limits::{Credits, RateLimit, RefillInterval, UsageLimits};
use tower_api_keys::manage::{self, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::ratelimit::{FailMode, MemoryCredits, MemoryRates, RateLimiter, StoreCredits};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

/// The app: `/ledgers` costs 1, `/reports` costs 5, plus the management API, behind the key layer.
fn app(store: Arc<dyn KeyStore>, limiter: &RateLimiter) -> Router {
    let resolver = CachedResolver::new(store.clone());
    Router::new()
        .route(
            "/ledgers",
            get(|| async { "ledgers" }).route_layer(limiter.layer()),
        )
        .route(
            "/reports",
            get(|| async { "reports" }).route_layer(limiter.layer().cost(5)),
        )
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(MASTER)))
}

/// A key in `store` with `limits`.
async fn key_with(store: &dyn KeyStore, limits: UsageLimits) -> (String, KeyId) {
    let (key, record) = issue_with(store, &KeyFormat::default(), "ledgers:read", |r| {
        r.limits = limits
    })
    .await;
    (key.expose_secret().to_owned(), record.id)
}

fn rate(limit: u32, period: u32) -> UsageLimits {
    UsageLimits {
        rate_limit: Some(RateLimit::new(limit, period)),
        credits: None,
    }
}

fn credits(credits: Credits) -> UsageLimits {
    UsageLimits {
        rate_limit: None,
        credits: Some(credits),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limit_10_per_60s_admits_exactly_10_of_200_concurrent() {
    let store = Arc::new(MemoryStore::new());
    let limiter = RateLimiter::in_memory();
    let addr = serve(app(store.clone(), &limiter)).await;
    let (key, _) = key_with(&*store, rate(10, 60)).await;
    let started = Instant::now();
    let answers = blast(&[addr], "/ledgers", &key, 200).await;
    println!("200 concurrent requests in {:?}", started.elapsed());
    assert_eq!(count(&answers, StatusCode::OK), 10);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 190);
    check_headers(&answers, "RATE_LIMITED");
    let refused = answers
        .iter()
        .find(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert_eq!(refused.headers["ratelimit-policy"], "\"rate\";q=10;w=60");
    assert!(
        refused.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"rate\";r=0;t="),
        "{refused:?}"
    );
    // A key without limits is untouched: no headers, never refused.
    let (free, _) = key_with(&*store, UsageLimits::NONE).await;
    let answers = blast(&[addr], "/ledgers", &free, 50).await;
    assert_eq!(count(&answers, StatusCode::OK), 50);
    assert!(answers.iter().all(|a| !a.headers.contains_key("ratelimit")));
}

/// Both credit backends count exactly: 100 credits admit 100 of 500 concurrent requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_100_admit_exactly_100_of_500_concurrent() {
    for backend in ["memory", "store"] {
        let store = Arc::new(MemoryStore::new());
        let limiter = match backend {
            "memory" => RateLimiter::new(MemoryRates::new(), MemoryCredits::new()),
            _ => RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone())),
        };
        let addr = serve(app(store.clone(), &limiter)).await;
        let (key, id) = key_with(&*store, credits(Credits::new(100))).await;
        let answers = blast(&[addr], "/ledgers", &key, 500).await;
        assert_eq!(count(&answers, StatusCode::OK), 100, "{backend}");
        assert_eq!(
            count(&answers, StatusCode::TOO_MANY_REQUESTS),
            400,
            "{backend}"
        );
        check_headers(&answers, "USAGE_EXCEEDED");
        let refused = answers
            .iter()
            .find(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
            .unwrap();
        assert_eq!(refused.headers["ratelimit"], "\"credits\";r=0");
        // No refill: nothing to wait for, so no Retry-After.
        assert!(!refused.headers.contains_key("retry-after"));
        if backend == "store" {
            // The store counted: the management API shows what is left.
            let record = store.get(&id).await.unwrap().unwrap();
            assert_eq!(record.limits.credits.unwrap().remaining, 0);
        }
    }
}

#[tokio::test]
async fn after_the_window_the_key_works_again() {
    let store = Arc::new(MemoryStore::new());
    let limiter = RateLimiter::in_memory();
    let addr = serve(app(store.clone(), &limiter)).await;
    let (key, _) = key_with(&*store, rate(2, 1)).await;
    let client = client();
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    let refused = fetch(&client, addr, "/ledgers", &key).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    // The whole period passed: the bucket is full again.
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 429);
}

#[tokio::test]
async fn a_refill_restores_credits() {
    let store = Arc::new(MemoryStore::new());
    // A clock the test moves: days pass without waiting for midnight.
    let offset = Arc::new(AtomicI64::new(0));
    let clock = offset.clone();
    let limiter =
        RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone())).clock(move || {
            OffsetDateTime::now_utc() + time::Duration::days(clock.load(Ordering::SeqCst))
        });
    let addr = serve(app(store.clone(), &limiter)).await;
    let (key, _) = key_with(
        &*store,
        credits(Credits::new(3).refill(RefillInterval::Daily, 5)),
    )
    .await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    }
    let refused = fetch(&client, addr, "/ledgers", &key).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code.as_deref(), Some("USAGE_EXCEEDED"));
    let retry: i64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let midnight = RefillInterval::Daily.next_refill(now);
    assert!(
        (retry - (midnight - now).whole_seconds()).abs() <= 2,
        "{retry}"
    );
    assert_eq!(
        refused.headers["ratelimit-policy"],
        "\"credits\";q=5;w=86400"
    );
    // The next day: remaining is set to the refill amount (not added to).
    offset.store(1, Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 200);
    }
    assert_eq!(fetch(&client, addr, "/ledgers", &key).await.status, 429);
}

#[tokio::test]
async fn a_refused_request_consumes_nothing_and_costs_count() {
    let store = Arc::new(MemoryStore::new());
    let limiter = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let addr = serve(app(store.clone(), &limiter)).await;
    let (key, id) = key_with(
        &*store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(10, 60)),
            credits: Some(Credits::new(100)),
        },
    )
    .await;
    let client = client();
    // Two reports cost 5 each: the bucket of 10 is empty.
    assert_eq!(fetch(&client, addr, "/reports", &key).await.status, 200);
    let second = fetch(&client, addr, "/reports", &key).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.headers["ratelimit"],
        "\"rate\";r=0;t=60, \"credits\";r=90"
    );
    // Refused by the rate limit: the credits it took first are given back.
    let refused = fetch(&client, addr, "/ledgers", &key).await;
    assert_eq!(refused.code.as_deref(), Some("RATE_LIMITED"));
    assert_eq!(
        store
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .limits
            .credits
            .unwrap()
            .remaining,
        90
    );
    // Out of credits, the rate limit is not touched: a key with credits for 1 and a fresh bucket.
    let (poor, _) = key_with(
        &*store,
        UsageLimits {
            rate_limit: Some(RateLimit::new(1, 60)),
            credits: Some(Credits::new(1)),
        },
    )
    .await;
    assert_eq!(
        fetch(&client, addr, "/reports", &poor)
            .await
            .code
            .as_deref(),
        Some("USAGE_EXCEEDED")
    );
    assert_eq!(fetch(&client, addr, "/ledgers", &poor).await.status, 200);
}

#[tokio::test]
async fn the_master_key_is_limited_only_when_configured() {
    let store = Arc::new(MemoryStore::new());
    let client = client();
    let free = serve(app(store.clone(), &RateLimiter::in_memory())).await;
    for _ in 0..20 {
        assert_eq!(fetch(&client, free, "/ledgers", MASTER).await.status, 200);
    }
    let limited = serve(app(
        store,
        &RateLimiter::in_memory().master(RateLimit::new(3, 60)),
    ))
    .await;
    let answers = blast(&[limited], "/ledgers", MASTER, 20).await;
    assert_eq!(count(&answers, StatusCode::OK), 3);
}

#[tokio::test]
async fn grpc_refusals_are_resource_exhausted_with_the_code() {
    let store = Arc::new(MemoryStore::new());
    let (key, _) = key_with(&*store, rate(1, 60)).await;
    let limiter = RateLimiter::in_memory();
    let resolver = CachedResolver::new(store.clone());
    let app = Router::new()
        .route(
            "/ledger.Ledgers/List",
            axum::routing::post(|| async { "ok" }),
        )
        .layer(limiter.layer().rejection(GrpcRejection))
        .layer(ApiKeyLayer::new(resolver));
    let call = || {
        Request::post("/ledger.Ledgers/List")
            .header("x-api-key", &key)
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(app.clone().oneshot(call()).await.unwrap().status(), 200);
    let refused = app.oneshot(call()).await.unwrap();
    assert_eq!(
        refused.status(),
        200,
        "gRPC refusals are trailers-only 200s"
    );
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert!(
        refused.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("RATE_LIMITED: "),
        "{:?}",
        refused.headers()
    );
    assert!(refused.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn credits_fail_closed_when_the_store_fails_and_recover() {
    let store = TestStore::new();
    let (key, _) = key_with(&*store, credits(Credits::new(10))).await;
    let open = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()))
        .on_credit_error(FailMode::Open);
    let closed = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let client = client();
    let closed_addr = serve(app(store.clone(), &closed)).await;
    let open_addr = serve(app(store.clone(), &open)).await;
    // Warm both resolvers' caches, so only the credit count needs the store.
    assert_eq!(
        fetch(&client, closed_addr, "/ledgers", &key).await.status,
        200
    );
    assert_eq!(
        fetch(&client, open_addr, "/ledgers", &key).await.status,
        200
    );
    store.failing.store(true, Ordering::SeqCst);
    let down = fetch(&client, closed_addr, "/ledgers", &key).await;
    assert_eq!(down.status, 503);
    assert_eq!(down.code.as_deref(), Some("AUTH_UNAVAILABLE"));
    assert_eq!(
        fetch(&client, open_addr, "/ledgers", &key).await.status,
        200
    );
    store.failing.store(false, Ordering::SeqCst);
    // Back by itself: exactly the 8 credits left are spent, whatever failed open in between.
    let answers = blast(&[closed_addr], "/ledgers", &key, 20).await;
    assert_eq!(count(&answers, StatusCode::OK), 8);
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_management_api_creates_shows_and_changes_limits() {
    let store = Arc::new(MemoryStore::new());
    let limiter = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let app = app(store.clone(), &limiter);
    let (status, created) = call(
        &app,
        "POST",
        "/api-keys",
        MASTER,
        Some(json!({
            "owner": "team-a", "scopes": ["ledgers:read", "api-keys:write"],
            "rate_limit": {"limit": 100, "period_seconds": 60},
            "credits": {"remaining": 3, "refill": {"interval": "monthly", "amount": 1000}}
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["rate_limit"],
        json!({"limit": 100, "period_seconds": 60})
    );
    assert_eq!(
        created["credits"],
        json!({"remaining": 3, "refill": {"interval": "monthly", "amount": 1000}})
    );
    let id = created["api_key_id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    // Spend two; get and list show what is left.
    for _ in 0..2 {
        assert_eq!(call(&app, "GET", "/ledgers", &key, None).await.0, 200);
    }
    let (_, got) = call(&app, "GET", &format!("/api-keys/{id}"), MASTER, None).await;
    assert_eq!(got["credits"]["remaining"], 1);
    let (_, listed) = call(&app, "GET", "/api-keys?owner=team-a", MASTER, None).await;
    assert_eq!(listed[0]["credits"]["remaining"], 1);
    // PATCH: new name and credits, rate limit removed; the key is limited as changed at once.
    let (status, patched) = call(
        &app,
        "PATCH",
        &format!("/api-keys/{id}"),
        MASTER,
        Some(json!({"name": "renamed", "rate_limit": null, "credits": {"remaining": 50}})),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["name"], "renamed");
    assert_eq!(patched["rate_limit"], Value::Null);
    assert_eq!(patched["credits"], json!({"remaining": 50, "refill": null}));
    let (status, _) = call(&app, "GET", "/ledgers", &key, None).await;
    assert_eq!(status, 200);
    let (_, got) = call(&app, "GET", &format!("/api-keys/{id}"), MASTER, None).await;
    assert_eq!(got["credits"]["remaining"], 49);
    // Bad input is a 400: unknown fields, a zero limit, wrong types.
    for body in [
        json!({"colour": "red"}),
        json!({"rate_limit": {"limit": 0, "period_seconds": 60}}),
        json!({"rate_limit": {"limit": 5, "period_seconds": 60, "burst": 9}}),
        json!({"credits": {"remaining": -1}}),
        json!({"credits": {"remaining": 1, "refill": {"interval": "hourly", "amount": 1}}}),
    ] {
        let (status, error) = call(
            &app,
            "PATCH",
            &format!("/api-keys/{id}"),
            MASTER,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body} -> {error}");
        assert_eq!(error["error_detail"]["code"], "APIKEY_INVALID");
    }
    // The OpenAPI document has the route and the fields.
    let (status, doc) = call(&app, "GET", "/api-keys/openapi.json", MASTER, None).await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api-keys/{id}"]["patch"].is_object(), "{doc}");
    let schemas = &doc["components"]["schemas"];
    for field in ["rate_limit", "credits"] {
        assert!(
            schemas["CreateKeyBody"]["properties"][field].is_object(),
            "{field}"
        );
        assert!(
            schemas["KeyResponse"]["properties"][field].is_object(),
            "{field}"
        );
        assert!(
            schemas["UpdateKeyBody"]["properties"][field].is_object(),
            "{field}"
        );
    }
    assert_eq!(
        schemas["RateLimitBody"]["properties"]["limit"]["minimum"],
        1
    );
    // Unknown id: 404.
    let (status, _) = call(
        &app,
        "PATCH",
        "/api-keys/key_unknown",
        MASTER,
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_delegated_key_never_gets_more_than_its_creator() {
    let store = Arc::new(MemoryStore::new());
    let limiter = RateLimiter::new(MemoryRates::new(), StoreCredits::new(store.clone()));
    let app = app(store.clone(), &limiter);
    let (_, parent) = call(
        &app,
        "POST",
        "/api-keys",
        MASTER,
        Some(json!({
            "owner": "team-a", "scopes": ["ledgers:read", "api-keys:write"],
            "rate_limit": {"limit": 10, "period_seconds": 60},
            "credits": {"remaining": 100, "refill": {"interval": "monthly", "amount": 100}}
        })),
    )
    .await;
    let parent_key = parent["key"].as_str().unwrap().to_owned();
    let create = |extra: Value| {
        let mut body = json!({"scopes": ["ledgers:read"]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // Nothing asked: the child inherits its creator's limits.
    let (status, child) = call(
        &app,
        "POST",
        "/api-keys",
        &parent_key,
        Some(create(json!({}))),
    )
    .await;
    assert_eq!(status, 201, "{child}");
    assert_eq!(
        child["rate_limit"],
        json!({"limit": 10, "period_seconds": 60})
    );
    assert_eq!(child["credits"]["remaining"], 100);
    // Tighter is fine.
    let (status, _) = call(
        &app,
        "POST",
        "/api-keys",
        &parent_key,
        Some(create(
            json!({"rate_limit": {"limit": 5, "period_seconds": 60},
                            "credits": {"remaining": 10}}),
        )),
    )
    .await;
    assert_eq!(status, 201);
    // Looser is an escalation.
    for extra in [
        json!({"rate_limit": {"limit": 11, "period_seconds": 60}}),
        json!({"rate_limit": {"limit": 10, "period_seconds": 30}}),
        json!({"credits": {"remaining": 101}}),
        json!({"credits": {"remaining": 1, "refill": {"interval": "daily", "amount": 100}}}),
    ] {
        let (status, error) = call(
            &app,
            "POST",
            "/api-keys",
            &parent_key,
            Some(create(extra.clone())),
        )
        .await;
        assert_eq!(status, 403, "{extra} -> {error}");
        assert_eq!(error["error_detail"]["code"], "AUTH_SCOPE_ESCALATION");
    }
    // The creator's *remaining* bounds it: spend 95, then 6 is too many, 5 is fine.
    let (_, spent) = call(
        &app,
        "PATCH",
        &format!("/api-keys/{}", parent["api_key_id"].as_str().unwrap()),
        MASTER,
        Some(
            json!({"credits": {"remaining": 5, "refill": {"interval": "monthly", "amount": 100}}}),
        ),
    )
    .await;
    assert_eq!(spent["credits"]["remaining"], 5);
    let (status, _) = call(
        &app,
        "POST",
        "/api-keys",
        &parent_key,
        Some(create(json!({"credits": {"remaining": 6}}))),
    )
    .await;
    assert_eq!(status, 403);
    // PATCH follows the same rule: a scoped key cannot loosen its child.
    let child_id = child["api_key_id"].as_str().unwrap();
    let (status, _) = call(
        &app,
        "PATCH",
        &format!("/api-keys/{child_id}"),
        &parent_key,
        Some(json!({"rate_limit": {"limit": 1000, "period_seconds": 1}})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &app,
        "PATCH",
        &format!("/api-keys/{child_id}"),
        &parent_key,
        Some(json!({"rate_limit": {"limit": 2, "period_seconds": 60}})),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_policy_default_applies_to_keys_created_without_limits() {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let manager = KeyManager::new(resolver).policy(
        manage::KeyPolicy::default()
            .default_rate_limit(RateLimit::new(60, 60))
            .default_credits(Credits::new(1000).refill(RefillInterval::Daily, 1000)),
    );
    let created = manager
        .create(
            &Principal::master(),
            manage::CreateKey::new(["ledgers:read"]).owner("team-a"),
        )
        .await
        .unwrap();
    assert_eq!(created.info.limits.rate_limit, Some(RateLimit::new(60, 60)));
    let credits = created.info.limits.credits.unwrap();
    assert_eq!(
        (credits.remaining, credits.refill.unwrap().amount),
        (1000, 1000)
    );
    let explicit = manager
        .create(
            &Principal::master(),
            manage::CreateKey::new(["ledgers:read"])
                .owner("team-a")
                .rate_limit(RateLimit::new(5, 1)),
        )
        .await
        .unwrap();
    assert_eq!(explicit.info.limits.rate_limit, Some(RateLimit::new(5, 1)));
}
