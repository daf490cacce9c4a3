//! The cluster a scenario runs against: one that is already up (`--address`, optionally
//! `--database-url`), or a [`DevCluster`] the bench starts from the parts `taskpod dev`
//! uses too (`taskpod-local-cluster`).
//!
//! A dev cluster is a private PostgreSQL (started with its durable defaults: fsync and
//! synchronous commit stay on, since these are benchmarks), a private Redis, N workers
//! and one API replica (two for `watch`), in a fresh `taskpod_bench` database. Its folder is a new one
//! under the system's temporary folder unless `--data-dir` names one; the servers' logs
//! are in its `logs/`. Teardown stops the replica (SIGTERM), kills the workers (SIGKILL:
//! the data is thrown away, so a drain of thousands of pods would only cost time), then
//! stops Redis and Postgres, and removes a temporary folder only when the run
//! succeeded, so a failure leaves the logs to read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

use super::progress::say;
use super::report::ClusterInfo;
use super::{ACTOR, BenchError, DevOptions};
use taskpod_client::client::{Client, normalize_address};
use taskpod_client::config::{GlobalArgs, Settings};
use taskpod_local_cluster::migrate;
use taskpod_local_cluster::postgres::{self, LocalPostgres, SUPERUSER};
use taskpod_local_cluster::processes::{self, ClusterConfig, Replica, Worker};
use taskpod_local_cluster::redis::LocalRedis;

/// The bench's own database, dropped and created afresh by every dev run, so a reused
/// `--data-dir` never carries tasks from an earlier run into the counts.
const DATABASE: &str = "taskpod_bench";
/// Identifiers cannot be bound as parameters.
const DROP_DATABASE: &str = "DROP DATABASE IF EXISTS taskpod_bench WITH (FORCE)";
const CREATE_DATABASE: &str = "CREATE DATABASE taskpod_bench";
/// The bench's own connections: a few polls and reads, never the hot path.
const POOL_SIZE: u32 = 4;
/// Where the client of a dev cluster without API replicas points: nothing, and it is
/// never called (it connects lazily).
const NO_REPLICA: &str = "http://127.0.0.1:1";

/// Where a scenario sends its calls, and what it may inspect.
#[derive(Debug)]
pub struct Target {
    /// The first replica.
    pub client: Client,
    /// One client per replica, the first being `client` (remote: just `client`).
    pub replicas: Vec<Client>,
    pub info: ClusterInfo,
    /// Who the bench's changes are attributed to.
    pub actor: String,
    /// The cluster's database, when the bench has one (--dev, or --database-url).
    pub pool: Option<PgPool>,
    /// Its URL, for tools that connect themselves (pgbench).
    pub database_url: Option<String>,
    /// The cluster's Redis, when the bench knows it (--dev).
    pub redis_url: Option<String>,
    /// The cluster the bench started (--dev).
    pub dev: Option<DevCluster>,
}

fn settings_with_actor(mut settings: Settings) -> Settings {
    if settings.actor.as_deref().is_none_or(str::is_empty) {
        settings.actor = Some(ACTOR.to_owned());
    }
    settings
}

/// A small pool to the cluster's database.
///
/// # Errors
/// When the database cannot be reached.
pub async fn connect_pool(url: &str) -> Result<PgPool, BenchError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| BenchError::Usage(format!("invalid --database-url: {e}")))?;
    PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name("taskpod-bench"))
        .await
        .map_err(BenchError::db("connect to the cluster's database"))
}

impl Target {
    /// A cluster that is already running.
    ///
    /// # Errors
    /// Bad settings, a malformed address, or an unreachable `--database-url`.
    pub async fn remote(
        global: &GlobalArgs,
        database_url: Option<&str>,
    ) -> Result<Self, BenchError> {
        let settings = settings_with_actor(global.settings()?);
        let client = Client::connect(&settings, global.call_timeout())?;
        let actor = settings.actor.clone().unwrap_or_default();
        let pool = match database_url {
            Some(url) => Some(connect_pool(url).await?),
            None => None,
        };
        Ok(Self {
            replicas: vec![client.clone()],
            client,
            info: ClusterInfo {
                mode: "remote",
                address: normalize_address(&settings.address),
                workers: None,
                replicas: None,
                postgres: None,
            },
            actor,
            pool,
            database_url: database_url.map(str::to_owned),
            redis_url: None,
            dev: None,
        })
    }

