//! Reading what happened: audit events, their chain, and usage counts, through the one rule
//! ([`Operation::ReadActivity`], [`Operation::VerifyEvents`]).

use time::OffsetDateTime;

use super::manager::KeyManager;
use super::validate::MAX_PAGE_SIZE;
use crate::audit::{AuditEvent, EventQuery, EventType, Verification, chain::Checker};
use crate::authorize::{Operation, Target, authorize};
use crate::error::AuthError;
use crate::key::KeyId;
use crate::principal::Principal;
use crate::usage::UsageBucket;

/// Which events to read ([`KeyManager::events`]); every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct EventFilter {
    /// Only events about this key.
    pub key_id: Option<KeyId>,
    /// Only of this type.
    pub event_type: Option<EventType>,
    /// Only at or after.
    pub since: Option<OffsetDateTime>,
    /// Only before.
    pub until: Option<OffsetDateTime>,
    /// The previous page's [`EventPage::next_cursor`].
    pub cursor: Option<String>,
    /// At most this many (1 to [`MAX_PAGE_SIZE`]; default [`DEFAULT_PAGE_SIZE`](super::validate::DEFAULT_PAGE_SIZE)).
    pub limit: Option<u32>,
}

/// A page of events, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct EventPage {
    /// The events.
    pub events: Vec<AuditEvent>,
    /// Where the next page starts, when there is one.
    pub next_cursor: Option<String>,
}

/// Hourly or daily usage buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Granularity {
    /// One bucket per hour.
    #[default]
    Hour,
    /// One bucket per UTC day.
    Day,
}

/// The longest span [`KeyManager::usage`] answers: 92 days.
pub const MAX_USAGE_SPAN: time::Duration = time::Duration::days(92);

impl KeyManager {
    /// An owner's events (`owner` required with the master key), newest first. A scoped key
    /// (with `api-keys:read`) sees only the events about keys of its own subtree.
    pub async fn events(
        &self,
        caller: &Principal,
        owner: Option<&str>,
        filter: EventFilter,
    ) -> Result<EventPage, AuthError> {
        let owner = match owner {
            Some(owner) => super::validate::validate_id("owner", owner)?,
            None => caller.owner().ok_or(AuthError::OwnerRequired)?,
        };
        authorize(
            caller,
            Operation::ReadActivity,
            &Target::Keys {
                owner,
                account: caller.account(),
            },
        )?;
        let mut key_ids = filter.key_id.clone().map(|id| vec![id]);
        if !caller.is_master() {
            let mut subtree: Vec<KeyId> = self
                .store
                .descendants(caller.key_id())
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect();
            subtree.push(caller.key_id().clone());
            key_ids = Some(match key_ids {
                Some(wanted) => wanted
                    .into_iter()
                    .filter(|id| subtree.contains(id))
                    .collect(),
                None => subtree,
            });
        }
        self.page(owner, key_ids, filter).await
    }

    /// One key's events, newest first (`filter.key_id` is ignored; a deleted key's with the master
    /// key naming its `owner`): under the rule's
    /// [`Operation::ReadActivity`] (a scoped key reads its own subtree's only; 403
    /// `AUTH_OUTSIDE_SUBTREE`, or 404 for another owner's key).
    pub async fn key_events(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        filter: EventFilter,
    ) -> Result<EventPage, AuthError> {
        match self
            .target(caller, Operation::ReadActivity, id, owner)
            .await
        {
            Ok(record) => {
                self.page(&record.owner, Some(vec![id.clone()]), filter)
                    .await
            }
            // A deleted key's events outlive it: the master key reads them naming the owner (a
            // key that never had an event there stays unknown).
            Err(AuthError::NotFound)
                if caller.is_master() && owner.is_some() && self.store.get(id).await?.is_none() =>
            {
                let first = filter.cursor.is_none();
                let page = self
                    .page(owner.unwrap_or_default(), Some(vec![id.clone()]), filter)
                    .await?;
                if first && page.events.is_empty() {
                    return Err(AuthError::NotFound);
                }
                Ok(page)
            }
            Err(error) => Err(error),
        }
    }

