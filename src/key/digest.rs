//! [`KeyDigest`]: the SHA-256 digest of a key, the only form of it that is stored or cached, and
//! the [`DigestScheme`] it was computed under.

use std::fmt;

use sha2::{Digest as _, Sha256};

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
        Self::of_bytes(key.as_bytes())
    }

    /// [`of`](Self::of) for a key held as bytes (the layer's presented key).
    pub(crate) fn of_bytes(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
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
}
