//! Raw header maps through `ApiKeyLayer` over a memory store, with every key source.
//!
//! An independent model of key extraction (first source wins, values trimmed, visible ASCII up to
//! `MAX_PRESENTED_KEY_LEN` bytes, two different keys refused) predicts each request's outcome, and
//! the layer must agree: the same admitted principal or the same DESIGN code, status and reason; a
//! 401 carries `WWW-Authenticate`, the error body has the documented shape and never echoes the
//! key; headers that may carry a key reach the inner service marked sensitive; and the store is
//! asked exactly once for a key that passes the format check and never for anything else.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{ACCESS_CONTROL_REQUEST_METHOD, AUTHORIZATION, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use time::OffsetDateTime;
use tower::{Layer as _, ServiceExt as _};
use tower_api_keys::error::{AuthError, ErrorCode};
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, KeySource};
use tower_api_keys::layer::{LiveBody, MAX_PRESENTED_KEY_LEN};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::KeyLimits;
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore};

use super::input::Input;
use super::key_parser::sign;

const PREFIX: &str = "sk_live";
const MASTER: &str = "master-key-for-fuzzing-0123456789";

/// The keys the store knows, by fixed secret so a corpus can hold them.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    store: Arc<MemoryStore>,
    active: String,
    revoked: String,
    expired: String,
    unknown: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let key = |body: &str| sign(&format!("{PREFIX}_{body:Q<43}"));
        let fixture = Fixture {
            runtime,
            store: Arc::new(MemoryStore::new()),
            active: key("Active"),
            revoked: key("Revoked"),
            expired: key("Expired"),
            unknown: key("Unknown"),
        };
        let now = OffsetDateTime::now_utc();
        for (id, secret) in [
            ("key_active", &fixture.active),
            ("key_revoked", &fixture.revoked),
            ("key_expired", &fixture.expired),
        ] {
            let key = ApiKey::new(secret.as_str());
            let record = KeyRecord {
                id: KeyId::new(id),
                name: id.into(),
                owner: "team".into(),
                account: "account".into(),
                scopes: "ledgers:read".parse().unwrap(),
                digest: key.digest(),
                digest_scheme: Default::default(),
                masked_key: format().mask(&key).unwrap(),
                created_at: now - time::Duration::days(2),
                expires_at: (id == "key_expired").then(|| now - time::Duration::days(1)),
                revoked_at: (id == "key_revoked").then_some(now),
                last_used_at: None,
                created_by: None,
                rotated_at: None,
                previous: None,
                limits: Default::default(),
                allowed_networks: None,
            };
            let insert = fixture.store.insert(&record, KeyLimits::default(), now);
            fixture.runtime.block_on(insert).unwrap();
        }
        fixture
    })
}

fn format() -> KeyFormat {
    KeyFormat::new(PREFIX).unwrap()
}

/// The sources, as the model sees them.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Header(&'static str),
    Blecon,
    Bearer,
    Query,
}

impl Source {
    fn build(self) -> KeySource {
        match self {
            Self::Header(name) => KeySource::header(HeaderName::from_static(name)),
            Self::Blecon => KeySource::blecon(),
            Self::Bearer => KeySource::bearer(),
            Self::Query => KeySource::query("api_key"),
        }
    }

    fn header(self) -> Option<HeaderName> {
        match self {
            Self::Header(name) => Some(HeaderName::from_static(name)),
            Self::Blecon | Self::Bearer => Some(AUTHORIZATION),
            Self::Query => None,
        }
    }
}

