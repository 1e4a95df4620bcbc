//! [`SqliteStore`]: keys in an embedded SQLite database file (feature `sqlite`); its docs say how.
//!
//! - `sql`: column lists and shared CTEs, the migrations, row decoding;
//! - `builder`: opening a store (connection options, WAL, in-memory pools) and migrating it;
//! - `store`: [`SqliteStore`], its transactions, and its [`KeyStore`](crate::store::KeyStore)
//!   implementation, which runs the statements of:
//! - `reads` (keys by digest, id and owner, the delegation tree), `keys` (the key writes),
//!   `credits` (credits and pools), `formats` (the keyed format's secrets), `audit` (events and
//!   usage counts, and with them `outbox`, the webhook deliveries), `overview` (the console's).

mod audit;
mod builder;
mod credits;
mod formats;
mod keys;
#[cfg(feature = "webhooks")]
mod outbox;
mod overview;
mod reads;
mod sql;
mod store;

pub use store::SqliteStore;
