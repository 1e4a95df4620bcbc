//! Key material: generation, the key formats, digests and masking.
//!
//! A key looks like `sk_live_3hQ…` : a configurable prefix, an underscore, 43 base62 characters drawn
//! from the operating system's CSPRNG (256 bits of entropy), then a check that lets
//! [`KeyFormat::check`] refuse a key without touching a store. There are two formats, told apart by
//! their length alone:
//!
//! | format | after `<prefix>_` | check | who can make a key that passes |
//! |---|---|---|---|
//! | public checksum ([`KeyFormat::new`]) | 43 body + 6 (49 characters) | CRC32 of everything before it, base62 | anyone: the format is public |
//! | keyed ([`KeyFormat::keyed`]) | 43 body + 1 secret version + 11 tag (55 characters) | first 64 bits of HMAC-SHA-256 under a server-side secret of everything before the tag, base62 | only the service |
//!
//! **The trade-off.** The public checksum keeps the shape secret scanners already match and lets
//! them validate a leaked key offline (a CRC32 that matches is almost never a false positive), but
//! anyone can mint well-formed keys, so each made-up key costs the service a store lookup (the
//! negative cache only helps when a key repeats). The keyed tag cannot be checked offline (a scanner
//! can still match the prefix and the 55-character shape), but a made-up key is refused with no I/O:
//! a flood of them costs what a flood of malformed keys costs. A forger has one chance in 2⁶⁴ per try.
//!
//! **Secret versions.** The character after the body names the secret that tagged the key
//! (`1`–`9`, `A`–`Z`, `a`–`z`: versions 1 to 61). A format accepts every version it was given and
//! tags new keys with the highest (or a pinned one), so a secret is rotated by adding version 2 while
//! version 1 stays accepted, and retiring version 1 once its keys are gone: every key tagged by a
//! retired version is refused.
//!
//! **Legacy keys.** Keys of the public format (49 characters) can never be mistaken for keyed ones
//! (55). A keyed format accepts them only if told to ([`KeyedFormatBuilder::accept_legacy`]), or, for a
//! format loaded from a store, if the store held keys when its first secret was created (so a
//! service that switches keeps its existing keys working, and a new one refuses the shape outright).
//!
//! ```
//! use tower_api_keys::key::KeyFormat;
//!
//! let format = KeyFormat::new("sk_live").unwrap();
//! let key = format.generate();
//! assert!(format.check(key.expose_secret()).is_ok());
//! // the secret never shows up in Debug or Display output
//! assert_eq!(format!("{key:?}"), "ApiKey(\"sk_live_…\")");
//! // a typo is caught by the checksum, with no I/O
//! let mut typo = key.expose_secret().to_owned();
//! typo.replace_range(10..11, if &typo[10..11] == "A" { "B" } else { "A" });
//! assert!(format.check(&typo).is_err());
//! ```
//!
//! The keyed format, with a secret from the key store (created there on first use, shared by every
//! instance):
//!
//! ```
//! use tower_api_keys::key::KeyFormat;
//! use tower_api_keys::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new();
//! let format = KeyFormat::keyed("sk_live").load_secret_from(&store).await?;
//! let key = format.generate();
//! assert_eq!(key.expose_secret().len(), "sk_live_".len() + 55);
//! assert!(format.check(key.expose_secret()).is_ok());
//! // A key with the right shape that this service did not make fails the tag, with no I/O.
//! let made_up = format!("sk_live_{}", "x".repeat(55));
//! assert!(format.check(&made_up).is_err());
//! # Ok(())
//! # }
//! ```

mod api_key;
mod check;
mod digest;
mod format;
mod generate;
mod id;
mod keyed;
mod shape;

pub use api_key::ApiKey;
pub use digest::{DigestScheme, KeyDigest};
pub use format::KeyFormat;
pub use id::KeyId;
pub(crate) use id::MASTER_KEY_ID;
pub use keyed::{FormatSecret, KeyFormatConfigError, KeyedFormatBuilder, MAX_SECRET_VERSION};
pub use shape::{
    BODY_LEN, CHECKSUM_LEN, InvalidPrefix, KEYED_TAIL_LEN, KeyFormatError, MAX_KEY_LEN,
    MAX_PREFIX_LEN, PUBLIC_TAIL_LEN, TAG_LEN,
};
