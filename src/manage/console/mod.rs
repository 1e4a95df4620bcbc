//! The key console: a web page, embedded in the crate, where people manage keys through the
//! [management API](super::router) of the same service (feature `console`).
//!
//! [`Console::router`] serves the page at a mount point of your choosing. Nest it **outside**
//! [`ApiKeyLayer`](crate::layer::ApiKeyLayer), since the page itself loads without a key: the person
//! using it pastes a key (the master key, or a scoped key with `api-keys:read` or `api-keys:write`),
//! which the page keeps in memory only and sends to the management API in the
//! [`key_header`](Console::key_header) on every call. The page asks only its own origin, with URLs
//! relative to where it is mounted, so it works behind a reverse proxy that adds a path prefix.
//!
//! Every response carries a strict `Content-Security-Policy` (no inline script or style, no other
//! origin, `frame-ancestors 'none'`), `X-Frame-Options: DENY` (the same refusal to be framed, for
//! browsers that predate CSP's `frame-ancestors`: no clickjacking of the revoke button),
//! `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and `Cache-Control: no-store`. Everything the page loads weighs under 150 KB, uncompressed.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use axum::Router;
//! use axum::body::Body;
//! use axum::http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_api_keys::manage::{self, KeyManager, console::Console};
//! use tower_api_keys::key::ApiKey;
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! let store = Arc::new(MemoryStore::new());
//! let resolver = CachedResolver::new(store.clone());
//! let console = Console::new()
//!     .title("Ledger API keys")
//!     .scope("ledgers:read".parse()?, "View ledgers")
//!     .scope("ledgers:write".parse()?, "Create ledgers");
//! let app: Router = Router::new()
//!     .merge(manage::router(KeyManager::new(store, resolver.clone())))
//!     .layer(ApiKeyLayer::new(resolver).master_key(ApiKey::new("a-long-master-key-from-config")))
//!     // Outside the key layer: the page loads without a key.
//!     .nest("/console", console.router());
//!
//! let page = app
//!     .oneshot(Request::get("/console").body(Body::empty())?)
//!     .await?;
//! assert_eq!(page.status(), StatusCode::OK);
//! assert!(page.headers()["content-security-policy"]
//!     .to_str()?
//!     .starts_with("default-src 'none'"));
//! assert_eq!(page.headers()["x-frame-options"], "DENY");
//! # Ok(())
//! # }
//! ```
//!
//! What the page needs from the API beyond the key operations comes from read-only endpoints of
//! [`router`](super::router): `GET /api-keys/self` (who the signed-in key is),
//! `GET /api-keys/policy?owner=` (the lifetime policy and the owner's active keys against the
//! limit), `GET /api-keys/owners` (the owners the master key picks from), `GET /api-keys/usage`
//! (each key's requests over 7 days, the table's "Requests (7 d)" column), and a key's or an
//! owner's events and usage (`GET /api-keys/{id}/events`, `GET /api-keys/{id}/usage`,
//! `GET /api-keys/events`). Where the service has webhook routes (`/api-keys/webhooks`), the
//! page has a Webhooks panel; where they answer 404, it has none.
//!
//! The page is plain HTML, CSS and JavaScript modules (`console.js` imports the others: `api.js`,
//! `dom.js`, `keys.js`, `dialogs.js`, `limits.js`, `activity.js`, `usage.js`, `chart.js`,
//! `webhooks.js`); the usage chart is SVG the page draws itself, with a table of the same numbers
//! beside it. Every string from the API is rendered as text.

use axum::Router;
use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::scope::Scope;

/// The `Content-Security-Policy` of every console response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file of the page, served beneath the mount point under its name.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

/// `include_str!`s a file of `assets/` with its media type.
macro_rules! asset {
    ($name:literal, $media_type:expr) => {
        Asset {
            name: $name,
            media_type: $media_type,
            body: include_str!(concat!("assets/", $name)),
        }
    };
}

/// The page (served at the mount point itself, see [`index`]).
const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");

