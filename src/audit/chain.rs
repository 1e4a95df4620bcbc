//! The per-owner hash chain: hashing an event, and checking a chain.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::AuditEvent;

/// A SHA-256 hash in the chain, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The `prev_hash` of an owner's first event.
    pub const ZERO: Self = Self([0; 32]);

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The inverse of [`to_hex`](Self::to_hex).
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A position in a chain: a sequence number and the hash of the event there (`seq` 0 and
/// [`ChainHash::ZERO`]: before the first event).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainLink {
    /// The sequence number.
    pub seq: u64,
    /// The hash of the event with that number.
    pub hash: ChainHash,
}

/// What the store knows about an owner's chain besides its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainState {
    /// The last event purged by retention (the start of the chain when none was).
    pub anchor: ChainLink,
    /// The last event written.
    pub head: ChainLink,
}

/// The answer of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Every event from the anchor to the head is there, in order, unchanged.
    Valid {
        /// How many events were checked.
        checked: u64,
    },
    /// The chain is broken.
    Invalid {
        /// The first event that does not fit (`None` when events after the last one present are
        /// missing).
        first_invalid: Option<String>,
        /// Its sequence number where it was found (or the first missing one).
        seq: u64,
        /// What is wrong: `hash` (the event was changed), `link` (an event before it is missing,
        /// changed or moved), `missing` (events at the end are gone).
        reason: &'static str,
        /// How many events were found valid before it.
        checked: u64,
    },
}

/// Checks a chain page by page: start with [`Checker::new`], feed the events in sequence order,
/// then [`finish`](Checker::finish).
#[derive(Debug)]
pub(crate) struct Checker {
    state: ChainState,
    last: ChainLink,
    checked: u64,
    broken: Option<Verification>,
}

impl Checker {
    pub(crate) fn new(state: ChainState) -> Self {
        Self {
            state,
            last: state.anchor,
            checked: 0,
            broken: None,
        }
    }

    /// Whether a break was found (further events change nothing).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    pub(crate) fn feed(&mut self, event: &AuditEvent) {
        if self.broken.is_some() {
            return;
        }
        let invalid = |reason| Verification::Invalid {
            first_invalid: Some(event.id.clone()),
            seq: event.seq,
            reason,
            checked: self.checked,
        };
        if event.compute_hash() != event.hash {
            self.broken = Some(invalid("hash"));
        } else if event.seq != self.last.seq + 1 || event.prev_hash != self.last.hash {
            self.broken = Some(invalid("link"));
        } else {
            self.last = ChainLink {
                seq: event.seq,
                hash: event.hash,
            };
            self.checked += 1;
        }
    }

    pub(crate) fn finish(self) -> Verification {
        if let Some(broken) = self.broken {
            return broken;
        }
        if self.last != self.state.head {
            return Verification::Invalid {
                first_invalid: None,
                seq: self.last.seq + 1,
                reason: "missing",
                checked: self.checked,
            };
        }
        Verification::Valid {
            checked: self.checked,
        }
    }
}

/// Checks `events` (one owner's, in sequence order, from the first after the anchor) against the
/// chain's `state`.
pub fn verify<'a>(
    state: ChainState,
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Verification {
    let mut checker = Checker::new(state);
    for event in events {
        checker.feed(event);
    }
    checker.finish()
}

/// See [`AuditEvent::compute_hash`].
pub(super) fn hash_event(event: &AuditEvent) -> ChainHash {
    let mut h = Sha256::new();
    let mut field = |bytes: Option<&[u8]>| match bytes {
        Some(bytes) => {
            h.update(
                u32::try_from(bytes.len())
                    .unwrap_or(u32::MAX - 1)
                    .to_be_bytes(),
            );
            h.update(bytes);
        }
        None => h.update(u32::MAX.to_be_bytes()),
    };
    let d = &event.draft;
    field(Some(&event.seq.to_be_bytes()));
    field(Some(&event.prev_hash.0));
    field(Some(d.id.as_bytes()));
    field(Some(d.event_type.as_str().as_bytes()));
    let micros = d.at.unix_timestamp_nanos().div_euclid(1_000) as i64;
    field(Some(&micros.to_be_bytes()));
    field(Some(d.actor.kind.as_str().as_bytes()));
    field(d.actor.key_id.as_ref().map(|k| k.as_str().as_bytes()));
    field(d.actor.name.as_deref().map(str::as_bytes));
    let ip = d.ip.map(|ip| ip.to_string());
    field(ip.as_deref().map(str::as_bytes));
    field(d.request_id.as_deref().map(str::as_bytes));
    field(d.key_id.as_ref().map(|k| k.as_str().as_bytes()));
    field(Some(d.owner_id.as_bytes()));
    field(d.account_id.as_deref().map(str::as_bytes));
    let mut details = String::new();
    canonical(&Value::Object(d.details.clone()), &mut details);
    field(Some(details.as_bytes()));
    ChainHash(h.finalize().into())
}

/// JSON with object keys sorted, no whitespace: the same bytes whatever order a store kept.
pub(crate) fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Actor, EventDraft, EventType, Origin};
    use super::*;

    fn chain(n: usize) -> (ChainState, Vec<AuditEvent>) {
        let mut link = ChainLink::default();
        let mut events = Vec::new();
        for i in 0..n {
            let event = EventDraft::new(
                EventType::KEY_CREATED,
                Actor::master(),
                &Origin::default(),
                "o",
            )
            .detail("i", i as u64)
            .seal(link);
            link = ChainLink {
                seq: event.seq,
                hash: event.hash,
            };
            events.push(event);
        }
        (
            ChainState {
                anchor: ChainLink::default(),
                head: link,
            },
            events,
        )
    }

    #[test]
    fn an_intact_chain_is_valid_and_each_kind_of_break_is_named() {
        let (state, events) = chain(5);
        assert_eq!(verify(state, &events), Verification::Valid { checked: 5 });

        let mut edited = events.clone();
        edited[2].draft.details.insert("i".into(), 99.into());
        let Verification::Invalid {
            first_invalid,
            reason,
            ..
        } = verify(state, &edited)
        else {
            panic!("an edit went unnoticed")
        };
        assert_eq!(
            (first_invalid.as_deref(), reason),
            (Some(events[2].id.as_str()), "hash")
        );

        let mut deleted = events.clone();
        deleted.remove(1);
        let Verification::Invalid {
            first_invalid,
            reason,
            ..
        } = verify(state, &deleted)
        else {
            panic!("a deletion went unnoticed")
        };
        assert_eq!(
            (first_invalid.as_deref(), reason),
            (Some(events[2].id.as_str()), "link")
        );

        let mut tail = events.clone();
        tail.pop();
        assert!(matches!(
            verify(state, &tail),
            Verification::Invalid {
                first_invalid: None,
                reason: "missing",
                seq: 5,
                ..
            }
        ));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let mut a = String::new();
        canonical(
            &serde_json::json!({"b": 1, "a": {"d": [1, "x"], "c": null}}),
            &mut a,
        );
        assert_eq!(a, r#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#);
    }
}