    /// The dev cluster just started; on failure the cluster comes back for teardown.
    ///
    /// # Errors
    /// When the replica or the database cannot be reached.
    pub async fn dev(
        dev: DevCluster,
        global: &GlobalArgs,
    ) -> Result<Self, (DevCluster, BenchError)> {
        // A scenario that makes no RPC (`limit`) runs no replica; its client, which
        // connects lazily, is then never used.
        let address = dev
            .replicas
            .first()
            .map_or_else(|| NO_REPLICA.to_owned(), Replica::url);
        // What the report names: the replica, or with none, the database.
        let shown = if dev.replicas.is_empty() {
            dev.database_url.clone()
        } else {
            address.clone()
        };
        let settings = settings_with_actor(Settings {
            address: address.clone(),
            token: None,
            actor: global.actor.clone(),
            profile: None,
        });
        let actor = settings.actor.clone().unwrap_or_default();
        let client = match Client::connect(&settings, global.call_timeout()) {
            Ok(client) => client,
            Err(e) => return Err((dev, e.into())),
        };
        let mut replicas = vec![client.clone()];
        for replica in dev.replicas.iter().skip(1) {
            let settings = Settings {
                address: replica.url(),
                ..settings.clone()
            };
            match Client::connect(&settings, global.call_timeout()) {
                Ok(client) => replicas.push(client),
                Err(e) => return Err((dev, e.into())),
            }
        }
        let pool = match connect_pool(&dev.database_url).await {
            Ok(pool) => pool,
            Err(e) => return Err((dev, e)),
        };
        Ok(Self {
            client,
            replicas,
            info: ClusterInfo {
                mode: "dev",
                address: shown,
                workers: Some(dev.workers.len()),
                replicas: Some(dev.replicas.len()),
                postgres: Some(dev.pg.version().to_owned()),
            },
            actor,
            pool: Some(pool),
            database_url: Some(dev.database_url.clone()),
            redis_url: dev.redis.as_ref().map(LocalRedis::url),
            dev: Some(dev),
        })
    }

    /// The database, for scenarios that need it.
    ///
    /// # Errors
    /// When the bench has none (a remote cluster without --database-url).
    pub fn pool(&self) -> Result<&PgPool, BenchError> {
        self.pool
            .as_ref()
            .ok_or_else(|| BenchError::Usage("this scenario needs --database-url".into()))
    }

    /// The cluster the bench started, for scenarios that need one.
    ///
    /// # Errors
    /// Without --dev (validation refuses that earlier; this is the type-level check).
    pub fn dev_cluster(&mut self) -> Result<&mut DevCluster, BenchError> {
        self.dev
            .as_mut()
            .ok_or_else(|| BenchError::Usage("this scenario needs --dev".into()))
    }

    /// Closes the pool and tears a dev cluster down.
    pub async fn close(self, succeeded: bool) {
        if let Some(pool) = self.pool {
            pool.close().await;
        }
        if let Some(dev) = self.dev {
            dev.teardown(succeeded).await;
        }
    }
}

/// A cluster the bench started.
#[derive(Debug)]
pub struct DevCluster {
    pg: LocalPostgres,
    redis: Option<LocalRedis>,
    data_dir: PathBuf,
    /// The bench chose the folder: it is removed after a successful run.
    temporary: bool,
    keep_data: bool,
    api_bin: PathBuf,
    worker_bin: PathBuf,
    pub database_url: String,
    pub workers: Vec<Worker>,
    pub replicas: Vec<Replica>,
}

impl DevCluster {
    /// Finds the binaries and starts Postgres and Redis: the parts that must be stopped
    /// again, whatever happens next.
    ///
    /// # Errors
    /// A missing binary, or a server that does not start (nothing is left running).
    pub async fn boot(options: &DevOptions) -> Result<Self, BenchError> {
        let bindir = postgres::find_bindir(options.pg_bindir.as_deref())?;
        let api_bin =
            processes::find_binary(processes::API_BIN, "--api-bin", options.api_bin.as_deref())?;
        let worker_bin = processes::find_binary(
            processes::WORKER_BIN,
            "--worker-bin",
            options.worker_bin.as_deref(),
        )?;
        let (data_dir, temporary) = match &options.data_dir {
            Some(dir) => (dir.clone(), false),
            None => {
                let dir =
                    std::env::temp_dir().join(format!("taskpod-bench-{}", std::process::id()));
                // A leftover of an earlier process with our pid: nothing of ours.
                if dir.exists() {
                    remove_dir(&dir);
                }
                (dir, true)
            }
        };
        say(format!("starting postgres in {}", data_dir.display()));
        let mut pg = LocalPostgres::start(&bindir, &data_dir, None).await?;
        let redis = match LocalRedis::start(&data_dir.join("redis")).await {
            Ok(redis) => redis,
            Err(e) => {
                let _ = pg.stop().await;
                return Err(BenchError::Failed(format!("start redis: {e}")));
            }
        };
        say(format!(
            "{} on 127.0.0.1:{}, redis at {}",
            pg.version(),
            pg.port(),
            redis.url()
        ));
        let database_url = format!("postgres://{SUPERUSER}@127.0.0.1:{}/{DATABASE}", pg.port());
        Ok(Self {
            pg,
            redis: Some(redis),
            data_dir,
            temporary,
            keep_data: options.keep_data,
            api_bin,
            worker_bin,
            database_url,
            workers: Vec::new(),
            replicas: Vec::new(),
        })
    }

