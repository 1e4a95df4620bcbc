//! The keyed key format, through the public API and real requests: secret rotation, legacy CRC32
//! keys and their phase-out, made-up keys refused with no store lookup, and instances starting
//! together on a new SQLite file or PostgreSQL schema agreeing on one secret.
//!
//! The PostgreSQL test needs `TEST_DATABASE_URL` (see `common::db`).

mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use time::OffsetDateTime;
use tower::ServiceExt;
use tower_api_keys::key::{ApiKey, FormatSecret, KeyFormat};
use tower_api_keys::layer::ApiKeyLayer;
use tower_api_keys::manage::{CreateKey, KeyManager};
use tower_api_keys::principal::Principal;
use tower_api_keys::resolver::CachedResolver;
use tower_api_keys::store::{FormatLoadError, KeyStore, MemoryStore, StoreErrorKind};

/// One service instance: the layer over a route, and a manager minting keys in its format.
struct Instance {
    app: Router,
    manager: KeyManager,
}

impl Instance {
    fn new(store: Arc<dyn KeyStore>, format: KeyFormat) -> Self {
        let resolver = CachedResolver::builder(store.clone())
            .format(format)
            .build();
        let app = Router::new()
            .route(
                "/whoami",
                get(|p: Principal| async move { p.key_id().to_string() }),
            )
            .layer(ApiKeyLayer::new(resolver.clone()));
        let manager = KeyManager::new(resolver);
        Self { app, manager }
    }

    async fn mint(&self) -> ApiKey {
        self.manager
            .create(&Principal::master(), CreateKey::new(["*:*"]).owner("o"))
            .await
            .unwrap()
            .key
    }

    /// `"200"`, or `"<status> <code> <reason>"` of a refusal.
    async fn answer(&self, key: &str) -> String {
        let request = Request::get("/whoami")
            .header("x-api-key", key)
            .body(Body::empty())
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        if status == 200 {
            return "200".into();
        }
        let body = common::json_body(response).await;
        let detail = &body["error_detail"];
        format!(
            "{status} {} {}",
            detail["code"].as_str().unwrap_or("-"),
            detail["details"]["reason"].as_str().unwrap_or("-")
        )
    }
}

async fn load(store: &Arc<dyn KeyStore>) -> KeyFormat {
    KeyFormat::keyed("sk_live")
        .load_secret_from(&**store)
        .await
        .unwrap()
}

const OK: &str = "200";
const BAD_TAG: &str = "401 AUTH_INVALID_API_KEY checksum";
const MALFORMED: &str = "401 AUTH_INVALID_API_KEY malformed";

#[tokio::test]
async fn a_key_minted_under_version_1_still_works_after_version_2_is_added() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let first = Instance::new(store.clone(), load(&store).await);
    let v1 = first.mint().await;
    assert_eq!(&v1.expose_secret()[8 + 43..9 + 43], "1");
    assert_eq!(first.answer(v1.expose_secret()).await, OK);

    // Rotation: version 2 is added; an instance started afterwards tags with it, accepts both.
    assert_eq!(
        store
            .add_format_secret(&FormatSecret::generate(), OffsetDateTime::now_utc())
            .await
            .unwrap(),
        2
    );
    let format = load(&store).await;
    assert_eq!(format.accepted_versions(), vec![1, 2]);
    let second = Instance::new(store.clone(), format);
    let v2 = second.mint().await;
    assert_eq!(&v2.expose_secret()[8 + 43..9 + 43], "2");
    assert_eq!(second.answer(v1.expose_secret()).await, OK);
    assert_eq!(second.answer(v2.expose_secret()).await, OK);
    // The instance that only knows version 1 refuses version 2 keys until it restarts.
    assert_eq!(first.answer(v2.expose_secret()).await, MALFORMED);

    // Retiring version 1 refuses its keys (with no lookup) in instances started afterwards.
    let now = OffsetDateTime::now_utc();
    assert!(
        !store.retire_format_secret(9, now).await.unwrap(),
        "unknown"
    );
    assert!(store.retire_format_secret(1, now).await.unwrap());
    assert!(!store.retire_format_secret(1, now).await.unwrap(), "again");
    assert!(
        !store.retire_format_secret(2, now).await.unwrap(),
        "the last version is never retired"
    );
    let third = Instance::new(store.clone(), load(&store).await);
    assert_eq!(third.answer(v1.expose_secret()).await, MALFORMED);
    assert_eq!(third.answer(v2.expose_secret()).await, OK);
}

