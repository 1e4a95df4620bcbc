//! What the instances of a fleet tell each other besides invalidations: heartbeats (the roster) and
//! acknowledgements, and the wire form of all three; the settings each subscription gets.
//!
//! Wire forms (JSON, one message per `NOTIFY` / `PUBLISH`):
//! - on the invalidation channel, `{"seq":N,"key_id":…,"digests":[…]}` (an [`Invalidation`] with
//!   its sequence number; an older reader ignores `seq`), and `{"seq":N,"format":"reload"}` (the
//!   keyed format's secrets changed in the store: reload them; an older reader, which cannot read
//!   it, clears its cache);
//! - on the fleet channel (the invalidation channel's name + `_fleet`), heartbeats
//!   `{"beat":"<instance>","at":<unix ns>,"head":N,"applied":M}` and acknowledgements
//!   `{"ack":"<instance>","seq":N}`, with `"ended":{"seq":S,"requests":R}` when the instance applied
//!   invalidation `S` itself: `R` requests were in flight under its keys there and it ended them
//!   before acknowledging. Keeping them apart lets instances of an earlier version, which
//!   only listen on the invalidation channel, run beside these ones during a rolling upgrade.

use std::time::Duration;

use super::Invalidation;
use super::board::Board;

/// A message of the fleet protocol, as received.
#[derive(Debug, PartialEq)]
pub(crate) enum Message {
    /// An invalidation; `seq` is `None` from a publisher that does not sequence.
    Invalidate {
        seq: Option<u64>,
        invalidation: Invalidation,
    },
    /// The keyed format's secrets changed in the store: reload them
    /// ([`CachedResolver::reload_format`](crate::resolver::CachedResolver::reload_format)).
    Format { seq: Option<u64> },
    /// A heartbeat: `instance` is alive, sent at `at` (its own clock, Unix nanoseconds), saw the
    /// log up to `head` and has applied everything up to `applied`.
    Beat {
        instance: String,
        /// Random per subscription: tells a subscription's own heartbeats from those of another
        /// instance given the same name.
        token: u64,
        at: i64,
        head: u64,
        applied: u64,
    },
    /// `instance` applied everything up to `seq`; `ended`: it applied invalidation `.0` itself,
    /// and `.1` requests were in flight under its keys there (ended before this acknowledgement).
    Ack {
        instance: String,
        seq: u64,
        ended: Option<(u64, u64)>,
    },
}

impl Message {
    /// Parses any of the wire forms; `None` if the text is none of them.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Fleet {
            beat: Option<String>,
            ack: Option<String>,
            #[serde(default)]
            token: u64,
            #[serde(default)]
            at: i64,
            #[serde(default)]
            head: u64,
            #[serde(default)]
            applied: u64,
            #[serde(default)]
            seq: Option<u64>,
            #[serde(default)]
            format: Option<String>,
            #[serde(default)]
            ended: Option<Ended>,
        }
        #[derive(serde::Deserialize)]
        struct Ended {
            seq: u64,
            requests: u64,
        }
        let fleet: Fleet = serde_json::from_str(text).ok()?;
        match (fleet.beat, fleet.ack) {
            (Some(instance), None) => Some(Self::Beat {
                instance,
                token: fleet.token,
                at: fleet.at,
                head: fleet.head,
                applied: fleet.applied,
            }),
            (None, Some(instance)) => Some(Self::Ack {
                instance,
                seq: fleet.seq?,
                ended: fleet.ended.map(|ended| (ended.seq, ended.requests)),
            }),
            (None, None) if fleet.format.is_some() => Some(Self::Format { seq: fleet.seq }),
            (None, None) => Some(Self::Invalidate {
                seq: fleet.seq,
                invalidation: Invalidation::from_json(text)?,
            }),
            (Some(_), Some(_)) => None,
        }
    }

    /// The wire form of a sequenced message from its unsequenced `payload` (an invalidation's or
    /// [`FORMAT_PAYLOAD`]; PostgreSQL's: Redis's script writes its own).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn sequenced(seq: u64, payload: &str) -> String {
        let mut value: serde_json::Value = serde_json::from_str(payload).expect("our own JSON");
        value["seq"] = seq.into();
        value.to_string()
    }

    /// The wire form of a heartbeat, without its `head` (the backend adds it from the log, in the
    /// same statement): the JSON text up to, not including, the closing brace.
    pub(crate) fn beat_prefix(instance: &str, token: u64, at: i64, applied: u64) -> String {
        let mut text = serde_json::json!({
            "beat": instance, "token": token, "at": at, "applied": applied
        })
        .to_string();
        text.pop();
        text
    }

    /// The wire form of an acknowledgement (see [`Message::Ack`]).
    pub(crate) fn ack(instance: &str, seq: u64, ended: Option<(u64, u64)>) -> String {
        match ended {
            None => serde_json::json!({ "ack": instance, "seq": seq }),
            Some((of, requests)) => serde_json::json!({
                "ack": instance, "seq": seq, "ended": { "seq": of, "requests": requests }
            }),
        }
        .to_string()
    }
}

