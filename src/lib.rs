#![doc = include_str!("../README.md")]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

mod clock;
pub mod error;
pub mod guard;
pub mod invalidate;
pub mod key;
pub mod layer;
pub mod manage;
pub mod metrics;
pub mod principal;
#[cfg(feature = "provenance")]
pub mod provenance;
pub mod resolver;
pub mod scope;
pub mod store;
pub mod usage;

pub use error::ScopeMatch;
pub use error::{AuthError, ErrorCode, GrpcRejection, JsonRejection, RenderRejection};
#[cfg(feature = "axum")]
pub use guard::Scoped;
pub use guard::{
    MethodScopes, MethodScopesService, RequireScopes, RequireScopesService, ScopeRequirement,
};
#[cfg(feature = "postgres")]
pub use invalidate::PgInvalidator;
#[cfg(feature = "redis")]
pub use invalidate::RedisInvalidator;
pub use invalidate::{Invalidation, Invalidator, NoBroadcast};
pub use key::{ApiKey, KeyDigest, KeyFormat, KeyId};
pub use layer::{ApiKeyLayer, ApiKeyService, KeySource};
pub use manage::KeyManager;
pub use principal::{Principal, PrincipalKind};
#[cfg(feature = "provenance")]
pub use provenance::{Provenance, ProvenanceBody, ProvenanceService};
pub use resolver::CachedResolver;
pub use scope::{Scope, ScopeSet, is_valid_scope};
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{KeyRecord, KeyStore, MemoryStore, StoreError};
pub use usage::UsageRecorder;
