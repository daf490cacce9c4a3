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
    taskpod_core::process::init_logging("info");
    taskpod_core::process::run_server(
        ApiSettings::load(args.config.as_deref()),
        |settings| async move { run(settings).await.map_err(Into::into) },
    )
}

async fn run(settings: ApiSettings) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (setting listen)", settings.listen))?;
    // The one line on stdout: tests and `taskpod dev` read the bound address from it.
    println!("taskpod-api listening on {}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    tokio::spawn(taskpod_core::process::cancel_on_signals(shutdown.clone()));
    taskpod_api::serve(listener, settings, shutdown).await?;
    Ok(())
}
