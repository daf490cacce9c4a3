//! What every taskpod server does at the top of `main`: telemetry, the runtime, and
//! shutdown signals.

use tokio_util::sync::CancellationToken;

use crate::telemetry::{self, TelemetryConfig};

/// The first SIGTERM or SIGINT cancels `shutdown` (a graceful drain); a second exits
/// the process at once.
pub async fn cancel_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received, draining");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal, exiting now");
    std::process::exit(130);
}

/// The shape every server's `main` shares: settings or telemetry variables that cannot
/// be used exit with 2; then, on a runtime, telemetry starts (logs to stderr, OTLP when
/// configured: see [`telemetry`]), `serve` runs, and its error exits with 1. Whatever
/// telemetry still buffers is exported before the process exits.
pub fn run_server<S, E, F, R>(
    service: &str,
    settings: Result<S, E>,
    serve: F,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: FnOnce(S) -> R,
    R: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    use std::process::ExitCode;
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match TelemetryConfig::from_env(service) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The gRPC exporters are built on the runtime they will export from.
    let telemetry = match runtime.block_on(async { telemetry::init(&config, "info") }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(serve(settings));
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
