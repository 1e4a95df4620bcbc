//! Replays the fuzz seed corpus (`fuzz/seeds/<target>/`) and every input the fuzzers found
//! (`fuzz/regressions/<target>/`) through the invariant checks the fuzz targets run, on stable Rust,
//! under `cargo test`. The checks live in the fuzz crate and are included here by path.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(dir)
            .join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("{}", path.display());
            check(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no inputs for {target}");
}

#[test]
fn key_parser_inputs() {
    replay("key_parser", checks::key_parser::check);
}

#[test]
fn header_extraction_inputs() {
    replay("header_extraction", checks::header_extraction::check);
}

#[test]
fn scope_parsing_inputs() {
    replay("scope_parsing", checks::scope_parsing::check);
}

#[test]
fn provenance_stamping_inputs() {
    replay("provenance_stamping", checks::provenance_stamping::check);
}

/// Found by `key_parser` (its redaction invariant, on the seed `sk_live_abc`): `Debug` and `Display`
/// of an `ApiKey` showed everything before the last `_` when that was at most 32 characters, so a
/// master key from configuration such as `my_super_secret_master_key_value` printed as
/// `ApiKey("my_super_secret_master_key_…")`. Only a key-shaped string shows its prefix now.
#[test]
fn a_secret_not_shaped_like_a_key_shows_nothing() {
    use tower_api_keys::key::{ApiKey, KeyFormat};
    for secret in ["my_super_secret_master_key_value", "sk_live_abc", "a_b"] {
        let key = ApiKey::new(secret);
        assert_eq!(format!("{key:?}"), "ApiKey(\"…\")");
        assert_eq!(key.to_string(), "…");
    }
    let key = KeyFormat::new("sk_live").unwrap().generate();
    assert_eq!(format!("{key:?}"), "ApiKey(\"sk_live_…\")");
}
