use super::*;
use crate::provenance::stamp::{Fields, StampError, json_string, stamp};

const ID: &str = "\"key_1\"";

fn fields() -> Fields {
    Fields::new("meta_data", "BLNK_GENERATED_BY")
}

fn stamped(input: &str) -> String {
    let out = stamp(input.as_bytes(), &fields(), ID)
        .expect("metadata is an object")
        .unwrap_or_else(|| panic!("not stamped: {input}"));
    String::from_utf8(out).unwrap()
}

fn syntax_error(input: &[u8]) -> usize {
    match scan(input, "meta_data", "BLNK_GENERATED_BY") {
        Err(ScanError::Syntax(at)) => at,
        other => panic!("{:?} should be a syntax error, got {other:?}", input),
    }
}

#[test]
fn valid_documents_scan() {
    for doc in [
        "{}",
        " {\n} ",
        r#"{"a":1}"#,
        r#"{"a":[1,2,{"b":[]}],"c":{"d":null}}"#,
        r#"{"n":[-0,0.5,1e5,1E+5,1e-5,-12.34e56,12345678901234567890123]}"#,
        r#"{"s":"\"\\\/\b\f\n\r\t\u00e9\uD83D\uDE00 é 😀"}"#,
        r#"{"t":true,"f":false,"n":null}"#,
        "{\"a\"\t:\r\n[ ]\n,\"b\" : { } }",
        r#"{"lone":"\ud800"}"#,
    ] {
        assert!(
            scan(doc.as_bytes(), "meta_data", "x").is_ok(),
            "{doc} should scan"
        );
    }
}

