use std::borrow::Cow;
use std::fmt;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

use crate::error::{AuthError, InvalidKeyReason};

/// Longest header value (or query value) looked at; longer ones are refused as malformed.
pub(crate) const MAX_CANDIDATE_LEN: usize = 1024;

/// Where [`ApiKeyLayer`](crate::layer::ApiKeyLayer) looks for a key.
///
/// Several may be configured. A key found in several places is one key; two *different* keys in one
/// request are refused (401 `AUTH_INVALID_API_KEY`, `details.reason = "ambiguous"`).
///
/// | constructor | reads |
/// |---|---|
/// | [`KeySource::header`]`("x-api-key")` (the default) | `X-Api-Key: <key>` |
/// | [`KeySource::blnk`] | `X-Blnk-Key: <key>` |
/// | [`KeySource::blecon`] | `Authorization: APIKEY::<key>` |
/// | [`KeySource::bearer`] | `Authorization: Bearer <key>` |
/// | [`KeySource::query`]`("api_key")` (off unless configured) | `?api_key=<key>` |
///
/// Header names and authorization schemes match case-insensitively.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySource(Kind);

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Header(HeaderName),
    /// `Authorization: <prefix><key>`; `prefix` is lowercase and matched case-insensitively.
    Authorization {
        prefix: &'static str,
        spaces: bool,
    },
    Query(Cow<'static, str>),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Header(name) => write!(f, "KeySource::header({:?})", name.as_str()),
            Kind::Authorization {
                prefix: "bearer", ..
            } => f.write_str("KeySource::bearer()"),
            Kind::Authorization { .. } => f.write_str("KeySource::blecon()"),
            Kind::Query(name) => write!(f, "KeySource::query({name:?})"),
        }
    }
}

impl KeySource {
    /// A named header, e.g. `x-api-key`.
    pub fn header(name: HeaderName) -> Self {
        Self(Kind::Header(name))
    }

    /// `X-Api-Key: <key>`, the default.
    pub fn x_api_key() -> Self {
        Self::header(HeaderName::from_static("x-api-key"))
    }

    /// `X-Blnk-Key: <key>`, as Blnk clients send it.
    pub fn blnk() -> Self {
        Self::header(HeaderName::from_static("x-blnk-key"))
    }

    /// `Authorization: APIKEY::<key>`, as Blecon clients send it.
    pub fn blecon() -> Self {
        Self(Kind::Authorization {
            prefix: "apikey::",
            spaces: false,
        })
    }

    /// `Authorization: Bearer <key>`.
    pub fn bearer() -> Self {
        Self(Kind::Authorization {
            prefix: "bearer",
            spaces: true,
        })
    }

    /// A query-string parameter.
    ///
    /// Keys in URLs end up in logs and browser history: use only when a client cannot send headers.
    pub fn query(name: impl Into<Cow<'static, str>>) -> Self {
        Self(Kind::Query(name.into()))
    }

    fn header_name(&self) -> Option<&HeaderName> {
        match &self.0 {
            Kind::Header(name) => Some(name),
            Kind::Authorization { .. } => Some(&AUTHORIZATION),
            Kind::Query(_) => None,
        }
    }

    /// The key this source finds in one header value, if the value is meant for it.
    fn key_in<'a>(&self, value: &'a [u8]) -> Result<Option<&'a [u8]>, AuthError> {
        match &self.0 {
            Kind::Header(_) | Kind::Query(_) => Ok(Some(value)),
            Kind::Authorization { prefix, spaces } => {
                let n = prefix.len();
                if value.len() < n || !value[..n].eq_ignore_ascii_case(prefix.as_bytes()) {
                    return Ok(None);
                }
                let rest = &value[n..];
                if !spaces {
                    return Ok(Some(rest));
                }
                let trimmed = trim_start(rest);
                if trimmed.len() == rest.len() {
                    // `Bearerxyz` is not the bearer scheme.
                    return Ok(None);
                }
                Ok(Some(trimmed))
            }
        }
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    &b[start..]
}

