//! Behaviour of `ApiKeyLayer` and `RequireScopesLayer` through a real axum router: every HTTP row of the
//! DESIGN error table that authentication produces, the key sources, caching and bad input.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use common::*;
use http::{Request, StatusCode};
use time::OffsetDateTime;
use tower::ServiceExt;
use tower_api_keys::error::{AuthError, ErrorCode};
use tower_api_keys::guard::{RequireScopesLayer, Scoped};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::principal::{Principal, PrincipalKind};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scopes;

scopes! {
    LedgersWrite = all("ledgers:write");
    AnyRead = any("ledgers:read", "balances:read");
}

struct Fixture {
    store: Arc<TestStore>,
    resolver: CachedResolver,
    format: KeyFormat,
}

fn fixture() -> Fixture {
    let store = TestStore::new();
    let format = KeyFormat::new("sk_test").unwrap();
    let resolver = CachedResolver::builder(store.clone())
        .format(format.clone())
        .lookup_timeout(Duration::from_millis(300))
        .build();
    Fixture {
        store,
        resolver,
        format,
    }
}

async fn whoami(principal: Principal) -> String {
    format!("{}:{}", principal.kind().as_str(), principal.key_id())
}

fn app(f: &Fixture, layer: impl FnOnce(ApiKeyLayer) -> ApiKeyLayer) -> Router {
    // `route_layer` covers every route added before it, so each guarded route gets its own router.
    let guarded = |path: &str, route: axum::routing::MethodRouter, guard: RequireScopesLayer| {
        Router::new().route(path, route).route_layer(guard)
    };
    Router::new()
        .merge(guarded(
            "/ledgers",
            post(whoami),
            RequireScopesLayer::all(["ledgers:write"]),
        ))
        .merge(guarded(
            "/either",
            get(whoami),
            RequireScopesLayer::any(["ledgers:read", "balances:read"]),
        ))
        .merge(guarded(
            "/by-method",
            get(whoami).post(whoami).delete(whoami).put(whoami),
            RequireScopesLayer::by_method("ledgers"),
        ))
        .route(
            "/typed",
            post(|auth: Scoped<LedgersWrite>| async move { auth.key_id().to_string() }),
        )
        .route(
            "/typed-any",
            get(|auth: Scoped<AnyRead>| async move { auth.key_id().to_string() }),
        )
        .route("/whoami", get(whoami))
        .route(
            "/maybe",
            get(|p: Option<Principal>| async move {
                p.map_or("anonymous".into(), |p| p.key_id().to_string())
            }),
        )
        .route(
            "/sensitive",
            get(|req: Request<Body>| async move {
                req.headers()["x-api-key"].is_sensitive().to_string()
            }),
        )
        .layer(layer(
            ApiKeyLayer::new(f.resolver.clone())
                .sources([
                    KeySource::x_api_key(),
                    KeySource::blnk(),
                    KeySource::blecon(),
                    KeySource::bearer(),
                ])
                .master_key(ApiKey::new(MASTER)),
        ))
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> http::Response<Body> {
    app.clone().oneshot(request).await.unwrap()
}

async fn text(response: http::Response<Body>) -> String {
    use http_body_util::BodyExt;
    String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

async fn expect_error(
    app: &Router,
    request: Request<Body>,
    status: StatusCode,
    code: &str,
) -> serde_json::Value {
    let response = send(app, request).await;
    assert_eq!(response.status(), status);
    if status == StatusCode::UNAUTHORIZED {
        assert!(
            response.headers().contains_key("www-authenticate"),
            "401 without WWW-Authenticate"
        );
    }
    let typed = response
        .extensions()
        .get::<AuthError>()
        .cloned()
        .expect("typed error in extensions");
    assert_eq!(typed.code().as_str(), code);
    let body = json_body(response).await;
    assert_eq!(body["error_detail"]["code"], code, "{body}");
    assert_eq!(body["error"], body["error_detail"]["message"]);
    body
}

#[tokio::test]
async fn a_valid_key_reaches_the_handler_with_its_principal() {
    let f = fixture();
    let (key, record) = issue(&*f.store, &f.format, "ledgers:write").await;
    let app = app(&f, |l| l);
    let response = send(
        &app,
        req("POST", "/ledgers", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, format!("scoped:{}", record.id));
}

#[tokio::test]
async fn every_key_source_is_accepted() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let k = key.expose_secret();
    for (name, value) in [
        ("X-Api-Key", k.to_owned()),
        ("x-blnk-key", k.to_owned()),
        ("Authorization", format!("APIKEY::{k}")),
        ("authorization", format!("Bearer {k}")),
    ] {
        let response = send(&app, req("GET", "/whoami", &[(name, &value)])).await;
        assert_eq!(response.status(), StatusCode::OK, "{name}");
    }
}

#[tokio::test]
async fn missing_key_is_401_missing() {
    let f = fixture();
    let app = app(&f, |l| l);
    expect_error(
        &app,
        req("GET", "/whoami", &[]),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
    // An unrelated Authorization scheme is not a key.
    expect_error(
        &app,
        req("GET", "/whoami", &[("authorization", "Basic dXNlcjpwYXNz")]),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
}

#[tokio::test]
async fn malformed_and_bad_checksum_keys_are_401_invalid_without_store_lookups() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let mut typo = key.expose_secret().to_owned();
    let at = typo.len() - 10;
    let replacement = if &typo[at..at + 1] == "A" { "B" } else { "A" };
    typo.replace_range(at..at + 1, replacement);
    let cases = [
        ("not-a-key".to_owned(), "malformed"),
        (typo, "checksum"),
        (
            key.expose_secret().replace("sk_test", "sk_live"),
            "malformed",
        ),
        ("x".repeat(5000), "malformed"),
    ];
    for (candidate, reason) in cases {
        let body = expect_error(
            &app,
            req("GET", "/whoami", &[("x-api-key", &candidate)]),
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID_API_KEY",
        )
        .await;
        assert_eq!(body["error_detail"]["details"]["reason"], reason);
        assert!(
            !body
                .to_string()
                .contains(&candidate[..candidate.len().min(20)]),
            "the key is echoed"
        );
    }
    assert_eq!(
        f.store.lookups(),
        0,
        "a key failing the format check must never reach the store"
    );
}

/// Cached answers skip the checksum (a stored digest matched); refusals still name a bad one, even
/// when its digest was cached as unknown by a direct `CachedResolver::authenticate`.
#[tokio::test]
async fn a_cached_unknown_digest_still_reports_its_bad_checksum() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let mut typo = key.expose_secret().to_owned();
    let last = typo.len() - 1;
    let replacement = if &typo[last..] == "A" { "B" } else { "A" };
    typo.replace_range(last.., replacement);
    f.resolver
        .authenticate(&tower_api_keys::key::KeyDigest::of(&typo))
        .await
        .unwrap_err();
    assert_eq!(f.store.lookups(), 1);
    for _ in 0..2 {
        let body = expect_error(
            &app,
            req("GET", "/whoami", &[("x-api-key", &typo)]),
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID_API_KEY",
        )
        .await;
        assert_eq!(body["error_detail"]["details"]["reason"], "checksum");
    }
    assert_eq!(f.store.lookups(), 1, "the refusal came from the cache");
}

#[tokio::test]
async fn non_utf8_header_bytes_are_401_invalid() {
    let f = fixture();
    let app = app(&f, |l| l);
    let mut request = req("GET", "/whoami", &[]);
    request.headers_mut().insert(
        "x-api-key",
        http::HeaderValue::from_bytes(b"sk_test_\xff\xfe").unwrap(),
    );
    expect_error(
        &app,
        request,
        StatusCode::UNAUTHORIZED,
        "AUTH_INVALID_API_KEY",
    )
    .await;
    assert_eq!(f.store.lookups(), 0);
}

#[tokio::test]
async fn two_different_keys_are_malformed_not_first_wins() {
    let f = fixture();
    let (a, _) = issue(&*f.store, &f.format, "*:*").await;
    let (b, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let body = expect_error(
        &app,
        req(
            "GET",
            "/whoami",
            &[
                ("x-api-key", a.expose_secret()),
                ("authorization", &format!("Bearer {}", b.expose_secret())),
            ],
        ),
        StatusCode::UNAUTHORIZED,
        "AUTH_INVALID_API_KEY",
    )
    .await;
    assert_eq!(body["error_detail"]["details"]["reason"], "ambiguous");
    // The same key twice is fine.
    let response = send(
        &app,
        req(
            "GET",
            "/whoami",
            &[
                ("x-api-key", a.expose_secret()),
                ("x-blnk-key", a.expose_secret()),
            ],
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_well_formed_key_is_401_invalid_and_negatively_cached() {
    let f = fixture();
    let app = app(&f, |l| l);
    let stranger = f.format.generate();
    for _ in 0..5 {
        let body = expect_error(
            &app,
            req("GET", "/whoami", &[("x-api-key", stranger.expose_secret())]),
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID_API_KEY",
        )
        .await;
        assert_eq!(body["error_detail"]["details"]["reason"], "unknown");
    }
    assert_eq!(
        f.store.lookups(),
        1,
        "unknown digests are cached negatively"
    );
}

#[tokio::test]
async fn expired_and_revoked_keys_are_401_expired_with_reason() {
    let f = fixture();
    let (expired, _) = issue_with(&*f.store, &f.format, "*:*", |r| {
        r.expires_at = Some(OffsetDateTime::now_utc() - time::Duration::minutes(1));
    })
    .await;
    let (revoked, _) = issue_with(&*f.store, &f.format, "*:*", |r| {
        r.revoked_at = Some(OffsetDateTime::now_utc());
    })
    .await;
    let app = app(&f, |l| l);
    for (key, reason) in [(&expired, "expired"), (&revoked, "revoked")] {
        // Twice: the second answer comes from the cache and is checked again.
        for _ in 0..2 {
            let body = expect_error(
                &app,
                req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
                StatusCode::UNAUTHORIZED,
                "AUTH_EXPIRED_API_KEY",
            )
            .await;
            assert_eq!(body["error_detail"]["details"]["reason"], reason);
        }
    }
}

#[tokio::test]
async fn expiry_is_checked_at_request_time_even_on_a_cache_hit() {
    let f = fixture();
    let (key, _) = issue_with(&*f.store, &f.format, "*:*", |r| {
        r.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::milliseconds(300));
    })
    .await;
    let app = app(&f, |l| l);
    let ok = send(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
        StatusCode::UNAUTHORIZED,
        "AUTH_EXPIRED_API_KEY",
    )
    .await;
}

#[tokio::test]
async fn missing_scope_is_403_with_required_scopes() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "ledgers:read").await;
    let app = app(&f, |l| l);
    let body = expect_error(
        &app,
        req("POST", "/ledgers", &[("x-api-key", key.expose_secret())]),
        StatusCode::FORBIDDEN,
        "AUTH_INSUFFICIENT_PERMISSIONS",
    )
    .await;
    assert_eq!(
        body["error_detail"]["details"]["required"],
        serde_json::json!(["ledgers:write"])
    );
    assert_eq!(body["error_detail"]["details"]["match"], "all");
    // any-of: ledgers:read is one of the alternatives
    let ok = send(
        &app,
        req("GET", "/either", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn wildcards_grant_what_the_design_says() {
    let f = fixture();
    let (read_all, _) = issue(&*f.store, &f.format, "*:read").await;
    let (ledgers_all, _) = issue(&*f.store, &f.format, "ledgers:*").await;
    let app = app(&f, |l| l);
    let status = |key: &ApiKey, method: &'static str, uri: &'static str| {
        let app = app.clone();
        let request = req(method, uri, &[("x-api-key", key.expose_secret())]);
        async move { send(&app, request).await.status() }
    };
    assert_eq!(status(&read_all, "GET", "/either").await, StatusCode::OK);
    assert_eq!(
        status(&read_all, "POST", "/ledgers").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&ledgers_all, "POST", "/ledgers").await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn scopes_by_http_method() {
    let f = fixture();
    let (reader, _) = issue(&*f.store, &f.format, "ledgers:read").await;
    let (writer, _) = issue(&*f.store, &f.format, "ledgers:write").await;
    let (deleter, _) = issue(&*f.store, &f.format, "ledgers:delete").await;
    let app = app(&f, |l| l);
    let cases = [
        (&reader, "GET", StatusCode::OK),
        (&reader, "POST", StatusCode::FORBIDDEN),
        (&writer, "POST", StatusCode::OK),
        (&writer, "PUT", StatusCode::OK),
        (&writer, "GET", StatusCode::FORBIDDEN),
        (&deleter, "DELETE", StatusCode::OK),
        (&writer, "DELETE", StatusCode::FORBIDDEN),
    ];
    for (key, method, expected) in cases {
        let response = send(
            &app,
            req(method, "/by-method", &[("x-api-key", key.expose_secret())]),
        )
        .await;
        assert_eq!(response.status(), expected, "{method}");
    }
}

#[tokio::test]
async fn typed_scope_extractor() {
    let f = fixture();
    let (writer, record) = issue(&*f.store, &f.format, "ledgers:write").await;
    let (balances, _) = issue(&*f.store, &f.format, "balances:read").await;
    let app = app(&f, |l| l);
    let ok = send(
        &app,
        req("POST", "/typed", &[("x-api-key", writer.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(text(ok).await, record.id.to_string());
    let body = expect_error(
        &app,
        req("POST", "/typed", &[("x-api-key", balances.expose_secret())]),
        StatusCode::FORBIDDEN,
        "AUTH_INSUFFICIENT_PERMISSIONS",
    )
    .await;
    assert_eq!(
        body["error_detail"]["details"]["required"],
        serde_json::json!(["ledgers:write"])
    );
    let ok = send(
        &app,
        req(
            "GET",
            "/typed-any",
            &[("x-api-key", balances.expose_secret())],
        ),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn guard_or_extractor_without_a_layer_is_401_missing_principal() {
    let unprotected = Router::new()
        .route("/guarded", get(|| async { "reached" }))
        .route_layer(RequireScopesLayer::all(["ledgers:read"]))
        .route("/extract", get(whoami));
    for uri in ["/guarded", "/extract"] {
        expect_error(
            &unprotected,
            req("GET", uri, &[]),
            StatusCode::UNAUTHORIZED,
            "AUTH_MISSING_PRINCIPAL",
        )
        .await;
    }
}

#[tokio::test]
async fn master_key_is_full_access_and_a_near_miss_never_reaches_the_store() {
    let f = fixture();
    let app = app(&f, |l| l);
    for (name, value) in [
        ("x-api-key", MASTER.to_owned()),
        ("authorization", format!("Bearer {MASTER}")),
    ] {
        let response = send(&app, req("POST", "/ledgers", &[(name, &value)])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "master:master");
    }
    let almost = format!("{MASTER}x");
    expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", &almost)]),
        StatusCode::UNAUTHORIZED,
        "AUTH_INVALID_API_KEY",
    )
    .await;
    assert_eq!(f.store.lookups(), 0);
}

#[tokio::test]
async fn store_failure_is_503_never_invalid_and_is_not_cached() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    f.store.failing.store(true, Ordering::SeqCst);
    let body = expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
        StatusCode::SERVICE_UNAVAILABLE,
        "AUTH_UNAVAILABLE",
    )
    .await;
    assert!(
        !body.to_string().contains("connection refused"),
        "store internals leak: {body}"
    );
    f.store.failing.store(false, Ordering::SeqCst);
    let ok = send(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(
        ok.status(),
        StatusCode::OK,
        "the error must not have been cached"
    );
    // Once cached, the key keeps working while the store is down.
    f.store.failing.store(true, Ordering::SeqCst);
    let ok = send(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn hanging_store_times_out_as_503() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    f.store.hanging.store(true, Ordering::SeqCst);
    expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
        StatusCode::SERVICE_UNAVAILABLE,
        "AUTH_UNAVAILABLE",
    )
    .await;
    f.store.hanging.store(false, Ordering::SeqCst);
    let ok = send(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn concurrent_misses_for_one_key_share_one_store_lookup() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let requests = (0..200).map(|_| {
        let app = app.clone();
        let request = req("GET", "/whoami", &[("x-api-key", key.expose_secret())]);
        tokio::spawn(async move { app.oneshot(request).await.unwrap().status() })
    });
    for status in futures_join(requests).await {
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(f.store.lookups(), 1);
}

#[tokio::test]
async fn invalid_checksum_flood_costs_no_lookups() {
    let f = fixture();
    let app = app(&f, |l| l);
    let key = f.format.generate();
    let base = key.expose_secret();
    let requests = (0..500).map(|i| {
        // Valid prefix and alphabet, wrong checksum.
        let mut forged = base[..base.len() - 6].to_owned();
        forged.push_str(&format!("{:06}", i));
        let app = app.clone();
        tokio::spawn(async move {
            app.oneshot(req("GET", "/whoami", &[("x-api-key", &forged)]))
                .await
                .unwrap()
                .status()
        })
    });
    for status in futures_join(requests).await {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(f.store.lookups(), 0);
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn optional_mode_lets_anonymous_requests_through_for_guards_to_decide() {
    let f = fixture();
    let (key, record) = issue(&*f.store, &f.format, "ledgers:write").await;
    let app = app(&f, |l| l.optional());
    let anonymous = send(&app, req("GET", "/maybe", &[])).await;
    assert_eq!(text(anonymous).await, "anonymous");
    let known = send(
        &app,
        req("GET", "/maybe", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(text(known).await, record.id.to_string());
    // A guard facing an anonymous request says the key is missing, not that the wiring is broken.
    expect_error(
        &app,
        req("POST", "/ledgers", &[]),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
    expect_error(
        &app,
        req("GET", "/whoami", &[]),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
    // A presented key must still be valid.
    expect_error(
        &app,
        req("GET", "/maybe", &[("x-api-key", "garbage")]),
        StatusCode::UNAUTHORIZED,
        "AUTH_INVALID_API_KEY",
    )
    .await;
}

#[tokio::test]
async fn cors_preflight_passes_only_when_enabled() {
    let f = fixture();
    let preflight = || {
        req(
            "OPTIONS",
            "/maybe",
            &[
                ("origin", "https://example.com"),
                ("access-control-request-method", "GET"),
            ],
        )
    };
    let strict = app(&f, |l| l);
    expect_error(
        &strict,
        preflight(),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
    let relaxed = app(&f, |l| l.allow_preflight());
    let response = send(&relaxed, preflight()).await;
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);
    // A plain OPTIONS without the preflight headers still needs a key.
    expect_error(
        &relaxed,
        req("OPTIONS", "/maybe", &[]),
        StatusCode::UNAUTHORIZED,
        "AUTH_MISSING_API_KEY",
    )
    .await;
}

#[tokio::test]
async fn key_headers_reach_the_handler_marked_sensitive() {
    let f = fixture();
    let (key, _) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    let response = send(
        &app,
        req("GET", "/sensitive", &[("x-api-key", key.expose_secret())]),
    )
    .await;
    assert_eq!(text(response).await, "true");
}

#[tokio::test]
async fn revocation_reaches_the_cache_through_invalidation() {
    let f = fixture();
    let (key, record) = issue(&*f.store, &f.format, "*:*").await;
    let app = app(&f, |l| l);
    assert_eq!(
        send(
            &app,
            req("GET", "/whoami", &[("x-api-key", key.expose_secret())])
        )
        .await
        .status(),
        StatusCode::OK
    );
    use tower_api_keys::store::KeyStore;
    f.store
        .revoke(&record.id, OffsetDateTime::now_utc())
        .await
        .unwrap();
    // Still cached: the layer does not hit the store on every request.
    assert_eq!(
        send(
            &app,
            req("GET", "/whoami", &[("x-api-key", key.expose_secret())])
        )
        .await
        .status(),
        StatusCode::OK
    );
    f.resolver.invalidate_key(&record.id);
    expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
        StatusCode::UNAUTHORIZED,
        "AUTH_EXPIRED_API_KEY",
    )
    .await;
}

#[tokio::test]
async fn rotation_grace_period_keeps_the_old_secret_until_it_ends() {
    use tower_api_keys::store::KeyStore;
    use tower_api_keys::store::Rotation;
    let f = fixture();
    let (old, record) = issue(&*f.store, &f.format, "*:*").await;
    let new = f.format.generate();
    f.store
        .replace_secret(
            &record.id,
            &Rotation {
                digest: new.digest(),
                digest_scheme: Default::default(),
                masked_key: f.format.mask(&new).unwrap(),
                rotated_at: OffsetDateTime::now_utc(),
                previous_valid_until: Some(
                    OffsetDateTime::now_utc() + time::Duration::milliseconds(300),
                ),
                revoke_descendants: false,
            },
        )
        .await
        .unwrap();
    let app = app(&f, |l| l);
    for key in [&old, &new] {
        let response = send(
            &app,
            req("GET", "/whoami", &[("x-api-key", key.expose_secret())]),
        )
        .await;
        assert_eq!(text(response).await, format!("scoped:{}", record.id));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect_error(
        &app,
        req("GET", "/whoami", &[("x-api-key", old.expose_secret())]),
        StatusCode::UNAUTHORIZED,
        "AUTH_EXPIRED_API_KEY",
    )
    .await;
    assert_eq!(
        send(
            &app,
            req("GET", "/whoami", &[("x-api-key", new.expose_secret())])
        )
        .await
        .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn custom_rejection_rendering_keeps_the_typed_error() {
    let f = fixture();
    let app = Router::new().route("/whoami", get(whoami)).layer(
        ApiKeyLayer::new(f.resolver.clone()).rejection(|error: &AuthError| {
            http::Response::builder()
                .status(error.http_status())
                .body(Body::from(format!("nope: {}", error.code())))
                .unwrap()
        }),
    );
    let response = send(&app, req("GET", "/whoami", &[])).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.headers().contains_key("www-authenticate"),
        "added when the renderer forgets it"
    );
    assert_eq!(
        response
            .extensions()
            .get::<AuthError>()
            .map(AuthError::code),
        Some(ErrorCode::MissingApiKey)
    );
    assert_eq!(text(response).await, "nope: AUTH_MISSING_API_KEY");
}

#[tokio::test]
#[should_panic(expected = "invalid scope")]
async fn invalid_route_scopes_fail_when_the_router_is_built() {
    let _ = Router::<()>::new()
        .route("/x", get(|| async { "" }))
        .route_layer(RequireScopesLayer::all(["Ledgers:Write"]));
}

#[test]
fn principal_kinds() {
    assert_eq!(Principal::master().kind(), PrincipalKind::Master);
    assert!(Principal::master().provenance_id().is_none());
}

#[test]
fn principal_from_extensions_tells_no_key_from_no_layer() {
    let empty = http::Extensions::new();
    assert!(matches!(
        Principal::from_extensions(&empty),
        Err(AuthError::MissingPrincipal)
    ));
    let mut with = http::Extensions::new();
    with.insert(Principal::master());
    assert!(Principal::from_extensions(&with).unwrap().is_master());
}

// ---- allowed_networks: judged by the layer, through real HTTP ----

fn networks(blocks: &str) -> Option<tower_api_keys::network::Networks> {
    Some(blocks.parse().unwrap())
}

/// The fixture's app, plus a counter of the requests that got past the layer (to the guards).
fn counted_app(
    f: &Fixture,
    layer: impl FnOnce(ApiKeyLayer) -> ApiKeyLayer,
) -> (Router, Arc<std::sync::atomic::AtomicUsize>) {
    let passed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = passed.clone();
    let inner = Router::new()
        .route("/whoami", get(whoami))
        .merge(
            Router::new()
                .route("/ledgers", post(whoami))
                .route_layer(RequireScopesLayer::all(["ledgers:write"])),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                counter.fetch_add(1, Ordering::SeqCst);
                next.run(req)
            },
        ));
    let app = inner.layer(layer(
        ApiKeyLayer::new(f.resolver.clone()).master_key(ApiKey::new(MASTER)),
    ));
    (app, passed)
}

#[tokio::test]
async fn a_network_restricted_key_is_admitted_from_inside_only_before_any_guard_runs() {
    use common::wire::{call, serve_with_connect_info};
    let f = fixture();
    let (inside, _) = issue_with(&*f.store, &f.format, "ledgers:read", |r| {
        r.allowed_networks = networks("127.0.0.0/8 2001:db8::/32");
    })
    .await;
    let (outside, _) = issue_with(&*f.store, &f.format, "ledgers:read", |r| {
        r.allowed_networks = networks("192.0.2.0/24 ::1");
    })
    .await;
    let (anywhere, _) = issue(&*f.store, &f.format, "ledgers:read").await;
    let (app, passed) = counted_app(&f, |l| l);
    let addr = serve_with_connect_info(app).await;

    for key in [&inside, &anywhere] {
        call(
            addr,
            "GET",
            "/whoami",
            &[("x-api-key", key.expose_secret())],
            "",
        )
        .await
        .expect(StatusCode::OK, None);
    }
    assert_eq!(passed.load(Ordering::SeqCst), 2);
    // Twice: the second answer comes from the cache, judged the same way.
    for _ in 0..2 {
        let reply = call(
            addr,
            "GET",
            "/whoami",
            &[("x-api-key", outside.expose_secret())],
            "",
        )
        .await;
        reply.expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
        assert!(!reply.body.contains(outside.expose_secret()));
    }
    // A route whose scope the key lacks: the network refusal comes first, and nothing behind the
    // layer ran.
    call(
        addr,
        "POST",
        "/ledgers",
        &[("x-api-key", outside.expose_secret())],
        "",
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
    assert_eq!(
        passed.load(Ordering::SeqCst),
        2,
        "a refused request reached the guards"
    );
    call(
        addr,
        "POST",
        "/ledgers",
        &[("x-api-key", inside.expose_secret())],
        "",
    )
    .await
    .expect(StatusCode::FORBIDDEN, Some("AUTH_INSUFFICIENT_PERMISSIONS"));
}

#[tokio::test]
async fn without_a_peer_address_a_restricted_key_is_refused_and_others_are_not() {
    let f = fixture();
    let (restricted, _) = issue_with(&*f.store, &f.format, "ledgers:read", |r| {
        r.allowed_networks = networks("0.0.0.0/0 ::/0");
    })
    .await;
    let (anywhere, _) = issue(&*f.store, &f.format, "ledgers:read").await;
    // `oneshot` on the router: no connection, so no `ConnectInfo`.
    let (app, passed) = counted_app(&f, |l| l);
    expect_error(
        &app,
        req(
            "GET",
            "/whoami",
            &[("x-api-key", restricted.expose_secret())],
        ),
        StatusCode::FORBIDDEN,
        "AUTH_NETWORK_NOT_ALLOWED",
    )
    .await;
    let ok = send(
        &app,
        req("GET", "/whoami", &[("x-api-key", anywhere.expose_secret())]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let master = send(&app, req("GET", "/whoami", &[("x-api-key", MASTER)])).await;
    assert_eq!(master.status(), StatusCode::OK);
    assert_eq!(passed.load(Ordering::SeqCst), 2);

    // A bare `SocketAddr` in the extensions is a peer address too (what a hyper server inserts).
    let mut request = req(
        "GET",
        "/whoami",
        &[("x-api-key", restricted.expose_secret())],
    );
    request
        .extensions_mut()
        .insert("192.0.2.1:4711".parse::<std::net::SocketAddr>().unwrap());
    assert_eq!(send(&app, request).await.status(), StatusCode::OK);

    // A custom reader (tonic's `TcpConnectInfo` is read this way) replaces the default.
    let (app, _) = counted_app(&f, |l| {
        l.peer_addr(|_| Some("192.0.2.1:1".parse().unwrap()))
    });
    let request = req(
        "GET",
        "/whoami",
        &[("x-api-key", restricted.expose_secret())],
    );
    assert_eq!(send(&app, request).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    use common::wire::{call, serve_with_connect_info};
    let f = fixture();
    let (key, _) = issue_with(&*f.store, &f.format, "ledgers:read", |r| {
        r.allowed_networks = networks("198.51.100.0/24");
    })
    .await;
    let secret = key.expose_secret();
    let get = |addr, xff: &'static [&'static str]| {
        let mut headers = vec![("x-api-key", secret)];
        headers.extend(xff.iter().map(|v| ("x-forwarded-for", *v)));
        async move { call(addr, "GET", "/whoami", &headers, "").await }
    };

    // The test client (127.0.0.1) is the trusted proxy, as nginx on the same host would be.
    let (app, _) = counted_app(&f, |l| {
        l.trusted_proxies("127.0.0.1/32 10.0.0.0/8".parse().unwrap())
    });
    let proxied = serve_with_connect_info(app).await;
    get(proxied, &["198.51.100.7"])
        .await
        .expect(StatusCode::OK, None);
    // Proxies in between are skipped; addresses a client wrote further left are not believed.
    get(proxied, &["203.0.113.9, 198.51.100.7, 10.1.2.3"])
        .await
        .expect(StatusCode::OK, None);
    get(proxied, &["198.51.100.7, 203.0.113.9"])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
    get(proxied, &["198.51.100.7", "203.0.113.9"])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
    // No header: the proxy itself is the client (127.0.0.1, outside the key's networks).
    get(proxied, &[])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
    // An entry that is no address before the client is found: unknown, refused.
    get(proxied, &["198.51.100.7, unknown"])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));

    // The same header from an untrusted peer is ignored: the client is 127.0.0.1.
    let (app, _) = counted_app(&f, |l| l.trusted_proxies("10.0.0.0/8".parse().unwrap()));
    let direct = serve_with_connect_info(app).await;
    get(direct, &["198.51.100.7"])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
    // And without trusted proxies at all.
    let (app, _) = counted_app(&f, |l| l);
    let plain = serve_with_connect_info(app).await;
    get(plain, &["198.51.100.7"])
        .await
        .expect(StatusCode::FORBIDDEN, Some("AUTH_NETWORK_NOT_ALLOWED"));
}
