//! Coalescing of concurrent decisions over the same chain of levels (feature `redis`): while one
//! script call for a chain is in flight, the decisions that arrive for the same chain wait, and
//! then go together as one call, which decides them one after the other in the order they
//! arrived, atomically (what [`RedisRates`](super::RedisRates)' script does with several costs).
//! The outcome of each is exactly what it would have been had the calls been made back to back:
//! no decision is made on stale state, nothing is admitted beyond any level's limit.
//!
//! A lane (one per chain with a call in flight) is led by the decision that makes its call; when
//! the call is answered, the leader hands the lane to the first decision waiting (which calls for
//! every decision waiting then, at most [`MAX_BATCH`]), or closes it. A decision alone on its
//! chain calls at once, as without coalescing: coalescing costs nothing until calls overlap. A
//! leader dropped before its answer (its request was cancelled, or timed out) still hands the lane
//! on and tells the decisions of its batch that their call failed (what their fail mode decides;
//! their costs may have been counted, as for any call that timed out).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::store::{StoreError, StoreErrorKind};

/// The most decisions one call makes.
pub(super) const MAX_BATCH: usize = 128;

/// The reply of one decision: the integers the script returned for it.
pub(super) type Reply = Result<Vec<i64>, StoreError>;

/// Decisions waiting, per chain with a call in flight.
#[derive(Default)]
pub(super) struct Lanes {
    lanes: Mutex<HashMap<String, Vec<Waiter>>>,
}

/// A decision waiting for the call in flight on its chain to be answered.
struct Waiter {
    cost: u32,
    turn: oneshot::Sender<Turn>,
}

/// What a waiting decision is told.
enum Turn {
    /// Its reply (its call was made by another decision).
    Done(Reply),
    /// The lane is its: call for itself and these.
    Lead(Vec<Waiter>),
}

impl Lanes {
    /// Decides `cost` units on the chain `lane`: at once if no call for it is in flight, else
    /// with the decisions that arrive meanwhile, in one call. `call` makes one call for the costs
    /// given (in that order) and answers each one's reply, in the same order.
    pub(super) async fn decide<F, Fut>(&self, lane: String, cost: u32, call: F) -> Reply
    where
        F: FnOnce(Vec<u32>) -> Fut,
        Fut: Future<Output = Result<Vec<Vec<i64>>, StoreError>>,
    {
        let waiting = {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            match lanes.get_mut(&lane) {
                Some(waiters) => {
                    let (turn, told) = oneshot::channel();
                    waiters.push(Waiter { cost, turn });
                    Some(told)
                }
                None => {
                    lanes.insert(lane.clone(), Vec::new());
                    None
                }
            }
        };
        let batch = match waiting {
            None => Vec::new(),
            Some(told) => {
                let mut waiting = Waiting {
                    lanes: self,
                    lane: &lane,
                    told,
                    answered: false,
                };
                let turn = (&mut waiting.told).await;
                // Told: from here on the lane (if it was handed over) is `Leading`'s to hand on.
                waiting.answered = true;
                match turn {
                    Ok(Turn::Done(reply)) => return reply,
                    Ok(Turn::Lead(batch)) => batch,
                    // A leader always tells; a sender dropped untold is a bug, not a decision.
                    Err(_) => return Err(failed("the call for this decision was abandoned")),
                }
            }
        };
        let mut leading = Leading {
            lanes: self,
            lane,
            batch,
            answered: false,
        };
        // Decisions whose requests went away meanwhile are not asked for.
        leading.batch.retain(|waiter| !waiter.turn.is_closed());
        let costs = std::iter::once(cost)
            .chain(leading.batch.iter().map(|waiter| waiter.cost))
            .collect();
        let replies = call(costs).await;
        leading.finish(replies)
    }

    /// Gives the lane to the first decision waiting on it (with those after it, up to
    /// [`MAX_BATCH`] in all), or closes it when none is.
    fn hand_on(&self, lane: &str) {
        self.hand_on_with(lane, Vec::new());
    }

