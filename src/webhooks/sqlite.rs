//! Webhook endpoints and their deliveries in SQLite (`api_key_webhooks`,
//! `api_key_webhook_deliveries`, the store's migration 8): the [`WebhookStore`] of
//! [`SqliteStore`]. The store writes the deliveries itself, with each event (its outbox).

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::rows::{
    ClaimedRow, DELIVERY_COLUMNS, DeliveryRow, WEBHOOK_COLUMNS, WebhookRow, corrupt,
};
use super::store::WebhookStore;
use super::types::{AttemptOutcome, Claimed, Delivery, DeliveryStatus, Webhook, WebhookSecret};
use crate::audit::{EventDraft, EventType};
use crate::key::KeyId;
use crate::store::sql_common::{from_unix_micros, map_sqlx_error, to_unix_micros};
use crate::store::{SqliteStore, StoreError};

fn decode_webhook(row: &SqliteRow) -> Result<Webhook, StoreError> {
    let events: String = row.get(3);
    WebhookRow {
        id: row.get(0),
        owner: row.get(1),
        url: row.get(2),
        events: serde_json::from_str(&events).map_err(|_| corrupt("bad webhook events"))?,
        registered_by: row.get(4),
        created_at: from_unix_micros(row.get(5))?,
    }
    .into_webhook()
}

fn decode_delivery(row: &SqliteRow) -> Result<Delivery, StoreError> {
    let time = |i: usize| {
        row.get::<Option<i64>, _>(i)
            .map(from_unix_micros)
            .transpose()
    };
    DeliveryRow {
        id: row.get(0),
        webhook_id: row.get(1),
        event_type: row.get(2),
        status: row.get(3),
        attempts: row.get(4),
        last_status: row.get(5),
        last_error: row.get(6),
        last_attempt_at: time(7)?,
        next_attempt_at: time(8)?,
        delivered_at: time(9)?,
        created_at: from_unix_micros(row.get(10))?,
    }
    .into_delivery()
}

fn events_json(webhook: &Webhook) -> String {
    serde_json::Value::from(
        webhook
            .events
            .iter()
            .map(EventType::as_str)
            .collect::<Vec<_>>(),
    )
    .to_string()
}

#[async_trait::async_trait]
impl WebhookStore for SqliteStore {
    async fn insert_webhook(
        &self,
        webhook: &Webhook,
        secret: &WebhookSecret,
        events: &[EventDraft],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::query(
            "INSERT INTO api_key_webhooks (id, owner_id, url, events, secret, registered_by, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&webhook.id)
        .bind(&webhook.owner)
        .bind(&webhook.url)
        .bind(events_json(webhook))
        .bind(secret.expose_secret().as_str())
        .bind(webhook.registered_by.as_ref().map(KeyId::as_str))
        .bind(to_unix_micros(webhook.created_at))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        SqliteStore::append_in(&mut tx, events.to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM api_key_webhooks WHERE id = ?1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        row.as_ref().map(decode_webhook).transpose()
    }

    async fn webhooks(&self, owner: &str) -> Result<Vec<Webhook>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM api_key_webhooks WHERE owner_id = ?1 ORDER BY id"
        )))
        .bind(owner)
        .fetch_all(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode_webhook).collect()
    }

    async fn delete_webhook(&self, id: &str, events: &[EventDraft]) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        sqlx::query("DELETE FROM api_key_webhook_deliveries WHERE webhook_id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let done = sqlx::query("DELETE FROM api_key_webhooks WHERE id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let deleted = done.rows_affected() == 1;
        if deleted {
            SqliteStore::append_in(&mut tx, events.to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(deleted)
    }

    async fn set_webhook_secret(
        &self,
        id: &str,
        secret: &WebhookSecret,
        events: &[EventDraft],
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let done = sqlx::query("UPDATE api_key_webhooks SET secret = ?2 WHERE id = ?1")
            .bind(id)
            .bind(secret.expose_secret().as_str())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx_error)?;
        let updated = done.rows_affected() == 1;
        if updated {
            SqliteStore::append_in(&mut tx, events.to_vec()).await?;
        }
        tx.commit().await.map_err(map_sqlx_error)?;
        Ok(updated)
    }

    async fn deliveries(
        &self,
        webhook_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM api_key_webhook_deliveries WHERE webhook_id = ?1 \
             AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
        )))
        .bind(webhook_id)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode_delivery).collect()
    }

    async fn claim(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        token: &str,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        // One statement under SQLite's write lock: no two callers lease the same row.
        let rows = sqlx::query(
            "UPDATE api_key_webhook_deliveries SET lease_until = ?2, lease_token = ?3 \
             WHERE id IN (SELECT id FROM api_key_webhook_deliveries WHERE status = 'pending' \
             AND next_attempt_at <= ?1 AND lease_until <= ?1 ORDER BY next_attempt_at, id \
             LIMIT ?4) RETURNING id, webhook_id, payload, attempts, created_at",
        )
        .bind(to_unix_micros(now))
        .bind(to_unix_micros(lease_until))
        .bind(token)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let webhook_id: String = row.get(1);
            let endpoint: Option<(String, String, bool)> = sqlx::query_as(
                "SELECT w.url, w.secret, w.registered_by IS NOT NULL AND (k.id IS NULL \
                 OR k.revoked_at IS NOT NULL OR COALESCE(k.expires_at <= ?2, 0)) \
                 FROM api_key_webhooks AS w LEFT JOIN api_keys AS k ON k.id = w.registered_by \
                 WHERE w.id = ?1",
            )
            .bind(&webhook_id)
            .bind(to_unix_micros(now))
            .fetch_optional(self.pool())
            .await
            .map_err(map_sqlx_error)?;
            // Deleted meanwhile: its deliveries went with it.
            let Some((url, secret, registrar_ended)) = endpoint else {
                continue;
            };
            claimed.push(
                ClaimedRow {
                    id: row.get(0),
                    webhook_id,
                    url,
                    secret: Zeroizing::new(secret),
                    payload: row.get(2),
                    attempts: row.get(3),
                    created_at: from_unix_micros(row.get(4))?,
                    registrar_ended,
                }
                .into_claimed()?,
            );
        }
        Ok(claimed)
    }

    async fn finish(
        &self,
        id: &str,
        token: &str,
        outcome: &AttemptOutcome,
    ) -> Result<(), StoreError> {
        let delivered = outcome.status == DeliveryStatus::Delivered;
        sqlx::query(
            "UPDATE api_key_webhook_deliveries SET status = ?3, attempts = attempts + 1, \
             last_status = ?4, last_error = ?5, last_attempt_at = ?6, next_attempt_at = ?7, \
             delivered_at = ?8, lease_until = 0, lease_token = NULL \
             WHERE id = ?1 AND lease_token = ?2",
        )
        .bind(id)
        .bind(token)
        .bind(outcome.status.as_str())
        .bind(outcome.http_status.map(i64::from))
        .bind(outcome.error.as_deref())
        .bind(to_unix_micros(outcome.at))
        .bind(outcome.next_attempt_at.map(to_unix_micros))
        .bind(delivered.then(|| to_unix_micros(outcome.at)))
        .execute(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        Ok(())
    }
}
