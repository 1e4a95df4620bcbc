//! `CLOCK_REALTIME_COARSE` read through rustix's `linux_raw` vDSO call and through libc, in
//! interleaved rounds in one process; prints the median ns per read of each.

use std::hint::black_box;
use std::time::Instant;

const READS: u32 = 10_000;
const ROUNDS: usize = 301;

fn rustix_raw() -> i64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    now.tv_sec * 1_000_000_000 + now.tv_nsec
}

fn libc_call() -> i64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
    assert_eq!(rc, 0);
    now.tv_sec * 1_000_000_000 + now.tv_nsec
}

fn std_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn round(f: fn() -> i64) -> f64 {
    let start = Instant::now();
    for _ in 0..READS {
        black_box(f());
    }
    start.elapsed().as_nanos() as f64 / f64::from(READS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let cases: [(&str, fn() -> i64); 3] = [
        ("rustix linux_raw vDSO (before)", rustix_raw),
        ("libc clock_gettime (rustix use-libc, now)", libc_call),
        ("SystemTime::now (for scale)", std_now),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in cases.iter().enumerate() {
            times[i].push(round(*f));
        }
    }
    for ((name, _), t) in cases.iter().zip(times) {
        println!("{name:<45} {:>6.2} ns per read (median of {ROUNDS} rounds)", median(t));
    }
}
