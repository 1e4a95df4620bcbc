//! The default bodies of [`KeyStore`](super::KeyStore)'s ancestry, counting and usage methods,
//! for a store without a query language: they walk `get` and page through `list`, through
//! [`Reader`], the three reads they need (every `KeyStore` is one).

use std::future::Future;

use time::OffsetDateTime;

use super::StoreError;
use super::overview::sum;
use super::params::ListQuery;
use crate::key::KeyId;
use crate::record::{KeyRecord, MAX_DELEGATION_DEPTH};
use crate::store::usage::UsageBucket;

/// What the defaults read from a store: a key, a page of keys, a key's hours of usage.
pub(super) trait Reader: Sync {
    /// The record with this id ([`KeyStore::get`](super::KeyStore::get)).
    fn key(&self, id: &KeyId)
    -> impl Future<Output = Result<Option<KeyRecord>, StoreError>> + Send;

    /// One page of an owner's keys, newest first ([`KeyStore::list`](super::KeyStore::list)).
    fn page(
        &self,
        query: &ListQuery,
    ) -> impl Future<Output = Result<Vec<KeyRecord>, StoreError>> + Send;

    /// A key's hourly buckets with `from <= hour < to`, oldest first
    /// ([`KeyStore::usage`](super::KeyStore::usage)).
    fn hours(
        &self,
        key_id: &KeyId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> impl Future<Output = Result<Vec<UsageBucket>, StoreError>> + Send;
}

/// [`KeyStore::ancestors`](super::KeyStore::ancestors) by walking `get` (its default).
pub(super) async fn ancestors_by_walking<S: Reader + ?Sized>(
    store: &S,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut chain = Vec::new();
    let Some(record) = store.key(id).await? else {
        return Ok(chain);
    };
    let mut next = record.created_by;
    while let Some(parent) = next {
        if chain.len() == MAX_DELEGATION_DEPTH {
            break;
        }
        match store.key(&parent).await? {
            Some(record) => {
                next = record.created_by.clone();
                chain.push(record);
            }
            None => break,
        }
    }
    Ok(chain)
}

/// [`KeyStore::descendants`](super::KeyStore::descendants) by paging through the owner's
/// listing (its default).
pub(super) async fn descendants_by_listing<S: Reader + ?Sized>(
    store: &S,
    id: &KeyId,
) -> Result<Vec<KeyRecord>, StoreError> {
    const PAGE: u32 = 500;
    let Some(root) = store.key(id).await? else {
        return Ok(Vec::new());
    };
    let mut query = ListQuery {
        owner: root.owner.clone(),
        account: None,
        before: None,
        limit: PAGE,
    };
    let mut all = Vec::new();
    loop {
        let page = store.page(&query).await?;
        let full = page.len() == PAGE as usize;
        query.before = page.last().map(|r| r.id.clone());
        all.extend(page);
        if !full {
            break;
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root.id];
    while let Some(parent) = frontier.pop() {
        let (children, rest): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|r| r.created_by.as_ref() == Some(&parent));
        all = rest;
        frontier.extend(children.iter().map(|c| c.id.clone()));
        found.extend(children);
    }
    Ok(found)
}

/// [`KeyStore::count_active`](super::KeyStore::count_active) by paging through `list` (its
/// default).
pub(super) async fn count_by_listing<S: Reader + ?Sized>(
    store: &S,
    owner: &str,
    account: Option<&str>,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    const PAGE: u32 = 500;
    let mut query = ListQuery {
        owner: owner.to_owned(),
        account: account.map(str::to_owned),
        before: None,
        limit: PAGE,
    };
    let mut active = 0;
    loop {
        let page = store.page(&query).await?;
        active += page.iter().filter(|r| r.is_active(now)).count() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => query.before = Some(last.id.clone()),
            _ => return Ok(active),
        }
    }
}

/// [`KeyStore::usage_by_key`](super::KeyStore::usage_by_key) by listing `owner`'s keys and summing
/// each one's `usage` (its default: one query per key).
pub(super) async fn usage_by_listing<S: Reader + ?Sized>(
    store: &S,
    owner: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<UsageBucket>, StoreError> {
    const PAGE: u32 = 500;
    let mut query = ListQuery {
        owner: owner.to_owned(),
        account: None,
        before: None,
        limit: PAGE,
    };
    let mut totals = Vec::new();
    loop {
        let page = store.page(&query).await?;
        for record in &page {
            if let Some(total) = sum(store.hours(&record.id, from, to).await?, from) {
                totals.push(total);
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => query.before = Some(last.id.clone()),
            _ => return Ok(totals),
        }
    }
}
