use std::sync::Arc;

use time::OffsetDateTime;

use super::FormatChangeError;
use crate::key::{FormatSecret, KeyFormat, KeyFormatConfigError, KeyFormatError};
use crate::manage::{CreateKey, KeyManager};
use crate::principal::Principal;
use crate::resolver::CachedResolver;
use crate::store::{KeyStore, MemoryStore};

async fn manager_with(store: &Arc<MemoryStore>, format: KeyFormat) -> KeyManager {
    KeyManager::new(
        CachedResolver::builder(store.clone())
            .format(format)
            .build(),
    )
}

async fn mint(manager: &KeyManager) -> String {
    let created = manager
        .create(&Principal::master(), CreateKey::new(["*:*"]).owner("o"))
        .await
        .unwrap();
    created.key.expose_secret().to_owned()
}

async fn versions(store: &MemoryStore) -> Vec<(u8, bool)> {
    store
        .format_secrets(&FormatSecret::generate(), OffsetDateTime::now_utc())
        .await
        .unwrap()
        .secrets
        .iter()
        .map(|s| (s.version, s.retired_at.is_some()))
        .collect()
}

/// Without a fleet, the manager swaps its own resolver's format: at once, with an empty receipt.
#[tokio::test]
async fn secrets_are_added_and_retired_on_this_instance_at_once() {
    let store = Arc::new(MemoryStore::new());
    let format = KeyFormat::keyed("sk")
        .load_secret_from(&*store)
        .await
        .unwrap();
    let manager = manager_with(&store, format).await;
    let v1 = mint(&manager).await;
    let (version, receipt) = manager
        .add_format_secret(FormatSecret::generate())
        .await
        .unwrap();
    assert_eq!(version, 2);
    assert_eq!(receipt, Default::default(), "no fleet, no receipt");
    let v2 = mint(&manager).await;
    let format = manager.resolver().format();
    assert_eq!(format.minting_version(), Some(2));
    assert_eq!((format.check(&v1), format.check(&v2)), (Ok(()), Ok(())));
    drop(format);
    manager.retire_format_secret(1).await.unwrap();
    assert_eq!(
        manager.resolver().format().check(&v1),
        Err(KeyFormatError::UnknownSecretVersion)
    );
    assert_eq!(versions(&store).await, [(1, true), (2, false)]);
    // Again: nothing written, broadcast again.
    manager.retire_format_secret(1).await.unwrap();
    assert!(matches!(
        manager.retire_format_secret(7).await,
        Err(FormatChangeError::UnknownVersion(7))
    ));
    assert!(matches!(
        manager.retire_format_secret(2).await,
        Err(FormatChangeError::Config(KeyFormatConfigError::NoSecret))
    ));
    assert_eq!(
        versions(&store).await,
        [(1, true), (2, false)],
        "nothing written"
    );
    assert!(!manager.resolver().format().accepts_legacy());
    manager.set_legacy_keys(true).await.unwrap();
    assert!(manager.resolver().format().accepts_legacy());
}

/// A change this instance's own settings cannot follow is refused before anything is written.
#[tokio::test]
async fn a_change_this_instance_cannot_follow_is_refused_unwritten() {
    let store = Arc::new(MemoryStore::new());
    let format = KeyFormat::keyed("sk")
        .secret(2, FormatSecret::generate())
        .mint_with(1)
        .load_secret_from(&*store)
        .await
        .unwrap();
    let manager = manager_with(&store, format).await;
    assert!(matches!(
        manager.add_format_secret(FormatSecret::generate()).await,
        Err(FormatChangeError::Config(
            KeyFormatConfigError::DuplicateVersion(2)
        ))
    ));
    assert!(matches!(
        manager.retire_format_secret(1).await,
        Err(FormatChangeError::Config(
            KeyFormatConfigError::MintingVersionNotAccepted(1)
        ))
    ));
    assert_eq!(versions(&store).await, [(1, false)]);
    // The public format's secrets are not the store's.
    let public = manager_with(&store, KeyFormat::default()).await;
    assert!(matches!(
        public.add_format_secret(FormatSecret::generate()).await,
        Err(FormatChangeError::NotFromStore)
    ));
    assert!(matches!(
        public.set_legacy_keys(false).await,
        Err(FormatChangeError::NotFromStore)
    ));
}
