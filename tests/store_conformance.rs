//! One conformance suite for every [`KeyStore`]: each check is written once (in `checks`) and run
//! against `MemoryStore` (the reference), `SqliteStore` (feature `sqlite`, a temporary file) and
//! `PostgresStore` (feature `postgres`, a schema of its own on `TEST_DATABASE_URL`).
//!
//! Every check gets a fresh store and, for the concurrency checks, a second independent instance on
//! the same data (another pool on the same SQLite file or PostgreSQL schema; for memory, the same
//! store). Timestamps are whole microseconds except in `timestamps_keep_microseconds`, which checks
//! the documented precision: exact in memory, floored to the microsecond in the SQL stores.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use tower_api_keys::key::{ApiKey, KeyDigest, KeyFormat, KeyId};
use tower_api_keys::scope::ScopeSet;
use tower_api_keys::store::{KeyLimits, ListQuery, PreviousSecret, Rotation, StoreErrorKind};
use tower_api_keys::store::{KeyRecord, KeyStore, MemoryStore};

/// What a check runs against.
#[derive(Clone)]
struct Stores {
    /// The store under test.
    a: Arc<dyn KeyStore>,
    /// Another instance on the same data (a separate pool), or `a` itself for memory.
    b: Arc<dyn KeyStore>,
    /// Whether timestamps come back with nanoseconds (memory) or floored to microseconds (SQL).
    exact_times: bool,
}

type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Backend {
    stores: Stores,
    cleanup: Option<Cleanup>,
}

mod backends {
    use super::*;

    pub(crate) async fn memory(_test: &'static str) -> Option<Backend> {
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        Some(Backend {
            stores: Stores {
                a: store.clone(),
                b: store,
                exact_times: true,
            },
            cleanup: None,
        })
    }

    #[cfg(feature = "sqlite")]
    pub(crate) async fn sqlite(test: &'static str) -> Option<Backend> {
        use tower_api_keys::store::SqliteStore;
        let path = std::env::temp_dir().join(format!("{}.db", common::db::unique(test)));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let a = SqliteStore::connect(&url).await.expect("open SQLite file");
        let b = SqliteStore::connect(&url)
            .await
            .expect("open SQLite file again");
        let cleanup = {
            let (a, b) = (a.clone(), b.clone());
            Box::pin(async move {
                a.pool().close().await;
                b.pool().close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }) as Cleanup
        };
        Some(Backend {
            stores: Stores {
                a: Arc::new(a),
                b: Arc::new(b),
                exact_times: false,
            },
            cleanup: Some(cleanup),
        })
    }

    #[cfg(feature = "postgres")]
    pub(crate) async fn postgres(test: &'static str) -> Option<Backend> {
        let schema = common::db::pg_schema(test).await?;
        let a = schema.store().await;
        let b = schema.store().await;
        let cleanup = {
            let (pa, pb) = (a.pool().clone(), b.pool().clone());
            Box::pin(async move {
                pa.close().await;
                pb.close().await;
                schema.drop_schema().await;
            }) as Cleanup
        };
        Some(Backend {
            stores: Stores {
                a: Arc::new(a),
                b: Arc::new(b),
                exact_times: false,
            },
            cleanup: Some(cleanup),
        })
    }
}

async fn run<F, FFut, C, CFut>(backend: F, check: C, test: &'static str)
where
    F: FnOnce(&'static str) -> FFut,
    FFut: Future<Output = Option<Backend>>,
    C: FnOnce(Stores) -> CFut,
    CFut: Future<Output = ()>,
{
    let Some(backend) = backend(test).await else {
        return;
    };
    check(backend.stores.clone()).await;
    if let Some(cleanup) = backend.cleanup {
        cleanup.await;
    }
}

/// Declares every check once per backend: `memory::<check>`, `sqlite::<check>`, `postgres::<check>`.
macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::run(super::backends::memory, super::checks::$check, stringify!($check)).await;
                }
            )*
        }
        #[cfg(feature = "sqlite")]
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::run(super::backends::sqlite, super::checks::$check, stringify!($check)).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::run(super::backends::postgres, super::checks::$check, stringify!($check)).await;
                }
            )*
        }
    };
}

suite!(
    round_trip_preserves_every_field,
    find_by_digest_matches_current_and_grace_previous,
    rotation_without_grace_drops_previous_digest,
    second_rotation_replaces_previous_digest,
    rotation_conflicts_and_unknown_ids,
    revoke_keeps_first_time_and_is_idempotent,
    delete_removes_the_record_and_frees_its_digests,
    unknown_ids_are_none_not_errors,
    list_is_newest_first_paginated_and_per_owner,
    per_owner_limit_counts_only_active_keys,
    per_account_limit_counts_only_active_keys,
    concurrent_inserts_never_overshoot_the_limit,
    duplicate_id_or_digest_conflicts,
    last_used_batch_keeps_later_times,
    timestamps_keep_microseconds,
    find_returns_revoked_and_expired_records,
    list_filters_by_account,
    count_active_agrees_with_the_listing,
    revoke_cascades_to_every_descendant_at_once,
    delete_revokes_the_descendants_and_keeps_them_listed,
    insert_needs_an_active_creator,
    rotation_can_end_the_descendants_and_refuses_revoked_keys,
    no_child_outlives_a_concurrent_revocation,
    usage_limits_round_trip_and_update,
    credit_spends_are_exact_across_instances_and_refill,
    ancestors_are_nearest_first_and_bounded,
    ancestors_stop_at_a_deleted_creator,
    descendants_are_the_whole_subtree,
    budget_above_lists_limited_ancestors_then_pools,
    pools_set_if_absent_and_remove,
    racing_pool_inserts_all_see_the_first,
    chain_spend_is_all_or_nothing,
    chain_spend_applies_refills_per_level,
    chain_refund_gives_back_everywhere,
    concurrent_chain_spends_are_exact,
    sweep_finds_expiring_and_idle_keys_in_pages,
    notices_are_recorded_once_across_instances,
);

#[path = "store_conformance/hygiene.rs"]
mod hygiene;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A fixed instant with whole microseconds, plus `secs`.
fn t(secs: i64) -> OffsetDateTime {
    time::macros::datetime!(2031-02-03 04:05:06.123_456 UTC) + Duration::seconds(secs)
}

/// Now, floored to whole microseconds.
fn now() -> OffsetDateTime {
    let n = OffsetDateTime::now_utc();
    n.replace_nanosecond(n.nanosecond() / 1_000 * 1_000)
        .unwrap()
}

fn secret() -> ApiKey {
    KeyFormat::new("sk_test").unwrap().generate()
}

/// A minimal record (no optional field set) with a fresh secret.
fn record(id: &str, owner: &str, account: &str) -> KeyRecord {
    let key = secret();
    KeyRecord {
        id: KeyId::new(id),
        name: format!("name of {id}"),
        owner: owner.to_owned(),
        account: account.to_owned(),
        scopes: ScopeSet::parse(["ledgers:read"]).unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: KeyFormat::new("sk_test").unwrap().mask(&key).unwrap(),
        created_at: t(0),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    }
}

fn rotation(previous_valid_until: Option<OffsetDateTime>) -> Rotation {
    let key = secret();
    Rotation {
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: KeyFormat::new("sk_test").unwrap().mask(&key).unwrap(),
        rotated_at: t(100),
        previous_valid_until,
        revoke_descendants: false,
    }
}

fn no_limits() -> KeyLimits {
    KeyLimits::default()
}

fn query(owner: &str, before: Option<&str>, limit: u32) -> ListQuery {
    ListQuery {
        owner: owner.to_owned(),
        account: None,
        before: before.map(KeyId::new),
        limit,
    }
}

