//! What provenance stamping costs on top of reading the body, for 1 KiB and 64 KiB JSON bodies.
//!
//! Both cases run the same inner service (which collects the body), once directly ("collect") and
//! once behind `Provenance` with a scoped principal ("stamp": read through the limit, scan, splice,
//! rebuild the body). After the criterion groups, the same pairs are timed interleaved and the
//! stamp/collect ratios printed.
//!
//! `cargo bench --bench provenance -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use criterion::{BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::key::KeyId;
use tower_api_keys::principal::Principal;
use tower_api_keys::provenance::Provenance;
use tower_api_keys::scope::ScopeSet;

const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (64 * 1024, "64KiB")];

/// A ledger-like JSON object of exactly `len` bytes: numbers, escapes, nesting, metadata.
fn json_body(len: usize) -> Bytes {
    let mut s = String::from(
        r#"{"ledger_id":"ldg_0123456789","meta_data":{"region":"eu-west-1","customer":{"id":12345678901234567890123,"tier":"gold"}},"entries":["#,
    );
    let mut i = 0;
    loop {
        let entry = format!(
            r#"{{"id":{i},"amount":{}.{:02},"rate":1e-7,"currency":"USD","description":"payment n\u00b0{i} for \"invoice\"","tags":["a","b"],"ok":true}}"#,
            1000 + i * 37,
            i % 100
        );
        if s.len() + entry.len() + 20 > len {
            break;
        }
        if i > 0 {
            s.push(',');
        }
        s.push_str(&entry);
        i += 1;
    }
    s.push_str(r#"],"pad":""#);
    let pad = len - s.len() - 2;
    s.push_str(&"x".repeat(pad));
    s.push_str("\"}");
    assert_eq!(s.len(), len);
    Bytes::from(s)
}

async fn collect(request: Request<Body>) -> Result<Response<Body>, Infallible> {
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    black_box(&bytes);
    Ok(Response::new(Body::empty()))
}

/// How the body arrives: in one piece, or in frames of this many bytes (as read from a socket).
#[derive(Clone, Copy)]
enum Framing {
    Whole,
    Frames(usize),
}

fn request(body: &Bytes, framing: Framing, principal: &Principal) -> Request<Body> {
    let body = match framing {
        Framing::Whole => Body::from(body.clone()),
        Framing::Frames(size) => {
            let frames: Vec<_> = (0..body.len())
                .step_by(size)
                .map(|at| Ok::<_, Infallible>(body.slice(at..(at + size).min(body.len()))))
                .collect();
            Body::from_stream(futures_util::stream::iter(frames))
        }
    };
    let mut request = Request::post("/")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    request.extensions_mut().insert(principal.clone());
    request
}

fn principal() -> Principal {
    Principal::scoped(
        KeyId::new("key_01JABCDEFGHJKMNPQRSTVWXYZ0"),
        "bench",
        "owner",
        "account",
        ScopeSet::default(),
        None,
    )
}

/// Runs a future that never waits (in-memory bodies, a ready service) to completion.
fn now<F: Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("in-memory requests complete at once")
}

fn run<S>(service: &mut S, body: &Bytes, framing: Framing, principal: &Principal)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let ready = now(service.ready()).unwrap();
    let response = now(ready.call(request(body, framing, principal))).unwrap();
    assert!(response.status().is_success());
}

fn benches(c: &mut Criterion) {
    let principal = principal();
    let mut plain = tower::service_fn(collect);
    let mut stamped = Provenance::new().layer(tower::service_fn(collect));
    let mut group = c.benchmark_group("provenance");
    for (len, name) in SIZES {
        let body = json_body(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("collect", name), &body, |b, body| {
            b.iter(|| run(&mut plain, body, Framing::Whole, &principal))
        });
        group.bench_with_input(BenchmarkId::new("stamp", name), &body, |b, body| {
            b.iter(|| run(&mut stamped, body, Framing::Whole, &principal))
        });
        let provenance = Provenance::new();
        let key_id = principal.key_id().clone();
        group.bench_with_input(
            BenchmarkId::new("scan+splice only", name),
            &body,
            |b, body| b.iter(|| provenance.stamp(black_box(body), &key_id).unwrap().unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("serde IgnoredAny", name),
            &body,
            |b, body| {
                b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body)).unwrap())
            },
        );
    }
    group.finish();
}

/// Median time per request of `f` over interleaved batches.
fn median_per_iter(samples: &mut [Duration], per_batch: u32) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64 / f64::from(per_batch)
}

fn print_ratios() {
    let principal = principal();
    let mut plain = tower::service_fn(collect);
    let mut stamped = Provenance::new().layer(tower::service_fn(collect));
    println!(
        "\nprovenance: stamping vs just collecting the body (median of 31 interleaved batches)"
    );
    println!(
        "{:>6} {:>12} {:>11} {:>11} {:>7} {:>12} {:>12} {:>14}",
        "body",
        "framing",
        "collect",
        "stamp",
        "ratio",
        "stamp MiB/s",
        "Json<Value>",
        "added/Json<V>"
    );
    for (len, name) in SIZES {
        let body = json_body(len);
        let per_batch = (4_000_000 / len as u32).max(20);
        // For scale: what the handler's own `Json<Value>` extractor spends parsing the same body.
        let mut c = Vec::new();
        for _ in 0..31 {
            let start = Instant::now();
            for _ in 0..per_batch {
                let value: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
                black_box(value);
            }
            c.push(start.elapsed());
        }
        let parse = median_per_iter(&mut c, per_batch);
        for (framing, framing_name) in [
            (Framing::Whole, "one frame"),
            (Framing::Frames(8 * 1024), "8KiB frames"),
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..31 {
                let start = Instant::now();
                for _ in 0..per_batch {
                    run(&mut plain, &body, framing, &principal);
                }
                a.push(start.elapsed());
                let start = Instant::now();
                for _ in 0..per_batch {
                    run(&mut stamped, &body, framing, &principal);
                }
                b.push(start.elapsed());
            }
            let collect = median_per_iter(&mut a, per_batch);
            let stamp = median_per_iter(&mut b, per_batch);
            println!(
                "{name:>6} {framing_name:>12} {:>9.0}ns {:>9.0}ns {:>6.1}x {:>12.0} {:>10.0}ns {:>14.2}",
                collect,
                stamp,
                stamp / collect,
                len as f64 / (stamp * 1e-9) / (1024.0 * 1024.0),
                parse,
                (stamp - collect) / parse,
            );
        }
    }
}

/// Makes sure the "stamp" case really stamps.
fn check_stamping() {
    let body = json_body(1024);
    let mut service = Provenance::new().layer(tower::service_fn(|request: Request<Body>| async {
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let stamp = br#""BLNK_GENERATED_BY":"key_01JABCDEFGHJKMNPQRSTVWXYZ0""#;
        assert!(
            bytes.windows(stamp.len()).any(|w| w == stamp),
            "the body was stamped"
        );
        Ok::<_, Infallible>(Response::new(Body::empty()))
    }));
    run(&mut service, &body, Framing::Frames(100), &principal());
}

fn main() {
    check_stamping();
    let listing = std::env::args().any(|a| a == "--list" || a == "--test");
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
    if !listing {
        print_ratios();
    }
}
