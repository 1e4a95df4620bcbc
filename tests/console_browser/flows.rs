//! The console's activity, usage, search, sort, owner and webhook flows, as steps of the journey
//! in `tests/console_browser.rs` (whose `Browser` and `Service` they drive).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use fantoccini::Locator;
use fantoccini::actions::{InputSource, MouseActions, PointerAction};
use http::Method;
use serde_json::{Value, json};

use super::{Browser, Outcome, Service};

/// A key's details show its activity (newest first, with actor and address) and its usage as a
/// chart whose numbers the table alternative repeats.
pub(super) async fn key_activity_and_usage(b: &Browser, s: &Service, key: &str) -> Outcome {
    // A request the key may not make: refused for a missing scope, counted as such.
    let refused = s
        .call(Method::POST, "/ledgers", key, Some(json!({"name": "x"})))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    s.usage.flush().await?;
    b.open_details("Deploy bot").await?;
    b.until(
        "the key's activity",
        "return document.querySelectorAll('#key-activity li').length >= 2",
    )
    .await?;
    let events: Vec<String> = serde_json::from_value(
        b.js("return [...document.querySelectorAll('#key-activity li')].map(li => li.textContent)")
            .await?,
    )?;
    assert!(
        events[0].starts_with("Rotated by Master key from 127.0.0.1"),
        "{events:?}"
    );
    assert!(
        events
            .last()
            .unwrap()
            .starts_with("Created by Master key from 127.0.0.1"),
        "{events:?}"
    );

    // The chart: one bar group per hour, segments by outcome; the table says the same.
    b.until(
        "the usage chart",
        "return document.querySelectorAll('#key-usage-chart svg g.bar').length === 24 && document.querySelectorAll('#key-usage-chart rect.seg').length > 0",
    )
    .await?;
    let chart_label = b
        .label(&b.client.find(Locator::Css("#key-usage-chart svg")).await?)
        .await?;
    assert!(
        chart_label.starts_with("Requests per hour, last 24 hours, stacked by outcome."),
        "{chart_label}"
    );
    assert_chart_matches_table(b).await?;
    let outcomes = b
        .js("return [...new Set([...document.querySelectorAll('#key-usage-chart rect.seg')].map(r => r.dataset.outcome))].sort()")
        .await?;
    assert_eq!(outcomes, json!(["admitted", "missing_scope"]));
    let summary = b.text_of("#key-usage-summary").await?;
    assert!(
        summary.contains("admitted, 1 refused") && summary.contains("Last used from 127.0.0.1"),
        "{summary}"
    );
    b.screenshot("11-key-usage", 1366, 768).await?;
    b.screenshot("11-key-usage", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;

    // 7 days, by the day, from the keyboard-operable radio group.
    let week = b
        .client
        .find(Locator::Css("#usage-range input[value='7d']"))
        .await?;
    assert_eq!(b.label(&week).await?, "7 d");
    b.js("document.querySelector(\"#usage-range input[value='7d']\").closest('label').click(); return true").await?;
    b.until(
        "the 7-day chart",
        "return document.querySelectorAll('#key-usage-chart svg g.bar').length === 7 && document.querySelectorAll('#key-usage-table tbody tr').length === 7",
    )
    .await?;
    assert_chart_matches_table(b).await?;
    // The table is behind a disclosure: open it from the keyboard.
    b.client
        .find(Locator::Css("#details-dialog details summary"))
        .await?
        .send_keys("\u{E007}")
        .await?;
    b.until(
        "the table",
        "return document.querySelector('#details-dialog details').open",
    )
    .await?;
    let table_head = b.text_of("#key-usage-table thead").await?;
    assert!(
        table_head.contains("DAY (UTC)") || table_head.contains("Day (UTC)"),
        "{table_head}"
    );
    b.screenshot("11-key-usage-table", 1366, 768).await?;
    b.dark(true).await?;
    b.screenshot("11-key-usage-table-dark", 1366, 768).await?;
    b.dark(false).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Close").await?;
    b.until(
        "the details to close",
        "return !document.getElementById('details-dialog').open",
    )
    .await?;
    Ok(())
}

/// Every bar's segments add up to the total of the table row of its period.
async fn assert_chart_matches_table(b: &Browser) -> Outcome {
    let pairs = b
        .js("return [...document.querySelectorAll('#key-usage-chart svg g.bar')].map(g => {
               const bar = [...g.querySelectorAll('rect.seg')].reduce((a, r) => a + Number(r.dataset.count), 0);
               const row = document.querySelector(`#key-usage-table tbody tr[data-period='${g.dataset.period}']`);
               return [bar, Number(g.dataset.total), row ? Number(row.lastElementChild.textContent.replace(/\\D/g, '')) : -1];
             })")
        .await?;
    let pairs: Vec<(u64, u64, i64)> = serde_json::from_value(pairs)?;
    assert!(!pairs.is_empty());
    for (bar, total, row) in &pairs {
        assert_eq!(*bar, *total);
        assert_eq!(*bar as i64, *row, "{pairs:?}");
    }
    assert!(pairs.iter().map(|p| p.0).sum::<u64>() >= 2, "{pairs:?}");
    Ok(())
}

