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

mod keyed;

use std::fmt;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

pub use keyed::{FormatSecret, KeyFormatConfigError, KeyedFormatBuilder, MAX_SECRET_VERSION};

/// Number of base62 characters of secret material in a key (43 × log2(62) ≈ 256.03 bits).
pub const BODY_LEN: usize = 43;
/// Number of base62 characters of the CRC32 checksum of the public format (62⁶ > 2³²).
pub const CHECKSUM_LEN: usize = 6;
/// Number of base62 characters of the keyed format's tag: 64 bits of HMAC-SHA-256 (62¹¹ > 2⁶⁴).
pub const TAG_LEN: usize = 11;
/// Characters after `<prefix>_` in a key of the public (CRC32) format: body and checksum.
pub const PUBLIC_TAIL_LEN: usize = BODY_LEN + CHECKSUM_LEN;
/// Characters after `<prefix>_` in a key of the keyed format: body, secret version, tag.
pub const KEYED_TAIL_LEN: usize = BODY_LEN + 1 + TAG_LEN;
/// Longest prefix accepted by [`KeyFormat::new`].
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest candidate of any format; anything longer is refused before any work.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 1 + KEYED_TAIL_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a well-formed key. Never carries the candidate itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// The candidate does not start with the configured prefix and `_`.
    #[error("the key does not start with the expected prefix")]
    WrongPrefix,
    /// The candidate has the wrong number of characters after the prefix.
    #[error("the key has the wrong length")]
    WrongLength,
    /// The candidate contains a character outside the base62 alphabet.
    #[error("the key contains a character outside the base62 alphabet")]
    BadCharacter,
    /// The checksum (public format) or the keyed tag does not match the body: a typo or a made-up key.
    #[error("the key checksum does not match")]
    BadChecksum,
    /// A key of the public (CRC32) format, which this keyed format no longer accepts.
    #[error("the key is of the legacy checksum format, which is no longer accepted")]
    LegacyFormat,
    /// A keyed key whose secret version this format does not accept (never issued, or retired).
    #[error("the key was tagged by a secret version that is not accepted")]
    UnknownSecretVersion,
}

/// Why a prefix was refused by [`KeyFormat::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid key prefix {0:?}: use 1 to 32 characters of [a-z0-9] in segments joined by single '_'"
)]
pub struct InvalidPrefix(pub String);

/// The shape of keys a service issues and accepts: a prefix such as `sk_live`, and either the public
/// CRC32 checksum ([`new`](Self::new)) or a keyed tag ([`keyed`](Self::keyed)); see the
/// [module docs](self) for the layouts and the trade-off.
///
/// Cheap to clone. `Debug` shows the prefix, the secret versions and the legacy policy, never a
/// secret.
#[derive(Clone)]
pub struct KeyFormat {
    prefix: Arc<str>,
    keyed: Option<Arc<keyed::Keyed>>,
}

impl PartialEq for KeyFormat {
    /// Same prefix, and the same secrets (compared in constant time), versions and policies.
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix
            && match (&self.keyed, &other.keyed) {
                (None, None) => true,
                (Some(a), Some(b)) => a == b,
                _ => false,
            }
    }
}

impl Eq for KeyFormat {}

impl fmt::Debug for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("KeyFormat");
        d.field("prefix", &&*self.prefix);
        match &self.keyed {
            None => d.field("check", &"crc32"),
            Some(keyed) => d.field("check", keyed),
        };
        d.finish()
    }
}

impl Default for KeyFormat {
    /// The `sk` prefix with the public checksum: keys look like `sk_<49 characters>`.
    fn default() -> Self {
        Self {
            prefix: "sk".into(),
            keyed: None,
        }
    }
}

