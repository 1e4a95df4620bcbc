use std::time::Duration;

use time::OffsetDateTime;

use super::*;
use crate::clock::{nanos_of, now_unix_nanos};
use crate::error::{AuthError, ExpiredReason};
use crate::key::{KeyDigest, KeyFormat, KeyId};
use crate::principal::Principal;
use crate::store::{KeyRecord, KeyStore};
use crate::usage::UsageMark;

fn key(expires_at: Option<OffsetDateTime>, revoked: bool) -> ResolvedKey {
    ResolvedKey {
        principal: Principal::master(),
        expires_at: expires_at.map_or(i64::MAX, nanos_of),
        read_at: 0,
        cached_until: i64::MAX,
        revoked,
        usage: UsageMark::default(),
    }
}

/// The nanosecond check answers as a calendar comparison would, at and around the boundaries.
#[test]
fn check_agrees_with_calendar_time() {
    let base = OffsetDateTime::now_utc();
    let ns = time::Duration::nanoseconds;
    let epoch = OffsetDateTime::UNIX_EPOCH;
    let times = [
        base,
        base - ns(1),
        base + ns(1),
        epoch - ns(1_500_000_000),
        epoch - ns(1_500_000_002),
    ];
    for expires_at in [
        None,
        Some(base - ns(1)),
        Some(base),
        Some(base + ns(1)),
        Some(epoch - ns(1_500_000_001)),
        Some(base + time::Duration::days(365 * 100)),
        Some(base + time::Duration::days(365 * 1000)),
    ] {
        for revoked in [false, true] {
            let key = key(expires_at, revoked);
            for at in times {
                let expected = if revoked {
                    Err(ExpiredReason::Revoked)
                } else if expires_at.is_some_and(|e| e <= at) {
                    Err(ExpiredReason::Expired)
                } else {
                    Ok(())
                };
                let got = key.check(nanos_of(at)).map_err(|e| match e {
                    AuthError::ExpiredKey(reason) => reason,
                    other => panic!("unexpected {other:?}"),
                });
                assert_eq!(
                    got, expected,
                    "expires_at {expires_at:?}, revoked {revoked}, at {at}"
                );
            }
        }
    }
}

pub(super) fn record(format: &KeyFormat, revoked: bool) -> (crate::key::ApiKey, KeyRecord) {
    let key = format.generate();
    let now = OffsetDateTime::now_utc();
    let record = KeyRecord {
        id: KeyId::generate(),
        name: "front".to_owned(),
        owner: "team".to_owned(),
        account: "acct".to_owned(),
        scopes: "ledgers:read".parse().unwrap(),
        digest: key.digest(),
        digest_scheme: Default::default(),
        masked_key: format.mask(&key).unwrap(),
        created_at: now,
        expires_at: None,
        revoked_at: revoked.then_some(now),
        last_used_at: None,
        created_by: None,
        rotated_at: None,
        previous: None,
        limits: Default::default(),
        allowed_networks: None,
    };
    (key, record)
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// What the hot path answers for `digest` on this thread: `None` when nothing is cached.
pub(super) fn hot(
    resolver: &CachedResolver,
    digest: &KeyDigest,
) -> Option<Result<KeyId, AuthError>> {
    resolver.admit_cached(
        digest,
        u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap()),
        now_unix_nanos(),
        || Ok(()),
        |key| key.principal.key_id().clone(),
        |_| {},
    )
}

fn resolver_with(record: &KeyRecord, ttl: Duration) -> CachedResolver {
    let store = crate::store::MemoryStore::new();
    block_on(store.insert(record, Default::default(), record.created_at)).unwrap();
    CachedResolver::builder(store).time_to_live(ttl).build()
}