    /// [`hand_on`](Self::hand_on), with `first` waiting before the decisions on the lane (a
    /// batch whose leader went away before it could call for it).
    fn hand_on_with(&self, lane: &str, first: Vec<Waiter>) {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first = first;
        loop {
            let Some(waiters) = lanes.get_mut(lane) else {
                // A lane handed on is held until it is handed on again: not reached. Should it
                // be, those decisions fail rather than wait.
                for waiter in first {
                    let _ = waiter.turn.send(Turn::Done(Err(failed(
                        "the call for this decision was abandoned",
                    ))));
                }
                return;
            };
            if !first.is_empty() {
                waiters.splice(0..0, std::mem::take(&mut first));
            }
            if waiters.is_empty() {
                lanes.remove(lane);
                return;
            }
            let take = waiters.len().min(MAX_BATCH);
            let mut batch: Vec<Waiter> = waiters.drain(..take).collect();
            let next = batch.remove(0);
            // That decision went away (its lead comes back): the next one leads, with the rest.
            // Once sent, the lead is the receiver's, even should it go away before reading it
            // (`Waiting`'s drop hands it on then).
            let Err(Turn::Lead(rest)) = next.turn.send(Turn::Lead(batch)) else {
                return;
            };
            first = rest;
        }
    }

    /// Decisions waiting on `lane` (for tests).
    #[cfg(test)]
    fn waiting(&self, lane: &str) -> Option<usize> {
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        lanes.get(lane).map(Vec::len)
    }
}

fn failed(why: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, why)
}

/// A decision waiting on a lane. Dropped before it was told (its request went away, or timed
/// out), it makes sure no lead is lost with it: the channel is closed, so that a leader handing
/// on later sees it gone and tries the next decision, and a lead that arrived just before is
/// handed on from here. Without this, a lane whose lead went to a decision dropped before it read
/// it would have no leader again, and every later decision on that chain would wait out its
/// timeout.
struct Waiting<'a> {
    lanes: &'a Lanes,
    lane: &'a str,
    told: oneshot::Receiver<Turn>,
    /// Whether it read what it was told (then there is nothing to hand on here).
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.told.close();
        if let Ok(Turn::Lead(batch)) = self.told.try_recv() {
            self.lanes.hand_on_with(self.lane, batch);
        }
    }
}

/// The lane a decision leads, with the decisions of its call: handed on when answered, or when
/// dropped before.
struct Leading<'a> {
    lanes: &'a Lanes,
    lane: String,
    batch: Vec<Waiter>,
    /// Whether `finish` ran (else a drop hands the lane on and fails the batch).
    answered: bool,
}

