//! The worker's gauges, in Prometheus text at `GET /metrics` on `metrics_listen`.
//!
//! `taskpod_pods_pending` and `taskpod_pods_pending_oldest_seconds` are the cluster's
//! tasks that are active without a running pod, and how long the oldest has waited:
//! the sign of a kind no worker runs, a spent capacity, or a failover in progress.
//! Every worker reports the same cluster-wide figure (read from the store each claim
//! interval); the per-node gauges are labelled with the worker's name.

use std::sync::Arc;

use prometheus::{Encoder as _, Gauge, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub pods_pending: IntGauge,
    pub pods_pending_oldest_seconds: Gauge,
    pub pods_running: IntGauge,
    pub partitions_owned: IntGauge,
}

impl Metrics {
    /// # Errors
    /// When a metric cannot be registered (a bug: names are constants).
    pub fn new(node: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let labelled = |name: &str, help: &str| Opts::new(name, help).const_label("node", node);
        let pods_pending = IntGauge::new(
            "taskpod_pods_pending",
            "Tasks active without a running pod, cluster-wide",
        )?;
        let pods_pending_oldest_seconds = Gauge::new(
            "taskpod_pods_pending_oldest_seconds",
            "How long the oldest task active without a running pod has waited",
        )?;
        let pods_running =
            IntGauge::with_opts(labelled("taskpod_pods_running", "Pods this node runs"))?;
        let partitions_owned = IntGauge::with_opts(labelled(
            "taskpod_partitions_owned",
            "Partitions this node owns",
        ))?;
        registry.register(Box::new(pods_pending.clone()))?;
        registry.register(Box::new(pods_pending_oldest_seconds.clone()))?;
        registry.register(Box::new(pods_running.clone()))?;
        registry.register(Box::new(partitions_owned.clone()))?;
        Ok(Self {
            registry,
            pods_pending,
            pods_pending_oldest_seconds,
            pods_running,
            partitions_owned,
        })
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics not encoded");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { metrics.render() }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
