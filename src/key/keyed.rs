//! The keyed format's secrets: [`FormatSecret`], the accepted versions, and [`KeyedFormatBuilder`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::KeyFormat;
use super::shape::{InvalidPrefix, TAG_LEN, encode_base62, is_valid_prefix};

/// Highest secret version: versions are one base62 character, `1` to `z` (`0` is never issued).
pub const MAX_SECRET_VERSION: u8 = 61;

/// A secret the keyed format tags keys with (HMAC-SHA-256 key, at least 32 bytes).
///
/// `Debug` shows nothing of it, there is no `Display`, and its bytes are zeroed when it is dropped.
/// It is meant to stay in the process and in the key store: only a [`KeyStore`](crate::store::KeyStore) implementation has a
/// reason to call [`expose_secret`](Self::expose_secret).
#[derive(Clone)]
pub struct FormatSecret(Zeroizing<Vec<u8>>);

impl FormatSecret {
    /// Shortest secret accepted, in bytes (the HMAC-SHA-256 security level).
    pub const MIN_LEN: usize = 32;

    /// 32 bytes from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide random bytes.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new(vec![0u8; Self::MIN_LEN]);
        getrandom::fill(&mut bytes).expect("the operating system's CSPRNG is unavailable");
        Self(bytes)
    }

    /// Wraps secret bytes (at least [`MIN_LEN`](Self::MIN_LEN) of them), for example read from a
    /// secret manager.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, KeyFormatConfigError> {
        let bytes = Zeroizing::new(bytes.into());
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyFormatConfigError::SecretTooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// The raw bytes, for a [`KeyStore`](crate::store::KeyStore) to write them. Never log them.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for FormatSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FormatSecret(..)")
    }
}

impl PartialEq for FormatSecret {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for FormatSecret {}

/// Why a keyed format could not be built. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFormatConfigError {
    /// The prefix is not valid (see [`KeyFormat::new`]).
    #[error(transparent)]
    InvalidPrefix(#[from] InvalidPrefix),
    /// No secret is left to tag keys with (none given, or every one retired).
    #[error("a keyed key format needs at least one secret that is not retired")]
    NoSecret,
    /// A secret version outside `1..=61`.
    #[error("secret version {0} is outside 1..={MAX_SECRET_VERSION}")]
    VersionOutOfRange(u8),
    /// Two secrets for one version (given twice, or given and also found in the store).
    #[error("secret version {0} is given twice")]
    DuplicateVersion(u8),
    /// The version pinned for minting is not among the accepted ones.
    #[error("secret version {0} is pinned for minting but is not accepted")]
    MintingVersionNotAccepted(u8),
    /// A secret shorter than [`FormatSecret::MIN_LEN`] bytes (the length is shown, not the secret).
    #[error("a format secret needs at least {min} bytes, got {0}", min = FormatSecret::MIN_LEN)]
    SecretTooShort(usize),
}

/// One accepted secret version, with its HMAC state keyed once (cloned per check).
struct Accepted {
    version: u8,
    secret: FormatSecret,
    mac: Hmac<Sha256>,
}

/// What a keyed [`KeyFormat`] holds.
pub(crate) struct Keyed {
    /// Sorted by version, no duplicates, never empty.
    accepted: Vec<Accepted>,
    minting: u8,
    legacy: bool,
    /// For a format loaded from a key store: the builder as it was given (prefix, its own secrets
    /// and retirements, pinned minting version, legacy setting), before the store's secrets were
    /// added; what [`KeyFormat::reload_from`] rebuilds it from.
    recipe: Option<KeyedFormatBuilder>,
}

impl Keyed {
    /// The builder this format was loaded from a store with (`None`: not loaded from a store).
    pub(crate) fn recipe(&self) -> Option<&KeyedFormatBuilder> {
        self.recipe.as_ref()
    }

    pub(crate) fn minting(&self) -> u8 {
        self.minting
    }

    pub(crate) fn legacy(&self) -> bool {
        self.legacy
    }

