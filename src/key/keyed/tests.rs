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
