//! [`KeyFormat`]: the shape of keys a service issues and accepts, and how a key of it is masked
//! for listings. Generating and checking keys are beside it (`generate.rs`, `check.rs`).

use std::fmt;
use std::sync::Arc;

use super::api_key::ApiKey;
use super::keyed::{self, KeyedFormatBuilder};
use super::shape::{InvalidPrefix, KEYED_TAIL_LEN, PUBLIC_TAIL_LEN, is_valid_prefix, mask};

/// The shape of keys a service issues and accepts: a prefix such as `sk_live`, and either the public
/// CRC32 checksum ([`new`](Self::new)) or a keyed tag ([`keyed`](Self::keyed)); see the
/// [module docs](crate::key) for the layouts and the trade-off.
///
/// Cheap to clone. `Debug` shows the prefix, the secret versions and the legacy policy, never a
/// secret.
#[derive(Clone)]
pub struct KeyFormat {
    pub(super) prefix: Arc<str>,
    pub(super) keyed: Option<Arc<keyed::Keyed>>,
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

    pub(super) fn tail_len(&self) -> usize {
        if self.keyed.is_some() {
            KEYED_TAIL_LEN
        } else {
            PUBLIC_TAIL_LEN
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
