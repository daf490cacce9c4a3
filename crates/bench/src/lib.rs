//! `taskpod bench <scenario>`: the load generator behind BENCHMARKS.md.
//!
//! A library: the `taskpod` binary parses [`BenchArgs`] among its subcommands and calls
//! [`run`]; everything else is here. It reaches the cluster as every client command
//! does (`taskpod-client`) and builds `--dev` clusters from the parts `taskpod dev`
//! uses (`taskpod-local-cluster`).
//!
//! Every scenario runs against a cluster that is already up (`--address`, as the other
//! commands, plus `--database-url` where it reads Postgres directly) or, with `--dev`, a
//! local one it starts first and tears down at the end ([`cluster`]): a private
//! PostgreSQL with its durable defaults (fsync on: these are benchmarks), N workers
//! and one API replica, in a temporary data folder. Each scenario prints one
//! [`Report`]: latencies from HDR histograms (count, rate, p50, p90,
//! p99, p99.9, max), taken after a warm-up, and named figures; `--json` prints it as one
//! JSON object. A progress line runs on stderr meanwhile.
//!
//! Scenarios (one module each, the same shape: an arguments type flattening
//! [`CommonArgs`] that implements [`Scenario`]: its name, the [`Needs`] and checks
//! validated before anything starts, and `run(&mut Target) -> Report`; adding one is
//! that impl and one line in the [`Scenarios`] list):
//! - [`create`]: CreateTask (or CreateTasks of N) throughput and latency;
//! - [`e2e`]: `sleep` tasks created with auto_start until completed: sustained
//!   completed tasks/s, and every task's event trail checked in Postgres;
//! - [`get`]: GetTask on random tasks of a table of N, with P pods running;
//! - [`list`]: ListTasks pages of 1000, per ordering and filter;
//! - [`start`]: StartPod until the pod runs;
//! - [`watch`]: commit -> watcher latency across two API replicas at a set update
//!   rate (dev only);
//! - [`failover`]: SIGKILL the worker holding the most of N pods, time until all run
//!   again and until its partitions are claimed (dev only);
//! - [`pods`]: N idle pods on one worker: its memory per pod, its idle CPU, and the
//!   advisory locks Postgres holds at N/10 and N (dev only);
//! - [`limit`]: what Postgres and Redis themselves do on the machine (pgbench with
//!   transactions shaped like ours, pipelined PUBLISH round trips), the yardstick the
//!   other figures are divided by.
//!
//! [`compare`] (`taskpod bench compare A.json B.json [--fail-below R]`) reads two
//! reports of one scenario and shows B/A for every number, failing with exit code 14
//! when B regressed past `--fail-below`.
//!
//! [`seed`] fills a big table in bulk for `get` and `list` (`--seed N`), with the
//! store's own bulk writer (`store::seed`). What the scenarios read straight from the
//! tables (trails, pods per node, locks) is the store's too (`store::inspect`), and
//! `limit`'s pgbench scripts come from `store::shapes`: the bench writes no SQL
//! against our tables, so the schema has one owner.

// These docs are a map of the private modules (`cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

mod cluster;
pub mod compare;
mod create;
mod e2e;
mod failover;
mod get;
mod limit;
mod list;
mod load;
mod pods;
mod procfs;
mod progress;
mod report;
mod seed;
mod start;
mod timed;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use taskpod_local_cluster::signals::Signals;

use cluster::Target;
use report::Report;
use taskpod_client::config::GlobalArgs;
use taskpod_client::error::CliError;
use taskpod_local_cluster::migrate::MigrateError;
use taskpod_local_cluster::postgres::PostgresError;
use taskpod_local_cluster::processes::ProcessError;

/// Attributed on every event the bench writes, unless `--actor` names another actor.
pub const ACTOR: &str = "taskpod-bench";

/// A worker's default `capacity`: the most pods one dev worker runs.
const WORKER_CAPACITY: u64 = 10_000;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Runs against --address (or TASKPOD_ADDRESS, a profile) unless --dev \
    starts a local cluster in a temporary folder first. The report goes to stdout \
    (--json: one JSON object), progress to stderr. See BENCHMARKS.md."
)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// A scenario to run, or two reports to compare.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    #[command(flatten)]
    Scenario(Scenarios),
    /// Two reports of one scenario side by side, B/A for every figure; with
    /// --fail-below R, exits 14 when B regressed
    Compare(compare::CompareArgs),
}

