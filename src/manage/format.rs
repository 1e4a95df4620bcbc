//! The keyed key format's secrets, changed through key management, for the whole fleet:
//! [`KeyManager::add_format_secret`], [`KeyManager::retire_format_secret`] and
//! [`KeyManager::set_legacy_keys`].
//!
//! Each writes the key store, swaps this instance's format at once
//! ([`CachedResolver::reload_format`](crate::resolver::CachedResolver::reload_format)), then
//! publishes a sequenced format change through the manager's [`Invalidator`](crate::invalidate::Invalidator)
//! (the same path and revocation log as revocations: instances that were cut off catch up over it)
//! and waits, like a revocation, until every live instance has reloaded its format and
//! acknowledged, up to the [deadline](KeyManager::acknowledgement_deadline). Once one of these has
//! answered with a complete [`Receipt`], no instance of that roster admits a key tagged by a retired
//! version, and every one admits keys tagged by an added one; an instance that cannot read the
//! store when the change reaches it refuses every key with 503 until it can (see
//! [`reload_format`](crate::resolver::CachedResolver::reload_format)); any other instance stops
//! trusting its format within the freshness bound, as it stops trusting its cache
//! ([`crate::invalidate`]).
//!
//! These are a Rust API only: no HTTP route exposes them, and they take
//! no caller (they act for the service, not for a key): call them from an operator's tool or a
//! deployment step. The format must have been loaded from the store
//! ([`KeyedFormatBuilder::load_secret_from`](crate::key::KeyedFormatBuilder::load_secret_from)).

use time::OffsetDateTime;

use super::KeyManager;
use crate::invalidate::Receipt;
use crate::key::{FormatSecret, KeyFormatConfigError};
use crate::store::{FormatSecrets, StoreError};

