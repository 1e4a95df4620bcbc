//! The key format's regular expression (`KeyFormat::scanner_pattern`, documented in the README for
//! registering with secret scanners) matches every generated key of both formats, in text as a
//! scanner sees it, and none of a corpus of other well-known token shapes.

use regex::Regex;
use tower_api_keys::key::{FormatSecret, KeyFormat};

fn formats() -> Vec<KeyFormat> {
    let keyed = |legacy| {
        KeyFormat::keyed("sk_live")
            .secret(1, FormatSecret::generate())
            .secret(7, FormatSecret::generate())
            .accept_legacy(legacy)
            .build()
            .unwrap()
    };
    vec![
        KeyFormat::default(),
        KeyFormat::new("sk_live").unwrap(),
        KeyFormat::new("acme_prod_v2").unwrap(),
        keyed(false),
        keyed(true),
    ]
}

/// Other vendors' token shapes (made-up values of the documented shapes).
fn corpus() -> Vec<String> {
    let a = |n: usize| "aB3".repeat(n).chars().take(n).collect::<String>();
    vec![
        format!("ghp_{}", a(36)),
        format!("gho_{}", a(36)),
        format!("github_pat_{}_{}", a(22), a(59)),
        "AKIAIOSFODNN7EXAMPLE".into(),
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        format!("sk_live_{}", a(24)),
        format!("sk_live_51{}", a(97)),
        format!("rk_live_{}", a(24)),
        format!("sk_test_{}", a(99)),
        format!("pk_live_{}", a(49)),
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
        "xoxp-123456789012-123456789012-123456789012-0123456789abcdef0123456789abcdef".into(),
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U".into(),
        format!("AIza{}", a(35)),
        format!("glpat-{}", a(20)),
        format!("npm_{}", a(36)),
        format!("sk-proj-{}", a(48)),
        format!("sk-ant-api03-{}", a(95)),
        format!("SG.{}.{}", a(22), a(43)),
        format!("whsec_{}", a(32)),
        // Our shape, one character short or long, or glued into a longer word.
        format!("sk_{}", a(48)),
        format!("sk_{}", a(50)),
        format!("sk_live_{}", a(54)),
        format!("sk_live_{}", a(56)),
        format!("xsk_{}", a(49)),
    ]
}

#[test]
fn the_pattern_matches_every_generated_key_in_text() {
    for format in formats() {
        let pattern = Regex::new(&format.scanner_pattern()).unwrap();
        for _ in 0..500 {
            let key = format.generate();
            let secret = key.expose_secret();
            for text in [
                secret.to_owned(),
                format!("API_KEY={secret}\n"),
                format!("{{\"key\": \"{secret}\"}}"),
                format!("curl -H 'X-Api-Key: {secret}' https://api.example.com"),
            ] {
                let found = pattern.find(&text).map(|m| m.as_str());
                assert_eq!(found, Some(secret), "{format:?} in {}", format.prefix());
            }
        }
    }
}

#[test]
fn the_pattern_matches_none_of_the_other_token_shapes() {
    for format in formats() {
        let pattern = Regex::new(&format.scanner_pattern()).unwrap();
        for token in corpus() {
            assert!(
                !pattern.is_match(&token),
                "{} matches {token}",
                format.scanner_pattern()
            );
            assert!(format.check(&token).is_err(), "{token}");
        }
    }
}

#[test]
fn the_documented_patterns_are_these() {
    assert_eq!(
        KeyFormat::new("sk_live").unwrap().scanner_pattern(),
        r"\bsk_live_[0-9A-Za-z]{49}\b"
    );
    let keyed = KeyFormat::keyed("sk_live")
        .secret(1, FormatSecret::generate())
        .build()
        .unwrap();
    assert_eq!(
        keyed.scanner_pattern(),
        r"\bsk_live_[0-9A-Za-z]{43}[1-9A-Za-z][0-9A-Za-z]{11}\b"
    );
    // The README shows the same patterns.
    let readme = include_str!("../README.md");
    assert!(readme.contains(r"\bsk_live_[0-9A-Za-z]{49}\b"));
    assert!(readme.contains(r"\bsk_live_[0-9A-Za-z]{43}[1-9A-Za-z][0-9A-Za-z]{11}\b"));
}
