use std::borrow::Cow;
use std::fmt;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, Uri};

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

/// Which configured sources held a value: bit `i` for `sources[i]`.
///
/// Sources past the 64th count as held whenever they are looked at, so they are always hidden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Held(u64);

impl Held {
    /// Every source, held or not.
    pub(crate) const ALL: Self = Self(u64::MAX);

    fn insert(&mut self, i: usize) {
        self.0 |= 1u64.checked_shl(i as u32).unwrap_or(0);
    }

    fn contains(self, i: usize) -> bool {
        i >= 64 || self.0 & (1 << i) != 0
    }
}

/// What [`extract`] found: the presented key, if any, and which sources held a value.
#[derive(Debug)]
pub(crate) struct Presented<'a> {
    pub(crate) key: Option<&'a str>,
    pub(crate) held: Held,
}

/// Marks the values of the header sources in `held` as sensitive, so that `Debug` and logging layers
/// inside ours never print them.
pub(crate) fn hide(sources: &[KeySource], held: Held, headers: &mut HeaderMap) {
    if held == Held::default() {
        return;
    }
    for (i, source) in sources.iter().enumerate() {
        if !held.contains(i) {
            continue;
        }
        if let Some(name) = source.header_name()
            && !read_before(sources, i, name)
            && let http::header::Entry::Occupied(mut entry) = headers.entry(name)
        {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// Whether a source before `sources[i]` reads the header `name` too (it was read, or hidden, then).
fn read_before(sources: &[KeySource], i: usize, name: &HeaderName) -> bool {
    sources[..i].iter().any(|s| s.header_name() == Some(name))
}

/// Finds the presented key (`key: None`: no key at all) and which sources held a value.
///
/// A value that is not visible ASCII or is too long is refused as malformed; two different keys in
/// one request are refused as ambiguous.
pub(crate) fn extract<'a>(
    sources: &[KeySource],
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Presented<'a>, AuthError> {
    let mut held = Held::default();
    let mut found: Option<&'a [u8]> = None;
    let mut consider = |candidate: &'a [u8]| -> Result<(), AuthError> {
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
        match found {
            Some(previous) if previous != candidate => {
                Err(AuthError::InvalidKey(InvalidKeyReason::Ambiguous))
            }
            _ => {
                found = Some(candidate);
                Ok(())
            }
        }
    };
    for (i, source) in sources.iter().enumerate() {
        match &source.0 {
            Kind::Query(name) => {
                if let Some(query) = uri.query() {
                    for pair in query.split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if k == name {
                            consider(v.as_bytes())?;
                        }
                    }
                }
            }
            _ => {
                let name = source.header_name().expect("header sources have a name");
                if read_before(sources, i, name) {
                    continue;
                }
                // One read of the header serves every source that reads it (`bearer` and
                // `blecon` both read `Authorization`).
                for value in headers.get_all(name) {
                    for (j, source) in sources.iter().enumerate().skip(i) {
                        if source.header_name() == Some(name) {
                            held.insert(j);
                            if let Some(candidate) = source.key_in(value.as_bytes())? {
                                consider(candidate)?;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Presented {
        // Every byte was checked to be visible ASCII.
        key: found.map(|b| std::str::from_utf8(b).expect("visible ASCII is UTF-8")),
        held,
    })
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

    fn run(pairs: &[(&str, &[u8])]) -> Result<Option<String>, AuthError> {
        let map = headers(pairs);
        let uri = Uri::from_static("/");
        extract(&all(), &map, &uri).map(|p| p.key.map(str::to_owned))
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
    fn sources_sharing_a_header_read_it_once_and_are_held_together() {
        let map = headers(&[
            ("authorization", b"APIKEY::k1"),
            ("authorization", b"Bearer k1"),
        ]);
        let uri = Uri::from_static("/");
        let sources = [
            KeySource::bearer(),
            KeySource::x_api_key(),
            KeySource::blecon(),
        ];
        let presented = extract(&sources, &map, &uri).unwrap();
        assert_eq!(presented.key, Some("k1"));
        assert_eq!(presented.held, Held(0b101));
        let map = headers(&[
            ("authorization", b"APIKEY::k1"),
            ("authorization", b"Bearer k2"),
        ]);
        assert!(matches!(
            extract(&sources, &map, &uri),
            Err(AuthError::InvalidKey(InvalidKeyReason::Ambiguous))
        ));
        let mut map = headers(&[("authorization", b"Bearer k1"), ("x-api-key", b"k1")]);
        let held = extract(&sources, &map, &uri).unwrap().held;
        hide(&sources, held, &mut map);
        assert!(
            map.get_all("authorization")
                .iter()
                .all(|v| v.is_sensitive())
        );
        assert!(map["x-api-key"].is_sensitive());
    }

    #[test]
    fn query_only_when_configured() {
        let uri: Uri = "/x?a=1&api_key=k9".parse().unwrap();
        let map = HeaderMap::new();
        assert_eq!(extract(&all(), &map, &uri).unwrap().key, None);
        let sources = [KeySource::query("api_key")];
        assert_eq!(extract(&sources, &map, &uri).unwrap().key, Some("k9"));
    }

    #[test]
    fn key_headers_are_marked_sensitive() {
        let mut map = headers(&[
            ("x-api-key", b"k1"),
            ("authorization", b"Bearer k1"),
            ("other", b"v"),
        ]);
        let uri: Uri = "/".parse().unwrap();
        let held = extract(&all(), &map, &uri).unwrap().held;
        hide(&all(), held, &mut map);
        assert!(map["x-api-key"].is_sensitive());
        assert!(map["authorization"].is_sensitive());
        assert!(!map["other"].is_sensitive());
        // Only sources that held a value are flagged.
        let sources = [KeySource::blnk(), KeySource::x_api_key()];
        let held = extract(&sources, &map, &uri).unwrap().held;
        assert_eq!(held, Held(0b10));
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
            let uri = Uri::from_static("/");
            if let Ok(Presented { key: Some(key), .. }) = extract(&all(), &map, &uri) {
                prop_assert!(!key.is_empty());
                prop_assert!(key.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}
