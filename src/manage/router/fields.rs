//! What a JSON field of the management API may hold, where a derive cannot say it: the schemas of
//! names, scopes and networks (with the patterns the server checks), and the deserializers that
//! read a field as the document states it (an integer written `5.0` is an integer; `null` apart
//! from left out).

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};

use super::super::validate::{MAX_NAME_LEN, MAX_SCOPES};
use crate::network::MAX_NETWORKS;

/// What a name (and a revocation reason) may be, as [`validate_name`](super::super::validate)
/// checks it: 1 to 128 characters, not only whitespace, none of the characters it refuses
/// (control, bidirectional-control, invisible).
const NAME_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*[^\\s\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0][^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180b-\\u180f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\u3164\\ufe00-\\ufe0f\\ufeff\\uffa0]*$";

/// A revocation reason: the rules of a name (1 to 128 characters, not only whitespace, none of the
/// characters [`validate_name`](super::super::validate) refuses).
pub(super) fn reason_schema() -> utoipa::openapi::Object {
    name_schema(&[Type::String], "The rules of a key name.")
}

pub(super) fn new_name_schema() -> utoipa::openapi::Object {
    name_schema(
        &[Type::String, Type::Null],
        "Display name (default: timestamp-based). At most 128 characters, not blank, no control, \
         bidirectional-control or invisible (zero-width) characters; surrounding whitespace is \
         trimmed.",
    )
}

pub(super) fn renamed_schema() -> utoipa::openapi::Object {
    name_schema(
        &[Type::String, Type::Null],
        "A new name (same rules as on create).",
    )
}

fn name_schema(types: &[Type], description: &str) -> utoipa::openapi::Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter(types.iter().cloned()))
        .description(Some(description))
        .min_length(Some(1))
        .max_length(Some(MAX_NAME_LEN))
        .pattern(Some(NAME_PATTERN))
        .build()
}

pub(super) fn scopes_schema() -> utoipa::openapi::Array {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^(\*|(\*|[a-z0-9_-]+):(\*|[a-z0-9_-]+))$"))
                .max_length(Some(crate::scope::MAX_SCOPE_LEN)),
        )
        .min_items(Some(1))
        .max_items(Some(MAX_SCOPES))
        .build()
}

/// An IPv4 network exactly as the server reads one (dotted quad without leading zeros, an optional
/// `/0` to `/32`), or something shaped like an IPv6 one (the server parses it; a string outside
/// this pattern is never a network).
const NETWORK_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}(/(3[0-2]|[0-2]?[0-9]))?|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?)$";

/// `allowed_networks` of a new key.
pub(super) fn networks_schema() -> utoipa::openapi::Array {
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .description(Some(
            "Where the key may be used from: 1 to 32 IPv4 or IPv6 networks in CIDR notation (a \
             bare address is one host). Default: anywhere, or a delegated key's creator's \
             networks; a delegated key's must lie within its creator's. Requests from elsewhere \
             get 403 `AUTH_NETWORK_NOT_ALLOWED`.",
        ))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NETWORK_PATTERN)),
        )
        .min_items(Some(1))
        .max_items(Some(MAX_NETWORKS))
        .build()
}

/// A field that is present (possibly `null`), as opposed to left out.
pub(super) fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A non-negative integer field, also when written with a zero fraction (`5.0`): JSON Schema's
/// `integer` is a value, not a notation, and clients such as Python's `json` write floats.
pub(super) fn whole<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let value = deserializer.deserialize_u64(Whole)?;
    T::try_from(value)
        .map_err(|_| de::Error::invalid_value(Unexpected::Unsigned(value), &"a smaller integer"))
}

/// [`whole`] for an optional field (`null` or left out: `None`).
pub(super) fn whole_or_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(serde::Deserialize)]
    struct Field(#[serde(deserialize_with = "whole")] u64);
    match Option::<Field>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Field(value)) => T::try_from(value).map(Some).map_err(|_| {
            de::Error::invalid_value(Unexpected::Unsigned(value), &"a smaller integer")
        }),
    }
}

struct Whole;

impl Visitor<'_> for Whole {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
        // `u64::MAX as f64` is 2^64, the first value out of range.
        if value.fract() == 0.0 && (0.0..u64::MAX as f64).contains(&value) {
            Ok(value as u64)
        } else {
            Err(E::invalid_value(Unexpected::Float(value), &self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Body {
        #[serde(deserialize_with = "whole")]
        count: u32,
        #[serde(default, deserialize_with = "whole_or_null")]
        grace: Option<u64>,
    }

    fn body(json: &str) -> Result<Body, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn integers_are_read_whatever_their_notation() {
        let read = |count, grace| Ok(Body { count, grace });
        assert_eq!(body(r#"{"count": 5}"#), read(5, None));
        assert_eq!(body(r#"{"count": 5.0, "grace": 2e3}"#), read(5, Some(2000)));
        assert_eq!(body(r#"{"count": 0, "grace": null}"#), read(0, None));
        assert_eq!(body(r#"{"count": 4294967295.0}"#), read(u32::MAX, None));
    }

    #[test]
    fn what_is_not_a_whole_number_in_range_is_refused() {
        for json in [
            r#"{"count": 5.5}"#,
            r#"{"count": -1}"#,
            r#"{"count": -0.5}"#,
            r#"{"count": 4294967296}"#,
            r#"{"count": 1e300}"#,
            r#"{"count": "5"}"#,
            r#"{"count": null}"#,
            r#"{"count": 1, "grace": 18446744073709551616.0}"#,
            r#"{"count": 1, "grace": 1.5}"#,
        ] {
            assert!(body(json).is_err(), "{json} was read");
        }
    }

    /// The network pattern takes what the server parses and refuses what it cannot.
    #[test]
    fn the_network_pattern_agrees_with_the_parser() {
        let regex = regex::Regex::new(NETWORK_PATTERN).expect("the pattern compiles");
        let pattern = |s: &str| regex.is_match(s);
        for accepted in [
            "203.0.113.0/24",
            "10.0.0.1",
            "0.0.0.0/0",
            "1.2.3.4/08",
            "2001:db8::/32",
            "::1",
            "::ffff:1.2.3.4",
        ] {
            assert!(
                crate::network::Networks::parse([accepted]).is_ok(),
                "{accepted}"
            );
            assert!(pattern(accepted), "{accepted}");
        }
        for refused in [
            "01.2.3.4",
            "1.2.3.4/33",
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4/",
            "host",
            " 1.2.3.4",
            "1.2.3.4/+8",
        ] {
            assert!(
                crate::network::Networks::parse([refused]).is_err(),
                "{refused}"
            );
            assert!(!pattern(refused), "{refused}");
        }
    }
}
