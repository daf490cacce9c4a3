//! `taskpod bench limit`: what Postgres and Redis themselves do on this machine, in
//! the same run and report shape as the other scenarios, so BENCHMARKS.md can give
//! each figure as a share of its physical limit.
//!
//! Postgres is driven by `pgbench` (the C client that ships with PostgreSQL: next to
//! no client cost), `--concurrency` connections, prepared statements, for the warm-up
//! and then `--duration` seconds per transaction shape, each transaction's latency read from
//! pgbench's per-transaction log (`-l`); only transactions that start after the
//! warm-up are counted. The shapes (`store::shapes`, beside the store's create, which
//! owns them), on copies of our tables in a scratch schema (`taskpod_limit`, same
//! columns, indexes, storage parameters, foreign keys and events partitioning, dropped
//! at the end; ids time-ordered like UUIDv7):
//! - `pg_select_one`: `SELECT 1`, the round trip every call pays at least;
//! - `pg_insert_one`: a one-row insert, committed: the floor of any change;
//! - `pg_create`: a task's create as the store writes it: the store's own statement,
//!   for one task, inserting the listing row, the head and the first event, committed.
//!
//! Redis (`redis_publish`): `--concurrency` callers over as many connections, each
//! sending what a writer sends after every commit: PUBLISH of a task update to its
//! task's channel, its partition's and `tasks`, pipelined in one round trip.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use tokio::io::AsyncBufReadExt as _;
use tokio::time::Instant;

use taskpod_core::store::shapes::{self, Shape};

use super::cluster::Target;
use super::progress::{Progress, say};
use super::report::{Figure, Latencies, Report, Summary};
use super::timed::{self, Call, Stretch};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};
use taskpod_local_cluster::postgres;

/// The seed of the Redis callers' generators (task ids and connections).
const SEED: u64 = 0x006c_696d_6974_7321;
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Connections (pgbench clients; Redis callers)
    #[arg(long, value_name = "C", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub concurrency: u64,
    /// The cluster's Redis, when not --dev [default: Redis is not measured]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The pgbench binary [default: beside the Postgres server binaries, else on PATH]
    #[arg(long, value_name = "FILE")]
    pub pgbench: Option<PathBuf>,
    #[command(flatten)]
    pub stretch: Stretch,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for LimitArgs {
    fn name(&self) -> &'static str {
        "limit"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: false,
            database: Database::Required,
            // Nothing of ours runs: the servers alone.
            workers: Workers::Exactly(0),
            replicas: 0,
            worker_env: &[],
        }
    }

    /// `--redis-url` with `--dev`, which has its own.
    fn check(&self) -> Result<(), String> {
        if self.common.dev && self.redis_url.is_some() {
            return Err("--dev starts its own Redis: drop --redis-url".into());
        }
        Ok(())
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// Finds pgbench: `explicit`, else beside the server binaries, else on `PATH`.
///
/// # Errors
/// A message that says what to install.
pub fn find_pgbench(explicit: Option<&Path>) -> Result<PathBuf, BenchError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(BenchError::Usage(format!(
                "--pgbench {}: no such file",
                path.display()
            )))
        };
    }
    let beside = postgres::find_bindir(None)
        .ok()
        .map(|dir| dir.join("pgbench"))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|dir| dir.join("pgbench"))
            .find(|p| p.is_file())
    };
    beside.or_else(on_path).ok_or_else(|| {
        BenchError::Failed(
            "find pgbench, which bench limit drives Postgres with: it ships with \
             PostgreSQL's client package (Debian: `apt-get install -y postgresql-client`, \
             or postgresql-contrib); or pass --pgbench"
                .into(),
        )
    })
}

/// One pgbench log line: `client_id transaction_no time script_no time_epoch time_us`;
/// returns (start in µs since the epoch, latency in µs).
pub fn parse_log_line(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let latency: u64 = fields.get(2)?.parse().ok()?;
    let epoch: u64 = fields.get(4)?.parse().ok()?;
    let micros: u64 = fields.get(5)?.parse().ok()?;
    let end = epoch.checked_mul(1_000_000)?.checked_add(micros)?;
    Some((end.checked_sub(latency)?, latency))
}

/// The transactions that started in the timed stretch: `warmup` after the first start,
/// for `duration`.
pub fn timed_latencies(samples: &[(u64, u64)], warmup: Duration, duration: Duration) -> Latencies {
    let mut latencies = Latencies::new();
    let Some(first) = samples.iter().map(|(start, _)| *start).min() else {
        return latencies;
    };
    let from = first + u64::try_from(warmup.as_micros()).unwrap_or(u64::MAX);
    let until = from + u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    for &(start, latency) in samples {
        if (from..until).contains(&start) {
            latencies.record(Duration::from_micros(latency));
        }
    }
    latencies
}

