//! Key lifecycle: [`KeyManager`] (library API) and, with feature `manage`, an axum router
//! ([`router`]) speaking Blnk's wire format.
//!
//! Every operation takes the acting [`Principal`](crate::principal::Principal) and asks one rule, [`authorize`], whether it
//! may (its documentation has the table): the master key may do everything (naming the owner it
//! acts for: `APIKEY_OWNER_REQUIRED`); a scoped key acts only inside its own owner and account,
//! reads with `api-keys:read`, and creates, rotates and revokes with `api-keys:write`, only keys
//! whose scopes it covers and which do not outlive it; hard deletion needs the master key.
//!
//! Keys a key created die with it: revoking or deleting a key revokes its descendants in the same
//! store transaction (and the store refuses a child whose creator is no longer active, so a
//! creation racing a revocation cannot leave a live orphan), and a delegated key's expiry is capped
//! at its creator's effective expiry. Revoke, delete and rotate invalidate the local
//! [`CachedResolver`](crate::resolver::CachedResolver) at once and publish an [`Invalidation`](crate::invalidate::Invalidation) for other instances; revoking an
//! already revoked key changes nothing and invalidates nothing.
//!
//! ## Limits
//!
//! Every input is bounded; past a bound the request is refused with 400 `APIKEY_INVALID` and a
//! message naming the bound, never truncated: a name of at most [`MAX_NAME_LEN`] characters, owner
//! and account ids of at most [`MAX_OWNER_LEN`] visible ASCII characters, 1 to [`MAX_SCOPES`] scopes
//! of at most [`MAX_SCOPE_LEN`](crate::scope::MAX_SCOPE_LEN) characters each, pages of 1 to [`MAX_PAGE_SIZE`] keys, cursors of at
//! most [`MAX_KEY_ID_LEN`] characters, a rotation grace period of at most [`MAX_GRACE_PERIOD`]. The
//! HTTP router reads bodies of at most [`MAX_BODY_BYTES`] (413 `REQUEST_BODY_TOO_LARGE` past it).
//! Lifetimes and active-key counts are the [`KeyPolicy`]'s.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_api_keys::error::AuthError> {
//! use std::sync::Arc;
//! use tower_api_keys::manage::{CreateKey, KeyManager, KeyPolicy};
//! use tower_api_keys::principal::Principal;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let manager = KeyManager::new(resolver.clone())
//!     .policy(KeyPolicy::default().max_active_per_owner(5));
//!
//! // Bootstrap with the master key: it must name the owner.
//! let created = manager
//!     .create(&Principal::master(), CreateKey::new(["ledgers:read", "api-keys:write"]).owner("payments"))
//!     .await?;
//! println!("give this to the payments team once: {}", created.key.expose_secret());
//!
//! // The new key authenticates...
//! let principal = resolver.authenticate(&created.key.digest()).await?;
//! assert_eq!(principal.owner(), Some("payments"));
//!
//! // ...and may delegate, but only what it holds.
//! let child = manager.create(&principal, CreateKey::new(["ledgers:read"])).await?;
//! assert_eq!(child.info.created_by.as_ref(), Some(&created.info.id));
//! assert!(manager.create(&principal, CreateKey::new(["*:*"])).await.is_err());
//!
//! manager.revoke(&Principal::master(), &child.info.id).await?;
//! assert!(resolver.authenticate(&child.key.digest()).await.is_err());
//! # Ok(())
//! # }
mod activity;
#[cfg(feature = "manage")]
mod activity_routes;
#[cfg(feature = "console")]
pub mod console;
mod create;
mod format;
mod limits;
mod manager;
mod overview;
mod policy;
mod read;
mod revoke;
#[cfg(feature = "manage")]
mod router;
mod types;
mod validate;

#[cfg(feature = "manage")]
pub use router::{openapi, router};

pub use crate::authorize::{KeyFacts, Operation, OperationKind, Target, authorize};
pub use activity::{EventFilter, EventPage, Granularity, MAX_USAGE_SPAN};
pub use format::FormatChangeError;
pub use manager::KeyManager;
pub use policy::KeyPolicy;
pub use types::{CreateKey, CreatedKey, KeyInfo, KeyPage, RevokeReason, RotateOptions, UpdateKey};
pub use validate::{
    DEFAULT_PAGE_SIZE, MAX_BODY_BYTES, MAX_GRACE_PERIOD, MAX_KEY_ID_LEN, MAX_NAME_LEN,
    MAX_OWNER_LEN, MAX_PAGE_SIZE, MAX_SCOPES,
};
