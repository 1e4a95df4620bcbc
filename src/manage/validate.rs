//! Input bounds and their checks: every one refused with 400 `APIKEY_INVALID` and a message naming
//! the bound, never truncated silently.

use std::time::Duration;

use time::OffsetDateTime;

use crate::error::AuthError;
use crate::limits::{Credits, RateLimit};
use crate::scope::ScopeSet;

// Input limits. Each one is refused with 400 `APIKEY_INVALID` and a message naming the limit, never
// truncated silently. The README's "Limits" table lists them with the layer's own.

/// Longest key name accepted, in characters (after trimming): 128.
pub const MAX_NAME_LEN: usize = 128;
/// Longest owner or account id accepted: 128 bytes of visible ASCII.
pub const MAX_OWNER_LEN: usize = 128;
/// Most scopes one key may hold: 64. Each scope is at most [`MAX_SCOPE_LEN`](crate::scope::MAX_SCOPE_LEN) bytes.
pub const MAX_SCOPES: usize = 64;
/// Largest page [`KeyManager::list`](super::KeyManager::list) returns: 100. A larger `limit` (or 0) is refused, not clamped,
/// so a client never mistakes a short page for the end of the list.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Largest request body the management router reads: 64 KiB (a create body at every other limit
/// is under 10 KiB). Larger bodies get 413 `REQUEST_BODY_TOO_LARGE`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Page size of `GET /api-keys` without `limit`: 50.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Longest rotation grace period: 30 days.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(30 * 86_400);
/// Longest key id accepted in a path or as a `before` cursor: 128 bytes. Longer ids are unknown (404)
/// in a path, and a 400 as a cursor.
pub const MAX_KEY_ID_LEN: usize = 128;

pub(super) fn default_name(now: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    format!("API key {}", now.format(&format).unwrap_or_default())
}

/// `rate_limit`, if it is within bounds (400 `APIKEY_INVALID` otherwise).
pub(super) fn validate_rate_limit(
    rate_limit: Option<RateLimit>,
) -> Result<Option<RateLimit>, AuthError> {
    if let Some(limit) = &rate_limit {
        limit
            .validate()
            .map_err(|e| AuthError::invalid(e.to_string()))?;
    }
    Ok(rate_limit)
}

/// `credits`, if within bounds (400 `APIKEY_INVALID` otherwise).
pub(super) fn validate_credits(credits: Option<Credits>) -> Result<Option<Credits>, AuthError> {
    if let Some(credits) = &credits {
        credits
            .validate()
            .map_err(|e| AuthError::invalid(e.to_string()))?;
    }
    Ok(credits)
}

pub(super) fn validate_name(name: String) -> Result<String, AuthError> {
    // Counted before trimming, as the OpenAPI `maxLength` counts.
    if name.chars().count() > MAX_NAME_LEN {
        return Err(AuthError::invalid(format!(
            "name is longer than {MAX_NAME_LEN} characters"
        )));
    }
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(AuthError::invalid("name cannot be blank"));
    }
    if let Some((at, c)) = name.chars().enumerate().find(|&(_, c)| is_deceptive(c)) {
        let what = if c.is_control() {
            "a control character"
        } else if is_bidi_control(c) {
            "a bidirectional control character"
        } else {
            "an invisible (zero-width) character"
        };
        return Err(AuthError::invalid(format!(
            "name cannot contain {what}: U+{:04X} at character {at}",
            u32::from(c)
        )));
    }
    Ok(trimmed.to_owned())
}

/// Characters a name may not hold, because a person reading it in a listing or the console would
/// see something else: control characters, bidirectional overrides and isolates (which reorder
/// what follows: `U+202E` makes `key-fdp.exe` read `key-exe.pdf`) and invisible characters (which
/// make two different names look alike). The OpenAPI document's `name` pattern excludes the same.
pub(super) fn is_deceptive(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || is_invisible(c)
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}' | '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}'
            | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
    )
}

pub(super) fn validate_id<'a>(what: &'static str, value: &'a str) -> Result<&'a str, AuthError> {
    if value.is_empty()
        || value.len() > MAX_OWNER_LEN
        || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AuthError::invalid(format!(
            "{what} must be 1 to {MAX_OWNER_LEN} visible ASCII characters"
        )));
    }
    Ok(value)
}

pub(super) fn validate_cursor(cursor: &str) -> Result<(), AuthError> {
    if cursor.is_empty()
        || cursor.len() > MAX_KEY_ID_LEN
        || !cursor.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AuthError::invalid(
            "before must be a key id, as sent in x-next-cursor",
        ));
    }
    Ok(())
}

pub(super) fn validate_scopes(scopes: &[String]) -> Result<ScopeSet, AuthError> {
    if scopes.is_empty() {
        return Err(AuthError::invalid("a key needs at least one scope"));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(AuthError::invalid(format!(
            "a key holds at most {MAX_SCOPES} scopes"
        )));
    }
    ScopeSet::parse(scopes).map_err(|e| AuthError::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_what_would_deceive_a_reader() {
        assert_eq!(
            validate_name("  ci deploy key ".into()).unwrap(),
            "ci deploy key"
        );
        assert_eq!(
            validate_name("clé für 東京 🔑".into()).unwrap(),
            "clé für 東京 🔑"
        );
        for (name, what, at) in [
            ("key-\u{202E}fdp.exe", "bidirectional", 4),
            ("a\u{2066}b", "bidirectional", 1),
            ("pay\u{200B}ments", "invisible", 3),
            ("\u{FEFF}x", "invisible", 0),
            ("tab\there", "control", 3),
            ("nul\u{0}", "control", 3),
        ] {
            let error = validate_name(name.into()).unwrap_err().to_string();
            assert!(error.contains(what), "{name:?}: {error}");
            assert!(
                error.contains(&format!("at character {at}")),
                "{name:?}: {error}"
            );
        }
        assert!(validate_name("   ".into()).is_err());
        assert!(validate_name("x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