#[tokio::test]
async fn old_crc32_keys_work_while_accepted_and_are_refused_once_phased_out() {
    // An existing service: CRC32 keys in its store.
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let old = Instance::new(store.clone(), KeyFormat::new("sk_live").unwrap());
    let legacy = old.mint().await;
    assert_eq!(legacy.expose_secret().len(), 8 + 49);

    // It switches to the keyed format: the store held keys, so legacy keys stay accepted.
    let format = load(&store).await;
    assert!(format.accepts_legacy());
    let switched = Instance::new(store.clone(), format);
    let keyed = switched.mint().await;
    assert_eq!(keyed.expose_secret().len(), 8 + 55);
    assert_eq!(switched.answer(legacy.expose_secret()).await, OK);
    assert_eq!(switched.answer(keyed.expose_secret()).await, OK);
    // An accepted legacy key still has its CRC32 checked.
    let mut typo = legacy.expose_secret().to_owned();
    let last = typo.pop().unwrap();
    typo.push(if last == '0' { '1' } else { '0' });
    assert_eq!(switched.answer(&typo).await, BAD_TAG);

    // Phased out by policy, for every instance at its next start...
    store
        .set_legacy_keys(false, OffsetDateTime::now_utc())
        .await
        .unwrap();
    let phased_out = Instance::new(store.clone(), load(&store).await);
    assert_eq!(phased_out.answer(legacy.expose_secret()).await, MALFORMED);
    assert_eq!(phased_out.answer(keyed.expose_secret()).await, OK);
    // ...unless an instance's builder says otherwise.
    let format = KeyFormat::keyed("sk_live")
        .accept_legacy(true)
        .load_secret_from(&*store)
        .await
        .unwrap();
    let overridden = Instance::new(store.clone(), format);
    assert_eq!(overridden.answer(legacy.expose_secret()).await, OK);

    // A new service (empty store) refuses the legacy shape from the start.
    let fresh: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let format = load(&fresh).await;
    assert!(!format.accepts_legacy());
    let new_service = Instance::new(fresh, format);
    assert_eq!(new_service.answer(legacy.expose_secret()).await, MALFORMED);
}

#[tokio::test]
async fn made_up_keys_of_the_keyed_format_never_reach_the_store() {
    let store = common::TestStore::new();
    let format = KeyFormat::keyed("sk_live")
        .secret(1, FormatSecret::generate())
        .build()
        .unwrap();
    let instance = Instance::new(store.clone(), format.clone());
    let real = instance.mint().await;
    assert_eq!(instance.answer(real.expose_secret()).await, OK);
    let lookups = store.lookups();
    // Well-formed keys with every secret version character: refused by the tag or the version.
    let stranger = KeyFormat::keyed("sk_live")
        .secret(1, FormatSecret::generate())
        .build()
        .unwrap();
    for _ in 0..100 {
        assert_eq!(
            instance.answer(stranger.generate().expose_secret()).await,
            BAD_TAG
        );
    }
    for version in "023456789ABCz".chars() {
        let mut made_up = stranger.generate().expose_secret().to_owned();
        made_up.replace_range(8 + 43..9 + 43, &version.to_string());
        assert_eq!(instance.answer(&made_up).await, MALFORMED, "{version}");
    }
    // A made-up key that ends like the key this thread just admitted (the same hint: the
    // per-thread front knows its last bytes) is not that key: its digest differs, and its tag is
    // checked before the cache. The real key still answers (from the front).
    let mut lookalike = real.expose_secret().to_owned();
    let c = if &lookalike[13..14] == "a" { "b" } else { "a" };
    lookalike.replace_range(13..14, c);
    for _ in 0..3 {
        assert_eq!(instance.answer(&lookalike).await, BAD_TAG);
        assert_eq!(instance.answer(real.expose_secret()).await, OK);
    }
    assert_eq!(store.lookups(), lookups, "no made-up key was looked up");

    // The same traffic against the public checksum costs one lookup per key.
    let public = Instance::new(store.clone(), KeyFormat::new("sk_live").unwrap());
    let public_stranger = KeyFormat::new("sk_live").unwrap();
    for _ in 0..20 {
        let made_up = public_stranger.generate();
        assert_eq!(
            public.answer(made_up.expose_secret()).await,
            "401 AUTH_INVALID_API_KEY unknown"
        );
    }
    assert_eq!(store.lookups(), lookups + 20);
}

#[tokio::test]
async fn a_store_without_format_secrets_is_a_clear_error() {
    let store = common::TestStore::new();
    match KeyFormat::keyed("sk_live").load_secret_from(&*store).await {
        Err(FormatLoadError::Store(error)) => {
            assert_eq!(error.kind(), StoreErrorKind::Unsupported);
        }
        other => panic!("expected an unsupported-store error, got {other:?}"),
    }
}

