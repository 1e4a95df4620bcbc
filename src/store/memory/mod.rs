//! [`MemoryStore`]: keys in memory, for tests, examples and services that can lose keys on
//! restart.
//!
//! - `store`: [`MemoryStore`] and its [`KeyStore`](crate::store::KeyStore) implementation;
//! - `state`: what it holds behind its one lock, and the key writes and rules applied to it.

mod state;
mod store;

pub use store::MemoryStore;
