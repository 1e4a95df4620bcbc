//! [`ApiKey`]: a plaintext key, redacted in `Debug` and `Display` and zeroed when dropped.

use std::fmt;

use subtle::ConstantTimeEq;

use super::digest::KeyDigest;
use super::shape::{KEYED_TAIL_LEN, PUBLIC_TAIL_LEN, is_valid_prefix};

/// A plaintext key. It is shown to its holder once and never stored; `Debug` and `Display` redact it,
/// and its memory is zeroed when it is dropped.
#[derive(Clone)]
pub struct ApiKey(pub(super) zeroize::Zeroizing<String>);

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

#[cfg(test)]
mod tests {
    use super::super::format::KeyFormat;
    use super::*;

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
}