impl KeyFormat {
    /// The public-checksum format with the given prefix (`[a-z0-9]` segments joined by single `_`, at
    /// most 32 characters): `<prefix>_<43 body><6 CRC32>`.
    pub fn new(prefix: impl Into<String>) -> Result<Self, InvalidPrefix> {
        let prefix = prefix.into();
        if is_valid_prefix(&prefix) {
            Ok(Self {
                prefix: prefix.into(),
                keyed: None,
            })
        } else {
            Err(InvalidPrefix(prefix))
        }
    }

    /// A keyed format with the given prefix: `<prefix>_<43 body><secret version><11 tag>`. Give it
    /// its secrets ([`secret`](KeyedFormatBuilder::secret)) or load them from the key store
    /// ([`load_secret_from`](KeyedFormatBuilder::load_secret_from)).
    pub fn keyed(prefix: impl Into<String>) -> KeyedFormatBuilder {
        KeyedFormatBuilder::new(prefix.into())
    }

    pub(crate) fn from_keyed(prefix: Arc<str>, keyed: keyed::Keyed) -> Self {
        Self {
            prefix,
            keyed: Some(Arc::new(keyed)),
        }
    }

    /// The builder a format loaded from a key store was made with, before the store's secrets
    /// were added (`None`: not loaded from a store); what
    /// [`reload_from`](Self::reload_from) rebuilds it from.
    pub(crate) fn recipe(&self) -> Option<&KeyedFormatBuilder> {
        self.keyed.as_ref()?.recipe()
    }

    /// The prefix, without the trailing `_`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether keys carry a keyed tag (rather than the public checksum).
    pub fn is_keyed(&self) -> bool {
        self.keyed.is_some()
    }

    /// The secret version new keys are tagged with (`None` for the public format).
    pub fn minting_version(&self) -> Option<u8> {
        self.keyed.as_ref().map(|k| k.minting())
    }

    /// The secret versions accepted, in increasing order (empty for the public format).
    pub fn accepted_versions(&self) -> Vec<u8> {
        self.keyed.as_ref().map_or_else(Vec::new, |k| k.versions())
    }

    /// Whether keys of the public (CRC32) format are accepted: always for the public format; for a
    /// keyed one, as configured.
    pub fn accepts_legacy(&self) -> bool {
        self.keyed.as_ref().is_none_or(|k| k.legacy())
    }

    /// Length of every key this format issues (a keyed format accepting legacy keys also accepts
    /// the public format's length).
    pub fn key_len(&self) -> usize {
        self.prefix.len() + 1 + self.tail_len()
    }

    /// The regular expression matching every key this format accepts, for registering with secret
    /// scanners (GitHub's partner program, gitleaks, trufflehog). `\b` on both sides: a key inside
    /// a longer run of letters and digits is not one of ours.
    ///
    /// | format | pattern (prefix `sk_live`) |
    /// |---|---|
    /// | public checksum | `\bsk_live_[0-9A-Za-z]{49}\b` |
    /// | keyed | `\bsk_live_[0-9A-Za-z]{43}[1-9A-Za-z][0-9A-Za-z]{11}\b` |
    /// | keyed, accepting legacy keys | `\bsk_live_(?:[0-9A-Za-z]{49}\|[0-9A-Za-z]{43}[1-9A-Za-z][0-9A-Za-z]{11})\b` |
    ///
    /// A match is a candidate only: the checksum (or, for keyed keys, the service) decides.
    pub fn scanner_pattern(&self) -> String {
        const PUBLIC: &str = "[0-9A-Za-z]{49}";
        const KEYED: &str = "[0-9A-Za-z]{43}[1-9A-Za-z][0-9A-Za-z]{11}";
        // A prefix is `[a-z0-9_]` only: nothing to escape.
        let tail = match &self.keyed {
            None => PUBLIC.to_owned(),
            Some(keyed) if keyed.legacy() => format!("(?:{PUBLIC}|{KEYED})"),
            Some(_) => KEYED.to_owned(),
        };
        format!("\\b{}_{tail}\\b", self.prefix)
    }

    fn tail_len(&self) -> usize {
        if self.keyed.is_some() {
            KEYED_TAIL_LEN
        } else {
            PUBLIC_TAIL_LEN
        }
    }

