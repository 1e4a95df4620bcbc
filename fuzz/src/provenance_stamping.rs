//! `ProvenanceLayer::stamp` (what the `ProvenanceLayer` layer runs on a buffered body) against serde_json.
//!
//! - Not UTF-8, not JSON by serde_json's reading, or JSON but not an object: `Ok(None)`, never stamped.
//! - A JSON object with a top-level member equal to the metadata field under case folding beside
//!   another one or not spelt exactly, or a member equal to the stamp field under case folding
//!   anywhere but directly in the (exact) metadata object under its exact name (or as the
//!   metadata member itself, should both fields have one name): `REQUEST_AMBIGUOUS_METADATA`.
//! - A JSON object whose metadata member is neither an object nor null: `REQUEST_INVALID_METADATA`.
//! - Any other JSON object: stamped, and the stamped body, read by serde_json member by member with
//!   every value as raw text, is the input with exactly the stamp changed: other top-level members
//!   and other metadata members byte for byte the same and in the same order, the first stamp member
//!   set to the key id, later duplicates gone, a missing or null metadata member made an object.
//! - Stamping a stamped body changes nothing.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tower_api_keys::error::ErrorCode;
use tower_api_keys::key::KeyId;
use tower_api_keys::provenance::ProvenanceLayer;

use super::input::Input;

const META: [&str; 4] = ["meta_data", "m", "é\"\\", "BLNK_GENERATED_BY"];
const STAMP: [&str; 4] = ["BLNK_GENERATED_BY", "by", "x\u{1}\n", "meta_data"];
const KEY_IDS: [&str; 4] = [
    "key_01JD3M7Q8X9ZB2C4E6G8J0K2M4",
    "k\"\\\u{2028}é",
    "",
    "\u{0}\u{1f}</script>",
];

/// Input: a byte choosing the field names, a byte choosing the key id and the body's origin, then
/// either the raw body or the bytes driving a generated JSON object (see [`generate`]).
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let fields = input.byte();
    let (meta, stamp) = (
        META[usize::from(fields % 4)],
        STAMP[usize::from(fields / 4 % 4)],
    );
    let mode = input.byte();
    let key_id = KEY_IDS[usize::from(mode % 4)];
    let body = if mode & 4 == 0 {
        input.rest().to_vec()
    } else {
        generate(&mut input, meta, stamp, mode & 8 != 0)
    };
    let provenance = if (meta, stamp) == (META[0], STAMP[0]) {
        ProvenanceLayer::new()
    } else {
        ProvenanceLayer::new()
            .metadata_field(meta)
            .stamp_field(stamp)
    };
    check_stamp(&provenance, meta, stamp, &KeyId::new(key_id), &body);
}

/// The invariants above, for one body.
pub fn check_stamp(provenance: &ProvenanceLayer, meta: &str, stamp: &str, id: &KeyId, body: &[u8]) {
    let result = provenance.stamp(body, id);
    let unstamped = matches!(result, Ok(None));
    let Ok(text) = std::str::from_utf8(body) else {
        assert!(unstamped, "stamped a body that is not UTF-8");
        return;
    };
    match serde_json::from_str::<&RawValue>(text) {
        Err(error) => {
            assert!(
                unstamped,
                "stamped {text:?}, which serde_json refuses: {error}"
            );
            return;
        }
        Ok(value) if !value.get().starts_with('{') => {
            assert!(unstamped, "stamped a JSON value that is not an object");
            return;
        }
        Ok(_) => {}
    }
    let Ok(Members(members)) = serde_json::from_str::<Members>(text) else {
        // An object with a key serde_json cannot decode (a lone surrogate escape): only check that
        // the answer is still JSON.
        if let Ok(Some(out)) = &result {
            let out = std::str::from_utf8(out).unwrap();
            assert!(serde_json::from_str::<&RawValue>(out).is_ok(), "{out:?}");
        }
        return;
    };
    if ambiguous(&members, meta, stamp) {
        let error = result.expect_err("an ambiguous body must be refused");
        assert_eq!(error.code(), ErrorCode::AmbiguousMetadata);
        return;
    }
    let metas: Vec<&RawValue> = members
        .iter()
        .filter(|(k, _)| k == meta)
        .map(|(_, v)| *v)
        .collect();
    if metas.iter().any(|v| !is_object(v) && v.get() != "null") {
        let error = result.expect_err("a metadata member that is not an object must be refused");
        assert_eq!(error.code(), ErrorCode::InvalidMetadata);
        return;
    }

    let out = result
        .expect("a JSON object is stamped")
        .expect("a JSON object is stamped");
    let out_text = std::str::from_utf8(&out).expect("a stamped body is UTF-8");
    let Members(stamped) = serde_json::from_str(out_text)
        .unwrap_or_else(|e| panic!("stamped body {out_text:?} is not JSON: {e}"));
    let mut stamped = stamped.iter();
    for (key, value) in &members {
        let (key2, value2) = stamped.next().expect("a member went missing");
        assert_eq!(key, key2);
        if key != meta {
            assert_eq!(value.get(), value2.get(), "member {key:?} changed");
        } else if is_object(value) {
            check_metadata(value, value2, stamp, id);
        } else {
            assert_only_stamp(value2, stamp, id);
        }
    }
    if metas.is_empty() {
        let (key, value) = stamped.next().expect("no metadata member was added");
        assert_eq!(key, meta);
        assert_only_stamp(value, stamp, id);
    }
    assert!(stamped.next().is_none(), "a member was added");

    let again = provenance.stamp(&out, id).unwrap();
    assert_eq!(
        again.as_deref(),
        Some(&out[..]),
        "stamping twice changed it"
    );
}

