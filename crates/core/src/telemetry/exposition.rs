//! `GET /metrics`: the process's metrics as OpenMetrics text, exemplars included.
//!
//! OpenMetrics rather than the classic Prometheus text format because only it carries
//! exemplars; every Prometheus since 2.5 asks for it first and parses it.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::{Role, metrics};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Writing into a String cannot fail; a metric's own encoder could.
        tracing::warn!(error = %e, "metrics not encoded");
    }
    out
}

/// Serves `GET /metrics` for `role` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, role: Role, shutdown: CancellationToken) {
    let registry = Arc::new(metrics().registry(role));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    render(&registry),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
