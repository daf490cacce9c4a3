//! taskpod's worker node (`taskpod-worker`): owns partitions through session advisory
//! locks on a dedicated connection, mints pod epochs fenced by the partition's
//! generation, runs and supervises pods, records crashes, adopts the pods of dead peers
//! and drains cleanly on SIGTERM. See docs/architecture.md ("Workers").
//!
//! Layout:
//! - [`settings`]: the typed, layered configuration;
//! - [`lock`]: the dedicated lock session and the advisory key scheme;
//! - [`liveness`]: whether the lock session answered recently, for everything that must
//!   stop without waiting on the control loop;
//! - [`controller`]: the control loop (liveness, claims, the per-tick pod check);
//! - [`pod`]: one pod's life: slot, start, handler, stop;
//! - [`appender`]: the pods' appends, sharing transactions;
//! - [`slots`]: per-kind handler slots granted by priority, then age;
//! - [`handler`]: the `Handler` trait and the `PodContext` handlers act through;
//! - [`handlers`]: `manual`, `sleep`, `exec`.
//!
//! Metrics and spans are `taskpod_core::telemetry`'s; the worker serves `/metrics` on
//! `metrics_listen`.

pub mod appender;
mod checks;
pub mod controller;
pub mod handler;
pub mod handlers;
pub mod liveness;
pub mod lock;
pub mod maintenance;
pub mod ownership;
pub mod planner;
pub mod pod;
mod pod_table;
mod recorder;
pub mod settings;
pub mod slots;
pub mod supervisor;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use controller::{Controller, WorkerError};
pub use settings::WorkerSettings;

/// Runs a worker until `shutdown`, serving gRPC health on `health` (NOT_SERVING from the
/// start of the drain). `ready` is called with the node id once registered.
///
/// # Errors
/// When the store or the lock session cannot be reached at start.
pub async fn run(
    settings: WorkerSettings,
    health: TcpListener,
    metrics: TcpListener,
    shutdown: CancellationToken,
    ready: impl FnOnce(taskpod_core::domain::NodeId),
) -> Result<(), WorkerError> {
    let controller = Controller::start(settings).await?;
    ready(controller.node());
    let metrics_stop = CancellationToken::new();
    let metrics_server = tokio::spawn(taskpod_core::telemetry::exposition::serve(
        metrics,
        taskpod_core::telemetry::Role::Worker,
        metrics_stop.clone(),
    ));
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let serving = CancellationToken::new();
    let health_server = tokio::spawn({
        let serving = serving.clone();
        async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(health),
                    serving.cancelled_owned(),
                )
                .await;
        }
    });
    let drain_watch = {
        let shutdown = shutdown.clone();
        let reporter = reporter.clone();
        async move {
            shutdown.cancelled().await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    tokio::join!(controller.run(shutdown.clone()), drain_watch);
    metrics_stop.cancel();
    let _ = metrics_server.await;
    serving.cancel();
    let _ = health_server.await;
    Ok(())
}
