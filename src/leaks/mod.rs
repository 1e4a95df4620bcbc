//! When a key leaks: a receiver for secret scanners' signed reports ([`LeakReceiver`], mounted with
//! [`router`]) and the [`sweeper`] that warns about keys close to expiry or idle.
//!
//! GitHub's secret-scanning partner program (and deps.dev, which PyPI also accepts) `POST`s the
//! tokens it finds in public code to the provider: a JSON array of `{"token", "type", "url",
//! "source"}`, signed with ECDSA P-256 / SHA-256 over the raw body (base64 DER in
//! `Github-Public-Key-Signature`, the key named by `Github-Public-Key-Identifier`; deps.dev uses
//! `GOSST-Public-Key-*`). The receiver:
//!
//! 1. refuses a report whose signature is missing, malformed, wrong, or made with a key it does
//!    not hold even after refreshing the scanner's published keys: 401 `LEAK_REPORT_UNVERIFIED`,
//!    nothing changes;
//! 2. tells our tokens from others with the key format's check (prefix, length, checksum or keyed
//!    tag): a token that fails it costs no store lookup and is a `false_positive`;
//! 3. looks the rest up by digest; a key of ours is a `true_positive` and gets its owner's
//!    [`LeakAction`] (default: revoked with every key it created, reason `leaked`, through
//!    [`KeyManager::revoke_because`](crate::manage::KeyManager::revoke_because): local
//!    invalidation, cascade and fleet broadcast like any revocation);
//! 4. answers GitHub's feedback array `[{"token_hash", "token_type", "label"}]`.
//!
//! The same report twice changes nothing more (a revoked key stays revoked). Bodies are bounded
//! ([`MAX_REPORT_BYTES`], [`MAX_REPORT_TOKENS`]).
//!
//! ```
//! use std::sync::Arc;
//! use axum::Router;
//! use tower_api_keys::leaks::{self, LeakPolicy, LeakReceiver, PublicKeys, Scanner};
//! use tower_api_keys::manage::KeyManager;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(MemoryStore::new());
//! let manager = KeyManager::new(CachedResolver::new(store));
//! let receiver = LeakReceiver::builder(manager)
//!     // GitHub's keys, from a file in its published JSON shape...
//!     .keys(Scanner::GitHub, PublicKeys::from_json(br#"{"public_keys": []}"#)?)
//!     // ...or fetched (and refreshed on an unknown identifier) from a URL.
//!     .keys_url(Scanner::DepsDev, "http://keys.internal/depsdev.json")
//!     .policy(LeakPolicy::new())
//!     .build();
//! // Outside the API-key layer: scanners have no key, their signature is the credential.
//! let app: Router = Router::new().merge(leaks::router(receiver));
//! # Ok(())
//! # }
//! ```

mod keys;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod leader;
mod receiver;
mod router;
pub mod sweeper;

pub use keys::{
    FetchKeys, MAX_KEY_DOCUMENT_BYTES, MAX_KEY_IDENTIFIER_LEN, MAX_SIGNATURE_LEN, PublicKeys,
    PublicKeysError, Unverified,
};
#[cfg(feature = "postgres")]
pub use leader::PostgresLeader;
#[cfg(feature = "redis")]
pub use leader::RedisLeader;
pub use receiver::{
    Feedback, KEY_REFRESH_INTERVAL, Label, LeakAction, LeakPolicy, LeakReceiver,
    LeakReceiverBuilder, LeakedToken, MAX_REPORT_BYTES, MAX_REPORT_TOKENS, Scanner, hex_sha256,
};
pub use router::router;
pub use sweeper::{
    HygieneEvent, HygieneKind, HygienePolicy, Leadership, Lone, SweepReport, Sweeper,
};
