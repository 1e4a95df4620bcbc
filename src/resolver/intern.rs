//! Sharing of the strings and scope sets that many keys hold alike.
//!
//! A store decodes every record afresh (new strings, a newly parsed scope set); a cache of a million
//! keys from a thousand owners would hold a thousand copies of each owner, account and scope set.
//! The resolver passes them through an [`Interner`] on the way into the cache, so equal values share
//! one allocation. Values only the interner still holds are dropped when the pool has doubled since
//! its last sweep, so the pool stays proportional to what the cache holds.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::scope::ScopeSet;

/// A value that can be shared, and that can tell whether anyone but the pool still holds it.
pub(super) trait Shared: Clone + Eq + Hash {
    fn held_elsewhere(&self) -> bool;
}

impl Shared for Arc<str> {
    fn held_elsewhere(&self) -> bool {
        Arc::strong_count(self) > 1
    }
}

impl Shared for ScopeSet {
    fn held_elsewhere(&self) -> bool {
        self.is_shared()
    }
}

/// Sweeps start once a pool holds this many values.
const FIRST_SWEEP: usize = 1024;

struct Pool<T> {
    values: HashSet<T>,
    sweep_at: usize,
}

impl<T: Shared> Pool<T> {
    /// The pooled value equal to `value`, pooling `make()` if there is none (one lookup on a hit).
    fn get_or_insert<Q>(&mut self, value: &Q, make: impl FnOnce() -> T) -> T
    where
        T: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(existing) = self.values.get(value) {
            return existing.clone();
        }
        if self.values.len() >= self.sweep_at {
            self.values.retain(Shared::held_elsewhere);
            self.sweep_at = (self.values.len() * 2).max(FIRST_SWEEP);
        }
        let made = make();
        self.values.insert(made.clone());
        made
    }
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Self {
            values: HashSet::new(),
            sweep_at: FIRST_SWEEP,
        }
    }
}

/// Pools of owner/account strings and of scope sets.
#[derive(Default)]
pub(super) struct Interner {
    strings: Mutex<Pool<Arc<str>>>,
    scopes: Mutex<Pool<ScopeSet>>,
}

impl Interner {
    pub(super) fn string(&self, value: &str) -> Arc<str> {
        let mut pool = self.strings.lock().unwrap_or_else(|p| p.into_inner());
        pool.get_or_insert(value, || Arc::from(value))
    }

    pub(super) fn scopes(&self, value: &ScopeSet) -> ScopeSet {
        let mut pool = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        pool.get_or_insert(value, || value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_allocation() {
        let interner = Interner::default();
        let a = interner.string("team-a");
        let b = interner.string(&String::from("team-a"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &interner.string("team-b")));
        let x: ScopeSet = "ledgers:read balances:read".parse().unwrap();
        let y: ScopeSet = "balances:read ledgers:read".parse().unwrap();
        let (x, y) = (interner.scopes(&x), interner.scopes(&y));
        assert_eq!(x, y);
        // One set held by the two interned values and the pool.
        drop(y);
        assert!(x.is_shared(), "the pool shares the set");
    }

    /// Values nobody holds any more are swept once the pool has doubled: it stays proportional to
    /// what is held.
    #[test]
    fn unheld_values_are_swept() {
        let interner = Interner::default();
        let held: Vec<_> = (0..10)
            .map(|i| interner.string(&format!("held {i}")))
            .collect();
        for i in 0..10 * FIRST_SWEEP {
            drop(interner.string(&format!("dropped {i}")));
        }
        let pool = interner.strings.lock().unwrap();
        assert!(
            pool.values.len() <= FIRST_SWEEP,
            "{} values pooled",
            pool.values.len()
        );
        for value in &held {
            assert!(pool.values.contains(value), "a held value was swept");
        }
    }
}
