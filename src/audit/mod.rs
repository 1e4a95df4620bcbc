//! The audit trail: an [`AuditEvent`] for every change to a key and every refused power
//! operation, written by the store **in the same transaction as the change**, hash-chained per
//! owner so that an edited, deleted or reordered row is found ([`verify`]).
//!
//! # Writing events with a change
//!
//! [`KeyManager`](crate::manage::KeyManager) builds an [`EventDraft`] for each change and hands it
//! to the store inside a [`Journal`] (`KeyStore::insert_with`, `revoke_with`, ...). The store
//! completes the drafts from what the change did ([`Journal::for_change`]: a cascade count, a
//! before/after diff), seals them onto the owner's chain ([`EventDraft::seal`]) and writes them in
//! the transaction that writes the change: no change without its event, no event without its
//! change. A revocation that changed nothing writes nothing. Later features (leak reports,
//! webhooks) add their own [`EventType`]s and ride the same path; the SQL stores funnel every event
//! through one `append` function per store, where an outbox can be written in the same
//! transaction too.
//!
//! # The chain
//!
//! Each owner's events are numbered from 1 ([`AuditEvent::seq`]); each carries the hash of the one
//! before it ([`AuditEvent::prev_hash`]; zeros for the first) and its own [`AuditEvent::hash`]:
//! SHA-256 over a canonical, length-prefixed encoding of every field, `prev_hash` included
//! ([`AuditEvent::compute_hash`]). The store also keeps the chain's head (the last sequence number
//! and hash), so deleting the newest rows is found too. Purging by retention ([`Retention`](crate::store::Retention))
//! removes the oldest events and records the last removed one as the chain's *anchor*: the chain
//! stays checkable from the first kept event.
//!
//! Secrets never enter an event: the details name ids, names, scopes, limits and times.

pub(crate) mod chain;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) use chain::canonical as canonical_json;
pub use chain::{ChainHash, ChainLink, ChainState, Verification, verify};

use crate::key::KeyId;
use crate::record::{KeyChange, KeyRecord};

/// What happened: `key.created`, `key.rotated`, ... Later features add their own (any
/// `area.verb` string of at most 64 characters).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Cow<'static, str>);

impl EventType {
    /// A key was created (details: scopes, expiry, limits, networks, creator).
    pub const KEY_CREATED: Self = Self(Cow::Borrowed("key.created"));
    /// A key got a new secret (details: the grace period's end, the cascade).
    pub const KEY_ROTATED: Self = Self(Cow::Borrowed("key.rotated"));
    /// A key was revoked (details: the reason, how many descendants the cascade revoked).
    pub const KEY_REVOKED: Self = Self(Cow::Borrowed("key.revoked"));
    /// A key's record was deleted (details: the cascade).
    pub const KEY_DELETED: Self = Self(Cow::Borrowed("key.deleted"));
    /// A key's name or limits changed (details: `before` and `after` of each changed field).
    pub const KEY_UPDATED: Self = Self(Cow::Borrowed("key.updated"));
    /// A power operation the rule refused (details: the operation and the error code). Its
    /// `key_id` is the targeted key when that is one of the chain owner's keys; an attempt on an
    /// unknown id or another owner's key names it in `target_key_id` instead.
    pub const KEY_REFUSED: Self = Self(Cow::Borrowed("key.refused"));
    /// A shared pool was set or removed (details: the pool and its limits).
    pub const POOL_SET: Self = Self(Cow::Borrowed("pool.set"));
    /// A secret scanner reported a key as leaked (details: the report's `url` and `source`, the
    /// action taken). Once per key and report location.
    pub const KEY_LEAKED: Self = Self(Cow::Borrowed("key.leaked"));
    /// The hygiene sweeper warned that a key expires soon (details: the warning window, the
    /// expiry). Once per key, window and expiry.
    pub const KEY_EXPIRING: Self = Self(Cow::Borrowed("key.expiring"));
    /// The hygiene sweeper found a key unused for its idle time (details: the last use, whether
    /// it was revoked). Once per idle spell.
    pub const KEY_IDLE: Self = Self(Cow::Borrowed("key.idle"));

    /// The types this crate writes today.
    pub const KNOWN: [Self; 10] = [
        Self::KEY_CREATED,
        Self::KEY_ROTATED,
        Self::KEY_REVOKED,
        Self::KEY_DELETED,
        Self::KEY_UPDATED,
        Self::KEY_REFUSED,
        Self::POOL_SET,
        Self::KEY_LEAKED,
        Self::KEY_EXPIRING,
        Self::KEY_IDLE,
    ];

    /// A type named `name`: `[a-z0-9_]+` parts joined by dots, at most 64 characters. `None`
    /// otherwise.
    pub fn new(name: impl Into<Cow<'static, str>>) -> Option<Self> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        ok.then_some(Self(name))
    }

    /// The type's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Who acted: the master key, or a scoped key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    /// The master key from the server configuration.
    Master,
    /// A scoped key.
    Key,
}

