//! Scopes: `resource:action` permissions, wildcard matching and delegation.
//!
//! Grammar: `resource:action`, each part `[a-z0-9_-]+` or `*`; a lone `*` means `*:*`.
//! `*:*` grants everything, `*:read` grants `read` on every resource, `ledgers:*` grants every action on
//! `ledgers`. Anything else is a [`ScopeError`], never a scope that silently grants nothing.
//!
//! ```
//! use tower_api_keys::scope::{Scope, ScopeSet};
//!
//! let granted: ScopeSet = "ledgers:* *:read".parse().unwrap();
//! assert!(granted.allows(&"ledgers:write".parse::<Scope>().unwrap()));
//! assert!(granted.allows(&"balances:read".parse::<Scope>().unwrap()));
//! assert!(!granted.allows(&"balances:write".parse::<Scope>().unwrap()));
//!
//! // delegation: a key may only hand out what it holds
//! assert!(granted.covers(&"ledgers:read balances:read".parse().unwrap()));
//! assert!(!granted.covers(&"*:*".parse().unwrap()));
//!
//! assert!("Ledgers:Read".parse::<Scope>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest scope string accepted.
pub const MAX_SCOPE_LEN: usize = 128;

/// Why a string is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}: {reason}")]
pub struct ScopeError {
    scope: String,
    reason: &'static str,
}

impl ScopeError {
    pub(crate) fn new(scope: &str, reason: &'static str) -> Self {
        let mut scope = scope.to_owned();
        if scope.len() > MAX_SCOPE_LEN {
            let mut cut = MAX_SCOPE_LEN;
            while !scope.is_char_boundary(cut) {
                cut -= 1;
            }
            scope.truncate(cut);
            scope.push('…');
        }
        Self { scope, reason }
    }

    /// The offending input (cut to a readable length).
    pub fn scope(&self) -> &str {
        &self.scope
    }
}

/// Whether `s` is a valid scope. Usable in constants, so scope markers are checked at compile time.
pub const fn is_valid_scope(s: &str) -> bool {
    validate(s.as_bytes()).is_ok()
}

const fn validate(b: &[u8]) -> Result<usize, &'static str> {
    if b.is_empty() {
        return Err("a scope cannot be empty");
    }
    if b.len() > MAX_SCOPE_LEN {
        return Err("a scope is at most 128 characters");
    }
    if b.len() == 1 && b[0] == b'*' {
        return Ok(0);
    }
    let mut colon = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b':' {
            if colon.is_some() {
                return Err("a scope has exactly one ':'");
            }
            colon = Some(i);
        } else if !(c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == b'_'
            || c == b'-'
            || c == b'*')
        {
            return Err("use resource:action with [a-z0-9_-] or '*'");
        }
        i += 1;
    }
    let Some(colon) = colon else {
        return Err("expected resource:action");
    };
    if colon == 0 || colon == b.len() - 1 {
        return Err("both resource and action must be present");
    }
    if !part_ok(b, 0, colon) || !part_ok(b, colon + 1, b.len()) {
        return Err("'*' must stand alone in its part");
    }
    Ok(colon)
}

const fn part_ok(b: &[u8], start: usize, end: usize) -> bool {
    if end - start == 1 {
        return true;
    }
    let mut i = start;
    while i < end {
        if b[i] == b'*' {
            return false;
        }
        i += 1;
    }
    true
}

/// One `resource:action` permission. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    text: Arc<str>,
    colon: u8,
}

impl Scope {
    /// Parses and validates a scope; `*` is normalised to `*:*`.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        match validate(s.as_bytes()) {
            Ok(0) => Ok(Self::everything()),
            Ok(colon) => Ok(Self {
                text: s.into(),
                colon: colon as u8,
            }),
            Err(reason) => Err(ScopeError::new(s, reason)),
        }
    }

    /// `*:*`.
    pub fn everything() -> Self {
        Self {
            text: "*:*".into(),
            colon: 1,
        }
    }

    /// A scope from its two parts, validated.
    pub fn new(resource: &str, action: &str) -> Result<Self, ScopeError> {
        Self::parse(&format!("{resource}:{action}"))
    }

    /// The resource part (`*` for any).
    pub fn resource(&self) -> &str {
        &self.text[..usize::from(self.colon)]
    }

    /// The action part (`*` for any).
    pub fn action(&self) -> &str {
        &self.text[usize::from(self.colon) + 1..]
    }

    /// The scope as written, e.g. `ledgers:read`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether holding `self` grants `required`. A wildcard in `required` is only granted by the same
    /// wildcard (or a wider one): `ledgers:read` does not grant `*:read`.
    pub fn allows(&self, required: &Scope) -> bool {
        part_allows(self.resource(), required.resource())
            && part_allows(self.action(), required.action())
    }
}

