use std::collections::HashSet;

use bytes::Bytes;
use http::Response;
use http::header::WWW_AUTHENTICATE;

use super::auth::FIXED_BODIES;
use super::render::{DEFAULT_CHALLENGE, percent_encode_grpc};
use super::store::StoreError;
use super::*;

#[test]
fn json_shape_follows_blnk() {
    let response: Response<Bytes> =
        JsonRejection::default().render(&AuthError::ExpiredKey(ExpiredReason::Revoked));
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()[WWW_AUTHENTICATE], DEFAULT_CHALLENGE);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "error": "API key has expired or was revoked",
            "error_detail": {
                "code": "AUTH_EXPIRED_API_KEY",
                "message": "API key has expired or was revoked",
                "details": {"reason": "revoked"}
            }
        })
    );
    let body = AuthError::MissingKey.to_json();
    assert!(
        body["error_detail"].get("details").is_none(),
        "empty details are left out"
    );
}

#[test]
fn grpc_rendering() {
    let response: Response<String> = GrpcRejection.render(&AuthError::MasterKeyRequired);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "7");
    assert_eq!(
        response.headers()["grpc-message"],
        "AUTH_MASTER_KEY_REQUIRED: this operation requires the master key"
    );
    assert_eq!(percent_encode_grpc("a%b\né"), "a%25b%0A%C3%A9");
}

#[test]
fn codes_are_distinct_and_stable() {
    let strings: HashSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        strings.len(),
        ErrorCode::ALL.len(),
        "two codes share a string"
    );
    for (i, &code) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(code as usize, i, "ALL is in declaration order");
        assert_eq!(AuthError::example(code).code(), code);
        // Every 401 is gRPC UNAUTHENTICATED and every 403 PERMISSION_DENIED, both ways.
        let status = code.http_status();
        assert_eq!(status == 401, code.grpc_code() == 16, "{code}");
        assert_eq!(status == 403, code.grpc_code() == 7, "{code}");
    }
    assert_eq!(ErrorCode::Unavailable.http_status(), 503);
    assert_eq!(ErrorCode::LimitReached.http_status(), 409);
    assert_eq!(ErrorCode::OwnerRequired.grpc_code(), 3);
    assert_eq!(ErrorCode::RateLimited.http_status(), 429);
    assert_eq!(ErrorCode::UsageExceeded.grpc_code(), 8);
    let refused: Response<String> =
        GrpcRejection.render(&AuthError::RateLimited { retry_after: 3 });
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert_eq!(
        refused.headers()["grpc-message"],
        "RATE_LIMITED: rate limit exceeded; retry in 3 s"
    );
}

/// Every error whose body depends on nothing but its kind, and two that depend on more.
fn fixed_and_not() -> (Vec<AuthError>, Vec<AuthError>) {
    use ExpiredReason as E;
    use InvalidKeyReason as I;
    let fixed = vec![
        AuthError::MissingKey,
        AuthError::InvalidKey(I::Malformed),
        AuthError::InvalidKey(I::BadChecksum),
        AuthError::InvalidKey(I::Ambiguous),
        AuthError::InvalidKey(I::Unknown),
        AuthError::ExpiredKey(E::Expired),
        AuthError::ExpiredKey(E::Revoked),
        AuthError::MissingPrincipal,
        AuthError::CrossOwnerAccess,
        AuthError::MasterKeyRequired,
        AuthError::OwnerRequired,
        AuthError::NotFound,
        AuthError::Unavailable(StoreError::unavailable("connection refused")),
    ];
    let varying = vec![
        AuthError::invalid("name: too long"),
        AuthError::PayloadTooLarge { limit: 7 },
    ];
    (fixed, varying)
}

#[test]
fn fixed_bodies_are_rendered_once_and_match_the_json() {
    let (fixed, varying) = fixed_and_not();
    let slots: HashSet<_> = fixed.iter().map(|e| e.fixed_body().unwrap()).collect();
    assert_eq!(
        slots.len(),
        FIXED_BODIES,
        "one slot per fixed body, all used"
    );
    assert!(slots.iter().all(|&slot| slot < FIXED_BODIES));
    for error in &fixed {
        let body = error.json_body();
        assert_eq!(
            body,
            serde_json::to_vec(&error.to_json()).unwrap(),
            "{error:?}"
        );
        let again = error.json_body();
        assert_eq!(body.as_ptr(), again.as_ptr(), "{error:?} is rendered once");
    }
    assert_eq!(
        AuthError::Unavailable(StoreError::unavailable("timeout")).json_body(),
        AuthError::Unavailable(StoreError::unavailable("refused")).json_body(),
        "the store error never reaches the body"
    );
    for error in &varying {
        assert_eq!(error.fixed_body(), None, "{error:?}");
        assert_eq!(
            error.json_body(),
            serde_json::to_vec(&error.to_json()).unwrap()
        );
    }
}
