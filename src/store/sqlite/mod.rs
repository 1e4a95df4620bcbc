//! [`SqliteStore`]: keys in an embedded SQLite database file (feature `sqlite`); its docs say how.
//!
//! - `sql`: column lists and shared CTEs, the migrations, row decoding;
//! - `builder`: opening a store (connection options, WAL, in-memory pools) and migrating it;
//! - `store`: [`SqliteStore`], its transactions, and its [`KeyStore`](crate::store::KeyStore)
//!   implementation.

mod audit;
mod builder;
#[cfg(feature = "webhooks")]
mod outbox;
mod overview;
mod sql;
mod store;

pub use store::SqliteStore;
