//! Where one invalidator's subscriptions record what they heard (each instance's applied sequence,
//! the requests in flight each ended) and where a [`Receipt`] is waited for.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::receipt::{Receipt, Sequenced};

/// Where one invalidator's subscriptions record what they heard: each instance's applied sequence
/// (from acknowledgements and heartbeats) and when it was last heard; and the publications still
/// waiting for acknowledgements. Shared by an invalidator and its subscriptions.
#[derive(Default)]
pub(crate) struct Board {
    state: Mutex<BoardState>,
    changed: watch::Sender<u64>,
    /// Subscriptions of this invalidator running now: without one, nobody hears acknowledgements.
    listening: AtomicUsize,
}

/// A running subscription's mark on its board (given back when dropped).
pub(crate) struct Listening(Arc<Board>);

impl Listening {
    /// Marks the subscription of `instance` (this process's) as running.
    pub(crate) fn new(board: Arc<Board>, instance: &str) -> Self {
        board.listening.fetch_add(1, Ordering::AcqRel);
        board
            .state()
            .local
            .get_or_insert_with(|| instance.to_owned());
        Self(board)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.listening.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct BoardState {
    /// Instance → (applied sequence, last heard).
    heard: HashMap<String, (u64, Instant)>,
    /// Publications some live instance has not acknowledged: sequence → (published, instances).
    pending: BTreeMap<u64, (Instant, Vec<String>)>,
    /// Requests in flight each instance ended on applying an invalidation: sequence → instance →
    /// requests (the last [`ENDED_KEPT`] sequences).
    ended: BTreeMap<u64, BTreeMap<String, u64>>,
    /// The instance id of this invalidator's first subscription (this process).
    local: Option<String>,
}

/// How many sequences' ended counts a board keeps: far more than a manager waits for at once.
const ENDED_KEPT: usize = 4096;

impl Board {
    /// The board's state, locked (a poisoned lock is taken as it is, as everywhere in the crate).
    fn state(&self) -> MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of this process's instance: its first subscription's, if one ever ran.
    pub(crate) fn local(&self) -> Option<String> {
        let state = self.state();
        state.local.clone()
    }

    /// `instance` ended `requests` in flight on applying invalidation `seq` (recorded before its
    /// acknowledgement, so a receipt that waited for it has it).
    pub(crate) fn record_ended(&self, instance: &str, seq: u64, requests: u64) {
        let mut state = self.state();
        *state
            .ended
            .entry(seq)
            .or_default()
            .entry(instance.to_owned())
            .or_default() += requests;
        while state.ended.len() > ENDED_KEPT {
            state.ended.pop_first();
        }
    }

    /// `instance` has applied everything up to `seq`.
    pub(crate) fn record(&self, instance: &str, seq: u64) {
        {
            let mut state = self.state();
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
        let state = self.state();
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
        if self.listening.load(Ordering::Acquire) == 0 {
            return Receipt::default();
        }
        let mut changed = self.changed.subscribe();
        let until = published.published_at + deadline;
        let mut missing = self.missing(published.sequence, &published.live);
        if !missing.is_empty() {
            let mut state = self.state();
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
        let requests_ended = {
            let state = self.state();
            state
                .ended
                .get(&published.sequence)
                .cloned()
                .unwrap_or_default()
        };
        Receipt {
            sequence: Some(published.sequence),
            instances: published.live.len(),
            acknowledged: published.live.len() - missing.len(),
            laggards: missing,
            elapsed: published.published_at.elapsed().min(deadline),
            requests_ended,
        }
    }

    /// Live instances heard within `within`, and the age of the oldest publication some of them
    /// have not acknowledged (publications waiting only for instances no longer heard are dropped).
    pub(crate) fn survey(&self, within: Duration) -> (usize, Duration) {
        let mut state = self.state();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidate::ACKNOWLEDGED_HEADER;

    #[tokio::test]
    async fn a_receipt_waits_for_every_live_instance_up_to_the_deadline() {
        let board = Arc::new(Board::default());
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
        let _listening = Listening::new(board.clone(), "a");
        assert_eq!(board.local().as_deref(), Some("a"));
        let published = Sequenced {
            sequence: 5,
            live: vec!["a".into(), "b".into()],
            published_at: Instant::now(),
        };
        board.record("a", 4);
        board.record_ended("b", 5, 2);
        board.record("b", 6);
        let receipt = board.wait(&published, Duration::from_millis(30)).await;
        assert_eq!(receipt.laggards, ["a"]);
        assert_eq!((receipt.acknowledged, receipt.instances), (1, 2));
        assert!(!receipt.is_complete());
        assert_eq!(board.survey(Duration::from_secs(1)).0, 2);
        board.record_ended("a", 5, 0);
        board.record("a", 5);
        assert_eq!(board.survey(Duration::from_secs(1)).1, Duration::ZERO);
        let receipt = board.wait(&published, Duration::from_secs(5)).await;
        assert!(receipt.is_complete(), "{receipt:?}");
        assert_eq!(
            receipt.requests_ended,
            BTreeMap::from([("a".to_owned(), 0), ("b".to_owned(), 2)])
        );
        assert_eq!(receipt.requests_ended_total(), 2);
        assert!(
            receipt
                .to_string()
                .ends_with("requests in flight ended: a 0, b 2"),
            "{receipt}"
        );
        let headers = receipt.headers();
        assert_eq!(headers[0].0, ACKNOWLEDGED_HEADER);
        assert_eq!(headers[0].1, "2");
        assert!(Receipt::default().headers().is_empty());
    }
}
