#![cfg(unix)]
//! The key console in a real browser: headless Chromium, driven through chromedriver (WebDriver),
//! against `examples/server/` served on a free local port.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the test
//! says loudly that it was SKIPPED, and fails under `CI=true`. Screenshots at 375 and 1440 px wide
//! land in `target/console-screenshots/`.

#[allow(dead_code)]
#[path = "../examples/server/main.rs"]
mod server;

mod common;

#[path = "console_browser/flows.rs"]
mod flows;

use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const XSS: &str = "<img src=x onerror=alert(1)>";
const WAIT: Duration = Duration::from_secs(15);

type Fail = Box<dyn std::error::Error + Send + Sync>;
type Outcome<T = ()> = Result<T, Fail>;

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Processes and files this test started, ended and removed on drop (even when it fails).
struct Cleanup {
    driver: Option<Child>,
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            // chromedriver leads its own process group: end it and the browsers it started.
            if let Ok(pid) = i32::try_from(driver.id()) {
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = driver.kill();
            let _ = driver.wait();
        }
        for path in &self.paths {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A WebDriver endpoint chromedriver has and fantoccini does not wrap (computed accessible names,
/// DevTools commands), relative to the session.
#[derive(Debug)]
struct SessionCommand {
    method: http::Method,
    path: String,
    body: Option<Value>,
}

impl WebDriverCompatibleCommand for SessionCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/{}",
            session_id.unwrap_or_default(),
            self.path
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            self.method.clone(),
            self.body.as_ref().map(Value::to_string),
        )
    }
}

/// The example server on a temporary SQLite file, plus a plain HTTP client for API calls.
struct Service {
    base: String,
    master: String,
    usage: tower_api_keys::usage::UsageRecorder,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    _parts: Vec<Box<dyn std::any::Any + Send>>,
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

impl Service {
    async fn start(db: &Path) -> Self {
        let demo = server::build(server::Config {
            master_key: None,
            database_url: format!("sqlite://{}", db.display()),
            redis_url: None,
            public_checksum: false,
            leak_report_public_keys: None,
            max_active_per_owner: None,
        })
        .await
        .expect("the example builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            axum::serve(
                listener,
                demo.router
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .into_future(),
        );
        Self {
            base,
            master: demo.master.expose_secret().to_owned(),
            usage: demo.usage,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            _parts: demo._subscriptions,
        }
    }

