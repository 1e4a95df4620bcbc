//! The byte splice that stamps: where [`scan`] found the metadata and stamp members, the key id is
//! written in (or the members are added), and everything else is copied byte for byte.

use super::scan::{Ambiguity, Kind, ScanError, scan};

/// Why a JSON object cannot be stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StampError {
    /// A metadata member holds this kind of value, neither an object nor null.
    NotAnObject(Kind),
    /// Readers could match the metadata or the stamp in two ways.
    Ambiguous(Ambiguity),
}

/// The field names and the stamp value, JSON-encoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fields {
    pub(crate) meta: Box<str>,
    pub(crate) stamp: Box<str>,
    meta_json: Box<str>,
    stamp_json: Box<str>,
}

impl Fields {
    pub(crate) fn new(meta: &str, stamp: &str) -> Self {
        Self {
            meta: meta.into(),
            stamp: stamp.into(),
            meta_json: json_string(meta).into(),
            stamp_json: json_string(stamp).into(),
        }
    }
}

/// `value` as a JSON string literal.
pub(crate) fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Stamps `input` with `key_id` (a JSON string literal, quotes included).
///
/// `Ok(None)`: not a UTF-8 JSON object; leave the body alone. `Err`: a metadata member is neither an
/// object nor null, or the object is ambiguous.
pub(crate) fn stamp(
    input: &[u8],
    fields: &Fields,
    key_id_json: &str,
) -> Result<Option<Vec<u8>>, StampError> {
    if std::str::from_utf8(input).is_err() {
        return Ok(None);
    }
    let found = match scan(input, &fields.meta, &fields.stamp) {
        Ok(found) => found,
        Err(ScanError::Ambiguous(ambiguity)) => return Err(StampError::Ambiguous(ambiguity)),
        Err(ScanError::Syntax(_) | ScanError::NotObject) => return Ok(None),
    };
    if let Some(bad) = found
        .metas
        .iter()
        .find(|m| !matches!(m.kind, Kind::Object | Kind::Null))
    {
        return Err(StampError::NotAnObject(bad.kind));
    }

    let stamp_member = || [&*fields.stamp_json, ":", key_id_json].concat();
    let mut out =
        Vec::with_capacity(input.len() + fields.meta_json.len() + stamp_member().len() + 8);
    let mut cursor = 0;
    let mut splice = |out: &mut Vec<u8>, (start, end): (usize, usize), with: &[&str]| {
        out.extend_from_slice(&input[cursor..start]);
        for piece in with {
            out.extend_from_slice(piece.as_bytes());
        }
        cursor = end;
    };

    if found.metas.is_empty() {
        let (at, comma) = match found.top_last_value_end {
            Some(end) => (end, ","),
            None => (found.top_open + 1, ""),
        };
        let member = stamp_member();
        splice(
            &mut out,
            (at, at),
            &[comma, &fields.meta_json, ":{", &member, "}"],
        );
    }
    for meta in &found.metas {
        match (meta.kind, meta.stamps.split_first()) {
            (Kind::Null, _) => splice(&mut out, meta.value, &["{", &stamp_member(), "}"]),
            (_, None) => {
                let (at, comma) = match meta.last_value_end {
                    Some(end) => (end, ","),
                    None => (meta.value.0 + 1, ""),
                };
                splice(&mut out, (at, at), &[comma, &stamp_member()]);
            }
            (_, Some((first, duplicates))) => {
                splice(&mut out, first.value, &[key_id_json]);
                for duplicate in duplicates {
                    // Remove `, "stamp": value` (from the end of the previous member's value).
                    let from = duplicate.prev_value_end.unwrap_or(duplicate.value.0);
                    splice(&mut out, (from, duplicate.value.1), &[]);
                }
            }
        }
    }
    out.extend_from_slice(&input[cursor..]);
    Ok(Some(out))
}
