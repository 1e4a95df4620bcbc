//! Ending and renewing keys: [`KeyManager::revoke`], [`delete`](KeyManager::delete) and
//! [`rotate`](KeyManager::rotate), each cascading to the key's descendants in one store
//! transaction and invalidating every cache that held them.

use time::OffsetDateTime;

use super::manager::KeyManager;
#[cfg(doc)]
use super::types::RevokeReason;
use super::types::{CreatedKey, KeyInfo, RotateOptions};
use super::validate::{MAX_GRACE_PERIOD, MAX_NAME_LEN, validate_name};
use crate::audit::{EventType, Journal, timestamp};
use crate::authorize::Operation;
use crate::error::AuthError;
#[cfg(doc)]
use crate::invalidate::Invalidator;
use crate::invalidate::Receipt;
use crate::key::{DigestScheme, KeyId};
use crate::principal::Principal;
use crate::store::{Rotation, StoreErrorKind};

impl KeyManager {
    /// Revokes a key and, in the same step, every key it created (transitively): they stop working
    /// at once, here and (with a broadcasting [`Invalidator`]) on every instance, and stay listed.
    /// Idempotent: revoking a revoked key changes nothing and invalidates nothing.
    pub async fn revoke(&self, caller: &Principal, id: &KeyId) -> Result<KeyInfo, AuthError> {
        self.revoke_in(caller, id, None).await
    }

    /// [`revoke`](Self::revoke), when the request also names the key's owner (`?owner=`).
    pub async fn revoke_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        self.revoke_because(caller, id, owner, None).await
    }

    /// [`revoke_in`](Self::revoke_in), recording `reason` (at most [`MAX_NAME_LEN`] characters;
    /// `requested` when none is given; see [`RevokeReason`] for the crate's own) in the
    /// `key.revoked` event.
    pub async fn revoke_because(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        reason: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        self.revoke_with_receipt(caller, id, owner, reason)
            .await
            .map(|(info, _)| info)
    }

    /// [`revoke_because`](Self::revoke_because), with what the fleet said: how many live instances
    /// acknowledged the revocation within the [deadline](Self::acknowledgement_deadline) (an empty
    /// receipt when nothing was broadcast or nobody could answer: a key already revoked, a failed
    /// broadcast, an invalidator without a roster, or none of its subscriptions running here).
    pub async fn revoke_with_receipt(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(KeyInfo, Receipt), AuthError> {
        let reason = match reason {
            Some(reason) => validate_name(reason.to_owned()).map_err(|_| {
                AuthError::invalid(format!(
                    "reason: 1 to {MAX_NAME_LEN} characters, not blank, without control, \
                         bidirectional-control or invisible characters"
                ))
            })?,
            None => "requested".to_owned(),
        };
        let record = self.target(caller, Operation::Revoke, id, owner).await?;
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_REVOKED, &record.owner)
                .about(&record)
                .detail("reason", reason.clone()),
        )
        .with_cascade();
        let change = self
            .store
            .revoke_with(id, OffsetDateTime::now_utc(), &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        let mut receipt = Receipt::default();
        if change.is_noop() {
            tracing::debug!(api_key_id = %id, "API key already revoked");
        } else {
            receipt = self.invalidate(&change).await;
            tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), %reason, "API key revoked");
        }
        Ok((change.after.unwrap_or(change.before).into(), receipt))
    }

    /// Deletes a key's record for good and revokes every key it created (transitively). Needs the
    /// master key: revoke keeps the audit trail.
    pub async fn delete(&self, caller: &Principal, id: &KeyId) -> Result<(), AuthError> {
        self.delete_in(caller, id, None).await
    }

    /// [`delete`](Self::delete), when the request also names the key's owner (`?owner=`).
    pub async fn delete_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<(), AuthError> {
        self.delete_with_receipt(caller, id, owner)
            .await
            .map(|_| ())
    }

    /// [`delete_in`](Self::delete_in), with what the fleet said (see
    /// [`revoke_with_receipt`](Self::revoke_with_receipt)).
    pub async fn delete_with_receipt(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<Receipt, AuthError> {
        let record = self.target(caller, Operation::Delete, id, owner).await?;
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_DELETED, &record.owner)
                .about(&record)
                .detail("name", record.name.as_str()),
        )
        .with_cascade();
        let change = self
            .store
            .delete_with(id, OffsetDateTime::now_utc(), &journal)
            .await?
            .ok_or(AuthError::NotFound)?;
        let receipt = self.invalidate(&change).await;
        tracing::info!(api_key_id = %id, descendants = change.revoked_descendants.len(), "API key deleted");
        Ok(receipt)
    }

    /// Gives a key a new secret under the same id. The old secret stops working at once, or after
    /// the grace period (at most [`MAX_GRACE_PERIOD`]; never past the key's own expiry). See
    /// [`RotateOptions`] for ending the key's descendants too.
    pub async fn rotate(
        &self,
        caller: &Principal,
        id: &KeyId,
        options: impl Into<RotateOptions>,
    ) -> Result<CreatedKey, AuthError> {
        self.rotate_in(caller, id, None, options).await
    }

    /// [`rotate`](Self::rotate), when the request also names the key's owner (`?owner=`).
    pub async fn rotate_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        options: impl Into<RotateOptions>,
    ) -> Result<CreatedKey, AuthError> {
        let options = options.into();
        if options.grace.is_some_and(|g| g > MAX_GRACE_PERIOD) {
            return Err(AuthError::invalid(format!(
                "the grace period is at most {} days ({} seconds)",
                MAX_GRACE_PERIOD.as_secs() / 86_400,
                MAX_GRACE_PERIOD.as_secs()
            )));
        }
        let old = self.target(caller, Operation::Rotate, id, owner).await?;
        let now = OffsetDateTime::now_utc();
        let revoked = || AuthError::invalid("a revoked key cannot be rotated");
        if old.revoked_at.is_some() {
            return Err(revoked());
        }
        if old.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::invalid("an expired key cannot be rotated"));
        }
        let format = self.resolver.format();
        let key = format.generate();
        let rotation = Rotation {
            digest: key.digest(),
            digest_scheme: DigestScheme::Sha256,
            masked_key: format.mask(&key).expect("a generated key has the format"),
            rotated_at: now,
            previous_valid_until: options.grace.filter(|g| !g.is_zero()).map(|g| now + g),
            revoke_descendants: options.revoke_descendants,
        };
        let journal = Journal::of(
            self.draft(caller, EventType::KEY_ROTATED, &old.owner)
                .about(&old)
                .detail("grace_until", timestamp(rotation.previous_valid_until))
                .detail("revoke_descendants", rotation.revoke_descendants),
        )
        .with_cascade();
        let change = match self
            .store
            .replace_secret_with(id, &rotation, &journal)
            .await
        {
            Ok(change) => change.ok_or(AuthError::NotFound)?,
            Err(error) if error.kind() == StoreErrorKind::Revoked => return Err(revoked()),
            Err(error) => return Err(error.into()),
        };
        // Forget the old secret's cached entry: with a grace period it is re-read with its new end.
        self.invalidate(&change).await;
        tracing::info!(
            api_key_id = %id,
            grace_seconds = options.grace.map(|g| g.as_secs()),
            descendants = change.revoked_descendants.len(),
            "API key rotated"
        );
        let record = change.after.ok_or(AuthError::NotFound)?;
        Ok(CreatedKey {
            key,
            info: record.into(),
        })
    }
}
