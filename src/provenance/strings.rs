//! What a JSON string says, for the scanner (`scan.rs`): where its plain run ends, what it
//! unescapes to, and whether a member name is the metadata or stamp field, exactly or once folded.

/// The offset of the first `"`, `\\` or control character in `bytes`: where a string's plain run
/// ends. Eight bytes at a time (SWAR); the lowest flagged byte of a word is always exact.
pub(super) fn find_string_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Flags the bytes of `x` that are below `n` (n <= 0x80; bytes >= 0x80 are never flagged).
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let flags = below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            | below(x, 0x20);
        if flags != 0 {
            return Some(offset + (flags.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|at| offset + at)
}

/// Whether the raw contents of a key (between its quotes) are `target` once unescaped.
pub(super) fn key_is(raw: &[u8], escaped: bool, target: &[u8]) -> bool {
    if !escaped {
        return raw == target;
    }
    // Escaping never shortens: a key shorter than the target cannot match, and neither can one
    // longer than six times it (`\uXXXX` for every byte).
    if raw.len() < target.len() || raw.len() > target.len().saturating_mul(6) {
        return false;
    }
    unescape(raw).is_some_and(|key| key.as_bytes() == target)
}

/// Whether the raw contents of a key are `target` under case folding (see the module docs), once
/// unescaped.
pub(super) fn key_folds_to(raw: &[u8], escaped: bool, target: &[u8]) -> bool {
    // A key is at most six raw bytes per byte of the name (`\u212A` for `K`) and, for an ASCII
    // name, at least one per byte: the length check leaves out almost every key at no cost.
    if raw.len() > target.len().saturating_mul(6) || (target.is_ascii() && raw.len() < target.len())
    {
        return false;
    }
    if !escaped && raw.is_ascii() && target.is_ascii() {
        return raw.eq_ignore_ascii_case(target);
    }
    let key = match escaped {
        true => match unescape(raw) {
            Some(key) => key,
            None => return false,
        },
        false => match std::str::from_utf8(raw) {
            Ok(key) => key.to_owned(),
            Err(_) => return false,
        },
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return false;
    };
    key.chars().map(fold).eq(target.chars().map(fold))
}

/// One character, case-folded the way Go's `encoding/json` matches field names (upper case, one
/// character for one), plus the KELVIN SIGN as `K`, which older Go versions matched as `k`.
fn fold(c: char) -> char {
    match c {
        'a'..='z' => c.to_ascii_uppercase(),
        '\u{212A}' => 'K',
        '\u{17F}' => 'S',
        c if c.is_ascii() => c,
        c => {
            let mut upper = c.to_uppercase();
            match (upper.next(), upper.next()) {
                (Some(one), None) => one,
                _ => c,
            }
        }
    }
}

/// Unescapes the contents of a JSON string that the scanner validated. `None` for a lone surrogate
/// (which names no key a configured field could have).
fn unescape(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let decoded = match chars.next()? {
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let high = hex4(&mut chars)?;
                if (0xD800..0xDC00).contains(&high) {
                    if chars.next()? != '\\' || chars.next()? != 'u' {
                        return None;
                    }
                    let low = hex4(&mut chars)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))?
                } else {
                    char::from_u32(high)?
                }
            }
            _ => return None,
        };
        out.push(decoded);
    }
    Some(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    let mut value = 0;
    for _ in 0..4 {
        value = value * 16 + chars.next()?.to_digit(16)?;
    }
    Some(value)
}