fn trim(b: &[u8]) -> &[u8] {
    let b = trim_start(b);
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |i| i + 1);
    &b[..end]
}

/// Presented keys up to this length are copied to the stack; longer ones (a long master key) to
/// the heap.
const INLINE_KEY: usize = 96;

/// The presented key, copied out of the header map (which is marked sensitive in the same pass).
enum Found {
    None,
    Inline { bytes: [u8; INLINE_KEY], len: u8 },
    Heap(Box<[u8]>),
}

impl Found {
    fn of(candidate: &[u8]) -> Self {
        match u8::try_from(candidate.len()) {
            Ok(len) if candidate.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..candidate.len()].copy_from_slice(candidate);
                Self::Inline { bytes, len }
            }
            _ => Self::Heap(candidate.into()),
        }
    }

    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::None => None,
            Self::Inline { bytes, len } => Some(&bytes[..usize::from(*len)]),
            Self::Heap(bytes) => Some(bytes),
        }
    }
}

/// What [`extract`] found: the presented key, if any.
pub(crate) struct Presented(Found);

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        let found = if self.0.bytes().is_some() {
            "a key"
        } else {
            "no key"
        };
        f.debug_tuple("Presented").field(&found).finish()
    }
}

impl Presented {
    /// The presented key (`None`: no key at all): visible ASCII, every byte checked, so it is
    /// handed on as bytes (making a `str` of it would check it again).
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.0.bytes()
    }
}

/// Whether `name` is the header of some source (`bearer` and `blecon` share `Authorization`).
fn reads(sources: &[KeySource], name: &HeaderName) -> bool {
    sources.iter().any(|s| s.header_name() == Some(name))
}

/// Marks the values of every header source as sensitive, so that `Debug` and logging layers inside
/// ours never print them (for requests let through without reading a key: CORS preflights).
pub(crate) fn hide_all(sources: &[KeySource], headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if reads(sources, name) {
            value.set_sensitive(true);
        }
    }
}