impl Leading<'_> {
    /// Hands the lane on, then tells each decision of the batch its reply; the leader's own.
    fn finish(mut self, replies: Result<Vec<Vec<i64>>, StoreError>) -> Reply {
        self.answered = true;
        self.lanes.hand_on(&self.lane);
        let batch = std::mem::take(&mut self.batch);
        let replies = replies.and_then(|replies| match replies.len() == batch.len() + 1 {
            true => Ok(replies),
            false => Err(failed(
                "the rate-limit script answered another number of decisions",
            )),
        });
        match replies {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                let own = replies.next().expect("one reply per decision");
                for (waiter, reply) in batch.into_iter().zip(replies) {
                    let _ = waiter.turn.send(Turn::Done(Ok(reply)));
                }
                Ok(own)
            }
            Err(error) => {
                for waiter in batch {
                    let _ = waiter.turn.send(Turn::Done(Err(error.clone())));
                }
                Err(error)
            }
        }
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // The leader went away before its answer.
        self.lanes.hand_on(&self.lane);
        for waiter in self.batch.drain(..) {
            let _ = waiter.turn.send(Turn::Done(Err(failed(
                "the call for this decision was cancelled with the request that made it",
            ))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A "call" that answers each cost with `[cost, position in its batch, batch size]`, after a
    /// pause, counting calls.
    async fn call(calls: &AtomicUsize, costs: Vec<u32>) -> Result<Vec<Vec<i64>>, StoreError> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = costs.len() as i64;
        Ok(costs
            .into_iter()
            .enumerate()
            .map(|(i, cost)| vec![i64::from(cost), i as i64, n])
            .collect())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_decisions_share_calls_and_each_gets_its_own_reply() {
        let lanes = Arc::new(Lanes::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..40u32)
            .map(|cost| {
                let (lanes, calls) = (lanes.clone(), calls.clone());
                tokio::spawn(async move {
                    lanes
                        .decide("chain".into(), cost, |costs| call(&calls, costs))
                        .await
                })
            })
            .collect();
        let mut batch_sizes = Vec::new();
        for (cost, task) in tasks.into_iter().enumerate() {
            let reply = task.await.unwrap().unwrap();
            assert_eq!(reply[0], cost as i64, "each decision its own reply");
            batch_sizes.push(reply[2]);
        }
        let calls = calls.load(Ordering::SeqCst);
        assert!(calls < 40, "{calls} calls for 40 overlapping decisions");
        assert!(batch_sizes.iter().any(|&n| n > 1), "{batch_sizes:?}");
        assert_eq!(lanes.waiting("chain"), None, "the lane closes when idle");
        // Alone, a decision calls at once, by itself.
        let none = AtomicUsize::new(0);
        let alone = lanes
            .decide("other".into(), 7, |costs| call(&none, costs))
            .await
            .unwrap();
        assert_eq!(alone, vec![7, 0, 1]);
    }

    /// Polls `future` once, with a waker that does nothing.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        std::pin::Pin::new(future).poll(&mut cx)
    }

    /// A reply at once: `[cost, position in its batch, batch size]`.
    fn at_once(costs: Vec<u32>) -> std::future::Ready<Result<Vec<Vec<i64>>, StoreError>> {
        let n = costs.len() as i64;
        std::future::ready(Ok(costs
            .into_iter()
            .enumerate()
            .map(|(i, cost)| vec![i64::from(cost), i as i64, n])
            .collect()))
    }

    /// The lead handed to a waiting decision that goes away before it reads it (its request was
    /// cancelled at that moment, or timed out) is handed on: to the next decision waiting, or the
    /// lane closes. It used to be lost with it, leaving the lane without a leader for good: every
    /// later decision on that chain waited out its timeout (seen under load when wrk closed its
    /// connections between two runs).
    #[test]
    fn a_lead_handed_to_a_decision_that_went_away_is_handed_on() {
        use std::task::Poll;
        for others in [0, 1, 3] {
            let lanes = Lanes::default();
            let (open, gate) = oneshot::channel::<()>();
            // The leader: its call waits for the gate.
            let mut leader = Box::pin(lanes.decide("chain".into(), 1, |costs| async move {
                let _ = gate.await;
                at_once(costs).await
            }));
            assert!(poll_once(&mut leader).is_pending());
            // The decision that will be handed the lead, and `others` after it.
            let mut doomed = Box::pin(lanes.decide("chain".into(), 2, at_once));
            assert!(poll_once(&mut doomed).is_pending());
            let mut rest: Vec<_> = (0..others)
                .map(|i| Box::pin(lanes.decide("chain".into(), 10 + i, at_once)))
                .collect();
            for waiter in &mut rest {
                assert!(poll_once(waiter).is_pending());
            }
            assert_eq!(lanes.waiting("chain"), Some(1 + others as usize));
            // The leader is answered and hands the lane to `doomed`, which is dropped unread.
            open.send(()).unwrap();
            assert!(matches!(poll_once(&mut leader), Poll::Ready(Ok(r)) if r == [1, 0, 1]));
            drop(doomed);
            // The next decision leads, for itself and those after it.
            for (i, mut waiter) in rest.into_iter().enumerate() {
                match poll_once(&mut waiter) {
                    Poll::Ready(Ok(reply)) => {
                        assert_eq!(reply, vec![10 + i as i64, i as i64, i64::from(others)]);
                    }
                    Poll::Ready(Err(error)) => panic!("{others}: waiter {i}: {error}"),
                    // Told by the leader of its batch, which answered when it was polled.
                    Poll::Pending => panic!("{others}: waiter {i} still waits"),
                }
            }
            assert_eq!(lanes.waiting("chain"), None, "{others}: the lane closed");
            // And the chain is not stuck: a new decision calls at once.
            let mut fresh = Box::pin(lanes.decide("chain".into(), 5, at_once));
            assert!(matches!(poll_once(&mut fresh), Poll::Ready(Ok(r)) if r == [5, 0, 1]));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_leader_hands_the_lane_on() {
        let lanes = Arc::new(Lanes::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (l, c) = (lanes.clone(), calls.clone());
        // The leader's call never answers; it is cancelled.
        let leader = tokio::spawn(async move {
            l.decide("chain".into(), 1, |_| async {
                c.fetch_add(1, Ordering::SeqCst);
                std::future::pending().await
            })
            .await
        });
        tokio::task::yield_now().await;
        let (l, c) = (lanes.clone(), calls.clone());
        let waiter =
            tokio::spawn(async move { l.decide("chain".into(), 2, |costs| call(&c, costs)).await });
        while lanes.waiting("chain") != Some(1) {
            tokio::task::yield_now().await;
        }
        leader.abort();
        let reply = waiter.await.unwrap().unwrap();
        assert_eq!(reply, vec![2, 0, 1], "the waiter leads its own call");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(lanes.waiting("chain"), None);
    }
}
