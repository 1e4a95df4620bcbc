//! What a key looks like: the lengths of its parts, the base62 alphabet, the prefix rule, and
//! why a string is not a key ([`KeyFormatError`]).

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
/// Longest prefix accepted by [`KeyFormat::new`](crate::key::KeyFormat::new).
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest candidate of any format; anything longer is refused before any work.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 1 + KEYED_TAIL_LEN;

pub(super) const BASE62: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

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

/// Why a prefix was refused by [`KeyFormat::new`](crate::key::KeyFormat::new).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid key prefix {0:?}: use 1 to 32 characters of [a-z0-9] in segments joined by single '_'"
)]
pub struct InvalidPrefix(pub String);

/// Every byte in the base62 alphabet. A branch-free fold over all of them vectorises; an early-exit
/// `all` (over a `chain`) costs several times more on this hot path.
pub(super) fn check_alphabet(tail: &[u8]) -> Result<(), KeyFormatError> {
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
pub(super) fn base62_value(c: u8) -> Option<u8> {
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

pub(super) fn mask(key: &str, prefix_len: usize) -> String {
    let body = &key[prefix_len + 1..];
    format!(
        "{}_{}…{}",
        &key[..prefix_len],
        &body[..4],
        &body[body.len() - 4..]
    )
}

pub(super) fn encode_checksum(value: u32) -> [u8; CHECKSUM_LEN] {
    encode_base62(u64::from(value))
}

/// `value` in `N` base62 digits, most significant first (fixed width: leading zeros).
pub(super) fn encode_base62<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}
