//! The server's timeouts, in one place (the README's deployment notes list them): a slow client
//! cannot hold a request open for long, whatever its key; together with `ApiKeyLayer`'s watch of
//! bodies and streams (a request lives no longer than its key), a revoked key's requests end.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::timeout::{RequestBodyTimeout, RequestBodyTimeoutLayer, Timeout, TimeoutLayer};

/// How long each part of a request may take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// A request head that takes longer closes its connection.
    pub(crate) head: Duration,
    /// A request body that stalls this long between two frames fails (the handler answers 400,
    /// provenance-stamped routes 400 `APIKEY_INVALID`).
    pub(crate) body: Duration,
    /// A request without a response head by then is answered 408.
    pub(crate) request: Duration,
}

impl Timeouts {
    /// 10 s for a head, 10 s between two body frames, 30 s for a whole request.
    pub(crate) const DEFAULT: Self = Self {
        head: Duration::from_secs(10),
        body: Duration::from_secs(10),
        request: Duration::from_secs(30),
    };

    /// `router` with the body timeout and the request deadline, and `outer` (say, a `TraceLayer`)
    /// around them.
    ///
    /// They wrap the router once, as a whole: `Router::layer` would wrap every route in a box of
    /// its own, which axum clones on every request, once for each box around it too
    /// (`scripts/callgrind_server.sh`: 1,600 instructions a request more on `/ping`, 3,200 on
    /// `/auth/ping`, whose route is nested deeper). The result is a router again, for `serve` and
    /// the tests.
    pub(crate) fn apply<L>(&self, router: Router, outer: L) -> Router
    where
        L: Layer<Timeout<RequestBodyTimeout<Router>>>,
        L::Service: Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request>>::Response: IntoResponse,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        // Every handler made into its route now, not on each request.
        let router = router.with_state::<()>(());
        let timed = ServiceBuilder::new()
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                self.request,
            ))
            .layer(RequestBodyTimeoutLayer::new(self.body))
            .service(router);
        Router::new().fallback_service(outer.layer(timed))
    }
}

/// Serves `router` over HTTP/1.1 on `listener` with the head timeout (which `axum::serve` cannot
/// set) and each request's peer address (`ConnectInfo<SocketAddr>`), until `shutdown` resolves;
/// connections then finish their requests.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Every handler made into its route once, here, not on each request (`axum::serve` does the
    // same).
    let router = router.with_state::<()>(());
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => break,
        };
        // The peer address, as `into_make_service_with_connect_info` would give it.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        ));
        let mut closed = closed.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.head)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended");
                    }
                    return;
                }
                _ = closed.changed() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