    /// Generates a fresh key from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide random bytes, which on supported platforms means the
    /// process cannot do anything safely anyway.
    pub fn generate(&self) -> ApiKey {
        // Sized for the whole key, so that no reallocation leaves a copy behind; both buffers are
        // zeroed when dropped.
        let mut key = zeroize::Zeroizing::new(String::with_capacity(self.key_len()));
        key.push_str(&self.prefix);
        key.push('_');
        let mut filled = 0;
        let mut buf = zeroize::Zeroizing::new([0u8; 64]);
        while filled < BODY_LEN {
            getrandom::fill(&mut *buf).expect("the operating system's CSPRNG is unavailable");
            for &b in buf.iter() {
                // Rejection sampling keeps every character uniform: 248 = 4 × 62.
                if b < 248 && filled < BODY_LEN {
                    key.push(BASE62[usize::from(b % 62)] as char);
                    filled += 1;
                }
            }
        }
        match &self.keyed {
            None => {
                let checksum = crc32fast::hash(key.as_bytes());
                key.push_str(std::str::from_utf8(&encode_checksum(checksum)).expect("base62"));
            }
            Some(keyed) => {
                key.push(BASE62[usize::from(keyed.minting())] as char);
                let tag = keyed
                    .tag(keyed.minting(), key.as_bytes())
                    .expect("the minting version is accepted");
                key.push_str(std::str::from_utf8(&tag).expect("base62"));
            }
        }
        debug_assert_eq!(key.len(), self.key_len());
        ApiKey(key)
    }

    /// Checks a candidate's prefix, length, alphabet and checksum or tag. Pure computation, no I/O.
    pub fn check(&self, candidate: &str) -> Result<(), KeyFormatError> {
        self.check_shape(candidate)?;
        self.check_checksum(candidate)
    }

    /// Prefix, length and alphabet: what [`check`](Self::check) verifies before the checksum.
    pub(crate) fn check_shape(&self, candidate: &str) -> Result<(), KeyFormatError> {
        let bytes = candidate.as_bytes();
        let prefix = self.prefix.as_bytes();
        if bytes.len() <= prefix.len()
            || &bytes[..prefix.len()] != prefix
            || bytes[prefix.len()] != b'_'
        {
            return Err(KeyFormatError::WrongPrefix);
        }
        let tail = &bytes[prefix.len() + 1..];
        if tail.len() != self.tail_len() {
            // The two formats differ in length (49 and 55 characters): the length alone tells them
            // apart. Only a keyed format can see a legacy key (the public format's length).
            match &self.keyed {
                Some(keyed) if tail.len() == PUBLIC_TAIL_LEN => {
                    if !keyed.legacy() {
                        return Err(KeyFormatError::LegacyFormat);
                    }
                }
                _ => return Err(KeyFormatError::WrongLength),
            }
        }
        check_alphabet(tail)
    }

    /// The checksum or tag of a candidate that passed [`check_shape`](Self::check_shape).
    pub(crate) fn check_checksum(&self, candidate: &str) -> Result<(), KeyFormatError> {
        let bytes = candidate.as_bytes();
        let tail = bytes.len().saturating_sub(self.prefix.len() + 1);
        match &self.keyed {
            Some(keyed) if tail == KEYED_TAIL_LEN => {
                let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
                let version = base62_value(signed[signed.len() - 1]);
                let expected = version
                    .and_then(|v| keyed.tag(v, signed))
                    .ok_or(KeyFormatError::UnknownSecretVersion)?;
                if bool::from(expected[..].ct_eq(tag)) {
                    Ok(())
                } else {
                    Err(KeyFormatError::BadChecksum)
                }
            }
            Some(keyed) if !keyed.legacy() => Err(KeyFormatError::LegacyFormat),
            _ => {
                let (signed, checksum) = bytes.split_at(bytes.len().saturating_sub(CHECKSUM_LEN));
                if checksum != encode_checksum(crc32fast::hash(signed)) {
                    return Err(KeyFormatError::BadChecksum);
                }
                Ok(())
            }
        }
    }

