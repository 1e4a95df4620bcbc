//! The wall clock of the hot path.
//!
//! Every request is checked against its key's expiry (and the per-thread cache's lifetime), so it
//! reads the wall clock once. On Linux that read is `CLOCK_REALTIME_COARSE` (through `rustix`'s safe
//! `clock_gettime`, built on its `use-libc` backend, so the call is glibc's, which reads the vDSO):
//! about 7 ns instead of about 40 ns for `SystemTime::now()` on the machines we measure on, for a
//! resolution of one kernel tick (1–4 ms). A key is therefore refused at most a few milliseconds
//! after its expiry instant, never before it. Elsewhere it is `SystemTime::now()`.
//!
//! Why libc and not rustix's own vDSO call (~1.5 ns cheaper): rustix parses the vDSO's ELF image
//! itself, and under valgrind (memcheck, callgrind), which hides the vDSO, that parsing crashes
//! the process on its first clock read (rustix#1559). glibc falls back to the system call there.
//! `.ci/run` runs a test binary under memcheck to keep it that way.

/// Nanoseconds since the Unix epoch (an `i64` lasts until 2262).
pub(crate) fn now_unix_nanos() -> i64 {
    imp::now_unix_nanos()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use rustix::time::{ClockId, clock_gettime};

    pub(super) fn now_unix_nanos() -> i64 {
        let now = clock_gettime(ClockId::RealtimeCoarse);
        (now.tv_sec as i64)
            .saturating_mul(1_000_000_000)
            .saturating_add(now.tv_nsec as i64)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    pub(super) fn now_unix_nanos() -> i64 {
        super::unix_nanos(std::time::SystemTime::now())
    }
}

/// Nanoseconds since the Unix epoch of a `SystemTime`, negative before it, saturating.
#[cfg(any(test, not(any(target_os = "linux", target_os = "android"))))]
pub(crate) fn unix_nanos(time: std::time::SystemTime) -> i64 {
    match time.duration_since(std::time::SystemTime::UNIX_EPOCH) {
        Ok(after) => saturate(after.as_nanos() as i128),
        Err(before) => saturate(-(before.duration().as_nanos() as i128)),
    }
}

/// An `OffsetDateTime` in Unix nanoseconds, saturating (beyond 2262 is "never" for a deadline).
pub(crate) fn nanos_of(time: time::OffsetDateTime) -> i64 {
    saturate(time.unix_timestamp_nanos())
}

fn saturate(nanos: i128) -> i64 {
    nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    /// The coarse clock is the wall clock, one tick behind at most.
    #[test]
    fn coarse_clock_follows_the_wall_clock() {
        for _ in 0..1000 {
            let before = super::unix_nanos(SystemTime::now());
            let coarse = super::now_unix_nanos();
            let after = super::unix_nanos(SystemTime::now());
            let tick = Duration::from_millis(20).as_nanos() as i64;
            assert!(coarse <= after, "coarse clock ahead of the wall clock");
            assert!(
                coarse > before - tick,
                "coarse clock {}ns behind",
                before - coarse
            );
        }
    }
}