    pub(crate) fn versions(&self) -> Vec<u8> {
        self.accepted.iter().map(|a| a.version).collect()
    }

    /// Whether keys of secret `version` are accepted.
    #[inline]
    pub(crate) fn accepts(&self, version: u8) -> bool {
        self.accepted.iter().any(|a| a.version == version)
    }

    /// The tag of `signed` (everything before the tag) under secret `version`, if it is accepted.
    pub(crate) fn tag(&self, version: u8, signed: &[u8]) -> Option<[u8; TAG_LEN]> {
        let accepted = self.accepted.iter().find(|a| a.version == version)?;
        let mac = accepted
            .mac
            .clone()
            .chain_update(signed)
            .finalize()
            .into_bytes();
        let first: [u8; 8] = mac[..8].try_into().expect("32 bytes");
        Some(encode_base62(u64::from_be_bytes(first)))
    }
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        self.minting == other.minting
            && self.legacy == other.legacy
            && self.accepted.len() == other.accepted.len()
            && self
                .accepted
                .iter()
                .zip(&other.accepted)
                .all(|(a, b)| a.version == b.version && a.secret == b.secret)
    }
}

impl fmt::Debug for Keyed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacSha256")
            .field("versions", &self.versions())
            .field("minting", &self.minting)
            .field("legacy", &self.legacy)
            .finish()
    }
}

/// Builds a keyed [`KeyFormat`]; see [`KeyFormat::keyed`].
///
/// Secrets come from [`secret`](Self::secret) (yours, for example from a secret manager), from the key
/// store ([`load_secret_from`](Self::load_secret_from)), or both (distinct versions). New keys are
/// tagged with the highest accepted version unless [`mint_with`](Self::mint_with) pins one.
///
/// Legacy (public-checksum) keys: accepted if [`accept_legacy`](Self::accept_legacy) says so;
/// otherwise, for a format loaded from a store, if that store already held keys when its first
/// secret was created (its record, changed with [`KeyStore::set_legacy_keys`](crate::store::KeyStore::set_legacy_keys)); otherwise refused.
///
/// ```
/// use tower_api_keys::key::{FormatSecret, KeyFormat};
///
/// let v1 = FormatSecret::generate();
/// let old = KeyFormat::keyed("sk_live").secret(1, v1.clone()).build().unwrap();
/// let key = old.generate();
///
/// // Rotation: version 2 tags new keys, version 1 keys keep working...
/// let rotated = KeyFormat::keyed("sk_live")
///     .secret(1, v1.clone())
///     .secret(2, FormatSecret::generate())
///     .build()
///     .unwrap();
/// assert_eq!(rotated.minting_version(), Some(2));
/// assert!(rotated.check(key.expose_secret()).is_ok());
///
/// // ...until version 1 is retired.
/// let without_v1 = KeyFormat::keyed("sk_live")
///     .secret(1, v1)
///     .secret(2, FormatSecret::generate())
///     .retire(1)
///     .build()
///     .unwrap();
/// assert!(without_v1.check(key.expose_secret()).is_err());
/// ```
#[must_use]
#[derive(Clone)]
pub struct KeyedFormatBuilder {
    prefix: String,
    secrets: Vec<(u8, FormatSecret)>,
    retired: BTreeSet<u8>,
    legacy: Option<bool>,
    mint: Option<u8>,
}

impl fmt::Debug for KeyedFormatBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFormatBuilder")
            .field("prefix", &self.prefix)
            .field(
                "versions",
                &self.secrets.iter().map(|(v, _)| v).collect::<Vec<_>>(),
            )
            .field("retired", &self.retired)
            .field("legacy", &self.legacy)
            .field("mint", &self.mint)
            .finish()
    }
}

impl KeyedFormatBuilder {
    pub(super) fn new(prefix: String) -> Self {
        Self {
            prefix,
            secrets: Vec::new(),
            retired: BTreeSet::new(),
            legacy: None,
            mint: None,
        }
    }

