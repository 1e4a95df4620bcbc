//! `/metrics` in the Prometheus text format, from the crate's `api_key_requests_total` and
//! `api_key_lookup_seconds` (feature `metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder, installed on first use (no HTTP listener of its own: we serve it).
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(tower_api_keys::metrics::LOOKUP_SECONDS.into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
            .expect("buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        tower_api_keys::metrics::describe();
        handle
    })
}

/// Installs the recorder (call before serving, so that the first requests are counted).
pub(crate) fn install() {
    handle();
}

pub(crate) async fn render() -> impl axum::response::IntoResponse {
    let handle = handle();
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}
