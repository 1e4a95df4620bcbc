use tower_layer::Layer;

use super::limiter::RateLimiter;
use super::service::RateLimitService;
use crate::error::JsonRejection;

/// Applies a [`RateLimiter`] to every request of a limited key; made by [`RateLimiter::layer`].
///
/// Put it inside [`ApiKeyLayer`](crate::layer::ApiKeyLayer) (which attaches the principal it keys
/// on): `Router::layer` for a whole router, `route_layer` for some routes, each with its own
/// [`cost`](RateLimitLayer::cost). Layers made from one limiter share its state.
#[derive(Clone, Debug)]
#[must_use]
pub struct RateLimitLayer<R = JsonRejection> {
    limiter: RateLimiter,
    cost: u32,
    rejection: R,
}

// Beside the layer, so that the limiter does not import back up from here.
impl RateLimiter {
    /// A layer limiting each request at cost 1 (change with [`RateLimitLayer::cost`]).
    pub fn layer(&self) -> RateLimitLayer {
        RateLimitLayer::new(self.clone())
    }
}

impl RateLimitLayer {
    /// Requests cost 1 unit; refusals are JSON.
    pub fn new(limiter: RateLimiter) -> Self {
        Self {
            limiter,
            cost: 1,
            rejection: JsonRejection::default(),
        }
    }
}

impl<R> RateLimitLayer<R> {
    /// Each request through this layer costs `cost` units of rate limit and credits (at least 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost.max(1);
        self
    }

    /// Renders refusals with `rejection` (e.g. [`GrpcRejection`](crate::error::GrpcRejection)).
    pub fn rejection<R2>(self, rejection: R2) -> RateLimitLayer<R2> {
        RateLimitLayer {
            limiter: self.limiter,
            cost: self.cost,
            rejection,
        }
    }
}

impl<S, R: Clone> Layer<S> for RateLimitLayer<R> {
    type Service = RateLimitService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(
            inner,
            self.limiter.clone(),
            self.cost,
            self.rejection.clone(),
        )
    }
}
