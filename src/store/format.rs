//! What a store keeps for the keyed key format: its secrets, by version, and the legacy-key record.
//!
//! See [`KeyFormat::keyed`](crate::key::KeyFormat::keyed) and
//! [`KeyedFormatBuilder::load_secret_from`](crate::key::KeyedFormatBuilder::load_secret_from).

use time::OffsetDateTime;

use crate::key::FormatSecret;

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