/// `progress: 2.0 s, 4523.1 tps, lat 3.535 ms stddev 1.282, 0 failed` -> `4523 tps, lat 3.535 ms`.
pub fn progress_of(line: &str) -> Option<String> {
    let rest = line.strip_prefix("progress: ")?;
    let mut parts = rest.split(", ");
    let at = parts.next()?;
    let tps = parts.next()?;
    let lat = parts.next()?.split(" stddev").next()?;
    Some(format!("{tps}, {lat} (at {at})"))
}

/// Runs pgbench with `shape` and returns its timed transactions.
async fn pgbench(
    binary: &Path,
    url: &str,
    shape: &Shape,
    args: &LimitArgs,
    dir: &Path,
) -> Result<Summary, BenchError> {
    let script = dir.join(format!("{}.sql", shape.name));
    let io = |what: &str, source| BenchError::Failed(format!("{what}: {source}"));
    std::fs::write(&script, &shape.script).map_err(|e| io("write the pgbench script", e))?;
    let prefix = dir.join(shape.name);
    let total = args.stretch.warmup + args.stretch.duration;
    let mut command = tokio::process::Command::new(binary);
    command
        .args(["-n", "-M", "prepared", "-P", "1", "-l"])
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(format!("--client={}", args.concurrency))
        .arg(format!("--jobs={}", args.concurrency.min(2)))
        .arg(format!("--time={total}"))
        .arg("-f")
        .arg(&script)
        .arg(url)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| io(&format!("start {}", binary.display()), e))?;
    let latest = Arc::new(Mutex::new(String::from("connecting")));
    let progress = {
        let (latest, name) = (Arc::clone(&latest), shape.name);
        let warmup = args.stretch.warmup();
        let started = Instant::now();
        Progress::start("limit", move || {
            let phase = if started.elapsed() < warmup {
                "warm-up: "
            } else {
                ""
            };
            let now = latest.lock().map(|l| l.clone()).unwrap_or_default();
            format!("{phase}{name}: {now}")
        })
    };
    let mut tail = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match progress_of(&line) {
                Some(now) => {
                    if let Ok(mut l) = latest.lock() {
                        *l = now;
                    }
                }
                None => tail.push(line),
            }
        }
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| io("wait for pgbench", e))?;
    progress.finish();
    if !output.status.success() {
        return Err(BenchError::Failed(format!(
            "run pgbench ({}, {}):\n{}",
            shape.name,
            output.status,
            tail.join("\n")
        )));
    }
    let mut samples = Vec::new();
    let logs = std::fs::read_dir(dir).map_err(|e| io("list pgbench's logs", e))?;
    for entry in logs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{}.", shape.name)) || name.ends_with(".sql") {
            continue;
        }
        let file = std::fs::File::open(entry.path()).map_err(|e| io("read a pgbench log", e))?;
        samples.extend(
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| parse_log_line(&line)),
        );
        let _ = std::fs::remove_file(entry.path());
    }
    let latencies = timed_latencies(&samples, args.stretch.warmup(), args.stretch.duration());
    if latencies.count() == 0 {
        return Err(BenchError::Failed(format!(
            "time any pgbench transaction ({}): {} logged",
            shape.name,
            samples.len()
        )));
    }
    Ok(latencies.summary(shape.name, shape.what, args.stretch.duration()))
}

/// What one PUBLISH round trip carries: an update as a writer announces it.
fn update_payload(random: u64) -> (taskpod_core::domain::TaskId, i32, Vec<u8>) {
    use taskpod_core::domain::{Phase, Status, TaskId};
    let task_id = TaskId(uuid::Uuid::from_u64_pair(random, random.rotate_left(17)));
    let partition = (random % 256) as i32;
    let update = taskpod_core::bus::TaskUpdate {
        task_id,
        version: 4,
        status: Status::Active,
        phase: Phase::Development,
        event_type: "phase_changed".into(),
        epoch: 1,
        partition,
        kind: "sleep".into(),
        priority: 0,
        created_by: Some("taskpod-bench".into()),
        created_at: Some(chrono::Utc::now()),
        updated_at: None,
        traceparent: None,
    };
    (
        task_id,
        partition,
        serde_json::to_vec(&update).unwrap_or_default(),
    )
}

