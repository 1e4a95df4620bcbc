//! Provenance stamping: record which key created a record (`BLNK_GENERATED_BY`).
//!
//! [`ProvenanceLayer`] is a layer for the routes that create records. On a POST made with a scoped key, it
//! merges the key id into the JSON body's metadata object before the handler sees the body, and
//! refuses a body it cannot stamp:
//!
//! ```
//! use axum::{Json, Router, body::Body, routing::post};
//! use http::Request;
//! use serde_json::Value;
//! use tower::ServiceExt;
//! use tower_api_keys::guard::RequireScopesLayer;
//! use tower_api_keys::layer::ApiKeyLayer;
//! use tower_api_keys::provenance::ProvenanceLayer;
//! use tower_api_keys::resolver::CachedResolver;
//! use tower_api_keys::store::MemoryStore;
//!
//! async fn create_ledger(Json(ledger): Json<Value>) -> String {
//!     // A real handler stores the ledger, metadata and all; this one says who created it.
//!     ledger["meta_data"]["BLNK_GENERATED_BY"].to_string()
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! # let (key, key_id) = issue(&store, "ledgers:write").await;
//! let app = Router::new()
//!     .route("/ledgers", post(create_ledger))
//!     .route_layer(ProvenanceLayer::new())
//!     .route_layer(RequireScopesLayer::all(["ledgers:write"]))
//!     .layer(ApiKeyLayer::new(CachedResolver::new(store)));
//!
//! let request = Request::post("/ledgers")
//!     .header("x-api-key", key.expose_secret())
//!     .header("content-type", "application/json")
//!     .body(Body::from(r#"{"name": "cash", "meta_data": {"region": "eu"}}"#))
//!     .unwrap();
//! let response = app.clone().oneshot(request).await.unwrap();
//! let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
//! assert_eq!(body, format!("\"{key_id}\""));
//!
//! // A body the layer cannot stamp is refused, not passed on for the handler to misread.
//! let request = Request::post("/ledgers")
//!     .header("x-api-key", key.expose_secret())
//!     .header("content-type", "text/plain")
//!     .body(Body::from(r#"{"meta_data": {"BLNK_GENERATED_BY": "forged"}}"#))
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 415); // REQUEST_UNSUPPORTED_MEDIA_TYPE
//! # }
//! # async fn issue(store: &MemoryStore, scopes: &str) -> (tower_api_keys::key::ApiKey, tower_api_keys::key::KeyId) {
//! #     use tower_api_keys::{key::{KeyFormat, KeyId}, store::{KeyRecord, KeyStore, KeyLimits}};
//! #     let format = KeyFormat::default();
//! #     let key = format.generate();
//! #     let now = time::OffsetDateTime::now_utc();
//! #     let record = KeyRecord {
//! #         id: KeyId::generate(), name: "docs".into(), owner: "team".into(), account: "acct".into(),
//! #         scopes: scopes.parse().unwrap(), digest: key.digest(), digest_scheme: Default::default(),
//! #         masked_key: format.mask(&key).unwrap(), created_at: now, expires_at: None,
//! #         revoked_at: None, last_used_at: None, created_by: None, rotated_at: None, previous: None,
//! #         limits: Default::default(), allowed_networks: None,
//! #     };
//! #     store.insert(&record, KeyLimits::default(), now).await.unwrap();
//! #     (key, record.id)
//! # }
//! ```
//!
//! Order the route layers so the guard runs first (the last `route_layer` is the outermost): a
//! request without the scope is refused before its body is read.
//!
//! ## What is stamped
//!
//! | request | what happens |
//! |---|---|
//! | POST (see [`methods`](ProvenanceLayer::methods)) with a scoped key, JSON object body | `meta_data.BLNK_GENERATED_BY` set to the key id |
//! | `meta_data` missing or `null` | becomes `{"BLNK_GENERATED_BY": "<key id>"}` |
//! | `meta_data` holds `BLNK_GENERATED_BY` already (once or more) | the first one's value is replaced, the others removed: the client cannot forge it |
//! | `meta_data` is a string, number, array or boolean | 400 `REQUEST_INVALID_METADATA` ([`AuthError::InvalidMetadata`]) |
//! | a second `meta_data` member, or one that is `meta_data` only under case folding (`META_DATA`) | 400 `REQUEST_AMBIGUOUS_METADATA` ([`AuthError::AmbiguousMetadata`]), see [below](#ambiguous-bodies) |
//! | a `BLNK_GENERATED_BY` member in any case anywhere but directly in the top-level `meta_data` object | 400 `REQUEST_AMBIGUOUS_METADATA` |
//! | body over [`max_body_bytes`](ProvenanceLayer::max_body_bytes) (2 MiB by default) | 413 `REQUEST_BODY_TOO_LARGE` ([`AuthError::PayloadTooLarge`]) |
//! | a body the layer cannot stamp (next table) | 415 `REQUEST_UNSUPPORTED_MEDIA_TYPE` ([`AuthError::UnsupportedMediaType`]), unless [`pass_through_unstampable`](ProvenanceLayer::pass_through_unstampable) |
//! | an empty body | passed on as it is: it can carry no stamp, forged or not |
//! | master key, no principal, other methods | untouched: the body is not read, nothing is refused |
//!
//! Everything outside the one inserted member is kept byte for byte: numbers are never converted
//! (`12345678901234567890123`, `1e400` and `0.1000000000000000055511151231257827` arrive as sent),
//! and key order, whitespace, string escapes and the rest of the metadata are unchanged. The body is
//! checked against the JSON grammar by a small scanner that never builds a tree and never recurses,
//! so deeply nested input costs linear time and cannot overflow the stack. Keys are compared after
//! unescaping, as parsers do, so `"meta\u005fdata"` is `meta_data`.
//!
//! ## Ambiguous bodies
//!
//! JSON readers do not agree on which member a name selects. serde_json matches names exactly
//! (a `Value` keeps the last duplicate, a derived struct refuses duplicates); Go's
//! `encoding/json`, which Blnk runs, matches struct fields exactly or else case-insensitively and
//! decodes every matching member in order, so the later one wins. A body stamped for one reader
//! could then carry a forged stamp for the other: `{"meta_data": {"a": 1}, "META_DATA":
//! {"BLNK_GENERATED_BY": "forged"}}`. So, for the bodies it stamps, the layer refuses with 400
//! `REQUEST_AMBIGUOUS_METADATA` ([`AuthError::AmbiguousMetadata`], the message gives the byte
//! offset of the member):
//!
//! - **the metadata field more than once**: the top-level object has two or more members equal to
//!   the metadata field under case folding (`meta_data` twice, or `meta_data` and `Meta_Data`),
//!   or its one such member is not spelt exactly (a lone `META_DATA`: the layer would add
//!   `meta_data` beside it, and the stored record would hold both);
//! - **the stamp field anywhere the layer does not write it**: any member of any object, at any
//!   depth, equal to the stamp field under case folding, except members named exactly
//!   `BLNK_GENERATED_BY` directly inside the top-level `meta_data` object (those the layer
//!   overwrites: the first gets the key id, the others are removed). "Anywhere" is the whole
//!   body because handlers store nested objects as records of their own (Blnk's bulk
//!   transactions, a batch array's elements, an embedded sub-record's `meta_data`), and each of
//!   those would keep a forged stamp the layer never wrote. Member *values* are not looked at: a
//!   string `"BLNK_GENERATED_BY"` is data.
//!
//! Case folding here is Go's: ASCII letters, plus `K` (U+212A KELVIN SIGN) and `ſ` (U+017F LONG
//! S), which Go folds onto `K` and `S`; non-ASCII field names fold per character to upper case.
//! Whatever body passes the layer, an exact reader and a case-insensitive one both find one
//! metadata object and in it one stamp, the layer's (`tests/provenance.rs` checks this with both
//! readers over random framings and forgeries). The check runs in the same single pass as the
//! scan; a key whose length cannot match costs one comparison.
//!
//! A stamped request gets a `Content-Length` matching its new body and loses `Transfer-Encoding`.
//! The body is read through a length limit, so a chunked body is refused as soon as it grows past the
//! limit, and a `Content-Length` over the limit is refused without reading. A body that fails
//! while being read (the client went away) is answered with 400 [`AuthError::InvalidRequest`].
//!
//! ## Bodies it cannot stamp are refused
//!
//! The promise is end to end: a record created with a scoped key carries exactly that key's id,
//! whatever the request looked like. A body the layer passed on unstamped could still be read by the
//! handler (or a layer after this one) and stored with a forged stamp, so on the routes and methods
//! it stamps, for scoped keys, the layer refuses every body it cannot stamp, judging the headers
//! before reading anything:
//!
//! | the request has | refused because |
//! |---|---|
//! | two or more `Content-Type` headers | components disagree about which one counts (axum reads the first) |
//! | a `Content-Type` other than `application/json` or `application/<name>+json` (any case, optional whitespace; its one allowed parameter is `charset=utf-8`, quoted or not) | a handler that reads JSON out of `text/plain`, a form, or a UTF-16 body would store bytes the layer never stamped |
//! | no `Content-Type`, and a body that is not empty | a handler may sniff it as JSON |
//! | a `Content-Encoding` other than one `identity` (`gzip` in any case, a list, an empty value, two headers) | the layer does not decode; whatever decodes later reads unstamped bytes |
//! | a `Transfer-Encoding` other than one `chunked` | a coding the server did not remove (`gzip, chunked`) leaves encoded bytes |
//! | a JSON media type, but not a UTF-8 JSON object: invalid JSON, trailing data, an array or a scalar, a byte order mark, invalid UTF-8 | lenient parsers (trailing commas, BOM skipping, batch arrays) would find a forged stamp in it |
//!
//! The scanner accepts everything `serde_json` accepts (a property test checks this against random
//! edits of random documents), so no JSON object a `serde_json`-based handler reads is refused. The
//! master key's requests are never refused here: it is not stamped, so its bodies are not read.
//!
//! [`pass_through_unstampable(true)`](ProvenanceLayer::pass_through_unstampable) turns the refusal off
//! for a route: such bodies then reach the handler untouched (and a JSON object without
//! `Content-Type` is still stamped). Read its warning first.
//!
//! ## Compressed request bodies
//!
//! To accept compressed bodies, decompress them *outside* this layer, for example with tower-http's
//! `RequestDecompressionLayer` as a later `route_layer` (or a `layer`) than `ProvenanceLayer`:
//!
//! ```
//! # use axum::{Router, routing::post};
//! # use tower_api_keys::layer::ApiKeyLayer;
//! # use tower_api_keys::provenance::ProvenanceLayer;
//! # use tower_api_keys::resolver::CachedResolver;
//! # use tower_api_keys::store::MemoryStore;
//! use tower_http::decompression::RequestDecompressionLayer;
//!
//! # async fn create_ledger(body: String) -> String { body }
//! let app: Router = Router::new()
//!     .route("/ledgers", post(create_ledger))
//!     .route_layer(ProvenanceLayer::new())
//!     .route_layer(RequestDecompressionLayer::new()) // runs first: decodes, then stamping
//!     .layer(ApiKeyLayer::new(CachedResolver::new(MemoryStore::new())));
//! ```
//!
//! tower-http decodes a body whose first `Content-Encoding` value is exactly one it supports
//! (`gzip`, `deflate`, `br`, `zstd`, as its features enable) and removes the `Content-Encoding`
//! headers (all of them) and `Content-Length`: this layer then sees plain JSON and stamps it. For any
//! other encoding tower-http answers 415 itself, or, with its `pass_through_unaccepted(true)`,
//! passes the body on still encoded, and this layer refuses it. A body encoded twice under two
//! `Content-Encoding` headers is decoded once, reaches this layer still encoded, and is refused.
//! Decompression *inside* this layer (or in the handler) comes too late: the layer sees an encoded
//! body and refuses it. `tests/provenance.rs` checks each of these.
//!
//! The layer needs the [`Principal`], so it goes inside [`ApiKeyLayer`](crate::layer::ApiKeyLayer). A
//! stamped request costs one boxed future and one pass over the body (a fraction of what
//! `Json<serde_json::Value>` then spends parsing it); requests that are not stamped go straight to
//! the inner service, unboxed and unbuffered.
//!
//! ## Stamping in the handler
//!
//! The [`Principal`] is in the request extensions too, so handlers of other formats (forms, protobuf,
//! multipart) can record the creator themselves, on routes without `ProvenanceLayer` (which refuses such
//! bodies); [`Principal::provenance_id`] is `None` for the master key, which is never recorded as a
//! creator:
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_api_keys::principal::Principal;
//!
//! async fn upload(principal: Principal, body: axum::body::Bytes) -> String {
//!     let created_by = principal.provenance_id().map(|id| id.as_str().to_owned());
//!     format!("stored {} bytes, created by {created_by:?}", body.len())
//! }
//!
//! let app: Router = Router::new().route("/uploads", post(upload));
//! ```
//!
//! [`ProvenanceLayer::stamp`] applies the same rules to a body you already hold.
//!
//! ## Body types
//!
//! The inner service receives the request body type the layer received, stamped bodies being built
//! with `From<Bytes>`: axum's `Body` works as is (including with `Router::route_layer`). For other
//! body types, such as hyper's `Incoming`, wrap the body in [`ProvenanceBody`] first.