/// Everything else the page loads: its style, its icon, and its script, `console.js`, an ES
/// module importing the others (all under `script-src 'self'`).
const ASSETS: &[Asset] = &[
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("console.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("limits.js", JS),
    asset!("keys.js", JS),
    asset!("dialogs.js", JS),
    asset!("activity.js", JS),
    asset!("usage.js", JS),
    asset!("chart.js", JS),
    asset!("webhooks.js", JS),
];

/// Budget for everything the page loads, `config.json` included: 150 KB, uncompressed.
pub const PAGE_WEIGHT_BUDGET: usize = 150 * 1000;

/// A scope the service declares, offered in the console's create form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct DeclaredScope {
    scope: Scope,
    description: String,
}

/// Builds the console's router. See the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct Console {
    title: String,
    scopes: Vec<DeclaredScope>,
    key_header: HeaderName,
    api_prefix: String,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

/// What the page reads from `config.json` next to it.
#[derive(Serialize)]
struct PageConfig<'a> {
    title: &'a str,
    /// The service root, relative to the page (`../` for a console nested at `/console`).
    api_base: String,
    key_header: &'a str,
    scopes: &'a [DeclaredScope],
}

impl Console {
    /// A console titled "API keys", with no declared scopes (the create form then takes scopes as
    /// text, checked against the scope grammar), sending the key in `X-Api-Key`, for the
    /// management API merged at the service's root.
    pub fn new() -> Self {
        Self {
            title: "API keys".into(),
            scopes: Vec::new(),
            key_header: HeaderName::from_static("x-api-key"),
            api_prefix: String::new(),
        }
    }

    /// The page's heading and title (default "API keys").
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Declares a scope the service's routes require, with a short description. The create form
    /// offers the declared scopes (those the signed-in key covers) as choices, in this order.
    /// Declaring a scope twice replaces its description.
    pub fn scope(mut self, scope: Scope, description: impl Into<String>) -> Self {
        let description = description.into();
        match self.scopes.iter_mut().find(|d| d.scope == scope) {
            Some(declared) => declared.description = description,
            None => self.scopes.push(DeclaredScope { scope, description }),
        }
        self
    }

    /// Declares several scopes at once; see [`scope`](Self::scope).
    pub fn scopes<I, D>(self, scopes: I) -> Self
    where
        I: IntoIterator<Item = (Scope, D)>,
        D: Into<String>,
    {
        scopes
            .into_iter()
            .fold(self, |console, (scope, description)| {
                console.scope(scope, description)
            })
    }

    /// The header the page sends the key in (default `x-api-key`). It must be one of the
    /// [`KeySource`](crate::layer::KeySource)s of the layer in front of the management API; for
    /// `authorization`, the page sends `Bearer <key>`.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// Where [`router`](super::router) is nested in the service, e.g. `/admin` when its routes
    /// answer at `/admin/api-keys` (default: merged at the root).
    pub fn api_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        self.api_prefix = prefix.trim_matches('/').to_owned();
        self
    }

    /// The router serving the console: nest it where the page should live (`.nest("/console",
    /// console.router())`), outside the key layer. The page is at the mount point (`/console`), its
    /// files beneath it (`/console/console.js`).
    pub fn router(self) -> Router {
        let console = std::sync::Arc::new(self);
        let config = move |OriginalUri(original): OriginalUri, uri: Uri| {
            let console = console.clone();
            async move {
                let body = serde_json::to_string(&PageConfig {
                    title: &console.title,
                    api_base: api_base(original.path(), uri.path(), &console.api_prefix),
                    key_header: console.key_header.as_str(),
                    scopes: &console.scopes,
                })
                .unwrap_or_else(|_| "{}".to_owned());
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        };
        let mut router = Router::new()
            .route("/", get(index))
            .route("/config.json", get(config));
        for asset in ASSETS {
            let (media_type, body) = (asset.media_type, asset.body);
            router = router.route(
                &format!("/{}", asset.name),
                get(move || async move { ([(header::CONTENT_TYPE, media_type)], body) }),
            );
        }
        router
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
            .layer(middleware::from_fn(security_headers))
    }
}

