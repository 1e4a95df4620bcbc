//! Where keys live: the [`KeyStore`] trait and its implementations.
//!
//! A store holds [`KeyRecord`]s: metadata plus the digest of the secret (never the secret). The
//! resolver only ever calls [`KeyStore::find_by_digest`] on a cache miss; the rest serves key
//! management. Every implementation passes the same conformance suite
//! (`tests/store_conformance.rs`).
//!
//! [`MemoryStore`] is the default, for tests and single-process services that may lose their keys
//! on restart.
//!
//! - `key_store`: the [`KeyStore`] trait and its contract; `params`, what its methods take;
//!   `credits`, the credit rules every store follows; `defaults`, the bodies of its default
//!   ancestry, counting and usage methods;
//! - `overview`, `format`: what a store answers; what it holds, [`KeyRecord`] and [`KeyChange`], is
//!   defined below the store and the audit trail, which both speak of it (`src/record.rs`), and its
//!   error, [`StoreError`], with the crate's other errors (`error/store.rs`: an
//!   [`AuthError`](crate::error::AuthError) carries one); both are named here;
//! - `memory`, `sqlite`, `postgres`: the stores; what the SQL ones share: `sql_common` (timestamps,
//!   key rows, errors, the rules around their statements), `sql_audit` (event rows) and
//!   `delivery` (what their webhook outbox writes with each event);
//! - `usage`: the hourly usage counts a store keeps (public as `usage::UsageBucket` and so on:
//!   [`UsageRecorder`](crate::usage::UsageRecorder), above the store, flushes them into it);
//! - `shared`: a store behind an `Arc` is a store; `retention`, purging a store's old audit events
//!   and usage counts ([`Retention`]).

mod credits;
mod defaults;
#[cfg(all(feature = "webhooks", any(feature = "sqlite", feature = "postgres")))]
mod delivery;
mod format;
mod key_store;
mod memory;
mod overview;
mod params;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod retention;
mod shared;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql_audit;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod sql_common;
#[cfg(feature = "sqlite")]
mod sqlite;
pub(crate) mod usage;

pub use crate::error::store::{StoreError, StoreErrorKind};
pub use crate::record::{KeyChange, KeyRecord, MAX_DELEGATION_DEPTH, PreviousSecret};
pub use credits::{ChainSpend, CreditAdjustment, adjust};
pub use format::{FormatLoadError, FormatSecrets, StoredSecret};
pub use key_store::KeyStore;
pub use memory::MemoryStore;
pub use overview::{MAX_OWNERS, OwnerSummary};
pub use params::{KeyLimits, KeyUpdate, ListQuery, Rotation, SweepQuery};
#[cfg(feature = "postgres")]
pub use postgres::{InvalidIdentifier, PostgresStore, PostgresStoreBuilder};
pub use retention::Retention;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