#[test]
fn malformed_documents_are_syntax_errors() {
    let cases: &[(&[u8], usize)] = &[
        (b"", 0),
        (b"   ", 3),
        (b"{", 1),
        (b"{\"a\"}", 4),
        (b"{\"a\":}", 5),
        (b"{\"a\":1,}", 7),
        (b"{,}", 1),
        (b"{\"a\":1 \"b\":2}", 7),
        (b"{\"a\":[1,]}", 8),
        (b"{\"a\":[1 2]}", 8),
        (b"{\"a\":01}", 6),
        (b"{\"a\":1.}", 7),
        (b"{\"a\":.5}", 5),
        (b"{\"a\":1e}", 7),
        (b"{\"a\":-}", 6),
        (b"{\"a\":+1}", 5),
        (b"{\"a\":tru}", 8),
        (b"{\"a\":nul}", 8),
        (b"{\"a\":True}", 5),
        (b"{\"a\":\"x}", 8),
        (b"{\"a\":\"\\x\"}", 7),
        (b"{\"a\":\"\\u12g4\"}", 10),
        (b"{\"a\":\"tab\there\"}", 9),
        (b"{\"a\":1}}", 7),
        (b"{\"a\":1} x", 8),
        (b"{\"a\":[}", 6),
        (b"{\"a\":{]}", 6),
        (b"{1:2}", 1),
        (b"{'a':1}", 1),
        (b"{\"a\":NaN}", 5),
        (b"\xef\xbb\xbf{}", 0),
    ];
    for &(input, at) in cases {
        assert_eq!(
            syntax_error(input),
            at,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn other_top_level_values_are_not_objects() {
    for doc in [
        "[]",
        "[{\"meta_data\":{}}]",
        "\"s\"",
        "12",
        "-1",
        "true",
        "false",
        "null",
    ] {
        assert_eq!(
            scan(doc.as_bytes(), "meta_data", "x"),
            Err(ScanError::NotObject),
            "{doc}"
        );
    }
}

#[test]
fn deep_nesting_is_scanned_without_recursion() {
    let depth = 1_000_000;
    let mut doc = String::from("{\"meta_data\":{\"deep\":");
    doc.push_str(&"[".repeat(depth));
    doc.push_str(&"]".repeat(depth));
    doc.push_str("}}");
    let out = stamped(&doc);
    assert!(out.ends_with(",\"BLNK_GENERATED_BY\":\"key_1\"}}"));

    // Unbalanced: a clear syntax error, not a crash.
    let open = "{\"a\":".to_owned() + &"[{\"b\":".repeat(depth);
    assert_eq!(syntax_error(open.as_bytes()), open.len());
    let mixed = "{\"a\":".to_owned() + &"[".repeat(depth) + "}";
    assert_eq!(syntax_error(mixed.as_bytes()), mixed.len() - 1);
}

#[test]
fn finds_metadata_and_stamps() {
    let doc =
        r#"{"a":1,"meta_data":{"x":{"BLNK_GENERATED":1},"BLNK_GENERATED_BY":"f","y":2},"b":[]}"#;
    let found = scan(doc.as_bytes(), "meta_data", "BLNK_GENERATED_BY").unwrap();
    assert_eq!(found.metas.len(), 1);
    let meta = &found.metas[0];
    assert_eq!(meta.kind, Kind::Object);
    assert_eq!(
        &doc[meta.value.0..meta.value.1],
        r#"{"x":{"BLNK_GENERATED":1},"BLNK_GENERATED_BY":"f","y":2}"#
    );
    assert_eq!(meta.stamps.len(), 1);
    let s = &meta.stamps[0];
    assert_eq!(&doc[s.value.0..s.value.1], "\"f\"");
    assert_eq!(
        &doc[..s.prev_value_end.unwrap()],
        r#"{"a":1,"meta_data":{"x":{"BLNK_GENERATED":1}"#
    );
    assert_eq!(
        &doc[..found.top_last_value_end.unwrap()],
        &doc[..doc.len() - 1]
    );
}

#[test]
fn stamp_cases() {
    let cases = [
        ("{}", r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#),
        (
            " { \n } ",
            " {\"meta_data\":{\"BLNK_GENERATED_BY\":\"key_1\"} \n } ",
        ),
        (
            r#"{"a":1}"#,
            r#"{"a":1,"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#,
        ),
        (
            r#"{"a": 1 }"#,
            r#"{"a": 1,"meta_data":{"BLNK_GENERATED_BY":"key_1"} }"#,
        ),
        (
            r#"{"meta_data":null}"#,
            r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#,
        ),
        (
            r#"{"meta_data":{}}"#,
            r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#,
        ),
        (
            r#"{"meta_data":{ }}"#,
            r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1" }}"#,
        ),
        (
            r#"{"meta_data":{"a":[1e400]} ,"z":0}"#,
            r#"{"meta_data":{"a":[1e400],"BLNK_GENERATED_BY":"key_1"} ,"z":0}"#,
        ),
        (
            r#"{"meta_data":{"BLNK_GENERATED_BY":{"x":[1]},"a":1}}"#,
            r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1","a":1}}"#,
        ),
        (
            r#"{"meta_data":{"a":1, "BLNK_GENERATED_BY" : "x" , "b":2, "BLNK_GENERATED_BY":3}}"#,
            r#"{"meta_data":{"a":1, "BLNK_GENERATED_BY" : "key_1" , "b":2}}"#,
        ),
        (
            r#"{"meta_data":{"BLNK_GENERATED_BY":1,"BLNK_GENERATED_BY":2,"BLNK_GENERATED_BY":3}}"#,
            r#"{"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#,
        ),
        (
            r#"{"meta\u005fdata":{"BLNK_GENERATED\u005FBY":"forged"}}"#,
            r#"{"meta\u005fdata":{"BLNK_GENERATED\u005FBY":"key_1"}}"#,
        ),
        (
            r#"{"x":{"meta_data":7},"meta_datum":[]}"#,
            r#"{"x":{"meta_data":7},"meta_datum":[],"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#,
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(stamped(input), expected, "{input}");
    }
}

#[test]
fn non_object_metadata_is_refused() {
    for (doc, kind) in [
        (r#"{"meta_data":"x"}"#, Kind::String),
        (r#"{"meta_data":1}"#, Kind::Number),
        (r#"{"meta_data":[]}"#, Kind::Array),
        (r#"{"meta_data":true}"#, Kind::Bool),
    ] {
        assert_eq!(
            stamp(doc.as_bytes(), &fields(), ID),
            Err(StampError::NotAnObject(kind)),
            "{doc}"
        );
    }
    // ... but only in a valid document.
    assert_eq!(stamp(br#"{"meta_data":1,}"#, &fields(), ID), Ok(None));
}

#[test]
fn invalid_utf8_and_non_objects_are_left_alone() {
    for doc in [
        &b"{\"a\":\"\xff\"}"[..],
        b"{\"a\":\"\xc3\"}",
        b"[1]",
        b"not json",
        b"",
    ] {
        assert_eq!(stamp(doc, &fields(), ID), Ok(None));
    }
}

#[test]
fn string_specials_are_found_exactly() {
    let naive = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
    let mut samples: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"plain text without specials".to_vec(),
        "é😀 non-ascii \u{7f}\u{80}".as_bytes().to_vec(),
    ];
    for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
        for at in 0..20 {
            for filler in [b'a', 0x21, 0x7f, 0x80, 0xff, b'"' + 1, b'\\' - 1] {
                let mut sample = vec![filler; 20];
                sample[at] = special;
                samples.push(sample.clone());
                sample[19] = b'"';
                samples.push(sample);
            }
        }
    }
    for sample in &samples {
        assert_eq!(find_string_special(sample), naive(sample), "{sample:?}");
    }
}

#[test]
fn keys_compare_unescaped() {
    assert!(key_is(b"meta_data", false, b"meta_data"));
    assert!(!key_is(b"meta_dat", false, b"meta_data"));
    assert!(key_is(br"\u006deta_data", true, b"meta_data"));
    assert!(key_is(br"\ud83d\ude00", true, "😀".as_bytes()));
    assert!(!key_is(br"\ud83d", true, "\u{fffd}".as_bytes()));
    assert!(!key_is(br"\ud83dx", true, b"x"));
    assert!(key_is(br#"a\"b\\c\/d\n"#, true, b"a\"b\\c/d\n"));
}

fn ambiguity(input: &str) -> Option<Ambiguity> {
    match scan(input.as_bytes(), "meta_data", "BLNK_GENERATED_BY") {
        Ok(_) => None,
        Err(ScanError::Ambiguous(ambiguity)) => Some(ambiguity),
        Err(other) => panic!("{input}: {other:?}"),
    }
}

#[test]
fn case_variant_metadata_members_are_ambiguous() {
    use Ambiguity::Metadata;
    for (doc, at) in [
        (r#"{"meta_data":{"a":1},"META_DATA":{"x":2}}"#, 21),
        (r#"{"meta_data":{},"meta_data":null}"#, 16),
        (r#"{"Meta_Data":{}}"#, 1),
        (r#"{"meta_data":null, "meta\u005FDATA":{}}"#, 19),
        (r#"{"a":[1],"mEtA_dAtA":7,"b":0}"#, 9),
    ] {
        assert_eq!(ambiguity(doc), Some(Metadata(at)), "{doc}");
    }
    for doc in [
        r#"{"meta_data":{"a":1},"meta_datum":{}}"#,
        r#"{"x":{"META_DATA":{},"meta_data":{}}}"#,
        r#"{"meta_data":{"meta_data":{}}}"#,
    ] {
        assert_eq!(ambiguity(doc), None, "{doc}");
    }
    // Only a valid document is ambiguous: an invalid one is a syntax error first.
    assert!(matches!(
        scan(br#"{"meta_data":{},"META_DATA":{},}"#, "meta_data", "x"),
        Err(ScanError::Syntax(_))
    ));
}

#[test]
fn a_stamp_member_anywhere_but_where_the_layer_writes_is_ambiguous() {
    use Ambiguity::Stamp;
    for (doc, at) in [
        (r#"{"meta_data":{"blnk_generated_by":"f"}}"#, 14),
        (r#"{"BLNK_GENERATED_BY":"f"}"#, 1),
        (r#"{"x":{"BLNK_GENERATED_BY":"f"}}"#, 6),
        (r#"{"meta_data":{"a":{"BLNK_GENERATED_BY":1}}}"#, 19),
        (r#"{"txs":[{"meta_data":{"BLNK_GENERATED_BY":"f"}}]}"#, 22),
        (r#"{"meta_data":{"BLNK_GENERATED_BY":"f"}}"#, 14),
        (r#"{"meta_data":{"BLN\u212a_generated_by":"f"}}"#, 14),
        (
            r#"{"meta_data":{"BLNK_GENERATED_BY":"ok","Blnk_Generated_By":"f"}}"#,
            39,
        ),
    ] {
        assert_eq!(ambiguity(doc), Some(Stamp(at)), "{doc}");
    }
    for doc in [
        r#"{"meta_data":{"BLNK_GENERATED_BY":"f","BLNK_GENERATED_BY":"g"}}"#,
        r#"{"meta_data":{"BLNK_GENERATED\u005FBY":"f"}}"#,
        r#"{"x":"BLNK_GENERATED_BY","y":["BLNK_GENERATED_BY"]}"#,
        r#"{"meta_data":{"BLNK_GENERATED_BYE":1,"BLNK_GENERATED":2}}"#,
    ] {
        assert_eq!(ambiguity(doc), None, "{doc}");
    }
    assert_eq!(
        stamp(br#"{"meta_data":{"blnk_generated_by":"f"}}"#, &fields(), ID),
        Err(StampError::Ambiguous(Stamp(14)))
    );
    // One name for both fields: the metadata member is not a stray stamp, and a stamped body
    // stamps again unchanged.
    let same = Fields::new("x", "x");
    let once = stamp(b"{}", &same, ID).unwrap().unwrap();
    assert_eq!(once, br#"{"x":{"x":"key_1"}}"#);
    assert_eq!(stamp(&once, &same, ID).unwrap().unwrap(), once);
    assert!(matches!(
        stamp(br#"{"x":{"a":{"X":1}}}"#, &same, ID),
        Err(StampError::Ambiguous(Stamp(11)))
    ));
}

#[test]
fn folding_is_gos() {
    assert!(key_folds_to(b"meta_DATA", false, b"meta_data"));
    assert!(key_folds_to("\u{17F}a".as_bytes(), false, b"sa"));
    assert!(key_folds_to("\u{212A}".as_bytes(), false, b"k"));
    assert!(key_folds_to(br"\u017fA", true, b"sa"));
    assert!(key_folds_to(
        "\u{e9}T\u{c9}".as_bytes(),
        false,
        "\u{c9}t\u{e9}".as_bytes()
    ));
    assert!(!key_folds_to(b"meta-data", false, b"meta_data"));
    assert!(!key_folds_to(b"meta_dat", false, b"meta_data"));
    assert!(!key_folds_to(br"\ud800", true, b"x"));
}

#[test]
fn custom_field_names_are_escaped_when_inserted() {
    let fields = Fields::new("meta \"data\"", "by\n");
    let out = stamp(b"{}", &fields, ID).unwrap().unwrap();
    assert_eq!(out, br#"{"meta \"data\"":{"by\n":"key_1"}}"#);
    let again = stamp(&out, &fields, "\"key_2\"").unwrap().unwrap();
    assert_eq!(again, br#"{"meta \"data\"":{"by\n":"key_2"}}"#);
    assert_eq!(json_string("\u{1}é"), "\"\\u0001é\"");
}
