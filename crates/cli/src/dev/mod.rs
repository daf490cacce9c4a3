//! `taskpod dev`: a whole local cluster from one command, for trying taskpod and for
//! the end-to-end tests.
//!
//! The cluster is a private PostgreSQL (see [`postgres`]) with the schema migrated, a
//! private Redis, two `taskpod-worker` nodes and two `taskpod-api` replicas on free
//! loopback ports ([`processes`]), all from `taskpod-local-cluster`, and a smoke check
//! through the gRPC API ([`smoke`]). State lives in one data folder that later runs
//! reuse; the servers' logs are in its `logs/`.
//!
//! Whatever happens after Postgres is up (a failed step, Ctrl-C, SIGTERM, a panic), the
//! replicas and then the workers are stopped (SIGTERM, then SIGKILL after a grace
//! period), then the Postgres this run started or adopted, before the process exits. If
//! `taskpod dev` itself is killed, the kernel sends its children SIGTERM; Postgres stays
//! up and the next run adopts it.

mod smoke;

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use taskpod_local_cluster::signals::Signals;

use taskpod_client::error::CliError;
use taskpod_local_cluster::migrate::{self, MigrateError};
use taskpod_local_cluster::postgres::{self, LocalPostgres, Origin, PostgresError, SUPERUSER};
use taskpod_local_cluster::processes::{
    self, ClusterConfig, Managed, ProcessError, Replica, Worker,
};
use taskpod_local_cluster::redis::{LocalRedis, RedisError};

use smoke::SmokeError;

/// How many API replicas and workers the cluster runs.
const REPLICAS: usize = 2;
const WORKERS: usize = 2;

