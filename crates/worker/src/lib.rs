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
mod wakeups;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use controller::{Controller, WorkerError};
pub use settings::WorkerSettings;

/// Runs a worker until `shutdown`, serving gRPC health on `health` (NOT_SERVING from the
/// start of the drain) and `/metrics` on `metrics`. `ready` is called with the node id
/// once registered. If the health or metrics server dies on its own, the worker drains
/// and the call fails: a probe that cannot reach it would have it killed anyway.
///
/// # Errors
/// When the store or the lock session cannot be reached at start, or a server died.
pub async fn run(
    settings: WorkerSettings,
    health: TcpListener,
    metrics: TcpListener,
    shutdown: CancellationToken,
    ready: impl FnOnce(taskpod_core::domain::NodeId),
) -> Result<(), WorkerError> {
    let controller = Controller::start(settings).await?;
    ready(controller.node());
    let servers_stop = CancellationToken::new();
    let mut metrics_server = tokio::spawn(taskpod_core::telemetry::exposition::serve(
        metrics,
        taskpod_core::telemetry::Role::Worker,
        servers_stop.clone(),
    ));
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut health_server = tokio::spawn({
        let stop = servers_stop.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(health),
                    stop.cancelled_owned(),
                )
                .await
        }
    });
    // Watches the servers until the drain begins: one that ends before is a failure.
    let died = {
        let shutdown = shutdown.clone();
        let reporter = reporter.clone();
        let (metrics_server, health_server) = (&mut metrics_server, &mut health_server);
        async move {
            let died = tokio::select! {
                () = shutdown.cancelled() => None,
                ended = metrics_server => Some(format!("the metrics server ended: {ended:?}")),
                ended = health_server => Some(format!("the health server ended: {ended:?}")),
            };
            if let Some(why) = &died {
                tracing::error!(why, "a server of this worker died; draining");
                shutdown.cancel();
            }
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            died
        }
    };
    let ((), died) = tokio::join!(controller.run(shutdown.clone()), died);
    servers_stop.cancel();
    if !metrics_server.is_finished() || died.is_none() {
        metrics_server.await.ok();
    }
    if !health_server.is_finished() || died.is_none() {
        let _served = health_server.await;
    }
    match died {
        Some(why) => Err(WorkerError::ServerDied(why)),
        None => Ok(()),
    }
}