mod body;
pub mod future;
mod scan;
mod service;
mod stamp;
mod strings;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::Method;

pub use body::ProvenanceBody;
pub use service::ProvenanceService;

use crate::error::{AuthError, JsonRejection};
use crate::key::KeyId;
#[cfg(doc)]
use crate::principal::Principal;
use stamp::Fields;

/// The default metadata field: `meta_data`.
pub const DEFAULT_METADATA_FIELD: &str = "meta_data";
/// The default stamp field: `BLNK_GENERATED_BY`.
pub const DEFAULT_STAMP_FIELD: &str = "BLNK_GENERATED_BY";
/// The default body limit: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Layer that stamps the creating key's id into JSON bodies. See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct ProvenanceLayer<R = JsonRejection> {
    config: Arc<Config>,
    rejection: R,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) fields: Fields,
    pub(crate) max_body_bytes: usize,
    pub(crate) pass_through_unstampable: bool,
}

impl<R> fmt::Debug for ProvenanceLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvenanceLayer")
            .field("methods", &self.config.methods)
            .field("metadata_field", &self.config.fields.meta)
            .field("stamp_field", &self.config.fields.stamp)
            .field("max_body_bytes", &self.config.max_body_bytes)
            .field(
                "pass_through_unstampable",
                &self.config.pass_through_unstampable,
            )
            .finish_non_exhaustive()
    }
}