/// Finds the presented key (none: no key at all) and marks the values of the key headers
/// sensitive, so that `Debug` and logging layers inside ours never print them, in **one pass over
/// the request's headers**: each value of a key header is read, checked and hidden together, with
/// no lookup by name (no hashing, no name cloned; a request carries a handful of headers, and a
/// name that is not a source's is told apart by its kind or length). The key is copied out, so
/// that the map can be changed meanwhile.
///
/// A value that is not visible ASCII or is too long is refused as malformed; two different keys in
/// one request are refused as ambiguous. Either way every key header is hidden all the same.
pub(crate) fn extract<B>(
    sources: &[KeySource],
    request: &mut http::Request<B>,
) -> Result<Presented, AuthError> {
    let mut found = Found::None;
    let mut consider = |candidate: &[u8]| -> Result<(), AuthError> {
        let candidate = trim(candidate);
        if candidate.is_empty() {
            return Ok(());
        }
        // A branch-free fold vectorises; an early-exit `all` walks byte by byte.
        if candidate.len() > MAX_CANDIDATE_LEN
            || !candidate
                .iter()
                .fold(true, |ok, b| ok & b.is_ascii_graphic())
        {
            return Err(AuthError::InvalidKey(InvalidKeyReason::Malformed));
        }
        match found.bytes() {
            Some(previous) if previous != candidate => {
                Err(AuthError::InvalidKey(InvalidKeyReason::Ambiguous))
            }
            Some(_) => Ok(()),
            None => {
                found = Found::of(candidate);
                Ok(())
            }
        }
    };
    let mut refused = None;
    for (name, value) in request.headers_mut().iter_mut() {
        let mut hidden = false;
        for source in sources {
            if source.header_name() != Some(name) {
                continue;
            }
            if !hidden {
                value.set_sensitive(true);
                hidden = true;
            }
            if refused.is_none()
                && let Err(error) = source
                    .key_in(value.as_bytes())
                    .and_then(|candidate| candidate.map_or(Ok(()), &mut consider))
            {
                refused = Some(error);
            }
        }
    }
    if let Some(error) = refused {
        return Err(error);
    }
    for source in sources {
        if let Kind::Query(name) = &source.0
            && let Some(query) = request.uri().query()
        {
            for pair in query.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k == name {
                    consider(v.as_bytes())?;
                }
            }
        }
    }
    Ok(Presented(found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn all() -> Vec<KeySource> {
        vec![
            KeySource::x_api_key(),
            KeySource::blnk(),
            KeySource::blecon(),
            KeySource::bearer(),
        ]
    }

    /// A request with these headers and this URI.
    fn request(map: &HeaderMap, uri: &str) -> http::Request<()> {
        let mut request = http::Request::get(uri).body(()).unwrap();
        *request.headers_mut() = map.clone();
        request
    }

    /// The key `sources` find in `map` (and `map` as the request holds it afterwards).
    fn find(
        sources: &[KeySource],
        map: &HeaderMap,
        uri: &str,
    ) -> (Result<Option<String>, AuthError>, HeaderMap) {
        let mut request = request(map, uri);
        let key = extract(sources, &mut request).map(|p| {
            p.key()
                .map(|k| String::from_utf8(k.to_vec()).expect("visible ASCII"))
        });
        (key, request.headers().clone())
    }

    fn run(pairs: &[(&str, &[u8])]) -> Result<Option<String>, AuthError> {
        find(&all(), &headers(pairs), "/").0
    }

    #[test]
    fn each_source_is_read() {
        assert_eq!(run(&[("x-api-key", b"k1")]).unwrap().as_deref(), Some("k1"));
        assert_eq!(
            run(&[("X-Blnk-Key", b"k1")]).unwrap().as_deref(),
            Some("k1")
        );
        assert_eq!(
            run(&[("authorization", b"APIKEY::k1")]).unwrap().as_deref(),
            Some("k1")
        );
        assert_eq!(
            run(&[("authorization", b"apikey::k1")]).unwrap().as_deref(),
            Some("k1")
        );
        assert_eq!(
            run(&[("authorization", b"Bearer   k1")])
                .unwrap()
                .as_deref(),
            Some("k1")
        );
        assert_eq!(
            run(&[("authorization", b"bearer k1 ")]).unwrap().as_deref(),
            Some("k1")
        );
    }

    #[test]
    fn foreign_schemes_and_empty_values_are_not_keys() {
        assert_eq!(
            run(&[("authorization", b"Basic dXNlcjpwYXNz")]).unwrap(),
            None
        );
        assert_eq!(run(&[("authorization", b"Bearerk1")]).unwrap(), None);
        assert_eq!(run(&[("x-api-key", b"")]).unwrap(), None);
        assert_eq!(run(&[("x-api-key", b"   ")]).unwrap(), None);
        assert_eq!(run(&[]).unwrap(), None);
    }

    #[test]
    fn same_key_twice_is_fine_two_keys_are_not() {
        assert_eq!(
            run(&[("x-api-key", b"k1"), ("authorization", b"Bearer k1")])
                .unwrap()
                .as_deref(),
            Some("k1")
        );
        for pairs in [
            &[("x-api-key", &b"k1"[..]), ("authorization", b"Bearer k2")][..],
            &[("x-api-key", b"k1"), ("x-api-key", b"k2")],
        ] {
            assert!(matches!(
                run(pairs),
                Err(AuthError::InvalidKey(InvalidKeyReason::Ambiguous))
            ));
        }
    }

    #[test]
    fn bad_bytes_and_huge_values_are_malformed() {
        for value in [&b"k\xff1"[..], b"k 1", &vec![b'a'; MAX_CANDIDATE_LEN + 1]] {
            assert!(matches!(
                run(&[("x-api-key", value)]),
                Err(AuthError::InvalidKey(InvalidKeyReason::Malformed))
            ));
        }
    }

    #[test]
    fn sources_sharing_a_header_read_it_once() {
        let map = headers(&[
            ("authorization", b"APIKEY::k1"),
            ("authorization", b"Bearer k1"),
        ]);
        let sources = [
            KeySource::bearer(),
            KeySource::x_api_key(),
            KeySource::blecon(),
        ];
        let (key, after) = find(&sources, &map, "/");
        assert_eq!(key.unwrap().as_deref(), Some("k1"));
        assert!(
            after
                .get_all("authorization")
                .iter()
                .all(|v| v.is_sensitive())
        );
        let map = headers(&[
            ("authorization", b"APIKEY::k1"),
            ("authorization", b"Bearer k2"),
        ]);
        assert!(matches!(
            find(&sources, &map, "/").0,
            Err(AuthError::InvalidKey(InvalidKeyReason::Ambiguous))
        ));
        let map = headers(&[("authorization", b"Bearer k1"), ("x-api-key", b"k1")]);
        let (_, after) = find(&sources, &map, "/");
        assert!(after["authorization"].is_sensitive());
        assert!(after["x-api-key"].is_sensitive());
    }

    #[test]
    fn query_only_when_configured() {
        let map = HeaderMap::new();
        assert_eq!(find(&all(), &map, "/x?a=1&api_key=k9").0.unwrap(), None);
        let sources = [KeySource::query("api_key")];
        assert_eq!(
            find(&sources, &map, "/x?a=1&api_key=k9")
                .0
                .unwrap()
                .as_deref(),
            Some("k9")
        );
    }

    #[test]
    fn key_headers_are_marked_sensitive() {
        let map = headers(&[
            ("x-api-key", b"k1"),
            ("authorization", b"Bearer k1"),
            ("other", b"v"),
        ]);
        let (_, after) = find(&all(), &map, "/");
        assert!(after["x-api-key"].is_sensitive());
        assert!(after["authorization"].is_sensitive());
        assert!(!after["other"].is_sensitive());
        // Only the headers of configured sources are flagged.
        let sources = [KeySource::blnk(), KeySource::x_api_key()];
        let (_, after) = find(&sources, &map, "/");
        assert!(after["x-api-key"].is_sensitive());
        assert!(!after["authorization"].is_sensitive());
        // A refused request's key headers are flagged too.
        let map = headers(&[("x-api-key", b"k1"), ("authorization", b"Bearer k2")]);
        let (key, after) = find(&all(), &map, "/");
        assert!(key.is_err());
        assert!(after["x-api-key"].is_sensitive());
        // Every key header, also those after the one that was refused.
        let map = headers(&[
            ("x-api-key", b"k 1"),
            ("other", b"v"),
            ("authorization", b"Bearer k2"),
            ("x-blnk-key", b"k3"),
        ]);
        let (key, after) = find(&all(), &map, "/");
        assert!(matches!(
            key,
            Err(AuthError::InvalidKey(InvalidKeyReason::Malformed))
        ));
        assert!(after["authorization"].is_sensitive());
        assert!(after["x-blnk-key"].is_sensitive());
        assert!(!after["other"].is_sensitive());
    }

    #[test]
    fn long_keys_are_copied_whole() {
        for len in [
            super::INLINE_KEY - 1,
            super::INLINE_KEY,
            super::INLINE_KEY + 1,
            MAX_CANDIDATE_LEN,
        ] {
            let key = "k".repeat(len);
            assert_eq!(
                run(&[("x-api-key", key.as_bytes())]).unwrap().as_deref(),
                Some(key.as_str())
            );
        }
    }

    proptest! {
        #[test]
        fn extraction_never_panics(
            values in prop::collection::vec((0usize..4, prop::collection::vec(any::<u8>(), 0..80)), 0..4)
        ) {
            let names = ["x-api-key", "x-blnk-key", "authorization", "other"];
            let mut map = HeaderMap::new();
            for (n, v) in &values {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    map.append(HeaderName::from_static(names[*n]), v);
                }
            }
            if let (Ok(Some(key)), _) = find(&all(), &map, "/") {
                prop_assert!(!key.is_empty());
                prop_assert!(key.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}