    async fn page(
        &self,
        owner: &str,
        key_ids: Option<Vec<KeyId>>,
        filter: EventFilter,
    ) -> Result<EventPage, AuthError> {
        let limit = filter.limit.unwrap_or(super::validate::DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(AuthError::invalid(format!(
                "limit must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        let before_seq = match &filter.cursor {
            // 1 to 20 digits, as documented (`u64::from_str` alone would take a `+` too).
            Some(cursor) => Some(
                (cursor.len() <= 20 && cursor.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| cursor.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| AuthError::invalid("cursor: not one this API gave"))?,
            ),
            None => None,
        };
        if key_ids.as_ref().is_some_and(Vec::is_empty) {
            return Ok(EventPage {
                events: Vec::new(),
                next_cursor: None,
            });
        }
        let mut events = self
            .store
            .events(&EventQuery {
                owner: owner.to_owned(),
                key_ids,
                event_type: filter.event_type,
                since: filter.since,
                until: filter.until,
                before_seq,
                limit: limit + 1,
            })
            .await?;
        let next_cursor = if events.len() > limit as usize {
            events.truncate(limit as usize);
            events.last().map(|e| e.seq.to_string())
        } else {
            None
        };
        Ok(EventPage {
            events,
            next_cursor,
        })
    }

    /// Checks `owner`'s whole chain, page by page (master key only: it covers every key of the
    /// owner).
    pub async fn verify_events(
        &self,
        caller: &Principal,
        owner: Option<&str>,
    ) -> Result<Verification, AuthError> {
        const PAGE: u32 = 1_000;
        let owner = match owner {
            Some(owner) => super::validate::validate_id("owner", owner)?,
            None => caller.owner().ok_or(AuthError::OwnerRequired)?,
        };
        self.authorize_recorded(
            caller,
            Operation::VerifyEvents,
            &Target::Keys {
                owner,
                account: None,
            },
            None,
        )
        .await?;
        let state = self.store.chain_state(owner).await?;
        let mut checker = Checker::new(state);
        let mut after = state.anchor.seq;
        loop {
            let page = self.store.chain_events(owner, after, PAGE).await?;
            for event in &page {
                checker.feed(event);
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize && !checker.is_broken() => {
                    after = last.seq;
                }
                _ => return Ok(checker.finish()),
            }
        }
    }

    /// A key's usage counts with `from <= start < to` (floored to the hour; at most
    /// [`MAX_USAGE_SPAN`]), by hour or by UTC day, oldest first; buckets without requests are
    /// left out. Under the same rule as [`key_events`](Self::key_events).
    pub async fn usage(
        &self,
        caller: &Principal,
        id: &KeyId,
        owner: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
        granularity: Granularity,
    ) -> Result<Vec<UsageBucket>, AuthError> {
        if to <= from || to - from > MAX_USAGE_SPAN {
            return Err(AuthError::invalid(
                "from must be before to, at most 92 days apart",
            ));
        }
        self.target(caller, Operation::ReadActivity, id, owner)
            .await?;
        let hours = self
            .store
            .usage(id, crate::usage::hour_of(from), to)
            .await?;
        Ok(match granularity {
            Granularity::Hour => hours,
            Granularity::Day => by_day(hours),
        })
    }
}

/// Hourly buckets (oldest first) summed per UTC day.
fn by_day(hours: Vec<UsageBucket>) -> Vec<UsageBucket> {
    let mut days: Vec<UsageBucket> = Vec::new();
    for mut bucket in hours {
        let day = bucket.hour.replace_time(time::Time::MIDNIGHT);
        match days.last_mut() {
            Some(last) if last.hour == day => last.merge(&bucket),
            _ => {
                bucket.hour = day;
                days.push(bucket);
            }
        }
    }
    days
}
