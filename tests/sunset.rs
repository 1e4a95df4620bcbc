//! The `Sunset` header (RFC 8594): a request made with a key inside the layer's sunset window (one
//! day by default) gets the key's expiry as an HTTP date; other keys, the master key and refusals
//! get none; the window is configurable and can be turned off; a handler's own header stands.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use time::OffsetDateTime;
use tower::{ServiceBuilder, ServiceExt as _};
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::MemoryStore;

const MASTER: &str = common::MASTER;

/// The `Sunset` header of a request made with `key` through `layer` (None: no header); the
/// handler sets its own header when `own` is given.
async fn sunset(
    layer: ApiKeyLayer,
    key: &str,
    own: Option<&'static str>,
) -> (StatusCode, Option<String>) {
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_: Request<_>| async move {
            let mut response = Response::new(axum::body::Body::from("ok"));
            if let Some(value) = own {
                response
                    .headers_mut()
                    .insert("sunset", value.parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        });
    let response = service
        .oneshot(
            Request::get("/")
                .header("x-api-key", key)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let header = response
        .headers()
        .get("sunset")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status(), header)
}

async fn key_expiring_in(
    store: &MemoryStore,
    format: &KeyFormat,
    after: Option<Duration>,
) -> (ApiKey, Option<OffsetDateTime>) {
    let at = after.map(|d| {
        (OffsetDateTime::now_utc() + d)
            .replace_nanosecond(0)
            .unwrap()
    });
    let (key, _) = common::issue_with(store, format, "ledgers:read", |r| r.expires_at = at).await;
    (key, at)
}

fn http_date(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.format(&format).unwrap()
}

#[tokio::test]
async fn keys_in_their_last_day_carry_a_sunset_header() {
    let store = Arc::new(MemoryStore::new());
    let format = KeyFormat::default();
    let resolver = CachedResolver::new(store.clone());
    let layer = || ApiKeyLayer::new(resolver.clone()).master_key(ApiKey::new(MASTER));
    let hour = Duration::from_secs(3600);

    let (soon, soon_at) = key_expiring_in(&store, &format, Some(12 * hour)).await;
    let (later, _) = key_expiring_in(&store, &format, Some(72 * hour)).await;
    let (never, _) = key_expiring_in(&store, &format, None).await;

    let expected = http_date(soon_at.unwrap());
    assert!(expected.ends_with(" GMT"), "{expected}");
    // Twice: from the store, then from the cache.
    for _ in 0..2 {
        assert_eq!(
            sunset(layer(), soon.expose_secret(), None).await,
            (StatusCode::OK, Some(expected.clone()))
        );
    }
    assert_eq!(
        sunset(layer(), later.expose_secret(), None).await,
        (StatusCode::OK, None)
    );
    assert_eq!(
        sunset(layer(), never.expose_secret(), None).await,
        (StatusCode::OK, None)
    );
    assert_eq!(sunset(layer(), MASTER, None).await, (StatusCode::OK, None));
    // A refusal says nothing about any key's expiry.
    let unknown = format.generate();
    assert_eq!(
        sunset(layer(), unknown.expose_secret(), None).await,
        (StatusCode::UNAUTHORIZED, None)
    );

    // A wider window reaches the three-day key; none turns the header off.
    let week = layer().sunset_window(Some(7 * 24 * hour));
    assert!(sunset(week, later.expose_secret(), None).await.1.is_some());
    let off = layer().sunset_window(None);
    assert_eq!(sunset(off, soon.expose_secret(), None).await.1, None);

    // A handler that sets its own Sunset (an endpoint being retired) keeps it.
    let own = "Sat, 01 Jan 2000 00:00:00 GMT";
    assert_eq!(
        sunset(layer(), soon.expose_secret(), Some(own))
            .await
            .1
            .as_deref(),
        Some(own)
    );
}