fn ids(records: &[KeyRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

/// Ids, sorted: for results in no particular order.
fn sorted_ids(records: &[KeyRecord]) -> Vec<&str> {
    let mut ids = ids(records);
    ids.sort_unstable();
    ids
}

/// A record delegated by `parent`.
fn child(id: &str, parent: &str) -> KeyRecord {
    KeyRecord {
        created_by: Some(KeyId::new(parent)),
        ..record(id, "o", "a")
    }
}

/// Inserts `root` -> (`c1` -> (`g1` -> `gg1`), `c2`), plus the unrelated `other` and its child
/// `other_c`, all active, in owner `o`.
async fn insert_tree(store: &dyn KeyStore) {
    let tree = [
        record("root", "o", "a"),
        child("c1", "root"),
        child("c2", "root"),
        child("g1", "c1"),
        child("gg1", "g1"),
        record("other", "o", "a"),
        child("other_c", "other"),
    ];
    for r in &tree {
        store.insert(r, no_limits(), now()).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

mod checks {
    pub(crate) use super::containment::*;
    pub(crate) use super::hygiene::*;
    use super::*;
    use tower_api_keys::limits::{Credits, RateLimit, RefillInterval, UsageLimits};
    use tower_api_keys::store::{CreditAdjustment, KeyUpdate};

    pub(crate) async fn usage_limits_round_trip_and_update(s: Stores) {
        let limited = KeyRecord {
            limits: UsageLimits {
                rate_limit: Some(RateLimit::new(100, 60)),
                credits: Some(
                    Credits::new(1_000)
                        .refill(RefillInterval::Monthly, 5_000)
                        .set_at(t(10)),
                ),
            },
            ..record("key_limited", "o", "a")
        };
        s.a.insert(&limited, no_limits(), now()).await.unwrap();
        assert_eq!(s.b.get(&limited.id).await.unwrap(), Some(limited.clone()));
        let plain = record("key_plain", "o", "a");
        s.a.insert(&plain, no_limits(), now()).await.unwrap();
        assert_eq!(
            s.b.get(&plain.id).await.unwrap().unwrap().limits,
            UsageLimits::NONE,
            "a key without limits has none"
        );
        let update = KeyUpdate {
            name: Some("renamed".into()),
            rate_limit: Some(None),
            credits: Some(Some(Credits::new(7).set_at(t(20)))),
        };
        let updated = s.a.update(&limited.id, &update).await.unwrap().unwrap();
        assert_eq!(updated.name, "renamed");
        assert_eq!(
            updated.limits,
            UsageLimits {
                rate_limit: None,
                credits: Some(Credits::new(7).set_at(t(20))),
            }
        );
        assert_eq!(s.b.get(&limited.id).await.unwrap(), Some(updated.clone()));
        // Fields left out stay as they are.
        let renamed =
            s.b.update(
                &limited.id,
                &KeyUpdate {
                    rate_limit: Some(Some(RateLimit::new(1, 1))),
                    ..KeyUpdate::default()
                },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(renamed.name, "renamed");
        assert_eq!(renamed.limits.credits, updated.limits.credits);
        assert_eq!(
            s.a.update(&KeyId::new("key_nope"), &update).await.unwrap(),
            None
        );
    }

    pub(crate) async fn credit_spends_are_exact_across_instances_and_refill(s: Stores) {
        let paid = KeyRecord {
            limits: UsageLimits {
                rate_limit: None,
                credits: Some(
                    Credits::new(20)
                        .refill(RefillInterval::Daily, 7)
                        .set_at(t(0)),
                ),
            },
            ..record("key_paid", "o", "a")
        };
        s.a.insert(&paid, no_limits(), now()).await.unwrap();
        let spends: Vec<_> = (0..60)
            .map(|i| {
                let store = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
                let id = paid.id.clone();
                tokio::spawn(async move { store.adjust_credits(&id, -1, t(1)).await.unwrap() })
            })
            .collect();
        let mut applied = 0;
        for spend in spends {
            match spend.await.unwrap() {
                Some(CreditAdjustment::Applied { .. }) => applied += 1,
                Some(CreditAdjustment::Insufficient { remaining }) => assert_eq!(remaining, 0),
                None => panic!("the key has credits"),
            }
        }
        assert_eq!(applied, 20, "never more than there is, across instances");
        // A refund adds back; a spend larger than what is left changes nothing.
        assert_eq!(
            s.b.adjust_credits(&paid.id, 3, t(2)).await.unwrap(),
            Some(CreditAdjustment::Applied { remaining: 3 })
        );
        assert_eq!(
            s.a.adjust_credits(&paid.id, -4, t(3)).await.unwrap(),
            Some(CreditAdjustment::Insufficient { remaining: 3 })
        );
        // The next day: a refill sets remaining to its amount, then the spend applies.
        assert_eq!(
            s.a.adjust_credits(&paid.id, -2, t(86_400)).await.unwrap(),
            Some(CreditAdjustment::Applied { remaining: 5 })
        );
        let stored = s.b.get(&paid.id).await.unwrap().unwrap();
        let credits = stored.limits.credits.unwrap();
        assert_eq!((credits.remaining, credits.set_at), (5, t(86_400)));
        // Once a day only.
        assert_eq!(
            s.b.adjust_credits(&paid.id, -1, t(86_500)).await.unwrap(),
            Some(CreditAdjustment::Applied { remaining: 4 })
        );
        // No credits, or no key: nothing to count.
        let plain = record("key_plain", "o", "a");
        s.a.insert(&plain, no_limits(), now()).await.unwrap();
        assert_eq!(s.a.adjust_credits(&plain.id, -1, t(1)).await.unwrap(), None);
        assert_eq!(
            s.b.adjust_credits(&KeyId::new("key_nope"), -1, t(1))
                .await
                .unwrap(),
            None
        );
    }

    pub(crate) async fn round_trip_preserves_every_field(s: Stores) {
        let full = KeyRecord {
            name: "Bob's \"billing\" key — ünïcode; DROP TABLE api_keys; --".into(),
            owner: "team-α".into(),
            account: "acct 1".into(),
            scopes: ScopeSet::parse(["*:*", "ledgers:read", "*:write", "balances:*"]).unwrap(),
            expires_at: Some(t(86_400)),
            revoked_at: Some(t(50)),
            last_used_at: Some(t(40)),
            created_by: Some(KeyId::new("key_parent")),
            rotated_at: Some(t(30)),
            allowed_networks: Some("10.1.0.0/16 192.0.2.7 2001:db8::/32".parse().unwrap()),
            previous: Some(PreviousSecret {
                digest: secret().digest(),
                digest_scheme: Default::default(),
                valid_until: t(60),
            }),
            ..record("key_full", "", "")
        };
        let minimal = KeyRecord {
            scopes: ScopeSet::empty(),
            ..record("key_minimal", "team-α", "acct 1")
        };
        // `full` is delegated: its creator must exist and be active.
        let parent = record("key_parent", "team-β", "acct 2");
        s.a.insert(&parent, no_limits(), now()).await.unwrap();
        for r in [&full, &minimal] {
            s.a.insert(r, no_limits(), now()).await.unwrap();
        }
        for r in [&full, &minimal] {
            assert_eq!(s.a.get(&r.id).await.unwrap().as_ref(), Some(r));
            assert_eq!(
                s.b.get(&r.id).await.unwrap().as_ref(),
                Some(r),
                "second instance"
            );
            assert_eq!(
                s.a.find_by_digest(&r.digest).await.unwrap().as_ref(),
                Some(r)
            );
        }
        let listed = s.a.list(&query("team-α", None, 10)).await.unwrap();
        assert_eq!(listed, vec![minimal, full]);
    }

    pub(crate) async fn find_by_digest_matches_current_and_grace_previous(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let rot = rotation(Some(t(3_600)));
        let rotated =
            s.a.replace_secret(&r.id, &rot)
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        let expected = KeyRecord {
            digest: rot.digest,
            masked_key: rot.masked_key.clone(),
            rotated_at: Some(rot.rotated_at),
            previous: Some(PreviousSecret {
                digest: r.digest,
                digest_scheme: r.digest_scheme,
                valid_until: t(3_600),
            }),
            ..r.clone()
        };
        assert_eq!(rotated, expected);
        assert_eq!(s.a.get(&r.id).await.unwrap(), Some(expected.clone()));
        assert_eq!(
            s.b.find_by_digest(&rot.digest).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(s.b.find_by_digest(&r.digest).await.unwrap(), Some(expected));
        assert_eq!(s.a.find_by_digest(&secret().digest()).await.unwrap(), None);
    }

    pub(crate) async fn rotation_without_grace_drops_previous_digest(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let rot = rotation(None);
        let rotated =
            s.a.replace_secret(&r.id, &rot)
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(rotated.previous, None);
        assert_eq!(rotated.digest, rot.digest);
        assert_eq!(s.a.find_by_digest(&r.digest).await.unwrap(), None);
        assert_eq!(
            s.a.find_by_digest(&rot.digest).await.unwrap(),
            Some(rotated)
        );
        // The old digest is free again.
        let reuse = KeyRecord {
            digest: r.digest,
            ..record("key_2", "o", "a")
        };
        s.a.insert(&reuse, no_limits(), now()).await.unwrap();
    }

    pub(crate) async fn second_rotation_replaces_previous_digest(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let first = rotation(Some(t(3_600)));
        s.a.replace_secret(&r.id, &first)
            .await
            .unwrap()
            .unwrap()
            .after
            .unwrap();
        let second = rotation(Some(t(7_200)));
        let rotated =
            s.a.replace_secret(&r.id, &second)
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(
            rotated.previous,
            Some(PreviousSecret {
                digest: first.digest,
                digest_scheme: first.digest_scheme,
                valid_until: t(7_200),
            })
        );
        assert_eq!(
            s.a.find_by_digest(&r.digest).await.unwrap(),
            None,
            "first secret"
        );
        assert_eq!(
            s.a.find_by_digest(&first.digest).await.unwrap(),
            Some(rotated.clone())
        );
        assert_eq!(
            s.a.find_by_digest(&second.digest).await.unwrap(),
            Some(rotated)
        );
    }

    pub(crate) async fn rotation_conflicts_and_unknown_ids(s: Stores) {
        let r1 = record("key_1", "o", "a");
        let r2 = record("key_2", "o", "a");
        for r in [&r1, &r2] {
            s.a.insert(r, no_limits(), now()).await.unwrap();
        }
        // To another key's digest, or to its own current digest: conflict, nothing changes.
        for digest in [r2.digest, r1.digest] {
            let rot = Rotation {
                digest,
                ..rotation(Some(t(3_600)))
            };
            let err = s.a.replace_secret(&r1.id, &rot).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Conflict);
        }
        assert_eq!(s.a.get(&r1.id).await.unwrap(), Some(r1.clone()));
        assert_eq!(
            s.a.find_by_digest(&r1.digest).await.unwrap(),
            Some(r1.clone())
        );
        assert_eq!(
            s.a.find_by_digest(&r2.digest).await.unwrap(),
            Some(r2.clone())
        );
        // To a digest that is another key's grace-period secret: conflict too.
        let rot2 = rotation(Some(t(3_600)));
        s.a.replace_secret(&r2.id, &rot2)
            .await
            .unwrap()
            .unwrap()
            .after
            .unwrap();
        let onto_grace = Rotation {
            digest: r2.digest,
            ..rotation(None)
        };
        let err = s.a.replace_secret(&r1.id, &onto_grace).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Conflict);
        assert_eq!(s.a.get(&r1.id).await.unwrap(), Some(r1));
        assert_eq!(
            s.a.replace_secret(&KeyId::new("key_unknown"), &rotation(None))
                .await
                .unwrap(),
            None
        );
    }

    pub(crate) async fn revoke_keeps_first_time_and_is_idempotent(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let first =
            s.a.revoke(&r.id, t(10))
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(first.revoked_at, Some(t(10)));
        assert_eq!(
            KeyRecord {
                revoked_at: None,
                ..first.clone()
            },
            r
        );
        let again =
            s.b.revoke(&r.id, t(20))
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(again, first, "a later revocation keeps the first time");
        let earlier =
            s.a.revoke(&r.id, t(5))
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(
            earlier.revoked_at,
            Some(t(10)),
            "keeps the first, not the earliest"
        );
        assert_eq!(s.a.get(&r.id).await.unwrap(), Some(first));
    }

    pub(crate) async fn delete_removes_the_record_and_frees_its_digests(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let rot = rotation(Some(t(3_600)));
        let rotated =
            s.a.replace_secret(&r.id, &rot)
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(
            s.a.delete(&r.id, t(200)).await.unwrap().map(|c| c.before),
            Some(rotated)
        );
        assert_eq!(s.a.get(&r.id).await.unwrap(), None);
        assert_eq!(s.a.find_by_digest(&rot.digest).await.unwrap(), None);
        assert_eq!(s.a.find_by_digest(&r.digest).await.unwrap(), None);
        assert_eq!(s.a.list(&query("o", None, 10)).await.unwrap(), vec![]);
        assert_eq!(
            s.b.delete(&r.id, t(200)).await.unwrap().map(|c| c.before),
            None,
            "second delete"
        );
        // Both digests and the id can be used again.
        let again = KeyRecord {
            digest: rot.digest,
            previous: None,
            ..record("key_1", "o", "a")
        };
        s.a.insert(&again, no_limits(), now()).await.unwrap();
        let other = KeyRecord {
            digest: r.digest,
            ..record("key_2", "o", "a")
        };
        s.a.insert(&other, no_limits(), now()).await.unwrap();
        assert_eq!(s.a.find_by_digest(&rot.digest).await.unwrap(), Some(again));
    }

    pub(crate) async fn unknown_ids_are_none_not_errors(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let unknown = KeyId::new("key_unknown");
        assert_eq!(s.a.get(&unknown).await.unwrap(), None);
        assert_eq!(s.a.revoke(&unknown, t(1)).await.unwrap(), None);
        assert_eq!(
            s.a.delete(&unknown, t(200))
                .await
                .unwrap()
                .map(|c| c.before),
            None
        );
        assert_eq!(
            s.a.replace_secret(&unknown, &rotation(None)).await.unwrap(),
            None
        );
        s.a.record_last_used(&[(unknown.clone(), t(1))])
            .await
            .unwrap();
        assert_eq!(s.a.list(&query("nobody", None, 10)).await.unwrap(), vec![]);
        assert_eq!(s.a.get(&r.id).await.unwrap(), Some(r), "others untouched");
    }

    /// `count_active` counts what the listing shows active: per owner, per account, at any instant
    /// (a key that expires later counts until then; revoked and expired keys never).
    pub(crate) async fn count_active_agrees_with_the_listing(s: Stores) {
        let now = now();
        for i in 0..23 {
            let mut r = record(
                &format!("key_{i:02}"),
                ["o", "p"][i % 2],
                ["a1", "a2"][i % 3 % 2],
            );
            match i % 4 {
                0 => r.revoked_at = Some(now - Duration::minutes(1)),
                1 => r.expires_at = Some(now + Duration::hours(1)),
                2 => r.expires_at = Some(now - Duration::seconds(1)),
                _ => {}
            }
            s.a.insert(&r, no_limits(), now).await.unwrap();
        }
        for at in [now, now + Duration::hours(2)] {
            for (owner, account) in [
                ("o", None),
                ("o", Some("a1")),
                ("p", Some("a2")),
                ("q", None),
            ] {
                let listed =
                    s.b.list(&ListQuery {
                        account: account.map(str::to_owned),
                        ..query(owner, None, 100)
                    })
                    .await
                    .unwrap();
                let expected = listed.iter().filter(|r| r.is_active(at)).count() as u64;
                let counted = s.b.count_active(owner, account, at).await.unwrap();
                assert_eq!(counted, expected, "{owner} {account:?} at {at}");
            }
        }
        // And the numbers themselves, from the fixture: owner "o" has the even keys 0..=22 (12),
        // of which 0, 4, ... are revoked (6) and 2, 6, ... expired (6): none active; "p" has the
        // odd ones (11), 1, 5, ... expiring in an hour (6) and 3, 7, ... open (5).
        assert_eq!(s.a.count_active("o", None, now).await.unwrap(), 0);
        assert_eq!(s.a.count_active("p", None, now).await.unwrap(), 11);
        assert_eq!(
            s.a.count_active("p", None, now + Duration::hours(2))
                .await
                .unwrap(),
            5
        );
    }

    pub(crate) async fn list_filters_by_account(s: Stores) {
        for (id, owner, account) in [
            ("key_1", "o", "a1"),
            ("key_2", "o", "a2"),
            ("key_3", "o", "a1"),
            ("key_4", "p", "a1"),
            ("key_5", "o", "a1"),
        ] {
            s.a.insert(&record(id, owner, account), no_limits(), now())
                .await
                .unwrap();
        }
        let in_account = |account: &str, before: Option<&str>, limit| ListQuery {
            account: Some(account.to_owned()),
            ..query("o", before, limit)
        };
        let a1 = s.b.list(&in_account("a1", None, 10)).await.unwrap();
        assert_eq!(ids(&a1), ["key_5", "key_3", "key_1"]);
        let page = s.b.list(&in_account("a1", Some("key_5"), 1)).await.unwrap();
        assert_eq!(ids(&page), ["key_3"], "the cursor and the account together");
        let a2 = s.a.list(&in_account("a2", None, 10)).await.unwrap();
        assert_eq!(ids(&a2), ["key_2"]);
        assert_eq!(s.a.list(&in_account("a3", None, 10)).await.unwrap(), vec![]);
        assert_eq!(s.a.list(&query("o", None, 10)).await.unwrap().len(), 4);
    }

    pub(crate) async fn revoke_cascades_to_every_descendant_at_once(s: Stores) {
        insert_tree(&*s.a).await;
        // c2 was revoked earlier: it keeps its time and is not reported as changed.
        s.a.revoke(&KeyId::new("c2"), t(1)).await.unwrap().unwrap();
        let change =
            s.b.revoke(&KeyId::new("root"), t(10))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(change.before.revoked_at, None);
        assert_eq!(change.after.as_ref().unwrap().revoked_at, Some(t(10)));
        assert_eq!(sorted_ids(&change.revoked_descendants), ["c1", "g1", "gg1"]);
        assert!(
            change
                .revoked_descendants
                .iter()
                .all(|r| r.revoked_at == Some(t(10))),
            "reported as they are now"
        );
        assert!(!change.is_noop());
        for (id, revoked_at) in [
            ("root", Some(t(10))),
            ("c1", Some(t(10))),
            ("g1", Some(t(10))),
            ("gg1", Some(t(10))),
            ("c2", Some(t(1))),
            ("other", None),
            ("other_c", None),
        ] {
            let stored = s.a.get(&KeyId::new(id)).await.unwrap().unwrap();
            assert_eq!(stored.revoked_at, revoked_at, "{id}");
            let found = s.a.find_by_digest(&stored.digest).await.unwrap().unwrap();
            assert_eq!(found.revoked_at, revoked_at, "{id} by digest");
        }
        // Again: nothing changes, and the change says so.
        let again =
            s.a.revoke(&KeyId::new("root"), t(20))
                .await
                .unwrap()
                .unwrap();
        assert!(again.is_noop(), "{again:?}");
        assert_eq!(again.after.unwrap().revoked_at, Some(t(10)));
        // Revoking a leaf changes only the leaf.
        let leaf =
            s.a.revoke(&KeyId::new("other_c"), t(30))
                .await
                .unwrap()
                .unwrap();
        assert!(leaf.revoked_descendants.is_empty());
        assert!(!leaf.is_noop());
        assert_eq!(
            s.a.get(&KeyId::new("other"))
                .await
                .unwrap()
                .unwrap()
                .revoked_at,
            None
        );
    }

    pub(crate) async fn delete_revokes_the_descendants_and_keeps_them_listed(s: Stores) {
        insert_tree(&*s.a).await;
        let root = s.a.get(&KeyId::new("root")).await.unwrap().unwrap();
        let change =
            s.b.delete(&KeyId::new("root"), t(10))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(change.before, root);
        assert_eq!(change.after, None);
        assert!(!change.is_noop());
        assert_eq!(
            sorted_ids(&change.revoked_descendants),
            ["c1", "c2", "g1", "gg1"]
        );
        assert_eq!(s.a.get(&root.id).await.unwrap(), None);
        let listed = s.a.list(&query("o", None, 10)).await.unwrap();
        assert_eq!(
            sorted_ids(&listed),
            ["c1", "c2", "g1", "gg1", "other", "other_c"]
        );
        for r in &listed {
            let expected = (!r.id.as_str().starts_with("other")).then_some(t(10));
            assert_eq!(r.revoked_at, expected, "{}", r.id);
        }
        assert_eq!(
            s.a.get(&KeyId::new("c1"))
                .await
                .unwrap()
                .unwrap()
                .created_by,
            Some(root.id.clone()),
            "the audit trail still names the deleted creator"
        );
        // Deleting a descendant later revokes nothing more.
        let later = s.a.delete(&KeyId::new("c1"), t(20)).await.unwrap().unwrap();
        assert!(later.revoked_descendants.is_empty());
    }

    pub(crate) async fn insert_needs_an_active_creator(s: Stores) {
        let now = now();
        let creators = [
            record("active", "o", "a"),
            KeyRecord {
                revoked_at: Some(now - Duration::minutes(1)),
                ..record("revoked", "o", "a")
            },
            KeyRecord {
                expires_at: Some(now - Duration::minutes(1)),
                ..record("expired", "o", "a")
            },
            KeyRecord {
                expires_at: Some(now + Duration::minutes(1)),
                ..record("expiring", "o", "a")
            },
            record("deleted", "o", "a"),
        ];
        for r in &creators {
            s.a.insert(r, no_limits(), now).await.unwrap();
        }
        s.a.delete(&KeyId::new("deleted"), now)
            .await
            .unwrap()
            .unwrap();
        for parent in ["revoked", "expired", "deleted", "unknown"] {
            let orphan = child(&format!("child_of_{parent}"), parent);
            let err = s.b.insert(&orphan, no_limits(), now).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::CreatorInactive, "{parent}");
            assert_eq!(s.a.get(&orphan.id).await.unwrap(), None, "{parent}");
            assert_eq!(s.a.find_by_digest(&orphan.digest).await.unwrap(), None);
        }
        for parent in ["active", "expiring"] {
            let ok = child(&format!("child_of_{parent}"), parent);
            s.b.insert(&ok, no_limits(), now).await.unwrap();
            assert_eq!(s.a.get(&ok.id).await.unwrap(), Some(ok));
        }
        // Expiry is judged at the insert's `now`.
        let late = child("late_child_of_expiring", "expiring");
        let err =
            s.a.insert(&late, no_limits(), now + Duration::minutes(2))
                .await
                .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::CreatorInactive);
    }

    pub(crate) async fn rotation_can_end_the_descendants_and_refuses_revoked_keys(s: Stores) {
        insert_tree(&*s.a).await;
        let c1 = s.a.get(&KeyId::new("c1")).await.unwrap().unwrap();
        // Without the option, nothing but the secret changes.
        let kept =
            s.a.replace_secret(&c1.id, &rotation(None))
                .await
                .unwrap()
                .unwrap();
        assert!(kept.revoked_descendants.is_empty());
        assert_eq!(kept.before, c1);
        assert_eq!(
            s.a.get(&KeyId::new("g1"))
                .await
                .unwrap()
                .unwrap()
                .revoked_at,
            None
        );
        let ending = Rotation {
            revoke_descendants: true,
            ..rotation(Some(t(3_600)))
        };
        let change = s.b.replace_secret(&c1.id, &ending).await.unwrap().unwrap();
        assert_eq!(sorted_ids(&change.revoked_descendants), ["g1", "gg1"]);
        assert!(
            change
                .revoked_descendants
                .iter()
                .all(|r| r.revoked_at == Some(ending.rotated_at))
        );
        let after = change.after.unwrap();
        assert_eq!(after.revoked_at, None, "the rotated key itself lives on");
        assert_eq!(after.digest, ending.digest);
        assert_eq!(change.before, kept.after.unwrap());
        for id in ["root", "c2", "other_c"] {
            let r = s.a.get(&KeyId::new(id)).await.unwrap().unwrap();
            assert_eq!(r.revoked_at, None, "{id}");
        }
        // A revoked key gets no new secret: the old one stays, the new one is unknown.
        s.a.revoke(&KeyId::new("c2"), t(1)).await.unwrap().unwrap();
        let c2 = s.a.get(&KeyId::new("c2")).await.unwrap().unwrap();
        let refused = rotation(None);
        let err = s.a.replace_secret(&c2.id, &refused).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Revoked);
        assert_eq!(s.a.get(&c2.id).await.unwrap(), Some(c2));
        assert_eq!(s.a.find_by_digest(&refused.digest).await.unwrap(), None);
    }

    pub(crate) async fn no_child_outlives_a_concurrent_revocation(s: Stores) {
        // Delegated inserts on one instance race a revocation of their creator (or grand-creator)
        // on another: whatever interleaving, every key of the tree that exists afterwards is revoked.
        for round in 0..6 {
            let root = format!("root_{round}");
            s.a.insert(&record(&root, "o", "a"), no_limits(), now())
                .await
                .unwrap();
            let mid = format!("mid_{round}");
            s.a.insert(&child(&mid, &root), no_limits(), now())
                .await
                .unwrap();
            let inserts: Vec<_> = (0..8)
                .map(|i| {
                    let store = if i % 2 == 0 { s.b.clone() } else { s.a.clone() };
                    let parent = if i % 3 == 0 {
                        root.clone()
                    } else {
                        mid.clone()
                    };
                    let id = format!("c_{round}_{i}");
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_micros(150 * i)).await;
                        let result = store.insert(&child(&id, &parent), no_limits(), now()).await;
                        match result {
                            Ok(()) => {
                                // The child may itself delegate at once.
                                let grandchild = child(&format!("{id}_g"), &id);
                                let _ = store.insert(&grandchild, no_limits(), now()).await;
                            }
                            Err(e) => assert_eq!(e.kind(), StoreErrorKind::CreatorInactive),
                        }
                    })
                })
                .collect();
            tokio::time::sleep(std::time::Duration::from_micros(400)).await;
            s.a.revoke(&KeyId::new(root.as_str()), now())
                .await
                .unwrap()
                .unwrap();
            for insert in inserts {
                insert.await.unwrap();
            }
            let tree = s.b.list(&query("o", None, 1000)).await.unwrap();
            let children = format!("c_{round}_");
            let mine: Vec<_> = tree
                .iter()
                .filter(|r| {
                    let id = r.id.as_str();
                    id == root || id == mid || id.starts_with(&children)
                })
                .collect();
            assert!(mine.len() >= 2, "round {round}: {mine:?}");
            for r in mine {
                assert!(
                    r.revoked_at.is_some(),
                    "round {round}: {} outlived its creator",
                    r.id
                );
            }
        }
    }

    pub(crate) async fn list_is_newest_first_paginated_and_per_owner(s: Stores) {
        // Inserted out of order; ids sort byte-wise (upper case before lower case).
        let mine = [
            "key_03", "key_01", "key_07", "key_05", "key_02", "key_06", "key_04", "key_A", "key_a",
        ];
        for id in mine {
            s.a.insert(&record(id, "me", "acct"), no_limits(), now())
                .await
                .unwrap();
        }
        for id in ["key_00", "key_08", "key_045"] {
            s.a.insert(&record(id, "you", "acct"), no_limits(), now())
                .await
                .unwrap();
        }
        let all = s.a.list(&query("me", None, 100)).await.unwrap();
        assert_eq!(
            ids(&all),
            [
                "key_a", "key_A", "key_07", "key_06", "key_05", "key_04", "key_03", "key_02",
                "key_01"
            ]
        );
        assert!(all.iter().all(|r| r.owner == "me"));
        let page1 = s.b.list(&query("me", None, 4)).await.unwrap();
        assert_eq!(ids(&page1), ["key_a", "key_A", "key_07", "key_06"]);
        let page2 = s.b.list(&query("me", Some("key_06"), 4)).await.unwrap();
        assert_eq!(ids(&page2), ["key_05", "key_04", "key_03", "key_02"]);
        let page3 = s.b.list(&query("me", Some("key_02"), 4)).await.unwrap();
        assert_eq!(ids(&page3), ["key_01"]);
        assert_eq!(
            s.b.list(&query("me", Some("key_01"), 4)).await.unwrap(),
            vec![]
        );
        // A cursor that is not one of the owner's ids still bounds the page.
        let mid = s.a.list(&query("me", Some("key_045"), 2)).await.unwrap();
        assert_eq!(ids(&mid), ["key_04", "key_03"]);
        assert_eq!(s.a.list(&query("me", None, 0)).await.unwrap(), vec![]);
        let yours = s.a.list(&query("you", None, 100)).await.unwrap();
        assert_eq!(ids(&yours), ["key_08", "key_045", "key_00"]);
    }

    pub(crate) async fn per_owner_limit_counts_only_active_keys(s: Stores) {
        let now = now();
        let limits = KeyLimits {
            per_owner: Some(2),
            per_account: None,
        };
        // Neither a revoked nor an expired key counts; one expiring later does.
        let expired = KeyRecord {
            expires_at: Some(now - Duration::hours(1)),
            ..record("key_expired", "o", "a")
        };
        let revoked = KeyRecord {
            revoked_at: Some(now - Duration::hours(1)),
            ..record("key_revoked", "o", "a")
        };
        let expiring = KeyRecord {
            expires_at: Some(now + Duration::hours(1)),
            ..record("key_1", "o", "a")
        };
        for r in [&expired, &revoked, &expiring] {
            s.a.insert(r, limits, now).await.unwrap();
        }
        s.a.insert(&record("key_2", "o", "a"), limits, now)
            .await
            .unwrap();
        let err =
            s.b.insert(&record("key_3", "o", "a"), limits, now)
                .await
                .unwrap_err();
        assert_eq!(
            err.kind(),
            StoreErrorKind::LimitReached {
                limit: 2,
                scope: "owner"
            }
        );
        assert_eq!(s.a.get(&KeyId::new("key_3")).await.unwrap(), None);
        // Another owner in the same account is not affected; no limit, no refusal.
        s.a.insert(&record("key_other", "other", "a"), limits, now)
            .await
            .unwrap();
        s.a.insert(&record("key_4", "o", "a"), no_limits(), now)
            .await
            .unwrap();
        // Revoking one frees a slot only once the over-limit key is gone too.
        s.a.revoke(&KeyId::new("key_2"), now).await.unwrap();
        let err =
            s.a.insert(&record("key_5", "o", "a"), limits, now)
                .await
                .unwrap_err();
        assert!(matches!(err.kind(), StoreErrorKind::LimitReached { .. }));
        s.a.delete(&KeyId::new("key_4"), now).await.unwrap();
        s.a.insert(&record("key_5", "o", "a"), limits, now)
            .await
            .unwrap();
        // Time passing expires a key: with `now` past its expiry, it no longer counts.
        let later = now + Duration::hours(2);
        s.a.insert(&record("key_6", "o", "a"), limits, later)
            .await
            .unwrap();
    }

    pub(crate) async fn per_account_limit_counts_only_active_keys(s: Stores) {
        let now = now();
        let limits = KeyLimits {
            per_owner: None,
            per_account: Some(2),
        };
        let expired = KeyRecord {
            expires_at: Some(now),
            ..record("key_expired", "o1", "acct")
        };
        s.a.insert(&expired, limits, now).await.unwrap();
        s.a.insert(&record("key_1", "o1", "acct"), limits, now)
            .await
            .unwrap();
        s.a.insert(&record("key_2", "o2", "acct"), limits, now)
            .await
            .unwrap();
        let err =
            s.b.insert(&record("key_3", "o3", "acct"), limits, now)
                .await
                .unwrap_err();
        assert_eq!(
            err.kind(),
            StoreErrorKind::LimitReached {
                limit: 2,
                scope: "account"
            }
        );
        s.a.insert(&record("key_4", "o1", "other"), limits, now)
            .await
            .unwrap();
        s.a.revoke(&KeyId::new("key_1"), now).await.unwrap();
        s.b.insert(&record("key_3", "o3", "acct"), limits, now)
            .await
            .unwrap();
        // Both bounds at once: the owner bound is reported when both are hit.
        let both = KeyLimits {
            per_owner: Some(1),
            per_account: Some(2),
        };
        let err =
            s.a.insert(&record("key_5", "o2", "acct"), both, now)
                .await
                .unwrap_err();
        assert_eq!(
            err.kind(),
            StoreErrorKind::LimitReached {
                limit: 1,
                scope: "owner"
            }
        );
    }

    pub(crate) async fn concurrent_inserts_never_overshoot_the_limit(s: Stores) {
        let now = now();
        for (limits, owner_of, account_of, scope) in [
            (
                KeyLimits {
                    per_owner: Some(5),
                    per_account: None,
                },
                (|_| "busy".to_owned()) as fn(usize) -> String,
                (|i| format!("acct_{i}")) as fn(usize) -> String,
                "owner",
            ),
            (
                KeyLimits {
                    per_owner: None,
                    per_account: Some(5),
                },
                (|i| format!("owner_{i}")) as fn(usize) -> String,
                (|_| "busy".to_owned()) as fn(usize) -> String,
                "account",
            ),
        ] {
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    // Alternate between the two instances (two pools for the SQL stores).
                    let store = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
                    let r = record(&format!("key_{scope}_{i:02}"), &owner_of(i), &account_of(i));
                    tokio::spawn(async move { store.insert(&r, limits, now).await })
                })
                .collect();
            let (mut ok, mut refused) = (0, 0);
            for task in tasks {
                match task.await.unwrap() {
                    Ok(()) => ok += 1,
                    Err(e) if e.kind() == (StoreErrorKind::LimitReached { limit: 5, scope }) => {
                        refused += 1
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            assert_eq!((ok, refused), (5, 45), "per {scope}");
        }
        assert_eq!(s.a.list(&query("busy", None, 100)).await.unwrap().len(), 5);
    }

    pub(crate) async fn duplicate_id_or_digest_conflicts(s: Stores) {
        let r = record("key_1", "o", "a");
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let same_id = record("key_1", "o2", "a2");
        let same_digest = KeyRecord {
            digest: r.digest,
            ..record("key_2", "o", "a")
        };
        for dup in [&same_id, &same_digest, &r] {
            let err = s.b.insert(dup, no_limits(), now()).await.unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Conflict);
        }
        // A digest that identifies another key during its grace period is taken too.
        let rot = rotation(Some(t(3_600)));
        s.a.replace_secret(&r.id, &rot)
            .await
            .unwrap()
            .unwrap()
            .after
            .unwrap();
        let on_grace = KeyRecord {
            digest: r.digest,
            ..record("key_3", "o", "a")
        };
        let err = s.a.insert(&on_grace, no_limits(), now()).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Conflict);
        // Nothing was stored by the refused inserts; the conflict error does not leak the digest.
        assert_eq!(
            ids(&s.a.list(&query("o", None, 10)).await.unwrap()),
            ["key_1"]
        );
        assert_eq!(s.a.list(&query("o2", None, 10)).await.unwrap(), vec![]);
        let text = format!("{err} {err:?}");
        let hex: String = r
            .digest
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&hex[..16]), "{text}");
    }

    pub(crate) async fn last_used_batch_keeps_later_times(s: Stores) {
        let (a, b, c) = (
            record("key_a", "o", "x"),
            record("key_b", "o", "x"),
            record("key_c", "o", "x"),
        );
        let c = KeyRecord {
            last_used_at: Some(t(500)),
            ..c
        };
        for r in [&a, &b, &c] {
            s.a.insert(r, no_limits(), now()).await.unwrap();
        }
        s.a.record_last_used(&[]).await.unwrap();
        s.a.record_last_used(&[
            (a.id.clone(), t(20)),
            (b.id.clone(), t(10)),
            (KeyId::new("key_unknown"), t(30)),
            (a.id.clone(), t(15)),
            (c.id.clone(), t(400)),
        ])
        .await
        .unwrap();
        let last = |r: Option<KeyRecord>| r.unwrap().last_used_at;
        assert_eq!(
            last(s.a.get(&a.id).await.unwrap()),
            Some(t(20)),
            "later of one batch"
        );
        assert_eq!(last(s.a.get(&b.id).await.unwrap()), Some(t(10)));
        assert_eq!(
            last(s.a.get(&c.id).await.unwrap()),
            Some(t(500)),
            "stored time was later"
        );
        s.b.record_last_used(&[(a.id.clone(), t(5)), (b.id.clone(), t(11))])
            .await
            .unwrap();
        assert_eq!(
            last(s.a.get(&a.id).await.unwrap()),
            Some(t(20)),
            "earlier batch loses"
        );
        assert_eq!(last(s.a.get(&b.id).await.unwrap()), Some(t(11)));
        assert_eq!(s.a.get(&KeyId::new("key_unknown")).await.unwrap(), None);
    }

    pub(crate) async fn timestamps_keep_microseconds(s: Stores) {
        let nanos = time::macros::datetime!(2031-02-03 04:05:06.123_456_789 UTC);
        let floored = time::macros::datetime!(2031-02-03 04:05:06.123_456 UTC);
        let before_epoch = time::macros::datetime!(1969-07-20 20:17:40.000_000_999 UTC);
        let r = KeyRecord {
            created_at: nanos,
            expires_at: Some(nanos + Duration::days(1)),
            rotated_at: Some(before_epoch),
            // A non-UTC offset comes back as the same instant.
            last_used_at: Some(nanos.to_offset(time::macros::offset!(+05:30))),
            ..record("key_1", "o", "a")
        };
        s.a.insert(&r, no_limits(), now()).await.unwrap();
        let got = s.a.get(&r.id).await.unwrap().unwrap();
        if s.exact_times {
            assert_eq!(got, r);
        } else {
            assert_eq!(got.created_at, floored);
            assert_eq!(got.expires_at, Some(floored + Duration::days(1)));
            assert_eq!(
                got.rotated_at,
                Some(time::macros::datetime!(1969-07-20 20:17:40 UTC))
            );
            assert_eq!(got.last_used_at, Some(floored));
        }
        s.a.record_last_used(&[(r.id.clone(), nanos + Duration::nanoseconds(100))])
            .await
            .unwrap();
        let got = s.a.get(&r.id).await.unwrap().unwrap();
        let expected = if s.exact_times {
            nanos + Duration::nanoseconds(100)
        } else {
            floored
        };
        assert_eq!(got.last_used_at, Some(expected));
    }

    pub(crate) async fn find_returns_revoked_and_expired_records(s: Stores) {
        let expired = KeyRecord {
            expires_at: Some(t(-86_400 * 365 * 20)),
            ..record("key_expired", "o", "a")
        };
        let revoked = KeyRecord {
            revoked_at: Some(t(1)),
            ..record("key_revoked", "o", "a")
        };
        for r in [&expired, &revoked] {
            s.a.insert(r, no_limits(), now()).await.unwrap();
        }
        let grace_over = rotation(Some(t(-86_400 * 365 * 20)));
        let rotated =
            s.a.replace_secret(&expired.id, &grace_over)
                .await
                .unwrap()
                .unwrap()
                .after
                .unwrap();
        assert_eq!(
            s.b.find_by_digest(&revoked.digest).await.unwrap(),
            Some(revoked)
        );
        assert_eq!(
            s.b.find_by_digest(&grace_over.digest).await.unwrap(),
            Some(rotated.clone())
        );
        // The grace period is over, yet the store still answers: the resolver refuses it.
        assert_eq!(
            s.b.find_by_digest(&expired.digest).await.unwrap(),
            Some(rotated)
        );
    }
}

