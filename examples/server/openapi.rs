//! The OpenAPI document of the whole service (`/openapi.json`): the crate's key-management document
//! plus the demo's ledger, balance and transaction endpoints.

use tower_api_keys::manage;

use super::RESOURCES;

/// The OpenAPI document of the whole service: key management (from [`manage::openapi`], with its
/// security schemes) plus the ledger, balance and transaction endpoints.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::schema::{
        AdditionalProperties, KnownFormat, Object, ObjectBuilder, SchemaFormat, Type,
    };
    use utoipa::openapi::{ArrayBuilder, ContentBuilder, Ref, Required, ResponseBuilder};

    /// A ledger, balance or transaction: any JSON object; the server adds `<kind>_id` and
    /// `created_at`, and keeps every other byte (numbers, key order) as sent.
    #[derive(utoipa::ToSchema)]
    #[schema(as = Record)]
    #[allow(dead_code)]
    struct RecordSchema {
        /// Free-form metadata. Records created with a scoped key get `BLNK_GENERATED_BY`: the key id.
        #[schema(value_type = Option<Object>, example = json!({"customer": "c_42", "BLNK_GENERATED_BY": "key_01J9Z6Q4X8K2M7N5P3R1T0V9WA"}))]
        meta_data: Option<()>,
    }

    #[derive(OpenApi)]
    #[openapi(components(schemas(RecordSchema)))]
    struct DemoApi;

    let json = |description: &str, schema: utoipa::openapi::RefOr<utoipa::openapi::Schema>| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(schema)).build(),
            )
            .build()
    };
    let ok = |description: &str| ResponseBuilder::new().description(description).build();
    let record = || -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        Ref::from_schema_name("Record").into()
    };
    // What the server answers: the body as sent, with `<kind>_id` and `created_at` put in front.
    let stored = |kind: &str| -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
        let id = format!("{kind}_id");
        ObjectBuilder::new()
            .description(Some(format!(
                "A {kind}: the object as created, with `{id}` and `created_at` added"
            )))
            .property(&id, Object::with_type(Type::String))
            .required(&id)
            .property(
                "created_at",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .required("created_at")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    };
    let error = |description: &str| json(description, Ref::from_schema_name("ErrorBody").into());
    let public = || OperationBuilder::new().securities(Some([])).tag("service");

    let mut doc = manage::openapi().merge_from(DemoApi::openapi());
    doc.info.title = "tower-api-keys demo ledger".into();
    doc.info.description = Some(
        "A ledger-style API protected by scoped API keys (`X-Blnk-Key`, `X-Api-Key` or \
         `Authorization: Bearer`). Each resource needs `<resource>:read` for GET and \
         `<resource>:write` for POST."
            .into(),
    );
    for (kind, plural) in RESOURCES {
        let denied = || {
            OperationBuilder::new()
                .tag(plural)
                .response("401", error("Missing, invalid, expired or revoked key"))
                .response(
                    "403",
                    error(
                        "The key lacks the scope, or the request comes from outside its \
                         `allowed_networks` (`AUTH_NETWORK_NOT_ALLOWED`)",
                    ),
                )
                .response(
                    "429",
                    error("Over the key's rate limit or out of credits (or an ancestor's)"),
                )
                .response("503", error("Key store unavailable"))
        };
        let create = denied()
            .operation_id(Some(format!("create_{kind}")))
            .summary(Some(format!("Create a {kind} (scope `{plural}:write`)")))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .description(Some(format!(
                        "Any JSON object but `{kind}_id` and `created_at`, which the server sets"
                    )))
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(record())).build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ))
            .response("201", json("Created", stored(kind)))
            .response(
                "400",
                error(&format!(
                    "Not a JSON object, or it sets `{kind}_id` or `created_at` (`RECORD_INVALID`); \
                     nested deeper than 64 levels (`RECORD_TOO_DEEP`); `meta_data` is not an \
                     object (`REQUEST_INVALID_METADATA`); `meta_data` twice or in another case, \
                     or `BLNK_GENERATED_BY` outside it (`REQUEST_AMBIGUOUS_METADATA`)"
                )),
            )
            .response("413", error("Body over 256 KiB (`REQUEST_BODY_TOO_LARGE`)"))
            .response(
                "415",
                error(
                    "Not `application/json` (or `application/*+json`, charset utf-8 only), \
                     encoded, or with ambiguous framing headers (`REQUEST_UNSUPPORTED_MEDIA_TYPE`)",
                ),
            );
        let list = denied()
            .operation_id(Some(format!("list_{plural}")))
            .summary(Some(format!(
                "List {plural}, newest first (scope `{plural}:read`): a scoped key sees its \
                 owner's account's, the master key all"
            )))
            .response(
                "200",
                json(
                    "Up to 100 records",
                    ArrayBuilder::new().items(stored(kind)).into(),
                ),
            );
        let get_one = denied()
            .operation_id(Some(format!("get_{kind}")))
            .summary(Some(format!("Get one {kind} (scope `{plural}:read`)")))
            .parameter(
                ParameterBuilder::new()
                    .name("id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(Object::with_type(Type::String))),
            )
            .response("200", json("The record", stored(kind)))
            .response(
                "404",
                error("No such record in the caller's owner and account (`RECORD_NOT_FOUND`)"),
            );
        doc.paths
            .add_path_operation(format!("/{plural}"), vec![HttpMethod::Post], create);
        doc.paths
            .add_path_operation(format!("/{plural}"), vec![HttpMethod::Get], list);
        doc.paths
            .add_path_operation(format!("/{plural}/{{id}}"), vec![HttpMethod::Get], get_one);
    }
    doc.paths.add_path_operation(
        "/health",
        vec![HttpMethod::Get],
        public()
            .summary(Some("Liveness (no key)"))
            .response("200", ok("`{\"status\":\"ok\"}`")),
    );
    doc.paths.add_path_operation(
        "/openapi.json",
        vec![HttpMethod::Get],
        public()
            .summary(Some("This document (no key)"))
            .response("200", ok("OpenAPI 3.1")),
    );
    // The pair `scripts/load.sh` compares.
    doc.paths.add_path_operation(
        "/ping",
        vec![HttpMethod::Get],
        public()
            .summary(Some("`pong` (no key; twin of `/auth/ping`)"))
            .response("200", ok("`pong`")),
    );
    doc.paths.add_path_operation(
        "/auth/ping",
        vec![HttpMethod::Get],
        OperationBuilder::new()
            .tag("service")
            .summary(Some("`pong` (scope `ledgers:read`; twin of `/ping`)"))
            .response("200", ok("`pong`"))
            .response("401", error("Missing, invalid, expired or revoked key"))
            .response(
                "403",
                error("The key lacks the scope, or is used from outside its networks"),
            )
            .response("429", error("Over the key's rate limit or out of credits")),
    );
    #[cfg(feature = "metrics")]
    doc.paths.add_path_operation(
        "/metrics",
        vec![HttpMethod::Get],
        public()
            .summary(Some("Prometheus metrics (no key)"))
            .response(
                "200",
                ok("`api_key_requests_total`, `api_key_lookup_seconds`"),
            ),
    );
    doc
}