/// A revocation reaches the hot path of a thread whose front already holds the key.
#[test]
fn front_forgets_on_every_invalidation() {
    let format = KeyFormat::default();
    for invalidation in ["digest", "key", "all"] {
        let (key, record) = record(&format, false);
        let resolver = resolver_with(&record, Duration::from_secs(3600));
        let digest = key.digest();
        assert!(hot(&resolver, &digest).is_none(), "nothing cached yet");
        block_on(resolver.authenticate(&digest)).unwrap();
        // The first hot read fills the front from the cache, the second is answered by the front.
        for _ in 0..2 {
            assert_eq!(hot(&resolver, &digest).unwrap().unwrap(), record.id);
        }
        block_on(
            resolver
                .store()
                .revoke(&record.id, OffsetDateTime::now_utc()),
        )
        .unwrap();
        match invalidation {
            "digest" => resolver.invalidate_digest(&digest),
            "key" => resolver.invalidate_key(&record.id),
            _ => resolver.invalidate_all(),
        }
        assert!(
            hot(&resolver, &digest).is_none(),
            "{invalidation}: front still answers"
        );
        block_on(resolver.authenticate(&digest)).unwrap_err();
        assert!(matches!(
            hot(&resolver, &digest),
            Some(Err(AuthError::ExpiredKey(ExpiredReason::Revoked)))
        ));
    }
}

/// The cached principal (built with shared owner, account and scopes) is the record's principal.
#[test]
fn cached_principal_is_the_records() {
    let format = KeyFormat::default();
    let (key, record) = record(&format, false);
    let resolver = resolver_with(&record, Duration::from_secs(3600));
    let principal = block_on(resolver.authenticate(&key.digest())).unwrap();
    let expected = Principal::scoped(
        record.id.clone(),
        record.name.as_str(),
        record.owner.as_str(),
        record.account.as_str(),
        record.scopes.clone(),
        record.expires_at,
    );
    assert_eq!(principal, expected);
}

/// Two resolvers caching the same digest (two stores) never answer with each other's key.
#[test]
fn front_keeps_resolvers_apart() {
    let format = KeyFormat::default();
    let (key, first) = record(&format, false);
    let mut second = first.clone();
    second.id = KeyId::generate();
    let (a, b) = (
        resolver_with(&first, Duration::from_secs(3600)),
        resolver_with(&second, Duration::from_secs(3600)),
    );
    let digest = key.digest();
    block_on(a.authenticate(&digest)).unwrap();
    block_on(b.authenticate(&digest)).unwrap();
    for _ in 0..3 {
        assert_eq!(hot(&a, &digest).unwrap().unwrap(), first.id);
        assert_eq!(hot(&b, &digest).unwrap().unwrap(), second.id);
    }
    // A resolver that never cached the digest does not find the other's front entry.
    let c = resolver_with(&first, Duration::from_secs(3600));
    assert_eq!(hot(&a, &digest).unwrap().unwrap(), first.id);
    assert!(hot(&c, &digest).is_none());
}

/// Neither the front nor the cache serves an answer past its cache lifetime.
#[test]
fn front_respects_the_ttl() {
    let format = KeyFormat::default();
    let (key, record) = record(&format, false);
    let resolver = resolver_with(&record, Duration::from_millis(50));
    let digest = key.digest();
    block_on(resolver.authenticate(&digest)).unwrap();
    assert!(hot(&resolver, &digest).unwrap().is_ok());
    assert!(hot(&resolver, &digest).unwrap().is_ok());
    std::thread::sleep(Duration::from_millis(80));
    assert!(
        hot(&resolver, &digest).is_none(),
        "expired entry still answered"
    );
}

/// A front slot goes back to the cache after its hit budget: moka's frequency counts and expiry
/// stay in charge of hot keys. Seen through a removal from moka alone: once the cache has dropped
/// the entry, the front stops answering within one budget.
#[test]
fn front_refills_from_the_cache() {
    let format = KeyFormat::default();
    let (key, record) = record(&format, false);
    let resolver = resolver_with(&record, Duration::from_secs(3600));
    let digest = key.digest();
    block_on(resolver.authenticate(&digest)).unwrap();
    assert!(hot(&resolver, &digest).unwrap().is_ok());
    // Remove from the cache only, bypassing the epoch: the front alone still knows the key.
    resolver.inner.cache.remove(&digest);
    let answered = (0..2 * front::HITS_PER_FILL)
        .take_while(|_| hot(&resolver, &digest).is_some())
        .count();
    assert_eq!(answered, front::HITS_PER_FILL as usize);
}
