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
mod tests {
    use proptest::prelude::*;
    use sha2::Digest as _;

    use super::super::shape::{BASE62, BODY_LEN, KEYED_TAIL_LEN, KeyFormatError, PUBLIC_TAIL_LEN};
    use super::*;

    /// HMAC-SHA-256 written out from its definition (RFC 2104) with plain SHA-256, truncated to
    /// 64 bits and encoded as 11 base62 digits: an independent statement of the tag.
    fn reference_tag(secret: &[u8], signed: &[u8]) -> String {
        let mut key = [0u8; 64];
        if secret.len() > 64 {
            key[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            key[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| key.map(|k| k ^ byte);
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(signed)
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        let mut value = u64::from_be_bytes(outer[..8].try_into().unwrap());
        let mut digits = vec![b'0'; TAG_LEN];
        for slot in digits.iter_mut().rev() {
            *slot = BASE62[(value % 62) as usize];
            value /= 62;
        }
        String::from_utf8(digits).unwrap()
    }

    fn secret(seed: u8) -> FormatSecret {
        FormatSecret::from_bytes(
            (0..32)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn keyed(versions: &[(u8, u8)]) -> KeyFormat {
        versions
            .iter()
            .fold(KeyFormat::keyed("sk_live"), |b, &(v, seed)| {
                b.secret(v, secret(seed))
            })
            .build()
            .unwrap()
    }

    #[test]
    fn keyed_keys_have_the_documented_layout() {
        let format = keyed(&[(1, 1), (7, 2)]);
        let key = format.generate();
        let s = key.expose_secret();
        assert_eq!(s.len(), "sk_live_".len() + KEYED_TAIL_LEN);
        assert_eq!(format.key_len(), s.len());
        assert!(
            s["sk_live_".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        );
        // the highest version tags new keys; its character follows the body
        assert_eq!(format.minting_version(), Some(7));
        let (signed, tag) = s.split_at(s.len() - TAG_LEN);
        assert_eq!(&signed[signed.len() - 1..], "7");
        assert_eq!(
            tag,
            reference_tag(secret(2).expose_secret(), signed.as_bytes())
        );
        assert_eq!(format.check(s), Ok(()));
        assert!(format.is_keyed());
        assert_eq!(format.accepted_versions(), vec![1, 7]);
        assert_eq!(
            format.mask(&key).unwrap().chars().count(),
            "sk_live_".len() + 9
        );
    }

    #[test]
    fn versions_rotate_and_retire() {
        let v1 = keyed(&[(1, 1)]).generate();
        let rotated = keyed(&[(1, 1), (2, 2)]);
        assert_eq!(
            rotated.check(v1.expose_secret()),
            Ok(()),
            "v1 keys survive adding v2"
        );
        let v2 = rotated.generate();
        assert_eq!(&v2.expose_secret()[8 + BODY_LEN..9 + BODY_LEN], "2");
        let retired = KeyFormat::keyed("sk_live")
            .secret(1, secret(1))
            .secret(2, secret(2))
            .retire(1)
            .build()
            .unwrap();
        assert_eq!(
            retired.check(v1.expose_secret()),
            Err(KeyFormatError::UnknownSecretVersion)
        );
        assert_eq!(retired.check(v2.expose_secret()), Ok(()));
        // a pinned minting version keeps tagging with 1 while 2 is accepted already
        let pinned = KeyFormat::keyed("sk_live")
            .secret(1, secret(1))
            .secret(2, secret(2))
            .mint_with(1)
            .build()
            .unwrap();
        assert_eq!(pinned.minting_version(), Some(1));
        assert_eq!(
            keyed(&[(1, 1)]).check(pinned.generate().expose_secret()),
            Ok(())
        );
    }

    #[test]
    fn legacy_keys_are_told_apart_by_length_and_follow_the_policy() {
        let public = KeyFormat::new("sk_live").unwrap();
        let legacy = public.generate();
        assert_eq!(legacy.expose_secret().len(), 8 + PUBLIC_TAIL_LEN);
        let refusing = keyed(&[(1, 1)]);
        assert!(!refusing.accepts_legacy());
        assert_eq!(
            refusing.check(legacy.expose_secret()),
            Err(KeyFormatError::LegacyFormat)
        );
        let accepting = KeyFormat::keyed("sk_live")
            .secret(1, secret(1))
            .accept_legacy(true)
            .build()
            .unwrap();
        assert_eq!(accepting.check(legacy.expose_secret()), Ok(()));
        // an accepted legacy key still has its checksum checked
        let mut typo = legacy.expose_secret().to_owned();
        let c = if &typo[12..13] == "a" { "b" } else { "a" };
        typo.replace_range(12..13, c);
        assert_eq!(accepting.check(&typo), Err(KeyFormatError::BadChecksum));
        let mut garbage = legacy.expose_secret().to_owned();
        garbage.replace_range(12..13, "-");
        assert_eq!(accepting.check(&garbage), Err(KeyFormatError::BadCharacter));
        // the public format does not know keyed keys, and no other length passes either
        let keyed_key = accepting.generate();
        assert_eq!(
            public.check(keyed_key.expose_secret()),
            Err(KeyFormatError::WrongLength)
        );
        for len in (0..70).filter(|l| ![PUBLIC_TAIL_LEN, KEYED_TAIL_LEN].contains(l)) {
            let candidate = format!("sk_live_{}", "a".repeat(len));
            assert_eq!(
                accepting.check(&candidate),
                Err(KeyFormatError::WrongLength),
                "{len}"
            );
        }
    }

    #[test]
    fn builder_refuses_what_cannot_work() {
        let err = |b: KeyedFormatBuilder| b.build().unwrap_err();
        assert!(matches!(
            err(KeyFormat::keyed("sk")),
            KeyFormatConfigError::NoSecret
        ));
        assert!(matches!(
            err(KeyFormat::keyed("sk").secret(1, secret(1)).retire(1)),
            KeyFormatConfigError::NoSecret
        ));
        for bad in [0, 62, 255] {
            assert!(matches!(
                err(KeyFormat::keyed("sk").secret(bad, secret(1))),
                KeyFormatConfigError::VersionOutOfRange(v) if v == bad
            ));
        }
        assert!(matches!(
            err(KeyFormat::keyed("sk")
                .secret(3, secret(1))
                .secret(3, secret(2))),
            KeyFormatConfigError::DuplicateVersion(3)
        ));
        assert!(matches!(
            err(KeyFormat::keyed("sk").secret(1, secret(1)).mint_with(2)),
            KeyFormatConfigError::MintingVersionNotAccepted(2)
        ));
        assert!(matches!(
            err(KeyFormat::keyed("SK").secret(1, secret(1))),
            KeyFormatConfigError::InvalidPrefix(_)
        ));
        assert!(matches!(
            FormatSecret::from_bytes(vec![7u8; 31]),
            Err(KeyFormatConfigError::SecretTooShort(31))
        ));
        assert!(KeyFormat::keyed("sk").secret(61, secret(1)).build().is_ok());
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let raw = secret(9);
        let hex: String = raw
            .expose_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let list = format!("{:?}", raw.expose_secret());
        let builder = KeyFormat::keyed("sk")
            .secret(1, raw.clone())
            .secret(1, raw.clone());
        let shown = [
            format!("{raw:?}"),
            format!("{builder:?}"),
            format!("{:?}", keyed(&[(1, 9)])),
            format!("{}", builder.build().unwrap_err()),
        ];
        for shown in shown {
            assert!(!shown.contains(&hex) && !shown.contains(&list), "{shown}");
            assert!(!shown.contains(&list[1..20]), "{shown}");
        }
        assert_eq!(format!("{raw:?}"), "FormatSecret(..)");
        assert_eq!(
            format!("{:?}", keyed(&[(1, 9), (2, 3)])),
            "KeyFormat { prefix: \"sk_live\", check: HmacSha256 { versions: [1, 2], minting: 2, legacy: false } }"
        );
    }

    #[test]
    fn formats_compare_by_secrets_in_constant_time() {
        assert_eq!(keyed(&[(1, 1)]), keyed(&[(1, 1)]));
        assert_ne!(keyed(&[(1, 1)]), keyed(&[(1, 2)]));
        assert_ne!(keyed(&[(1, 1)]), keyed(&[(2, 1)]));
        assert_ne!(keyed(&[(1, 1)]), KeyFormat::new("sk_live").unwrap());
        assert_ne!(FormatSecret::generate(), FormatSecret::generate());
    }

    proptest! {
        /// A tag verifies iff it was made with the accepted secret for the version the key names.
        #[test]
        fn a_tag_verifies_iff_made_with_the_right_secret_and_version(
            body in "[0-9A-Za-z]{43}",
            accepted in 1u8..=61,
            (same_version, other_version) in (any::<bool>(), 1u8..=61),
            own_seed in any::<u8>(),
            (same_secret, other_seed) in (any::<bool>(), any::<u8>()),
        ) {
            // Half the cases use the right version, half the right secret (the others may match too).
            let version = if same_version { accepted } else { other_version };
            let used_seed = if same_secret { own_seed } else { other_seed };
            let format = keyed(&[(accepted, own_seed)]);
            let signed = format!("sk_live_{body}{}", BASE62[usize::from(version)] as char);
            let candidate = format!(
                "{signed}{}",
                reference_tag(secret(used_seed).expose_secret(), signed.as_bytes())
            );
            let expected = if version != accepted {
                Err(KeyFormatError::UnknownSecretVersion)
            } else if used_seed == own_seed {
                Ok(())
            } else {
                Err(KeyFormatError::BadChecksum)
            };
            prop_assert_eq!(format.check(&candidate), expected);
        }

        /// Any single-character change anywhere after the prefix is refused: body, version, tag.
        #[test]
        fn any_single_character_change_is_refused(pos in 0usize..KEYED_TAIL_LEN, c in "[0-9A-Za-z]") {
            let format = keyed(&[(1, 1), (2, 2)]);
            let key = format.generate();
            let mut s = key.expose_secret().to_owned();
            let at = "sk_live_".len() + pos;
            prop_assume!(&s[at..at + 1] != c.as_str());
            s.replace_range(at..at + 1, &c);
            prop_assert!(format.check(&s).is_err());
        }

        #[test]
        fn keyed_check_never_panics(candidate in ".{0,120}", legacy in any::<bool>()) {
            let format = KeyFormat::keyed("sk_live")
                .secret(1, secret(1))
                .accept_legacy(legacy)
                .build()
                .unwrap();
            let _ = format.check(&candidate);
        }
    }
}