mod containment {
    use super::*;
    use tower_api_keys::limits::{
        BudgetId, BudgetLevel, Credits, MAX_CREDITS, PoolId, RateLimit, RefillInterval, UsageLimits,
    };
    use tower_api_keys::store::{ChainSpend, MAX_DELEGATION_DEPTH};

    fn credits(remaining: u64) -> UsageLimits {
        UsageLimits {
            rate_limit: None,
            credits: Some(Credits::new(remaining).set_at(t(0))),
        }
    }

    fn rate(limit: u32) -> UsageLimits {
        UsageLimits {
            rate_limit: Some(RateLimit::new(limit, 60)),
            credits: None,
        }
    }

    fn key(id: &str) -> BudgetId {
        BudgetId::Key(KeyId::new(id))
    }

    fn limited(id: &str, parent: Option<&str>, limits: UsageLimits) -> KeyRecord {
        KeyRecord {
            created_by: parent.map(KeyId::new),
            limits,
            ..record(id, "o", "a")
        }
    }

    async fn insert(store: &dyn KeyStore, records: &[KeyRecord]) {
        for r in records {
            store.insert(r, no_limits(), now()).await.unwrap();
        }
    }

    /// What is left at `level` as stored (a key's or a pool's credits).
    async fn left(store: &dyn KeyStore, level: &BudgetId) -> Option<u64> {
        let limits = match level {
            BudgetId::Key(id) => store.get(id).await.unwrap().map(|r| r.limits),
            BudgetId::Pool(pool) => store.pool(pool).await.unwrap(),
        };
        limits.and_then(|l| l.credits).map(|c| c.remaining)
    }