/// PUBLISH round trips from `--concurrency` callers.
async fn redis_publish(url: &str, args: &LimitArgs) -> Result<Summary, BenchError> {
    use taskpod_core::bus::channels;
    let client = redis::Client::open(url)
        .map_err(|e| BenchError::Usage(format!("invalid Redis URL {url:?}: {e}")))?;
    let mut connections = Vec::new();
    for _ in 0..args.concurrency {
        connections.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| BenchError::Failed(format!("connect to Redis at {url}: {e}")))?,
        );
    }
    let connections = Arc::new(connections);
    let call: Call = Arc::new(move |random| {
        let connections = Arc::clone(&connections);
        async move {
            let mut conn = connections[timed::index(random, connections.len())].clone();
            let (task_id, partition, payload) = update_payload(random);
            let mut pipe = redis::pipe();
            pipe.publish(channels::task(task_id), &payload).ignore();
            pipe.publish(channels::partition(partition), &payload)
                .ignore();
            pipe.publish(channels::TASKS, &payload).ignore();
            pipe.query_async::<()>(&mut conn)
                .await
                .map(|()| 1)
                .map_err(|e| e.to_string())
        }
        .boxed()
    });
    let timed = args
        .stretch
        .run(
            "limit",
            "redis_publish".into(),
            call,
            args.concurrency,
            SEED,
        )
        .await;
    timed.require_some("publish to Redis")?;
    Ok(timed.latencies.summary(
        "redis_publish",
        "PUBLISH to a task's, its partition's and the tasks channel, one pipelined round trip",
        timed.elapsed,
    ))
}

/// Runs the scenario.
///
/// # Errors
/// pgbench missing or failing, the scratch schema not created, Redis unreachable.
async fn run(target: &mut Target, args: LimitArgs) -> Result<Report, BenchError> {
    let binary = find_pgbench(args.pgbench.as_deref())?;
    let url = target
        .database_url
        .clone()
        .ok_or_else(|| BenchError::Usage("bench limit needs --database-url".into()))?;
    let pool = target.pool()?.clone();
    let redis_url = args.redis_url.clone().or_else(|| target.redis_url.clone());
    let version = tokio::process::Command::new(&binary)
        .arg("--version")
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    say(format!("limit: {version} ({})", binary.display()));
    let scripts = shapes::shapes().map_err(BenchError::store("build the pgbench scripts"))?;
    sqlx::raw_sql(shapes::SETUP)
        .execute(&pool)
        .await
        .map_err(BenchError::db("create the scratch schema taskpod_limit"))?;
    let dir = std::env::temp_dir().join(format!("taskpod-bench-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Failed(format!("create {}: {e}", dir.display())))?;
    let mut latencies = Vec::new();
    let mut outcome = Ok(());
    for shape in &scripts {
        match pgbench(&binary, &url, shape, &args, &dir).await {
            Ok(summary) => latencies.push(summary),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let dropped = sqlx::raw_sql(shapes::TEARDOWN).execute(&pool).await;
    outcome?;
    dropped.map_err(BenchError::db("drop the scratch schema taskpod_limit"))?;
    let mut notes = vec![
        format!(
            "pgbench -M prepared -c {c} -j {j} on copies of our tables in the scratch \
             schema {schema} (dropped again); each transaction's latency from pgbench's log",
            c = args.concurrency,
            schema = shapes::SCHEMA,
            j = args.concurrency.min(2)
        ),
        "pgbench (15) reads its clock lazily, so under concurrency some transactions are \
         logged at ~0 µs and others absorb that time: counts, rates and means are exact, \
         pgbench's percentiles are approximate"
            .to_owned(),
    ];
    match &redis_url {
        Some(url) => latencies.push(redis_publish(url, &args).await?),
        None => notes.push("no --redis-url: Redis was not measured".into()),
    }
    let figures = latencies
        .iter()
        .map(|s| Figure::rate(s.name, format!("{}/s", s.name), s.count, s.elapsed))
        .collect();
    Ok(Report {
        scenario: "limit",
        parameters: [
            &[("concurrency", args.concurrency.into())],
            args.stretch.parameters().as_slice(),
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies,
        figures,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_log_lines_give_start_and_latency() {
        // client 0, transaction 5, 1234 µs, script 0, ended at 1700000000.500000
        let (start, latency) = parse_log_line("0 5 1234 0 1700000000 500000").unwrap();
        assert_eq!(latency, 1234);
        assert_eq!(start, 1_700_000_000_500_000 - 1234);
        assert_eq!(parse_log_line("garbage"), None);
        assert_eq!(parse_log_line("0 5 failed 0 1700000000 500000"), None);
    }

    #[test]
    fn only_transactions_started_in_the_timed_stretch_count() {
        let s = 1_000_000;
        let samples = [(0, 10), (s / 2, 20), (s, 30), (2 * s, 40), (3 * s, 50)];
        let l = timed_latencies(&samples, Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(l.count(), 2, "starts at 1 s and 2 s, not 0, 0.5 or 3 s");
        assert_eq!(
            timed_latencies(&[], Duration::ZERO, Duration::from_secs(1)).count(),
            0
        );
    }

    #[test]
    fn progress_lines_are_shortened() {
        let line = "progress: 2.0 s, 4523.1 tps, lat 3.535 ms stddev 1.282, 0 failed";
        assert_eq!(
            progress_of(line).as_deref(),
            Some("4523.1 tps, lat 3.535 ms (at 2.0 s)")
        );
        assert_eq!(progress_of("pgbench (15.18)"), None);
    }
}