/// Why a change of the key format's secrets was refused. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatChangeError {
    /// The resolver's format was not loaded from the key store (the public checksum, or keyed
    /// secrets given in code only): the store's secrets are not the ones it checks keys with.
    #[error(
        "the key format was not loaded from the key store: its secrets cannot be changed there"
    )]
    NotFromStore,
    /// No such secret version in the store.
    #[error("the key store has no format secret version {0}")]
    UnknownVersion(u8),
    /// The change would leave this instance without a format: the last version not retired, or
    /// the version it pins for minting ([`KeyedFormatBuilder::mint_with`](crate::key::KeyedFormatBuilder::mint_with)).
    /// Nothing was written.
    #[error("refused: {0}")]
    Config(#[from] KeyFormatConfigError),
    /// The key store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KeyManager {
    /// Stores `secret` as the key format's next version, which tags new keys from then on (unless
    /// a version is pinned for minting), and has every instance of the fleet reload its format:
    /// once this has answered with a complete receipt, every instance admits keys tagged by the
    /// new version. Returns the version and what the fleet said (see [`Receipt`]; empty without a
    /// broadcasting invalidator: this instance alone has reloaded).
    ///
    /// Refused, with nothing written, when the version would clash with one this instance's format
    /// was given in code.
    ///
    /// A Rust API only (no HTTP route exposes it), taking no caller: it
    /// acts for the service. The fleet side is described in [`crate::invalidate`] ("Key format
    /// changes").
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use tower_api_keys::key::{FormatSecret, KeyFormat};
    /// use tower_api_keys::manage::{CreateKey, KeyManager};
    /// use tower_api_keys::principal::Principal;
    /// use tower_api_keys::resolver::CachedResolver;
    /// use tower_api_keys::store::MemoryStore;
    ///
    /// let store = Arc::new(MemoryStore::new());
    /// let format = KeyFormat::keyed("sk_live").load_secret_from(&*store).await?;
    /// let resolver = CachedResolver::builder(store.clone()).format(format).build();
    /// let manager = KeyManager::new(resolver.clone());
    /// let old = manager
    ///     .create(&Principal::master(), CreateKey::new(["ledgers:read"]).owner("payments"))
    ///     .await?
    ///     .key;
    ///
    /// // Rotation: version 2 tags new keys from now on, here and on every instance of the fleet.
    /// let (version, _receipt) = manager.add_format_secret(FormatSecret::generate()).await?;
    /// assert_eq!(version, 2);
    /// assert_eq!(resolver.format().minting_version(), Some(2));
    /// assert!(resolver.format().check(old.expose_secret()).is_ok());
    ///
    /// // Once version 1's keys are gone: keys it tagged are refused everywhere.
    /// manager.retire_format_secret(1).await?;
    /// assert!(resolver.format().check(old.expose_secret()).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn add_format_secret(
        &self,
        secret: FormatSecret,
    ) -> Result<(u8, Receipt), FormatChangeError> {
        let now = OffsetDateTime::now_utc();
        let mut stored = self.format_secrets(now).await?;
        let next = stored
            .secrets
            .last()
            .map_or(1, |s| s.version.saturating_add(1));
        stored.secrets.push(crate::store::StoredSecret {
            version: next,
            secret: secret.clone(),
            created_at: now,
            retired_at: None,
        });
        self.check_format(stored)?;
        let version = self.store.add_format_secret(&secret, now).await?;
        tracing::info!(version, "API key format secret added");
        Ok((version, self.spread_format_change().await))
    }

    /// Retires secret `version`: keys it tagged are refused by every instance of the fleet once
    /// this has answered with a complete receipt (their records stay as they are). Retiring a
    /// retired version writes nothing and broadcasts the change again.
    ///
    /// Refused, with nothing written, for an unknown version, the last version not retired, or the
    /// version this instance's format pins for minting.
    pub async fn retire_format_secret(&self, version: u8) -> Result<Receipt, FormatChangeError> {
        let now = OffsetDateTime::now_utc();
        let mut stored = self.format_secrets(now).await?;
        let Some(row) = stored.secrets.iter_mut().find(|s| s.version == version) else {
            return Err(FormatChangeError::UnknownVersion(version));
        };
        if row.retired_at.is_none() {
            row.retired_at = Some(now);
            self.check_format(stored)?;
            if !self.store.retire_format_secret(version, now).await?
                && !self
                    .format_secrets(now)
                    .await?
                    .secrets
                    .iter()
                    .any(|s| s.version == version && s.retired_at.is_some())
            {
                // Others were retired meanwhile: this one is the last left.
                return Err(KeyFormatConfigError::NoSecret.into());
            }
            tracing::info!(version, "API key format secret retired");
        }
        Ok(self.spread_format_change().await)
    }

    /// Records whether formats loaded from the store accept legacy (public-checksum) keys
    /// ([`KeyStore::set_legacy_keys`](crate::store::KeyStore::set_legacy_keys)), and has every
    /// instance of the fleet reload its format: with `false`, once this has answered with a
    /// complete receipt, no instance admits a legacy key, unless its format was told otherwise
    /// in code ([`KeyedFormatBuilder::accept_legacy`](crate::key::KeyedFormatBuilder::accept_legacy)).
    pub async fn set_legacy_keys(&self, accept: bool) -> Result<Receipt, FormatChangeError> {
        let now = OffsetDateTime::now_utc();
        self.format_secrets(now).await?;
        self.store.set_legacy_keys(accept, now).await?;
        tracing::info!(accept, "API key format legacy setting changed");
        Ok(self.spread_format_change().await)
    }

    /// The store's secrets, once the resolver's format is known to come from it.
    async fn format_secrets(
        &self,
        now: OffsetDateTime,
    ) -> Result<FormatSecrets, FormatChangeError> {
        if !self.resolver().format().is_loaded_from_store() {
            return Err(FormatChangeError::NotFromStore);
        }
        Ok(self
            .store
            .format_secrets(&FormatSecret::generate(), now)
            .await?)
    }

    /// Whether this instance's format could be built from `stored`.
    fn check_format(&self, stored: FormatSecrets) -> Result<(), FormatChangeError> {
        match self.resolver().format().rebuilt_with(stored) {
            None => Err(FormatChangeError::NotFromStore),
            Some(built) => built.map(|_| ()).map_err(Into::into),
        }
    }

    /// Swaps this instance's format, then has every other instance reload theirs, and waits for
    /// their acknowledgements.
    async fn spread_format_change(&self) -> Receipt {
        // A failure is logged there; this instance then refuses every key until it can reload.
        let _ = self.resolver().reload_format().await;
        let published = match self.invalidator.publish_format_change().await {
            Ok(published) => published,
            Err(error) => {
                tracing::warn!(%error, "broadcasting an API key format change failed; other instances reload it when they restart or reconnect");
                None
            }
        };
        self.receipt_for(published.as_slice(), None).await
    }
}

#[cfg(test)]
mod tests;