    /// Creates and migrates the database, then starts `workers` workers (with
    /// `worker_env` beyond their defaults) and `replicas` API replicas (each kept in
    /// `self` as it comes up, so teardown stops it).
    ///
    /// # Errors
    /// The first step that failed.
    pub async fn start_servers(
        &mut self,
        workers: u16,
        replicas: u16,
        worker_env: &[(&str, &str)],
    ) -> Result<(), BenchError> {
        self.create_database().await?;
        let report = migrate::run(&self.database_url).await?;
        say(format!("database {DATABASE}: {report}"));
        let config = ClusterConfig {
            api_bin: self.api_bin.clone(),
            worker_bin: self.worker_bin.clone(),
            database_url: self.database_url.clone(),
            page_token_key: uuid::Uuid::new_v4().simple().to_string(),
            log_dir: self.data_dir.join("logs"),
            bus_url: self.redis.as_ref().map(LocalRedis::url).unwrap_or_default(),
            worker_env: worker_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        // Workers first: the API accepts only the kinds a registered worker offers.
        for index in 1..=usize::from(workers) {
            let worker = config.start_worker(index).await?;
            say(format!(
                "worker {index}: node {} pid {}",
                worker.node,
                worker.process.pid().unwrap_or_default()
            ));
            self.workers.push(worker);
        }
        for index in 1..=usize::from(replicas) {
            let replica = config.start_replica(index).await?;
            say(format!("api {index}: {}", replica.url()));
            self.replicas.push(replica);
        }
        Ok(())
    }

    async fn create_database(&self) -> Result<(), BenchError> {
        let options = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.pg.port())
            .username(SUPERUSER)
            .database("postgres")
            .application_name("taskpod-bench");
        let mut conn = options
            .connect()
            .await
            .map_err(BenchError::db("connect to postgres"))?;
        sqlx::raw_sql(DROP_DATABASE)
            .execute(&mut conn)
            .await
            .map_err(BenchError::db("drop the bench database"))?;
        sqlx::raw_sql(CREATE_DATABASE)
            .execute(&mut conn)
            .await
            .map_err(BenchError::db("create the bench database"))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// The running process of worker `index` (0-based).
    ///
    /// # Errors
    /// When there is no such worker or it has been reaped.
    pub fn worker_pid(&self, index: usize) -> Result<u32, BenchError> {
        self.workers
            .get(index)
            .and_then(|w| w.process.pid())
            .ok_or_else(|| BenchError::Failed(format!("find the process of worker {}", index + 1)))
    }

    /// SIGKILLs worker `index` (0-based); it stays in the list and is reaped at
    /// teardown.
    ///
    /// # Errors
    /// When it is not running.
    pub fn kill_worker(&self, index: usize) -> Result<(), BenchError> {
        let pid = self.worker_pid(index)?;
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| BenchError::Failed(format!("signal pid {pid}")))?;
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
            .map_err(|e| BenchError::Failed(format!("SIGKILL worker {}: {e}", index + 1)))
    }

    /// The postmaster's pid, from the first line of `postmaster.pid`.
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn postgres_pid(&self) -> Result<u32, BenchError> {
        let file = self.pg.cluster_dir().join("postmaster.pid");
        let text = std::fs::read_to_string(&file).map_err(|source| BenchError::Proc {
            what: file.display().to_string(),
            source,
        })?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| BenchError::Failed(format!("read a pid from {}", file.display())))
    }

    /// Stops everything this cluster started, in order: the replica, the workers,
    /// Redis, Postgres; then removes a temporary folder after a successful run.
    pub async fn teardown(mut self, succeeded: bool) {
        say("tearing the cluster down");
        for replica in self.replicas.drain(..) {
            if let Err(error) = replica.process.stop().await {
                tracing::warn!(%error, "could not stop the API replica");
            }
        }
        for (index, worker) in self.workers.drain(..).enumerate() {
            if let Some(pid) = worker
                .process
                .pid()
                .and_then(|pid| i32::try_from(pid).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                // ESRCH: it is already gone (failover killed it); stop() reaps it.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            if let Err(error) = worker.process.stop().await {
                tracing::warn!(worker = index + 1, %error, "could not reap the worker");
            }
        }
        if let Some(redis) = self.redis.take() {
            redis.stop().await;
        }
        if let Err(error) = self.pg.stop().await {
            tracing::warn!(%error, "could not stop postgres");
        }
        if self.temporary && succeeded && !self.keep_data {
            remove_dir(&self.data_dir);
        } else {
            say(format!(
                "kept {} (the servers' logs are in its logs/)",
                self.data_dir.display()
            ));
        }
    }
}

fn remove_dir(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %error, "could not remove the bench folder");
    }
}
