//! A validating, non-recursive JSON scanner that finds where to stamp (the splice that stamps is
//! `stamp.rs`).
//!
//! The scanner never builds a tree and never converts a number: it checks the whole document against
//! the JSON grammar (RFC 8259) and records byte offsets of
//! - every top-level member whose (unescaped) key is the metadata field, and the kind of its value;
//! - inside each such object, every member whose (unescaped) key is the stamp field.
//!
//! Nesting is tracked on a heap-allocated stack of one byte per level, so any depth that fits in the
//! body limit is scanned in linear time without recursion (no stack overflow on `[[[[...`).
//!
//! Keys are compared after unescaping, as JSON parsers do: `"meta\u005fdata"` *is* `meta_data`, and a
//! client cannot hide a forged stamp behind an escape.
//!
//! It also finds what readers could match in two ways ([`Ambiguity`]): more than one top-level
//! member equal to the metadata field under case folding (or one that is not the field exactly),
//! and a member equal to the stamp field under case folding anywhere but in the top-level
//! metadata object under its exact name. Case folding is Go's (`encoding/json` matches struct
//! fields that way): ASCII letters, plus the two non-ASCII letters that fold onto ASCII ones
//! (`\u{212A}` KELVIN SIGN ~ `k`, `\u{17F}` LONG S ~ `s`) and, for non-ASCII field names,
//! per-character upper case. What a string says (its escapes, the comparisons) is `strings.rs`.

use super::strings::{find_string_special, key_folds_to, key_is};

/// The kind of a JSON value, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    /// "an object", "a string", ...
    pub(crate) const fn with_article(self) -> &'static str {
        match self {
            Self::Object => "an object",
            Self::Array => "an array",
            Self::String => "a string",
            Self::Number => "a number",
            Self::Bool => "a boolean",
            Self::Null => "null",
        }
    }
}

/// Why a body is not stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// Not a JSON document: the byte at this offset breaks the grammar (or the input ends there).
    Syntax(usize),
    /// A JSON value that is not an object (the rest is not validated).
    NotObject,
    /// A valid JSON object that readers could stamp-read in two ways.
    Ambiguous(Ambiguity),
}

/// What makes a valid JSON object ambiguous to stamp (the first one found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ambiguity {
    /// A top-level member equal to the metadata field under case folding, beside another one or
    /// instead of the exact name. At this byte offset (its key's opening quote).
    Metadata(usize),
    /// A member equal to the stamp field under case folding where the layer does not write it.
    /// At this byte offset (its key's opening quote).
    Stamp(usize),
}

/// A member of the metadata object whose key is the stamp field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StampMember {
    /// End of the value of the member before this one in the same object, if any.
    pub(crate) prev_value_end: Option<usize>,
    /// Span of this member's value.
    pub(crate) value: (usize, usize),
}

/// A top-level member whose key is the metadata field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaMember {
    pub(crate) kind: Kind,
    /// Span of the value.
    pub(crate) value: (usize, usize),
    /// Objects only: end of the last member's value (`None` when the object is empty).
    pub(crate) last_value_end: Option<usize>,
    /// Objects only: members whose key is the stamp field, in order.
    pub(crate) stamps: Vec<StampMember>,
}

/// What [`scan`] found in a valid JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Offset of the top-level `{`.
    pub(crate) top_open: usize,
    /// End of the last top-level member's value (`None` when the object is empty).
    pub(crate) top_last_value_end: Option<usize>,
    /// Every top-level metadata member, in order (duplicates included).
    pub(crate) metas: Vec<MetaMember>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    None,
    /// The value of a top-level metadata member.
    Meta,
    /// The value of a stamp member inside a metadata object.
    Stamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After `{`: a key or `}`.
    ObjectStart,
    /// After `,` in an object: a key.
    ObjectKey,
    /// A value.
    Value,
    /// After `[`: a value or `]`.
    ArrayStart,
    /// After a value: `,` or the closing bracket.
    AfterValue,
}

/// Scans `input` (which must be valid UTF-8; the caller checks) for the members named `meta` (top
/// level) and `stamp` (inside top-level `meta` objects).
pub(crate) fn scan(input: &[u8], meta: &str, stamp: &str) -> Result<Scan, ScanError> {
    Scanner {
        input,
        pos: 0,
        meta: meta.as_bytes(),
        stamp: stamp.as_bytes(),
    }
    .run()
}

