//! Errors, their stable codes, and how rejections are rendered.
//!
//! Every refusal is an [`AuthError`]. Its [`ErrorCode`] is the stable, machine-readable contract
//! (HTTP status, gRPC status and the `code` string in the body). The default rendering,
//! [`JsonRejection`], follows Blnk's body shape so its clients keep working:
//!
//! ```json
//! {"error": "API key has expired or was revoked",
//!  "error_detail": {"code": "AUTH_EXPIRED_API_KEY", "message": "API key has expired or was revoked",
//!                   "details": {"reason": "revoked"}}}
//! ```
//!
//! Plug in your own body with any `Fn(&AuthError) -> Response<B>` (or a type implementing
//! [`RenderRejection`]); whatever renders it, the middleware puts the [`AuthError`] in the response
//! extensions and adds `WWW-Authenticate` to a 401 that lacks one.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_keys::error::{AuthError, ErrorCode};
//! use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let resolver = CachedResolver::new(MemoryStore::new());
//! let layer = ApiKeyLayer::new(resolver).rejection(|error: &AuthError| {
//!     Response::builder()
//!         .status(error.code().http_status())
//!         .body(format!("denied: {}", error.code()))
//!         .unwrap()
//! });
//! let service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_: Request<LiveBody<String>>| async { Ok::<_, Infallible>(Response::new(String::from("hi"))) });
//!
//! let response = service.oneshot(Request::get("/").body(String::new())?).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(response.body().get_ref(), "denied: AUTH_MISSING_API_KEY");
//! // The typed error rides along, and the 401 got its challenge.
//! let error = response.extensions().get::<AuthError>().unwrap();
//! assert_eq!(error.code(), ErrorCode::MissingApiKey);
//! assert!(response.headers().contains_key("www-authenticate"));
//! # Ok(())
//! # }
//! ```

mod auth;
mod code;
mod render;
pub(crate) mod store;

pub use auth::AuthError;
pub use code::{ErrorCode, ExpiredReason, InvalidKeyReason};
pub(crate) use render::reject;
pub use render::{GrpcRejection, JsonRejection, RenderRejection};

#[cfg(test)]
mod tests;
