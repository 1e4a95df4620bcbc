//! [`ApiKeyLayer`]: authenticate every request with an API key.
//!
//! ```
//! use std::sync::Arc;
//!
//! use axum::{body::Body, routing::get, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::key::ApiKey;
//! use tower_api_keys::layer::{ApiKeyLayer, KeySource};
//! use tower_api_keys::manage::{CreateKey, KeyManager};
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! async fn hello(principal: Principal) -> String {
//!     format!("hello, {}", principal.owner().unwrap_or("master"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let app = Router::new().route("/hello", get(hello)).layer(
//!     ApiKeyLayer::new(resolver.clone())
//!         .sources([KeySource::x_api_key(), KeySource::bearer()])
//!         .master_key(ApiKey::new("change-me-to-a-long-random-string"))
//!         // With axum: bodies stay axum's own `Body` (no rebox); see `axum_body`.
//!         .axum_body(),
//! );
//!
//! // A key as the management API would issue it.
//! let manager = KeyManager::new(resolver);
//! let created = manager
//!     .create(&Principal::master(), CreateKey::new(["ledgers:read"]).owner("billing"))
//!     .await?;
//! let bearer = format!("Bearer {}", created.key.expose_secret());
//!
//! let request = Request::get("/hello").header("authorization", bearer).body(Body::empty())?;
//! let response = app.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! // No key: 401 AUTH_MISSING_API_KEY, with a `WWW-Authenticate` challenge.
//! let response = app.oneshot(Request::get("/hello").body(Body::empty())?).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert!(response.headers().contains_key("www-authenticate"));
//! # Ok(())
//! # }
//! ```
//!
//! For each request the layer:
//! 1. reads the key from the configured [`KeySource`]s (marking those headers sensitive); a value
//!    over [`MAX_PRESENTED_KEY_LEN`] bytes or with bytes other than visible ASCII is malformed;
//! 2. compares it with the master key, if one is configured (in constant time);
//! 3. checks its prefix, length and checksum: a malformed key is refused with no I/O;
//! 4. resolves its SHA-256 digest through the [`CachedResolver`] (sync on a hit, one shared store
//!    lookup on a miss, 503 `AUTH_UNAVAILABLE` if the store fails or times out);
//! 5. checks revocation and expiry;
//! 6. for a key with `allowed_networks`, checks the client address (see [Networks](#networks));
//! 7. inserts the [`Principal`] into the request extensions and calls the inner service inside a
//!    `api_key` tracing span carrying the key id (never the key);
//! 8. watches what comes after the head: a request lives no longer than its key. The inner service
//!    gets the body in a [`LiveBody`] and the layer answers with one: a frame after the key ended
//!    (revoked, deleted, expired, past a rotation's grace, under a revoked ancestor) fails the
//!    request body (the answer is then 401 `AUTH_EXPIRED_API_KEY`, whatever the handler made of
//!    it) or ends a streaming response. One atomic load per frame; nothing for a request without a
//!    body beyond a clone of the principal's `Arc`. See [`LiveBody`] for what clients see and
//!    [`Principal::is_live`] / [`Principal::ended`] for handlers that run long. With axum, call
//!    [`axum_body`](ApiKeyLayer::axum_body): bodies then stay axum's own `Body`, and only a body
//!    with something to watch is wrapped ([`BodyMode`]).
//!
//! Refusals are rendered by a [`RenderRejection`] ([`JsonRejection`] by default,
//! [`GrpcRejection`](crate::error::GrpcRejection) for tonic) and carry the [`AuthError`] in their extensions.
//! If the surrounding span (e.g. tower-http's `TraceLayer`) declares an `api_key_id` field, the layer
//! records the key id there too.
//!
//! Put the layer outside the routes it protects (`Router::layer`) and the per-route guards inside
//! (`route_layer(RequireScopesLayer::all([...]))`).
//!
//! ## Networks
//!
//! A key created with `allowed_networks` (IPv4/IPv6 CIDR blocks, see [`Networks`]) is admitted
//! only from inside them; from anywhere else the request is refused with 403
//! `AUTH_NETWORK_NOT_ALLOWED` ([`AuthError::NetworkNotAllowed`]) by this layer, so no guard, rate
//! limiter or credit counter behind it runs and no budget is spent. Keys without networks pay one
//! branch.
//!
//! The client address is the peer address found in the request extensions
//! ([`peer_addr`](ApiKeyLayer::peer_addr): axum's `ConnectInfo<SocketAddr>` or a bare
//! `SocketAddr` by default), or, only for requests from proxies you name with
//! [`trusted_proxies`](ApiKeyLayer::trusted_proxies), the client that `X-Forwarded-For` names.
//! An IPv4-mapped IPv6 peer (`::ffff:192.0.2.1`, from a dual-stack socket) is judged as its IPv4
//! address. **No address known, no admission**: if the server does not put the peer address in
//! the extensions (axum's `serve(listener, router)` without `into_make_service_with_connect_info`,
//! a test calling the router directly), every request with a network-restricted key is refused.
//! A refused request was still made with a valid key: it counts as the key's use (`last_used_at`)
//! and in `api_key_requests_total` under its code: an operator sees a key used from elsewhere.
//!
//! ```
//! use std::net::SocketAddr;
//!
//! use axum::{Router, routing::get};
//! use tower_api_keys::layer::ApiKeyLayer;
//! # use tower_api_keys::{resolver::CachedResolver, store::MemoryStore};
//!
//! # async fn serve() -> std::io::Result<()> {
//! # let resolver = CachedResolver::new(MemoryStore::new());
//! let app = Router::new()
//!     .route("/", get(|| async { "hi" }))
//!     .layer(ApiKeyLayer::new(resolver));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // The peer address reaches the layer as `ConnectInfo<SocketAddr>`.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
//! # }
//! ```
//!
//! ## Timing
//!
//! Response times do not help an attacker find a key, because no step compares a secret with
//! something the attacker can steer byte by byte:
//! - **Format check** (prefix, length, alphabet, CRC32 checksum) runs on the presented value only.
//!   Its time depends on that value and on the public format, never on a stored key; the checksum
//!   is a public function of the key body, so learning that a guess fails it teaches nothing.
//! - **Lookup by digest.** The store and the cache are keyed by the SHA-256 digest of the key. A
//!   key has 256 bits of CSPRNG entropy, and an attacker cannot choose a key whose digest shares a
//!   prefix with a stored one (that is a preimage search), so index and hash-table timing depend
//!   on a digest nobody can aim, not on how much of a real key a guess got right. Where digests are
//!   compared in memory ([`KeyDigest`]'s `==`: the master key, a rotated key's previous secret) the
//!   comparison runs in constant time (`subtle::ConstantTimeEq`).
//! - **Master key**: only its digest is kept, and it is compared in constant time, so neither its
//!   content nor its length shows in response times.
//! - **Unknown keys** are cached negatively (5 s by default), so repeated guesses cost no store
//!   lookup; what timing could then reveal is whether a guess was already made, not anything about
//!   real keys.
//!
//! What response times *do* reveal is what the response already says: whether the presented key
//! itself is valid (a cached hit answers faster than a store lookup). Only its holder can ask.

mod body;
pub mod future;
mod mode;
mod network;
mod service;
mod source;
pub mod sunset;

use std::net::SocketAddr;
use std::sync::Arc;

#[cfg(feature = "manage")]
pub(crate) use body::Whole;
pub use body::{BoxError, LiveBody, WHOLE_BODY_LIMIT};
#[cfg(feature = "axum")]
pub use mode::AxumBody;
#[cfg(feature = "provenance")]
pub(crate) use mode::key_end;
pub use mode::{AnyBody, BodyMode};
#[cfg(feature = "manage")]
pub(crate) use network::ForwardedClient;
pub use service::ApiKeyService;
pub use source::KeySource;

/// Longest presented key value looked at: 1024 bytes (after trimming spaces; generated keys are
/// about 56).
///
/// A longer header (or query) value is refused as malformed, 401 `AUTH_INVALID_API_KEY` with
/// `details.reason = "malformed"`, before it is hashed and without a store lookup. The HTTP
/// server's own header limits apply before this one (hyper: about 400 KiB of headers).
pub const MAX_PRESENTED_KEY_LEN: usize = source::MAX_CANDIDATE_LEN;

use crate::error::JsonRejection;
#[cfg(doc)]
use crate::error::RenderRejection;
use crate::key::{ApiKey, KeyDigest};
use crate::network::Networks;
use crate::resolver::CachedResolver;
use crate::usage::UsageRecorder;

#[cfg(doc)]
use crate::{error::AuthError, principal::Principal};

/// Layer that authenticates requests by API key.
///
/// See the [module docs](self).
#[must_use]
pub struct ApiKeyLayer<R = JsonRejection, M = AnyBody> {
    config: Arc<Config>,
    rejection: R,
    mode: std::marker::PhantomData<fn() -> M>,
}

impl<R: Clone, M> Clone for ApiKeyLayer<R, M> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            rejection: self.rejection.clone(),
            mode: std::marker::PhantomData,
        }
    }
}

