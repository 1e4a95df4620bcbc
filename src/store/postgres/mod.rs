//! [`PostgresStore`]: keys in PostgreSQL (feature `postgres`); its docs say how.
//!
//! - `sql`: identifiers, the migrations, every statement (the schema spliced in once) and row
//!   decoding;
//! - `builder`: [`PostgresStoreBuilder`] (schema, pool, timeouts, lazy connection);
//! - `store`: [`PostgresStore`] and its transactions; `key_store`, its
//!   [`KeyStore`](crate::store::KeyStore) implementation, which runs the statements of:
//! - `reads` (keys by digest, id and owner, the delegation tree), `keys` (the key writes and
//!   their locks), `credits` (credits and pools), `formats` (the keyed format's secrets), `audit`
//!   (events and usage counts, and with them `outbox`, the webhook deliveries), `overview` (the
//!   console's).

mod audit;
mod builder;
mod credits;
mod formats;
mod key_store;
mod keys;
#[cfg(feature = "webhooks")]
mod outbox;
mod overview;
mod reads;
mod sql;
mod store;

pub use builder::PostgresStoreBuilder;
pub use sql::InvalidIdentifier;
pub(crate) use sql::check_identifier;
pub use store::PostgresStore;
