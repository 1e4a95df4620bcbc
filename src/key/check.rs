//! Checking a candidate key: [`KeyFormat::check`], pure computation with no I/O (the hot path runs
//! its two halves separately).

use subtle::ConstantTimeEq;

use super::format::KeyFormat;
use super::shape::{
    CHECKSUM_LEN, KEYED_TAIL_LEN, KeyFormatError, PUBLIC_TAIL_LEN, TAG_LEN, base62_value,
    check_alphabet, encode_checksum,
};

impl KeyFormat {
    /// Checks a candidate's prefix, length, alphabet and checksum or tag. Pure computation, no I/O.
    pub fn check(&self, candidate: &str) -> Result<(), KeyFormatError> {
        self.check_shape(candidate.as_bytes())?;
        self.check_checksum(candidate.as_bytes())
    }

    /// Prefix, length and alphabet: what [`check`](Self::check) verifies before the checksum. On
    /// bytes: the layer has the presented key as checked visible ASCII, and need not make a `str`.
    pub(crate) fn check_shape(&self, bytes: &[u8]) -> Result<(), KeyFormatError> {
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

    /// The secret version of a keyed candidate that passed [`check_shape`](Self::check_shape):
    /// still accepted (not retired, not unknown). No HMAC: what the hot path checks before its
    /// per-thread front, whose entries are stored keys whose tag [`check_checksum`] verified when
    /// they entered it. Other candidates pass.
    ///
    /// [`check_checksum`]: Self::check_checksum
    #[inline]
    pub(crate) fn check_version(&self, bytes: &[u8]) -> Result<(), KeyFormatError> {
        let tail = bytes.len().saturating_sub(self.prefix.len() + 1);
        match &self.keyed {
            Some(keyed) if tail == KEYED_TAIL_LEN => match tag_version(bytes) {
                Some(version) if keyed.accepts(version) => Ok(()),
                _ => Err(KeyFormatError::UnknownSecretVersion),
            },
            _ => Ok(()),
        }
    }

    /// The checksum or tag of a candidate that passed [`check_shape`](Self::check_shape).
    pub(crate) fn check_checksum(&self, bytes: &[u8]) -> Result<(), KeyFormatError> {
        let tail = bytes.len().saturating_sub(self.prefix.len() + 1);
        match &self.keyed {
            Some(keyed) if tail == KEYED_TAIL_LEN => {
                let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
                let expected = tag_version(bytes)
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
}

/// The secret version a keyed key names: the character before its tag (the key is of the keyed
/// length, checked by the caller).
#[inline]
fn tag_version(bytes: &[u8]) -> Option<u8> {
    base62_value(bytes[bytes.len() - TAG_LEN - 1])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

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
