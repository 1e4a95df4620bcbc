//! What the instances of a fleet tell each other besides invalidations: heartbeats (the roster) and
//! acknowledgements, the wire form of all three, and the board where acknowledgements are collected
//! into a [`Receipt`].
//!
//! Wire forms (JSON, one message per `NOTIFY` / `PUBLISH`):
//! - on the invalidation channel, `{"seq":N,"key_id":…,"digests":[…]}` (an [`Invalidation`] with
//!   its sequence number; an older reader ignores `seq`), and `{"seq":N,"format":"reload"}` (the
//!   keyed format's secrets changed in the store: reload them; an older reader, which cannot read
//!   it, clears its cache);
//! - on the fleet channel (the invalidation channel's name + `_fleet`), heartbeats
//!   `{"beat":"<instance>","at":<unix ns>,"head":N,"applied":M}` and acknowledgements
//!   `{"ack":"<instance>","seq":N}`. Keeping them apart lets instances of an earlier version, which
//!   only listen on the invalidation channel, run beside these ones during a rolling upgrade.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

#[cfg(any(feature = "postgres", feature = "redis"))]
use super::Invalidation;
#[cfg(any(feature = "postgres", feature = "redis"))]
use std::collections::{BTreeMap, HashMap};
#[cfg(any(feature = "postgres", feature = "redis"))]
use std::sync::Mutex;
#[cfg(any(feature = "postgres", feature = "redis"))]
use tokio::sync::watch;

#[allow(unused_imports)] // used with `metrics` and a fleet backend
use crate::metrics::{
    ACKNOWLEDGEMENT_SECONDS, APPLIED_SEQUENCE, FLEET_INSTANCES, LAGGARDS_TOTAL,
    OLDEST_UNACKNOWLEDGED_SECONDS,
};

/// Response header of an acknowledged revocation (`DELETE /api-keys/{id}`, 204): how many of the
/// live instances acknowledged it before the answer.
pub const ACKNOWLEDGED_HEADER: &str = "revocation-acknowledged";
/// Response header: how many instances were live (in the roster) when it was published.
pub const INSTANCES_HEADER: &str = "revocation-instances";
/// Response header: milliseconds (three decimals) from publishing to the last acknowledgement, or
/// to the deadline when one was missing.
pub const ELAPSED_HEADER: &str = "revocation-elapsed-ms";
/// Response header: the sequence number of the (last) invalidation in the fleet's revocation log.
pub const SEQUENCE_HEADER: &str = "revocation-sequence";

#[cfg(any(feature = "postgres", feature = "redis"))]
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
    /// `instance` applied everything up to `seq`.
    Ack { instance: String, seq: u64 },
}

#[cfg(any(feature = "postgres", feature = "redis"))]
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

    /// The wire form of an acknowledgement.
    pub(crate) fn ack(instance: &str, seq: u64) -> String {
        serde_json::json!({ "ack": instance, "seq": seq }).to_string()
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// What the log and the channel carry (with its `seq` on the channel) for a change of the keyed
/// format's secrets.
pub(crate) const FORMAT_PAYLOAD: &str = r#"{"format":"reload"}"#;

#[cfg(any(feature = "postgres", feature = "redis"))]
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
        }
    };
}
#[cfg(any(feature = "postgres", feature = "redis"))]
pub(super) use sequenced_invalidator;

#[cfg(any(feature = "postgres", feature = "redis"))]
/// The fleet settings an invalidator gives each of its subscriptions, and the board they share.
#[derive(Clone)]
pub(crate) struct FleetConfig {
    pub(crate) board: std::sync::Arc<Board>,
    pub(crate) name: Option<std::sync::Arc<str>>,
    pub(crate) heartbeat: Duration,
    pub(crate) roster_ttl: Duration,
}

#[cfg(any(feature = "postgres", feature = "redis"))]
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