impl Default for ProvenanceLayer {
    fn default() -> Self {
        Self {
            config: Arc::new(Config {
                methods: vec![Method::POST],
                fields: Fields::new(DEFAULT_METADATA_FIELD, DEFAULT_STAMP_FIELD),
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                pass_through_unstampable: false,
            }),
            rejection: JsonRejection::default(),
        }
    }
}

impl ProvenanceLayer {
    /// Stamps POST bodies into `meta_data.BLNK_GENERATED_BY`, reading at most 2 MiB.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<R> ProvenanceLayer<R> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The methods whose requests are stamped (replaces the default, POST).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config_mut().methods = methods.into_iter().collect();
        self
    }

    /// The top-level member holding the metadata object (default `meta_data`).
    pub fn metadata_field(mut self, name: impl AsRef<str>) -> Self {
        let stamp = self.config.fields.stamp.clone();
        self.config_mut().fields = Fields::new(name.as_ref(), &stamp);
        self
    }

    /// The member of the metadata object that records the key id (default `BLNK_GENERATED_BY`).
    pub fn stamp_field(mut self, name: impl AsRef<str>) -> Self {
        let meta = self.config.fields.meta.clone();
        self.config_mut().fields = Fields::new(&meta, name.as_ref());
        self
    }

    /// The largest body the layer reads, in bytes (default 2 MiB); larger bodies get a 413.
    ///
    /// Stamping makes a body longer (under 100 bytes with the default field names), so give the
    /// handler's own limit that headroom: axum's `DefaultBodyLimit` is also 2 MiB by default.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.config_mut().max_body_bytes = limit;
        self
    }

    /// Passes bodies the layer cannot stamp to the inner service unread and unstamped, instead of
    /// refusing them with 415 `REQUEST_UNSUPPORTED_MEDIA_TYPE` (the default, `false`).
    ///
    /// # Danger
    ///
    /// With this on, a scoped key can forge the stamp. The layer cannot tell what the handler will
    /// make of a body it could not stamp: a handler that parses JSON out of a `text/plain` or form
    /// body, decompresses a `Content-Encoding: gzip` body itself, reads the second of two
    /// `Content-Type` headers, or accepts a JSON array, stores whatever `BLNK_GENERATED_BY` the
    /// client wrote. Turn it on only for routes whose handler refuses such bodies itself (axum's
    /// `Json` extractor refuses a non-JSON media type, but not an encoded body, and any JSON value
    /// when asked for one) or records the creator itself from the [`Principal`].
    pub fn pass_through_unstampable(mut self, pass_through: bool) -> Self {
        self.config_mut().pass_through_unstampable = pass_through;
        self
    }

    /// Renders refusals with `rejection` instead of [`JsonRejection`]. Any
    /// `Fn(&AuthError) -> Response<B>` works.
    pub fn rejection<R2>(self, rejection: R2) -> ProvenanceLayer<R2> {
        ProvenanceLayer {
            config: self.config,
            rejection,
        }
    }

    /// Stamps `body` with `key_id` by this layer's rules, for bodies you hold yourself.
    ///
    /// Returns `Ok(Some(stamped))` for a JSON object, `Ok(None)` when `body` is not a UTF-8 JSON
    /// object (nothing to stamp: the layer refuses such a body with 415), and
    /// [`AuthError::InvalidMetadata`] when the metadata field holds something other than an object
    /// or null.
    ///
    /// ```
    /// use tower_api_keys::key::KeyId;
    /// use tower_api_keys::provenance::ProvenanceLayer;
    ///
    /// let stamped = ProvenanceLayer::new()
    ///     .stamp(br#"{"amount": 12345678901234567890123}"#, &KeyId::new("key_1"))
    ///     .unwrap()
    ///     .unwrap();
    /// assert_eq!(
    ///     stamped,
    ///     br#"{"amount": 12345678901234567890123,"meta_data":{"BLNK_GENERATED_BY":"key_1"}}"#
    /// );
    /// assert_eq!(ProvenanceLayer::new().stamp(b"[1, 2]", &KeyId::new("key_1")).unwrap(), None);
    /// ```
    pub fn stamp(&self, body: &[u8], key_id: &KeyId) -> Result<Option<Vec<u8>>, AuthError> {
        self.config.stamp(body, key_id)
    }
}