/// `n` instances load the format at once from the stores `open` makes (each its own connection
/// pool); every instance accepts every other one's keys, and all hold one secret.
async fn instances_agree<F, Fut>(n: usize, open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn KeyStore>> + Send + 'static,
{
    let starts: Vec<_> = (0..n)
        .map(|_| {
            let opening = open();
            tokio::spawn(async move {
                let store = opening.await;
                let format = load(&store).await;
                (store, format)
            })
        })
        .collect();
    let mut instances = Vec::new();
    for start in starts {
        instances.push(start.await.unwrap());
    }
    let (_, first) = &instances[0];
    assert_eq!(first.accepted_versions(), vec![1]);
    for (_, format) in &instances {
        assert_eq!(format, first, "one secret for every instance");
    }
    let keys: Vec<ApiKey> = instances.iter().map(|(_, f)| f.generate()).collect();
    for (_, format) in &instances {
        for key in &keys {
            assert_eq!(format.check(key.expose_secret()), Ok(()));
        }
    }
    // And the secret stays: a later start finds the same one.
    let (store, _) = &instances[n - 1];
    assert_eq!(&load(store).await, first);
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_on_a_new_sqlite_file_agree_on_one_secret() {
    use tower_api_keys::store::SqliteStore;
    let dir = std::env::temp_dir().join(common::db::unique("key_format_sqlite"));
    std::fs::create_dir_all(&dir).unwrap();
    for round in 0..5 {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("keys-{round}.db")).display()
        );
        instances_agree(4, || {
            let url = url.clone();
            async move { Arc::new(SqliteStore::connect(&url).await.unwrap()) as Arc<dyn KeyStore> }
        })
        .await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_on_a_new_postgres_schema_agree_on_one_secret() {
    for round in 0..3 {
        let Some(schema) = common::db::pg_schema(&format!("key_format_{round}")).await else {
            return;
        };
        // `pg_schema` created the schema with the tables; drop it so the instances start on nothing.
        let url = schema.url.clone();
        let name = schema.schema.clone();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{name}\" CASCADE"
        )))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        instances_agree(4, || {
            let schema = common::db::PgSchema {
                url: url.clone(),
                schema: name.clone(),
            };
            async move { Arc::new(schema.store().await) as Arc<dyn KeyStore> }
        })
        .await;
        schema.drop_schema().await;
    }
}

/// What every store must do with format secrets (memory, SQLite, PostgreSQL).
async fn format_secrets_conformance(store: Arc<dyn KeyStore>) {
    let t = |s: i64| OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap();
    // Before any format is loaded, the legacy record can be set, and the first load keeps it.
    store.set_legacy_keys(true, t(0)).await.unwrap();
    let initial = FormatSecret::generate();
    let loaded = store.format_secrets(&initial, t(1)).await.unwrap();
    assert!(loaded.legacy_keys);
    assert_eq!(loaded.secrets.len(), 1);
    assert_eq!(loaded.secrets[0].version, 1);
    assert_eq!(loaded.secrets[0].secret, initial);
    assert_eq!(loaded.secrets[0].created_at, t(1));
    assert_eq!(loaded.secrets[0].retired_at, None);
    // A later load with another candidate changes nothing.
    let again = store
        .format_secrets(&FormatSecret::generate(), t(2))
        .await
        .unwrap();
    assert_eq!(again, loaded);
    // Versions count up; retiring keeps at least one.
    let second = FormatSecret::generate();
    assert_eq!(store.add_format_secret(&second, t(3)).await.unwrap(), 2);
    assert_eq!(
        store
            .add_format_secret(&FormatSecret::generate(), t(4))
            .await
            .unwrap(),
        3
    );
    assert!(store.retire_format_secret(1, t(5)).await.unwrap());
    assert!(store.retire_format_secret(3, t(6)).await.unwrap());
    assert!(!store.retire_format_secret(2, t(7)).await.unwrap());
    assert!(!store.retire_format_secret(4, t(7)).await.unwrap());
    store.set_legacy_keys(false, t(8)).await.unwrap();
    let now = store
        .format_secrets(&FormatSecret::generate(), t(9))
        .await
        .unwrap();
    assert!(!now.legacy_keys);
    let versions: Vec<_> = now
        .secrets
        .iter()
        .map(|s| (s.version, s.retired_at))
        .collect();
    assert_eq!(versions, vec![(1, Some(t(5))), (2, None), (3, Some(t(6)))]);
    assert_eq!(now.secrets[1].secret, second);
    // Up to version 61, then a conflict.
    for v in 4..=61u8 {
        assert_eq!(
            store
                .add_format_secret(&FormatSecret::generate(), t(10))
                .await
                .unwrap(),
            v
        );
    }
    let full = store
        .add_format_secret(&FormatSecret::generate(), t(11))
        .await
        .unwrap_err();
    assert_eq!(full.kind(), StoreErrorKind::Conflict);
    // The format loaded from it accepts exactly the versions not retired, minting with the highest.
    let format = KeyFormat::keyed("sk")
        .load_secret_from(&*store)
        .await
        .unwrap();
    let expected: Vec<u8> = (2..=61).filter(|v| *v != 3).collect();
    assert_eq!(format.accepted_versions(), expected);
    assert_eq!(format.minting_version(), Some(61));
    assert!(!format.accepts_legacy());
}

#[tokio::test]
async fn memory_store_keeps_format_secrets() {
    format_secrets_conformance(Arc::new(MemoryStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_store_keeps_format_secrets() {
    use tower_api_keys::store::SqliteStore;
    format_secrets_conformance(Arc::new(SqliteStore::in_memory().await.unwrap())).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_store_keeps_format_secrets() {
    let Some(schema) = common::db::pg_schema("key_format_conformance").await else {
        return;
    };
    format_secrets_conformance(Arc::new(schema.store().await)).await;
    schema.drop_schema().await;
}
