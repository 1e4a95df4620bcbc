//! What watching a request body for its key's end (I4, [`LiveBody`]) costs per frame.
//!
//! One `ApiKeyLayer` over a handler that drains the request body, with bodies of 1 and 65 frames
//! (8 bytes each, already in memory): once with a scoped key (the body is watched: one atomic load
//! per frame, and one small allocation per request with a body) and once with the master key (never
//! watched: the frames pass through untouched). The per-frame cost of watching is the difference of
//! the slopes, `((scoped 65 - scoped 1) - (master 65 - master 1)) / 64`; the per-request cost of a
//! body is `scoped 1 - master 1` (admission of the two kinds differs a little too). A request
//! without a body pays neither: see `benches/hot_path.rs`, whose `layer` case is unchanged.
//!
//! `cargo bench --bench live_body` times the four cases with criterion. For a figure the machine's
//! noise cannot move, `live_body-<hash> count <scoped|master> <frames> <n>` sends `n` requests of one
//! case after the same setup and exits: `scripts/callgrind_body.sh` runs it under callgrind with two
//! `n`s per case and prints instructions per request and per watched frame.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::Full;
use http_body_util::{BodyExt, StreamBody};
use time::OffsetDateTime;
use tower::{Layer, Service, ServiceExt};
use tower_api_keys::key::{ApiKey, KeyFormat, KeyId};
use tower_api_keys::layer::{ApiKeyLayer, LiveBody};
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyLimits, KeyRecord, KeyStore, MemoryStore};

type Frames =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

const MASTER: &str = "bench-master-key-0123456789abcdef";

async fn drain(request: Request<LiveBody<Frames>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut body = request.into_body();
    let mut frames = 0u32;
    while let Some(frame) = body.frame().await {
        black_box(frame.is_ok());
        frames += 1;
    }
    black_box(frames);
    Ok(Response::new(Full::new(Bytes::new())))
}

fn request(key: &str, frames: usize) -> Request<Frames> {
    let chunks: Vec<_> = (0..frames)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"01234567"))))
        .collect();
    Request::post("/ledgers")
        .header("x-api-key", key)
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap()
}

fn now<F: Future>(future: F) -> F::Output {
    future.now_or_never().expect("in memory")
}

type BoxedLayer =
    tower::util::BoxService<Request<Frames>, Response<LiveBody<Full<Bytes>>>, Infallible>;

/// A stored, cached key with `ledgers:write` and the layer (with a master key) over [`drain`].
fn setup(runtime: &tokio::runtime::Runtime) -> (ApiKey, BoxedLayer) {
    let format = KeyFormat::default();
    let key = format.generate();
    let store = MemoryStore::new();
    let at = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "bench".into(),
        owner: "team".into(),
        account: "acct".into(),
        scopes: "ledgers:write".parse().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: at,
        expires_at: Some(at + Duration::from_secs(365 * 86_400)),
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    runtime
        .block_on(store.insert(&record, KeyLimits::default(), at))
        .unwrap();
    let resolver = CachedResolver::new(store);
    runtime
        .block_on(resolver.authenticate(&key.digest()))
        .unwrap();
    let service = ApiKeyLayer::new(resolver)
        .master_key(ApiKey::new(MASTER))
        .layer(tower::service_fn(drain));
    (key, tower::util::BoxService::new(service))
}

/// One request to completion.
fn send(service: &mut BoxedLayer, request: Request<Frames>) {
    let ready = now(service.ready()).unwrap();
    let response = now(ready.call(request)).unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    black_box(response);
}

/// `n` requests of one case after 64 warm-up requests (for callgrind).
fn count(kind: &str, frames: usize, n: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let (key, mut service) = setup(&runtime);
    let secret = match kind {
        "scoped" => key.expose_secret().to_owned(),
        "master" => MASTER.to_owned(),
        other => panic!("unknown case {other:?}: scoped or master"),
    };
    for _ in 0..64 {
        send(&mut service, request(&secret, frames));
    }
    for _ in 0..n {
        send(&mut service, request(&secret, frames));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("count") {
        let [_, kind, frames, n] = &args[..] else {
            panic!("usage: live_body count <scoped|master> <frames> <n>");
        };
        count(kind, frames.parse().unwrap(), n.parse().unwrap());
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let (key, mut service) = setup(&runtime);
    let mut criterion = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut group = criterion.benchmark_group("live_body");
    for (name, secret) in [
        ("scoped (watched)", key.expose_secret()),
        ("master (not watched)", MASTER),
    ] {
        for frames in [1usize, 65] {
            group.bench_function(format!("{name}, {frames} frames"), |b| {
                b.iter_batched(
                    || request(secret, frames),
                    |request| send(&mut service, request),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
    criterion.final_summary();
}