/// What the model expects.
#[derive(Debug, PartialEq)]
enum Outcome {
    Anonymous,
    Admitted(KeyId),
    Refused(ErrorCode, Option<&'static str>),
}

/// Input: a configuration byte (sources, master key, optional mode, preflight pass-through, method,
/// whether the URI has a query), the query value if any, then header entries until the input ends:
/// a name (known or arbitrary bytes) and a value (a scheme, a payload — a known key, a mutated key,
/// raw bytes or a huge run — and a suffix).
pub fn check(data: &[u8]) {
    let fixture = fixture();
    let mut input = Input::new(data);
    let config = input.byte();
    let all = [
        Source::Header("x-api-key"),
        Source::Header("x-blnk-key"),
        Source::Blecon,
        Source::Bearer,
        Source::Query,
    ];
    let sources: Vec<Source> = match config & 7 {
        n @ 0..=4 => vec![all[usize::from(n)]],
        5 => all.to_vec(),
        6 => vec![Source::Bearer, Source::Header("x-api-key")],
        _ => vec![Source::Blecon, Source::Bearer],
    };
    let (master, optional, preflight) = (config & 8 != 0, config & 16 != 0, config & 32 != 0);
    let method = if config & 64 != 0 {
        Method::OPTIONS
    } else {
        Method::GET
    };
    let uri = if config & 128 != 0 {
        let value = payload(&mut input, fixture);
        let mut uri = b"/ledgers?a=1&api_key=".to_vec();
        uri.extend_from_slice(&value);
        Uri::try_from(uri).unwrap_or_else(|_| Uri::from_static("/ledgers"))
    } else {
        Uri::from_static("/ledgers")
    };
    let mut headers = HeaderMap::new();
    while !input.is_empty() {
        let name = match input.below(8) {
            0 => Ok(HeaderName::from_static("x-api-key")),
            1 => HeaderName::from_bytes(b"X-Blnk-Key"),
            2 => Ok(AUTHORIZATION),
            3 => Ok(HeaderName::from_static("x-other")),
            4 => Ok(ORIGIN),
            5 => Ok(ACCESS_CONTROL_REQUEST_METHOD),
            _ => HeaderName::from_bytes(input.chunk()),
        };
        let scheme = [
            "",
            "Bearer ",
            "bearer\t ",
            "APIKEY::",
            "apikey::",
            "Basic ",
            "Bearer",
            " ",
        ][input.below(8)];
        let mut value = scheme.as_bytes().to_vec();
        value.extend(payload(&mut input, fixture));
        value.extend_from_slice([&b""[..], b" ", b"\t", b"x"][input.below(4)]);
        if let (Ok(name), Ok(value)) = (name, HeaderValue::from_bytes(&value)) {
            headers.append(name, value);
        }
    }

    let is_preflight = preflight
        && method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    let expected = expect(
        fixture,
        &sources,
        &headers,
        &uri,
        master,
        optional,
        is_preflight,
    );
    let resolver = CachedResolver::builder(fixture.store.clone())
        .format(format())
        .build();
    let mut layer = ApiKeyLayer::new(resolver.clone()).sources(sources.iter().map(|s| s.build()));
    if master {
        layer = layer.master_key(ApiKey::new(MASTER));
    }
    if optional {
        layer = layer.optional();
    }
    if preflight {
        layer = layer.allow_preflight();
    }
    let key_headers: Vec<HeaderName> = sources.iter().filter_map(|s| s.header()).collect();
    let inner = tower::service_fn(move |request: Request<LiveBody<String>>| {
        let sensitive = key_headers.iter().all(|name| {
            request
                .headers()
                .get_all(name)
                .iter()
                .all(|v| v.is_sensitive())
        });
        let principal = Principal::from_extensions(request.extensions())
            .cloned()
            .map_err(|e| e.code());
        let mut response = Response::new(Full::new(Bytes::new()));
        response.extensions_mut().insert(Seen {
            sensitive,
            principal,
        });
        async move { Ok::<_, Infallible>(response) }
    });
    let mut request = Request::new(String::new());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers.clone();
    let response = fixture
        .runtime
        .block_on(layer.layer(inner).oneshot(request))
        .unwrap();

    let outcome = observe(response);
    assert_eq!(outcome, expected.0, "{headers:?}");
    assert_eq!(resolver.store_lookups(), expected.1, "store lookups");
}

#[derive(Clone)]
struct Seen {
    sensitive: bool,
    principal: Result<Principal, ErrorCode>,
}

/// A header value's payload.
fn payload(input: &mut Input<'_>, fixture: &Fixture) -> Vec<u8> {
    let known = |s: &str| s.as_bytes().to_vec();
    match input.below(9) {
        0 => known(&fixture.active),
        1 => known(&fixture.revoked),
        2 => known(&fixture.expired),
        3 => known(&fixture.unknown),
        4 => known(MASTER),
        5 => {
            // The active key with one byte changed.
            let mut key = known(&fixture.active);
            let at = input.below(key.len());
            key[at] = input.byte();
            key
        }
        6 => vec![b'a'; MAX_PRESENTED_KEY_LEN - 8 + input.below(16)],
        _ => input.chunk().to_vec(),
    }
}

/// The model's outcome and number of store lookups.
#[allow(clippy::too_many_arguments)]
fn expect(
    fixture: &Fixture,
    sources: &[Source],
    headers: &HeaderMap,
    uri: &Uri,
    master: bool,
    optional: bool,
    preflight: bool,
) -> (Outcome, u64) {
    use Outcome::*;
    let invalid = |reason| Refused(ErrorCode::InvalidApiKey, Some(reason));
    if preflight {
        return (Anonymous, 0);
    }
    let key = match extract(sources, headers, uri) {
        Err(reason) => return (invalid(reason), 0),
        Ok(None) if optional => return (Anonymous, 0),
        Ok(None) => return (Refused(ErrorCode::MissingApiKey, None), 0),
        Ok(Some(key)) => key,
    };
    if master && key == MASTER.as_bytes() {
        return (Admitted(KeyId::new("master")), 0);
    }
    let key = std::str::from_utf8(&key).unwrap();
    match format().check(key) {
        Err(tower_api_keys::key::KeyFormatError::BadChecksum) => (invalid("checksum"), 0),
        Err(_) => (invalid("malformed"), 0),
        Ok(()) if key == fixture.active => (Admitted(KeyId::new("key_active")), 1),
        Ok(()) if key == fixture.revoked => (Refused(ErrorCode::ExpiredApiKey, Some("revoked")), 1),
        Ok(()) if key == fixture.expired => (Refused(ErrorCode::ExpiredApiKey, Some("expired")), 1),
        Ok(()) => (invalid("unknown"), 1),
    }
}

/// Key extraction as DESIGN describes it, written independently of `src/layer/source.rs`.
fn extract(
    sources: &[Source],
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Option<Vec<u8>>, &'static str> {
    fn trim(b: &[u8]) -> &[u8] {
        let blank = |c: &u8| *c == b' ' || *c == b'\t';
        let start = b.iter().position(|c| !blank(c)).unwrap_or(b.len());
        let end = b.iter().rposition(|c| !blank(c)).map_or(start, |i| i + 1);
        &b[start..end]
    }
    let mut found: Option<Vec<u8>> = None;
    let mut candidates: Vec<&[u8]> = Vec::new();
    for source in sources {
        match source {
            Source::Header(name) => {
                candidates.extend(headers.get_all(*name).iter().map(|v| v.as_bytes()));
            }
            Source::Blecon | Source::Bearer => {
                for value in headers.get_all(AUTHORIZATION) {
                    let value = value.as_bytes();
                    let scheme: &[u8] = if *source == Source::Blecon {
                        b"apikey::"
                    } else {
                        b"bearer"
                    };
                    if value.len() < scheme.len()
                        || !value[..scheme.len()].eq_ignore_ascii_case(scheme)
                    {
                        continue;
                    }
                    let rest = &value[scheme.len()..];
                    if *source == Source::Bearer
                        && !rest.starts_with(b" ")
                        && !rest.starts_with(b"\t")
                    {
                        continue;
                    }
                    candidates.push(rest);
                }
            }
            Source::Query => {
                for pair in uri.query().unwrap_or("").split('&') {
                    if let Some(value) = pair.strip_prefix("api_key=") {
                        candidates.push(value.as_bytes());
                    } else if pair == "api_key" {
                        candidates.push(b"");
                    }
                }
            }
        }
        for candidate in candidates.drain(..) {
            let candidate = trim(candidate);
            if candidate.is_empty() {
                continue;
            }
            if candidate.len() > MAX_PRESENTED_KEY_LEN
                || !candidate.iter().all(u8::is_ascii_graphic)
            {
                return Err("malformed");
            }
            match &found {
                Some(previous) if previous != candidate => return Err("ambiguous"),
                _ => found = Some(candidate.to_vec()),
            }
        }
    }
    Ok(found)
}

/// The bytes of a body already whole in memory.
fn bytes_of(body: Full<Bytes>) -> Bytes {
    use http_body_util::BodyExt;
    use std::future::Future;
    let mut collect = std::pin::pin!(body.collect());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match collect.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(collected)) => collected.to_bytes(),
        _ => unreachable!("a full body is ready at once"),
    }
}