/// The names in the table, top to bottom.
async fn names(b: &Browser) -> Outcome<Vec<String>> {
    Ok(serde_json::from_value(
        b.js(
            "return [...document.querySelectorAll('#keys-body td.name')].map(td => td.textContent)",
        )
        .await?,
    )?)
}

/// Search by name or key id, sort by each column, Create within the first screen, the owner's
/// Activity page filtered by type, and no Webhooks tab where the service has no webhooks.
pub(super) async fn keys_table(
    b: &Browser,
    s: &Service,
    production: &Value,
    staging: &Value,
) -> Outcome {
    let production_id = production["api_key_id"].as_str().unwrap();
    // Some traffic: two more admitted for production; one admitted and one refused for staging.
    for _ in 0..2 {
        assert_eq!(
            s.ledgers_status(production["key"].as_str().unwrap()).await,
            StatusCode::OK
        );
    }
    let staging_key = staging["key"].as_str().unwrap();
    assert_eq!(s.ledgers_status(staging_key).await, StatusCode::OK);
    let refused = s
        .call(
            Method::POST,
            "/ledgers",
            staging_key,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    s.usage.flush().await?;
    b.click("Refresh").await?;
    b.until(
        "the requests column",
        "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === 'Staging worker');
         return tr !== undefined && tr.cells[6].textContent.startsWith('2')",
    )
    .await?;

    // For the README: no focus ring, the pointer off every control.
    b.js("document.activeElement.blur(); return true").await?;
    let away = MouseActions::new("mouse".into()).then(PointerAction::MoveTo {
        duration: None,
        x: 1.0,
        y: 1.0,
    });
    b.client.perform_actions(away).await?;
    b.screenshot("15-readme", 1440, 900).await?;

    // Create key is on the first screen at 1366×768, without scrolling.
    b.client.set_window_size(1366, 768).await?;
    let place = b
        .js("window.scrollTo(0, 0); const r = document.getElementById('create-open').getBoundingClientRect();
             return [r.top >= 0 && r.bottom <= window.innerHeight && r.right <= window.innerWidth, window.scrollY]")
        .await?;
    assert_eq!(
        place,
        json!([true, 0]),
        "Create key is off the first screen"
    );
    b.screenshot("09-overview", 1366, 768).await?;

    b.type_into("Search", "staging").await?;
    b.until(
        "one match",
        "return document.querySelectorAll('#keys-body tr').length === 1",
    )
    .await?;
    assert_eq!(names(b).await?, ["Staging worker"]);
    b.type_into("Search", production_id).await?;
    b.until(
        "the key by id",
        "return document.querySelectorAll('#keys-body tr').length === 1",
    )
    .await?;
    assert_eq!(names(b).await?, ["Production backend"]);
    b.type_into("Search", "nothing like it").await?;
    b.until(
        "no match",
        "return !document.getElementById('keys-empty').hidden",
    )
    .await?;
    assert!(
        b.text_of("#keys-empty")
            .await?
            .contains("No loaded key matches")
    );
    b.field("Search").await?.clear().await?;
    b.js("document.getElementById('key-search').dispatchEvent(new Event('input')); return true")
        .await?;
    b.until(
        "every row",
        "return document.querySelectorAll('#keys-body tr').length === 4",
    )
    .await?;

    let sort = b.field("Sort by").await?;
    sort.select_by_value("name-asc").await?;
    assert_eq!(
        names(b).await?,
        [
            "Partner import job",
            "Production backend",
            "Reporting",
            "Staging worker"
        ]
    );
    let sorted = b
        .js("return [...document.querySelectorAll('#keys-table th[aria-sort]')].map(th => [th.textContent, th.getAttribute('aria-sort')])")
        .await?;
    assert_eq!(sorted, json!([["Name", "ascending"]]));
    sort.select_by_value("name-desc").await?;
    assert_eq!(
        names(b).await?,
        [
            "Staging worker",
            "Reporting",
            "Production backend",
            "Partner import job"
        ]
    );
    sort.select_by_value("created-asc").await?;
    assert_eq!(names(b).await?[0], "Production backend");
    sort.select_by_value("last-used-desc").await?;
    let used = names(b).await?;
    assert_eq!(
        used[2..],
        ["Reporting", "Partner import job"],
        "never used last: {used:?}"
    );
    sort.select_by_value("expires-asc").await?;
    assert_eq!(names(b).await?.len(), 4);
    sort.select_by_value("requests-desc").await?;
    assert_eq!(
        names(b).await?[..2],
        ["Production backend", "Staging worker"]
    );
    assert_eq!(b.row("Production backend").await?[6], "3");
    assert_eq!(b.row("Staging worker").await?[6], "2 (1 refused)");
    assert_eq!(b.row("Reporting").await?[6], "0");
    sort.select_by_value("created-desc").await?;

    // The owner's Activity page, filtered by type.
    b.click("Activity").await?;
    b.until(
        "the owner's events",
        "return document.querySelectorAll('#activity-body tr').length >= 5",
    )
    .await?;
    let focused = b.js("return document.activeElement.id").await?;
    assert_eq!(
        focused,
        json!("activity-heading"),
        "focus moves to the section"
    );
    b.screenshot("12-activity", 1366, 768).await?;
    b.screenshot("12-activity", 375, 812).await?;
    b.client.set_window_size(1366, 768).await?;
    b.field("Event type")
        .await?
        .select_by_value("key.revoked")
        .await?;
    b.until(
        "only revocations",
        "const rows = [...document.querySelectorAll('#activity-body tr')];
         return rows.length === 1 && rows.every(tr => tr.cells[1].textContent === 'Revoked')",
    )
    .await?;
    let count = b.text_of("#activity-count").await?;
    assert_eq!(count, "1 event of type Revoked.");
    b.click("Verify chain").await?;
    b.until(
        "the chain check",
        "return /Chain intact/.test(document.getElementById('activity-verify-status').textContent)",
    )
    .await?;
    // The example server serves webhook endpoints when built with the feature: the tab is there
    // exactly then (it hides itself when the routes answer 404).
    let hidden = b
        .js("return document.getElementById('webhooks-tab').hidden")
        .await?;
    assert_eq!(hidden, json!(!cfg!(feature = "webhooks")));
    b.click("Keys").await?;
    b.row("Production backend").await?;
    b.client.set_window_size(1440, 900).await?;
    Ok(())
}

/// The master key picks an owner from the list, with its active-key count.
pub(super) async fn pick_owner(b: &Browser, owner: &str) -> Outcome {
    b.until(
        "the owners",
        "return document.querySelectorAll('#owner-picks button').length >= 2",
    )
    .await?;
    let picks: Vec<String> = serde_json::from_value(
        b.js("return [...document.querySelectorAll('#owner-picks button')].map(b => b.getAttribute('aria-label'))")
            .await?,
    )?;
    assert!(
        picks.contains(&"globex, 1 active key".to_owned()),
        "{picks:?}"
    );
    let name = picks
        .iter()
        .find(|p| p.starts_with(&format!("{owner}, ")))
        .unwrap_or_else(|| panic!("no {owner} in {picks:?}"))
        .clone();
    b.screenshot("13-owners", 1366, 768).await?;
    b.click(&name).await?;
    b.until(
        "the owner's keys",
        &format!(
            "return document.getElementById('keys-caption').textContent === 'API keys of {owner}'"
        ),
    )
    .await?;
    b.usage_text().await?;
    Ok(())
}

// ---- Webhooks, against a fake of the wire contract when the service has none ------------------

#[derive(Default)]
struct Hooks {
    next: u32,
    list: Vec<Value>,
}

/// The webhook routes' wire contract, in memory: what the panel is written against.
fn fake_webhooks() -> Router {
    let hooks = Arc::new(Mutex::new(Hooks::default()));
    Router::new()
        .route(
            "/api-keys/webhooks",
            post(|State(h): State<Arc<Mutex<Hooks>>>, axum::Json(body): axum::Json<Value>| async move {
                let mut h = h.lock().unwrap();
                h.next += 1;
                let hook = json!({"id": format!("whk_{}", h.next), "owner": body["owner"], "url": body["url"],
                                  "events": body["events"], "created_at": "2026-12-07T12:00:00Z"});
                h.list.push(hook.clone());
                let mut created = hook;
                created["secret"] = json!(format!("whsec_{}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", h.next));
                (StatusCode::CREATED, axum::Json(created))
            })
            .get(|State(h): State<Arc<Mutex<Hooks>>>| async move {
                axum::Json(json!({"webhooks": h.lock().unwrap().list.clone()}))
            }),
        )
        .route(
            "/api-keys/webhooks/{id}",
            delete(|State(h): State<Arc<Mutex<Hooks>>>, Path(id): Path<String>| async move {
                h.lock().unwrap().list.retain(|w| w["id"] != id.as_str());
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/api-keys/webhooks/{id}/rotate",
            post(|Path(id): Path<String>| async move {
                axum::Json(json!({"id": id, "secret": "whsec_ROTATEDAAAAAAAAAAAAAAAAAAAAAAAAAAA"}))
            }),
        )
        .route(
            "/api-keys/webhooks/{id}/deliveries",
            get(|| async {
                axum::Json(json!({"deliveries": [
                    {"id": "msg_1", "event_type": "key.revoked", "status": "failed", "attempts": 3, "last_status": 500,
                     "last_error": "HTTP 500", "last_attempt_at": "2026-12-07T12:05:00Z", "next_attempt_at": null,
                     "delivered_at": null, "created_at": "2026-12-07T12:01:00Z"},
                    {"id": "msg_2", "event_type": "key.created", "status": "delivered", "attempts": 1, "last_status": 200,
                     "last_error": null, "last_attempt_at": "2026-12-07T12:00:01Z", "next_attempt_at": null,
                     "delivered_at": "2026-12-07T12:00:01Z", "created_at": "2026-12-07T12:00:00Z"}
                ], "next_cursor": null}))
            }),
        )
        .with_state(hooks)
}

/// The Webhooks panel: register an endpoint (its secret shown once), list, deliveries, rotate,
/// delete; against the wire contract, served by a fake in front of the management API (whose own
/// webhook routes, where it has them, need a configured outbox and resolvable URLs).
pub(super) async fn webhooks(b: &Browser) -> Outcome {
    use axum::extract::Request;
    use tower::ServiceExt;
    use tower_api_keys::key::ApiKey;
    use tower_api_keys::layer::ApiKeyLayer;
    use tower_api_keys::manage::{self, KeyManager, console::Console};
    use tower_api_keys::resolver::CachedResolver;
    use tower_api_keys::store::MemoryStore;

    let store = Arc::new(MemoryStore::new());
    let resolver = CachedResolver::new(store.clone());
    let fake = fake_webhooks();
    let service = manage::router(KeyManager::new(resolver.clone()))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(super::common::MASTER)))
        .nest("/keys", Console::new().router());
    // The fake answers before any routing: the management router has webhook routes of its own
    // (with the feature), and a request it had matched would carry its path parameters along.
    let app = Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let (fake, service) = (fake.clone(), service.clone());
        async move {
            if request.uri().path().starts_with("/api-keys/webhooks") {
                fake.oneshot(request).await
            } else {
                service.oneshot(request).await
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, app).into_future());

    b.client.goto(&format!("{base}/keys")).await?;
    b.sign_in(super::common::MASTER).await?;
    b.type_into("Owner", "acme").await?;
    b.click("Show keys").await?;
    b.usage_text().await?;
    b.until(
        "the Webhooks tab",
        "return !document.getElementById('webhooks-tab').hidden",
    )
    .await?;
    b.click("Webhooks").await?;
    b.until(
        "the empty list",
        "return !document.getElementById('webhooks-empty').hidden",
    )
    .await?;
    b.type_into("Endpoint URL", "https://hooks.example.com/api-keys")
        .await?;
    // Revoked and Leaked are chosen by default; add Created.
    b.field("Created").await?.click().await?;
    b.click("Add endpoint").await?;
    let secret = b.secret_shown().await?;
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(
        b.text_of("#secret-title").await?,
        "Your webhook signing secret"
    );
    b.screenshot("14-webhook-secret", 1366, 768).await?;
    b.click("Close").await?;
    b.until(
        "the dialog to close",
        "return !document.getElementById('secret-dialog').open",
    )
    .await?;
    let page = b.js("return document.documentElement.outerHTML").await?;
    assert!(
        !page.as_str().unwrap().contains(&secret),
        "the secret stayed in the page"
    );
    b.until(
        "the endpoint row",
        "return document.querySelectorAll('#webhooks-body tr').length === 1",
    )
    .await?;
    let row = b.text_of("#webhooks-body tr").await?;
    assert!(
        row.contains("https://hooks.example.com/api-keys")
            && row.contains("key.created")
            && row.contains("key.revoked")
            && row.contains("key.leaked"),
        "{row}"
    );
    b.click("Deliveries of https://hooks.example.com/api-keys")
        .await?;
    b.until("the deliveries", "return document.querySelectorAll('#deliveries-body tr').length >= 1 || !document.getElementById('deliveries-status').textContent.startsWith('Loading')").await?;
    b.screenshot("14-webhook-deliveries", 1366, 768).await?;
    b.click("Close").await?;
    b.screenshot("14-webhooks", 1366, 768).await?;
    b.screenshot("14-webhooks", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Rotate the secret of https://hooks.example.com/api-keys")
        .await?;
    b.click("Rotate secret").await?;
    let rotated = b.secret_shown().await?;
    assert!(rotated.starts_with("whsec_") && rotated != secret);
    b.click("Close").await?;
    b.click("Delete https://hooks.example.com/api-keys").await?;
    b.click("Delete endpoint").await?;
    b.until("the row to go", "return document.querySelectorAll('#webhooks-body tr').length === 0 && !document.getElementById('webhooks-empty').hidden").await?;
    let focused = b.js("return document.activeElement.id").await?;
    assert_eq!(focused, json!("webhook-url"));
    b.sign_out().await?;
    Ok(())
}
