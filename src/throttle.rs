//! Warnings that can come once per request (a backend down under load) are written at most once a
//! second each, saying how many were left out since the last one; metrics still count every event.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// The least time between two warnings of one [`Throttle`].
const EVERY_NANOS: i64 = 1_000_000_000;

/// One kind of warning's throttle (a `static` next to where it is written).
pub(crate) struct Throttle {
    /// When the next warning may be written (Unix nanoseconds).
    next_at: AtomicI64,
    /// Warnings left out since the last one written.
    left_out: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self {
            next_at: AtomicI64::new(i64::MIN),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write this warning, `n` were left out before it; `None`: leave it out.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(crate::clock::now_unix_nanos())
    }

    fn admit_at(&self, now: i64) -> Option<u64> {
        let next = self.next_at.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_at
                .compare_exchange(
                    next,
                    now.saturating_add(EVERY_NANOS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_a_second_with_the_count_left_out() {
        let throttle = Throttle::new();
        let second = EVERY_NANOS;
        assert_eq!(throttle.admit_at(10 * second), Some(0));
        assert_eq!(throttle.admit_at(10 * second + 1), None);
        assert_eq!(throttle.admit_at(11 * second - 1), None);
        assert_eq!(throttle.admit_at(11 * second), Some(2));
        assert_eq!(throttle.admit_at(20 * second), Some(0));
    }

    #[test]
    fn threads_write_one_warning_between_them() {
        let throttle = Throttle::new();
        let written: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| (0..1000).filter(|_| throttle.admit_at(5).is_some()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap() as u64).sum()
        });
        assert_eq!(written, 1);
        assert_eq!(throttle.admit_at(5 + EVERY_NANOS), Some(3999));
    }
}
