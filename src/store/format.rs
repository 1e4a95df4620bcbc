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
        let rows = stored
            .secrets
            .into_iter()
            .map(|row| (row.version, row.secret, row.retired_at.is_some()));
        Ok(self.build_with_stored(rows, stored.legacy_keys)?)
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
}
