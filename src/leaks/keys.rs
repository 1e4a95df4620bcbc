//! Scanners' public keys: GitHub's published JSON shape, signature checks, and a key set that is
//! fetched from a URL and refreshed when a report names an identifier it does not hold.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;
use tokio::sync::Mutex;

/// Longest key identifier read from a header (GitHub's are 64 hex characters).
pub const MAX_KEY_IDENTIFIER_LEN: usize = 128;
/// Longest signature header read (a base64 DER P-256 signature is at most 96 characters).
pub const MAX_SIGNATURE_LEN: usize = 256;
/// Largest public-key document fetched from a URL.
pub const MAX_KEY_DOCUMENT_BYTES: usize = 64 * 1024;

/// Why a public-key document could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublicKeysError {
    /// The document is not GitHub's JSON shape.
    #[error("the public-key document is not of the expected JSON shape: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is not a PEM-encoded P-256 public key.
    #[error("public key {identifier:?} is not a PEM-encoded P-256 public key")]
    BadKey {
        /// The `key_identifier` of the key.
        identifier: String,
    },
    /// A key identifier is empty or longer than [`MAX_KEY_IDENTIFIER_LEN`].
    #[error("a key identifier is empty or longer than {MAX_KEY_IDENTIFIER_LEN} characters")]
    BadIdentifier,
    /// Fetching the document failed.
    #[error("fetching the public keys failed: {0}")]
    Fetch(String),
}

/// A scanner's public keys, by `key_identifier`, read from its published JSON document:
///
/// ```json
/// {"public_keys": [{"key_identifier": "90a4...", "key": "-----BEGIN PUBLIC KEY-----\n...", "is_current": true}]}
/// ```
///
/// Every listed key is accepted (`is_current` only tells which one the scanner signs with now).
#[derive(Clone, Default)]
pub struct PublicKeys {
    keys: HashMap<String, VerifyingKey>,
}

impl fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("PublicKeys")
            .field("identifiers", &ids)
            .finish()
    }
}

#[derive(Deserialize)]
struct Document {
    public_keys: Vec<DocumentKey>,
}

#[derive(Deserialize)]
struct DocumentKey {
    key_identifier: String,
    key: String,
    #[serde(default)]
    #[allow(dead_code)]
    is_current: bool,
}

impl PublicKeys {
    /// Parses a document in GitHub's JSON shape.
    pub fn from_json(json: &[u8]) -> Result<Self, PublicKeysError> {
        let document: Document = serde_json::from_slice(json)?;
        let mut keys = HashMap::with_capacity(document.public_keys.len());
        for key in document.public_keys {
            if key.key_identifier.is_empty() || key.key_identifier.len() > MAX_KEY_IDENTIFIER_LEN {
                return Err(PublicKeysError::BadIdentifier);
            }
            let verifying = VerifyingKey::from_public_key_pem(key.key.trim()).map_err(|_| {
                PublicKeysError::BadKey {
                    identifier: key.key_identifier.clone(),
                }
            })?;
            keys.insert(key.key_identifier, verifying);
        }
        Ok(Self { keys })
    }

    /// Adds one PEM-encoded P-256 public key under `identifier`.
    pub fn with_pem(mut self, identifier: &str, pem: &str) -> Result<Self, PublicKeysError> {
        if identifier.is_empty() || identifier.len() > MAX_KEY_IDENTIFIER_LEN {
            return Err(PublicKeysError::BadIdentifier);
        }
        let key =
            VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| PublicKeysError::BadKey {
                identifier: identifier.to_owned(),
            })?;
        self.keys.insert(identifier.to_owned(), key);
        Ok(self)
    }

    /// Whether a key with this identifier is held.
    pub fn contains(&self, identifier: &str) -> bool {
        self.keys.contains_key(identifier)
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `signature` (base64 of a DER ECDSA P-256 / SHA-256 signature) over `body` with the key
    /// `identifier`.
    pub fn verify(&self, identifier: &str, signature: &str, body: &[u8]) -> Result<(), Unverified> {
        let key = self
            .keys
            .get(identifier)
            .ok_or(Unverified::UnknownKeyIdentifier)?;
        if signature.len() > MAX_SIGNATURE_LEN {
            return Err(Unverified::MalformedSignature);
        }
        let der = STANDARD
            .decode(signature.trim())
            .map_err(|_| Unverified::MalformedSignature)?;
        let signature = Signature::from_der(&der).map_err(|_| Unverified::MalformedSignature)?;
        key.verify(body, &signature)
            .map_err(|_| Unverified::BadSignature)
    }
}