fn part_allows(granted: &str, required: &str) -> bool {
    granted == "*" || granted == required
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Scope {
    type Error = ScopeError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Scope::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A set of scopes held by a key or required by a route: sorted, without duplicates, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet {
    scopes: Arc<[Scope]>,
}

impl ScopeSet {
    /// Whether another handle shares this set's allocation (for the resolver's interner).
    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.scopes) > 1
    }

    /// The empty set: grants nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses every item; the first invalid one is the error.
    pub fn parse<I, S>(scopes: I) -> Result<Self, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        scopes
            .into_iter()
            .map(|s| Scope::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::from)
    }

    /// Whether any scope in the set grants `required`.
    pub fn allows(&self, required: &Scope) -> bool {
        self.scopes.iter().any(|granted| granted.allows(required))
    }

    /// Whether any scope in the set grants the already-validated scope string `required`.
    /// Allocation-free; used by compile-time scope markers.
    #[cfg(feature = "axum")]
    pub(crate) fn allows_str(&self, required: &str) -> bool {
        // The set is sorted by text: a scope held as written is one binary search away (the
        // common case); only then are wildcards looked at.
        if self
            .scopes
            .binary_search_by(|granted| granted.as_str().cmp(required))
            .is_ok()
        {
            return true;
        }
        let (resource, action) = required.split_once(':').unwrap_or(("*", "*"));
        self.scopes
            .iter()
            .any(|g| part_allows(g.resource(), resource) && part_allows(g.action(), action))
    }

    /// Whether the set grants every scope of `required` (an empty `required` is always granted).
    pub fn allows_all(&self, required: &ScopeSet) -> bool {
        required.iter().all(|r| self.allows(r))
    }

    /// Whether the set grants at least one scope of `required` (an empty `required` is never granted).
    pub fn allows_any(&self, required: &ScopeSet) -> bool {
        required.iter().any(|r| self.allows(r))
    }

    /// Delegation: whether everything `other` grants is also granted by `self`, so a key holding
    /// `self` may create a key holding `other` without escalating.
    pub fn covers(&self, other: &ScopeSet) -> bool {
        self.allows_all(other)
    }

    /// The scopes of `other` that `self` does not cover.
    pub fn uncovered<'a>(&'a self, other: &'a ScopeSet) -> impl Iterator<Item = &'a Scope> + 'a {
        other.iter().filter(move |s| !self.allows(s))
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> std::slice::Iter<'_, Scope> {
        self.scopes.iter()
    }

    /// Number of distinct scopes.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The scopes as strings, in order.
    pub fn to_strings(&self) -> Vec<String> {
        self.iter().map(|s| s.as_str().to_owned()).collect()
    }
}

impl From<Vec<Scope>> for ScopeSet {
    fn from(mut scopes: Vec<Scope>) -> Self {
        scopes.sort();
        scopes.dedup();
        Self {
            scopes: scopes.into(),
        }
    }
}

impl From<Scope> for ScopeSet {
    fn from(scope: Scope) -> Self {
        Self {
            scopes: Arc::new([scope]),
        }
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl FromStr for ScopeSet {
    type Err = ScopeError;
    /// Scopes separated by spaces or commas.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.split([' ', ',']).filter(|s| !s.is_empty()))
    }
}

impl<'a> IntoIterator for &'a ScopeSet {
    type Item = &'a Scope;
    type IntoIter = std::slice::Iter<'a, Scope>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s.as_str())?;
        }
        Ok(())
    }
}

impl serde::Serialize for ScopeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for ScopeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Scope>::deserialize(d).map(Self::from)
    }
}

/// How a set of required scopes is matched: all of them, or any one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeMatch {
    /// Every scope is required.
    All,
    /// Any one scope suffices.
    Any,
}

