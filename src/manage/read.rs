//! Reading keys: [`KeyManager::list`], [`count_active`](KeyManager::count_active) and
//! [`get`](KeyManager::get).

use time::OffsetDateTime;

use super::manager::KeyManager;
use super::types::{KeyInfo, KeyPage};
use super::validate::{MAX_PAGE_SIZE, validate_cursor};
use crate::authorize::{Operation, Target, authorize};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::store::ListQuery;

impl KeyManager {
    /// One owner's keys, newest first, at most `limit` (1 to [`MAX_PAGE_SIZE`], else
    /// `APIKEY_INVALID`) per page. `owner` is required with the master key; a scoped key lists its
    /// own owner's keys, of its own account. `before` is the previous page's
    /// [`KeyPage::next_cursor`].
    pub async fn list(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        before: Option<KeyId>,
        limit: u32,
    ) -> Result<KeyPage, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(AuthError::invalid(format!(
                "limit must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        if let Some(cursor) = &before {
            validate_cursor(cursor.as_str())?;
        }
        let account = caller.account();
        authorize(caller, Operation::List, &Target::Keys { owner, account })?;
        let mut keys = self
            .store
            .list(&ListQuery {
                owner: owner.to_owned(),
                account: account.map(str::to_owned),
                before,
                limit: limit + 1,
            })
            .await?;
        let next_cursor = if keys.len() > limit as usize {
            keys.truncate(limit as usize);
            keys.last().map(|k| k.id.clone())
        } else {
            None
        };
        Ok(KeyPage {
            keys: keys.into_iter().map(KeyInfo::from).collect(),
            next_cursor,
        })
    }

    /// How many keys active at `now` the caller would see listed for `owner`: the owner's keys, or
    /// only its own account's for a scoped caller bound to one. Allowed exactly when
    /// [`list`](Self::list) is ([`Operation::List`]); counted by the store in one query.
    pub async fn count_active(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<u64, AuthError> {
        let owner = Self::owner_of(caller, owner)?;
        let account = caller.account();
        authorize(caller, Operation::List, &Target::Keys { owner, account })?;
        Ok(self.store.count_active(owner, account, now).await?)
    }

    /// One key's metadata. A key the caller may not see is [`AuthError::NotFound`].
    pub async fn get(&self, caller: &Principal, id: &KeyId) -> Result<KeyInfo, AuthError> {
        self.get_in(caller, id, None).await
    }

    /// [`get`](Self::get), when the request also names the key's owner (`?owner=`): a key of
    /// another owner is then not found.
    pub async fn get_in(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
    ) -> Result<KeyInfo, AuthError> {
        Ok(self.target(caller, Operation::Get, id, owner).await?.into())
    }
}
