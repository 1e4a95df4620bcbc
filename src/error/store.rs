//! [`StoreError`]: what went wrong talking to a store. Public as `store::StoreError`; defined here,
//! below the store, because [`AuthError::Unavailable`](super::AuthError::Unavailable) carries one.

use std::fmt;
use std::sync::Arc;

/// What went wrong talking to a store. Never contains a key or a digest.
#[derive(Clone, Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// The kind of a [`StoreError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or failed (connection refused, I/O error, ...).
    Unavailable,
    /// The store did not answer within the configured timeout.
    Timeout,
    /// [`KeyStore::insert`](crate::store::KeyStore::insert) would exceed a [`KeyLimits`](crate::store::KeyLimits)
    /// bound.
    LimitReached {
        /// The bound that was hit.
        limit: u32,
        /// `owner` or `account`.
        scope: &'static str,
    },
    /// An id or digest that must be unique already exists.
    Conflict,
    /// [`KeyStore::insert`](crate::store::KeyStore::insert) of a delegated key whose creator
    /// ([`KeyRecord::created_by`](crate::store::KeyRecord::created_by)) is gone, revoked or expired at the
    /// insert's `now`: checked atomically with the insert, so a key revoked while one of its
    /// creations was in flight never gains a child.
    CreatorInactive,
    /// [`KeyStore::replace_secret`](crate::store::KeyStore::replace_secret) of a revoked key: a revoked
    /// key gets no new secret.
    Revoked,
    /// Data in the store could not be understood (an unknown digest scheme, a bad scope).
    Corrupt,
    /// The store does not implement this operation (a custom store without keyed-format secrets).
    Unsupported,
}

impl StoreError {
    /// An error of `kind` caused by `source`.
    pub fn new(
        kind: StoreErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            source: Some(Arc::from(source.into())),
        }
    }

    /// An error of `kind` with no underlying cause.
    pub fn from_kind(kind: StoreErrorKind) -> Self {
        Self { kind, source: None }
    }

    /// The store could not be reached.
    pub fn unavailable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StoreErrorKind::Unavailable, source)
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            StoreErrorKind::Unavailable => f.write_str("key store unavailable"),
            StoreErrorKind::Timeout => f.write_str("key store timed out"),
            StoreErrorKind::LimitReached { limit, scope } => {
                write!(f, "active key limit of {limit} per {scope} reached")
            }
            StoreErrorKind::Conflict => f.write_str("key id or digest already exists"),
            StoreErrorKind::CreatorInactive => {
                f.write_str("the creating key is revoked, expired or gone")
            }
            StoreErrorKind::Revoked => f.write_str("the key is revoked"),
            StoreErrorKind::Corrupt => f.write_str("key store returned data that cannot be read"),
            StoreErrorKind::Unsupported => {
                f.write_str("the key store does not support this operation")
            }
        }?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
