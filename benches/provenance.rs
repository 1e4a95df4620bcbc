//! What provenance stamping costs on top of reading the body, for 1 KiB and 64 KiB JSON bodies.
//!
//! Both cases run the same inner service (which collects the body), once directly ("collect") and
//! once behind `ProvenanceLayer` with a scoped principal ("stamp": read through the limit, scan, splice,
//! rebuild the body). After the criterion groups, the same pairs are timed interleaved and the
//! stamp/collect ratios printed.
//!
//! Then the hand-written scanner (`src/provenance/scan.rs`) against the obvious library route, a
//! `serde_json::value::RawValue` splice ([`raw_splice`], checked to give the same bytes), on small,
//! large and deep bodies, interleaved.
//!
//! `cargo bench --bench provenance -- --warm-up-time 1 --measurement-time 3`; only the scanner
//! against the library route: `cargo bench --bench provenance -- scanner`.

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
use tower_api_keys::provenance::ProvenanceLayer;
use tower_api_keys::scope::ScopeSet;

mod fixtures;

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
    let mut stamped = ProvenanceLayer::new().layer(tower::service_fn(collect));
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
        let provenance = ProvenanceLayer::new();
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
    let mut stamped = ProvenanceLayer::new().layer(tower::service_fn(collect));
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
    let mut service =
        ProvenanceLayer::new().layer(tower::service_fn(|request: Request<Body>| async {
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

/// A create body of a few hundred bytes, as the example server gets them.
fn small_body() -> Bytes {
    Bytes::from_static(
        br#"{"ledger_id": "ldg_0123456789", "currency": "USD", "precision": 100, "meta_data": {"amount": 12345678901234567890123456789.000000000000000000001, "customer": "cus_42", "tags": ["a", "b"]}}"#,
    )
}

/// A body whose `entries` nest `depth` arrays and objects deep (serde_json skips a `RawValue`
/// without recursing, so its recursion limit of 128 does not apply).
fn deep_body(depth: usize) -> Bytes {
    let mut s = String::from(r#"{"meta_data":{"region":"eu"},"entries":"#);
    for i in 0..depth {
        s.push_str(if i % 2 == 0 { "[" } else { r#"{"a":"# });
    }
    s.push('1');
    for i in (0..depth).rev() {
        s.push(if i % 2 == 0 { ']' } else { '}' });
    }
    s.push('}');
    Bytes::from(s)
}

const META: &str = "meta_data";
const STAMP: &str = "BLNK_GENERATED_BY";

/// The library route gives the scanner's bytes on every benched body and on the edge cases.
fn check_raw_splice() {
    let provenance = ProvenanceLayer::new();
    let key_id = KeyId::new("key_01JABCDEFGHJKMNPQRSTVWXYZ0");
    let id_json = "\"key_01JABCDEFGHJKMNPQRSTVWXYZ0\"";
    let mut bodies = vec![
        small_body(),
        json_body(1024),
        json_body(64 * 1024),
        deep_body(100),
        deep_body(10_000),
    ];
    for edge in [
        "{}",
        r#"{"a":1}"#,
        r#"{"meta_data":null}"#,
        r#"{"meta_data":{}}"#,
        r#"{ "meta_data" : { "x" : 1 } , "b":2 }"#,
        r#"{"meta_data":{"BLNK_GENERATED_BY":"forged","x":1,"BLNK_GENERATED_BY":2}}"#,
        r#"{"meta\u005fdata":{"BLNK_GENERATED\u005fBY":"forged"}}"#,
    ] {
        bodies.push(Bytes::from(edge));
    }
    for body in &bodies {
        let scanner = provenance.stamp(body, &key_id).unwrap();
        let library = raw_splice::stamp(body, META, STAMP, id_json).unwrap();
        assert_eq!(scanner, library, "{}", String::from_utf8_lossy(body));
    }
}

/// The hand-written scanner against the `RawValue` splice, interleaved, on small, large and deep
/// bodies: median thread CPU time per stamp and the ratio.
fn scanner_vs_library() {
    let provenance = ProvenanceLayer::new();
    let key_id = KeyId::new("key_01JABCDEFGHJKMNPQRSTVWXYZ0");
    let id_json = "\"key_01JABCDEFGHJKMNPQRSTVWXYZ0\"";
    println!(
        "\nstamp only (no body plumbing): hand-written scanner vs serde_json RawValue splice, thread CPU, median of 101 interleaved batches"
    );
    println!(
        "{:>22} {:>12} {:>12} {:>14}",
        "body", "scanner", "RawValue", "RawValue ÷ scanner"
    );
    let bodies = [
        ("small (186 B)", small_body()),
        ("1 KiB", json_body(1024)),
        ("64 KiB", json_body(64 * 1024)),
        ("1 MiB", json_body(1024 * 1024)),
        ("deep (100 levels)", deep_body(100)),
        ("deep (10,000 levels)", deep_body(10_000)),
    ];
    for (name, body) in bodies {
        let per_batch = (2_000_000 / body.len() as u32).clamp(5, 5_000);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..101 {
            let start = fixtures::thread_cpu();
            for _ in 0..per_batch {
                black_box(provenance.stamp(black_box(&body), &key_id).unwrap());
            }
            a.push(fixtures::thread_cpu() - start);
            let start = fixtures::thread_cpu();
            for _ in 0..per_batch {
                black_box(raw_splice::stamp(black_box(&body), META, STAMP, id_json).unwrap());
            }
            b.push(fixtures::thread_cpu() - start);
        }
        let scanner = median_per_iter(&mut a, per_batch);
        let library = median_per_iter(&mut b, per_batch);
        println!(
            "{name:>22} {scanner:>10.0}ns {library:>10.0}ns {:>17.2}×",
            library / scanner
        );
    }
}

fn main() {
    check_stamping();
    check_raw_splice();
    if std::env::args().any(|a| a == "scanner") {
        // `cargo bench --bench provenance -- scanner`: only the scanner against the library route.
        scanner_vs_library();
        return;
    }
    let listing = std::env::args().any(|a| a == "--list" || a == "--test");
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
    if !listing {
        print_ratios();
        scanner_vs_library();
    }
}

/// The library route, for comparison: the same stamp as a `serde_json::value::RawValue` splice.
/// serde_json validates the document and hands out each member's raw value (a slice of the body);
/// only the metadata object is parsed a second time, one level deep. Same output as the scanner on
/// the bodies benched here (`check_raw_splice`).
mod raw_splice {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// The members of one object: unescaped key and raw value, in order.
    struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

    impl<'de> serde::Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Members<'de>, A::Error> {
                    let mut members = Vec::new();
                    while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                        members.push(entry);
                    }
                    Ok(Members(members))
                }
            }
            deserializer.deserialize_map(V)
        }
    }

    /// Offsets of `raw` (a slice of `body`) in `body`.
    fn span(body: &[u8], raw: &RawValue) -> (usize, usize) {
        let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
        (start, start + raw.get().len())
    }

    /// `Ok(None)`: not a JSON object. `Err(())`: a metadata member neither an object nor null.
    pub fn stamp(
        body: &[u8],
        meta: &str,
        stamp: &str,
        key_id_json: &str,
    ) -> Result<Option<Vec<u8>>, ()> {
        let Ok(top) = serde_json::from_slice::<Members<'_>>(body) else {
            return Ok(None);
        };
        let member = format!("{}:{key_id_json}", serde_json::to_string(stamp).unwrap());
        let mut out = Vec::with_capacity(body.len() + meta.len() + member.len() + 8);
        let mut cursor = 0;
        let mut splice = |out: &mut Vec<u8>, (start, end): (usize, usize), with: &[&str]| {
            out.extend_from_slice(&body[cursor..start]);
            for piece in with {
                out.extend_from_slice(piece.as_bytes());
            }
            cursor = end;
        };
        let mut metas = 0;
        for (key, value) in &top.0 {
            if key != meta {
                continue;
            }
            metas += 1;
            let (start, end) = span(body, value);
            match value.get().as_bytes()[0] {
                b'n' => splice(&mut out, (start, end), &["{", &member, "}"]),
                b'{' => {
                    let inner: Members<'_> = serde_json::from_str(value.get()).map_err(|_| ())?;
                    let stamps: Vec<usize> = (0..inner.0.len())
                        .filter(|&i| inner.0[i].0 == stamp)
                        .collect();
                    match stamps.split_first() {
                        None => match inner.0.last() {
                            Some((_, last)) => {
                                let at = span(body, last).1;
                                splice(&mut out, (at, at), &[",", &member]);
                            }
                            None => splice(&mut out, (start + 1, start + 1), &[&member]),
                        },
                        Some((&first, duplicates)) => {
                            splice(&mut out, span(body, inner.0[first].1), &[key_id_json]);
                            for &i in duplicates {
                                let from = span(body, inner.0[i - 1].1).1;
                                splice(&mut out, (from, span(body, inner.0[i].1).1), &[]);
                            }
                        }
                    }
                }
                _ => return Err(()),
            }
        }
        if metas == 0 {
            let meta_json = serde_json::to_string(meta).unwrap();
            match top.0.last() {
                Some((_, last)) => {
                    let at = span(body, last).1;
                    splice(&mut out, (at, at), &[",", &meta_json, ":{", &member, "}"]);
                }
                None => {
                    let at = body.iter().position(|&b| b == b'{').unwrap() + 1;
                    splice(&mut out, (at, at), &[&meta_json, ":{", &member, "}"]);
                }
            }
        }
        out.extend_from_slice(&body[cursor..]);
        Ok(Some(out))
    }
}
