//! `examples/tonic.rs` end to end: the example's server on `127.0.0.1:0`, called by a real tonic
//! client. Refusals must arrive as gRPC statuses (never HTTP JSON) whose message starts with the
//! stable code. Needs the `grpc-example` feature (`cargo test --all-features` has it).

mod common;
#[path = "../examples/tonic.rs"]
#[allow(dead_code)]
mod tonic_example;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use time::OffsetDateTime;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;
use tower::{Layer, ServiceExt, service_fn};
use tower_api_keys::error::GrpcRejection;
use tower_api_keys::guard::RequireScopesLayer;
use tower_api_keys::key::{ApiKey, KeyId};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{KeyStore, MemoryStore};

use common::TestStore;
use tonic_example::issue_key;
use tonic_example::pb::ledgers_client::LedgersClient;
use tonic_example::pb::{CreateLedgerRequest, GetLedgerRequest, Ledger};
use tower_api_keys::guard::MethodScopesLayer;

const MASTER: &str = "master-key-for-grpc-tests-0123456789";

/// Starts the example's server on a free port.
async fn start(resolver: CachedResolver) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic_example::serve(
        listener,
        resolver,
        ApiKey::new(MASTER),
    ));
    addr
}

async fn client(addr: SocketAddr) -> LedgersClient<Channel> {
    LedgersClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the example server")
}

/// How a request carries its key.
#[derive(Clone, Copy)]
enum Via<'a> {
    Nothing,
    XApiKey(&'a str),
    Bearer(&'a str),
}

fn request<T>(message: T, key: Via<'_>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    match key {
        Via::Nothing => {}
        Via::XApiKey(key) => {
            metadata.insert("x-api-key", key.parse().unwrap());
        }
        Via::Bearer(key) => {
            metadata.insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
    }
    request
}

async fn create(
    client: &mut LedgersClient<Channel>,
    key: Via<'_>,
    name: &str,
) -> Result<Ledger, tonic::Status> {
    let message = CreateLedgerRequest { name: name.into() };
    client
        .create_ledger(request(message, key))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(
    client: &mut LedgersClient<Channel>,
    key: Via<'_>,
    id: &str,
) -> Result<Ledger, tonic::Status> {
    let message = GetLedgerRequest {
        ledger_id: id.into(),
    };
    client
        .get_ledger(request(message, key))
        .await
        .map(tonic::Response::into_inner)
}

/// Asserts `result` is a refusal with `code` whose message starts with the stable `error_code`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    error_code: &str,
) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{error_code}: ")),
        "the message must start with the stable code {error_code}: {status:?}"
    );
}

#[tokio::test]
async fn valid_keys_get_answers_through_either_metadata() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (writer, writer_record) = issue_key(&resolver, "acme", "ledgers:read ledgers:write")
        .await
        .unwrap();
    let (reader, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
    let mut client = client(start(resolver).await).await;

    let created = create(
        &mut client,
        Via::XApiKey(writer.expose_secret()),
        "Main ledger",
    )
    .await
    .unwrap();
    assert_eq!(created.name, "Main ledger");
    assert_eq!(created.account, "acme", "the handler read the principal");
    assert_eq!(created.created_by, writer_record.id.as_str());

    let read = get(
        &mut client,
        Via::Bearer(reader.expose_secret()),
        &created.ledger_id,
    )
    .await
    .unwrap();
    assert_eq!(read, created);
    // Case-insensitive scheme, as HTTP says.
    let mut lower = request(
        GetLedgerRequest {
            ledger_id: created.ledger_id.clone(),
        },
        Via::Nothing,
    );
    lower.metadata_mut().insert(
        "authorization",
        format!("bearer {}", reader.expose_secret())
            .parse()
            .unwrap(),
    );
    assert_eq!(
        client.get_ledger(lower).await.unwrap().into_inner(),
        created
    );
}

#[tokio::test]
async fn no_key_is_unauthenticated() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let mut client = client(start(resolver).await).await;
    assert_refused(
        get(&mut client, Via::Nothing, "ldg_1").await,
        Code::Unauthenticated,
        "AUTH_MISSING_API_KEY",
    );
    assert_refused(
        create(&mut client, Via::Nothing, "x").await,
        Code::Unauthenticated,
        "AUTH_MISSING_API_KEY",
    );
}

#[tokio::test]
async fn bad_keys_are_unauthenticated() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (key, record) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
    let unknown = resolver.format().generate();
    resolver
        .store()
        .revoke(&record.id, OffsetDateTime::now_utc())
        .await
        .unwrap();
    let mut client = client(start(resolver).await).await;

    for bad in ["not-a-key", "sk_short", unknown.expose_secret()] {
        assert_refused(
            get(&mut client, Via::XApiKey(bad), "ldg_1").await,
            Code::Unauthenticated,
            "AUTH_INVALID_API_KEY",
        );
        assert_refused(
            get(&mut client, Via::Bearer(bad), "ldg_1").await,
            Code::Unauthenticated,
            "AUTH_INVALID_API_KEY",
        );
    }
    assert_refused(
        get(&mut client, Via::XApiKey(key.expose_secret()), "ldg_1").await,
        Code::Unauthenticated,
        "AUTH_EXPIRED_API_KEY",
    );
}

