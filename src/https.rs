//! The crate's HTTP client connections (leak reports' public keys, webhook deliveries): TLS with
//! rustls, ring and Mozilla's roots (webpki-roots), to an address the caller has already chosen (a
//! webhook's checked address; no second DNS look-up between the check and the connection), and one
//! HTTP/1.1 request over a connection.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};

/// The TLS client configuration, built once.
fn client_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            // ring rather than aws-lc-rs: no C toolchain beyond `cc`. rustls 0.23.48 deprecates
            // it for lacking post-quantum key exchange (fine here; revisit with aws-lc).
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| format!("tls: {e}"))
        })
        .clone()
}

/// A TLS connection to `host` (the name its certificate must carry) at `addr`.
pub(crate) async fn connect(host: &str, addr: SocketAddr) -> Result<TlsStream<TcpStream>, String> {
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| "bad TLS server name".to_owned())?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    TlsConnector::from(client_config()?)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))
}

/// Sends `request` over `io` (HTTP/1.1, one request) and returns the answer's head and streaming
/// body; the connection is driven in its own task until it ends.
pub(crate) async fn send<IO, B>(
    io: IO,
    request: http::Request<B>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "client connection ended");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("http: {e}"))
}