#[cfg(any(feature = "postgres", feature = "redis"))]
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
#[cfg(any(feature = "postgres", feature = "redis"))]
pub(crate) struct FleetParams {
    pub(crate) board: std::sync::Arc<Board>,
    pub(crate) instance: String,
    /// Random: marks this subscription's own heartbeats.
    pub(crate) token: u64,
    pub(crate) heartbeat: Duration,
    pub(crate) roster_ttl: Duration,
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// A new instance id: `name` if given, else `<pid>-<8 random hex digits>`.
pub(crate) fn instance_id(name: Option<&str>) -> String {
    if let Some(name) = name {
        return name.to_owned();
    }
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    format!("{}-{:08x}", std::process::id(), u32::from_le_bytes(bytes))
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// The fleet channel beside an invalidation channel (at most 63 bytes: a PostgreSQL identifier).
pub(crate) fn fleet_channel(channel: &str) -> String {
    let mut end = channel.len().min(57);
    while !channel.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_fleet", &channel[..end])
}

/// An invalidation as published: its sequence number, when, and the instances that were live then
/// (the ones a [`Receipt`] waits for).
#[derive(Clone, Debug)]
pub struct Sequenced {
    /// The sequence number the shared log gave it.
    pub sequence: u64,
    /// The roster when it was published: instances that had beaten within the roster's lifetime.
    pub live: Vec<String>,
    /// When it was published (this process's clock).
    pub published_at: Instant,
}

/// What a fleet said about an invalidation: how many of the instances live when it was published
/// have applied it, and which have not (the laggards), after how long.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Receipt {
    /// The highest sequence number waited for (`None`: the invalidator does not sequence, or
    /// publishing failed).
    pub sequence: Option<u64>,
    /// Instances live when it was published.
    pub instances: usize,
    /// Of those, how many acknowledged it by the deadline.
    pub acknowledged: usize,
    /// The instances that had not (their ids, sorted).
    pub laggards: Vec<String>,
    /// From publishing to the last acknowledgement, or to the deadline if one was missing.
    pub elapsed: Duration,
}

impl Receipt {
    /// Every live instance acknowledged (and there was a sequenced publication, and a roster: an
    /// empty one, before any instance has beaten, vouches for nobody).
    pub fn is_complete(&self) -> bool {
        self.sequence.is_some() && self.instances > 0 && self.laggards.is_empty()
    }

    /// The response headers that report it (none when nothing was sequenced): see
    /// [`ACKNOWLEDGED_HEADER`], [`INSTANCES_HEADER`], [`ELAPSED_HEADER`], [`SEQUENCE_HEADER`].
    pub fn headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let Some(sequence) = self.sequence else {
            return Vec::new();
        };
        let elapsed = format!("{:.3}", self.elapsed.as_secs_f64() * 1000.0);
        [
            (ACKNOWLEDGED_HEADER, self.acknowledged.to_string()),
            (INSTANCES_HEADER, self.instances.to_string()),
            (ELAPSED_HEADER, elapsed),
            (SEQUENCE_HEADER, sequence.to_string()),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            Some((
                http::HeaderName::from_static(name),
                http::HeaderValue::try_from(value).ok()?,
            ))
        })
        .collect()
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acknowledged by {} of {} instances in {:?}",
            self.acknowledged, self.instances, self.elapsed
        )
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// Where one invalidator's subscriptions record what they heard: each instance's applied sequence
/// (from acknowledgements and heartbeats) and when it was last heard; and the publications still
/// waiting for acknowledgements. Shared by an invalidator and its subscriptions.
#[derive(Default)]
pub(crate) struct Board {
    state: Mutex<BoardState>,
    changed: watch::Sender<u64>,
    /// Subscriptions of this invalidator running now: without one, nobody hears acknowledgements.
    listening: std::sync::atomic::AtomicUsize,
}

#[cfg(any(feature = "postgres", feature = "redis"))]
/// A running subscription's mark on its board (given back when dropped).
pub(crate) struct Listening(std::sync::Arc<Board>);

#[cfg(any(feature = "postgres", feature = "redis"))]
impl Listening {
    pub(crate) fn new(board: std::sync::Arc<Board>) -> Self {
        board
            .listening
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(board)
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
impl Drop for Listening {
    fn drop(&mut self) {
        self.0
            .listening
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(any(feature = "postgres", feature = "redis"))]
#[derive(Default)]
struct BoardState {
    /// Instance → (applied sequence, last heard).
    heard: HashMap<String, (u64, Instant)>,
    /// Publications some live instance has not acknowledged: sequence → (published, instances).
    pending: BTreeMap<u64, (Instant, Vec<String>)>,
}

#[cfg(any(feature = "postgres", feature = "redis"))]
impl Board {
    /// `instance` has applied everything up to `seq`.
    pub(crate) fn record(&self, instance: &str, seq: u64) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let entry = state.heard.entry(instance.to_owned()).or_insert((0, now));
            entry.0 = entry.0.max(seq);
            entry.1 = now;
            let applied = entry.0;
            state.pending.retain(|&pending, (_, live)| {
                if pending <= applied {
                    live.retain(|id| id != instance);
                }
                !live.is_empty()
            });
        }
        self.changed.send_modify(|version| *version += 1);
    }

    /// Which of `live` have not applied `seq`.
    fn missing(&self, seq: u64, live: &[String]) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .filter(|id| {
                state
                    .heard
                    .get(*id)
                    .is_none_or(|(applied, _)| *applied < seq)
            })
            .cloned()
            .collect()
    }

