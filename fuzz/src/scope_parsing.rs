//! `Scope` / `ScopeSet` parsing, `is_valid_scope`, `allows` and `covers`, against a model of the
//! grammar (`resource:action`, each part `[a-z0-9_-]+` or `*`, a lone `*` meaning `*:*`, at most 128
//! bytes) and of wildcard matching.

use tower_api_keys::scope::MAX_SCOPE_LEN;
use tower_api_keys::scope::{Scope, ScopeSet, is_valid_scope};

/// Input: text (lossy UTF-8). The whole text, and every space- or comma-separated item, is parsed as
/// a scope; the text is parsed as a `ScopeSet`; its `|`-separated parts make the sets whose
/// `allows` / `covers` are compared.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_scope(&text);
    let items: Vec<&str> = text.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    for item in &items {
        check_scope(item);
    }
    check_set(&text, &items);

    let sets: Vec<ScopeSet> = text
        .split('|')
        .take(3)
        .map(|part| {
            part.split([' ', ','])
                .filter_map(|s| Scope::parse(s).ok())
                .collect()
        })
        .collect();
    let mut samples: Vec<Scope> = vec![Scope::everything()];
    for scope in sets.iter().flatten() {
        for (resource, action) in [
            (scope.resource(), scope.action()),
            ("*", scope.action()),
            (scope.resource(), "*"),
            (scope.resource(), "read"),
            ("ledgers", scope.action()),
        ] {
            // Some combinations are longer than a scope may be.
            samples.extend(Scope::new(resource, action).ok());
        }
    }
    for a in &sets {
        check_matching(a, &samples);
        assert!(a.covers(a));
        for b in &sets {
            check_delegation(a, b, &samples);
            for c in &sets {
                if a.covers(b) && b.covers(c) {
                    assert!(a.covers(c), "covers is not transitive: {a} / {b} / {c}");
                }
            }
        }
    }
}

/// The grammar, written out.
fn model_valid(s: &str) -> bool {
    fn part_ok(part: &str) -> bool {
        part == "*"
            || (!part.is_empty()
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                }))
    }
    if s.len() > MAX_SCOPE_LEN {
        return false;
    }
    if s == "*" {
        return true;
    }
    match s.split_once(':') {
        Some((resource, action)) => part_ok(resource) && part_ok(action),
        None => false,
    }
}

fn check_scope(s: &str) {
    let parsed = Scope::parse(s);
    assert_eq!(parsed.is_ok(), model_valid(s), "{s:?}");
    assert_eq!(is_valid_scope(s), parsed.is_ok(), "{s:?}");
    match parsed {
        Ok(scope) => {
            let shown = scope.to_string();
            assert_eq!(shown, if s == "*" { "*:*" } else { s });
            assert_eq!(shown, scope.as_str());
            assert_eq!(format!("{}:{}", scope.resource(), scope.action()), shown);
            assert_eq!(Scope::parse(&shown).as_ref(), Ok(&scope));
            assert_eq!(
                Scope::new(scope.resource(), scope.action()).as_ref(),
                Ok(&scope)
            );
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
        Err(error) => {
            // The error names the input, cut to a readable length on a character boundary.
            let named = error.scope();
            if s.len() <= MAX_SCOPE_LEN {
                assert_eq!(named, s);
            } else {
                let cut = named.strip_suffix('…').unwrap();
                assert!(s.starts_with(cut) && cut.len() > MAX_SCOPE_LEN - 4);
            }
            assert!(serde_json::from_str::<Scope>(&serde_json::to_string(s).unwrap()).is_err());
        }
    }
}

fn check_set(text: &str, items: &[&str]) {
    match text.parse::<ScopeSet>() {
        Ok(set) => {
            assert!(items.iter().all(|item| model_valid(item)));
            assert!(set.len() <= items.len());
            for item in items {
                assert!(set.iter().any(|s| *s == Scope::parse(item).unwrap()));
            }
            // Sorted, without duplicates, and round-trips through Display and serde.
            assert!(set.iter().zip(set.iter().skip(1)).all(|(a, b)| a < b));
            assert_eq!(set.to_string().parse::<ScopeSet>().as_ref(), Ok(&set));
            let json = serde_json::to_string(&set).unwrap();
            assert_eq!(serde_json::from_str::<ScopeSet>(&json).unwrap(), set);
            assert_eq!(set.to_strings().len(), set.len());
        }
        Err(error) => {
            let first_bad = items.iter().find(|item| !model_valid(item));
            let first_bad = first_bad.unwrap_or_else(|| panic!("{text:?} refused: {error}"));
            assert_eq!(Scope::parse(first_bad).unwrap_err(), error);
        }
    }
}

/// `allows` of a scope is wildcard matching per part; a set allows what any member allows.
fn check_matching(set: &ScopeSet, samples: &[Scope]) {
    fn part(granted: &str, required: &str) -> bool {
        granted == "*" || granted == required
    }
    for required in samples {
        for granted in set {
            assert_eq!(
                granted.allows(required),
                part(granted.resource(), required.resource())
                    && part(granted.action(), required.action()),
                "{granted} / {required}"
            );
        }
        assert_eq!(set.allows(required), set.iter().any(|g| g.allows(required)));
    }
}

/// `covers` is "allows every member", and it is sound: a set covering another allows every scope the
/// other allows, so a delegated key never holds more than its creator.
fn check_delegation(a: &ScopeSet, b: &ScopeSet, samples: &[Scope]) {
    let covers = a.covers(b);
    assert_eq!(covers, b.iter().all(|s| a.allows(s)));
    assert_eq!(covers, a.allows_all(b));
    assert_eq!(covers, a.uncovered(b).next().is_none());
    assert_eq!(a.allows_any(b), b.iter().any(|s| a.allows(s)));
    if covers {
        for required in samples {
            if b.allows(required) {
                assert!(a.allows(required), "{a} covers {b} but not {required}");
            }
        }
    }
}