impl Config {
    pub(crate) fn stamp(&self, body: &[u8], key_id: &KeyId) -> Result<Option<Vec<u8>>, AuthError> {
        let key_id = stamp::json_string(key_id.as_str());
        stamp::stamp(body, &self.fields, &key_id).map_err(|error| match error {
            stamp::StampError::NotAnObject(kind) => {
                AuthError::InvalidMetadata(Cow::Owned(format!(
                    "`{}` must be a JSON object (or null) to record the key that created this; \
                     found {}",
                    self.fields.meta,
                    kind.with_article()
                )))
            }
            stamp::StampError::Ambiguous(scan::Ambiguity::Metadata(at)) => {
                AuthError::AmbiguousMetadata(Cow::Owned(format!(
                    "the body has a member at byte {at} that matches `{}` only under case \
                     folding, or a second one: send the metadata once, as `{}`",
                    self.fields.meta, self.fields.meta
                )))
            }
            stamp::StampError::Ambiguous(scan::Ambiguity::Stamp(at)) => {
                AuthError::AmbiguousMetadata(Cow::Owned(format!(
                    "the body has a member at byte {at} that matches `{}` under case folding; \
                     it is written by the server, in `{}` only",
                    self.fields.stamp, self.fields.meta
                )))
            }
        })
    }
}

impl<S, R: Clone> tower_layer::Layer<S> for ProvenanceLayer<R> {
    type Service = ProvenanceService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        ProvenanceService::new(inner, self.config.clone(), self.rejection.clone())
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + Clone>() {}
    is::<ProvenanceLayer>();
    is::<ProvenanceService<(), JsonRejection>>();
}
