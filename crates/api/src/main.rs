//! `taskpod-api`: loads settings, binds, prints where it listens, serves until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use taskpod_api::ApiSettings;
use tokio_util::sync::CancellationToken;

/// taskpod's gRPC API server. Settings: defaults, then --config, then TASKPOD_*
/// variables (`__` nests: TASKPOD_STORE__URL).
#[derive(Debug, Parser)]
#[command(name = "taskpod-api", version, about)]
struct Args {
    /// A TOML settings file.
    #[arg(long, env = "TASKPOD_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    taskpod_core::process::run_server(
        "taskpod-api",
        ApiSettings::load(args.config.as_deref()),
        |settings| async move { run(settings).await.map_err(Into::into) },
    )
}

async fn run(settings: ApiSettings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (setting listen)", settings.listen))?;
    let metrics = match settings.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (setting metrics_listen)"))?,
        ),
        None => None,
    };
    // The one line on stdout (whoever reads it may close the pipe after it): tests and
    // `taskpod dev` read the bound addresses from it.
    let metrics_note = match &metrics {
        Some(m) => format!(" metrics on {}", m.local_addr()?),
        None => String::new(),
    };
    println!(
        "taskpod-api listening on {}{metrics_note}",
        listener.local_addr()?
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(taskpod_core::process::cancel_on_signals(shutdown.clone()));
    taskpod_api::serve(listener, metrics, settings, shutdown).await?;
    Ok(())
}
