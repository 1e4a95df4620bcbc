//! The IETF fields (draft-ietf-httpapi-ratelimit-headers) of a [`Decision`], written straight into
//! a per-thread slab.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::decision::Decision;
use crate::error::AuthError;
use crate::limits::{RateLimit, RefillInterval};

impl Decision {
    /// Adds `RateLimit-Policy`, `RateLimit` and, on a 429, `Retry-After`.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        self.fields().write(headers);
    }

    /// The header values, rendered. A decision with a rate limit alone (most of them) takes the
    /// values this thread rendered last when they are the same (a clone shares their bytes): a
    /// key under its limit gets the same two values request after request, so they are written
    /// like two pre-rendered values.
    pub(super) fn fields(&self) -> Fields {
        let retry_after = self
            .refusal
            .as_ref()
            .and_then(AuthError::retry_after)
            .map(HeaderValue::from);
        if let (Some(limit), Some(rate), None) = (self.rate_policy, self.rate, self.credits) {
            let (policy, state) = rate_only(limit, rate.remaining, ceil_secs(rate.reset));
            return Fields {
                policy: Some(policy),
                state: Some(state),
                retry_after,
            };
        }
        let (policy, state) = Lines::with(|lines| {
            let policy = match (self.rate_policy, self.credits) {
                (Some(limit), None) => {
                    write_rate_policy(lines, limit);
                    lines.cut()
                }
                (rate, Some(credits)) => {
                    if let Some(limit) = rate {
                        write_rate_policy(lines, limit);
                    }
                    if let Some(refill) = credits.refill {
                        let window = match refill.interval {
                            RefillInterval::Daily => 86_400,
                            RefillInterval::Monthly => 30 * 86_400,
                        };
                        lines.separate();
                        lines.push("\"credits\";q=");
                        lines.push_u64(refill.amount);
                        lines.push(";w=");
                        lines.push_u64(window);
                    }
                    lines.cut()
                }
                (None, None) => None,
            };
            if let Some(rate) = self.rate {
                write_rate_state(lines, rate.remaining, ceil_secs(rate.reset));
            }
            if let Some(credits) = self.credits {
                lines.separate();
                lines.push("\"credits\";r=");
                lines.push_u64(credits.remaining);
                if let Some(reset) = credits.reset {
                    lines.push(";t=");
                    lines.push_u64(ceil_secs(reset));
                }
            }
            (policy, lines.cut())
        });
        Fields {
            policy,
            state,
            retry_after,
        }
    }
}

/// The rendered header values of a [`Decision`]: what a response future keeps until the response
/// is there (three values, not the whole decision).
pub(super) struct Fields {
    policy: Option<HeaderValue>,
    state: Option<HeaderValue>,
    retry_after: Option<HeaderValue>,
}

impl Fields {
    pub(super) fn write(self, headers: &mut HeaderMap) {
        if let Some(value) = self.policy {
            headers.insert(RATELIMIT_POLICY, value);
        }
        if let Some(value) = self.state {
            headers.insert(RATELIMIT, value);
        }
        if let Some(value) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, value);
        }
    }
}

fn write_rate_policy(lines: &mut Lines, limit: RateLimit) {
    lines.push("\"rate\";q=");
    lines.push_u64(limit.limit.into());
    lines.push(";w=");
    lines.push_u64(limit.period_seconds.into());
}

fn write_rate_state(lines: &mut Lines, remaining: u32, reset_secs: u64) {
    lines.push("\"rate\";r=");
    lines.push_u64(remaining.into());
    lines.push(";t=");
    lines.push_u64(reset_secs);
}

/// What this thread rendered last for a decision with a rate limit alone.
struct LastRateOnly {
    limit: RateLimit,
    policy: HeaderValue,
    remaining: u32,
    reset_secs: u64,
    state: HeaderValue,
}