    /// Accepts keys tagged by `secret` as `version` (1 to 61).
    pub fn secret(mut self, version: u8, secret: FormatSecret) -> Self {
        self.secrets.push((version, secret));
        self
    }

    /// Refuses keys tagged by `version`, whether given here or found in the store.
    pub fn retire(mut self, version: u8) -> Self {
        self.retired.insert(version);
        self
    }

    /// Accepts keys of the public (CRC32) format (`true`) or refuses them (`false`), whatever the
    /// store recorded.
    pub fn accept_legacy(mut self, accept: bool) -> Self {
        self.legacy = Some(accept);
        self
    }

    /// Tags new keys with `version` instead of the highest accepted one (for example while a fleet
    /// rolls out a new version, so that no instance mints keys another one cannot check yet).
    pub fn mint_with(mut self, version: u8) -> Self {
        self.mint = Some(version);
        self
    }

    /// The format, from the secrets given with [`secret`](Self::secret). Legacy keys are refused
    /// unless [`accept_legacy`](Self::accept_legacy) says otherwise.
    pub fn build(self) -> Result<KeyFormat, KeyFormatConfigError> {
        let legacy = self.legacy.unwrap_or(false);
        self.finish(legacy, None)
    }

    /// Whether the prefix is valid (checked before a store is asked for secrets).
    pub(crate) fn check_prefix(&self) -> Result<(), KeyFormatConfigError> {
        if is_valid_prefix(&self.prefix) {
            Ok(())
        } else {
            Err(InvalidPrefix(self.prefix.clone()).into())
        }
    }

    /// The format, with `stored` secrets (`(version, secret, retired)`) added to those given here;
    /// `stored_legacy` applies unless [`accept_legacy`](Self::accept_legacy) said otherwise. What
    /// [`load_secret_from`](Self::load_secret_from) finishes with.
    pub(crate) fn build_with_stored(
        mut self,
        stored: impl IntoIterator<Item = (u8, FormatSecret, bool)>,
        stored_legacy: bool,
    ) -> Result<KeyFormat, KeyFormatConfigError> {
        let recipe = self.clone();
        for (version, secret, retired) in stored {
            if retired {
                self.retired.insert(version);
            }
            self.secrets.push((version, secret));
        }
        let legacy = self.legacy.unwrap_or(stored_legacy);
        self.finish(legacy, Some(recipe))
    }

    fn finish(
        self,
        legacy: bool,
        recipe: Option<KeyedFormatBuilder>,
    ) -> Result<KeyFormat, KeyFormatConfigError> {
        if !is_valid_prefix(&self.prefix) {
            return Err(InvalidPrefix(self.prefix).into());
        }
        let mut accepted: Vec<Accepted> = Vec::with_capacity(self.secrets.len());
        let mut seen = BTreeSet::new();
        for (version, secret) in self.secrets {
            if !(1..=MAX_SECRET_VERSION).contains(&version) {
                return Err(KeyFormatConfigError::VersionOutOfRange(version));
            }
            if !seen.insert(version) {
                return Err(KeyFormatConfigError::DuplicateVersion(version));
            }
            if !self.retired.contains(&version) {
                let mac = secret.mac();
                accepted.push(Accepted {
                    version,
                    secret,
                    mac,
                });
            }
        }
        accepted.sort_by_key(|a| a.version);
        let highest = accepted
            .last()
            .map(|a| a.version)
            .ok_or(KeyFormatConfigError::NoSecret)?;
        let minting = match self.mint {
            None => highest,
            Some(v) if accepted.iter().any(|a| a.version == v) => v,
            Some(v) => return Err(KeyFormatConfigError::MintingVersionNotAccepted(v)),
        };
        Ok(KeyFormat::from_keyed(
            Arc::from(self.prefix),
            Keyed {
                accepted,
                minting,
                legacy,
                recipe,
            },
        ))
    }
}

#[cfg(test)]
mod tests;