    /// The form shown in listings: `sk_live_Ab3d…x9Qz` (prefix, 4 leading and 4 trailing characters).
    ///
    /// Returns `None` if `key` is not of this format.
    pub fn mask(&self, key: &ApiKey) -> Option<String> {
        self.check(key.expose_secret()).ok()?;
        Some(mask(key.expose_secret(), self.prefix.len()))
    }
}

/// Every byte in the base62 alphabet. A branch-free fold over all of them vectorises; an early-exit
/// `all` (over a `chain`) costs several times more on this hot path.
fn check_alphabet(tail: &[u8]) -> Result<(), KeyFormatError> {
    if tail
        .iter()
        .fold(true, |ok, b| ok & b.is_ascii_alphanumeric())
    {
        Ok(())
    } else {
        Err(KeyFormatError::BadCharacter)
    }
}

/// The value of a base62 digit.
fn base62_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'Z' => Some(c - b'A' + 10),
        b'a'..=b'z' => Some(c - b'a' + 36),
        _ => None,
    }
}

pub(crate) fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.split('_').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn mask(key: &str, prefix_len: usize) -> String {
    let body = &key[prefix_len + 1..];
    format!(
        "{}_{}…{}",
        &key[..prefix_len],
        &body[..4],
        &body[body.len() - 4..]
    )
}

fn encode_checksum(value: u32) -> [u8; CHECKSUM_LEN] {
    encode_base62(u64::from(value))
}

/// `value` in `N` base62 digits, most significant first (fixed width: leading zeros).
fn encode_base62<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// A plaintext key. It is shown to its holder once and never stored; `Debug` and `Display` redact it,
/// and its memory is zeroed when it is dropped.
#[derive(Clone)]
pub struct ApiKey(zeroize::Zeroizing<String>);

impl ApiKey {
    /// Wraps a plaintext key (for example the master key read from configuration).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(zeroize::Zeroizing::new(secret.into()))
    }

    /// The plaintext. Call it only to hand the key to its holder.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest, the only form of a key that is stored or cached.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(&self.0)
    }

    /// What `Debug` and `Display` show: the `<prefix>_` of a string shaped like a key (a valid prefix,
    /// `_`, then exactly the 49 or 55 base62 characters of either format), and nothing of any other
    /// secret, such as a master key from configuration (`a_b_secret` must not show `a_b_`).
    fn visible_prefix(&self) -> &str {
        [PUBLIC_TAIL_LEN, KEYED_TAIL_LEN]
            .into_iter()
            .find_map(|tail| {
                let (shown, hidden) = self.0.split_at_checked(self.0.len().checked_sub(tail)?)?;
                (hidden.bytes().all(|b| b.is_ascii_alphanumeric())
                    && shown.strip_suffix('_').is_some_and(is_valid_prefix))
                .then_some(shown)
            })
            .unwrap_or("")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(\"{}…\")", self.visible_prefix())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.visible_prefix())
    }
}

impl PartialEq for ApiKey {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for ApiKey {}

/// How a stored digest was computed. Every stored record carries its scheme, so a future scheme
/// never invalidates keys issued under an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DigestScheme {
    /// Plain SHA-256 of the whole key string (version 1).
    #[default]
    Sha256,
}

impl DigestScheme {
    /// The version number stored next to the digest.
    pub const fn version(self) -> u16 {
        match self {
            Self::Sha256 => 1,
        }
    }

    /// The scheme stored under `version`, if this build knows it.
    pub const fn from_version(version: u16) -> Option<Self> {
        match version {
            1 => Some(Self::Sha256),
            _ => None,
        }
    }
}