/// One scenario, implemented by its arguments type (the subcommand's flags).
pub trait Scenario: std::fmt::Debug {
    /// The subcommand, and the report's `scenario`.
    fn name(&self) -> &'static str;

    /// The flags every scenario takes.
    fn common(&self) -> &CommonArgs;

    /// What it needs from the cluster, checked before anything starts.
    fn needs(&self) -> Needs;

    /// Its own checks of its flags, before anything starts.
    ///
    /// # Errors
    /// A message for people, shown as a usage error.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Runs it against `target`, which [`run`] prepared as [`Scenario::needs`] says. The
    /// future is awaited where it is made, never spawned, so it need not be `Send`.
    fn run(self, target: &mut Target) -> impl Future<Output = Result<Report, BenchError>>
    where
        Self: Sized;
}

/// Declares the scenarios: each line is a subcommand (its doc is its line in
/// `taskpod bench --help`) and the arguments type implementing [`Scenario`].
macro_rules! scenarios {
    ($($(#[$doc:meta])* $variant:ident($args:ty),)+) => {
        /// The scenario named on the command line.
        #[derive(Debug, clap::Subcommand)]
        pub enum Scenarios {
            $($(#[$doc])* $variant($args),)+
        }

        impl Scenarios {
            /// The chosen scenario, for what it says about itself.
            pub fn scenario(&self) -> &dyn Scenario {
                match self {
                    $(Self::$variant(args) => args,)+
                }
            }

            async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
                match self {
                    $(Self::$variant(args) => args.run(target).await,)+
                }
            }
        }
    };
}

scenarios! {
    /// CreateTask throughput and latency (--batch N: CreateTasks of N)
    Create(create::CreateArgs),
    /// Sleep tasks with auto_start until completed: sustained tasks/s, event trails checked
    E2e(e2e::E2eArgs),
    /// GetTask latency on random tasks of a table of N (P of them with running pods)
    Get(get::GetArgs),
    /// ListTasks latency, pages of 1000, per ordering and filter
    List(list::ListArgs),
    /// StartPod -> running latency: creates manual tasks, then starts their pods
    Start(start::StartArgs),
    /// Commit -> watcher latency across two API replicas at R updates/s (--dev)
    Watch(watch::WatchArgs),
    /// SIGKILL the worker holding the most pods; time until every pod runs again (--dev)
    Failover(failover::FailoverArgs),
    /// N idle pods on one worker: memory per pod, idle CPU, advisory locks (--dev)
    Pods(pods::PodsArgs),
    /// What Postgres (pgbench) and Redis (PUBLISH round trips) do on this machine
    Limit(limit::LimitArgs),
}

/// What every scenario accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Start a local cluster first (Postgres, workers, one API replica in a temporary
    /// folder) and tear it down at the end
    #[arg(long)]
    pub dev: bool,
    /// The cluster's PostgreSQL, for scenarios that read it directly (not with --dev,
    /// which has its own)
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Print the report as one JSON object (as does -o json)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dev_options: DevOptions,
}

/// How `--dev` builds its cluster.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DevOptions {
    /// --dev: worker processes to run [default: the scenario's]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: Option<u16>,
    /// --dev: the cluster's folder [default: a new folder under the system's temporary
    /// folder, removed afterwards unless the run failed]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// --dev: keep the data folder (and the servers' logs in it) after a successful run
    #[arg(long)]
    pub keep_data: bool,
    /// --dev: the folder with initdb, pg_ctl and postgres [default: as taskpod dev]
    #[arg(long, value_name = "DIR", env = "TASKPOD_PG_BINDIR")]
    pub pg_bindir: Option<PathBuf>,
    /// --dev: the taskpod-api binary [default: beside this taskpod, else on PATH]
    #[arg(long, value_name = "FILE")]
    pub api_bin: Option<PathBuf>,
    /// --dev: the taskpod-worker binary [default: beside this taskpod, else on PATH]
    #[arg(long, value_name = "FILE")]
    pub worker_bin: Option<PathBuf>,
}

impl DevOptions {
    /// The flags that mean something only with `--dev`.
    fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        if self.workers.is_some() {
            given.push("--workers");
        }
        if self.data_dir.is_some() {
            given.push("--data-dir");
        }
        if self.keep_data {
            given.push("--keep-data");
        }
        if self.api_bin.is_some() {
            given.push("--api-bin");
        }
        if self.worker_bin.is_some() {
            given.push("--worker-bin");
        }
        // --pg-bindir is left out: it may come from TASKPOD_PG_BINDIR, set for `dev`.
        given
    }
}

