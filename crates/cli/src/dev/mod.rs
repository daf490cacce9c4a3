//! `taskpod dev`: a whole local cluster from one command, for trying taskpod and for
//! the end-to-end tests.
//!
//! Today the cluster is a private PostgreSQL (see [`postgres`]) with the schema migrated
//! and a smoke check through the store ([`smoke`]); the API replicas and workers join it
//! as they are built. State lives in one data folder that later runs reuse.
//!
//! Whatever happens after the server is up (a failed step, Ctrl-C, SIGTERM, a panic),
//! the server this run started or adopted is stopped before the process exits.

mod postgres;
mod smoke;

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use taskpod_core::store::{Store, StoreSettings};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::migrate::{self, MigrateError};
use postgres::{LocalPostgres, Origin, PostgresError, SUPERUSER};
use smoke::SmokeError;

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
    #[error("could not connect the store")]
    Store(#[source] taskpod_core::Error),
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
    // Installed first: from here on Ctrl-C means "stop Postgres and exit", at any step.
    let mut signals = Signals::install().map_err(DevError::Signals)?;
    let bindir = postgres::find_bindir(args.pg_bindir.as_deref())?;
    let mut pg = LocalPostgres::start(&bindir, &args.data_dir, args.pg_port).await?;
    announce(&pg, args.pg_port);

    let outcome = tokio::select! {
        ready = prepare(pg.port()) => ready,
        signal = signals.recv() => Err(DevError::Interrupted(signal)),
    };
    let outcome = match outcome {
        Ok(url) => {
            println!("ready: DATABASE_URL={url}");
            println!("ready: psql \"{url}\" connects to it");
            println!("ready: later issues add the API replicas and workers here");
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

/// Creates the database, migrates it and runs the smoke check; returns its URL.
async fn prepare(port: u16) -> Result<String, DevError> {
    if ensure_database(port).await? {
        println!("database: created {DATABASE}");
    } else {
        println!("database: {DATABASE} exists");
    }
    let url = format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}");
    let report = migrate::run(&url).await?;
    println!("migrations: {report}");

    let settings = StoreSettings {
        application_name: "taskpod-dev".into(),
        ..StoreSettings::with_url(url.clone())
    };
    let store = Store::connect(&settings).await.map_err(DevError::Store)?;
    let checked = smoke::run(&store).await;
    store.pool().close().await;
    checked?;
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

/// SIGINT (Ctrl-C) and SIGTERM (what service managers and `kill` send) both mean "stop
/// cleanly".
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
