//! What a store keeps for the keyed key format: its secrets, by version, and the legacy-key record.
//!
//! See [`KeyFormat::keyed`](crate::key::KeyFormat::keyed) and
//! [`KeyedFormatBuilder::load_secret_from`](crate::key::KeyedFormatBuilder::load_secret_from).

use time::OffsetDateTime;

use super::{KeyStore, StoreError};
use crate::key::{FormatSecret, KeyFormat, KeyFormatConfigError, KeyedFormatBuilder};

/// Why [`KeyedFormatBuilder::load_secret_from`] could not build the format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatLoadError {
    /// The builder's own settings, with the store's secrets added, do not make a format.
    #[error(transparent)]
    Config(#[from] KeyFormatConfigError),
    /// The key store could not provide the secrets.
    #[error("could not load the key format's secrets: {0}")]
    Store(#[from] StoreError),
}

impl KeyedFormatBuilder {
    /// The format, with the secrets kept in `store` added to those given here: the store creates
    /// version 1 (from the operating system's CSPRNG) the first time any instance asks, so every
    /// instance sharing the store finds the same secrets with no configuration. Retired versions in
    /// the store are refused.
    pub async fn load_secret_from<S: KeyStore + ?Sized>(
        self,
        store: &S,
    ) -> Result<KeyFormat, FormatLoadError> {
        self.check_prefix()?;
        let stored = store
            .format_secrets(&FormatSecret::generate(), OffsetDateTime::now_utc())
            .await?;
        Ok(self.build_with(stored)?)
    }

    /// The format with `stored` (what a store answered) added to the secrets given here.
    fn build_with(self, stored: FormatSecrets) -> Result<KeyFormat, KeyFormatConfigError> {
        let rows = stored
            .secrets
            .into_iter()
            .map(|row| (row.version, row.secret, row.retired_at.is_some()));
        self.build_with_stored(rows, stored.legacy_keys)
    }
}

impl KeyFormat {
    /// Whether this format was loaded from a key store
    /// ([`load_secret_from`](KeyedFormatBuilder::load_secret_from)): then
    /// [`reload_from`](Self::reload_from) can rebuild it when the store's secrets change.
    pub fn is_loaded_from_store(&self) -> bool {
        self.recipe().is_some()
    }

    /// This format rebuilt from the secrets `store` holds now, with the settings it was built with
    /// (prefix, secrets and retirements given in code, pinned minting version, legacy setting):
    /// what an instance does when a secret was added or retired, or the legacy setting changed
    /// ([`KeyManager::add_format_secret`](crate::manage::KeyManager::add_format_secret) and its
    /// siblings; a [`CachedResolver`](crate::resolver::CachedResolver) does it with
    /// [`reload_format`](crate::resolver::CachedResolver::reload_format)). `Ok(None)` for a format
    /// not loaded from a store: there is nothing to reload.
    pub async fn reload_from<S: KeyStore + ?Sized>(
        &self,
        store: &S,
    ) -> Result<Option<KeyFormat>, FormatLoadError> {
        match self.recipe() {
            None => Ok(None),
            Some(recipe) => recipe.clone().load_secret_from(store).await.map(Some),
        }
    }

    /// This format as [`reload_from`](Self::reload_from) would build it from a store holding
    /// `stored` (`None`: not loaded from a store): how key management checks a change before
    /// writing it.
    pub(crate) fn rebuilt_with(
        &self,
        stored: FormatSecrets,
    ) -> Option<Result<KeyFormat, KeyFormatConfigError>> {
        Some(self.recipe()?.clone().build_with(stored))
    }
}

/// Everything a store keeps for the keyed format, as [`KeyStore::format_secrets`](super::KeyStore::format_secrets)
/// returns it. `Debug` shows versions and dates, never a secret.
#[derive(Clone, Debug, PartialEq)]
pub struct FormatSecrets {
    /// Every version ever created, retired ones included, in increasing order.
    pub secrets: Vec<StoredSecret>,
    /// Whether keys of the public (CRC32) format are accepted: recorded as "the store held keys" when
    /// the first secret was created, changed by [`KeyStore::set_legacy_keys`](super::KeyStore::set_legacy_keys).
    pub legacy_keys: bool,
}

/// One secret version in a store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSecret {
    /// 1 to [`MAX_SECRET_VERSION`](crate::key::MAX_SECRET_VERSION).
    pub version: u8,
    /// The HMAC key.
    pub secret: FormatSecret,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was retired, if it was: keys it tagged are refused.
    pub retired_at: Option<OffsetDateTime>,
}