impl ScopeMatch {
    /// `all` or `any`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Any => "any",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(x: &str) -> Scope {
        x.parse().unwrap()
    }

    #[test]
    fn grammar() {
        for ok in [
            "ledgers:read",
            "*:*",
            "*:read",
            "ledgers:*",
            "a-b_c:d9",
            "api-keys:write",
        ] {
            assert_eq!(Scope::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(s("*").as_str(), "*:*");
        for bad in [
            "",
            ":",
            "ledgers",
            "ledgers:",
            ":read",
            "Ledgers:read",
            "ledgers:read:x",
            "led*:read",
            "ledgers:re*",
            "**:read",
            "ledgers read",
            "ledgers:réad",
            " ledgers:read",
        ] {
            let err = Scope::parse(bad).unwrap_err();
            assert_eq!(err.scope(), bad);
            assert!(!is_valid_scope(bad));
        }
        let long = format!("{}:read", "a".repeat(200));
        let err = Scope::parse(&long).unwrap_err();
        assert!(err.scope().len() < 140);
    }

    #[test]
    fn wildcards() {
        assert!(s("*:*").allows(&s("ledgers:read")));
        assert!(s("*:*").allows(&s("*:read")));
        assert!(s("*:read").allows(&s("balances:read")));
        assert!(!s("*:read").allows(&s("balances:write")));
        assert!(s("ledgers:*").allows(&s("ledgers:delete")));
        assert!(!s("ledgers:*").allows(&s("balances:delete")));
        assert!(!s("ledgers:read").allows(&s("*:read")));
        assert!(!s("ledgers:read").allows(&s("ledgers:*")));
        assert!(!s("ledgers:read").allows(&s("ledgers:readx")));
    }

    #[test]
    fn sets() {
        let held: ScopeSet = "ledgers:read, balances:* ledgers:read".parse().unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held.to_string(), "balances:* ledgers:read");
        assert!(held.allows_all(&"ledgers:read balances:write".parse().unwrap()));
        assert!(!held.allows_all(&"ledgers:read ledgers:write".parse().unwrap()));
        assert!(held.allows_any(&"ledgers:read ledgers:write".parse().unwrap()));
        assert!(!held.allows_any(&ScopeSet::empty()));
        assert!(held.allows_all(&ScopeSet::empty()));
        let wanted: ScopeSet = "ledgers:write balances:read".parse().unwrap();
        assert!(!held.covers(&wanted));
        assert_eq!(
            held.uncovered(&wanted)
                .map(Scope::as_str)
                .collect::<Vec<_>>(),
            ["ledgers:write"]
        );
        assert!(ScopeSet::parse(["ok:read", "bad"]).is_err());
        let json = serde_json::to_string(&held).unwrap();
        assert_eq!(json, r#"["balances:*","ledgers:read"]"#);
        assert_eq!(serde_json::from_str::<ScopeSet>(&json).unwrap(), held);
        assert!(serde_json::from_str::<ScopeSet>(r#"["nope"]"#).is_err());
    }

    fn part() -> impl Strategy<Value = String> {
        prop_oneof![Just("*".to_owned()), "[a-c]{1,2}"]
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in "\\PC{0,40}") {
            let parsed = Scope::parse(&input);
            prop_assert_eq!(parsed.is_ok(), is_valid_scope(&input));
        }

        #[test]
        fn allows_matches_the_definition(gr in part(), ga in part(), rr in part(), ra in part()) {
            let g = Scope::new(&gr, &ga).unwrap();
            let r = Scope::new(&rr, &ra).unwrap();
            let expected = (gr == "*" || gr == rr) && (ga == "*" || ga == ra);
            prop_assert_eq!(g.allows(&r), expected);
        }

        #[cfg(feature = "axum")]
        #[test]
        fn allows_str_agrees_with_allows(
            held in prop::collection::vec((part(), part()), 0..5),
            (rr, ra) in (part(), part()),
        ) {
            let set: ScopeSet = held.iter().map(|(r, a)| Scope::new(r, a).unwrap()).collect();
            let required = Scope::new(&rr, &ra).unwrap();
            prop_assert_eq!(set.allows_str(required.as_str()), set.allows(&required));
        }

        #[test]
        fn covers_is_reflexive_and_transitive(
            a in prop::collection::vec((part(), part()), 0..4),
            b in prop::collection::vec((part(), part()), 0..4),
            c in prop::collection::vec((part(), part()), 0..4),
        ) {
            let set = |v: &Vec<(String, String)>| v.iter().map(|(r, a)| Scope::new(r, a).unwrap()).collect::<ScopeSet>();
            let (a, b, c) = (set(&a), set(&b), set(&c));
            prop_assert!(a.covers(&a));
            if a.covers(&b) && b.covers(&c) {
                prop_assert!(a.covers(&c));
            }
            // covering means: whatever b allows, a allows too
            if a.covers(&b) {
                for s in b.iter() { prop_assert!(a.allows(s)); }
            }
        }
    }
}