/// SHA-256 digest of a key. Compared in constant time; `Debug` does not print it.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl KeyDigest {
    /// Digest of a key string under [`DigestScheme::Sha256`].
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Wraps raw digest bytes (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes (for stores).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for KeyDigest {
    /// Constant time: every word is compared, and only the folded difference is looked at. (Four
    /// 64-bit words instead of `subtle`'s 32 byte-wise barriers: this runs on every cached request.)
    fn eq(&self, other: &Self) -> bool {
        let word = |bytes: &[u8; 32], i: usize| {
            u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let difference = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        std::hint::black_box(difference) == 0
    }
}

impl Eq for KeyDigest {}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The word-wise constant-time comparison agrees with byte equality, whichever byte differs.
    #[test]
    fn digest_equality_sees_every_byte() {
        let digest = KeyDigest::of("sk_some_key");
        assert_eq!(digest, KeyDigest(digest.0));
        for i in 0..32 {
            for flip in [0x01, 0x80, 0xff] {
                let mut other = digest.0;
                other[i] ^= flip;
                assert_ne!(digest, KeyDigest(other), "byte {i} flipped by {flip:#x}");
            }
        }
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let format = KeyFormat::new("sk_live").unwrap();
        let key = format.generate();
        let s = key.expose_secret();
        assert!(s.starts_with("sk_live_"));
        assert_eq!(s.len(), "sk_live_".len() + BODY_LEN + CHECKSUM_LEN);
        assert!(
            s["sk_live_".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        );
        assert_eq!(format.check(s), Ok(()));
        assert_ne!(format.generate().expose_secret(), s, "two keys must differ");
    }

    #[test]
    fn characters_are_spread_over_the_whole_alphabet() {
        let format = KeyFormat::default();
        let mut seen = [0u32; 128];
        for _ in 0..400 {
            let key = format.generate();
            for b in key.expose_secret()[3..3 + BODY_LEN].bytes() {
                seen[usize::from(b)] += 1;
            }
        }
        // 17,200 draws over 62 symbols: each expected ≈ 277 times.
        for &c in BASE62 {
            let n = seen[usize::from(c)];
            assert!((150..450).contains(&n), "{} drawn {n} times", c as char);
        }
    }

    #[test]
    fn prefixes_are_validated() {
        for good in ["sk", "sk_live", "a1_b2_c3", "x"] {
            assert!(KeyFormat::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "_sk",
            "sk_",
            "sk__live",
            "SK",
            "sk-live",
            "sk live",
            &"a".repeat(33),
        ] {
            assert!(KeyFormat::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn check_reports_what_is_wrong() {
        let format = KeyFormat::new("sk_live").unwrap();
        let key = format.generate();
        let s = key.expose_secret();
        assert_eq!(
            format.check(&s.replacen("sk_live", "sk_test", 1)),
            Err(KeyFormatError::WrongPrefix)
        );
        assert_eq!(format.check("sk_live"), Err(KeyFormatError::WrongPrefix));
        assert_eq!(
            format.check(&s[..s.len() - 1]),
            Err(KeyFormatError::WrongLength)
        );
        assert_eq!(
            format.check(&format!("{s}0")),
            Err(KeyFormatError::WrongLength)
        );
        let mut bad = s.to_owned();
        bad.replace_range(12..13, "-");
        assert_eq!(format.check(&bad), Err(KeyFormatError::BadCharacter));
        let mut bad = s.to_owned();
        let c = if &bad[12..13] == "a" { "b" } else { "a" };
        bad.replace_range(12..13, c);
        assert_eq!(format.check(&bad), Err(KeyFormatError::BadChecksum));
        // multi-byte characters do not panic the slicing
        assert!(format.check("sk_live_é").is_err());
        assert!(
            format
                .check(&format!("sk_live_{}", "é".repeat(25)))
                .is_err()
        );
    }

    #[test]
    fn masking_keeps_prefix_and_edges_only() {
        let format = KeyFormat::new("sk_live").unwrap();
        let key = format.generate();
        let masked = format.mask(&key).unwrap();
        let s = key.expose_secret();
        assert_eq!(
            masked,
            format!("sk_live_{}…{}", &s[8..12], &s[s.len() - 4..])
        );
        assert!(format.mask(&ApiKey::new("nope")).is_none());
    }

    #[test]
    fn secrets_are_redacted() {
        let key = KeyFormat::new("sk_live").unwrap().generate();
        let secret = key.expose_secret();
        for shown in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{:?}", key.digest()),
        ] {
            assert!(!shown.contains(&secret[8..]), "{shown}");
        }
        assert_eq!(
            format!("{:?}", ApiKey::new("no-underscore-secret")),
            "ApiKey(\"…\")"
        );
        // Only a key-shaped secret shows its prefix; a master key with underscores shows nothing.
        for other in [
            "my_super_secret_master_key_value",
            "sk_live_abc",
            &format!("sk_live_{}", "é".repeat(25)),
            &format!("Sk_{}", &secret[8..]),
        ] {
            assert_eq!(format!("{}", ApiKey::new(other)), "…", "{other}");
        }
        assert_eq!(format!("{}", ApiKey::new(&secret[3..])), "live_…");
    }

    #[test]
    fn digest_is_sha256_of_the_key() {
        // SHA-256("abc")
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex: String = KeyDigest::of("abc")
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, expected);
        assert_eq!(
            DigestScheme::from_version(DigestScheme::Sha256.version()),
            Some(DigestScheme::Sha256)
        );
        assert_eq!(DigestScheme::from_version(0), None);
    }

    proptest! {
        #[test]
        fn check_never_panics(candidate in ".{0,120}") {
            let format = KeyFormat::new("sk_live").unwrap();
            let _ = format.check(&candidate);
        }

        #[test]
        fn random_bodies_fail_the_checksum(body in "[0-9A-Za-z]{49}") {
            let format = KeyFormat::new("sk").unwrap();
            let candidate = format!("sk_{body}");
            // 1 in 2^32 random bodies would pass; proptest will not find one.
            prop_assert_eq!(format.check(&candidate), Err(KeyFormatError::BadChecksum));
        }

        #[test]
        fn any_single_character_change_is_caught(pos in 0usize..49, c in "[0-9A-Za-z]") {
            let format = KeyFormat::new("sk").unwrap();
            let key = format.generate();
            let mut s = key.expose_secret().to_owned();
            let at = 3 + pos;
            prop_assume!(&s[at..at + 1] != c.as_str());
            s.replace_range(at..at + 1, &c);
            prop_assert!(format.check(&s).is_err());
        }
    }
}

/// The stable public id of a key, e.g. `key_01JD3M7Q8X9ZB2C4E6G8J0K2M4`. It survives rotation and is
/// what provenance stamps record. New ids sort by creation time. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

/// The id the master key's principal carries.
pub(crate) const MASTER_KEY_ID: &str = "master";

impl KeyId {
    /// A new id: `key_` followed by a 26-character ULID (48-bit millisecond time + 80 random bits,
    /// Crockford base32), so ids sort by creation time.
    pub fn generate() -> Self {
        const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        getrandom::fill(&mut random).expect("the operating system's CSPRNG is unavailable");
        let mut value = u128::from(millis & 0xFFFF_FFFF_FFFF) << 80;
        for (i, b) in random.iter().enumerate() {
            value |= u128::from(*b) << (8 * (9 - i));
        }
        let mut id = String::with_capacity(30);
        id.push_str("key_");
        for i in (0..26).rev() {
            id.push(CROCKFORD[((value >> (5 * i)) & 31) as usize] as char);
        }
        Self(id.into())
    }

    /// Wraps an existing id (as read back from a store or a URL).
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(s.into()))
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let a = KeyId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = KeyId::generate();
        assert_ne!(a, b);
        assert!(a < b, "{a} < {b}");
        assert_eq!(a.as_str().len(), 30);
        assert!(a.as_str().starts_with("key_"));
    }
}
