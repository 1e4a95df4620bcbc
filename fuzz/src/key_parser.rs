//! `KeyFormat::new`, `KeyFormat::check`, `KeyFormat::mask`, digests and the redacted `Debug` /
//! `Display` of `ApiKey`, against a model of the documented format:
//! `<prefix>_<43 base62 characters><6 base62 characters of CRC32(everything before them)>`.

use sha2::{Digest as _, Sha256};
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat};
use tower_api_keys::key::{BODY_LEN, CHECKSUM_LEN, KeyFormatError, MAX_PREFIX_LEN};

use super::input::Input;

const PREFIXES: [&str; 5] = [
    "sk",
    "sk_live",
    "a1_b2_c3",
    "x",
    "abcdefghijklmnopqrstuvwxyz_01234",
];
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Input: a mode byte, then (mode bit 0) an arbitrary prefix as a length-prefixed chunk, or a byte
/// choosing a fixed one; the rest builds the candidate: raw, after `<prefix>_`, signed with a correct
/// checksum, or one byte of a correctly signed key changed.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let prefix = if mode & 1 == 1 {
        String::from_utf8_lossy(input.chunk()).into_owned()
    } else {
        PREFIXES[input.below(PREFIXES.len())].to_owned()
    };
    let format = match KeyFormat::new(prefix.as_str()) {
        Ok(format) => {
            assert!(prefix_is_valid(&prefix), "accepted prefix {prefix:?}");
            assert_eq!(format.prefix(), prefix);
            assert_eq!(format.key_len(), prefix.len() + 1 + BODY_LEN + CHECKSUM_LEN);
            format
        }
        Err(error) => {
            assert!(!prefix_is_valid(&prefix), "refused prefix {prefix:?}");
            assert_eq!(error.0, prefix);
            KeyFormat::default()
        }
    };
    let prefix = format.prefix();
    let rest = String::from_utf8_lossy(input.rest());
    let candidate = match (mode >> 1) % 4 {
        0 => rest.into_owned(),
        1 => format!("{prefix}_{rest}"),
        2 => sign(&format!("{prefix}_{rest}")),
        _ => {
            // A signed key with one character replaced (the first two bytes of `rest` say where
            // and by what); the model says whether the result is still valid.
            let body: String = rest
                .bytes()
                .skip(2)
                .map(|b| char::from(BASE62[usize::from(b) % 62]))
                .chain(std::iter::repeat('Q'))
                .take(BODY_LEN)
                .collect();
            let mut key = sign(&format!("{prefix}_{body}")).into_bytes();
            let (at, by) = (rest.as_bytes().first(), rest.as_bytes().get(1));
            if let (Some(&at), Some(&by)) = (at, by) {
                let at = usize::from(at) % key.len();
                key[at] = by;
            }
            String::from_utf8_lossy(&key).into_owned()
        }
    };
    check_candidate(&format, &candidate);
    check_redaction(&candidate);
}

/// `[a-z0-9]+` segments joined by single `_`, 1 to 32 bytes.
fn prefix_is_valid(prefix: &str) -> bool {
    (1..=MAX_PREFIX_LEN).contains(&prefix.len())
        && prefix.split('_').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// `signed` followed by its base62 CRC32, as the format defines it.
pub fn sign(signed: &str) -> String {
    let mut value = crc32fast::hash(signed.as_bytes());
    let mut digits = [0u8; CHECKSUM_LEN];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(value % 62) as usize];
        value /= 62;
    }
    format!("{signed}{}", std::str::from_utf8(&digits).unwrap())
}

/// What `check` must answer, from the format's definition.
fn model(prefix: &str, candidate: &str) -> Result<(), KeyFormatError> {
    let Some(rest) = candidate
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
    else {
        return Err(KeyFormatError::WrongPrefix);
    };
    if rest.len() != BODY_LEN + CHECKSUM_LEN {
        return Err(KeyFormatError::WrongLength);
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::BadCharacter);
    }
    if sign(&candidate[..candidate.len() - CHECKSUM_LEN]) != candidate {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(())
}

fn check_candidate(format: &KeyFormat, candidate: &str) {
    let verdict = format.check(candidate);
    assert_eq!(verdict, model(format.prefix(), candidate), "{candidate:?}");

    let key = ApiKey::new(candidate);
    assert!(key == ApiKey::new(candidate.to_owned()));
    assert!(key != ApiKey::new(format!("{candidate}0")));

    // The digest is SHA-256 of the whole key string, whichever way it is computed.
    let digest = key.digest();
    let expected: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
    assert_eq!(digest.as_bytes(), &expected);
    assert!(digest == KeyDigest::of(candidate));
    assert!(digest != KeyDigest::of(&format!("{candidate}0")));
    assert_eq!(format!("{digest:?}"), "KeyDigest(..)");

    match format.mask(&key) {
        Some(masked) => {
            assert!(verdict.is_ok());
            let body = &candidate[format.prefix().len() + 1..];
            assert_eq!(
                masked,
                format!(
                    "{}_{}…{}",
                    format.prefix(),
                    &body[..4],
                    &body[body.len() - 4..]
                )
            );
            assert!(!masked.contains(&body[4..body.len() - 4]));
        }
        None => assert!(verdict.is_err()),
    }
}

/// `Debug` and `Display` of an `ApiKey` show at most the prefix of something shaped like a key: the
/// 49 characters of body and checksum stay hidden, and a secret of any other shape (a master key from
/// configuration, a typo) shows nothing at all.
fn check_redaction(secret: &str) {
    let key = ApiKey::new(secret);
    let display = key.to_string();
    let shown = display
        .strip_suffix('…')
        .unwrap_or_else(|| panic!("{display:?}"));
    assert_eq!(format!("{key:?}"), format!("ApiKey(\"{shown}…\")"));
    if shown.is_empty() {
        return;
    }
    let prefix = shown
        .strip_suffix('_')
        .unwrap_or_else(|| panic!("{shown:?} is not a prefix"));
    assert!(prefix_is_valid(prefix), "{shown:?} is not a prefix");
    let hidden = secret
        .strip_prefix(shown)
        .unwrap_or_else(|| panic!("{shown:?} is not where {secret:?} starts"));
    assert_eq!(hidden.len(), BODY_LEN + CHECKSUM_LEN, "shows {shown:?}");
    assert!(
        hidden.bytes().all(|b| b.is_ascii_alphanumeric()),
        "shows {shown:?}"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_keys_satisfy_the_model() {
        let format = tower_api_keys::key::KeyFormat::new("sk_live").unwrap();
        let key = format.generate();
        assert_eq!(super::model("sk_live", key.expose_secret()), Ok(()));
    }
}