    /// Waits until every instance of `published.live` has applied its sequence, or `deadline`
    /// (from publication) has passed. Without a running subscription of this invalidator nothing
    /// can be heard: an empty receipt at once.
    pub(crate) async fn wait(&self, published: &Sequenced, deadline: Duration) -> Receipt {
        if self.listening.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return Receipt::default();
        }
        let mut changed = self.changed.subscribe();
        let until = published.published_at + deadline;
        let mut missing = self.missing(published.sequence, &published.live);
        if !missing.is_empty() {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.pending.insert(
                published.sequence,
                (published.published_at, missing.clone()),
            );
        }
        while !missing.is_empty() {
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => missing = self.missing(published.sequence, &published.live),
                _ => break,
            }
        }
        missing.sort();
        Receipt {
            sequence: Some(published.sequence),
            instances: published.live.len(),
            acknowledged: published.live.len() - missing.len(),
            laggards: missing,
            elapsed: published.published_at.elapsed().min(deadline),
        }
    }

    /// Live instances heard within `within`, and the age of the oldest publication some of them
    /// have not acknowledged (publications waiting only for instances no longer heard are dropped).
    pub(crate) fn survey(&self, within: Duration) -> (usize, Duration) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        state
            .heard
            .retain(|_, (_, at)| now.duration_since(*at) <= within * 10);
        let live: Vec<String> = state
            .heard
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) <= within)
            .map(|(id, _)| id.clone())
            .collect();
        state.pending.retain(|_, (_, waiting)| {
            waiting.retain(|id| live.contains(id));
            !waiting.is_empty()
        });
        let oldest = state
            .pending
            .values()
            .map(|(at, _)| now.duration_since(*at))
            .max()
            .unwrap_or_default();
        (live.len(), oldest)
    }
}

/// Records the metrics of a finished receipt and logs its laggards.
pub(crate) fn report(receipt: &Receipt) {
    if receipt.is_complete() {
        #[cfg(feature = "metrics")]
        ::metrics::histogram!(ACKNOWLEDGEMENT_SECONDS).record(receipt.elapsed.as_secs_f64());
        tracing::debug!(sequence = receipt.sequence, %receipt, "API key invalidation acknowledged by every live instance");
    } else if receipt.sequence.is_some() {
        for laggard in &receipt.laggards {
            #[cfg(feature = "metrics")]
            ::metrics::counter!(LAGGARDS_TOTAL, "instance" => laggard.clone()).increment(1);
            tracing::warn!(
                sequence = receipt.sequence,
                instance = %laggard,
                "API key invalidation not acknowledged by this instance before the deadline; it stops \
                 vouching for its cache within the freshness bound"
            );
        }
    }
}

#[cfg(all(test, any(feature = "postgres", feature = "redis")))]
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
            Message::parse(&Message::ack("b", 3)),
            Some(Message::Ack {
                instance: "b".into(),
                seq: 3
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

    #[tokio::test]
    async fn a_receipt_waits_for_every_live_instance_up_to_the_deadline() {
        let board = std::sync::Arc::new(Board::default());
        let published = Sequenced {
            sequence: 5,
            live: vec!["a".into()],
            published_at: Instant::now(),
        };
        assert_eq!(
            board.wait(&published, Duration::from_secs(5)).await,
            Receipt::default(),
            "nobody listens"
        );
        let _listening = Listening::new(board.clone());
        let published = Sequenced {
            sequence: 5,
            live: vec!["a".into(), "b".into()],
            published_at: Instant::now(),
        };
        board.record("a", 4);
        board.record("b", 6);
        let receipt = board.wait(&published, Duration::from_millis(30)).await;
        assert_eq!(receipt.laggards, ["a"]);
        assert_eq!((receipt.acknowledged, receipt.instances), (1, 2));
        assert!(!receipt.is_complete());
        assert_eq!(board.survey(Duration::from_secs(1)).0, 2);
        board.record("a", 5);
        assert_eq!(board.survey(Duration::from_secs(1)).1, Duration::ZERO);
        let receipt = board.wait(&published, Duration::from_secs(5)).await;
        assert!(receipt.is_complete(), "{receipt:?}");
        let headers = receipt.headers();
        assert_eq!(headers[0].0, ACKNOWLEDGED_HEADER);
        assert_eq!(headers[0].1, "2");
        assert!(Receipt::default().headers().is_empty());
    }
}