/// Why a report's signature was not accepted (the report then changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unverified {
    /// No key-identifier or signature header (of either scanner).
    #[error("the report carries no signature headers")]
    MissingSignature,
    /// Headers of both scanners, or a header that is not visible ASCII or is too long.
    #[error("the report's signature headers are malformed")]
    MalformedHeaders,
    /// The signature is not base64 of a DER ECDSA signature.
    #[error("the report's signature is malformed")]
    MalformedSignature,
    /// No public key with the report's identifier, even after a refresh.
    #[error("the report is signed with an unknown key")]
    UnknownKeyIdentifier,
    /// The signature does not match the body under the named key.
    #[error("the report's signature does not match its body")]
    BadSignature,
    /// The scanner's keys could not be fetched, and none is held for the identifier.
    #[error("the scanner's public keys are unavailable")]
    KeysUnavailable,
    /// The scanner that sent the report is not configured.
    #[error("reports from this scanner are not accepted")]
    ScannerNotConfigured,
}

impl Unverified {
    /// A short stable name, for `details.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingSignature => "missing_signature",
            Self::MalformedHeaders => "malformed_headers",
            Self::MalformedSignature => "malformed_signature",
            Self::UnknownKeyIdentifier => "unknown_key_identifier",
            Self::BadSignature => "bad_signature",
            Self::KeysUnavailable => "keys_unavailable",
            Self::ScannerNotConfigured => "scanner_not_configured",
        }
    }
}

/// Where a scanner's public keys come from.
#[derive(Clone)]
pub(crate) enum KeySet {
    /// Fixed, from configuration.
    Fixed(Arc<PublicKeys>),
    /// Fetched from a URL, cached, refreshed on an unknown identifier.
    Fetched(Arc<FetchedKeys>),
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(keys) => f.debug_tuple("Fixed").field(keys).finish(),
            Self::Fetched(fetched) => f.debug_tuple("Fetched").field(&fetched.url).finish(),
        }
    }
}

impl KeySet {
    /// Checks a signature, refreshing fetched keys once when the identifier is unknown.
    pub(crate) async fn verify(
        &self,
        identifier: &str,
        signature: &str,
        body: &[u8],
    ) -> Result<(), Unverified> {
        match self {
            Self::Fixed(keys) => keys.verify(identifier, signature, body),
            Self::Fetched(fetched) => fetched.verify(identifier, signature, body).await,
        }
    }
}

/// Public keys fetched from `url` (plain `http://`, or any scheme through a [`FetchKeys`]).
pub(crate) struct FetchedKeys {
    url: String,
    fetcher: Arc<dyn FetchKeys>,
    /// Shortest time between two fetches: a flood of reports naming made-up identifiers costs at
    /// most one fetch per interval.
    min_interval: Duration,
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    keys: Option<Arc<PublicKeys>>,
    fetched_at: Option<Instant>,
}

impl FetchedKeys {
    pub(crate) fn new(url: String, fetcher: Arc<dyn FetchKeys>, min_interval: Duration) -> Self {
        Self {
            url,
            fetcher,
            min_interval,
            state: Mutex::new(FetchState::default()),
        }
    }

    async fn verify(
        &self,
        identifier: &str,
        signature: &str,
        body: &[u8],
    ) -> Result<(), Unverified> {
        let mut state = self.state.lock().await;
        let known = state.keys.as_ref().is_some_and(|k| k.contains(identifier));
        let may_fetch = state
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.min_interval);
        if !known && may_fetch {
            state.fetched_at = Some(Instant::now());
            match self.fetcher.fetch(&self.url).await {
                Ok(json) => match PublicKeys::from_json(&json) {
                    Ok(keys) => state.keys = Some(Arc::new(keys)),
                    Err(error) => {
                        tracing::warn!(%error, url = %self.url, "the scanner's public keys are unusable")
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, url = %self.url, "fetching the scanner's public keys failed")
                }
            }
        }
        match &state.keys {
            Some(keys) => keys.verify(identifier, signature, body),
            None => Err(Unverified::KeysUnavailable),
        }
    }
}