    pub(crate) async fn ancestors_are_nearest_first_and_bounded(s: Stores) {
        // key_00 (master-created) -> key_01 -> ... -> key_10.
        let chain: Vec<KeyRecord> = (0..=10)
            .map(|i| {
                let parent = (i > 0).then(|| format!("key_{:02}", i - 1));
                limited(&format!("key_{i:02}"), parent.as_deref(), UsageLimits::NONE)
            })
            .collect();
        insert(&*s.a, &chain).await;
        let ancestors = s.b.ancestors(&KeyId::new("key_10")).await.unwrap();
        assert_eq!(ancestors.len(), MAX_DELEGATION_DEPTH);
        assert_eq!(
            ids(&ancestors),
            [
                "key_09", "key_08", "key_07", "key_06", "key_05", "key_04", "key_03", "key_02"
            ],
            "nearest first, at most MAX_DELEGATION_DEPTH"
        );
        assert_eq!(ancestors[0], chain[9], "whole records");
        assert_eq!(
            ids(&s.a.ancestors(&KeyId::new("key_03")).await.unwrap()),
            ["key_02", "key_01", "key_00"]
        );
        assert!(
            s.a.ancestors(&KeyId::new("key_00"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.a.ancestors(&KeyId::new("key_nope"))
                .await
                .unwrap()
                .is_empty()
        );
        // Revoked ancestors are still ancestors.
        s.a.revoke(&KeyId::new("key_07"), t(5)).await.unwrap();
        let ancestors = s.b.ancestors(&KeyId::new("key_09")).await.unwrap();
        assert_eq!(ids(&ancestors)[..3], ["key_08", "key_07", "key_06"]);
        assert_eq!(ancestors[1].revoked_at, Some(t(5)));
        assert_eq!(
            ancestors[0].revoked_at,
            Some(t(5)),
            "revoked by the cascade"
        );
        assert_eq!(ancestors[2].revoked_at, None);
    }

    pub(crate) async fn ancestors_stop_at_a_deleted_creator(s: Stores) {
        insert_tree(&*s.a).await;
        assert_eq!(
            ids(&s.b.ancestors(&KeyId::new("gg1")).await.unwrap()),
            ["g1", "c1", "root"]
        );
        s.a.delete(&KeyId::new("c1"), t(5)).await.unwrap().unwrap();
        assert_eq!(
            ids(&s.b.ancestors(&KeyId::new("gg1")).await.unwrap()),
            ["g1"],
            "the chain breaks where the creator is gone"
        );
        assert!(s.b.ancestors(&KeyId::new("g1")).await.unwrap().is_empty());
        assert_eq!(
            ids(&s.b.ancestors(&KeyId::new("c2")).await.unwrap()),
            ["root"]
        );
    }

    pub(crate) async fn descendants_are_the_whole_subtree(s: Stores) {
        insert_tree(&*s.a).await;
        let all = s.b.descendants(&KeyId::new("root")).await.unwrap();
        assert_eq!(sorted_ids(&all), ["c1", "c2", "g1", "gg1"]);
        for r in &all {
            assert_eq!(s.a.get(&r.id).await.unwrap().as_ref(), Some(r));
        }
        assert_eq!(
            sorted_ids(&s.b.descendants(&KeyId::new("c1")).await.unwrap()),
            ["g1", "gg1"]
        );
        assert_eq!(
            sorted_ids(&s.b.descendants(&KeyId::new("other")).await.unwrap()),
            ["other_c"]
        );
        assert!(
            s.b.descendants(&KeyId::new("gg1"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.b.descendants(&KeyId::new("nope"))
                .await
                .unwrap()
                .is_empty()
        );
        // Revoked descendants stay descendants.
        s.a.revoke(&KeyId::new("g1"), t(9)).await.unwrap();
        let under_c1 = s.b.descendants(&KeyId::new("c1")).await.unwrap();
        assert_eq!(sorted_ids(&under_c1), ["g1", "gg1"]);
        assert!(under_c1.iter().all(|r| r.revoked_at == Some(t(9))));
    }

    pub(crate) async fn budget_above_lists_limited_ancestors_then_pools(s: Stores) {
        // root (credits) -> mid (no limits) -> leaf (rate) -> me (its own limits, not above it).
        let chain = [
            limited("root", None, credits(100)),
            limited("mid", Some("root"), UsageLimits::NONE),
            limited("leaf", Some("mid"), rate(10)),
            limited("me", Some("leaf"), credits(1)),
            limited("solo", None, credits(1)),
        ];
        insert(&*s.a, &chain).await;
        let me = &chain[3];
        assert_eq!(
            s.b.budget_above(me).await.unwrap(),
            [
                BudgetLevel {
                    id: key("leaf"),
                    limits: rate(10),
                },
                BudgetLevel {
                    id: key("root"),
                    limits: credits(100),
                },
            ],
            "no pools yet"
        );
        assert!(s.b.budget_above(&chain[4]).await.unwrap().is_empty());
        let (account_pool, owner_pool) = (PoolId::account("o", "a"), PoolId::owner("o"));
        assert!(
            s.a.set_pool(&owner_pool, Some(credits(1_000)), false)
                .await
                .unwrap()
        );
        assert!(
            s.a.set_pool(&account_pool, Some(rate(50)), false)
                .await
                .unwrap()
        );
        // Pools that are not this key's, and one without limits, are left out.
        for other in [
            PoolId::account("o", "b"),
            PoolId::owner("p"),
            PoolId::account("p", "a"),
        ] {
            s.a.set_pool(&other, Some(credits(7)), false).await.unwrap();
        }
        assert_eq!(
            s.b.budget_above(me).await.unwrap(),
            [
                BudgetLevel {
                    id: key("leaf"),
                    limits: rate(10),
                },
                BudgetLevel {
                    id: key("root"),
                    limits: credits(100),
                },
                BudgetLevel {
                    id: BudgetId::Pool(account_pool.clone()),
                    limits: rate(50),
                },
                BudgetLevel {
                    id: BudgetId::Pool(owner_pool.clone()),
                    limits: credits(1_000),
                },
            ]
        );
        assert_eq!(
            s.b.budget_above(&chain[4]).await.unwrap(),
            [
                BudgetLevel {
                    id: BudgetId::Pool(account_pool.clone()),
                    limits: rate(50),
                },
                BudgetLevel {
                    id: BudgetId::Pool(owner_pool.clone()),
                    limits: credits(1_000),
                },
            ]
        );
        s.a.set_pool(&account_pool, Some(UsageLimits::NONE), false)
            .await
            .unwrap();
        let levels = s.b.budget_above(&chain[4]).await.unwrap();
        assert_eq!(levels.len(), 1, "a pool without limits is no level");
        assert_eq!(levels[0].id, BudgetId::Pool(owner_pool));
    }

    pub(crate) async fn pools_set_if_absent_and_remove(s: Stores) {
        let owner = PoolId::owner("o");
        let account = PoolId::account("o", "a");
        // An empty account name is still an account pool, not the owner's.
        let blank = PoolId::account("o", "");
        assert_eq!(s.a.pool(&owner).await.unwrap(), None);
        let first = UsageLimits {
            rate_limit: Some(RateLimit::new(5, 1)),
            credits: Some(
                Credits::new(9)
                    .refill(RefillInterval::Monthly, 30)
                    .set_at(t(1)),
            ),
        };
        assert!(s.a.set_pool(&owner, Some(first), true).await.unwrap());
        assert!(!s.b.set_pool(&owner, Some(rate(1)), true).await.unwrap());
        assert_eq!(
            s.b.pool(&owner).await.unwrap(),
            Some(first),
            "kept the first"
        );
        assert_eq!(s.b.pool(&account).await.unwrap(), None);
        assert_eq!(s.b.pool(&blank).await.unwrap(), None);
        assert!(s.b.set_pool(&blank, Some(rate(3)), true).await.unwrap());
        assert!(s.b.set_pool(&account, Some(rate(2)), false).await.unwrap());
        assert!(
            s.a.set_pool(&account, Some(credits(4)), false)
                .await
                .unwrap()
        );
        assert_eq!(
            s.a.pool(&account).await.unwrap(),
            Some(credits(4)),
            "replaced"
        );
        assert_eq!(s.a.pool(&blank).await.unwrap(), Some(rate(3)));
        assert_eq!(s.a.pool(&owner).await.unwrap(), Some(first));
        // Removal: not with if_absent, then once.
        assert!(!s.a.set_pool(&owner, None, true).await.unwrap());
        assert_eq!(s.b.pool(&owner).await.unwrap(), Some(first));
        assert!(s.a.set_pool(&owner, None, false).await.unwrap());
        assert!(!s.b.set_pool(&owner, None, false).await.unwrap());
        assert_eq!(s.b.pool(&owner).await.unwrap(), None);
        assert_eq!(
            s.b.pool(&blank).await.unwrap(),
            Some(rate(3)),
            "others stay"
        );
        assert!(s.b.set_pool(&owner, Some(rate(8)), true).await.unwrap());
        assert_eq!(s.a.pool(&owner).await.unwrap(), Some(rate(8)));
    }

    pub(crate) async fn racing_pool_inserts_all_see_the_first(s: Stores) {
        let pool = PoolId::account("o", "race");
        let racers: Vec<_> = (1..=12u64)
            .map(|i| {
                let store = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
                let pool = pool.clone();
                tokio::spawn(async move {
                    let wrote = store.set_pool(&pool, Some(credits(i)), true).await.unwrap();
                    (i, wrote, store.pool(&pool).await.unwrap())
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut seen = Vec::new();
        for racer in racers {
            let (i, wrote, read) = racer.await.unwrap();
            if wrote {
                winners.push(i);
            }
            seen.push(read);
        }
        assert_eq!(winners.len(), 1, "exactly one insert wins: {winners:?}");
        let first = Some(credits(winners[0]));
        assert!(seen.iter().all(|read| *read == first), "{seen:?}");
        assert_eq!(s.a.pool(&pool).await.unwrap(), first);
    }

    pub(crate) async fn chain_spend_is_all_or_nothing(s: Stores) {
        let chain = [
            limited("root", None, credits(100)),
            limited("mid", Some("root"), rate(5)),
            limited("leaf", Some("mid"), credits(5)),
        ];
        insert(&*s.a, &chain).await;
        let account = BudgetId::Pool(PoolId::account("o", "a"));
        let owner = BudgetId::Pool(PoolId::owner("o"));
        let BudgetId::Pool(account_pool) = &account else {
            unreachable!()
        };
        s.a.set_pool(account_pool, Some(credits(50)), false)
            .await
            .unwrap();
        // leaf, mid (no credits), root, the account pool, the owner pool (not set), an unknown key.
        let levels = [
            key("leaf"),
            key("mid"),
            key("root"),
            account.clone(),
            owner.clone(),
            key("nope"),
        ];
        assert_eq!(
            s.a.spend_credits(&levels, 3, t(1)).await.unwrap(),
            ChainSpend::Spent {
                remaining: vec![Some(2), None, Some(97), Some(47), None, None],
            }
        );
        // The nearest level is short: nothing is spent anywhere.
        assert_eq!(
            s.b.spend_credits(&levels, 3, t(2)).await.unwrap(),
            ChainSpend::Insufficient {
                level: 0,
                remaining: 2,
            }
        );
        for (level, expected) in [(&levels[0], 2), (&levels[2], 97), (&account, 47)] {
            assert_eq!(left(&*s.a, level).await, Some(expected), "{level}");
        }
        // The deepest level is short: nothing is spent at the nearer ones.
        s.a.set_pool(account_pool, Some(credits(1)), false)
            .await
            .unwrap();
        assert_eq!(
            s.b.spend_credits(&levels, 2, t(3)).await.unwrap(),
            ChainSpend::Insufficient {
                level: 3,
                remaining: 1,
            }
        );
        for (level, expected) in [(&levels[0], 2), (&levels[2], 97), (&account, 1)] {
            assert_eq!(left(&*s.b, level).await, Some(expected), "{level}");
        }
        // Exactly what is left is enough; a level named twice is spent once.
        assert_eq!(
            s.a.spend_credits(&[key("root"), account.clone(), key("root")], 1, t(4))
                .await
                .unwrap(),
            ChainSpend::Spent {
                remaining: vec![Some(96), Some(0), Some(96)],
            }
        );
        assert_eq!(
            s.a.spend_credits(&[], 1, t(5)).await.unwrap(),
            ChainSpend::Spent { remaining: vec![] }
        );
        assert_eq!(
            left(&*s.b, &levels[0]).await,
            Some(2),
            "not asked, not spent"
        );
    }

    pub(crate) async fn chain_spend_applies_refills_per_level(s: Stores) {
        let daily = UsageLimits {
            rate_limit: None,
            credits: Some(
                Credits::new(0)
                    .refill(RefillInterval::Daily, 10)
                    .set_at(t(0)),
            ),
        };
        let chain = [
            limited("root", None, credits(5)),
            limited("leaf", Some("root"), daily),
        ];
        insert(&*s.a, &chain).await;
        let levels = [key("leaf"), key("root")];
        assert_eq!(
            s.a.spend_credits(&levels, 1, t(10)).await.unwrap(),
            ChainSpend::Insufficient {
                level: 0,
                remaining: 0,
            },
            "no refill due yet"
        );
        let day = 86_400;
        assert_eq!(
            s.b.spend_credits(&levels, 1, t(day)).await.unwrap(),
            ChainSpend::Spent {
                remaining: vec![Some(9), Some(4)],
            }
        );
        let leaf = s.a.get(&KeyId::new("leaf")).await.unwrap().unwrap();
        let root = s.a.get(&KeyId::new("root")).await.unwrap().unwrap();
        let (leaf, root) = (leaf.limits.credits.unwrap(), root.limits.credits.unwrap());
        assert_eq!(
            (leaf.remaining, leaf.set_at),
            (9, t(day)),
            "refilled, then spent"
        );
        assert_eq!(
            (root.remaining, root.set_at),
            (4, t(0)),
            "no refill at the root"
        );
        // The next day the root is short: the leaf's refill is still applied, nothing spent.
        assert_eq!(
            s.a.spend_credits(&levels, 5, t(2 * day)).await.unwrap(),
            ChainSpend::Insufficient {
                level: 1,
                remaining: 4,
            }
        );
        let leaf = s.b.get(&KeyId::new("leaf")).await.unwrap().unwrap();
        let leaf = leaf.limits.credits.unwrap();
        assert_eq!((leaf.remaining, leaf.set_at), (10, t(2 * day)));
        assert_eq!(left(&*s.b, &levels[1]).await, Some(4));
        // A refill in a pool.
        let pool = PoolId::owner("o");
        s.a.set_pool(&pool, Some(daily), false).await.unwrap();
        assert_eq!(
            s.b.spend_credits(&[BudgetId::Pool(pool.clone())], 4, t(day))
                .await
                .unwrap(),
            ChainSpend::Spent {
                remaining: vec![Some(6)],
            }
        );
        let stored = s.a.pool(&pool).await.unwrap().unwrap().credits.unwrap();
        assert_eq!((stored.remaining, stored.set_at), (6, t(day)));
    }

    pub(crate) async fn chain_refund_gives_back_everywhere(s: Stores) {
        let chain = [
            limited("root", None, credits(MAX_CREDITS - 1)),
            limited("leaf", Some("root"), credits(3)),
            limited("free", None, rate(1)),
        ];
        insert(&*s.a, &chain).await;
        let pool = PoolId::account("o", "a");
        s.a.set_pool(&pool, Some(credits(10)), false).await.unwrap();
        let levels = [
            key("leaf"),
            key("root"),
            key("free"),
            key("nope"),
            BudgetId::Pool(pool.clone()),
            BudgetId::Pool(PoolId::owner("o")),
        ];
        s.b.refund_credits(&levels, 5, t(1)).await.unwrap();
        assert_eq!(left(&*s.a, &levels[0]).await, Some(8));
        assert_eq!(
            left(&*s.a, &levels[1]).await,
            Some(MAX_CREDITS),
            "saturates at MAX_CREDITS"
        );
        assert_eq!(left(&*s.a, &levels[2]).await, None, "no credits, none made");
        assert_eq!(left(&*s.a, &levels[4]).await, Some(15));
        assert_eq!(s.a.pool(&PoolId::owner("o")).await.unwrap(), None);
        // A spend then its refund leaves every level where it was.
        let spent = s.a.spend_credits(&levels, 8, t(2)).await.unwrap();
        assert_eq!(
            spent,
            ChainSpend::Spent {
                remaining: vec![Some(0), Some(MAX_CREDITS - 8), None, None, Some(7), None],
            }
        );
        s.b.refund_credits(&levels, 8, t(3)).await.unwrap();
        assert_eq!(left(&*s.a, &levels[0]).await, Some(8));
        assert_eq!(left(&*s.a, &levels[1]).await, Some(MAX_CREDITS));
        assert_eq!(left(&*s.a, &levels[4]).await, Some(15));
    }

    pub(crate) async fn concurrent_chain_spends_are_exact(s: Stores) {
        let chain = [
            limited("root", None, credits(20)),
            limited("mid", Some("root"), credits(1_000)),
            limited("leaf", Some("mid"), credits(1_000)),
        ];
        insert(&*s.a, &chain).await;
        let pool = PoolId::account("o", "a");
        s.a.set_pool(&pool, Some(credits(1_000)), false)
            .await
            .unwrap();
        let levels = vec![
            key("leaf"),
            key("mid"),
            key("root"),
            BudgetId::Pool(pool.clone()),
        ];
        // Half ask nearest first, half farthest first: the stores lock in their own order, so
        // the chains never wait on each other in a cycle.
        let reversed: Vec<BudgetId> = levels.iter().rev().cloned().collect();
        let spends: Vec<_> = (0..50)
            .map(|i| {
                let store = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
                let levels = if i % 4 < 2 {
                    levels.clone()
                } else {
                    reversed.clone()
                };
                tokio::spawn(async move {
                    let root = if levels[0] == key("leaf") { 2 } else { 1 };
                    (root, store.spend_credits(&levels, 1, t(1)).await.unwrap())
                })
            })
            .collect();
        let (mut spent, mut refused) = (0, 0);
        for spend in spends {
            match spend.await.unwrap() {
                (_, ChainSpend::Spent { remaining }) => {
                    spent += 1;
                    assert_eq!(remaining.len(), 4);
                }
                (root, ChainSpend::Insufficient { level, remaining }) => {
                    refused += 1;
                    assert_eq!((level, remaining), (root, 0), "only the root runs out");
                }
            }
        }
        assert_eq!((spent, refused), (20, 30), "exactly the root's 20");
        for (level, expected) in [
            (&levels[0], 980),
            (&levels[1], 980),
            (&levels[2], 0),
            (&levels[3], 980),
        ] {
            assert_eq!(left(&*s.b, level).await, Some(expected), "{level}");
        }
    }
}

// Keep the fixture helpers honest: the digest of a generated key is what the store indexes.
#[test]
fn fixtures_make_distinct_secrets() {
    let (a, b) = (record("key_1", "o", "a"), record("key_1", "o", "a"));
    assert_ne!(a.digest, b.digest);
    assert_eq!(KeyDigest::of(secret().expose_secret()).as_bytes().len(), 32);
}

// ---------------------------------------------------------------------------------------------
// Store-specific checks: what the shared contract cannot express (schema, on-disk form).

#[cfg(feature = "postgres")]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(feature = "postgres")]
mod postgres_only {
    use sqlx::AssertSqlSafe;
    use tower_api_keys::error::AuthError;
    use tower_api_keys::resolver::CachedResolver;
    use tower_api_keys::store::PostgresStore;

    use super::*;

    async fn versions(store: &PostgresStore) -> Vec<i32> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM \"{}\".api_key_migrations ORDER BY version",
            store.schema()
        )))
        .fetch_all(store.pool())
        .await
        .unwrap()
    }

    async fn execute(store: &PostgresStore, sql: String) {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }

    /// A schema from before version 4 (no usage-limit columns) with a key in it: a new instance
    /// migrates it on start-up, and the key works on with no limits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_from_before_usage_limits_keep_working_with_none() {
        let Some(schema) = common::db::pg_schema("pg_v2").await else {
            return;
        };
        let old = schema.store().await;
        let r = record("key_old", "o", "a");
        old.insert(&r, no_limits(), now()).await.unwrap();
        let s = format!("\"{}\"", schema.schema);
        execute(
            &old,
            format!(
                "ALTER TABLE {s}.api_keys DROP COLUMN rate_limit, DROP COLUMN rate_period_seconds, DROP COLUMN credits_remaining, DROP COLUMN credits_refill_interval, DROP COLUMN credits_refill_amount, DROP COLUMN credits_set_at, DROP COLUMN allowed_networks; DROP TABLE {s}.api_key_pools; DROP TABLE {s}.api_key_events, {s}.api_key_event_chains, {s}.api_key_usage; DELETE FROM {s}.api_key_migrations WHERE version >= 4"
            ),
        )
        .await;
        old.pool().close().await;
        let store = schema.store().await;
        assert_eq!(versions(&store).await, [1, 2, 3, 4, 5, 6, 7, 8]);
        let found = store.find_by_digest(&r.digest).await.unwrap();
        assert_eq!(found, Some(r.clone()));
        let found = found.unwrap();
        assert!(found.limits.is_unlimited());
        assert_eq!(found.allowed_networks, None, "usable from anywhere");
        assert_eq!(
            KeyStore::pool(&store, &tower_api_keys::limits::PoolId::owner("o"))
                .await
                .unwrap(),
            None
        );
        store.pool().close().await;
        schema.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_run_once_when_instances_start_together() {
        let Some(probe) = common::db::pg_schema("pg_migrations").await else {
            return;
        };
        let fresh = common::db::PgSchema {
            url: probe.url.clone(),
            schema: common::db::unique("t_pg_migrations_fresh"),
        };
        probe.drop_schema().await;
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let (url, schema) = (fresh.url.clone(), fresh.schema.clone());
                tokio::spawn(async move {
                    PostgresStore::builder()
                        .schema(&schema)
                        .unwrap()
                        .max_connections(1)
                        .connect(&url)
                        .await
                })
            })
            .collect();
        let mut stores = Vec::new();
        for start in starts {
            stores.push(start.await.unwrap().expect("every instance starts"));
        }
        assert_eq!(versions(&stores[0]).await, [1, 2, 3, 4, 5, 6, 7, 8]);
        let again = fresh.store().await;
        again.migrate().await.unwrap();
        assert_eq!(
            versions(&again).await,
            [1, 2, 3, 4, 5, 6, 7, 8],
            "a restart applies nothing"
        );
        let r = record("key_1", "o", "a");
        again.insert(&r, no_limits(), now()).await.unwrap();
        assert_eq!(stores[3].get(&r.id).await.unwrap(), Some(r));
        fresh.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreadable_rows_are_corrupt_and_never_an_invalid_key() {
        let Some(schema) = common::db::pg_schema("pg_corrupt").await else {
            return;
        };
        let store = schema.store().await;
        let s = format!("\"{}\"", schema.schema);
        let r = record("key_1", "o", "a");
        store.insert(&r, no_limits(), now()).await.unwrap();
        let corrupt =
            |e: tower_api_keys::store::StoreError| assert_eq!(e.kind(), StoreErrorKind::Corrupt);

        execute(
            &store,
            format!("UPDATE {s}.api_keys SET digest_scheme = 99"),
        )
        .await;
        corrupt(store.get(&r.id).await.unwrap_err());
        corrupt(store.find_by_digest(&r.digest).await.unwrap_err());
        corrupt(store.list(&query("o", None, 10)).await.unwrap_err());
        let resolver = CachedResolver::new(store.clone());
        match resolver.authenticate(&r.digest).await {
            Err(AuthError::Unavailable(e)) => assert_eq!(e.kind(), StoreErrorKind::Corrupt),
            other => panic!("expected Unavailable, got {other:?}"),
        }

        execute(&store, format!("UPDATE {s}.api_keys SET digest_scheme = 1")).await;
        store
            .replace_secret(&r.id, &rotation(Some(t(60))))
            .await
            .unwrap();
        execute(
            &store,
            format!("UPDATE {s}.api_keys SET previous_digest_scheme = 7"),
        )
        .await;
        corrupt(store.get(&r.id).await.unwrap_err());
        execute(
            &store,
            format!("UPDATE {s}.api_keys SET previous_digest_scheme = 1"),
        )
        .await;
        assert!(store.get(&r.id).await.unwrap().is_some());

        execute(
            &store,
            format!("UPDATE {s}.api_keys SET allowed_networks = 'not a network'"),
        )
        .await;
        corrupt(store.get(&r.id).await.unwrap_err());
        execute(
            &store,
            format!("UPDATE {s}.api_keys SET allowed_networks = '10.0.0.0/8 ::1'"),
        )
        .await;
        assert_eq!(
            store.get(&r.id).await.unwrap().unwrap().allowed_networks,
            Some("10.0.0.0/8 ::1/128".parse().unwrap())
        );

        execute(
            &store,
            format!("UPDATE {s}.api_keys SET scopes = ARRAY['Not A Scope']"),
        )
        .await;
        corrupt(store.get(&r.id).await.unwrap_err());
        schema.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_plaintext_secret_is_stored() {
        let Some(schema) = common::db::pg_schema("pg_plaintext").await else {
            return;
        };
        let store = schema.store().await;
        let s = format!("\"{}\"", schema.schema);
        let (old, new) = (secret(), secret());
        let r = KeyRecord {
            digest: old.digest(),
            ..record("key_1", "o", "a")
        };
        store.insert(&r, no_limits(), now()).await.unwrap();
        let rot = Rotation {
            digest: new.digest(),
            ..rotation(Some(t(60)))
        };
        store
            .replace_secret(&r.id, &rot)
            .await
            .unwrap()
            .unwrap()
            .after
            .unwrap();
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT t::text FROM {s}.api_keys t UNION ALL SELECT t::text FROM {s}.api_key_digests t"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        let dump = rows.concat();
        for key in [&old, &new] {
            let body = &key.expose_secret()["sk_test_".len()..];
            assert!(!dump.contains(body), "a secret is stored in plain text");
            assert!(
                dump.contains(&hex(key.digest().as_bytes())),
                "digests are stored as bytes"
            );
        }
        schema.drop_schema().await;
    }
}

#[cfg(feature = "sqlite")]
mod sqlite_only {
    use tower_api_keys::store::SqliteStore;

    use super::*;

    fn temp_db(test: &str) -> (std::path::PathBuf, String) {
        let path = std::env::temp_dir().join(format!("{}.db", common::db::unique(test)));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        (path, url)
    }

    fn remove(path: &std::path::Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.to_path_buf().into_os_string();
            file.push(suffix);
            if let Ok(content) = std::fs::read(&file) {
                bytes.extend(content);
            }
            let _ = std::fs::remove_file(file);
        }
        bytes
    }

    /// A database from before schema version 4 (no usage-limit columns) with a key in it: opening
    /// it migrates, and the key works on with no limits.
    #[tokio::test]
    async fn keys_from_before_usage_limits_keep_working_with_none() {
        let (path, url) = temp_db("sqlite_v2");
        let old = SqliteStore::connect(&url).await.unwrap();
        let r = record("key_old", "o", "a");
        old.insert(&r, no_limits(), now()).await.unwrap();
        for column in [
            "rate_limit",
            "rate_period_seconds",
            "credits_remaining",
            "credits_refill_interval",
            "credits_refill_amount",
            "credits_set_at",
            "allowed_networks",
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE api_keys DROP COLUMN {column}"
            )))
            .execute(old.pool())
            .await
            .unwrap();
        }
        sqlx::raw_sql(
            "DROP TABLE api_key_pools; DROP TABLE api_key_events; DROP TABLE api_key_event_chains; DROP TABLE api_key_usage; DELETE FROM api_key_migrations WHERE version >= 4",
        )
        .execute(old.pool())
        .await
        .unwrap();
        old.pool().close().await;
        let store = SqliteStore::connect(&url).await.unwrap();
        let found = store.find_by_digest(&r.digest).await.unwrap();
        assert_eq!(found, Some(r.clone()));
        let found = found.unwrap();
        assert!(found.limits.is_unlimited());
        assert_eq!(found.allowed_networks, None, "usable from anywhere");
        assert_eq!(
            KeyStore::pool(&store, &tower_api_keys::limits::PoolId::owner("o"))
                .await
                .unwrap(),
            None
        );
        store.pool().close().await;
        remove(&path);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrations_run_once_when_instances_start_together() {
        let (path, url) = temp_db("sqlite_migrations");
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { SqliteStore::connect(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for start in starts {
            stores.push(start.await.unwrap().expect("every instance starts"));
        }
        let again = SqliteStore::connect(&url).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM api_key_migrations ORDER BY version")
                .fetch_all(again.pool())
                .await
                .unwrap();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8]);
        let r = record("key_1", "o", "a");
        again.insert(&r, no_limits(), now()).await.unwrap();
        assert_eq!(stores[2].get(&r.id).await.unwrap(), Some(r));
        for store in stores.iter().chain([&again]) {
            store.pool().close().await;
        }
        remove(&path);
    }

    #[tokio::test]
    async fn unreadable_rows_are_corrupt() {
        let store = SqliteStore::in_memory().await.unwrap();
        let r = record("key_1", "o", "a");
        store.insert(&r, no_limits(), now()).await.unwrap();
        for (spoil, restore) in [
            (
                "UPDATE api_keys SET digest_scheme = 99",
                "UPDATE api_keys SET digest_scheme = 1",
            ),
            (
                "UPDATE api_keys SET scopes = 'not json'",
                "UPDATE api_keys SET scopes = '[\"ledgers:read\"]'",
            ),
            (
                "UPDATE api_keys SET scopes = '[\"Not A Scope\"]'",
                "UPDATE api_keys SET scopes = '[\"ledgers:read\"]'",
            ),
            (
                "UPDATE api_keys SET created_at = 9223372036854775807",
                "UPDATE api_keys SET created_at = 0",
            ),
            (
                "UPDATE api_keys SET allowed_networks = '10.0.0.0/33'",
                "UPDATE api_keys SET allowed_networks = '10.0.0.0/8'",
            ),
            (
                "UPDATE api_keys SET allowed_networks = ''",
                "UPDATE api_keys SET allowed_networks = NULL",
            ),
        ] {
            sqlx::query(spoil).execute(store.pool()).await.unwrap();
            let error = store.get(&r.id).await.unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{spoil}");
            let error = store.find_by_digest(&r.digest).await.unwrap_err();
            assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{spoil}");
            sqlx::query(restore).execute(store.pool()).await.unwrap();
            assert!(store.get(&r.id).await.unwrap().is_some(), "{restore}");
        }
    }

    #[tokio::test]
    async fn no_plaintext_secret_is_stored() {
        let (path, url) = temp_db("sqlite_plaintext");
        let store = SqliteStore::connect(&url).await.unwrap();
        let (old, new) = (secret(), secret());
        let r = KeyRecord {
            digest: old.digest(),
            ..record("key_1", "o", "a")
        };
        store.insert(&r, no_limits(), now()).await.unwrap();
        let rot = Rotation {
            digest: new.digest(),
            ..rotation(Some(t(60)))
        };
        store
            .replace_secret(&r.id, &rot)
            .await
            .unwrap()
            .unwrap()
            .after
            .unwrap();
        store.pool().close().await;
        let bytes = remove(&path);
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        for key in [&old, &new] {
            let body = &key.expose_secret()["sk_test_".len()..];
            assert!(
                !contains(body.as_bytes()),
                "a secret is stored in plain text"
            );
            assert!(
                contains(key.digest().as_bytes()),
                "digests are stored as bytes"
            );
        }
    }
}