impl ActorKind {
    /// `master` or `key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Key => "key",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "master" => Some(Self::Master),
            "key" => Some(Self::Key),
            _ => None,
        }
    }
}

/// The actor of an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Actor {
    /// Master or scoped key.
    pub kind: ActorKind,
    /// The acting key's id (`None` for the master key).
    pub key_id: Option<KeyId>,
    /// The acting key's name, as it was when it acted.
    pub name: Option<String>,
}

impl Actor {
    /// The master key.
    pub fn master() -> Self {
        Self {
            kind: ActorKind::Master,
            key_id: None,
            name: None,
        }
    }

    /// The actor a principal is.
    pub fn of(principal: &crate::principal::Principal) -> Self {
        if principal.is_master() {
            return Self::master();
        }
        Self {
            kind: ActorKind::Key,
            key_id: Some(principal.key_id().clone()),
            name: Some(principal.name().to_owned()),
        }
    }
}

/// Where a management call came from: the actor's address and the request id, when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The peer address (or, behind trusted proxies, the forwarded client address).
    pub ip: Option<IpAddr>,
    /// The request id (`x-request-id`), when the request had one.
    pub request_id: Option<String>,
}

/// An event before the store seals it onto its owner's chain.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    /// Unique id (`evt_` and a time-ordered ULID).
    pub id: String,
    /// What happened.
    pub event_type: EventType,
    /// When (floored to the microsecond: what the SQL stores keep).
    pub at: OffsetDateTime,
    /// Who did it.
    pub actor: Actor,
    /// From where.
    pub ip: Option<IpAddr>,
    /// The request id, when there was one.
    pub request_id: Option<String>,
    /// The key it is about.
    pub key_id: Option<KeyId>,
    /// The owner whose chain it joins.
    pub owner_id: String,
    /// The key's account, when it is about a key.
    pub account_id: Option<String>,
    /// What else there is to say: a JSON object.
    pub details: Map<String, Value>,
}

impl EventDraft {
    /// A draft of `event_type` by `actor` from `origin`, in `owner_id`'s chain, now.
    pub fn new(
        event_type: EventType,
        actor: Actor,
        origin: &Origin,
        owner_id: impl Into<String>,
    ) -> Self {
        Self {
            id: event_id(),
            event_type,
            at: floor_micros(OffsetDateTime::now_utc()),
            actor,
            ip: origin.ip,
            request_id: origin.request_id.clone(),
            key_id: None,
            owner_id: owner_id.into(),
            account_id: None,
            details: Map::new(),
        }
    }

    /// About `record` (its id and account).
    #[must_use]
    pub fn about(mut self, record: &KeyRecord) -> Self {
        self.key_id = Some(record.id.clone());
        self.account_id = Some(record.account.clone());
        self
    }

    /// With a detail.
    #[must_use]
    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.details.insert(name.to_owned(), value.into());
        self
    }

    /// The sealed event: number `prev.seq + 1` of its owner's chain, after `prev`.
    pub fn seal(self, prev: ChainLink) -> AuditEvent {
        let mut event = AuditEvent {
            seq: prev.seq + 1,
            prev_hash: prev.hash,
            hash: ChainHash::ZERO,
            draft: self,
        };
        event.hash = event.compute_hash();
        event
    }
}

/// One event of the audit trail, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// Everything but the chain fields.
    pub draft: EventDraft,
    /// Its number in its owner's chain, from 1.
    pub seq: u64,
    /// The hash of the event before it (zeros for the first).
    pub prev_hash: ChainHash,
    /// Its own hash ([`compute_hash`](Self::compute_hash)).
    pub hash: ChainHash,
}

impl std::ops::Deref for AuditEvent {
    type Target = EventDraft;
    fn deref(&self) -> &EventDraft {
        &self.draft
    }
}

impl AuditEvent {
    /// SHA-256 over the canonical encoding of every field but `hash`: each as a 4-byte big-endian
    /// length and its bytes, in a fixed order (`seq`, `prev_hash`, id, type, `at` in Unix
    /// microseconds, actor kind, actor key id, actor name, ip, request id, key id, owner, account,
    /// details as JSON with object keys sorted); an absent field is the length `0xFFFFFFFF`.
    pub fn compute_hash(&self) -> ChainHash {
        chain::hash_event(self)
    }

    /// The event as the management API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.event_type,
            "at": self.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "actor": self.actor,
            "ip": self.ip.map(|ip| ip.to_string()),
            "request_id": self.request_id,
            "key_id": self.key_id,
            "owner_id": self.owner_id,
            "account_id": self.account_id,
            "details": self.details,
        })
    }
}

/// The events to write with one change, and how the store completes them from what it changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Journal {
    events: Vec<EventDraft>,
    fill: Fill,
}

/// How [`Journal::for_change`] completes its drafts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Fill {
    #[default]
    Nothing,
    /// `descendants_revoked`: how many descendants the change revoked.
    Cascade,
    /// `changes`: each changed field's `before` and `after`.
    Diff,
}

