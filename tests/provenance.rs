//! Provenance stamping (`BLNK_GENERATED_BY`) through a real axum router: `ApiKeyLayer` with a
//! `CachedResolver` over a `MemoryStore` holding one scoped key, plus the master key.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::post;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures_util::stream;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use proptest::prelude::*;
use time::OffsetDateTime;
use tower::{Layer, ServiceExt};
use tower_api_keys::error::AuthError;
use tower_api_keys::error::ErrorCode;
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::principal::Principal;
use tower_api_keys::provenance::{ProvenanceBody, ProvenanceLayer};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::KeyLimits;
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore};
use tower_http::decompression::RequestDecompressionLayer;

const MASTER: &str = "master-key-for-provenance-tests-0123";
const JSON: &str = "application/json";

struct Fixture {
    key: ApiKey,
    key_id: KeyId,
    resolver: CachedResolver,
}

async fn fixture() -> Fixture {
    let store = MemoryStore::new();
    let format = KeyFormat::default();
    let key = format.generate();
    let now = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "provenance test key".into(),
        owner: "team-a".into(),
        account: "team-a-account".into(),
        scopes: "ledgers:write".parse::<ScopeSet>().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: now,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    store
        .insert(&record, KeyLimits::default(), now)
        .await
        .unwrap();
    Fixture {
        key,
        key_id: record.id,
        resolver: CachedResolver::new(store),
    }
}

/// Echoes the body the handler received, with the framing headers it saw.
async fn echo(headers: HeaderMap, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    let seen = response.headers_mut();
    seen.insert("x-handled", "yes".parse().unwrap());
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        seen.insert("x-seen-content-length", len.clone());
    }
    if let Some(te) = headers.get(TRANSFER_ENCODING) {
        seen.insert("x-seen-transfer-encoding", te.clone());
    }
    response
}

impl Fixture {
    fn auth_layer(&self) -> ApiKeyLayer {
        ApiKeyLayer::new(self.resolver.clone())
            .master_key(ApiKey::new(MASTER))
            .optional()
    }

    /// `/records` (POST, GET, PUT) behind `provenance` as a route layer.
    fn app(&self, provenance: ProvenanceLayer) -> Router {
        Router::new()
            .route("/records", post(echo).get(echo).put(echo))
            .route_layer(provenance)
            .layer(self.auth_layer())
    }

    fn id(&self) -> &str {
        self.key_id.as_str()
    }
}

#[derive(Clone, Copy)]
enum Who<'a> {
    Scoped(&'a Fixture),
    Master,
    Anonymous,
}

/// A request to `/records` with a `Content-Length` matching `body`.
fn request(method: Method, who: Who<'_>, content_type: Option<&str>, body: &[u8]) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/records")
        .header(CONTENT_LENGTH, body.len());
    builder = match who {
        Who::Scoped(fx) => builder.header("x-api-key", fx.key.expose_secret()),
        Who::Master => builder.header("x-api-key", MASTER),
        Who::Anonymous => builder,
    };
    if let Some(content_type) = content_type {
        builder = builder.header(CONTENT_TYPE, content_type);
    }
    builder.body(Body::from(body.to_vec())).unwrap()
}

struct Answer {
    status: StatusCode,
    handled: bool,
    content_length: Option<String>,
    transfer_encoding: Option<String>,
    error: Option<AuthError>,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).expect("UTF-8 body")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn code(&self) -> String {
        self.json()["error_detail"]["code"]
            .as_str()
            .expect("error_detail.code")
            .to_owned()
    }

    /// Asserts the handler got exactly `expected`, with a matching `Content-Length`.
    fn assert_body(&self, expected: &[u8]) {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        assert!(self.handled);
        assert_eq!(
            self.body,
            expected,
            "\n got: {}\nwant: {}",
            String::from_utf8_lossy(&self.body),
            String::from_utf8_lossy(expected)
        );
        assert_eq!(
            self.content_length.as_deref(),
            Some(expected.len().to_string().as_str()),
            "Content-Length matches the body the handler reads"
        );
    }
}

async fn send(app: Router, request: Request<Body>) -> Answer {
    let response = app.oneshot(request).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let handled = header("x-handled").is_some();
    let content_length = header("x-seen-content-length");
    let transfer_encoding = header("x-seen-transfer-encoding");
    let status = response.status();
    let error = response.extensions().get::<AuthError>().cloned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        handled,
        content_length,
        transfer_encoding,
        error,
        body,
    }
}

async fn post_json(fx: &Fixture, body: &str) -> Answer {
    send(
        fx.app(ProvenanceLayer::new()),
        request(Method::POST, Who::Scoped(fx), Some(JSON), body.as_bytes()),
    )
    .await
}

#[tokio::test]
async fn numbers_are_kept_byte_for_byte() {
    let fx = fixture().await;
    let body = r#"{"amount": 12345678901234567890123, "precision": 1e400, "rate": 0.1000000000000000055511151231257827, "meta_data": {"big": 12345678901234567890123, "tiny": 1e-400, "neg": -0.0E+0}}"#;
    let answer = post_json(&fx, body).await;
    let expected = format!(
        r#"{{"amount": 12345678901234567890123, "precision": 1e400, "rate": 0.1000000000000000055511151231257827, "meta_data": {{"big": 12345678901234567890123, "tiny": 1e-400, "neg": -0.0E+0,"BLNK_GENERATED_BY":"{}"}}}}"#,
        fx.id()
    );
    answer.assert_body(expected.as_bytes());
}

#[tokio::test]
async fn order_escapes_whitespace_and_nested_metadata_are_kept() {
    let fx = fixture().await;
    let body = concat!(
        "{\n",
        "  \"z\": \"\\u00e9\\n\",\n",
        "  \"a\": {\"nested\": [1, 2.50, {\"deep\": \"\\\"q\\\" \\\\ \\/ \\ud83d\\ude00\"}]},\n",
        "  \"meta_data\" :\t{\n",
        "    \"zeta\": {\"inner\": {\"GENERATED_BY\": \"nested, not the stamp\"}},\n",
        "    \"alpha\": \"caf\\u00e9\"\n",
        "  },\r\n",
        "  \"m\": -0.0\n",
        "}\n",
    );
    let answer = post_json(&fx, body).await;
    let expected = body.replace(
        "\"alpha\": \"caf\\u00e9\"",
        &format!(
            "\"alpha\": \"caf\\u00e9\",\"BLNK_GENERATED_BY\":\"{}\"",
            fx.id()
        ),
    );
    assert_ne!(expected, body);
    answer.assert_body(expected.as_bytes());
    let value = answer.json();
    assert_eq!(
        value["meta_data"]["zeta"]["inner"]["GENERATED_BY"],
        "nested, not the stamp"
    );
    assert_eq!(value["z"], "é\n");
}