/// `RateLimit-Policy` and `RateLimit` for a rate limit alone: the values this thread rendered last
/// when they are the same, else new ones (which are kept in their place).
fn rate_only(limit: RateLimit, remaining: u32, reset_secs: u64) -> (HeaderValue, HeaderValue) {
    thread_local! {
        static LAST: std::cell::RefCell<Option<LastRateOnly>> =
            const { std::cell::RefCell::new(None) };
    }
    let render = |kept: Option<&LastRateOnly>| {
        Lines::with(|lines| {
            let policy = match kept {
                Some(last) if last.limit == limit => last.policy.clone(),
                _ => {
                    write_rate_policy(lines, limit);
                    lines.cut().expect("a policy was written")
                }
            };
            write_rate_state(lines, remaining, reset_secs);
            (policy, lines.cut().expect("a state was written"))
        })
    };
    LAST.try_with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return render(None);
        };
        match &*last {
            Some(kept)
                if kept.remaining == remaining
                    && kept.reset_secs == reset_secs
                    && kept.limit == limit =>
            {
                (kept.policy.clone(), kept.state.clone())
            }
            kept => {
                let (policy, state) = render(kept.as_ref());
                *last = Some(LastRateOnly {
                    limit,
                    policy: policy.clone(),
                    remaining,
                    reset_secs,
                    state: state.clone(),
                });
                (policy, state)
            }
        }
    })
    .unwrap_or_else(|_| render(None))
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Bytes of the slab each thread writes header values into.
const SLAB_BYTES: usize = 1024;

/// The longest line written (two items with 20-digit numbers are about 100 bytes).
const LINE_BYTES: usize = 128;

/// Header values being written, straight into this thread's slab, and cut from it once written:
/// one allocation per slab (some 20 to 40 values) instead of one per value, and no copy. A slab's
/// memory is freed once the last value cut from it is dropped (servers drop a response's headers
/// once they have written them).
struct Lines {
    slab: bytes::BytesMut,
    /// Whether something was written since the last cut.
    started: bool,
}

impl Lines {
    /// Calls `f` with this thread's slab (or a fresh one, during thread teardown or re-entry).
    fn with<R>(f: impl FnOnce(&mut Lines) -> R) -> R {
        thread_local! {
            static SLAB: std::cell::RefCell<Lines> =
                std::cell::RefCell::new(Lines { slab: bytes::BytesMut::new(), started: false });
        }
        let mut f = Some(f);
        let on_slab = SLAB.try_with(|slab| {
            let mut lines = slab.try_borrow_mut().ok()?;
            let f = f.take()?;
            Some(f(&mut lines))
        });
        match (on_slab, f) {
            (Ok(Some(out)), _) => out,
            (_, Some(f)) => f(&mut Lines {
                slab: bytes::BytesMut::new(),
                started: false,
            }),
            (_, None) => unreachable!("`f` runs only when the slab is borrowed, and then returns"),
        }
    }

    /// Appends `s`; the first write of a line makes sure the slab holds a whole line.
    fn push(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if !self.started {
            self.started = true;
            if self.slab.capacity() - self.slab.len() < LINE_BYTES {
                self.slab.reserve(SLAB_BYTES);
            }
        }
        self.slab.extend_from_slice(bytes);
    }

    /// `", "` when something was written since the last cut.
    fn separate(&mut self) {
        if self.started {
            self.push(", ");
        }
    }

    /// Appends `n` in decimal.
    fn push_u64(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n));
    }

    /// What was written since the last cut, as a header value (`None`: nothing).
    fn cut(&mut self) -> Option<HeaderValue> {
        if !std::mem::take(&mut self.started) {
            return None;
        }
        let line = self.slab.split().freeze();
        // Only digits, quotes, `;`, `=`, `,` and spaces are ever written.
        Some(HeaderValue::from_maybe_shared(line).expect("a valid header value"))
    }
}

