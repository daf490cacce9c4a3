//! What every taskpod binary does at the top of `main`: logging and shutdown signals.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr (stdout stays the program's own output); `RUST_LOG` sets levels,
/// `TASKPOD_LOG_FORMAT=json` switches to JSON lines for collectors.
pub fn init_logging(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TASKPOD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

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

/// The shape every server's `main` shares: settings that failed to load exit with 2, a
/// runtime runs `serve`, and its error exits with 1; both print to stderr.
pub fn run_server<S, E, F, R>(settings: Result<S, E>, serve: F) -> std::process::ExitCode
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
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