/// A member name as Go's `encoding/json` compares it with a struct field's: upper case, one
/// character for one, with U+212A KELVIN SIGN and U+017F LONG S folded onto `K` and `S`.
fn go_fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '\u{212A}' => 'K',
            '\u{17F}' => 'S',
            c => {
                let mut upper = c.to_uppercase();
                match (upper.next(), upper.next()) {
                    (Some(one), None) => one,
                    _ => c,
                }
            }
        })
        .collect()
}

/// The ambiguity rule (module docs), read with serde_json. Nesting is walked with a stack, not by
/// recursion. A nested object with a key serde_json cannot decode counts as not ambiguous (the
/// stamped-body checks below then skip it too).
fn ambiguous(members: &[(String, &RawValue)], meta: &str, stamp: &str) -> bool {
    let (meta_folded, stamp_folded) = (go_fold(meta), go_fold(stamp));
    let metas: Vec<&String> = members
        .iter()
        .map(|(k, _)| k)
        .filter(|k| go_fold(k) == meta_folded)
        .collect();
    if metas.len() > 1 || metas.iter().any(|k| *k != meta) {
        return true;
    }
    let mut pending: Vec<&RawValue> = Vec::new();
    for (key, value) in members {
        if key == meta {
            // Directly inside: only the exact stamp name may be there.
            if let Ok(Members(inner)) = serde_json::from_str::<Members>(value.get()) {
                for (k, v) in inner {
                    if go_fold(&k) == stamp_folded && k != stamp {
                        return true;
                    }
                    pending.push(v);
                }
            } else if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(value.get()) {
                pending.extend(items);
            }
            continue;
        }
        if go_fold(key) == stamp_folded {
            return true;
        }
        pending.push(value);
    }
    while let Some(value) = pending.pop() {
        if let Ok(Members(inner)) = serde_json::from_str::<Members>(value.get()) {
            for (k, v) in inner {
                if go_fold(&k) == stamp_folded {
                    return true;
                }
                pending.push(v);
            }
        } else if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(value.get()) {
            pending.extend(items);
        }
    }
    false
}

/// The metadata object after stamping: the first stamp member set, later ones removed, or one
/// appended; every other member byte for byte as before.
fn check_metadata(before: &RawValue, after: &RawValue, stamp: &str, id: &KeyId) {
    let (Ok(Members(before)), Ok(Members(after))) = (
        serde_json::from_str(before.get()),
        serde_json::from_str(after.get()),
    ) else {
        // A key serde_json cannot decode (a lone surrogate escape); the stamped body as a whole was
        // already read as JSON.
        return;
    };
    let mut after = after.iter();
    let mut seen = false;
    for (key, value) in &before {
        if key == stamp && seen {
            continue;
        }
        let (key2, value2) = after.next().expect("a metadata member went missing");
        assert_eq!(key, key2);
        if key == stamp {
            seen = true;
            assert_is_id(value2, id);
        } else {
            assert_eq!(value.get(), value2.get(), "metadata member {key:?} changed");
        }
    }
    if !seen {
        let (key, value) = after.next().expect("no stamp was added");
        assert_eq!(key, stamp);
        assert_is_id(value, id);
    }
    assert!(after.next().is_none(), "a metadata member was added");
}