/// What the log and the channel carry (with its `seq` on the channel) for a change of the keyed
/// format's secrets.
pub(crate) const FORMAT_PAYLOAD: &str = r#"{"format":"reload"}"#;

/// The [`Invalidator`](super::Invalidator) of a broadcaster with a revocation log (`PostgresInvalidator`,
/// `RedisInvalidator`): every message goes through its `publish_payload`, which sequences it and
/// returns the roster of that moment, and its `fleet.board` collects the acknowledgements.
macro_rules! sequenced_invalidator {
    ($broadcaster:ty) => {
        #[async_trait::async_trait]
        impl $crate::invalidate::Invalidator for $broadcaster {
            async fn publish(
                &self,
                invalidation: &$crate::invalidate::Invalidation,
            ) -> Result<(), $crate::store::StoreError> {
                self.publish_payload(&invalidation.to_json())
                    .await
                    .map(|_| ())
            }

            async fn publish_sequenced(
                &self,
                invalidation: &$crate::invalidate::Invalidation,
            ) -> Result<Option<$crate::invalidate::Sequenced>, $crate::store::StoreError> {
                self.publish_payload(&invalidation.to_json())
                    .await
                    .map(Some)
            }

            async fn publish_format_change(
                &self,
            ) -> Result<Option<$crate::invalidate::Sequenced>, $crate::store::StoreError> {
                self.publish_payload($crate::invalidate::fleet::FORMAT_PAYLOAD)
                    .await
                    .map(Some)
            }

            async fn receipt(
                &self,
                published: &$crate::invalidate::Sequenced,
                deadline: std::time::Duration,
            ) -> $crate::invalidate::Receipt {
                self.fleet.board.wait(published, deadline).await
            }

            fn instance(&self) -> String {
                self.fleet
                    .board
                    .local()
                    .or_else(|| self.fleet.name.as_deref().map(str::to_owned))
                    .unwrap_or_else(|| $crate::invalidate::LOCAL_INSTANCE.to_owned())
            }
        }
    };
}
pub(super) use sequenced_invalidator;

/// The fleet settings an invalidator gives each of its subscriptions, and the board they share.
#[derive(Clone)]
pub(crate) struct FleetConfig {
    pub(crate) board: std::sync::Arc<Board>,
    pub(crate) name: Option<std::sync::Arc<str>>,
    pub(crate) heartbeat: Duration,
    pub(crate) roster_ttl: Duration,
}

impl Default for FleetConfig {
    /// A heartbeat every 250 ms; an instance leaves the roster 3 s after its last one.
    fn default() -> Self {
        Self {
            board: std::sync::Arc::default(),
            name: None,
            heartbeat: Duration::from_millis(250),
            roster_ttl: Duration::from_secs(3),
        }
    }
}