struct Scanner<'a> {
    input: &'a [u8],
    pos: usize,
    meta: &'a [u8],
    stamp: &'a [u8],
}

/// Start offset and role of the open containers at depth 1 to 3 (index = depth).
type Shallow = [(usize, Role); 4];

impl Scanner<'_> {
    fn run(mut self) -> Result<Scan, ScanError> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => {}
            Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                return Err(ScanError::NotObject);
            }
            _ => return Err(self.error()),
        }
        let top_open = self.pos;
        self.pos += 1;

        let mut found = Scan {
            top_open,
            top_last_value_end: None,
            metas: Vec::new(),
        };
        // One byte per open container: `{` or `[`.
        let mut stack: Vec<u8> = vec![b'{'];
        let mut shallow: Shallow = [(0, Role::None); 4];
        shallow[1] = (top_open, Role::None);
        // The metadata object being scanned, while it is open (always at depth 2).
        let mut current: Option<MetaMember> = None;
        let mut role = Role::None;
        let mut state = State::ObjectStart;
        // Top-level members equal to the metadata field under case folding, and the first ambiguity.
        let mut folded_metas = 0usize;
        let mut ambiguity = None;

        loop {
            self.skip_ws();
            match state {
                State::ObjectStart | State::ObjectKey => {
                    if state == State::ObjectStart && self.peek() == Some(b'}') {
                        if self.close(&mut stack, &shallow, &mut current, &mut found)? {
                            break;
                        }
                        state = State::AfterValue;
                        continue;
                    }
                    if self.peek() != Some(b'"') {
                        return Err(self.error());
                    }
                    let (start, end, escaped) = self.string()?;
                    let key = &self.input[start..end];
                    role = match stack.len() {
                        1 if key_is(key, escaped, self.meta) => Role::Meta,
                        2 if current.is_some() && key_is(key, escaped, self.stamp) => Role::Stamp,
                        _ => Role::None,
                    };
                    if ambiguity.is_none() {
                        ambiguity = self.ambiguity(
                            key,
                            escaped,
                            start - 1,
                            stack.len(),
                            role,
                            &mut folded_metas,
                        );
                    }
                    self.skip_ws();
                    if self.peek() != Some(b':') {
                        return Err(self.error());
                    }
                    self.pos += 1;
                    state = State::Value;
                }
                State::ArrayStart | State::Value => {
                    if state == State::ArrayStart {
                        role = Role::None;
                        if self.peek() == Some(b']') {
                            self.close(&mut stack, &shallow, &mut current, &mut found)?;
                            state = State::AfterValue;
                            continue;
                        }
                    }
                    let start = self.pos;
                    let kind = match self.peek() {
                        Some(open @ (b'{' | b'[')) => {
                            self.pos += 1;
                            stack.push(open);
                            let depth = stack.len();
                            if let Some(slot) = shallow.get_mut(depth) {
                                *slot = (start, role);
                            }
                            if open == b'{' {
                                if depth == 2 && role == Role::Meta {
                                    current = Some(MetaMember {
                                        kind: Kind::Object,
                                        value: (start, start),
                                        last_value_end: None,
                                        stamps: Vec::new(),
                                    });
                                }
                                state = State::ObjectStart;
                            } else {
                                state = State::ArrayStart;
                            }
                            continue;
                        }
                        Some(b'"') => {
                            self.string()?;
                            Kind::String
                        }
                        Some(b'-' | b'0'..=b'9') => {
                            self.number()?;
                            Kind::Number
                        }
                        Some(b't') => {
                            self.literal(b"true")?;
                            Kind::Bool
                        }
                        Some(b'f') => {
                            self.literal(b"false")?;
                            Kind::Bool
                        }
                        Some(b'n') => {
                            self.literal(b"null")?;
                            Kind::Null
                        }
                        _ => return Err(self.error()),
                    };
                    finish_value(
                        stack.len(),
                        role,
                        kind,
                        (start, self.pos),
                        &mut current,
                        &mut found,
                    );
                    state = State::AfterValue;
                }
                State::AfterValue => {
                    let open = stack.last().copied();
                    match (open, self.peek()) {
                        (Some(b'{'), Some(b',')) => {
                            self.pos += 1;
                            state = State::ObjectKey;
                        }
                        (Some(b'['), Some(b',')) => {
                            self.pos += 1;
                            role = Role::None;
                            state = State::Value;
                        }
                        (Some(b'{'), Some(b'}')) | (Some(b'['), Some(b']')) => {
                            if self.close(&mut stack, &shallow, &mut current, &mut found)? {
                                break;
                            }
                        }
                        _ => return Err(self.error()),
                    }
                }
            }
        }

        self.skip_ws();
        if self.pos != self.input.len() {
            return Err(self.error());
        }
        match ambiguity {
            Some(ambiguity) => Err(ScanError::Ambiguous(ambiguity)),
            None => Ok(found),
        }
    }

    /// Whether the key at `at` (raw contents `key`), directly inside a container at `depth` and
    /// given `role`, makes the document ambiguous.
    fn ambiguity(
        &self,
        key: &[u8],
        escaped: bool,
        at: usize,
        depth: usize,
        role: Role,
        folded_metas: &mut usize,
    ) -> Option<Ambiguity> {
        if depth == 1 && key_folds_to(key, escaped, self.meta) {
            *folded_metas += 1;
            if *folded_metas > 1 || role != Role::Meta {
                return Some(Ambiguity::Metadata(at));
            }
        }
        // The one place the layer writes the stamp: its exact name in the top-level metadata
        // object (`role` is only `Stamp` there). Anywhere else, any case, is refused, except the
        // metadata member itself should both fields have one name.
        if !matches!(role, Role::Stamp | Role::Meta) && key_folds_to(key, escaped, self.stamp) {
            return Some(Ambiguity::Stamp(at));
        }
        None
    }

    /// Closes the container whose closing bracket is at `self.pos`. Returns whether it was the
    /// top-level object.
    fn close(
        &mut self,
        stack: &mut Vec<u8>,
        shallow: &Shallow,
        current: &mut Option<MetaMember>,
        found: &mut Scan,
    ) -> Result<bool, ScanError> {
        let depth = stack.len();
        let open = stack.pop().ok_or(ScanError::Syntax(self.pos))?;
        self.pos += 1;
        if depth == 1 {
            return Ok(true);
        }
        let (start, role) = shallow.get(depth).copied().unwrap_or((0, Role::None));
        let kind = if open == b'{' {
            Kind::Object
        } else {
            Kind::Array
        };
        finish_value(depth - 1, role, kind, (start, self.pos), current, found);
        Ok(false)
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn error(&self) -> ScanError {
        ScanError::Syntax(self.pos)
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string starting at the `"` under the cursor. Returns the span of its contents (without the
    /// quotes) and whether it contains escapes.
    fn string(&mut self) -> Result<(usize, usize, bool), ScanError> {
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        loop {
            let rest = self.input.get(self.pos..).unwrap_or_default();
            let Some(offset) = find_string_special(rest) else {
                self.pos = self.input.len();
                return Err(self.error());
            };
            self.pos += offset;
            match self.peek() {
                Some(b'"') => {
                    let end = self.pos;
                    self.pos += 1;
                    return Ok((start, end, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1;
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            for _ in 0..4 {
                                if !self.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
                                    return Err(self.error());
                                }
                                self.pos += 1;
                            }
                        }
                        _ => return Err(self.error()),
                    }
                }
                // A raw control character.
                _ => return Err(self.error()),
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error()),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.required_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.required_digits()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn required_digits(&mut self) -> Result<(), ScanError> {
        if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
            return Err(self.error());
        }
        self.digits();
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), ScanError> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        if rest.starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            // Point at the first differing byte.
            let same = rest.iter().zip(word).take_while(|(a, b)| a == b).count();
            self.pos += same;
            Err(self.error())
        }
    }
}

/// Records a finished value of `kind` spanning `span`, directly inside a container at `depth`.
#[inline]
fn finish_value(
    depth: usize,
    role: Role,
    kind: Kind,
    span: (usize, usize),
    current: &mut Option<MetaMember>,
    found: &mut Scan,
) {
    match depth {
        1 => {
            found.top_last_value_end = Some(span.1);
            if role == Role::Meta {
                let member = match current.take() {
                    Some(mut member) if kind == Kind::Object => {
                        member.value = span;
                        member
                    }
                    _ => MetaMember {
                        kind,
                        value: span,
                        last_value_end: None,
                        stamps: Vec::new(),
                    },
                };
                found.metas.push(member);
            }
        }
        2 => {
            if let Some(meta) = current {
                let prev_value_end = meta.last_value_end.replace(span.1);
                if role == Role::Stamp {
                    meta.stamps.push(StampMember {
                        prev_value_end,
                        value: span,
                    });
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
