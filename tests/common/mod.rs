//! Shared helpers for the behaviour tests: a store wrapper that counts and breaks ([`TestStore`],
//! also used by the benches), key records and their factories, response readers; [`db`] for the
//! tests that need PostgreSQL or Redis, [`ratelimit`] for the rate-limit tests' server and client.
#![allow(dead_code)]

pub mod db;
pub mod gate;
pub mod ratelimit;
mod store;
pub mod wire;

#[allow(unused_imports)] // not every test uses both
pub use store::{TestStore, record};

use time::OffsetDateTime;
use tower_api_keys::key::{ApiKey, KeyFormat};
use tower_api_keys::store::{KeyLimits, KeyRecord, KeyStore};

pub const MASTER: &str = "master-key-for-tests-0123456789";

/// Generates a key with `scopes`, stores it, and returns the plaintext and its record.
pub async fn issue(store: &dyn KeyStore, format: &KeyFormat, scopes: &str) -> (ApiKey, KeyRecord) {
    issue_with(store, format, scopes, |_| {}).await
}

pub async fn issue_with(
    store: &dyn KeyStore,
    format: &KeyFormat,
    scopes: &str,
    edit: impl FnOnce(&mut KeyRecord),
) -> (ApiKey, KeyRecord) {
    let key = format.generate();
    let mut rec = record(format, &key, "team-a", scopes);
    edit(&mut rec);
    store
        .insert(&rec, KeyLimits::default(), OffsetDateTime::now_utc())
        .await
        .unwrap();
    (key, rec)
}

/// Reads a response's JSON body.
pub async fn json_body(response: http::Response<axum::body::Body>) -> serde_json::Value {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// The `error_detail.code` of an error response.
pub async fn error_code(response: http::Response<axum::body::Body>) -> String {
    json_body(response).await["error_detail"]["code"]
        .as_str()
        .expect("error_detail.code")
        .to_owned()
}
