//! `taskpod-worker`: loads settings, registers, runs pods until SIGTERM, then drains.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use taskpod_worker::WorkerSettings;
use taskpod_worker::handlers::exec::guard;
use tokio_util::sync::CancellationToken;

/// taskpod's worker node. Settings: defaults, then --config, then TASKPOD_* variables
/// (`__` nests: TASKPOD_STORE__URL).
#[derive(Debug, Parser)]
#[command(name = "taskpod-worker", version, about)]
struct Args {
    /// A TOML settings file.
    #[arg(long, env = "TASKPOD_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    // The per-run guard of `exec`: no settings, no runtime, no output of its own.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == guard::SUBCOMMAND)
    {
        return guard::main(std::env::args_os().skip(2));
    }
    let args = Args::parse();
    taskpod_core::process::run_server(
        "taskpod-worker",
        WorkerSettings::load(args.config.as_deref()),
        |settings| async move { run(settings).await.map_err(Into::into) },
    )
}

async fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let health = tokio::net::TcpListener::bind(settings.health_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (setting health_listen)",
                settings.health_listen
            )
        })?;
    let addr = health.local_addr()?;
    let metrics = tokio::net::TcpListener::bind(settings.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (setting metrics_listen)",
                settings.metrics_listen
            )
        })?;
    let metrics_addr = metrics.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(taskpod_core::process::cancel_on_signals(shutdown.clone()));
    taskpod_worker::run(settings, health, metrics, shutdown, |node| {
        // The one line on stdout: tests and `taskpod dev` read it.
        println!("taskpod-worker {node} health on {addr} metrics on {metrics_addr}");
    })
    .await?;
    Ok(())
}