impl StoredSecret {
    /// A row as SQL stores read it back; anything out of range is [`StoreErrorKind::Corrupt`](super::StoreErrorKind::Corrupt).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn from_row(
        version: i64,
        secret: Vec<u8>,
        created_at: OffsetDateTime,
        retired_at: Option<OffsetDateTime>,
    ) -> Result<Self, super::StoreError> {
        let corrupt = || super::StoreError::from_kind(super::StoreErrorKind::Corrupt);
        let version = u8::try_from(version)
            .ok()
            .filter(|v| (1..=crate::key::MAX_SECRET_VERSION).contains(v))
            .ok_or_else(corrupt)?;
        let secret = FormatSecret::from_bytes(secret).map_err(|_| corrupt())?;
        Ok(Self {
            version,
            secret,
            created_at,
            retired_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(seed: u8) -> FormatSecret {
        FormatSecret::from_bytes(vec![seed; 32]).unwrap()
    }

    #[tokio::test]
    async fn a_store_creates_version_1_once_and_records_legacy_keys() {
        let store = crate::store::MemoryStore::new();
        let a = KeyFormat::keyed("sk")
            .load_secret_from(&store)
            .await
            .unwrap();
        let b = KeyFormat::keyed("sk")
            .load_secret_from(&store)
            .await
            .unwrap();
        assert_eq!(a, b, "both loads find the one version 1");
        assert_eq!(a.accepted_versions(), vec![1]);
        assert!(!a.accepts_legacy(), "an empty store is a new service");
        // a version given here as well as in the store is a configuration error
        assert!(matches!(
            KeyFormat::keyed("sk")
                .secret(1, secret(1))
                .load_secret_from(&store)
                .await,
            Err(FormatLoadError::Config(
                KeyFormatConfigError::DuplicateVersion(1)
            ))
        ));
        let with_own = KeyFormat::keyed("sk")
            .secret(5, secret(5))
            .load_secret_from(&store)
            .await;
        assert_eq!(with_own.unwrap().accepted_versions(), vec![1, 5]);
    }

    /// A reload keeps what the builder was given (its own secret, a retirement, the pinned
    /// minting version, the legacy setting) and takes the store's secrets as they are now.
    #[tokio::test]
    async fn a_reload_keeps_the_builders_settings_and_takes_the_stores_secrets() {
        let store = crate::store::MemoryStore::new();
        let given = KeyFormat::keyed("sk")
            .secret(40, secret(40))
            .retire(41)
            .mint_with(40)
            .accept_legacy(true)
            .load_secret_from(&store)
            .await
            .unwrap();
        assert!(given.is_loaded_from_store());
        assert_eq!(given.accepted_versions(), vec![1, 40]);
        let now = OffsetDateTime::now_utc();
        assert_eq!(store.add_format_secret(&secret(2), now).await.unwrap(), 2);
        assert!(store.retire_format_secret(1, now).await.unwrap());
        store.set_legacy_keys(false, now).await.unwrap();
        let reloaded = given.reload_from(&store).await.unwrap().unwrap();
        assert_eq!(reloaded.accepted_versions(), vec![2, 40]);
        assert_eq!(reloaded.minting_version(), Some(40), "still pinned");
        assert!(reloaded.accepts_legacy(), "the builder's setting wins");
        assert_eq!(reloaded.prefix(), "sk");
        // A key tagged by the retired version 1 is refused, one by version 2 accepted.
        let by_v1 = KeyFormat::keyed("sk").secret(1, store_secret(&store, 1).await);
        let v1_key = by_v1.build().unwrap().generate();
        assert!(given.check(v1_key.expose_secret()).is_ok());
        assert!(reloaded.check(v1_key.expose_secret()).is_err());
        // Reloaded again: the same format (it keeps its recipe).
        assert_eq!(
            reloaded.reload_from(&store).await.unwrap().unwrap(),
            reloaded
        );
        // Without its own settings, the store's legacy record applies.
        let plain = KeyFormat::keyed("sk")
            .load_secret_from(&store)
            .await
            .unwrap();
        assert!(!plain.accepts_legacy());
        assert_eq!(plain.minting_version(), Some(2));
        // A format not loaded from a store has nothing to reload.
        let built = KeyFormat::keyed("sk").secret(1, secret(1)).build().unwrap();
        assert!(!built.is_loaded_from_store());
        assert!(built.reload_from(&store).await.unwrap().is_none());
        assert!(
            KeyFormat::default()
                .reload_from(&store)
                .await
                .unwrap()
                .is_none()
        );
    }

    async fn store_secret(store: &crate::store::MemoryStore, version: u8) -> FormatSecret {
        store
            .format_secrets(&secret(0), OffsetDateTime::now_utc())
            .await
            .unwrap()
            .secrets
            .into_iter()
            .find(|s| s.version == version)
            .unwrap()
            .secret
    }
}