impl<R: std::fmt::Debug, M> std::fmt::Debug for ApiKeyLayer<R, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("config", &self.config)
            .field("rejection", &self.rejection)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) resolver: CachedResolver,
    pub(crate) sources: Vec<KeySource>,
    pub(crate) master: Option<KeyDigest>,
    pub(crate) optional: bool,
    pub(crate) preflight: bool,
    pub(crate) usage: Option<UsageRecorder>,
    pub(crate) sunset: Option<std::time::Duration>,
    pub(crate) client: network::ClientAddress,
}

impl ApiKeyLayer {
    /// A layer resolving keys through `resolver`, reading `X-Api-Key`, requiring a key on every request.
    pub fn new(resolver: CachedResolver) -> Self {
        Self {
            config: Arc::new(Config {
                resolver,
                sources: vec![KeySource::x_api_key()],
                master: None,
                optional: false,
                preflight: false,
                usage: None,
                sunset: Some(sunset::DEFAULT_SUNSET_WINDOW),
                client: network::ClientAddress::default(),
            }),
            rejection: JsonRejection::default(),
            mode: std::marker::PhantomData,
        }
    }
}

impl<R, M> ApiKeyLayer<R, M> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Where to look for the key, in order (replaces the default `X-Api-Key`).
    ///
    /// # Panics
    ///
    /// If `sources` is empty.
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        let sources: Vec<_> = sources.into_iter().collect();
        assert!(
            !sources.is_empty(),
            "ApiKeyLayer needs at least one key source"
        );
        self.config_mut().sources = sources;
        self
    }

    /// The master key from server configuration: full access (`*:*`), [`Principal::master`].
    ///
    /// Compared in constant time (by digest); only its digest is kept.
    ///
    /// # Panics
    ///
    /// If the key is shorter than 16 characters: a short master key is a configuration error.
    pub fn master_key(mut self, key: ApiKey) -> Self {
        assert!(
            key.expose_secret().len() >= 16,
            "the master key must be at least 16 characters long"
        );
        self.config_mut().master = Some(key.digest());
        self
    }

    /// Lets requests without a key through without a principal, for routes whose guards or handlers
    /// decide.
    ///
    /// A key that *is* presented must still be valid.
    pub fn optional(mut self) -> Self {
        self.config_mut().optional = true;
        self
    }

    /// Lets CORS preflight requests (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
    /// through unauthenticated, so a CORS layer inside can answer them.
    pub fn allow_preflight(mut self) -> Self {
        self.config_mut().preflight = true;
        self
    }

    /// Records each authenticated request's key use with `recorder` (batched `last_used_at`).
    pub fn usage(mut self, recorder: UsageRecorder) -> Self {
        self.config_mut().usage = Some(recorder);
        self
    }

    /// Responses to requests made with a key that expires within `window` carry a `Sunset` header
    /// (RFC 8594) with the key's expiry (default [`sunset::DEFAULT_SUNSET_WINDOW`], one day;
    /// `None`: never). See [`sunset`].
    pub fn sunset_window(mut self, window: Option<std::time::Duration>) -> Self {
        self.config_mut().sunset = window;
        self
    }

    /// Trusts `X-Forwarded-For` from these proxies when judging a key's `allowed_networks`.
    ///
    /// Without trusted proxies (the default) the client address is the peer's, and
    /// `X-Forwarded-For` is ignored. With them, a request whose peer lies in `proxies` is judged by
    /// the header: its entries (every `X-Forwarded-For` line, in order, as one list) are walked
    /// from the right, skipping addresses in `proxies`; the first one outside is the client. If
    /// every entry is a trusted proxy the leftmost one is the client (no header: the peer). An
    /// entry that is not an address (`unknown`, an obfuscated name) before the client is found
    /// leaves the client unknown, and a key with networks is refused. A request from a peer
    /// outside `proxies` is judged by the peer address, whatever it forwards.
    ///
    /// List exactly the proxies in front of the service that *append* to `X-Forwarded-For`
    /// (nginx `$proxy_add_x_forwarded_for`, HAProxy `option forwardfor`, cloud load balancers):
    /// an address to the left of the last trusted one is whatever the client wrote.
    ///
    /// RFC 7239 `Forwarded` is not read: most proxies write `X-Forwarded-For` only, and a header
    /// the proxy does not write is one the client controls entirely, so reading both would trust
    /// a forged `Forwarded` behind a proxy that appends only to `X-Forwarded-For`.
    ///
    /// ```
    /// use tower_api_keys::layer::ApiKeyLayer;
    /// use tower_api_keys::network::Networks;
    /// # use tower_api_keys::{resolver::CachedResolver, store::MemoryStore};
    /// # let resolver = CachedResolver::new(MemoryStore::new());
    /// let proxies: Networks = "10.0.0.0/8 fd00::/8".parse().unwrap();
    /// let layer = ApiKeyLayer::new(resolver).trusted_proxies(proxies);
    /// ```
    pub fn trusted_proxies(mut self, proxies: Networks) -> Self {
        self.config_mut().client.trusted_proxies = Some(proxies);
        self
    }

    /// How to find the peer address in a request's extensions, for keys with `allowed_networks`.
    ///
    /// The default reads axum's `ConnectInfo<SocketAddr>` (with feature `axum`; serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`), else a bare [`SocketAddr`] (what a
    /// hyper server inserts itself from `TcpListener::accept`). tonic puts a `TcpConnectInfo` there:
    ///
    /// ```
    /// use tonic::transport::server::TcpConnectInfo;
    /// use tower_api_keys::layer::ApiKeyLayer;
    /// # use tower_api_keys::{resolver::CachedResolver, store::MemoryStore};
    /// # let resolver = CachedResolver::new(MemoryStore::new());
    /// let layer = ApiKeyLayer::new(resolver)
    ///     .peer_addr(|extensions| extensions.get::<TcpConnectInfo>()?.remote_addr());
    /// ```
    ///
    /// A request whose peer address is not found is refused for a key with networks (403
    /// `AUTH_NETWORK_NOT_ALLOWED`): the layer fails closed. Keys without networks never ask.
    pub fn peer_addr(mut self, peer: fn(&http::Extensions) -> Option<SocketAddr>) -> Self {
        self.config_mut().client.peer = peer;
        self
    }

    /// Renders refusals with `rejection` instead of [`JsonRejection`].
    ///
    /// Any `Fn(&AuthError) -> Response<B>` works.
    pub fn rejection<R2>(self, rejection: R2) -> ApiKeyLayer<R2, M> {
        ApiKeyLayer {
            config: self.config,
            rejection,
            mode: std::marker::PhantomData,
        }
    }

    /// Hands bodies on as axum's own `Body` ([`AxumBody`]) rather than in a [`LiveBody`] around
    /// any body type: with axum, the layer then costs no allocation for the body of a request
    /// that has none, nor for a response that is already whole (axum boxes every other body
    /// type: two allocations per request). What is watched is the same. For `Router::layer`:
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_api_keys::layer::ApiKeyLayer;
    /// # use tower_api_keys::{resolver::CachedResolver, store::MemoryStore};
    /// # let resolver = CachedResolver::new(MemoryStore::new());
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hi" }))
    ///     .layer(ApiKeyLayer::new(resolver).axum_body());
    /// ```
    #[cfg(feature = "axum")]
    pub fn axum_body(self) -> ApiKeyLayer<R, AxumBody> {
        ApiKeyLayer {
            config: self.config,
            rejection: self.rejection,
            mode: std::marker::PhantomData,
        }
    }
}

impl<S, R: Clone, M> tower_layer::Layer<S> for ApiKeyLayer<R, M> {
    type Service = ApiKeyService<S, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.config.clone(), self.rejection.clone())
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + Clone>() {}
    is::<ApiKeyLayer>();
    is::<ApiKeyService<(), JsonRejection>>();
}