/// Whether a scenario reads Postgres itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// Never.
    No,
    /// When it has one (--dev, or --database-url), for extra figures.
    Optional,
    /// Always: without --dev it needs --database-url.
    Required,
}

/// How many workers a dev cluster runs for a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// Any number; this many unless --workers says otherwise.
    Default(u16),
    /// Exactly this many: the scenario is defined on it.
    Exactly(u16),
}

/// What a scenario needs from the cluster, checked before anything starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Only on a cluster the bench started (it kills or inspects local processes).
    pub dev_only: bool,
    pub database: Database,
    pub workers: Workers,
    /// API replicas a dev cluster runs (0: none, the scenario makes no RPC).
    pub replicas: u16,
    /// Settings of a dev cluster's workers, beyond their defaults.
    pub worker_env: &'static [(&'static str, &'static str)],
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Flags that do not fit together; exits with 2, like clap's own errors.
    #[error("{0}")]
    Usage(String),
    /// Settings, connection and other client errors, with their own exit codes.
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error("could not {step}")]
    Rpc {
        step: String,
        #[source]
        source: CliError,
    },
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("database: could not {step}")]
    Database {
        step: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A read or write of the store's own (`store::inspect`, `store::seed`) failed.
    #[error("database: could not {step}")]
    Store {
        step: &'static str,
        #[source]
        source: taskpod_core::Error,
    },
    #[error("could not read {what} from /proc")]
    Proc {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gave up after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("could not {0}")]
    Failed(String),
    #[error("could not listen for SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

impl BenchError {
    /// For `.map_err`: a failed call in `step`.
    pub fn rpc(step: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let step = step.into();
        move |status| Self::Rpc {
            step,
            source: CliError::from(status),
        }
    }

    /// For `.map_err`: a failed query in `step`.
    pub fn db(step: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database { step, source }
    }

    /// For `.map_err`: a failed store call in `step`.
    pub fn store(step: &'static str) -> impl FnOnce(taskpod_core::Error) -> Self {
        move |source| Self::Store { step, source }
    }
}

/// Checks the flags against each other and the scenario's needs; returns the number
/// of workers a dev cluster runs (0 without --dev).
///
/// # Errors
/// A message for people, shown as a usage error.
pub fn validate(scenario: &dyn Scenario, global: &GlobalArgs) -> Result<u16, String> {
    let name = scenario.name();
    let common = scenario.common();
    let needs = scenario.needs();
    scenario.check()?;
    if !common.dev {
        if needs.dev_only {
            return Err(format!(
                "bench {name} runs only on a cluster it starts itself: add --dev"
            ));
        }
        let given = common.dev_options.given();
        if let Some(first) = given.first() {
            return Err(format!("{first} applies only with --dev"));
        }
        if common.database_url.is_some() && needs.database == Database::No {
            return Err(format!(
                "bench {name} does not read Postgres: drop --database-url"
            ));
        }
        if common.database_url.is_none() && needs.database == Database::Required {
            return Err(format!(
                "bench {name} reads the cluster's Postgres: add --database-url (or --dev)"
            ));
        }
        return Ok(0);
    }
    if global.address.is_some() {
        return Err("--dev starts its own cluster: drop --address".into());
    }
    if common.database_url.is_some() {
        return Err("--dev starts its own database: drop --database-url".into());
    }
    match (needs.workers, common.dev_options.workers) {
        (Workers::Default(n), None) | (Workers::Exactly(n), None) => Ok(n),
        (Workers::Default(_), Some(n)) => Ok(n),
        (Workers::Exactly(n), Some(given)) if given == n => Ok(n),
        (Workers::Exactly(n), Some(given)) => Err(format!(
            "bench {name} runs on exactly {n} worker(s), not {given}: drop --workers"
        )),
    }
}

/// Runs a scenario and prints its report, or compares two reports ([`compare`]).
///
/// # Errors
/// Usage errors first (nothing started), then the first step that failed. A dev
/// cluster is torn down in every case. A comparison fails as [`compare::run`] says.
pub async fn run(args: BenchArgs, global: GlobalArgs) -> Result<(), BenchError> {
    match args.command {
        BenchCommand::Scenario(scenario) => run_scenario(scenario, global).await,
        BenchCommand::Compare(args) => compare::run(&args, &global),
    }
}

async fn run_scenario(scenario: Scenarios, global: GlobalArgs) -> Result<(), BenchError> {
    let chosen = scenario.scenario();
    let workers = validate(chosen, &global).map_err(BenchError::Usage)?;
    let (common, needs) = (chosen.common().clone(), chosen.needs());
    let json = common.json || global.output.is_json();
    // Installed first: from here on Ctrl-C means "stop, tear down, exit".
    let mut signals = Signals::install().map_err(BenchError::Signals)?;

    let mut target = if common.dev {
        let mut dev = cluster::DevCluster::boot(&common.dev_options).await?;
        let started = tokio::select! {
            started = dev.start_servers(workers, needs.replicas, needs.worker_env) => started,
            signal = signals.recv() => Err(BenchError::Interrupted(signal)),
        };
        match started {
            Ok(()) => match Target::dev(dev, &global).await {
                Ok(target) => target,
                Err((dev, err)) => {
                    dev.teardown(false).await;
                    return Err(err);
                }
            },
            Err(err) => {
                dev.teardown(false).await;
                return Err(err);
            }
        }
    } else {
        Target::remote(&global, common.database_url.as_deref()).await?
    };

    let outcome = tokio::select! {
        report = scenario.run(&mut target) => report,
        signal = signals.recv() => Err(BenchError::Interrupted(signal)),
    };
    target.close(outcome.is_ok()).await;
    let report = outcome?;
    let text = if json {
        report.to_json() + "\n"
    } else {
        report.to_text()
    };
    taskpod_client::output::emit(&text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Bench(BenchArgs),
    }

    fn parse(args: &str) -> Result<(Scenarios, GlobalArgs), clap::Error> {
        let cli = Cli::try_parse_from(
            ["taskpod", "bench"]
                .into_iter()
                .chain(args.split_whitespace()),
        )?;
        let Command::Bench(bench) = cli.command;
        match bench.command {
            BenchCommand::Scenario(scenario) => Ok((scenario, cli.global)),
            BenchCommand::Compare(_) => panic!("not a scenario: {args}"),
        }
    }

    fn check(args: &str) -> Result<u16, String> {
        let (scenario, global) = parse(args).map_err(|e| e.to_string())?;
        validate(scenario.scenario(), &global)
    }

    #[test]
    fn every_subcommand_is_named_as_its_scenario() {
        use clap::CommandFactory as _;
        let cli = Cli::command();
        let bench = cli.find_subcommand("bench").unwrap();
        let names: Vec<&str> = bench
            .get_subcommands()
            .map(|c| c.get_name())
            .filter(|name| *name != "compare")
            .collect();
        assert_eq!(names.len(), 9, "{names:?}");
        for name in names {
            let (scenario, _) = parse(name).unwrap();
            assert_eq!(scenario.scenario().name(), name);
        }
    }

    #[test]
    fn start_defaults_and_flags() {
        let (scenario, _) = parse("start").unwrap();
        let Scenarios::Start(a) = scenario else {
            panic!("not start")
        };
        assert_eq!((a.tasks, a.concurrency, a.warmup), (2000, 8, 200));
        assert!(!a.common.dev && !a.common.json);
        let (scenario, global) =
            parse("start --tasks 50 --concurrency 4 --warmup 0 --json --address h:1").unwrap();
        let Scenarios::Start(a) = scenario else {
            panic!("not start")
        };
        assert_eq!((a.tasks, a.concurrency, a.warmup), (50, 4, 0));
        assert!(a.common.json);
        assert_eq!(global.address.as_deref(), Some("h:1"));
    }

    #[test]
    fn start_runs_remote_or_dev_with_any_number_of_workers() {
        assert_eq!(check("start"), Ok(0));
        assert_eq!(check("start --dev"), Ok(2));
        assert_eq!(check("start --dev --workers 3"), Ok(3));
        assert_eq!(check("start --database-url postgres://x/y"), Ok(0));
    }

    #[test]
    fn idle_pods_need_a_database_to_wait_on() {
        let err = check("start --idle-pods 10").unwrap_err();
        assert!(err.contains("--database-url"), "{err}");
        assert_eq!(check("start --idle-pods 10 --dev"), Ok(2));
        assert_eq!(
            check("start --idle-pods 10 --database-url postgres://x/y"),
            Ok(0)
        );
    }

    #[test]
    fn keep_is_for_remote_clusters() {
        assert_eq!(check("start --keep"), Ok(0));
        let err = check("start --keep --dev").unwrap_err();
        assert!(err.contains("--keep"), "{err}");
    }

    #[test]
    fn zero_counts_are_refused_by_the_parser() {
        assert!(parse("start --tasks 0").is_err());
        assert!(parse("start --concurrency 0").is_err());
        assert!(parse("failover --dev --pods 0").is_err());
        assert!(parse("start --dev --workers 0").is_err());
    }

    #[test]
    fn dev_only_flags_need_dev() {
        let err = check("start --workers 2").unwrap_err();
        assert!(err.contains("--workers applies only with --dev"), "{err}");
        let err = check("start --keep-data").unwrap_err();
        assert!(err.contains("--keep-data"), "{err}");
    }

    #[test]
    fn dev_conflicts_with_an_address_or_a_database() {
        let err = check("start --dev --address h:1").unwrap_err();
        assert!(err.contains("drop --address"), "{err}");
        let err = check("start --dev --database-url postgres://x/y").unwrap_err();
        assert!(err.contains("drop --database-url"), "{err}");
    }

    #[test]
    fn failover_needs_dev_and_two_workers() {
        let err = check("failover").unwrap_err();
        assert!(err.contains("add --dev"), "{err}");
        assert_eq!(check("failover --dev"), Ok(2));
        assert_eq!(check("failover --dev --workers 2"), Ok(2));
        let err = check("failover --dev --workers 3").unwrap_err();
        assert!(err.contains("exactly 2 worker(s), not 3"), "{err}");
        let (scenario, _) = parse("failover --dev").unwrap();
        let Scenarios::Failover(a) = scenario else {
            panic!("not failover")
        };
        assert_eq!(a.pods, 1000);
    }

    #[test]
    fn pods_needs_dev_and_one_worker() {
        assert!(check("pods").unwrap_err().contains("add --dev"));
        assert_eq!(check("pods --dev"), Ok(1));
        assert!(check("pods --dev --workers 2").is_err());
        let (scenario, _) = parse("pods --dev").unwrap();
        let Scenarios::Pods(a) = scenario else {
            panic!("not pods")
        };
        assert_eq!(a.pods, 10_000);
    }

    #[test]
    fn pod_counts_are_bounded_by_what_one_worker_runs() {
        assert!(check("pods --dev --pods 10000").is_ok());
        let err = check("pods --dev --pods 10001").unwrap_err();
        assert!(err.contains("10000"), "{err}");
        let err = check("pods --dev --pods 5").unwrap_err();
        assert!(err.contains("at least 10"), "{err}");
        let err = check("failover --dev --pods 20000").unwrap_err();
        assert!(err.contains("10000"), "{err}");
    }

    #[test]
    fn get_and_list_run_anywhere_with_their_defaults() {
        assert_eq!(check("get"), Ok(0));
        assert_eq!(check("get --dev"), Ok(1));
        assert_eq!(check("list --dev --workers 2"), Ok(2));
        let (scenario, _) = parse("get --active-pods 5 --concurrency 2").unwrap();
        let Scenarios::Get(a) = scenario else {
            panic!("not get")
        };
        assert_eq!(
            (
                a.table.created(),
                a.table.active_pods,
                a.concurrency,
                a.stretch.duration,
                a.stretch.warmup
            ),
            (100_000, 5, 2, 20, 3)
        );
        let err = check("list --tasks 10 --active-pods 11").unwrap_err();
        assert!(err.contains("more than --tasks"), "{err}");
        assert!(check("get --tasks 10 --active-pods 11").is_err());
    }

    #[test]
    fn watch_needs_dev_and_two_replicas() {
        assert!(check("watch").unwrap_err().contains("add --dev"));
        assert_eq!(check("watch --dev"), Ok(1));
        let (scenario, _) = parse("watch --dev").unwrap();
        assert_eq!(scenario.scenario().needs().replicas, 2);
        let Scenarios::Watch(a) = scenario else {
            panic!("not watch")
        };
        assert_eq!((a.rate, a.tasks), (1000, 1000));
        let (scenario, _) = parse("start --dev").unwrap();
        assert_eq!(scenario.scenario().needs().replicas, 1);
        assert!(parse("watch --dev --rate 0").is_err());
    }

    #[test]
    fn create_runs_anywhere_single_or_batched() {
        assert_eq!(check("create"), Ok(0));
        assert_eq!(check("create --dev"), Ok(1));
        let (scenario, _) = parse("create --batch 1000").unwrap();
        let Scenarios::Create(a) = scenario else {
            panic!("not create")
        };
        assert_eq!((a.batch, a.concurrency), (Some(1000), 16));
        assert_eq!((a.stretch.duration, a.stretch.warmup), (20, 3));
        assert!(parse("create --batch 1001").is_err());
        let err = check("create --database-url postgres://x/y").unwrap_err();
        assert!(err.contains("drop --database-url"), "{err}");
    }

    #[test]
    fn e2e_needs_the_database_and_runs_sleep_without_delays() {
        let err = check("e2e").unwrap_err();
        assert!(err.contains("add --database-url (or --dev)"), "{err}");
        assert_eq!(check("e2e --database-url postgres://x/y"), Ok(0));
        assert_eq!(check("e2e --dev"), Ok(2));
        let (scenario, _) = parse("e2e --dev").unwrap();
        assert!(
            scenario
                .scenario()
                .needs()
                .worker_env
                .contains(&("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "0"))
        );
        let Scenarios::E2e(a) = scenario else {
            panic!("not e2e")
        };
        assert_eq!((a.batch, a.concurrency, a.in_flight), (20, 4, 200));
        let err = check("e2e --dev --batch 300 --in-flight 200").unwrap_err();
        assert!(err.contains("more than --in-flight"), "{err}");
    }

    #[test]
    fn limit_runs_the_servers_alone() {
        assert_eq!(check("limit --dev"), Ok(0));
        let (scenario, _) = parse("limit --dev").unwrap();
        assert_eq!(scenario.scenario().needs().replicas, 0);
        let err = check("limit --dev --workers 1").unwrap_err();
        assert!(err.contains("exactly 0 worker(s)"), "{err}");
        let err = check("limit --dev --redis-url redis://h:1").unwrap_err();
        assert!(err.contains("drop --redis-url"), "{err}");
        assert!(check("limit").unwrap_err().contains("--database-url"));
    }

    #[test]
    fn seeding_needs_a_database_and_sets_the_table() {
        let err = check("list --seed 1000").unwrap_err();
        assert!(err.contains("--seed writes into Postgres"), "{err}");
        assert_eq!(check("list --seed 1000 --dev"), Ok(1));
        let (scenario, _) = parse("get --seed 1000000 --active-pods 10 --dev").unwrap();
        let Scenarios::Get(a) = scenario else {
            panic!("not get")
        };
        // With a seed, only the active pods go through the API unless --tasks says more.
        assert_eq!((a.table.seed, a.table.created()), (1_000_000, 10));
        let (scenario, _) = parse("get --seed 5 --tasks 7 --dev").unwrap();
        let Scenarios::Get(a) = scenario else {
            panic!("not get")
        };
        assert_eq!(a.table.created(), 7);
    }

    #[test]
    fn failover_and_pods_take_no_database_url() {
        let err = check("failover --database-url postgres://x/y").unwrap_err();
        assert!(err.contains("add --dev"), "{err}");
    }
}