/// Whole seconds, rounded up.
pub(super) fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Refill;
    use crate::ratelimit::{CreditStatus, RateStatus};

    /// Values cut from one slab and from the next ones keep their own bytes, however many are cut
    /// and whichever are dropped first.
    #[test]
    fn header_values_from_the_slab_keep_their_bytes() {
        let mut kept = Vec::new();
        for i in 0..(3 * SLAB_BYTES as u64) {
            let value = Lines::with(|lines| {
                lines.push("\"rate\";r=");
                lines.push_u64(i);
                lines.push(";t=");
                lines.push_u64(u64::MAX - i);
                lines.cut().unwrap()
            });
            assert_eq!(value, format!("\"rate\";r={i};t={}", u64::MAX - i));
            if i % 7 == 0 {
                kept.push((i, value));
            }
        }
        for (i, value) in kept.iter().rev() {
            assert_eq!(value, &format!("\"rate\";r={i};t={}", u64::MAX - i));
        }
        assert_eq!(Lines::with(|lines| lines.cut()), None);
    }

    #[test]
    fn headers_follow_the_draft() {
        let decision = Decision {
            rate: Some(RateStatus {
                limit: RateLimit::new(100, 60),
                remaining: 42,
                reset: Duration::from_millis(16_200),
                retry_after: Duration::ZERO,
            }),
            rate_policy: Some(RateLimit::new(100, 60)),
            credits: Some(CreditStatus {
                remaining: 900,
                refill: Some(Refill {
                    interval: RefillInterval::Daily,
                    amount: 1000,
                }),
                reset: Some(Duration::from_secs(3600)),
            }),
            refusal: None,
            refused_by: None,
        };
        let mut headers = HeaderMap::new();
        decision.write_headers(&mut headers);
        assert_eq!(
            headers["ratelimit-policy"],
            "\"rate\";q=100;w=60, \"credits\";q=1000;w=86400"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"rate\";r=42;t=17, \"credits\";r=900;t=3600"
        );
        assert!(!headers.contains_key("retry-after"));
        let refused = Decision {
            refusal: Some(AuthError::RateLimited { retry_after: 7 }),
            ..decision
        };
        let mut headers = HeaderMap::new();
        refused.write_headers(&mut headers);
        assert_eq!(headers["retry-after"], "7");
    }

    #[test]
    fn rate_only_headers_follow_the_limit_of_each_decision() {
        let decision = |limit: RateLimit, remaining: u32, reset: Duration| Decision {
            rate: Some(RateStatus {
                limit,
                remaining,
                reset,
                retry_after: Duration::ZERO,
            }),
            rate_policy: Some(limit),
            credits: None,
            refusal: None,
            refused_by: None,
        };
        // The same decision twice (the thread's kept values), the same limit with another state
        // (the kept policy), another limit with the kept state, then the first limit again.
        let cases = [
            (
                RateLimit::new(100, 60),
                0,
                Duration::ZERO,
                "q=100;w=60",
                "r=0;t=0",
            ),
            (
                RateLimit::new(100, 60),
                0,
                Duration::ZERO,
                "q=100;w=60",
                "r=0;t=0",
            ),
            (
                RateLimit::new(100, 60),
                99,
                Duration::from_millis(1),
                "q=100;w=60",
                "r=99;t=1",
            ),
            (
                RateLimit::new(4_294_967_295, 1),
                4_294_967_295,
                Duration::from_secs(18_446_744_073_709_551_615),
                "q=4294967295;w=1",
                "r=4294967295;t=18446744073709551615",
            ),
            (
                RateLimit::new(5, 1),
                4_294_967_295,
                Duration::from_secs(18_446_744_073_709_551_615),
                "q=5;w=1",
                "r=4294967295;t=18446744073709551615",
            ),
            (
                RateLimit::new(100, 60),
                7,
                Duration::from_secs(3),
                "q=100;w=60",
                "r=7;t=3",
            ),
        ];
        for (limit, remaining, reset, policy, state) in cases {
            let mut headers = HeaderMap::new();
            decision(limit, remaining, reset).write_headers(&mut headers);
            assert_eq!(headers["ratelimit-policy"], format!("\"rate\";{policy}"));
            assert_eq!(headers["ratelimit"], format!("\"rate\";{state}"));
        }
    }
}