/// Fetches a public-key document. The built-in fetcher speaks HTTP/1.1 over TLS for `https://`
/// URLs (GitHub's, with Mozilla's roots) and over plain TCP for `http://` (a mirror inside your
/// network, or tests); give the receiver your own (any `Fn(String) -> Future<Output =
/// Result<Bytes, String>>`) for a proxy or other roots.
#[async_trait::async_trait]
pub trait FetchKeys: Send + Sync + 'static {
    /// The document at `url` (at most [`MAX_KEY_DOCUMENT_BYTES`]).
    async fn fetch(&self, url: &str) -> Result<Bytes, PublicKeysError>;
}

#[async_trait::async_trait]
impl<F, Fut> FetchKeys for F
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Bytes, String>> + Send,
{
    async fn fetch(&self, url: &str) -> Result<Bytes, PublicKeysError> {
        let bytes = self(url.to_owned()).await.map_err(PublicKeysError::Fetch)?;
        if bytes.len() > MAX_KEY_DOCUMENT_BYTES {
            return Err(PublicKeysError::Fetch("the document is too large".into()));
        }
        Ok(bytes)
    }
}

/// The built-in fetcher: HTTP/1.1 `GET` over TLS (`https://`) or plain TCP (`http://`), 5 s for
/// the answer's head and 5 s for its body, body bounded.
pub(crate) struct HttpFetcher;

#[async_trait::async_trait]
impl FetchKeys for HttpFetcher {
    async fn fetch(&self, url: &str) -> Result<Bytes, PublicKeysError> {
        let fail = |what: String| PublicKeysError::Fetch(what);
        let uri: http::Uri = url.parse().map_err(|_| fail("not a URL".into()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(fail("not an http:// or https:// URL".into())),
        };
        let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let request = http::Request::get(
            uri.path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str),
        )
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "tower-api-keys-leaks")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
        let answer = async {
            // `[::1]` is written with brackets in a URL, without them in a socket address.
            let name = host.trim_start_matches('[').trim_end_matches(']');
            let addr = tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| format!("resolve: {}", e.kind()))?
                .next()
                .ok_or_else(|| "resolve: no address".to_owned())?;
            if https {
                let tls = crate::https::connect(name, addr).await?;
                crate::https::send(tls, request).await
            } else {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {}", e.kind()))?;
                crate::https::send(tcp, request).await
            }
        };
        let response = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(fail)?;
        if !response.status().is_success() {
            return Err(fail(format!("status {}", response.status())));
        }
        let body = Limited::new(response.into_body(), MAX_KEY_DOCUMENT_BYTES);
        let collected = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        Ok(collected.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local server that answers every connection with a plain-HTTP key document.
    async fn plain_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = stream.read(&mut buf).await;
                    let body = r#"{"public_keys":[]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_built_in_fetcher_speaks_http() {
        let addr = plain_server().await;
        let body = HttpFetcher
            .fetch(&format!("http://{addr}/meta/public_keys"))
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"public_keys":[]}"#);
    }

    /// An `https://` URL goes through TLS: a server speaking plain HTTP fails the handshake, and
    /// nothing it sent is taken for a document.
    #[tokio::test]
    async fn an_https_url_is_fetched_over_tls() {
        let addr = plain_server().await;
        let error = HttpFetcher
            .fetch(&format!("https://{addr}/meta/public_keys"))
            .await
            .unwrap_err();
        let PublicKeysError::Fetch(why) = error else {
            panic!("{error:?}")
        };
        assert!(why.starts_with("tls:"), "{why}");
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        let error = HttpFetcher
            .fetch("ftp://example.com/keys")
            .await
            .unwrap_err();
        assert!(matches!(error, PublicKeysError::Fetch(_)), "{error:?}");
    }
}