/// The page. Nested at `/console`, it answers at `/console` (axum does not route `/console/` into
/// a nested router), so its files are named relative to the mount point's last segment
/// (`console/console.js`): relative URLs keep working behind a proxy that adds a path prefix.
async fn index(OriginalUri(original): OriginalUri) -> Response {
    let path = original.path();
    let base = match path.rsplit('/').next() {
        Some(last) if !last.is_empty() => format!("{last}/"),
        _ => String::new(),
    };
    // A URI path holds no `"`, `<` or `>`; `&` is the one character to escape in an attribute.
    let base = base.replace('&', "&amp;");
    (
        [(header::CONTENT_TYPE, INDEX.media_type)],
        INDEX.body.replace("%BASE%", &base),
    )
        .into_response()
}

/// The service root relative to the console's files (`/console/console.js`): one `../` per segment
/// of the mount point (the part of the original path the nesting router stripped), then the API's
/// prefix.
fn api_base(original_path: &str, inner_path: &str, api_prefix: &str) -> String {
    let mount = original_path
        .strip_suffix(inner_path)
        .unwrap_or(original_path);
    let depth = mount.split('/').filter(|s| !s.is_empty()).count();
    let mut base = if depth == 0 {
        "./".to_owned()
    } else {
        "../".repeat(depth)
    };
    if !api_prefix.is_empty() {
        base.push_str(api_prefix);
        base.push('/');
    }
    base
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    // CSP `frame-ancestors 'none'` says the same to current browsers; this is for older ones.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    use super::*;

    async fn get(app: &Router, path: &str) -> Response {
        app.clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn declared() -> Console {
        Console::new()
            .title("Demo")
            .scope("ledgers:read".parse().unwrap(), "View ledgers")
            .scope("ledgers:write".parse().unwrap(), "Create ledgers")
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers() {
        let app = Router::new().nest("/console", declared().router());
        for path in [
            "/console",
            "/console/console.js",
            "/console/chart.js",
            "/console/console.css",
            "/console/icon.svg",
            "/console/config.json",
            "/console/nothing-here",
        ] {
            let response = get(&app, path).await;
            let headers = response.headers();
            assert_eq!(
                headers["content-security-policy"], CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
            assert_eq!(headers["x-frame-options"], "DENY", "{path}");
            assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
            assert_eq!(headers["cache-control"], "no-store", "{path}");
        }
    }

    async fn text(response: Response) -> String {
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_page_names_its_files_relative_to_the_mount_point() {
        let app = Router::new().nest("/admin/console", Console::new().router());
        let page = get(&app, "/admin/console").await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
        let html = text(page).await;
        assert!(
            html.contains(r#"<script type="module" src="console/console.js">"#),
            "{html}"
        );
        assert!(html.contains(r#"href="console/console.css""#));
        assert!(!html.contains("%BASE%"));

        let merged = text(get(&Console::new().router(), "/").await).await;
        assert!(merged.contains(r#"<script type="module" src="console.js">"#));
    }

    #[tokio::test]
    async fn assets_have_their_media_types() {
        let app = Router::new().nest("/console", Console::new().router());
        for (path, media_type) in [
            ("/console/console.js", "text/javascript; charset=utf-8"),
            ("/console/webhooks.js", "text/javascript; charset=utf-8"),
            ("/console/console.css", "text/css; charset=utf-8"),
            ("/console/icon.svg", "image/svg+xml"),
            ("/console/config.json", "application/json"),
        ] {
            let response = get(&app, path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(response.headers()["content-type"], media_type, "{path}");
        }
        assert_eq!(
            get(&app, "/console/x.js").await.status(),
            StatusCode::NOT_FOUND
        );
    }

    async fn config(app: &Router, path: &str) -> serde_json::Value {
        let response = get(app, path).await;
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn config_points_at_the_service_root_relative_to_the_page() {
        let nested = Router::new().nest("/console", declared().router());
        let config_json = config(&nested, "/console/config.json").await;
        assert_eq!(config_json["api_base"], "../");
        assert_eq!(config_json["title"], "Demo");
        assert_eq!(config_json["key_header"], "x-api-key");
        assert_eq!(
            config_json["scopes"],
            serde_json::json!([
                {"scope": "ledgers:read", "description": "View ledgers"},
                {"scope": "ledgers:write", "description": "Create ledgers"},
            ])
        );

        let deep = Router::new().nest("/ops/keys", Console::new().api_prefix("/admin/").router());
        assert_eq!(
            config(&deep, "/ops/keys/config.json").await["api_base"],
            "../../admin/"
        );

        let merged = Console::new().router();
        assert_eq!(config(&merged, "/config.json").await["api_base"], "./");
    }

    #[test]
    fn declaring_a_scope_twice_keeps_one_entry() {
        let console = declared().scope("ledgers:read".parse().unwrap(), "Read ledgers");
        assert_eq!(console.scopes.len(), 2);
        assert_eq!(console.scopes[0].description, "Read ledgers");
    }

    #[tokio::test]
    async fn the_page_weighs_under_its_budget() {
        let app = Router::new().nest("/console", declared().router());
        let mut total = 0;
        let paths = ["/console".to_owned(), "/console/config.json".to_owned()]
            .into_iter()
            .chain(ASSETS.iter().map(|a| format!("/console/{}", a.name)));
        for path in paths {
            let body = to_bytes(get(&app, &path).await.into_body(), 1 << 20)
                .await
                .unwrap();
            assert!(!body.is_empty(), "{path}");
            total += body.len();
        }
        assert!(
            total <= PAGE_WEIGHT_BUDGET,
            "the console weighs {total} bytes, over its {PAGE_WEIGHT_BUDGET}-byte budget"
        );
    }

    #[test]
    fn the_page_loads_only_its_own_files_and_runs_no_inline_code() {
        let html = INDEX.body;
        // Every URL the page names is one of the console's own files, relative.
        for attribute in ["src=\"", "href=\""] {
            for (i, _) in html.match_indices(attribute) {
                let rest = &html[i + attribute.len()..];
                let url = rest[..rest.find('"').unwrap()].trim_start_matches("%BASE%");
                if url.starts_with('#') {
                    continue;
                }
                assert!(
                    ASSETS.iter().any(|a| a.name == url),
                    "the page loads {url}, which the console does not serve"
                );
            }
        }
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains(" style="), "inline style attribute");
        for (i, _) in html.match_indices(" on") {
            let name: String = html[i + 3..]
                .chars()
                .take_while(char::is_ascii_lowercase)
                .collect();
            assert!(
                !html[i + 3 + name.len()..].starts_with('='),
                "inline event handler on{name}"
            );
        }
        for asset in ASSETS.iter().filter(|a| a.media_type == JS) {
            scripts_are_safe(asset);
        }
    }

    /// A module uses no HTML parsing, no code from strings, no storage, and imports only the
    /// console's own modules, relatively.
    fn scripts_are_safe(asset: &Asset) {
        let js = asset.body;
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "eval(",
            "new Function",
            "document.write",
            "localStorage",
            "sessionStorage",
            "document.cookie",
        ] {
            assert!(!js.contains(forbidden), "{} uses {forbidden}", asset.name);
        }
        let imports = js.lines().filter(|line| {
            let line = line.trim_start();
            line.starts_with("import ") || line.starts_with("} from ")
        });
        for line in imports {
            let Some(i) = line.find(" from \"") else {
                continue;
            };
            let rest = &line[i + 7..];
            let target = &rest[..rest.find('"').unwrap()];
            let name = target
                .strip_prefix("./")
                .unwrap_or_else(|| panic!("{} imports {target}: only ./ modules", asset.name));
            assert!(
                ASSETS.iter().any(|a| a.name == name && a.media_type == JS),
                "{} imports {name}, which the console does not serve",
                asset.name
            );
        }
    }

    #[test]
    fn no_module_imports_the_entry_point() {
        for asset in ASSETS.iter().filter(|a| a.media_type == JS) {
            assert!(
                !asset.body.contains("from \"./console.js\""),
                "{} imports console.js",
                asset.name
            );
        }
    }
}
