//! Webhook endpoints and their outbox in PostgreSQL: `api_key_webhooks`,
//! `api_key_webhook_deliveries` (the store's migration 8), in the store's schema. `s` is the
//! quoted schema name (a checked identifier): the only thing formatted into these statements.
//! The [`WebhookStore`] of [`PostgresStore`]; the store writes the deliveries itself, with each
//! event (its outbox).

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::rows::{ClaimedRow, DELIVERY_COLUMNS, DeliveryRow, WEBHOOK_COLUMNS, WebhookRow};
use super::store::WebhookStore;
use super::types::{AttemptOutcome, Claimed, Delivery, DeliveryStatus, Webhook, WebhookSecret};
use crate::audit::{EventDraft, EventType};
use crate::key::KeyId;
use crate::store::sql_common::{map_sqlx_error, micros};
use crate::store::{PostgresStore, StoreError};

fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    at: usize,
) -> Result<T, StoreError> {
    row.try_get(at).map_err(map_sqlx_error)
}

fn decode_webhook(row: &PgRow) -> Result<Webhook, StoreError> {
    WebhookRow {
        id: get(row, 0)?,
        owner: get(row, 1)?,
        url: get(row, 2)?,
        events: get(row, 3)?,
        registered_by: get(row, 4)?,
        created_at: get(row, 5)?,
    }
    .into_webhook()
}

fn decode_delivery(row: &PgRow) -> Result<Delivery, StoreError> {
    DeliveryRow {
        id: get(row, 0)?,
        webhook_id: get(row, 1)?,
        event_type: get(row, 2)?,
        status: get(row, 3)?,
        attempts: i64::from(get::<i32>(row, 4)?),
        last_status: get::<Option<i32>>(row, 5)?.map(i64::from),
        last_error: get(row, 6)?,
        last_attempt_at: get(row, 7)?,
        next_attempt_at: get(row, 8)?,
        delivered_at: get(row, 9)?,
        created_at: get(row, 10)?,
    }
    .into_delivery()
}

#[async_trait::async_trait]
impl WebhookStore for PostgresStore {
    async fn insert_webhook(
        &self,
        webhook: &Webhook,
        secret: &WebhookSecret,
        events: &[EventDraft],
    ) -> Result<(), StoreError> {
        self.migrate().await?;
        let s = self.quoted_schema();
        let mut tx = self.pool().begin().await.map_err(map_sqlx_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.api_key_webhooks (id, owner_id, url, events, secret, registered_by, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )))
        .bind(&webhook.id)
        .bind(&webhook.owner)
        .bind(&webhook.url)
        .bind(
            webhook
                .events
                .iter()
                .map(EventType::as_str)
                .collect::<Vec<_>>(),
        )
        .bind(secret.expose_secret().as_str())
        .bind(webhook.registered_by.as_ref().map(KeyId::as_str))
        .bind(micros(webhook.created_at))
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        self.append_in(&mut tx, events.to_vec()).await?;
        tx.commit().await.map_err(map_sqlx_error)
    }

    async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        self.migrate().await?;
        let s = self.quoted_schema();
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM {s}.api_key_webhooks WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        row.as_ref().map(decode_webhook).transpose()
    }

    async fn webhooks(&self, owner: &str) -> Result<Vec<Webhook>, StoreError> {
        self.migrate().await?;
        let s = self.quoted_schema();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM {s}.api_key_webhooks WHERE owner_id = $1 ORDER BY id"
        )))
        .bind(owner)
        .fetch_all(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        rows.iter().map(decode_webhook).collect()
    }

    async fn delete_webhook(&self, id: &str, events: &[EventDraft]) -> Result<bool, StoreError> {
        self.migrate().await?;
        let s = self.quoted_schema();
        let mut tx = self.pool().begin().await.map_err(map_sqlx_error)?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {s}.api_key_webhook_deliveries WHERE webhook_id = $1"
        )))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {s}.api_key_webhooks WHERE id = $1"
        )))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let deleted = done.rows_affected() == 1;
        if deleted {
            self.append_in(&mut tx, events.to_vec()).await?;
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
        self.migrate().await?;
        let s = self.quoted_schema();
        let mut tx = self.pool().begin().await.map_err(map_sqlx_error)?;
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_webhooks SET secret = $2 WHERE id = $1"
        )))
        .bind(id)
        .bind(secret.expose_secret().as_str())
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx_error)?;
        let updated = done.rows_affected() == 1;
        if updated {
            self.append_in(&mut tx, events.to_vec()).await?;
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
        self.migrate().await?;
        let s = self.quoted_schema();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM {s}.api_key_webhook_deliveries WHERE webhook_id = $1 \
             AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
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
        self.migrate().await?;
        let s = self.quoted_schema();
        // SKIP LOCKED: concurrent claimers take disjoint rows; the lease keeps them apart after.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_webhook_deliveries AS d SET lease_until = $2, lease_token = $3 \
             FROM (SELECT id FROM {s}.api_key_webhook_deliveries WHERE status = 'pending' \
             AND next_attempt_at <= $1 AND lease_until <= $1 ORDER BY next_attempt_at, id \
             LIMIT $4 FOR UPDATE SKIP LOCKED) AS due \
             WHERE d.id = due.id \
             RETURNING d.id, d.webhook_id, d.payload, d.attempts, d.created_at, \
             (SELECT url FROM {s}.api_key_webhooks w WHERE w.id = d.webhook_id), \
             (SELECT secret FROM {s}.api_key_webhooks w WHERE w.id = d.webhook_id), \
             (SELECT w.registered_by IS NOT NULL AND (k.id IS NULL OR k.revoked_at IS NOT NULL \
              OR COALESCE(k.expires_at <= $1, false)) FROM {s}.api_key_webhooks w \
              LEFT JOIN {s}.api_keys k ON k.id = w.registered_by WHERE w.id = d.webhook_id)"
        )))
        .bind(micros(now))
        .bind(micros(lease_until))
        .bind(token)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let (Some(url), Some(secret)) = (
                get::<Option<String>>(row, 5)?,
                get::<Option<String>>(row, 6)?,
            ) else {
                continue; // the endpoint was deleted meanwhile
            };
            claimed.push(
                ClaimedRow {
                    id: get(row, 0)?,
                    webhook_id: get(row, 1)?,
                    url,
                    secret: Zeroizing::new(secret),
                    payload: get(row, 2)?,
                    attempts: i64::from(get::<i32>(row, 3)?),
                    created_at: get(row, 4)?,
                    registrar_ended: get::<Option<bool>>(row, 7)?.unwrap_or(false),
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
        self.migrate().await?;
        let s = self.quoted_schema();
        let delivered = outcome.status == DeliveryStatus::Delivered;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.api_key_webhook_deliveries SET status = $3, attempts = attempts + 1, \
             last_status = $4, last_error = $5, last_attempt_at = $6, next_attempt_at = $7, \
             delivered_at = $8, lease_until = 'epoch', lease_token = NULL \
             WHERE id = $1 AND lease_token = $2"
        )))
        .bind(id)
        .bind(token)
        .bind(outcome.status.as_str())
        .bind(outcome.http_status.map(i32::from))
        .bind(outcome.error.as_deref())
        .bind(micros(outcome.at))
        .bind(outcome.next_attempt_at.map(micros))
        .bind(delivered.then(|| micros(outcome.at)))
        .execute(self.pool())
        .await
        .map_err(map_sqlx_error)?;
        Ok(())
    }
}