#[tokio::test]
async fn missing_method_scope_is_permission_denied() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (reader, _) = issue_key(&resolver, "acme", "ledgers:read").await.unwrap();
    let (writer, _) = issue_key(&resolver, "acme", "ledgers:write").await.unwrap();
    let mut client = client(start(resolver).await).await;

    assert_refused(
        create(&mut client, Via::XApiKey(reader.expose_secret()), "x").await,
        Code::PermissionDenied,
        "AUTH_INSUFFICIENT_PERMISSIONS",
    );
    // The other way round: a write-only key cannot read.
    let created = create(&mut client, Via::XApiKey(writer.expose_secret()), "x")
        .await
        .unwrap();
    assert_refused(
        get(
            &mut client,
            Via::Bearer(writer.expose_secret()),
            &created.ledger_id,
        )
        .await,
        Code::PermissionDenied,
        "AUTH_INSUFFICIENT_PERMISSIONS",
    );
    // The reader can read it: scopes are per method, not per service.
    get(
        &mut client,
        Via::XApiKey(reader.expose_secret()),
        &created.ledger_id,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn ledgers_are_scoped_by_account_and_the_master_key_sees_all() {
    let resolver = CachedResolver::new(MemoryStore::new());
    let (acme, _) = issue_key(&resolver, "acme", "ledgers:*").await.unwrap();
    let (globex, _) = issue_key(&resolver, "globex", "ledgers:*").await.unwrap();
    let mut client = client(start(resolver).await).await;

    let ledger = create(&mut client, Via::XApiKey(acme.expose_secret()), "acme's")
        .await
        .unwrap();
    let not_found = get(
        &mut client,
        Via::XApiKey(globex.expose_secret()),
        &ledger.ledger_id,
    )
    .await
    .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    assert_eq!(
        get(&mut client, Via::Bearer(MASTER), &ledger.ledger_id)
            .await
            .unwrap(),
        ledger
    );
    let by_master = create(&mut client, Via::XApiKey(MASTER), "master's")
        .await
        .unwrap();
    assert_eq!(
        by_master.created_by, "",
        "the master key is never stamped as creator"
    );
}

#[tokio::test]
async fn store_outage_is_unavailable_not_a_bad_key() {
    let store = TestStore::wrap(Arc::new(MemoryStore::new()));
    store.failing.store(true, Ordering::SeqCst);
    let resolver = CachedResolver::new(store);
    let key = resolver.format().generate();
    let mut client = client(start(resolver).await).await;
    assert_refused(
        get(&mut client, Via::XApiKey(key.expose_secret()), "ldg_1").await,
        Code::Unavailable,
        "AUTH_UNAVAILABLE",
    );
    let status = create(&mut client, Via::Bearer(key.expose_secret()), "x")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        !status.message().contains("connection refused"),
        "store errors are not shown to clients: {status:?}"
    );
    // The master key needs no store.
    create(&mut client, Via::XApiKey(MASTER), "x")
        .await
        .unwrap();
}

// --- MethodScopesLayer on its own ---------------------------------------------------------------------

/// A `MethodScopesLayer` service answering 200 behind the guards, over a request carrying `principal`.
async fn guarded_status(path: &str, principal: Option<Principal>) -> (u16, Option<String>) {
    let scopes = MethodScopesLayer::new()
        .method(
            "/ledger.v1.Ledgers/GetLedger",
            RequireScopesLayer::all(["ledgers:read"]),
        )
        .method(
            "/ledger.v1.Ledgers/CreateLedger",
            RequireScopesLayer::any(["ledgers:write", "ledgers:admin"]),
        )
        .rejection(GrpcRejection);
    let service = scopes.layer(service_fn(|_: http::Request<()>| async {
        Ok::<_, Infallible>(http::Response::new(String::from("ok")))
    }));
    let mut request = http::Request::post(path).body(()).unwrap();
    if let Some(principal) = principal {
        request.extensions_mut().insert(principal);
    }
    let response = service.oneshot(request).await.unwrap();
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), grpc_status)
}

fn scoped(scopes: &str) -> Principal {
    Principal::scoped(
        KeyId::generate(),
        "test",
        "team-a",
        "acme",
        scopes.parse().unwrap(),
        None,
    )
}

#[tokio::test]
async fn method_scopes_pick_the_guard_by_path_and_fail_closed() {
    let ok = (200, None);
    let denied = (200, Some("7".to_owned()));
    let read = || Some(scoped("ledgers:read"));
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/GetLedger", read()).await,
        ok
    );
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/CreateLedger", read()).await,
        denied
    );
    assert_eq!(
        guarded_status(
            "/ledger.v1.Ledgers/CreateLedger",
            Some(scoped("ledgers:admin"))
        )
        .await,
        ok,
        "any() guards work too"
    );
    // A method nobody declared needs `*:*`: a scoped key is refused, the master key is not.
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/DeleteLedger", Some(scoped("ledgers:*"))).await,
        denied
    );
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/DeleteLedger", Some(Principal::master())).await,
        ok
    );
    // Paths are matched exactly (gRPC paths are case-sensitive).
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/getledger", read()).await,
        denied
    );
    // No principal at all: the layer is missing, UNAUTHENTICATED (16).
    assert_eq!(
        guarded_status("/ledger.v1.Ledgers/GetLedger", None).await,
        (200, Some("16".to_owned()))
    );
}

#[test]
#[should_panic(expected = "not a gRPC method path")]
fn method_scopes_reject_a_malformed_path() {
    let _ = MethodScopesLayer::new().method(
        "ledger.v1.Ledgers/GetLedger",
        RequireScopesLayer::all(["a:b"]),
    );
}

#[test]
#[should_panic(expected = "declared twice")]
fn method_scopes_reject_a_duplicate() {
    let _ = MethodScopesLayer::new()
        .method("/a.B/C", RequireScopesLayer::all(["a:b"]))
        .method("/a.B/C", RequireScopesLayer::all(["a:c"]));
}
