//! `taskpod`: the command line of taskpod.
//!
//! This file only parses flags, sets up logging and dispatches; every subcommand lives in
//! its own module and returns that module's error enum, so `anyhow` stays up here.
//!
//! Layout:
//! - [`commands`]: the client for every RPC, one module per noun (`task`, `pod`),
//!   `health` (the probe) and `completions`;
//! - [`output`]: how the commands print tasks and events (tables, JSON);
//! - [`migrate`]: `taskpod migrate`, also the first step of `taskpod dev`;
//! - [`dev`]: `taskpod dev`, a whole local cluster from one command;
//! - `taskpod bench <scenario>`, the load generator behind BENCHMARKS.md, is the
//!   `taskpod-bench` library's; this binary only parses its flags and maps its errors
//!   to exit codes.
//!
//! What the bench shares with the commands lives in libraries too: `taskpod-client`
//! (flags and profiles, the connection, errors and exit codes, the output format) and
//! `taskpod-local-cluster` (Postgres, Redis and the servers from the system's
//! binaries, and the migrations).

mod commands;
mod dev;
mod migrate;
mod output;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use commands::completions::CompletionsArgs;
use commands::health::HealthArgs;
use commands::node::NodeCommand;
use commands::pod::PodCommand;
use commands::task::TaskCommand;
use taskpod_bench::BenchError;
use taskpod_client::config::GlobalArgs;
use taskpod_client::error::CliError;

/// taskpod: a distributed task orchestrator.
#[derive(Debug, Parser)]
#[command(
    name = "taskpod",
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 server or internal error, 2 usage, 3 not found, \
    4 failed precondition / already exists / aborted, 5 invalid argument, \
    6 unauthenticated / permission denied, 7 unavailable / deadline exceeded; \
    task wait: 10 failed, 11 cancelled, 12 timed out; health: 13 not serving; \
    bench compare --fail-below: 14 regressed. See docs/cli.md."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates, reads, drives and watches tasks
    #[command(subcommand)]
    Task(TaskCommand),
    /// Starts, stops, restarts and lists pods (a task's live runtime on a worker)
    #[command(subcommand)]
    Pod(PodCommand),
    /// Lists the workers: what each offers, owns and runs
    #[command(subcommand)]
    Node(NodeCommand),
    /// Asks a server's gRPC health service whether it serves (API or worker health
    /// port; no token needed); exits 0 only for SERVING
    Health(HealthArgs),
    /// Prints a shell completion script
    Completions(CompletionsArgs),
    /// Applies the database migrations and creates the upcoming event partitions.
    Migrate(migrate::MigrateArgs),
    /// Runs a local taskpod cluster: a private PostgreSQL in a data folder, migrated,
    /// two API replicas, smoke-checked through the API.
    Dev(dev::DevArgs),
    /// Measures a running cluster, or a local one (--dev): StartPod latency, failover,
    /// idle pods; compares two reports (compare). See BENCHMARKS.md.
    Bench(taskpod_bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<CliError>() {
            Some(cli_err) if cli_err.is_broken_pipe() => ExitCode::SUCCESS,
            Some(cli_err) => {
                report(&err);
                ExitCode::from(cli_err.exit_code())
            }
            None => {
                report(&err);
                ExitCode::FAILURE
            }
        },
    }
}

/// The error, then its causes, one a line: these are messages for people, and a
/// backtrace of the CLI's own frames would only bury them.
fn report(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Task(command) => {
            let ctx = commands::Context::new(cli.global)?;
            commands::task::run(&ctx, command).await?;
        }
        Command::Pod(command) => {
            let ctx = commands::Context::new(cli.global)?;
            commands::pod::run(&ctx, command).await?;
        }
        Command::Node(command) => {
            let ctx = commands::Context::new(cli.global)?;
            commands::node::run(&ctx, command).await?;
        }
        Command::Health(args) => commands::health::run(&cli.global, &args).await?,
        Command::Completions(args) => commands::completions::run(&args, Cli::command())?,
        Command::Migrate(args) => migrate::run(&args)
            .await
            .context("taskpod migrate failed")?,
        Command::Dev(args) => dev::run(args).await.context("taskpod dev failed")?,
        Command::Bench(args) => {
            taskpod_bench::run(args, cli.global)
                .await
                .map_err(|err| match err {
                    // Exit codes of their own: 2 for usage, the RPC's for a refused call.
                    BenchError::Usage(message) => anyhow::Error::new(CliError::Usage(message)),
                    BenchError::Cli(err) => anyhow::Error::new(err),
                    other => anyhow::Error::new(other).context("taskpod bench failed"),
                })?
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("taskpod").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let cli = parse(&[
            "--address",
            "a:1",
            "task",
            "get",
            "t1",
            "-o",
            "json",
            "--timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(cli.global.address.as_deref(), Some("a:1"));
        assert_eq!(cli.global.output, output::Format::Json);
        assert_eq!(cli.global.timeout, Some(std::time::Duration::from_secs(5)));
        assert!(matches!(cli.command, Command::Task(TaskCommand::Get(_))));
    }

    #[test]
    fn wait_reads_the_global_timeout_as_its_limit() {
        let cli = parse(&["task", "wait", "t1", "--timeout", "5m"]).unwrap();
        assert_eq!(
            cli.global.timeout,
            Some(std::time::Duration::from_secs(300))
        );
        let cli = parse(&["task", "wait", "t1"]).unwrap();
        assert_eq!(cli.global.timeout, None);
        assert_eq!(
            cli.global.call_timeout(),
            taskpod_client::config::DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn health_takes_a_service_and_the_global_address_and_timeout() {
        let cli = parse(&[
            "health",
            "--address",
            "http://127.0.0.1:50052",
            "--service",
            "taskpod.v1.TaskService",
            "--timeout",
            "2s",
        ])
        .unwrap();
        let Command::Health(args) = cli.command else {
            panic!("not health");
        };
        assert_eq!(args.service, "taskpod.v1.TaskService");
        assert_eq!(cli.global.timeout, Some(std::time::Duration::from_secs(2)));
        let Command::Health(args) = parse(&["health"]).unwrap().command else {
            panic!("not health");
        };
        assert_eq!(args.service, "", "the whole server by default");
    }

    #[test]
    fn usage_errors_exit_with_two() {
        let err = parse(&["task", "transition", "t1", "--to", "done"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["task", "list", "-o", "yaml"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn list_flags_parse() {
        let cli = parse(&[
            "task",
            "list",
            "--filter",
            "priority >= 5",
            "--status",
            "active",
            "--phase",
            "planning",
            "--kind",
            "sleep",
            "--created-by",
            "ci",
            "--order-by",
            "created_at desc",
            "--limit",
            "10",
            "--page-size",
            "5",
        ])
        .unwrap();
        let Command::Task(TaskCommand::List(args)) = cli.command else {
            panic!("not a list");
        };
        assert_eq!(args.limit, Some(10));
        assert_eq!(args.page_size, Some(5));
        assert_eq!(args.order_by.as_deref(), Some("created_at desc"));
        assert_eq!(args.filter.filter(), "priority >= 5");
        assert!(parse(&["task", "list", "--page-size", "0"]).is_err());
    }
}
