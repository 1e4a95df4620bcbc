use std::sync::Arc;

use time::OffsetDateTime;

use super::super::CachedResolver;
use super::super::tests::{hot, record};
use crate::error::AuthError;
use crate::key::{FormatSecret, KeyFormat, KeyFormatError};
use crate::store::{KeyLimits, KeyStore, MemoryStore, StoreErrorKind};

async fn keyed(store: &MemoryStore) -> KeyFormat {
    KeyFormat::keyed("sk")
        .load_secret_from(store)
        .await
        .unwrap()
}

/// Stores a key in the resolver's current format and returns it.
async fn stored_key(resolver: &CachedResolver, store: &MemoryStore) -> crate::key::ApiKey {
    let (key, record) = record(&resolver.format(), false);
    store
        .insert(&record, KeyLimits::default(), record.created_at)
        .await
        .unwrap();
    key
}

/// Whether `resolver` answers `key` with 503 `AUTH_UNAVAILABLE` because of an `E`.
async fn unavailable_because<E: std::error::Error + 'static>(
    resolver: &CachedResolver,
    key: &crate::key::ApiKey,
) -> bool {
    match resolver.authenticate(&key.digest()).await {
        Err(AuthError::Unavailable(error)) => {
            error.kind() == StoreErrorKind::Unavailable
                && std::error::Error::source(&error).is_some_and(|s| s.is::<E>())
        }
        _ => false,
    }
}

#[tokio::test]
async fn a_reload_swaps_the_format_and_a_guard_keeps_what_it_loaded() {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::builder(store.clone())
        .format(keyed(&store).await)
        .build();
    let v1 = resolver.format().generate();
    assert!(!resolver.reload_format().await.unwrap(), "nothing changed");
    let now = OffsetDateTime::now_utc();
    store
        .add_format_secret(&FormatSecret::generate(), now)
        .await
        .unwrap();
    let before = resolver.format();
    assert!(resolver.reload_format().await.unwrap(), "version 2 added");
    assert_eq!(
        before.accepted_versions(),
        vec![1],
        "a guard keeps its format"
    );
    assert_eq!(resolver.format().accepted_versions(), vec![1, 2]);
    assert_eq!(resolver.format().minting_version(), Some(2));
    let v2 = resolver.format().generate();
    assert_eq!(
        before.check(v2.expose_secret()),
        Err(KeyFormatError::UnknownSecretVersion)
    );
    assert!(store.retire_format_secret(1, now).await.unwrap());
    assert!(resolver.reload_format().await.unwrap(), "version 1 retired");
    assert_eq!(
        resolver.format().check(v1.expose_secret()),
        Err(KeyFormatError::UnknownSecretVersion)
    );
    assert_eq!(resolver.format().check(v2.expose_secret()), Ok(()));
    assert!(!resolver.is_degraded());
}

#[tokio::test]
async fn a_format_not_from_a_store_has_nothing_to_reload() {
    let resolver = CachedResolver::new(MemoryStore::new());
    assert!(!resolver.reload_format().await.unwrap());
    let given = KeyFormat::keyed("sk")
        .secret(1, FormatSecret::generate())
        .build()
        .unwrap();
    let resolver = CachedResolver::builder(MemoryStore::new())
        .format(given.clone())
        .build();
    assert!(!resolver.reload_format().await.unwrap());
    assert_eq!(*resolver.format(), given);
    assert!(format!("{resolver:?}").contains("HmacSha256"));
}

/// A reload that cannot build a format (here: the pinned minting version was retired) fails
/// closed: every key is refused with 503, and the resolver says it is degraded.
#[tokio::test]
async fn a_failed_reload_refuses_every_key() {
    let store = Arc::new(MemoryStore::new());
    let now = OffsetDateTime::now_utc();
    keyed(&store).await;
    store
        .add_format_secret(&FormatSecret::generate(), now)
        .await
        .unwrap();
    let pinned = KeyFormat::keyed("sk")
        .mint_with(1)
        .load_secret_from(&*store)
        .await
        .unwrap();
    let resolver = CachedResolver::builder(store.clone())
        .format(pinned)
        .build();
    let key = stored_key(&resolver, &store).await;
    resolver.authenticate(&key.digest()).await.unwrap();
    assert!(store.retire_format_secret(1, now).await.unwrap());
    resolver.reload_format().await.unwrap_err();
    assert!(resolver.is_degraded());
    assert!(unavailable_because::<super::FormatDown>(&resolver, &key).await);
    assert!(
        hot(&resolver, &key.digest()).is_none(),
        "nothing is admitted from the cache"
    );
}

/// In degraded mode the format is trusted for the bound after its store read, as a cached answer
/// is: past it, it is read again before a key is admitted, and a request whose key was checked
/// against a format that turns out to have changed is refused (503).
#[cfg(any(feature = "postgres", feature = "redis"))]
#[tokio::test]
async fn in_degraded_mode_a_stale_format_is_read_again() {
    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::builder(store.clone())
        .format(keyed(&store).await)
        .degraded_time_to_live(std::time::Duration::ZERO)
        .build();
    let v1 = stored_key(&resolver, &store).await;
    resolver.authenticate(&v1.digest()).await.unwrap();
    // A change this instance did not hear of.
    let now = OffsetDateTime::now_utc();
    store
        .add_format_secret(&FormatSecret::generate(), now)
        .await
        .unwrap();
    assert!(store.retire_format_secret(1, now).await.unwrap());
    resolver.authenticate(&v1.digest()).await.unwrap();
    resolver.subscription_down();
    assert!(
        unavailable_because::<super::FormatChanged>(&resolver, &v1).await,
        "checked against the earlier format"
    );
    assert_eq!(
        resolver.format().check(v1.expose_secret()),
        Err(KeyFormatError::UnknownSecretVersion)
    );
    // Unchanged since: keys are admitted again, each after a read of the format.
    let v2 = stored_key(&resolver, &store).await;
    resolver.authenticate(&v2.digest()).await.unwrap();
    resolver.authenticate(&v2.digest()).await.unwrap();
    resolver.subscription_up();
}