    async fn call(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if !key.is_empty() {
            request = request.header("x-api-key", key);
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(body.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let response = self
            .http
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn create(&self, owner: &str, name: &str, scopes: &[&str]) -> Value {
        let reply = self
            .call(
                Method::POST,
                "/api-keys",
                &self.master,
                Some(json!({"name": name, "owner": owner, "scopes": scopes})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body
    }

    async fn list(&self, owner: &str) -> Vec<Value> {
        let reply = self
            .call(
                Method::GET,
                &format!("/api-keys?owner={owner}"),
                &self.master,
                None,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body.as_array().unwrap().clone()
    }

    async fn key_named(&self, owner: &str, name: &str) -> Value {
        self.list(owner)
            .await
            .into_iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("no key named {name:?} for {owner}"))
    }

    async fn ledgers_status(&self, key: &str) -> StatusCode {
        self.call(Method::GET, "/ledgers", key, None).await.status
    }
}

/// The browser, with helpers that find controls by their accessible names (the console's
/// contract) and wait for the page.
struct Browser {
    client: Client,
    shots: PathBuf,
}

impl Browser {
    async fn session(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Outcome<Value> {
        Ok(self
            .client
            .issue_cmd(SessionCommand {
                method,
                path: path.to_owned(),
                body,
            })
            .await?)
    }

    /// The accessible name Chromium computes for an element.
    async fn label(&self, element: &Element) -> Outcome<String> {
        let path = format!("element/{}/computedlabel", element.element_id());
        let value = self.session(http::Method::GET, &path, None).await?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// Whether a person could point at the element: scrolled into view, it is what the browser hits
    /// at its centre (controls behind a modal dialog are not).
    async fn reachable(&self, element: &Element) -> Outcome<bool> {
        let hit = self
            .client
            .execute(
                "const el = arguments[0]; el.scrollIntoView({block: 'center', inline: 'center'});
                 const r = el.getBoundingClientRect();
                 const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
                 return hit !== null && (hit === el || el.contains(hit) || (hit.control === el))",
                vec![serde_json::to_value(element)?],
            )
            .await?;
        Ok(hit == Value::Bool(true))
    }

    /// The one visible element matching `css` whose accessible name is `name`, waiting for it.
    async fn named(&self, css: &str, name: &str) -> Outcome<Element> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut found = Vec::new();
            for element in self.client.find_all(Locator::Css(css)).await? {
                if element.is_displayed().await.unwrap_or(false)
                    && self.label(&element).await.unwrap_or_default() == name
                    && self.reachable(&element).await.unwrap_or(false)
                {
                    found.push(element);
                }
            }
            match found.len() {
                1 => return Ok(found.pop().unwrap()),
                0 if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                n => return Err(format!("{n} visible elements `{css}` named {name:?}").into()),
            }
        }
    }

    /// A button by its accessible name, inside the open dialog on top if there is one.
    async fn button(&self, name: &str) -> Outcome<Element> {
        self.named(&self.scope("button").await?, name).await
    }

    /// A form field (input, select or group of checkboxes) by its accessible name.
    async fn field(&self, name: &str) -> Outcome<Element> {
        let css = ["input", "select", "fieldset"].map(|tag| self.scope_sync(tag));
        self.named(&css.join(", "), name).await
    }

    async fn scope(&self, tag: &str) -> Outcome<String> {
        Ok(self.scope_sync(tag))
    }

    /// Modal dialogs make the page behind them inert; the helpers look in every open dialog (they
    /// filter by visibility and name) and fall back to the page.
    fn scope_sync(&self, tag: &str) -> String {
        format!("dialog[open] {tag}, body > header {tag}, main {tag}")
    }

    async fn click(&self, name: &str) -> Outcome {
        self.button(name).await?.click().await?;
        Ok(())
    }

    async fn type_into(&self, field: &str, text: &str) -> Outcome {
        let input = self.field(field).await?;
        input.clear().await?;
        input.send_keys(text).await?;
        Ok(())
    }

    async fn js(&self, script: &str) -> Outcome<Value> {
        Ok(self.client.execute(script, Vec::new()).await?)
    }

    async fn text_of(&self, css: &str) -> Outcome<String> {
        Ok(self.client.find(Locator::Css(css)).await?.text().await?)
    }

    /// Waits until `script` returns true.
    async fn until(&self, what: &str, script: &str) -> Outcome {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.js(script).await? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let banner = self
                    .js("return document.getElementById('banner').textContent")
                    .await?;
                return Err(format!("timed out waiting for {what} (banner: {banner})").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The table row of the key named `name` (its cells' text), once it is there.
    async fn row(&self, name: &str) -> Outcome<Vec<String>> {
        let find = format!(
            "return [...document.querySelectorAll('#keys-body tr')].some(tr => tr.querySelector('td.name').textContent === {})",
            json!(name)
        );
        self.until(&format!("the row of {name:?}"), &find).await?;
        let cells = self
            .js(&format!(
                "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === {});
                 return [...tr.cells].map(td => td.textContent)",
                json!(name)
            ))
            .await?;
        Ok(serde_json::from_value(cells)?)
    }

    async fn open_details(&self, name: &str) -> Outcome {
        self.row(name).await?;
        let buttons = self
            .client
            .find_all(Locator::Css("#keys-body td.name button"))
            .await?;
        for button in buttons {
            if button.text().await? == name {
                button.click().await?;
                self.until(
                    "the details dialog",
                    "return document.getElementById('details-dialog').open",
                )
                .await?;
                return Ok(());
            }
        }
        Err(format!("no name button for {name:?}").into())
    }

    async fn secret_shown(&self) -> Outcome<String> {
        self.until(
            "the shown-once dialog",
            "return document.getElementById('secret-dialog').open && document.getElementById('secret-value').textContent.length > 0",
        )
        .await?;
        self.text_of("#secret-value").await
    }

    async fn screenshot(&self, name: &str, width: u32, height: u32) -> Outcome {
        self.client.set_window_size(width, height).await?;
        // Let layout settle at the new width.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let png = self.client.screenshot().await?;
        std::fs::write(self.shots.join(format!("{name}-{width}.png")), png)?;
        Ok(())
    }

    async fn dark(&self, on: bool) -> Outcome {
        let value = if on { "dark" } else { "light" };
        self.session(
            http::Method::POST,
            "goog/cdp/execute",
            Some(json!({
                "cmd": "Emulation.setEmulatedMedia",
                "params": {"features": [{"name": "prefers-color-scheme", "value": value}]},
            })),
        )
        .await?;
        Ok(())
    }

    async fn sign_in(&self, key: &str) -> Outcome {
        self.until(
            "the sign-in form",
            "return !document.getElementById('signin-view').hidden",
        )
        .await?;
        self.type_into("Key", key).await?;
        self.click("Sign in").await?;
        self.until(
            "the keys view",
            "return !document.getElementById('keys-view').hidden",
        )
        .await
    }

    async fn sign_out(&self) -> Outcome {
        self.click("Sign out").await?;
        self.until(
            "the sign-in form",
            "return !document.getElementById('signin-view').hidden",
        )
        .await
    }

    async fn usage_text(&self) -> Outcome<String> {
        self.until(
            "the active-key count",
            "return /active key/.test(document.getElementById('usage-text').textContent)",
        )
        .await?;
        self.text_of("#usage-text").await
    }
}

async fn connect(chromium: &Path, port: u16, profile: &Path) -> Outcome<Client> {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage", "--window-size=1440,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match attempt {
            Ok(client) => return Ok(client),
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(format!("chromedriver did not start a session: {error}").into());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let started = Instant::now();
    let (Some(chromium), Some(chromedriver)) = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver"]),
    ) else {
        let message = "console browser tests need `chromium` and `chromedriver` (Debian: apt-get install chromium chromium-driver)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}; CI=true, so they may not be skipped");
        }
        eprintln!(
            "\n{}\n!!! SKIPPED: {message}\n{}\n",
            "!".repeat(100),
            "!".repeat(100)
        );
        return;
    };

    static NEXT: AtomicU32 = AtomicU32::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let db = std::env::temp_dir().join(format!("tower-api-keys-console-{unique}.db"));
    let profile = std::env::temp_dir().join(format!("tower-api-keys-console-profile-{unique}"));
    let mut cleanup = Cleanup {
        driver: None,
        paths: vec![profile.clone()],
    };
    for suffix in ["", "-wal", "-shm"] {
        let mut path = db.clone().into_os_string();
        path.push(suffix);
        cleanup.paths.push(path.into());
    }

    let port = free_port();
    cleanup.driver = Some(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let service = Service::start(&db).await;
    let client = connect(&chromium, port, &profile)
        .await
        .expect("a browser session");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = Browser { client, shots };

    // A failed assertion still closes the browser before the test fails.
    let result = AssertUnwindSafe(journey(&browser, &service))
        .catch_unwind()
        .await;
    if !matches!(result, Ok(Ok(()))) {
        let _ = browser.screenshot("failure", 1440, 900).await;
    }
    let _ = browser.client.clone().close().await;
    drop(cleanup);
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("console journey failed: {error}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    eprintln!(
        "console browser journey: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn journey(b: &Browser, s: &Service) -> Outcome {
    // Every console response carries the security headers, over real HTTP.
    for path in [
        "/console",
        "/console/console.js",
        "/console/console.css",
        "/console/config.json",
    ] {
        let reply = s.call(Method::GET, path, "", None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.headers["content-security-policy"], CSP, "{path}");
        assert_eq!(reply.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(reply.headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(reply.headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(reply.headers["cache-control"], "no-store", "{path}");
    }

    b.client.goto(&format!("{}/console", s.base)).await?;
    b.screenshot("01-sign-in", 1440, 900).await?;
    b.screenshot("01-sign-in", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;

    // The page loaded only its own origin's files, and weighs under its budget.
    let resources = b
        .js("return performance.getEntriesByType('resource').map(e => [e.name, e.transferSize || e.encodedBodySize || 0])")
        .await?;
    let navigation = b
        .js("const n = performance.getEntriesByType('navigation')[0]; return n.transferSize || n.encodedBodySize || 0")
        .await?;
    let mut weight = navigation.as_u64().unwrap_or_default();
    for entry in resources.as_array().unwrap() {
        let url = entry[0].as_str().unwrap();
        assert!(
            url.starts_with(&s.base),
            "the page loaded {url} from another origin"
        );
        weight += entry[1].as_u64().unwrap_or_default();
    }
    assert!(
        weight > 0 && weight <= 150_000,
        "page weight {weight} bytes"
    );
    eprintln!("console page weight as loaded: {weight} bytes");

    // A wrong key: the sign-in says why, in words and code.
    b.type_into("Key", "sk_live_not-a-real-key").await?;
    b.click("Sign in").await?;
    b.until(
        "the sign-in reason",
        "return !document.getElementById('signin-reason').hidden",
    )
    .await?;
    let reason = b.text_of("#signin-reason").await?;
    assert!(reason.contains("AUTH_INVALID_API_KEY"), "{reason}");

    // Sign in with the master key; choose an owner.
    b.sign_in(&s.master).await?;
    assert_eq!(b.text_of("#session-label").await?, "Master key");
    // The key is not kept anywhere but memory.
    let stored = b
        .js("return [document.cookie, localStorage.length, sessionStorage.length, location.href]")
        .await?;
    assert_eq!(stored[0], "");
    assert_eq!(stored[1], 0);
    assert_eq!(stored[2], 0);
    assert!(!stored[3].as_str().unwrap().contains(&s.master));
    s.create("globex", "Globex billing", &["ledgers:read"])
        .await;
    b.type_into("Owner", "acme").await?;
    b.click("Show keys").await?;
    assert_eq!(b.usage_text().await?, "0 of 10 active keys");
    b.until(
        "the empty state",
        "return !document.getElementById('keys-empty').hidden",
    )
    .await?;
    b.screenshot("01-empty", 1440, 900).await?;

    // Create a delegating key for acme through the dialog.
    b.click("Create key").await?;
    let name = b.field("Name").await?;
    let placeholder = name.attr("placeholder").await?.unwrap_or_default();
    assert!(
        placeholder.starts_with("API key 20") && placeholder.ends_with(" UTC"),
        "{placeholder}"
    );
    name.send_keys("Deploy bot").await?;
    let scopes = b.field("Scopes").await?;
    let offered: Vec<String> = serde_json::from_value(
        b.js("return [...document.querySelectorAll('#create-scope-list input')].map(i => i.value)")
            .await?,
    )?;
    assert_eq!(
        offered.len(),
        8,
        "the master key is offered every declared scope: {offered:?}"
    );
    for scope in ["ledgers:read", "api-keys:read", "api-keys:write"] {
        scopes
            .find(Locator::Css(&format!("input[value='{scope}']")))
            .await?
            .click()
            .await?;
    }
    let expires = b.field("Expires").await?;
    let prefilled = expires.prop("value").await?.unwrap_or_default();
    assert_eq!(
        prefilled.len(),
        10,
        "the policy's default expiry is prefilled: {prefilled:?}"
    );
    b.screenshot("02-create", 1440, 900).await?;
    b.click("Create").await?;
    let first = b.secret_shown().await?;
    assert!(first.starts_with("sk_live_"), "{first}");
    b.screenshot("03-shown-once", 1440, 900).await?;
    b.screenshot("03-shown-once", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Copy").await?;
    b.until(
        "the copy confirmation",
        "return document.getElementById('secret-status').textContent.length > 0",
    )
    .await?;
    b.click("Close").await?;
    // Closing drops the plaintext from the page.
    b.until(
        "the dialog to close",
        "return !document.getElementById('secret-dialog').open",
    )
    .await?;
    let page = b.js("return document.documentElement.outerHTML").await?;
    assert!(
        !page.as_str().unwrap().contains(&first),
        "the plaintext stayed in the page"
    );

    // The table shows the name and the masked key; the key works against the API.
    let listed = s.key_named("acme", "Deploy bot").await;
    let cells = b.row("Deploy bot").await?;
    assert_eq!(cells[1], listed["masked_key"].as_str().unwrap());
    assert!(cells[1].contains('…'), "masked: {}", cells[1]);
    assert_eq!(cells[5], "Never used");
    assert_eq!(cells[7], "—", "no limits");
    assert_eq!(cells[8], "Active");
    assert_eq!(b.usage_text().await?, "1 of 10 active keys");
    assert_eq!(s.ledgers_status(&first).await, StatusCode::OK);

    // Last used appears after a request (flushed now rather than after the interval).
    s.usage.flush().await?;
    b.click("Refresh").await?;
    b.until(
        "last used",
        "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === 'Deploy bot');
         return tr !== undefined && tr.cells[5].textContent !== 'Never used'",
    )
    .await?;

    // Details list every field; rotate with a grace period: the new key is shown once and works,
    // the old one keeps working for the grace period.
    b.open_details("Deploy bot").await?;
    let details = b.text_of("#details-list").await?;
    for field in ["Key id", "Created by", "Rotated", "Account", "Last used"] {
        assert!(details.contains(field), "details lack {field}: {details}");
    }
    assert!(details.contains("The master key"), "{details}");
    b.screenshot("04-details", 1440, 900).await?;
    b.screenshot("04-details", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Rotate").await?;
    let grace = b.field("Grace period").await?;
    grace.select_by_value("900").await?;
    b.screenshot("04-rotate", 1440, 900).await?;
    b.click("Rotate").await?;
    let rotated = b.secret_shown().await?;
    assert_ne!(rotated, first);
    assert_eq!(b.text_of("#secret-title").await?, "Your rotated key");
    b.click("Close").await?;
    assert_eq!(s.ledgers_status(&rotated).await, StatusCode::OK);
    assert_eq!(
        s.ledgers_status(&first).await,
        StatusCode::OK,
        "inside the grace period"
    );
    let after = s.key_named("acme", "Deploy bot").await;
    assert!(after["rotated_at"].is_string());
    assert_ne!(after["masked_key"], listed["masked_key"]);
    let cells = b.row("Deploy bot").await?;
    b.until(
        "the new masked key",
        &format!(
            "return [...document.querySelectorAll('#keys-body td.key')].some(td => td.textContent === {})",
            after["masked_key"]
        ),
    )
    .await?;
    let _ = cells;

    // Its details show what happened to it and how it was used.
    flows::key_activity_and_usage(b, s, &rotated).await?;

    // A name that is markup renders as text and runs nothing.
    b.js("window.__xss = 0; window.alert = () => { window.__xss += 1; }; return true")
        .await?;
    b.click("Create key").await?;
    b.type_into("Name", XSS).await?;
    b.field("Scopes")
        .await?
        .find(Locator::Css("input[value='ledgers:read']"))
        .await?
        .click()
        .await?;
    b.click("Create").await?;
    let xss_key = b.secret_shown().await?;
    b.click("Close").await?;
    let cells = b.row(XSS).await?;
    assert_eq!(cells[0], XSS);
    let inert = b
        .js("return [window.__xss, document.querySelectorAll('img[src=\"x\"]').length, document.querySelectorAll('#keys-body img').length]")
        .await?;
    assert_eq!(inert, json!([0, 0, 0]), "the XSS name ran or became markup");
    assert!(b.client.get_alert_text().await.is_err(), "an alert is open");

    // Revoke through the dialog, which repeats name, masked key and last used.
    b.open_details(XSS).await?;
    b.click("Revoke").await?;
    let summary = b.text_of("#revoke-summary").await?;
    assert!(
        summary.contains(XSS) && summary.contains("Never used"),
        "{summary}"
    );
    let xss_listed = s.key_named("acme", XSS).await;
    assert!(
        summary.contains(xss_listed["masked_key"].as_str().unwrap()),
        "{summary}"
    );
    b.screenshot("05-revoke", 1440, 900).await?;
    b.screenshot("05-revoke", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Revoke").await?;
    b.until(
        "the Revoked status",
        &format!(
            "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === {});
             return tr !== undefined && tr.cells[8].textContent === 'Revoked'",
            json!(XSS)
        ),
    )
    .await?;
    assert_eq!(s.ledgers_status(&xss_key).await, StatusCode::UNAUTHORIZED);
    // The receipt: a lone instance (no fleet) says only that the key is revoked, as text.
    let receipt = b
        .js("const p = document.getElementById('revoke-receipt'); return [p.hidden, p.textContent, p.children.length]")
        .await?;
    assert_eq!(receipt, json!([false, format!("{XSS} revoked."), 0]));
    assert_eq!(b.usage_text().await?, "1 of 10 active keys");
    let inert = b.js("return window.__xss").await?;
    assert_eq!(inert, json!(0));

    // Limits: Edit limits sets a rate limit and credits; the table, the details and the API show
    // them, and the example server enforces them on its record routes.
    // The Create dialog takes them too, under a disclosure.
    b.click("Create key").await?;
    b.type_into("Name", "Metered").await?;
    b.field("Scopes")
        .await?
        .find(Locator::Css("input[value='ledgers:read']"))
        .await?
        .click()
        .await?;
    b.named(&b.scope("summary").await?, "Limits (optional)")
        .await?
        .click()
        .await?;
    b.type_into("Credits", "100").await?;
    b.screenshot("02-create-limits", 1440, 900).await?;
    b.screenshot("02-create-limits", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Create").await?;
    let metered_key = b.secret_shown().await?;
    let metered_key = metered_key.as_str();
    b.click("Close").await?;
    let metered = s.key_named("acme", "Metered").await;
    assert_eq!(metered["rate_limit"], Value::Null);
    assert_eq!(
        metered["credits"],
        json!({"remaining": 100, "refill": null})
    );
    let metered_id = metered["api_key_id"].as_str().unwrap();
    assert_eq!(b.row("Metered").await?[7], "100 credits");
    b.open_details("Metered").await?;
    let details = b.text_of("#details-list").await?;
    assert!(
        details.contains("Rate limit\nNone")
            && details.contains("Credits\n100 remaining; no refill"),
        "{details}"
    );
    b.click("Edit limits").await?;
    b.until(
        "the limits dialog",
        "return document.getElementById('limits-dialog').open",
    )
    .await?;
    assert_eq!(b.text_of("#limits-title").await?, "Edit limits");
    let prefilled = b.field("Credits").await?.prop("value").await?;
    assert_eq!(prefilled.as_deref(), Some("100"));
    // A bad value is refused in words before anything is sent.
    b.type_into("Rate limit", "0").await?;
    b.click("Save").await?;
    b.until(
        "the limits error",
        "return !document.getElementById('limits-error').hidden",
    )
    .await?;
    let error = b.text_of("#limits-error").await?;
    assert!(error.starts_with("Rate limit must be from 1"), "{error}");
    b.type_into("Rate limit", "2").await?;
    b.type_into("Period (seconds)", "60").await?;
    b.type_into("Credits", "870").await?;
    b.field("Refill").await?.select_by_value("monthly").await?;
    b.type_into("Refill amount", "1000").await?;
    b.screenshot("05-limits-edit", 1440, 900).await?;
    b.screenshot("05-limits-edit", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Save").await?;
    b.until(
        "the limits dialog to close",
        "return !document.getElementById('limits-dialog').open && document.getElementById('details-dialog').open",
    )
    .await?;
    let details = b.text_of("#details-list").await?;
    assert!(
        details.contains("Rate limit\n2 requests per 60 seconds"),
        "{details}"
    );
    assert!(
        details.contains("Credits\n870 remaining; set to 1,000 on the 1st of each month"),
        "{details}"
    );
    b.screenshot("05-limits-details", 1440, 900).await?;
    b.screenshot("05-limits-details", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Close").await?;
    assert_eq!(b.row("Metered").await?[7], "2 / 60 s, 870 credits");
    b.screenshot("05-limits-table", 1440, 900).await?;
    b.screenshot("05-limits-table", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    let stored = s
        .call(
            Method::GET,
            &format!("/api-keys/{metered_id}"),
            &s.master,
            None,
        )
        .await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.body);
    assert_eq!(
        stored.body["rate_limit"],
        json!({"limit": 2, "period_seconds": 60})
    );
    assert_eq!(
        stored.body["credits"],
        json!({"remaining": 870, "refill": {"interval": "monthly", "amount": 1000}})
    );
    assert_eq!(s.ledgers_status(metered_key).await, StatusCode::OK);
    assert_eq!(s.ledgers_status(metered_key).await, StatusCode::OK);
    let over = s.call(Method::GET, "/ledgers", metered_key, None).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
    assert_eq!(over.body["error_detail"]["code"], "RATE_LIMITED");
    assert!(over.headers.contains_key("retry-after"));
    // Removing the rate limit (an empty field) sends only that change: the credits stay.
    b.open_details("Metered").await?;
    b.click("Edit limits").await?;
    b.type_into("Rate limit", "").await?;
    b.click("Save").await?;
    b.until(
        "the limits dialog to close",
        "return !document.getElementById('limits-dialog').open",
    )
    .await?;
    b.click("Close").await?;
    b.until(
        "the row without a rate limit",
        "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === 'Metered');
         return tr !== undefined && /^\\d+ credits$/.test(tr.cells[7].textContent)",
    )
    .await?;
    let stored = s
        .call(
            Method::GET,
            &format!("/api-keys/{metered_id}"),
            &s.master,
            None,
        )
        .await;
    assert_eq!(stored.body["rate_limit"], Value::Null);
    // Two requests admitted, the refused one spent nothing; the refill stayed.
    assert_eq!(
        stored.body["credits"],
        json!({"remaining": 868, "refill": {"interval": "monthly", "amount": 1000}})
    );
    assert_eq!(b.row("Metered").await?[7], "868 credits");
    assert_eq!(s.ledgers_status(metered_key).await, StatusCode::OK);

    // Revoked keys stay listed; the toggle hides them.
    b.field("Hide revoked").await?.click().await?;
    b.until(
        "the revoked row to hide",
        &format!("return ![...document.querySelectorAll('#keys-body td.name')].some(td => td.textContent === {})", json!(XSS)),
    )
    .await?;
    b.field("Hide revoked").await?.click().await?;
    b.row(XSS).await?;
    b.screenshot("06-keys", 1440, 900).await?;
    b.screenshot("06-keys", 375, 812).await?;
    b.dark(true).await?;
    b.screenshot("06-keys-dark", 1440, 900).await?;
    b.screenshot("06-keys-dark", 375, 812).await?;
    b.dark(false).await?;
    b.client.set_window_size(1440, 900).await?;

    // A scoped delegating key sees only its owner's keys and is offered no wider scope (nor looser
    // limits than its own: give it a rate limit first).
    let limited = s
        .call(
            Method::PATCH,
            &format!("/api-keys/{}", after["api_key_id"].as_str().unwrap()),
            &s.master,
            Some(json!({"rate_limit": {"limit": 1000, "period_seconds": 60}})),
        )
        .await;
    assert_eq!(limited.status, StatusCode::OK, "{}", limited.body);
    b.sign_out().await?;
    b.sign_in(&rotated).await?;
    let owner = b.field("Owner").await?;
    assert_eq!(owner.prop("value").await?.as_deref(), Some("acme"));
    assert_eq!(owner.prop("readOnly").await?.as_deref(), Some("true"));
    b.row("Deploy bot").await?;
    b.row(XSS).await?;
    // Usage is shown for its own subtree only: itself, not a key the master key made.
    b.until(
        "its own requests",
        "const tr = [...document.querySelectorAll('#keys-body tr')].find(tr => tr.querySelector('td.name').textContent === 'Deploy bot');
         return tr !== undefined && /^\\d/.test(tr.cells[6].textContent)",
    )
    .await?;
    assert_eq!(b.row(XSS).await?[6], "—");
    b.open_details(XSS).await?;
    b.until(
        "the subtree note",
        "return /Only your key and the keys it created/.test(document.getElementById('key-activity-status').textContent)",
    )
    .await?;
    assert_eq!(
        b.js("return document.getElementById('key-activity-error').hidden")
            .await?,
        json!(true)
    );
    b.click("Close").await?;
    let names = b
        .js("return [...document.querySelectorAll('#keys-body td.name')].map(td => td.textContent)")
        .await?;
    assert!(
        !names
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "Globex billing"),
        "another owner's key is listed: {names}"
    );
    b.click("Create key").await?;
    let offered: Vec<String> = serde_json::from_value(
        b.js("return [...document.querySelectorAll('#create-scope-list input')].map(i => i.value)")
            .await?,
    )?;
    assert_eq!(offered, ["ledgers:read", "api-keys:read", "api-keys:write"]);
    let latest = b
        .field("Expires")
        .await?
        .prop("max")
        .await?
        .unwrap_or_default();
    let own_expiry = after["expires_at"].as_str().unwrap();
    assert!(
        !latest.is_empty() && latest.as_str() <= &own_expiry[..10],
        "{latest} vs {own_expiry}"
    );
    b.type_into("Name", "Child of deploy bot").await?;
    b.field("Scopes")
        .await?
        .find(Locator::Css("input[value='ledgers:read']"))
        .await?
        .click()
        .await?;
    b.screenshot("07-scoped-create", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.click("Create").await?;
    let child = b.secret_shown().await?;
    b.click("Close").await?;
    assert_eq!(s.ledgers_status(&child).await, StatusCode::OK);
    let child_info = s.key_named("acme", "Child of deploy bot").await;
    assert_eq!(child_info["created_by"], after["api_key_id"]);
    // It inherited its creator's rate limit.
    assert_eq!(
        child_info["rate_limit"],
        json!({"limit": 1000, "period_seconds": 60})
    );
    // No Delete for a scoped key.
    b.open_details("Child of deploy bot").await?;
    let delete_shown = b
        .js("return !document.getElementById('details-delete').hidden")
        .await?;
    assert_eq!(delete_shown, json!(false));
    // Edit limits states the signed-in key's own bound; a looser limit is the API's to refuse,
    // and the dialog says so in its words and code.
    b.click("Edit limits").await?;
    let own = b.text_of("#limits-own").await?;
    assert!(
        own.contains("no looser than 1,000 requests per 60 seconds"),
        "{own}"
    );
    let rate = b.field("Rate limit").await?;
    assert_eq!(rate.prop("value").await?.as_deref(), Some("1000"));
    b.type_into("Rate limit", "5000").await?;
    b.click("Save").await?;
    b.until(
        "the refusal",
        "return !document.getElementById('limits-error').hidden",
    )
    .await?;
    let refusal = b.text_of("#limits-error").await?;
    assert!(
        refusal.contains("beyond the calling key's") && refusal.contains("AUTH_SCOPE_ESCALATION"),
        "{refusal}"
    );
    b.screenshot("07-scoped-limits", 1440, 900).await?;
    b.screenshot("07-scoped-limits", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    b.type_into("Rate limit", "10").await?;
    b.click("Save").await?;
    b.until(
        "the limits dialog to close",
        "return !document.getElementById('limits-dialog').open",
    )
    .await?;
    assert_eq!(b.row("Child of deploy bot").await?[7], "10 / 60 s");
    let child_info = s.key_named("acme", "Child of deploy bot").await;
    assert_eq!(
        child_info["rate_limit"],
        json!({"limit": 10, "period_seconds": 60})
    );
    b.click("Close").await?;
    b.screenshot("07-scoped", 1440, 900).await?;

    // A 401 (the signed-in key revoked elsewhere) brings the sign-in back, with the reason.
    let revoked = s
        .call(
            Method::DELETE,
            &format!("/api-keys/{}", after["api_key_id"].as_str().unwrap()),
            &s.master,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    b.click("Refresh").await?;
    b.until("the sign-in after a 401", "return !document.getElementById('signin-view').hidden && !document.getElementById('signin-reason').hidden").await?;
    let reason = b.text_of("#signin-reason").await?;
    assert!(
        reason.starts_with("Signed out:") && reason.contains("AUTH_EXPIRED_API_KEY"),
        "{reason}"
    );

    // Delete (master key only) asks to type the key's name. The master key picks the owner
    // from the list.
    b.sign_in(&s.master).await?;
    flows::pick_owner(b, "acme").await?;
    let names = b
        .js("return [...document.querySelectorAll('#keys-body td.name')].map(td => td.textContent)")
        .await?;
    assert!(
        !names
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "Globex billing"),
        "{names}"
    );
    b.open_details(XSS).await?;
    b.click("Delete").await?;
    let confirm = b.button("Delete").await?;
    assert!(
        !confirm.is_enabled().await?,
        "Delete is enabled before the name is typed"
    );
    b.type_into("Type the key's name to confirm", XSS).await?;
    assert!(confirm.is_enabled().await?);
    confirm.click().await?;
    b.until(
        "the deleted row to go",
        &format!("return document.getElementById('delete-dialog').open === false && ![...document.querySelectorAll('#keys-body td.name')].some(td => td.textContent === {})", json!(XSS)),
    )
    .await?;
    assert!(!s.list("acme").await.iter().any(|k| k["name"] == XSS));

    // At the policy's limit, Create is unavailable and says why.
    let active = s
        .list("acme")
        .await
        .iter()
        .filter(|k| k["is_revoked"] == false)
        .count();
    for i in active..10 {
        s.create("acme", &format!("Batch key {i}"), &["ledgers:read"])
            .await;
    }
    b.click("Refresh").await?;
    b.until(
        "Create to be disabled",
        "return document.getElementById('create-open').disabled && !document.getElementById('create-reason').hidden",
    )
    .await?;
    assert_eq!(b.usage_text().await?, "10 of 10 active keys");
    let reason = b.text_of("#create-reason").await?;
    assert!(reason.contains("limit of 10 active keys"), "{reason}");
    let described = b
        .label(&b.client.find(Locator::Id("create-open")).await?)
        .await?;
    assert_eq!(described, "Create key");
    b.screenshot("08-limit", 1440, 900).await?;
    b.screenshot("08-limit", 375, 812).await?;
    b.client.set_window_size(1440, 900).await?;
    let revoke_one = s.key_named("acme", "Batch key 9").await;
    s.call(
        Method::DELETE,
        &format!("/api-keys/{}", revoke_one["api_key_id"].as_str().unwrap()),
        &s.master,
        None,
    )
    .await;
    b.click("Refresh").await?;
    b.until(
        "Create to be enabled",
        "return !document.getElementById('create-open').disabled",
    )
    .await?;

    // Cancel closes a dialog without doing anything.
    b.click("Create key").await?;
    b.click("Cancel").await?;
    b.until(
        "the dialog to close",
        "return !document.getElementById('create-dialog').open",
    )
    .await?;
    assert_eq!(b.usage_text().await?, "9 of 10 active keys");

    // Keyboard: the create dialog opens, fills and closes from the keyboard alone.
    b.button("Create key").await?.send_keys("\u{E007}").await?; // Enter
    b.until(
        "the create dialog",
        "return document.getElementById('create-dialog').open",
    )
    .await?;
    let focused = b.js("return document.activeElement.id").await?;
    assert_eq!(focused, json!("create-name"));
    b.client
        .active_element()
        .await?
        .send_keys("\u{E00C}")
        .await?; // Escape
    b.until(
        "the dialog to close",
        "return !document.getElementById('create-dialog').open",
    )
    .await?;

    // An overview with realistic keys, for the README.
    let production = s
        .create(
            "payments",
            "Production backend",
            &["ledgers:read", "transactions:write"],
        )
        .await;
    let staging = s
        .create(
            "payments",
            "Staging worker",
            &["ledgers:read", "balances:read"],
        )
        .await;
    let partner = s
        .create("payments", "Partner import job", &["transactions:write"])
        .await;
    s.create(
        "payments",
        "Reporting",
        &["ledgers:read", "balances:read", "transactions:read"],
    )
    .await;
    assert_eq!(
        s.ledgers_status(production["key"].as_str().unwrap()).await,
        StatusCode::OK
    );
    s.usage.flush().await?;
    s.call(
        Method::DELETE,
        &format!("/api-keys/{}", partner["api_key_id"].as_str().unwrap()),
        &s.master,
        None,
    )
    .await;
    b.type_into("Owner", "payments").await?;
    b.click("Show keys").await?;
    b.row("Partner import job").await?;
    assert_eq!(b.usage_text().await?, "3 of 10 active keys");
    b.screenshot("09-overview", 1440, 900).await?;
    b.screenshot("09-overview", 375, 812).await?;
    b.dark(true).await?;
    b.screenshot("09-overview-dark", 1440, 900).await?;
    b.dark(false).await?;
    b.client.set_window_size(1440, 900).await?;
    flows::keys_table(b, s, &production, &staging).await?;

    // Paged with the API's cursor: Load more fetches the next page.
    // (Revoked at once: the demo allows 10 active keys per owner; revoked ones stay listed.)
    for i in 0..30 {
        let bulk = s
            .create("bulk", &format!("Bulk key {i:02}"), &["ledgers:read"])
            .await;
        let id = bulk["api_key_id"].as_str().unwrap();
        let revoked = s
            .call(Method::DELETE, &format!("/api-keys/{id}"), &s.master, None)
            .await;
        assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    }
    b.type_into("Owner", "bulk").await?;
    b.click("Show keys").await?;
    b.row("Bulk key 29").await?;
    let rows = b
        .js("return document.querySelectorAll('#keys-body tr').length")
        .await?;
    assert_eq!(rows, json!(25), "one page");
    assert_eq!(b.usage_text().await?, "0 of 10 active keys");
    b.click("Load more").await?;
    b.row("Bulk key 00").await?;
    let rows = b
        .js("return document.querySelectorAll('#keys-body tr').length")
        .await?;
    assert_eq!(rows, json!(30));
    let more = b
        .js("return document.getElementById('load-more').hidden")
        .await?;
    assert_eq!(more, json!(true), "no page after the last");

    // The Webhooks panel, against the contract.
    flows::webhooks(b).await?;

    // A store outage is a message, not a blank page: the store is unavailable, retry.
    outage(b).await?;

    // The contract's names, as a screen reader hears them.
    for name in ["Sign out", "Create key", "Refresh"] {
        b.button(name).await?;
    }
    b.field("Owner").await?;
    let inert = b
        .js("return window.__xss === undefined || window.__xss === 0")
        .await?;
    assert_eq!(inert, json!(true));

    // Nothing went wrong in the page: no script error, no CSP violation (refused answers the
    // journey asked for are logged as failed loads, and are not errors of the page).
    let logs = b
        .session(
            http::Method::POST,
            "se/log",
            Some(json!({"type": "browser"})),
        )
        .await?;
    eprintln!(
        "browser log entries: {}",
        logs.as_array().map_or(0, Vec::len)
    );
    let errors: Vec<&Value> = logs
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| {
                    e["level"] == "SEVERE"
                        || e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("Content Security Policy"))
                })
                .filter(|e| {
                    !e["message"].as_str().is_some_and(|m| {
                        m.contains("Failed to load resource: the server responded with a status of")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    Ok(())
}

/// The console in front of a key store that fails: the page says the store is unavailable and to
/// retry, and recovers on Refresh.
async fn outage(b: &Browser) -> Outcome {
    use std::sync::atomic::Ordering;
    use tower_api_keys::key::ApiKey;
    use tower_api_keys::layer::ApiKeyLayer;
    use tower_api_keys::manage::{self, KeyManager, console::Console};
    use tower_api_keys::resolver::CachedResolver;

    let store = common::TestStore::new();
    let resolver = CachedResolver::new(store.clone());
    let app = axum::Router::new()
        .merge(manage::router(KeyManager::new(resolver.clone())))
        .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new(common::MASTER)))
        .nest("/keys", Console::new().router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(axum::serve(listener, app).into_future());

    b.client.goto(&format!("{base}/keys")).await?;
    b.sign_in(common::MASTER).await?;
    store.failing.store(true, Ordering::SeqCst);
    b.type_into("Owner", "acme").await?;
    b.click("Show keys").await?;
    b.until(
        "the outage banner",
        "return !document.getElementById('banner').hidden",
    )
    .await?;
    let banner = b.text_of("#banner").await?;
    assert!(
        banner.contains("key store is unavailable")
            && banner.contains("retry")
            && banner.contains("AUTH_UNAVAILABLE"),
        "{banner}"
    );
    b.screenshot("10-outage", 1440, 900).await?;
    store.failing.store(false, Ordering::SeqCst);
    b.click("Refresh").await?;
    b.until(
        "the banner to go",
        "return document.getElementById('banner').hidden",
    )
    .await?;
    assert_eq!(b.usage_text().await?, "0 active keys");
    Ok(())
}