/// What the layer did, checking the shape of its answer on the way.
fn observe(response: Response<LiveBody<Full<Bytes>>>) -> Outcome {
    let response = response.map(|body| bytes_of(body.into_inner()));
    if let Some(seen) = response.extensions().get::<Seen>() {
        assert!(response.status().is_success());
        // CORS preflights included: a key sent on one is hidden too.
        assert!(seen.sensitive, "a key header reached the service unmarked");
        return match &seen.principal {
            Ok(principal) => Outcome::Admitted(principal.key_id().clone()),
            Err(ErrorCode::MissingApiKey) => Outcome::Anonymous,
            Err(code) => panic!("the inner service saw {code}"),
        };
    }
    let error = response
        .extensions()
        .get::<AuthError>()
        .expect("a refusal carries its AuthError");
    let code = error.code();
    assert_eq!(response.status(), code.http_status());
    if response.status() == http::StatusCode::UNAUTHORIZED {
        assert!(response.headers().contains_key(WWW_AUTHENTICATE));
    }
    let body: serde_json::Value = serde_json::from_slice(response.body()).expect("a JSON body");
    let detail = &body["error_detail"];
    assert_eq!(detail["code"], code.as_str());
    assert!(body["error"].is_string() && detail["message"] == body["error"]);
    // Messages are fixed text: no key, nor any part of one, is echoed.
    let text = std::str::from_utf8(response.body()).unwrap();
    assert!(!text.contains(PREFIX) && !text.contains(MASTER), "{text}");
    let reason = detail["details"]["reason"].as_str();
    let reason = [
        "malformed",
        "checksum",
        "ambiguous",
        "unknown",
        "revoked",
        "expired",
    ]
    .into_iter()
    .find(|r| Some(*r) == reason);
    assert_eq!(reason.is_some(), detail["details"]["reason"].is_string());
    Outcome::Refused(code, reason)
}