fn assert_only_stamp(value: &RawValue, stamp: &str, id: &KeyId) {
    let Members(members) = serde_json::from_str(value.get()).unwrap();
    assert_eq!(members.len(), 1, "{}", value.get());
    assert_eq!(members[0].0, stamp);
    assert_is_id(members[0].1, id);
}

fn assert_is_id(value: &RawValue, id: &KeyId) {
    assert_eq!(
        serde_json::from_str::<String>(value.get()).unwrap(),
        id.as_str()
    );
}

fn is_object(value: &RawValue) -> bool {
    value.get().starts_with('{')
}

/// An object's members in order, duplicates kept, values as raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// A JSON object driven by `input`: random whitespace, the metadata and stamp keys (plain, with an
/// escape, duplicated), nested values, long numbers and escapes. With `corrupt`, the last two input
/// bytes overwrite one byte of the result, to land near the edge of the grammar.
pub fn generate(input: &mut Input<'_>, meta: &str, stamp: &str, corrupt: bool) -> Vec<u8> {
    let mut out = String::new();
    whitespace(input, &mut out);
    object(input, &mut out, 0, [meta, stamp]);
    whitespace(input, &mut out);
    let mut out = out.into_bytes();
    if corrupt && !out.is_empty() {
        let at = usize::from(input.byte()) * 256 + usize::from(input.byte());
        let len = out.len();
        out[at % len] = input.byte();
    }
    out
}

fn whitespace(input: &mut Input<'_>, out: &mut String) {
    out.push_str(["", "", " ", "\n\t", "\r\n  "][input.below(5)]);
}

fn object(input: &mut Input<'_>, out: &mut String, depth: usize, names: [&str; 2]) {
    out.push('{');
    for i in 0..input.below(6) {
        whitespace(input, out);
        if i > 0 {
            out.push(',');
            whitespace(input, out);
        }
        let choice = input.below(8);
        match choice {
            0..=3 => {
                let name = names[choice % 2];
                if choice < 2 {
                    out.push_str(&serde_json::to_string(name).unwrap());
                } else {
                    out.push_str(&escape_first(name));
                }
            }
            _ => string(input, out),
        }
        whitespace(input, out);
        out.push(':');
        whitespace(input, out);
        value(input, out, depth + 1, names);
    }
    whitespace(input, out);
    out.push('}');
}

fn value(input: &mut Input<'_>, out: &mut String, depth: usize, names: [&str; 2]) {
    match input.below(9) {
        0 | 1 if depth < 8 => object(input, out, depth, names),
        2 if depth < 8 => {
            out.push('[');
            for i in 0..input.below(4) {
                if i > 0 {
                    out.push(',');
                }
                whitespace(input, out);
                value(input, out, depth + 1, names);
            }
            out.push(']');
        }
        3 | 4 => string(input, out),
        5 => out.push_str(
            [
                "0",
                "-0",
                "12345678901234567890123",
                "1e400",
                "0.1000000000000000055511151231257827",
                "-1.5E-7",
                "2E+0",
                "1.0",
            ][input.below(8)],
        ),
        6 => out.push_str(["true", "false"][input.below(2)]),
        _ => out.push_str("null"),
    }
}

fn string(input: &mut Input<'_>, out: &mut String) {
    out.push('"');
    for _ in 0..input.below(6) {
        match input.byte() {
            0 => out.push_str("\\\""),
            1 => out.push_str("\\\\"),
            2 => out.push_str("\\/\\b\\f\\n\\r\\t"),
            3 => out.push_str("\\u00e9"),
            4 => out.push_str("\\ud83d\\ude00"),
            5 => out.push_str("\\ud800"),
            6 => out.push_str("é😀"),
            7 => out.push_str("\\u005f"),
            b => out.push(char::from(b"abcXYZ019 _-:{}[],"[usize::from(b) % 18])),
        }
    }
    out.push('"');
}

/// `name` as a JSON string with its first character written as a `\u` escape.
fn escape_first(name: &str) -> String {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return "\"\"".to_owned();
    };
    let mut units = [0u16; 2];
    let escaped: String = first
        .encode_utf16(&mut units)
        .iter()
        .map(|u| format!("\\u{u:04x}"))
        .collect();
    let rest = serde_json::to_string(chars.as_str()).unwrap();
    format!("\"{escaped}{}", &rest[1..])
}