/// The database the cluster uses, beside Postgres's own `postgres` database.
const DATABASE: &str = "taskpod";
/// Identifiers cannot be bound as parameters, so the statement is a constant too.
const CREATE_DATABASE: &str = "CREATE DATABASE taskpod";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the cluster keeps its state between runs (relative to the current folder).
    #[arg(long, default_value = ".taskpod/dev")]
    pub data_dir: PathBuf,
    /// The loopback port for PostgreSQL [default: a free port].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub pg_port: Option<u16>,
    /// The folder with initdb, pg_ctl and postgres [default: found from pg_config,
    /// /usr/lib/postgresql/*/bin or PATH].
    #[arg(long, env = "TASKPOD_PG_BINDIR")]
    pub pg_bindir: Option<PathBuf>,
    /// The taskpod-api binary [default: beside this taskpod, else on PATH].
    #[arg(long)]
    pub api_bin: Option<PathBuf>,
    /// The taskpod-worker binary [default: beside this taskpod, else on PATH].
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Stops everything after the smoke check instead of waiting for Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("could not listen for SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("could not connect to postgres on port {port}")]
    AdminConnect {
        port: u16,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not create the {DATABASE} database")]
    CreateDatabase(#[source] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("could not reach the API replicas")]
    Client(#[source] CliError),
    #[error(transparent)]
    Smoke(#[from] SmokeError),
    #[error("interrupted by {0} before the cluster was ready")]
    Interrupted(&'static str),
}

/// Runs the cluster until a signal (or, with `--once`, until the smoke check passed).
///
/// # Errors
/// The first step that failed. The server is stopped in every case.
pub async fn run(args: DevArgs) -> Result<(), DevError> {
    // Installed first: from here on Ctrl-C means "stop everything and exit", at any step.
    let mut signals = Signals::install().map_err(DevError::Signals)?;
    let bindir = postgres::find_bindir(args.pg_bindir.as_deref())?;
    // Found before anything starts, so a missing server binary costs nothing to learn.
    let api_bin = processes::find_binary(processes::API_BIN, "--api-bin", args.api_bin.as_deref())?;
    let worker_bin = processes::find_binary(
        processes::WORKER_BIN,
        "--worker-bin",
        args.worker_bin.as_deref(),
    )?;
    let mut pg = LocalPostgres::start(&bindir, &args.data_dir, args.pg_port).await?;
    announce(&pg, args.pg_port);
    let redis = match LocalRedis::start(&args.data_dir.join("redis")).await {
        Ok(redis) => redis,
        Err(e) => {
            let _ = pg.stop().await;
            return Err(e.into());
        }
    };
    println!(
        "redis: {} (no persistence: the bus carries hints)",
        redis.url()
    );

    // Owned out here, so a signal or failed step mid-way still stops every child
    // started so far.
    let mut children = Children::default();
    let log_dir = args.data_dir.join("logs");
    let outcome = tokio::select! {
        ready = prepare(pg.port(), api_bin, worker_bin, log_dir, redis.url(), &mut children) => ready,
        signal = signals.recv() => Err(DevError::Interrupted(signal)),
    };
    let outcome = match outcome {
        Ok(url) => {
            println!("ready: DATABASE_URL={url}");
            println!("ready: psql \"{url}\" connects to it");
            let urls: Vec<String> = children.replicas.iter().map(Replica::url).collect();
            println!("ready: API replicas at {}", urls.join(" and "));
            let actor = std::env::var("USER")
                .ok()
                .filter(|u| {
                    !u.is_empty()
                        && u.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                })
                .unwrap_or_else(|| "dev".into());
            println!(
                "ready: export TASKPOD_ADDRESS={} TASKPOD_ACTOR={actor}",
                urls.first().map_or("", String::as_str)
            );
            println!(
                "try: taskpod task create --title hello --kind sleep --auto-start; taskpod task list"
            );
            if !args.once {
                println!(
                    "running: press Ctrl-C to stop (the data stays in {})",
                    args.data_dir.display()
                );
                let signal = signals.recv().await;
                println!("{signal} received, stopping");
            }
            Ok(())
        }
        Err(err) => Err(err),
    };

    // Clients first: replicas, then the workers (which stop their pods cleanly), then
    // the database they all use.
    stop_all(
        "api",
        "replicas",
        children.replicas.into_iter().map(|r| r.process),
    )
    .await;
    stop_all(
        "workers",
        "workers",
        children.workers.into_iter().map(|w| w.process),
    )
    .await;
    redis.stop().await;
    println!("redis: stopped");
    let stopped = pg.stop().await;
    match (&outcome, &stopped) {
        (_, Ok(())) => println!("postgres: stopped"),
        // The step's error is the one to report; the stop's goes to the log.
        (Err(_), Err(stop_err)) => tracing::error!(error = %stop_err, "could not stop postgres"),
        (Ok(()), Err(_)) => {}
    }
    outcome?;
    stopped.map_err(DevError::from)
}

/// The servers this run started, in start order.
#[derive(Debug, Default)]
struct Children {
    workers: Vec<Worker>,
    replicas: Vec<Replica>,
}

/// Stops a group together (each drains in parallel with the others).
async fn stop_all(prefix: &str, what: &str, group: impl Iterator<Item = Managed>) {
    let results = futures::future::join_all(group.map(|p| async move {
        let name = p.name.clone();
        (name, p.stop().await)
    }))
    .await;
    if results.is_empty() {
        return;
    }
    for (name, result) in &results {
        match result {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(process = %name, %status, "exited uncleanly"),
            Err(error) => tracing::error!(process = %name, %error, "could not stop it"),
        }
    }
    println!("{prefix}: stopped {} {what}", results.len());
}

fn announce(pg: &LocalPostgres, requested_port: Option<u16>) {
    let cluster = pg.cluster_dir().display();
    match pg.origin() {
        Origin::Initialised => println!("postgres: initialised a new cluster in {cluster}"),
        Origin::Restarted => println!("postgres: reusing the cluster in {cluster}"),
        Origin::Adopted => {
            println!("postgres: adopted the server an earlier run left running on {cluster}");
            if requested_port.is_some_and(|port| port != pg.port()) {
                println!(
                    "postgres: note: it listens on port {}, not the requested one",
                    pg.port()
                );
            }
        }
    }
    println!(
        "postgres: {} from {} on 127.0.0.1:{} (log: {})",
        pg.version(),
        pg.bindir().display(),
        pg.port(),
        pg.log_file().display()
    );
}

/// Creates the database, migrates it, starts the workers and then the replicas (kept in
/// `children` as each comes up) and runs the smoke check through the replicas; returns
/// the database URL.
async fn prepare(
    port: u16,
    api_bin: PathBuf,
    worker_bin: PathBuf,
    log_dir: PathBuf,
    bus_url: String,
    children: &mut Children,
) -> Result<String, DevError> {
    if ensure_database(port).await? {
        println!("database: created {DATABASE}");
    } else {
        println!("database: {DATABASE} exists");
    }
    let url = format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}");
    let report = migrate::run(&url).await?;
    println!("migrations: {report}");

    let config = ClusterConfig {
        api_bin,
        worker_bin,
        database_url: url.clone(),
        // Fresh each run: tokens from an earlier run's replicas are simply refused.
        page_token_key: uuid::Uuid::new_v4().simple().to_string(),
        log_dir,
        bus_url,
        worker_env: Vec::new(),
    };
    // Workers first: the API accepts only the kinds a registered worker offers.
    for index in 1..=WORKERS {
        let worker = config.start_worker(index).await?;
        println!(
            "workers: worker {index} registered as node {} (log: {})",
            worker.node,
            worker.process.log.display()
        );
        children.workers.push(worker);
    }
    for index in 1..=REPLICAS {
        let replica = config.start_replica(index).await?;
        println!(
            "api: replica {index} listening on {} (log: {})",
            replica.addr,
            replica.process.log.display()
        );
        children.replicas.push(replica);
    }

    let (Some(first), Some(second)) = (children.replicas.first(), children.replicas.last()) else {
        return Err(DevError::Smoke(SmokeError::Unexpected(
            "no replica started".into(),
        )));
    };
    let first = smoke::client(&first.url()).map_err(DevError::Client)?;
    let second = smoke::client(&second.url()).map_err(DevError::Client)?;
    smoke::run(&first, &second).await?;
    Ok(url)
}

/// Creates the `taskpod` database unless it exists; true when it created it.
async fn ensure_database(port: u16) -> Result<bool, DevError> {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(SUPERUSER)
        .database("postgres")
        .application_name("taskpod-dev");
    let mut conn = connect_when_ready(&options, port).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut conn)
            .await
            .map_err(DevError::CreateDatabase)?;
    let created = if exists {
        false
    } else {
        let created = sqlx::raw_sql(CREATE_DATABASE).execute(&mut conn).await;
        match created {
            Ok(_) => true,
            // duplicate_database: another run created it between our check and now.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => false,
            Err(err) => return Err(DevError::CreateDatabase(err)),
        }
    };
    let _ = conn.close().await;
    Ok(created)
}

/// An adopted server may still be starting up or recovering; a started one is ready
/// (pg_ctl waited), so this returns at the first try there.
async fn connect_when_ready(
    options: &PgConnectOptions,
    port: u16,
) -> Result<PgConnection, DevError> {
    const ATTEMPTS: u32 = 40;
    let mut attempt = 1;
    loop {
        match options.connect().await {
            Ok(conn) => return Ok(conn),
            Err(source) if attempt == ATTEMPTS => {
                return Err(DevError::AdminConnect { port, source });
            }
            Err(error) => {
                tracing::debug!(%error, attempt, "postgres not ready yet");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}
