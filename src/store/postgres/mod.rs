//! [`PostgresStore`]: keys in PostgreSQL (feature `postgres`); its docs say how.
//!
//! - `sql`: identifiers, the migrations, every statement (the schema spliced in once) and row
//!   decoding;
//! - `builder`: [`PostgresStoreBuilder`] (schema, pool, timeouts, lazy connection);
//! - `store`: [`PostgresStore`], its locks and transactions, and its [`KeyStore`](crate::store::KeyStore)
//!   implementation.

mod audit;
mod builder;
#[cfg(feature = "webhooks")]
mod outbox;
mod overview;
mod sql;
mod store;

pub use builder::PostgresStoreBuilder;
pub use sql::InvalidIdentifier;
pub(crate) use sql::check_identifier;
pub use store::PostgresStore;
