//! `POST /api-keys/leaks`: the HTTP face of [`LeakReceiver`].

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::receiver::{LeakReceiver, MAX_REPORT_BYTES};
use crate::error::AuthError;

/// `POST /api-keys/leaks`: scanners' signed reports, answered with GitHub's feedback array (200).
///
/// Merge it **outside** [`ApiKeyLayer`](crate::layer::ApiKeyLayer) (or exempt the path): scanners
/// send no API key; the signature is their credential. A bad or missing signature is 401
/// `LEAK_REPORT_UNVERIFIED`, a body over [`MAX_REPORT_BYTES`] is 413, a body that is not a JSON
/// array of tokens (or holds too many) is 400, a store failure 503 (scanners retry; a retry changes
/// nothing more).
pub fn router<S>(receiver: LeakReceiver) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/api-keys/leaks", post(report))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(receiver)
}

async fn report(
    State(receiver): State<LeakReceiver>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE => {
            return AuthError::PayloadTooLarge {
                limit: MAX_REPORT_BYTES,
            }
            .into_response();
        }
        Err(_) => return AuthError::invalid("the report body could not be read").into_response(),
    };
    match receiver.receive(&headers, &body).await {
        Ok(feedback) => axum::Json(feedback).into_response(),
        Err(error) => error.into_response(),
    }
}
