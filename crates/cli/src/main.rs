//! `taskpod`: the command line of taskpod.
//!
//! This file only parses flags, sets up logging and dispatches; every subcommand lives in
//! its own module and returns that module's error enum, so `anyhow` stays up here.
//!
//! Layout:
//! - [`migrate`]: `taskpod migrate`, also the first step of `taskpod dev`;
//! - [`dev`]: `taskpod dev`, a whole local cluster from one command.

mod dev;
mod migrate;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// taskpod: a distributed task orchestrator.
#[derive(Debug, Parser)]
#[command(name = "taskpod", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Applies the database migrations and creates the upcoming event partitions.
    Migrate(migrate::MigrateArgs),
    /// Runs a local taskpod cluster: a private PostgreSQL in a data folder, migrated and
    /// smoke-checked.
    Dev(dev::DevArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain, one cause a line: these are messages for people, and a
            // backtrace of the CLI's own frames would only bury them.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            let report = migrate::run(&args.database_url)
                .await
                .context("taskpod migrate failed")?;
            println!("{report}");
        }
        Command::Dev(args) => dev::run(args).await.context("taskpod dev failed")?,
    }
    Ok(())
}

/// Logs go to stderr so that stdout stays the command's own output (tests and scripts
/// read it); quiet unless `RUST_LOG` asks for more.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