impl FleetConfig {
    /// The parameters of one new subscription (a new instance id).
    pub(crate) fn params(&self) -> FleetParams {
        FleetParams {
            board: self.board.clone(),
            instance: instance_id(self.name.as_deref()),
            token: {
                let mut bytes = [0u8; 8];
                let _ = getrandom::fill(&mut bytes);
                u64::from_le_bytes(bytes)
            },
            heartbeat: self.heartbeat,
            roster_ttl: self.roster_ttl,
        }
    }
}

/// The fleet side of a subscription: who it is, where it records what it hears, how often it beats.
pub(crate) struct FleetParams {
    pub(crate) board: std::sync::Arc<Board>,
    pub(crate) instance: String,
    /// Random: marks this subscription's own heartbeats.
    pub(crate) token: u64,
    pub(crate) heartbeat: Duration,
    pub(crate) roster_ttl: Duration,
}

/// A new instance id: `name` if given, else `<pid>-<8 random hex digits>`.
pub(crate) fn instance_id(name: Option<&str>) -> String {
    if let Some(name) = name {
        return name.to_owned();
    }
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    format!("{}-{:08x}", std::process::id(), u32::from_le_bytes(bytes))
}

/// The fleet channel beside an invalidation channel (at most 63 bytes: a PostgreSQL identifier).
pub(crate) fn fleet_channel(channel: &str) -> String {
    let mut end = channel.len().min(57);
    while !channel.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_fleet", &channel[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyDigest, KeyId};

    #[test]
    fn wire_forms_round_trip() {
        let invalidation = Invalidation {
            key_id: KeyId::new("key_1"),
            digests: vec![KeyDigest::of("a")],
        };
        let text = Message::sequenced(7, &invalidation.to_json());
        assert_eq!(
            Message::parse(&text),
            Some(Message::Invalidate {
                seq: Some(7),
                invalidation: invalidation.clone()
            })
        );
        // What an earlier version reads.
        assert_eq!(Invalidation::from_json(&text), Some(invalidation.clone()));
        assert_eq!(
            Message::parse(&invalidation.to_json()),
            Some(Message::Invalidate {
                seq: None,
                invalidation
            })
        );
        assert_eq!(
            Message::parse(&Message::sequenced(8, FORMAT_PAYLOAD)),
            Some(Message::Format { seq: Some(8) })
        );
        assert_eq!(
            Message::parse(FORMAT_PAYLOAD),
            Some(Message::Format { seq: None })
        );
        // What an earlier version reads: nothing (it clears its cache).
        assert_eq!(Invalidation::from_json(FORMAT_PAYLOAD), None);
        let beat = format!("{},\"head\":9}}", Message::beat_prefix("a-1", 77, 5, 8));
        assert_eq!(
            Message::parse(&beat),
            Some(Message::Beat {
                instance: "a-1".into(),
                token: 77,
                at: 5,
                head: 9,
                applied: 8
            })
        );
        assert_eq!(
            Message::parse(&Message::ack("b", 3, None)),
            Some(Message::Ack {
                instance: "b".into(),
                seq: 3,
                ended: None,
            })
        );
        assert_eq!(
            Message::parse(&Message::ack("b", 4, Some((3, 2)))),
            Some(Message::Ack {
                instance: "b".into(),
                seq: 4,
                ended: Some((3, 2)),
            })
        );
        // An acknowledgement of an earlier version (no `ended`) still reads.
        assert_eq!(
            Message::parse(r#"{"ack":"b","seq":3}"#),
            Some(Message::Ack {
                instance: "b".into(),
                seq: 3,
                ended: None,
            })
        );
        for bad in [
            "",
            "{}",
            r#"{"ack":"a"}"#,
            r#"{"beat":"a","ack":"b","seq":1}"#,
        ] {
            assert_eq!(Message::parse(bad), None, "{bad}");
        }
        assert_eq!(fleet_channel(&"c".repeat(63)).len(), 63);
    }
}