impl Journal {
    /// No events: a change written without an audit trail (store-level tools and tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// One event, written as it is.
    pub fn of(event: EventDraft) -> Self {
        Self {
            events: vec![event],
            fill: Fill::Nothing,
        }
    }

    /// The store adds `descendants_revoked` (how many keys the change's cascade revoked) to each
    /// event's details.
    #[must_use]
    pub fn with_cascade(mut self) -> Self {
        self.fill = Fill::Cascade;
        self
    }

    /// The store adds `changes` (`{field: {before, after}}` of the name, scopes, expiry and limits
    /// that differ) to each event's details.
    #[must_use]
    pub fn with_diff(mut self) -> Self {
        self.fill = Fill::Diff;
        self
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The drafts as given (for a change with nothing to complete them from: an insert, a pool).
    pub fn events(&self) -> &[EventDraft] {
        &self.events
    }

    /// The drafts completed from `change`; none when the change changed nothing
    /// ([`KeyChange::is_noop`]): no event without its change.
    pub fn for_change(&self, change: &KeyChange) -> Vec<EventDraft> {
        if change.is_noop() {
            return Vec::new();
        }
        let mut events = self.events.clone();
        for event in &mut events {
            match self.fill {
                Fill::Nothing => {}
                Fill::Cascade => {
                    event.details.insert(
                        "descendants_revoked".into(),
                        change.revoked_descendants.len().into(),
                    );
                }
                Fill::Diff => {
                    let after = change.after.as_ref().unwrap_or(&change.before);
                    event
                        .details
                        .insert("changes".into(), Value::Object(diff(&change.before, after)));
                }
            }
        }
        events
    }
}

/// The grants and name of a key as events show them (never its digest).
pub fn grants(record: &KeyRecord) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("name".into(), record.name.clone().into());
    map.insert(
        "scopes".into(),
        record
            .scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .into(),
    );
    map.insert("expires_at".into(), timestamp(record.expires_at));
    map.insert(
        "rate_limit".into(),
        record.limits.rate_limit.map_or(
            Value::Null,
            |r| json!({"limit": r.limit, "period_seconds": r.period_seconds}),
        ),
    );
    map.insert(
        "credits".into(),
        record.limits.credits.map_or(Value::Null, |c| {
            json!({"remaining": c.remaining, "refill": c.refill.map(|r| json!({
                "amount": r.amount, "interval": format!("{:?}", r.interval).to_lowercase()}))})
        }),
    );
    map.insert(
        "allowed_networks".into(),
        record
            .allowed_networks
            .as_ref()
            .map_or(Value::Null, |n| n.to_string().into()),
    );
    map
}

/// `{field: {before, after}}` for every field of [`grants`] that differs.
fn diff(before: &KeyRecord, after: &KeyRecord) -> Map<String, Value> {
    let (b, a) = (grants(before), grants(after));
    b.into_iter()
        .filter_map(|(field, old)| {
            let new = a.get(&field).cloned().unwrap_or(Value::Null);
            (old != new).then(|| (field, json!({"before": old, "after": new})))
        })
        .collect()
}

/// An RFC 3339 timestamp, or null.
pub(crate) fn timestamp(at: Option<OffsetDateTime>) -> Value {
    at.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .map_or(Value::Null, Value::String)
}

/// `t` in UTC, floored to the microsecond (the precision the SQL stores keep).
pub(crate) fn floor_micros(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// A new event id: `evt_` and 26 Crockford base-32 characters (48 bits of milliseconds, 80 random).
pub fn event_id() -> String {
    let id = KeyId::generate();
    format!("evt_{}", &id.as_str()["key_".len()..])
}

/// Which events to read ([`KeyStore::events`](crate::store::KeyStore::events)), newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Whose chain.
    pub owner: String,
    /// Only events about these keys (a scoped reader's subtree), when set.
    pub key_ids: Option<Vec<KeyId>>,
    /// Only of this type.
    pub event_type: Option<EventType>,
    /// Only at or after.
    pub since: Option<OffsetDateTime>,
    /// Only before.
    pub until: Option<OffsetDateTime>,
    /// Only with a sequence number below this one: the cursor of the previous page.
    pub before_seq: Option<u64>,
    /// At most this many.
    pub limit: u32,
}

impl EventQuery {
    /// Whether `event` is one the query asks for (before the cursor and the limit).
    pub fn matches(&self, event: &AuditEvent) -> bool {
        event.owner_id == self.owner
            && self
                .key_ids
                .as_ref()
                .is_none_or(|ids| event.key_id.as_ref().is_some_and(|id| ids.contains(id)))
            && self
                .event_type
                .as_ref()
                .is_none_or(|t| *t == event.event_type)
            && self.since.is_none_or(|s| event.at >= s)
            && self.until.is_none_or(|u| event.at < u)
            && self.before_seq.is_none_or(|b| event.seq < b)
    }
}