#[tokio::test]
async fn a_client_sent_stamp_is_overwritten() {
    let fx = fixture().await;
    let id = fx.id();
    let cases = [
        (
            r#"{"meta_data": {"BLNK_GENERATED_BY": "key_forged", "x": 1}}"#.to_owned(),
            format!(r#"{{"meta_data": {{"BLNK_GENERATED_BY": "{id}", "x": 1}}}}"#),
        ),
        (
            r#"{"meta_data": {"BLNK_GENERATED_BY": "a", "x": 1, "BLNK_GENERATED_BY": {"n": [1]}}}"#
                .to_owned(),
            format!(r#"{{"meta_data": {{"BLNK_GENERATED_BY": "{id}", "x": 1}}}}"#),
        ),
        (
            r#"{"meta_data": {"x": 1, "BLNK_GENERATED_BY": null, "BLNK_GENERATED_BY": "b"}}"#
                .to_owned(),
            format!(r#"{{"meta_data": {{"x": 1, "BLNK_GENERATED_BY": "{id}"}}}}"#),
        ),
        // An escaped key is the same key to every JSON parser.
        (
            r#"{"meta\u005fdata": {"BLNK_GENERATED\u005FBY": "key_forged"}}"#.to_owned(),
            format!(r#"{{"meta\u005fdata": {{"BLNK_GENERATED\u005FBY": "{id}"}}}}"#),
        ),
    ];
    for (body, expected) in cases {
        let answer = post_json(&fx, &body).await;
        answer.assert_body(expected.as_bytes());
        assert!(!answer.text().contains("forged"));
    }
}

/// Bodies that an exact reader (serde_json) and a case-insensitive one (Go's `encoding/json`)
/// could read two ways are refused, whatever the stamp field's case or depth.
#[tokio::test]
async fn ambiguous_metadata_and_stray_stamps_are_400() {
    let fx = fixture().await;
    for body in [
        // Issue #19, item 6: Go reads the later, case-variant member.
        r#"{"meta_data":{"a":1},"META_DATA":{"BLNK_GENERATED_BY":"forged"}}"#,
        r#"{"meta_data": {}, "meta_data": {"BLNK_GENERATED_BY": "forged"}}"#,
        r#"{"Meta_Data":{"note":"a lone case variant would sit beside the stamped meta_data"}}"#,
        r#"{"meta_data":{"blnk_generated_by":"forged"}}"#,
        "{\"meta_data\":{\"BLN\u{212A}_GENERATED_BY\":\"forged (KELVIN SIGN)\"}}",
        r#"{"meta_data":{"BLN\u212A_GENERATED_BY":"forged (escaped)"}}"#,
        r#"{"BLNK_GENERATED_BY":"forged","meta_data":{}}"#,
        r#"{"transactions":[{"meta_data":{"BLNK_GENERATED_BY":"forged"}}]}"#,
        r#"{"meta_data":{"nested":{"Blnk_Generated_By":"forged"}}}"#,
    ] {
        let answer = post_json(&fx, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(!answer.handled, "{body}");
        assert_eq!(answer.code(), "REQUEST_AMBIGUOUS_METADATA", "{body}");
        assert!(
            matches!(answer.error, Some(AuthError::AmbiguousMetadata(_))),
            "{body}"
        );
        assert!(!answer.text().contains("forged"), "the body is not echoed");
    }
    // Even where unstampable bodies pass through: an ambiguous one is a JSON object it could stamp.
    let answer = send(
        fx.app(ProvenanceLayer::new().pass_through_unstampable(true)),
        request(
            Method::POST,
            Who::Scoped(&fx),
            Some(JSON),
            br#"{"meta_data":{},"META_DATA":{"BLNK_GENERATED_BY":"forged"}}"#,
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    // Values are data, and the master key's bodies are not read.
    let answer = post_json(
        &fx,
        r#"{"note":"BLNK_GENERATED_BY","meta_data":{"x":"META_DATA"}}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = send(
        fx.app(ProvenanceLayer::new()),
        request(
            Method::POST,
            Who::Master,
            Some(JSON),
            br#"{"meta_data":{},"META_DATA":{}}"#,
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_or_null_metadata_becomes_an_object() {
    let fx = fixture().await;
    let id = fx.id();
    let cases = [
        (
            r#"{"name": "cash"}"#.to_owned(),
            format!(r#"{{"name": "cash","meta_data":{{"BLNK_GENERATED_BY":"{id}"}}}}"#),
        ),
        (
            "{ }".to_owned(),
            format!(r#"{{"meta_data":{{"BLNK_GENERATED_BY":"{id}"}} }}"#),
        ),
        (
            r#"{"meta_data": null, "name": "x"}"#.to_owned(),
            format!(r#"{{"meta_data": {{"BLNK_GENERATED_BY":"{id}"}}, "name": "x"}}"#),
        ),
        (
            r#"{"meta_data": {}}"#.to_owned(),
            format!(r#"{{"meta_data": {{"BLNK_GENERATED_BY":"{id}"}}}}"#),
        ),
    ];
    for (body, expected) in cases {
        post_json(&fx, &body).await.assert_body(expected.as_bytes());
    }
}

#[tokio::test]
async fn non_object_metadata_is_a_400() {
    let fx = fixture().await;
    for (metadata, found) in [
        (r#""a string""#, "a string"),
        ("12345678901234567890123", "a number"),
        ("[1, 2]", "an array"),
        ("true", "a boolean"),
        ("false", "a boolean"),
    ] {
        let answer = post_json(&fx, &format!(r#"{{"meta_data": {metadata}}}"#)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{metadata}");
        assert!(!answer.handled, "the handler does not run");
        assert_eq!(answer.code(), "REQUEST_INVALID_METADATA");
        let body = answer.json();
        let message = body["error_detail"]["message"].as_str().unwrap();
        assert!(message.contains("`meta_data`"), "{message}");
        assert!(message.contains(found), "{message}");
        assert_eq!(body["error"], body["error_detail"]["message"]);
        assert!(matches!(answer.error, Some(AuthError::InvalidMetadata(_))));
    }
}

impl Answer {
    /// Asserts the layer refused the request with 415 before the handler ran.
    fn assert_unstampable(&self) {
        assert_eq!(
            self.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{:?}",
            self.body
        );
        assert!(!self.handled, "the handler must not run");
        assert_eq!(self.code(), "REQUEST_UNSUPPORTED_MEDIA_TYPE");
        assert_eq!(
            self.error.as_ref().map(AuthError::code),
            Some(ErrorCode::UnsupportedMediaType)
        );
    }
}

/// Bodies a scoped key sends that the layer cannot stamp: refused by default, passed through
/// untouched with `pass_through_unstampable(true)`.
const UNSTAMPABLE: [(Option<&str>, &[u8]); 15] = [
    (
        Some("text/plain"),
        br#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}}"#,
    ),
    (
        Some("application/x-www-form-urlencoded"),
        br#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}}"#,
    ),
    (Some("multipart/form-data; boundary=x"), b"--x\r\n\r\n--x--"),
    (Some("application/json; charset=utf-16"), br#"{"a": 1}"#),
    (Some("application/jsonp"), br#"{"a": 1}"#),
    (Some("application/json, text/plain"), br#"{"a": 1}"#),
    (None, br#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}}"#),
    (None, b"hello, not JSON"),
    // A JSON media type, but not a JSON object the layer can stamp.
    (Some(JSON), br#"{"meta_data": {}"#),
    (Some(JSON), br#"{"a": 1} {"b": 2}"#),
    (Some(JSON), br#"{"a": 01}"#),
    (
        Some(JSON),
        br#"{"meta_data": {"BLNK_GENERATED_BY": "forged"},}"#,
    ),
    (
        Some(JSON),
        br#"[{"meta_data": {"BLNK_GENERATED_BY": "forged"}}]"#,
    ),
    (Some(JSON), br#" "meta_data" "#),
    (Some(JSON), b"\xef\xbb\xbf{\"a\": 1}"),
];

#[tokio::test]
async fn unstampable_bodies_are_refused_with_415() {
    let fx = fixture().await;
    for (content_type, body) in UNSTAMPABLE {
        let answer = send(
            fx.app(ProvenanceLayer::new()),
            request(Method::POST, Who::Scoped(&fx), content_type, body),
        )
        .await;
        answer.assert_unstampable();
    }
    for body in ["12345678901234567890123", "null", "true"] {
        post_json(&fx, body).await.assert_unstampable();
    }
}

#[tokio::test]
async fn unstampable_bodies_pass_through_untouched_when_asked() {
    let fx = fixture().await;
    let passing = || ProvenanceLayer::new().pass_through_unstampable(true);
    for (content_type, body) in UNSTAMPABLE {
        let answer = send(
            fx.app(passing()),
            request(Method::POST, Who::Scoped(&fx), content_type, body),
        )
        .await;
        if content_type.is_none() && body.starts_with(b"{") {
            // Without Content-Type a JSON object is still stamped: it is what a handler may read.
            let expected = format!(r#"{{"meta_data": {{"BLNK_GENERATED_BY": "{}"}}}}"#, fx.id());
            answer.assert_body(expected.as_bytes());
        } else {
            answer.assert_body(body);
        }
    }
    let gzip = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .header(CONTENT_TYPE, JSON)
        .header(CONTENT_ENCODING, "gzip")
        .header(CONTENT_LENGTH, 2)
        .body(Body::from("{}"))
        .unwrap();
    send(fx.app(passing()), gzip).await.assert_body(b"{}");
}

#[tokio::test]
async fn ambiguous_or_encoded_framing_is_refused_with_415() {
    let fx = fixture().await;
    let body = r#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}}"#;
    let cases: [&[(&str, &str)]; 9] = [
        &[("content-type", JSON), ("content-type", "text/plain")],
        &[("content-type", "text/plain"), ("content-type", JSON)],
        &[("content-type", JSON), ("content-type", JSON)],
        &[("content-type", JSON), ("content-encoding", "gzip")],
        &[("content-type", JSON), ("content-encoding", "GZIP")],
        &[
            ("content-type", JSON),
            ("content-encoding", "identity, gzip"),
        ],
        &[
            ("content-type", JSON),
            ("content-encoding", "identity"),
            ("content-encoding", "br"),
        ],
        &[
            ("content-type", JSON),
            ("transfer-encoding", "gzip, chunked"),
        ],
        &[
            ("content-type", JSON),
            ("transfer-encoding", "chunked, chunked"),
        ],
    ];
    for headers in cases {
        let mut request = request(Method::POST, Who::Scoped(&fx), None, body.as_bytes());
        for (name, value) in headers {
            request.headers_mut().append(*name, value.parse().unwrap());
        }
        let answer = send(fx.app(ProvenanceLayer::new()), request).await;
        answer.assert_unstampable();
    }
}

#[tokio::test]
async fn odd_but_plain_json_framing_is_stamped() {
    let fx = fixture().await;
    let body = br#"{"a":1}"#;
    let expected = format!(
        r#"{{"a":1,"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#,
        fx.id()
    );
    for headers in [
        &[("content-type", "Application/JSON; Charset=\"UTF-8\"")][..],
        &[("content-type", "application/vnd.api+json")],
        &[("content-type", JSON), ("content-encoding", "identity")],
        &[("content-type", JSON), ("transfer-encoding", "chunked")],
    ] {
        let mut request = request(Method::POST, Who::Scoped(&fx), None, body);
        for (name, value) in headers {
            request.headers_mut().append(*name, value.parse().unwrap());
        }
        send(fx.app(ProvenanceLayer::new()), request)
            .await
            .assert_body(expected.as_bytes());
    }
}

#[tokio::test]
async fn empty_bodies_go_on_unread() {
    let fx = fixture().await;
    for content_type in [None, Some(JSON)] {
        let answer = send(
            fx.app(ProvenanceLayer::new()),
            request(Method::POST, Who::Scoped(&fx), content_type, b""),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.handled);
        assert!(answer.body.is_empty());
    }
    // Streamed, so the layer reads it to learn it is empty.
    let request = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .body(Body::from_stream(stream::iter([Ok::<_, Infallible>(
            Bytes::new(),
        )])))
        .unwrap();
    let answer = send(fx.app(ProvenanceLayer::new()), request).await;
    assert!(answer.handled && answer.body.is_empty());
}

#[tokio::test]
async fn a_streamed_chunked_body_is_stamped() {
    let fx = fixture().await;
    let chunks = [
        r#"{"amount": 1234567"#,
        r#"8901234567890123, "meta"#,
        r#"_data": {"BLNK_GENERA"#,
        r#"TED_BY": "forged", "note": "\u00"#,
        r#"e9"}"#,
        "}",
    ];
    let body = Body::from_stream(stream::iter(
        chunks.map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
    ));
    let request = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .header(CONTENT_TYPE, JSON)
        .header(TRANSFER_ENCODING, "chunked")
        .body(body)
        .unwrap();
    let answer = send(fx.app(ProvenanceLayer::new()), request).await;
    let expected = format!(
        r#"{{"amount": 12345678901234567890123, "meta_data": {{"BLNK_GENERATED_BY": "{}", "note": "\u00e9"}}}}"#,
        fx.id()
    );
    answer.assert_body(expected.as_bytes());
    assert_eq!(
        answer.transfer_encoding, None,
        "the stamped body is a full body with a Content-Length"
    );
}

/// A JSON object of exactly `len` bytes.
fn padded(len: usize) -> String {
    let skeleton = r#"{"pad":""}"#;
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(len - skeleton.len()))
}

#[tokio::test]
async fn bodies_up_to_the_limit_are_stamped_and_larger_ones_refused() {
    const LIMIT: usize = 1000;
    let fx = fixture().await;
    let app = || fx.app(ProvenanceLayer::new().max_body_bytes(LIMIT));

    let at_limit = padded(LIMIT);
    let answer = send(
        app(),
        request(
            Method::POST,
            Who::Scoped(&fx),
            Some(JSON),
            at_limit.as_bytes(),
        ),
    )
    .await;
    let expected = format!(
        r#"{},"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#,
        &at_limit[..LIMIT - 1],
        fx.id()
    );
    answer.assert_body(expected.as_bytes());

    let check_413 = |answer: Answer| {
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!answer.handled);
        assert_eq!(answer.code(), "REQUEST_BODY_TOO_LARGE");
        assert_eq!(answer.json()["error_detail"]["details"]["limit"], LIMIT);
        assert!(matches!(
            answer.error,
            Some(AuthError::PayloadTooLarge { limit: LIMIT })
        ));
    };

    // Declared too large: refused before reading.
    let over = padded(LIMIT + 1);
    check_413(
        send(
            app(),
            request(Method::POST, Who::Scoped(&fx), Some(JSON), over.as_bytes()),
        )
        .await,
    );

    // Streamed without a length: refused while reading, before the stream ends.
    let streamed = |chunks: Vec<Bytes>| {
        Request::post("/records")
            .header("x-api-key", fx.key.expose_secret())
            .header(CONTENT_TYPE, JSON)
            .body(Body::from_stream(stream::iter(
                chunks.into_iter().map(Ok::<_, std::io::Error>),
            )))
            .unwrap()
    };
    let over = Bytes::from(padded(LIMIT + 1));
    check_413(send(app(), streamed(vec![over.slice(..600), over.slice(600..)])).await);
    // An endless body is refused too: the limit applies while reading.
    let endless = Body::from_stream(stream::repeat_with(|| {
        Ok::<_, std::io::Error>(Bytes::from_static(b"[1,2,3,4,5,6,7,8,9]"))
    }));
    let endless = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .body(endless)
        .unwrap();
    check_413(send(app(), endless).await);

    let at_limit = Bytes::from(padded(LIMIT));
    let answer = send(
        app(),
        streamed(vec![at_limit.slice(..1), at_limit.slice(1..)]),
    )
    .await;
    answer.assert_body(expected.as_bytes());

    // A body refused by its headers is refused before its size matters; passed through, it is
    // not limited by the layer, which does not read it.
    let large_upload = vec![b'x'; LIMIT * 4];
    let upload = || {
        request(
            Method::POST,
            Who::Scoped(&fx),
            Some("application/octet-stream"),
            &large_upload,
        )
    };
    send(app(), upload()).await.assert_unstampable();
    let passing = fx.app(
        ProvenanceLayer::new()
            .max_body_bytes(LIMIT)
            .pass_through_unstampable(true),
    );
    send(passing, upload()).await.assert_body(&large_upload);
}

#[tokio::test]
async fn invalid_utf8_is_refused() {
    let fx = fixture().await;
    for body in [
        &b"{\"meta_data\": {}, \"name\": \"\xff\"}"[..],
        b"{\"meta_data\": {\"BLNK_GENERATED_BY\": \"\xc3\x28\"}}",
    ] {
        let answer = send(
            fx.app(ProvenanceLayer::new()),
            request(Method::POST, Who::Scoped(&fx), Some(JSON), body),
        )
        .await;
        answer.assert_unstampable();
    }
}

#[tokio::test]
async fn the_master_key_and_anonymous_requests_add_nothing() {
    let fx = fixture().await;
    let body = br#"{"meta_data": {"BLNK_GENERATED_BY": "client"}, "a": 1}"#;
    for who in [Who::Master, Who::Anonymous] {
        let answer = send(
            fx.app(ProvenanceLayer::new()),
            request(Method::POST, who, Some(JSON), body),
        )
        .await;
        answer.assert_body(body);
        // Nor are they refused for bodies the layer could not stamp: it never reads theirs.
        for (content_type, body) in UNSTAMPABLE {
            let answer = send(
                fx.app(ProvenanceLayer::new()),
                request(Method::POST, who, content_type, body),
            )
            .await;
            answer.assert_body(body);
        }
    }
    // Nor do they hit the body limit: the body is not read.
    let big = padded(100);
    let answer = send(
        fx.app(ProvenanceLayer::new().max_body_bytes(10)),
        request(Method::POST, Who::Master, Some(JSON), big.as_bytes()),
    )
    .await;
    answer.assert_body(big.as_bytes());
}

#[tokio::test]
async fn only_the_configured_methods_are_stamped() {
    let fx = fixture().await;
    let body = br#"{"a":1}"#;
    let stamped = format!(
        r#"{{"a":1,"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#,
        fx.id()
    );

    for method in [Method::GET, Method::PUT] {
        let answer = send(
            fx.app(ProvenanceLayer::new()),
            request(method, Who::Scoped(&fx), Some(JSON), body),
        )
        .await;
        answer.assert_body(body);
    }

    let put_only = || ProvenanceLayer::new().methods([Method::PUT]);
    let answer = send(
        fx.app(put_only()),
        request(Method::PUT, Who::Scoped(&fx), Some(JSON), body),
    )
    .await;
    answer.assert_body(stamped.as_bytes());
    let answer = send(
        fx.app(put_only()),
        request(Method::POST, Who::Scoped(&fx), Some(JSON), body),
    )
    .await;
    answer.assert_body(body);
}

#[tokio::test]
async fn content_length_is_corrected() {
    let fx = fixture().await;
    let body = br#"{"meta_data":{"BLNK_GENERATED_BY":"a-long-forged-value-that-is-longer-than-an-id-0123456789"}}"#;
    let answer = send(
        fx.app(ProvenanceLayer::new()),
        request(Method::POST, Who::Scoped(&fx), Some(JSON), body),
    )
    .await;
    let expected = format!(r#"{{"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#, fx.id());
    assert!(expected.len() < body.len(), "the body shrinks");
    answer.assert_body(expected.as_bytes());
    assert_ne!(answer.content_length, Some(body.len().to_string()));
}

#[tokio::test]
async fn field_names_are_configurable() {
    let fx = fixture().await;
    let provenance = ProvenanceLayer::new()
        .metadata_field("metadata")
        .stamp_field("created_by");
    let body = br#"{"meta_data":{},"metadata":{"created_by":"x","BLNK_GENERATED_BY":"y"}}"#;
    let answer = send(
        fx.app(provenance),
        request(Method::POST, Who::Scoped(&fx), Some(JSON), body),
    )
    .await;
    let expected = format!(
        r#"{{"meta_data":{{}},"metadata":{{"created_by":"{}","BLNK_GENERATED_BY":"y"}}}}"#,
        fx.id()
    );
    answer.assert_body(expected.as_bytes());

    let answer = send(
        fx.app(ProvenanceLayer::new().metadata_field("metadata")),
        request(
            Method::POST,
            Who::Scoped(&fx),
            Some(JSON),
            br#"{"metadata": "not an object"}"#,
        ),
    )
    .await;
    assert_eq!(answer.code(), "REQUEST_INVALID_METADATA");
    assert!(answer.text().contains("`metadata`"));
}

#[tokio::test]
async fn works_as_a_plain_router_layer_with_a_custom_rejection() {
    let fx = fixture().await;
    let provenance = ProvenanceLayer::new().rejection(|error: &AuthError| {
        Response::builder()
            .status(error.http_status())
            .body(Body::from(format!("refused: {}", error.code())))
            .unwrap()
    });
    let app = || {
        Router::new()
            .route("/records", post(echo))
            .layer(provenance.clone())
            .layer(fx.auth_layer())
    };
    let answer = send(
        app(),
        request(Method::POST, Who::Scoped(&fx), Some(JSON), b"{}"),
    )
    .await;
    let expected = format!(r#"{{"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#, fx.id());
    answer.assert_body(expected.as_bytes());

    let answer = send(
        app(),
        request(
            Method::POST,
            Who::Scoped(&fx),
            Some(JSON),
            br#"{"meta_data":1}"#,
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.text(), "refused: REQUEST_INVALID_METADATA");
    assert_eq!(
        answer.error.map(|e| e.code()),
        Some(ErrorCode::InvalidMetadata),
        "the typed error travels in the response extensions"
    );
}

#[tokio::test]
async fn a_body_that_fails_to_read_is_a_400() {
    let fx = fixture().await;
    let chunks = vec![
        Ok(Bytes::from_static(b"{\"a\":")),
        Err(std::io::Error::other("connection reset")),
    ];
    let request = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .header(CONTENT_TYPE, JSON)
        .body(Body::from_stream(stream::iter(chunks)))
        .unwrap();
    let answer = send(fx.app(ProvenanceLayer::new()), request).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(!answer.handled);
    assert_eq!(answer.code(), "APIKEY_INVALID");
}

/// Without axum: any body type, wrapped in `ProvenanceBody`, through a plain tower service.
#[tokio::test]
async fn other_body_types_work_through_provenance_body() {
    type Inner =
        StreamBody<stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>>;
    let service = ProvenanceLayer::new().layer(tower::service_fn(
        |request: Request<ProvenanceBody<Inner>>| async move {
            let bytes = request.into_body().collect().await?.to_bytes();
            Ok::<_, Infallible>(Response::new(Full::new(bytes)))
        },
    ));
    let frames = |parts: &[&'static str]| -> Inner {
        StreamBody::new(stream::iter(
            parts
                .iter()
                .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes()))))
                .collect::<Vec<_>>(),
        ))
    };
    let key_id = KeyId::new("key_stream");
    let principal = Principal::scoped(
        key_id.clone(),
        "k",
        "owner",
        "account",
        ScopeSet::default(),
        None,
    );

    let mut request = Request::post("/")
        .header(CONTENT_TYPE, JSON)
        .body(ProvenanceBody::new(frames(&[r#"{"meta_data":"#, "null}"])))
        .unwrap();
    request.extensions_mut().insert(principal.clone());
    let response = service.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, r#"{"meta_data":{"BLNK_GENERATED_BY":"key_stream"}}"#);

    let mut request = Request::post("/")
        .header(CONTENT_TYPE, JSON)
        .body(ProvenanceBody::new(frames(&[r#"{"meta_data":[]}"#])))
        .unwrap();
    request.extensions_mut().insert(principal);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error_detail"]["code"], "REQUEST_INVALID_METADATA");
}

// ---------------------------------------------------------------------------------------------
// Property: for random JSON objects, the stamped body is the original plus exactly one field.
// ---------------------------------------------------------------------------------------------

const META: &str = "meta_data";
const STAMP: &str = "BLNK_GENERATED_BY";
const PROP_ID: &str = "key_01J\"prop\\id";

/// A JSON value that keeps numbers as written and members in order (duplicates included).
#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn arb_number() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,30})(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
        Just("12345678901234567890123".to_owned()),
        Just("1e400".to_owned()),
        Just("0.1000000000000000055511151231257827".to_owned()),
    ]
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{0,6}",
        2 => any::<String>(),
        1 => Just(META.to_owned()),
        1 => Just(STAMP.to_owned()),
        1 => prop::sample::select(CASE_VARIANTS.to_vec()).prop_map(str::to_owned),
    ]
}

/// Names a case-insensitive reader takes for the metadata or the stamp field.
const CASE_VARIANTS: [&str; 6] = [
    "META_DATA",
    "Meta_Data",
    "blnk_generated_by",
    "BLN\u{212A}_GENERATED_BY",
    "Blnk_Generated_By",
    "meta_datA",
];

/// A member name as Go's `encoding/json` compares it with a struct field's: upper case, one
/// character for one, with U+212A KELVIN SIGN and U+017F LONG S folded onto `K` and `S`.
fn go_fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '\u{212A}' => 'K',
            '\u{17F}' => 'S',
            c => {
                let mut upper = c.to_uppercase();
                match (upper.next(), upper.next()) {
                    (Some(one), None) => one,
                    _ => c,
                }
            }
        })
        .collect()
}

fn folds_to(name: &str, field: &str) -> bool {
    go_fold(name) == go_fold(field)
}

/// Whether the documented rule refuses `document` as ambiguous: a top-level metadata member
/// under case folding that is not the only one or not spelt exactly, or a stamp member under case
/// folding anywhere but directly in the (exact) metadata object under its exact name.
fn ambiguous(document: &J) -> bool {
    fn stray_stamp(value: &J) -> bool {
        match value {
            J::Obj(members) => members
                .iter()
                .any(|(k, v)| folds_to(k, STAMP) || stray_stamp(v)),
            J::Arr(items) => items.iter().any(stray_stamp),
            _ => false,
        }
    }
    let J::Obj(members) = document else {
        return false;
    };
    let metas: Vec<_> = members.iter().filter(|(k, _)| folds_to(k, META)).collect();
    if metas.len() > 1 || metas.iter().any(|(k, _)| k != META) {
        return true;
    }
    members.iter().any(|(k, v)| match (k == META, v) {
        (true, J::Obj(inner)) => inner
            .iter()
            .any(|(k, v)| (folds_to(k, STAMP) && k != STAMP) || stray_stamp(v)),
        _ => folds_to(k, STAMP) || stray_stamp(v),
    })
}

fn arb_value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        arb_number().prop_map(J::Num),
        arb_text().prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((arb_text(), inner), 0..6).prop_map(J::Obj),
        ]
    })
}

/// Top-level objects that often hold metadata (objects with and without stamps, null, others).
fn arb_document() -> impl Strategy<Value = J> {
    let metadata = prop_oneof![
        4 => prop::collection::vec(
            (prop_oneof![1 => Just(STAMP.to_owned()), 3 => arb_text()], arb_value()),
            0..5
        )
        .prop_map(J::Obj),
        1 => Just(J::Null),
        1 => arb_value(),
    ];
    let member = prop_oneof![
        3 => (arb_text(), arb_value()),
        2 => metadata.prop_map(|m| (META.to_owned(), m)),
    ];
    prop::collection::vec(member, 0..7).prop_map(J::Obj)
}

/// Renders `value`, choosing whitespace and string escapes from `style`.
struct Style<'a> {
    seed: &'a [u8],
    at: usize,
}

impl Style<'_> {
    fn next(&mut self) -> u8 {
        let b = self
            .seed
            .get(self.at % self.seed.len().max(1))
            .copied()
            .unwrap_or(0);
        self.at += 1;
        b
    }

    fn ws(&mut self, out: &mut String) {
        out.push_str(["", "", " ", "\n  ", "\t", "\r\n", "  "][usize::from(self.next()) % 7]);
    }

    fn string(&mut self, s: &str, out: &mut String) {
        if self.next().is_multiple_of(3) {
            // Every character escaped as \uXXXX (surrogate pairs above U+FFFF).
            out.push('"');
            for unit in s.encode_utf16() {
                out.push_str(&format!("\\u{unit:04X}"));
            }
            out.push('"');
        } else {
            out.push_str(&serde_json::to_string(s).unwrap());
        }
    }

    fn render(&mut self, value: &J, out: &mut String) {
        self.ws(out);
        match value {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => self.string(s, out),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.render(item, out);
                }
                self.ws(out);
                out.push(']');
            }
            J::Obj(members) => {
                out.push('{');
                for (i, (key, item)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.ws(out);
                    self.string(key, out);
                    self.ws(out);
                    out.push(':');
                    self.render(item, out);
                }
                self.ws(out);
                out.push('}');
            }
        }
        self.ws(out);
    }
}

/// An independent, recursive reference parser (test inputs are shallow).
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn parse(s: &[u8]) -> J {
        let mut p = Parser { s, i: 0 };
        let value = p.value();
        p.ws();
        assert_eq!(p.i, s.len(), "trailing data");
        value
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && b" \t\r\n".contains(&self.s[self.i]) {
            self.i += 1;
        }
    }

    fn value(&mut self) -> J {
        self.ws();
        let c = self.s[self.i];
        match c {
            b'n' => self.word("null", J::Null),
            b't' => self.word("true", J::Bool(true)),
            b'f' => self.word("false", J::Bool(false)),
            b'"' => J::Str(self.string()),
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return J::Arr(items);
                }
                loop {
                    items.push(self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b']' => return J::Arr(items),
                        other => panic!("unexpected {}", other as char),
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return J::Obj(members);
                }
                loop {
                    self.ws();
                    let key = self.string();
                    self.ws();
                    assert_eq!(self.s[self.i], b':');
                    self.i += 1;
                    members.push((key, self.value()));
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b'}' => return J::Obj(members),
                        other => panic!("unexpected {}", other as char),
                    }
                }
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                J::Num(String::from_utf8(self.s[start..self.i].to_vec()).unwrap())
            }
        }
    }

    fn word(&mut self, word: &str, value: J) -> J {
        assert!(self.s[self.i..].starts_with(word.as_bytes()));
        self.i += word.len();
        value
    }

    fn string(&mut self) -> String {
        let start = self.i;
        self.i += 1;
        while self.s[self.i] != b'"' {
            self.i += if self.s[self.i] == b'\\' { 2 } else { 1 };
        }
        self.i += 1;
        serde_json::from_slice(&self.s[start..self.i]).unwrap()
    }
}

/// What stamping must produce, by the documented rules; `None` if the metadata is not an object.
fn expected(document: &J) -> Option<J> {
    let J::Obj(members) = document else {
        unreachable!("documents are objects")
    };
    let stamp = || (STAMP.to_owned(), J::Str(PROP_ID.to_owned()));
    let mut members = members.clone();
    if !members.iter().any(|(k, _)| k == META) {
        members.push((META.to_owned(), J::Obj(vec![stamp()])));
    }
    for (key, value) in &mut members {
        if key != META {
            continue;
        }
        match value {
            J::Null => *value = J::Obj(vec![stamp()]),
            J::Obj(inner) => match inner.iter().position(|(k, _)| k == STAMP) {
                Some(first) => {
                    inner[first].1 = J::Str(PROP_ID.to_owned());
                    let mut index = 0;
                    inner.retain(|(k, _)| {
                        index += 1;
                        k != STAMP || index == first + 1
                    });
                }
                None => inner.push(stamp()),
            },
            _ => return None,
        }
    }
    Some(J::Obj(members))
}

/// Whether stamping is one insertion (one metadata object without a stamp, or none at all).
fn is_single_insertion(document: &J) -> bool {
    let J::Obj(members) = document else {
        return false;
    };
    let metas: Vec<_> = members.iter().filter(|(k, _)| k == META).collect();
    match metas.as_slice() {
        [] => true,
        [(_, J::Obj(inner))] => !inner.iter().any(|(k, _)| k == STAMP),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Integration tests have no lib.rs next to them to persist regressions for.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn stamped_bodies_are_the_original_plus_one_field(
        document in arb_document(),
        seed in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut text = String::new();
        Style { seed: &seed, at: 0 }.render(&document, &mut text);
        prop_assert_eq!(Parser::parse(text.as_bytes()), document.clone(), "the renderer is faithful");

        let outcome = ProvenanceLayer::new().stamp(text.as_bytes(), &KeyId::new(PROP_ID));
        if ambiguous(&document) {
            prop_assert!(matches!(outcome, Err(AuthError::AmbiguousMetadata(_))), "{:?}", outcome);
            return Ok(());
        }
        prop_assert!(!matches!(outcome, Err(AuthError::AmbiguousMetadata(_))), "{}", text);
        let Some(want) = expected(&document) else {
            prop_assert!(matches!(outcome, Err(AuthError::InvalidMetadata(_))), "{:?}", outcome);
            return Ok(());
        };
        let stamped = outcome.expect("metadata is an object").expect("a JSON object is stamped");
        let got = Parser::parse(&stamped);
        prop_assert_eq!(&got, &want, "\n{}\n{}", text, String::from_utf8_lossy(&stamped));

        // Byte-exact outside the inserted member: the output is the input with one insertion.
        if is_single_insertion(&document) {
            let prefix = text.bytes().zip(&stamped).take_while(|(a, b)| a == *b).count();
            let suffix = text.bytes().rev().zip(stamped.iter().rev())
                .take_while(|(a, b)| a == *b).count();
            prop_assert!(prefix + suffix >= text.len(), "one contiguous insertion");
            let inserted = &stamped[prefix..stamped.len() - (text.len() - prefix)];
            let inserted = String::from_utf8(inserted.to_vec()).unwrap();
            prop_assert!(inserted.contains(r#""BLNK_GENERATED_BY":"key_01J\"prop\\id""#), "{}", inserted);
        }

        // The same as a serde_json::Value, when serde_json reads the input (finite numbers).
        if let Ok(mut original) = serde_json::from_str::<serde_json::Value>(&text) {
            let stamped: serde_json::Value = serde_json::from_slice(&stamped).unwrap();
            let object = original.as_object_mut().unwrap();
            let meta = object.entry(META).or_insert(serde_json::Value::Null);
            if meta.is_null() {
                *meta = serde_json::json!({});
            }
            meta.as_object_mut().unwrap().insert(STAMP.to_owned(), PROP_ID.into());
            prop_assert_eq!(stamped, original);
        }
    }
}

/// Bytes that make interesting edits to JSON text.
fn arb_edit_byte() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(b"{}[],:\"\\ \t\r\n0123456789eE+-.tfnlrsau/x".to_vec())
            .prop_map(|b| vec![b]),
        Just(vec![0]),
        Just(vec![0x1f]),
        Just(vec![0x7f]),
        Just(vec![0xff]),
        Just("é".as_bytes().to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just(b"\\u005f".to_vec()),
        Just(b"null".to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Security: whatever serde_json (axum's `Json`) accepts as an object, the layer stamps (or
    /// refuses for its metadata). If the scanner were stricter than the handler's parser, a client
    /// could slip a forged stamp past it with a body the scanner rejects.
    #[test]
    fn every_object_serde_json_accepts_is_stamped(
        document in arb_document(),
        seed in prop::collection::vec(any::<u8>(), 1..64),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, arb_edit_byte()), 1..4),
    ) {
        let mut text = String::new();
        Style { seed: &seed, at: 0 }.render(&document, &mut text);
        let mut bytes = text.into_bytes();
        for (at, op, with) in edits {
            let at = at.index(bytes.len() + 1);
            match op {
                0 => { bytes.splice(at..at, with); }
                1 if at < bytes.len() => { bytes.remove(at); }
                _ if at < bytes.len() => { bytes.splice(at..=at, with); }
                _ => {}
            }
        }
        let accepted = serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|value| value.is_object());
        let outcome = ProvenanceLayer::new().stamp(&bytes, &KeyId::new(PROP_ID));
        if accepted {
            prop_assert!(
                matches!(
                    outcome,
                    Ok(Some(_))
                        | Err(AuthError::InvalidMetadata(_) | AuthError::AmbiguousMetadata(_))
                ),
                "serde_json accepts {:?} but it was not stamped: {:?}",
                String::from_utf8_lossy(&bytes),
                outcome
            );
        }
        if let Ok(Some(stamped)) = outcome {
            // Stamping never turns a body serde_json accepts into one it refuses.
            if accepted {
                let value: serde_json::Value = serde_json::from_slice(&stamped).unwrap();
                prop_assert_eq!(&value[META][STAMP], PROP_ID);
            }
        }
    }
}

#[test]
fn edge_cases_serde_json_accepts_are_stamped() {
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
    let docs: Vec<&[u8]> = vec![
        b"\xef\xbb\xbf{\"a\":1}",
        b"{\"a\":1}\n\t\r ",
        b"{\"a\":-0,\"b\":1E+2,\"c\":0.0e-0,\"d\":-1.5E308}",
        b"{\"a\":\"\\u0000\\/\"}",
        b"{\"a\":\"\\ud83d\\ude00\",\"\\u006d\\u0065ta_data\":{}}",
        b"{\"\":{\"\":[]}}",
        deep.as_bytes(),
    ];
    for doc in docs {
        let accepted = serde_json::from_slice::<serde_json::Value>(doc).is_ok();
        let outcome = ProvenanceLayer::new().stamp(doc, &KeyId::new("k")).unwrap();
        if accepted {
            let stamped = outcome
                .unwrap_or_else(|| panic!("serde_json accepts {:?}", String::from_utf8_lossy(doc)));
            let value: serde_json::Value = serde_json::from_slice(&stamped).unwrap();
            assert_eq!(value[META][STAMP], "k");
        }
    }
    // serde_json refuses a byte-order mark, so the scanner may too (the body passes untouched and
    // the handler refuses it).
    assert!(serde_json::from_slice::<serde_json::Value>(b"\xef\xbb\xbf{}").is_err());
}

// ---------------------------------------------------------------------------------------------
// Property: whatever the framing (Content-Type, Content-Encoding, Transfer-Encoding, body), a
// scoped key's request is refused with nothing stored, or every record stored carries its key id;
// even behind a handler that believes anything it is sent.
// ---------------------------------------------------------------------------------------------

/// The raw JSON text of every record a handler stored.
#[derive(Clone, Default)]
struct Stored(Arc<Mutex<Vec<Vec<u8>>>>);

/// A credulous handler: it decompresses the body if any `Content-Encoding` header mentions gzip (in
/// any case), decodes UTF-16 if any `Content-Type` mentions it, skips a byte order mark, parses
/// JSON with serde_json whatever the media type, and stores every object it finds (an array's
/// elements too). The layer must leave it nothing forged to store.
async fn credulous(State(stored): State<Stored>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mentions = |name, word: &str| {
        headers.get_all(name).iter().any(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .to_ascii_lowercase()
                .contains(word)
        })
    };
    let mut bytes = body.to_vec();
    if mentions(CONTENT_ENCODING, "gzip") {
        let mut plain = Vec::new();
        if GzDecoder::new(&bytes[..]).read_to_end(&mut plain).is_ok() {
            bytes = plain;
        }
    }
    let text = if mentions(CONTENT_TYPE, "utf-16") {
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|pair| u16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => return StatusCode::BAD_REQUEST,
        }
    };
    let text = text.trim_start_matches('\u{feff}');
    let records: Vec<String> = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => vec![text.to_owned()],
        Ok(serde_json::Value::Array(_)) => {
            match serde_json::from_str::<Vec<Box<serde_json::value::RawValue>>>(text) {
                Ok(items) => items.iter().map(|raw| raw.get().to_owned()).collect(),
                Err(_) => return StatusCode::BAD_REQUEST,
            }
        }
        _ => return StatusCode::BAD_REQUEST,
    };
    let mut stored = stored.0.lock().unwrap();
    for record in records.into_iter().filter(|r| r.starts_with('{')) {
        stored.push(record.into_bytes());
    }
    StatusCode::CREATED
}

/// Whether `raw` (a JSON object) carries exactly `id` as its stamp for an exact reader (serde_json,
/// [`exact_stamp_is`]) and for Go's `encoding/json` ([`go_stamp`]).
fn stamp_is(raw: &[u8], id: &str) -> Result<(), String> {
    exact_stamp_is(raw, id)?;
    let want = J::Str(id.to_owned());
    for (rule, seen) in [
        (
            "exact match preferred",
            go_stamp(raw, GoRule::ExactPreferred),
        ),
        ("every match, in order", go_stamp(raw, GoRule::EveryMatch)),
    ] {
        if seen.as_ref() != Some(&want) {
            return Err(format!(
                "Go ({rule}) reads the stamp as {seen:?}: {}",
                String::from_utf8_lossy(raw)
            ));
        }
    }
    Ok(())
}

/// How a Go reader picks the member for a struct field.
#[derive(Clone, Copy, Debug)]
enum GoRule {
    /// The member named exactly like the field if there is one, else one equal under case
    /// folding; the later of several wins.
    ExactPreferred,
    /// What `encoding/json` does with a struct field: every member equal under case folding is
    /// decoded into it, in order (a struct is decoded into in place, so members merge and the
    /// later wins; `null` leaves it as it is).
    EveryMatch,
}

/// The stamp a Go program reading `raw` into `struct { M struct { S any } }` (tagged with the
/// metadata and stamp field names) sees, if any.
fn go_stamp(raw: &[u8], rule: GoRule) -> Option<J> {
    let J::Obj(members) = Parser::parse(raw) else {
        return None;
    };
    fn matching<'a>(members: &'a [(String, J)], field: &str, rule: GoRule) -> Vec<&'a J> {
        let exact: Vec<&J> = members
            .iter()
            .filter(|(k, _)| k == field)
            .map(|(_, v)| v)
            .collect();
        match rule {
            GoRule::ExactPreferred if !exact.is_empty() => {
                exact.into_iter().rev().take(1).collect()
            }
            _ => {
                let folded = members.iter().filter(|(k, _)| folds_to(k, field));
                let folded: Vec<&J> = folded.map(|(_, v)| v).collect();
                match rule {
                    GoRule::ExactPreferred => folded.into_iter().rev().take(1).collect(),
                    GoRule::EveryMatch => folded,
                }
            }
        }
    }
    let mut stamp = None;
    for meta in matching(&members, META, rule) {
        if let J::Obj(inner) = meta {
            for value in matching(inner, STAMP, rule) {
                // `null` into an `any` field sets it to nil: Some(Null) is not the stamp either.
                stamp = Some(value.clone());
            }
        }
    }
    stamp
}

/// Whether `raw` (a JSON object) carries exactly `id` as its stamp, read the way any exact parser
/// could: every metadata member (duplicates included) is an object whose every stamp member is
/// `id`.
fn exact_stamp_is(raw: &[u8], id: &str) -> Result<(), String> {
    let lossy = || String::from_utf8_lossy(raw).into_owned();
    let J::Obj(members) = Parser::parse(raw) else {
        return Err(format!("not an object: {}", lossy()));
    };
    let metas: Vec<&J> = members
        .iter()
        .filter(|(k, _)| k == META)
        .map(|(_, v)| v)
        .collect();
    if metas.is_empty() {
        return Err(format!("no metadata: {}", lossy()));
    }
    for meta in metas {
        let J::Obj(inner) = meta else {
            return Err(format!("metadata not an object: {}", lossy()));
        };
        let stamps: Vec<&J> = inner
            .iter()
            .filter(|(k, _)| k == STAMP)
            .map(|(_, v)| v)
            .collect();
        if stamps.is_empty() || stamps.iter().any(|s| **s != J::Str(id.to_owned())) {
            return Err(format!("stamp is not {id}: {}", lossy()));
        }
    }
    Ok(())
}

/// Content types, odd ones included (casing, whitespace, parameters, lists, near misses). The
/// first six are accepted.
const CONTENT_TYPES: [&str; 18] = [
    "application/json",
    "APPLICATION/JSON",
    "Application/Json ; charset=UTF-8",
    " application/json",
    "application/json\t",
    "application/json; charset=\"utf-8\"",
    "application/json;charset=utf-16",
    "application/json; profile=x",
    "application/vnd.blnk+json",
    "application/+json",
    "application/jsonp",
    "application/json, text/plain",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application /json",
    "",
];

const CONTENT_ENCODINGS: [&str; 11] = [
    "identity",
    "IDENTITY",
    " identity ",
    "gzip",
    "GZIP",
    "x-gzip",
    " gzip",
    "identity, gzip",
    "gzip, identity",
    "br",
    "",
];

const TRANSFER_ENCODINGS: [&str; 4] = ["chunked", "CHUNKED", "gzip, chunked", "identity"];

/// Bodies that try to carry a forged stamp, and some that are just JSON.
const BODIES: [&str; 20] = [
    r#"{"meta_data":{"a":1},"META_DATA":{"BLNK_GENERATED_BY":"forged"}}"#,
    r#"{"META_DATA":{"BLNK_GENERATED_BY":"forged"}}"#,
    r#"{"Meta_Data":{"x":1}}"#,
    r#"{"meta_data":{"blnk_generated_by":"forged"}}"#,
    "{\"meta_data\":{\"BLN\u{212A}_GENERATED_BY\":\"forged\"}}",
    r#"{"meta_data":{"x":1},"meta_data":{"BLNK_GENERATED_BY":"forged"}}"#,
    r#"{"items":[{"meta_data":{"BLNK_GENERATED_BY":"forged"}}]}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged"},"mEtA_dAtA":null}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged"}}"#,
    r#"{"meta\u005fdata":{"BLNK_GENERATED\u005fBY":"forged"}}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged"},"meta_data":{"BLNK_GENERATED_BY":"forged2"}}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged","BLNK_GENERATED_BY":"forged2"}}"#,
    r#"{"meta_data":null,"amount":12345678901234567890123}"#,
    r#"{"name":"cash"}"#,
    r#"{"meta_data":"forged"}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged"},}"#,
    r#"{"meta_data":{"BLNK_GENERATED_BY":"forged"}} {"x":1}"#,
    r#"meta_data={"BLNK_GENERATED_BY":"forged"}"#,
    "",
    "  ",
];

/// How a body is put on the wire.
#[derive(Clone, Copy, Debug)]
enum Wire {
    Plain,
    Gzip,
    Utf16,
    ByteOrderMark,
    InArray,
    Padded,
}

fn encode(body: &str, wire: Wire) -> Vec<u8> {
    match wire {
        Wire::Plain => body.as_bytes().to_vec(),
        Wire::Gzip => {
            let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(body.as_bytes()).unwrap();
            encoder.finish().unwrap()
        }
        Wire::Utf16 => body.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        Wire::ByteOrderMark => [&b"\xef\xbb\xbf"[..], body.as_bytes()].concat(),
        Wire::InArray => format!("[{body}]").into_bytes(),
        Wire::Padded => format!("\r\n {body}\t\n").into_bytes(),
    }
}

#[derive(Clone, Debug)]
struct Framing {
    content_types: Vec<&'static str>,
    content_encodings: Vec<&'static str>,
    transfer_encoding: Option<&'static str>,
    body: String,
    wire: Wire,
    streamed: bool,
}

fn arb_framing() -> impl Strategy<Value = Framing> {
    let content_types = prop_oneof![
        1 => Just(vec![]),
        12 => prop::sample::select(&CONTENT_TYPES[..6]).prop_map(|t| vec![t]),
        4 => prop::sample::select(&CONTENT_TYPES[..]).prop_map(|t| vec![t]),
        2 => prop::collection::vec(prop::sample::select(&CONTENT_TYPES[..]), 2..=3),
    ];
    let content_encodings = prop_oneof![
        12 => Just(vec![]),
        3 => prop::sample::select(&CONTENT_ENCODINGS[..]).prop_map(|e| vec![e]),
        1 => prop::collection::vec(prop::sample::select(&CONTENT_ENCODINGS[..]), 2..=2),
    ];
    let transfer_encoding = prop_oneof![
        8 => Just(None),
        1 => prop::sample::select(&TRANSFER_ENCODINGS[..]).prop_map(Some),
    ];
    let body = prop_oneof![
        1 => prop::sample::select(&BODIES[..]).prop_map(str::to_owned),
        1 => (arb_document(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(doc, seed)| {
            let mut text = String::new();
            Style { seed: &seed, at: 0 }.render(&doc, &mut text);
            text
        }),
    ];
    let wire = prop_oneof![
        16 => Just(Wire::Plain),
        2 => Just(Wire::Gzip),
        1 => Just(Wire::Utf16),
        1 => Just(Wire::ByteOrderMark),
        1 => Just(Wire::InArray),
        1 => Just(Wire::Padded),
    ];
    (
        content_types,
        content_encodings,
        transfer_encoding,
        body,
        wire,
        any::<bool>(),
    )
        .prop_map(
            |(content_types, content_encodings, transfer_encoding, body, wire, streamed)| Framing {
                content_types,
                content_encodings,
                transfer_encoding,
                body,
                wire,
                streamed,
            },
        )
}

impl Framing {
    fn request(&self, key: &ApiKey) -> Request<Body> {
        let bytes = encode(&self.body, self.wire);
        let mut builder = Request::post("/records").header("x-api-key", key.expose_secret());
        for value in &self.content_types {
            builder = builder.header(CONTENT_TYPE, *value);
        }
        for value in &self.content_encodings {
            builder = builder.header(CONTENT_ENCODING, *value);
        }
        if let Some(value) = self.transfer_encoding {
            builder = builder.header(TRANSFER_ENCODING, value);
        }
        let body = if self.streamed {
            let (head, tail) = bytes.split_at(bytes.len() / 2);
            let chunks = [Bytes::copy_from_slice(head), Bytes::copy_from_slice(tail)];
            Body::from_stream(stream::iter(chunks.map(Ok::<_, Infallible>)))
        } else {
            builder = builder.header(CONTENT_LENGTH, bytes.len());
            Body::from(bytes)
        };
        builder.body(body).unwrap()
    }
}

/// Cases of `forged_stamps_are_never_stored`; the test prints how long they took.
const FRAMING_CASES: u32 = 2048;

#[test]
fn forged_stamps_are_never_stored() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = runtime.block_on(fixture());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: FRAMING_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (refused, stored_some) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let started = std::time::Instant::now();
    runner
        .run(&arb_framing(), |framing| {
            let stored = Stored::default();
            let app = Router::new()
                .route("/records", post(credulous))
                .route_layer(ProvenanceLayer::new())
                .with_state(stored.clone())
                .layer(fx.auth_layer());
            let response = runtime
                .block_on(app.oneshot(framing.request(&fx.key)))
                .unwrap();
            let status = response.status();
            let stored = stored.0.lock().unwrap();
            if !status.is_success() {
                prop_assert!(
                    stored.is_empty(),
                    "refused ({status}) but stored {stored:?}"
                );
                refused.set(refused.get() + 1);
                if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                    let error = response
                        .extensions()
                        .get::<AuthError>()
                        .map(AuthError::code);
                    prop_assert_eq!(error, Some(ErrorCode::UnsupportedMediaType));
                }
            }
            for record in stored.iter() {
                stamp_is(record, fx.id()).map_err(TestCaseError::fail)?;
            }
            stored_some.set(stored_some.get() + u32::from(!stored.is_empty()));
            Ok(())
        })
        .unwrap();
    let (refused, stored_some) = (refused.get(), stored_some.get());
    eprintln!(
        "{FRAMING_CASES} framings in {:?}: {refused} refused, {stored_some} stored a record",
        started.elapsed()
    );
    // Both outcomes are exercised, so the property is not vacuous.
    assert!(refused > FRAMING_CASES / 4, "{refused} refused");
    // About 5% of framings are stampable, unambiguous JSON (most forgeries are refused); a
    // thirty-second leaves room for proptest's randomness.
    assert!(stored_some > FRAMING_CASES / 32, "{stored_some} stored");
}

// ---------------------------------------------------------------------------------------------
// With tower-http's RequestDecompressionLayer.
// ---------------------------------------------------------------------------------------------

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A scoped key's gzip request to `/records`.
fn gzip_request(fx: &Fixture, encodings: &[&str], body: Vec<u8>) -> Request<Body> {
    let mut builder = Request::post("/records")
        .header("x-api-key", fx.key.expose_secret())
        .header(CONTENT_TYPE, JSON)
        .header(CONTENT_LENGTH, body.len());
    for encoding in encodings {
        builder = builder.header(CONTENT_ENCODING, *encoding);
    }
    builder.body(Body::from(body)).unwrap()
}

/// Decompression outside `ProvenanceLayer` decodes first and removes `Content-Encoding` (and the stale
/// `Content-Length`): the layer then sees plain JSON and stamps it.
#[tokio::test]
async fn decompression_outside_the_layer_is_stamped() {
    let fx = fixture().await;
    let app = || {
        Router::new()
            .route("/records", post(echo))
            .route_layer(ProvenanceLayer::new())
            .route_layer(RequestDecompressionLayer::new())
            .layer(fx.auth_layer())
    };
    let forged = br#"{"amount":1,"meta_data":{"BLNK_GENERATED_BY":"forged"}}"#;
    let answer = send(app(), gzip_request(&fx, &["gzip"], gzip(forged))).await;
    let expected = format!(
        r#"{{"amount":1,"meta_data":{{"BLNK_GENERATED_BY":"{}"}}}}"#,
        fx.id()
    );
    answer.assert_body(expected.as_bytes());

    // tower-http reads only the first Content-Encoding and removes them all: a body encoded twice
    // reaches the layer still encoded once, so it is not JSON and is refused.
    let twice = gzip(&gzip(forged));
    let answer = send(app(), gzip_request(&fx, &["gzip", "gzip"], twice)).await;
    answer.assert_unstampable();

    // An encoding tower-http does not decode: it answers 415 itself (its own body), unless told to
    // pass it through, and then this layer refuses it.
    let answer = send(app(), gzip_request(&fx, &["br"], forged.to_vec())).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(!answer.handled && answer.error.is_none());
    let passing = Router::new()
        .route("/records", post(echo))
        .route_layer(ProvenanceLayer::new())
        .route_layer(RequestDecompressionLayer::new().pass_through_unaccepted(true))
        .layer(fx.auth_layer());
    let answer = send(passing, gzip_request(&fx, &["br"], forged.to_vec())).await;
    answer.assert_unstampable();
}

/// Decompression inside `ProvenanceLayer` (or in the handler) comes too late: the layer sees an encoded
/// body, which it cannot stamp, and refuses it.
#[tokio::test]
async fn decompression_inside_the_layer_is_refused() {
    let fx = fixture().await;
    let app = Router::new()
        .route("/records", post(echo))
        .route_layer(RequestDecompressionLayer::new())
        .route_layer(ProvenanceLayer::new())
        .layer(fx.auth_layer());
    let forged = br#"{"meta_data":{"BLNK_GENERATED_BY":"forged"}}"#;
    let answer = send(app, gzip_request(&fx, &["gzip"], gzip(forged))).await;
    answer.assert_unstampable();
}
