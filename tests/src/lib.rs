//! Helpers shared by the end-to-end tests: they run the real `taskpod` binary, as a
//! user would, against the system's PostgreSQL.
//!
//! Layout:
//! - [`taskpod_bin`]: where the built binary is;
//! - [`DataDir`]: a scratch `--data-dir` that stops any server left in it and is removed
//!   when dropped;
//! - [`run_dev_once`] and [`DevProcess`]: `taskpod dev` run to completion, or kept
//!   running to be signalled;
//! - [`api`]: a fresh database per test and real `taskpod-api` processes on it
//!   ([`spawn_api`] for a database given by URL);
//! - [`worker`]: real `taskpod-worker` processes;
//! - [`otlp`]: an OTLP receiver the binaries export traces and metrics to; [`traces`]:
//!   one trace as it got it, and the `traceparent`s events carry;
//! - [`cli`]: the `taskpod` client commands run against them, on a database migrated by
//!   `taskpod migrate`;
//! - [`cluster`]: a whole cluster with its own Postgres and Redis, for tests that crash
//!   and restart any part of it; [`proxy`]: a TCP fault proxy to put between a process
//!   and Postgres; [`chaos`]: client histories, fault schedules and the invariant
//!   checker of the crash-storm test.
//!
//! Set `TEST_LOG=1` to see the binary's output as it runs.

pub mod api;
pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod os;
pub mod otlp;
pub mod proxy;
pub mod traces;
pub mod worker;

/// How long [`eventually`] waits for a condition: generous, CI machines have two cores
/// and are busy.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `check` every 100 ms until it holds; panics naming `what` after [`WAIT`] (a
/// test's assertion that something happens, never a timing).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Starts a `taskpod-api` on a free loopback port over the database at `db_url` (auth
/// off unless `extra_env` sets `TASKPOD_AUTH__*`); it is killed when dropped.
///
/// # Errors
/// When the binary is missing or the server does not print its address in time.
pub async fn spawn_api(
    db_url: &str,
    extra_env: &[(&str, &str)],
) -> anyhow::Result<api::ApiProcess> {
    let db = api::TestDb {
        url: db_url.to_owned(),
    };
    api::ApiProcess::spawn(&db, extra_env).await
}

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long one `taskpod dev` may take. Generous: CI machines have two cores and are
/// busy compiling.
pub const DEV_TIMEOUT: Duration = Duration::from_secs(120);

/// The `taskpod` binary of the profile these tests were built with; `TASKPOD_BIN`
/// overrides the location.
///
/// # Errors
/// When the binary is not built yet.
pub fn taskpod_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TASKPOD_BIN") {
        return Ok(PathBuf::from(path));
    }
    binary("taskpod")
}

/// A binary of this workspace, built with the profile these tests were built with.
///
/// An integration test cannot depend on another package's binary, so it is found beside
/// the test executable (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`);
/// `scripts/test.sh` builds every binary before the tests run.
///
/// # Errors
/// When the binary is not built yet.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("could not locate the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not under target/<profile>/deps", exe.display()))?;
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Whether `TEST_LOG=1` asks for the binaries' output.
pub fn test_log_enabled() -> bool {
    test_log()
}

fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some_and(|v| v != "0")
}

/// A fresh `--data-dir` under the system temp folder, which every user can traverse (the
/// server runs as `postgres` when the tests run as root).
///
/// Dropping it stops a server still running in it and deletes it, except when the test
/// is failing: then it is kept for inspection and its path printed.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// # Errors
    /// When the folder cannot be created.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "taskpod-e2e-{label}-{}-{nanos:09}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)
            .with_context(|| format!("could not create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `taskpod dev` keeps the cluster.
    pub fn cluster(&self) -> PathBuf {
        self.path.join("pg").join("data")
    }

    /// The postmaster's pid while a server runs on this cluster (or a crashed one left
    /// its pid file).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.cluster().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            // SIGQUIT is the postmaster's immediate shutdown: nothing here needs a clean
            // checkpoint, and a leftover server would hold a port and shared memory.
            let _ = std::process::Command::new("kill")
                .args(["-s", "QUIT", &pid.to_string()])
                .status();
        }
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a finished `taskpod dev` printed.
#[derive(Debug)]
pub struct DevOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl DevOutput {
    /// The first stdout line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }
}

impl fmt::Display for DevOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}---",
            self.status, self.stdout, self.stderr
        )
    }
}

fn dev_command(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(taskpod_bin()?);
    cmd.arg("dev")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A hung run must not outlive its test.
        .kill_on_drop(true);
    Ok(cmd)
}

/// Runs `taskpod dev --once` on `data_dir` to completion.
///
/// # Errors
/// When the binary is missing or the run exceeds [`DEV_TIMEOUT`]; a failing run is an
/// `Ok` with its status, for the test to judge.
pub async fn run_dev_once(data_dir: &Path) -> anyhow::Result<DevOutput> {
    let child = dev_command(data_dir, &["--once"])?
        .spawn()
        .context("could not start taskpod dev")?;
    let out = tokio::time::timeout(DEV_TIMEOUT, child.wait_with_output())
        .await
        .context("taskpod dev --once did not finish in time")?
        .context("could not wait for taskpod dev")?;
    let out = DevOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if test_log() {
        eprintln!("taskpod dev --once: {out}");
    }
    Ok(out)
}

/// A `taskpod dev` left running (no `--once`), to be signalled. Killed if dropped.
#[derive(Debug)]
pub struct DevProcess {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Every stdout line read so far.
    pub lines: Vec<String>,
}

impl DevProcess {
    /// # Errors
    /// When the binary is missing or cannot start.
    pub fn spawn(data_dir: &Path) -> anyhow::Result<Self> {
        let mut cmd = dev_command(data_dir, &[])?;
        if test_log() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().context("could not start taskpod dev")?;
        let stdout = child
            .stdout
            .take()
            .context("taskpod dev has no stdout pipe")?;
        Ok(Self {
            child,
            stdout: BufReader::new(stdout).lines(),
            lines: Vec::new(),
        })
    }

    /// Reads stdout until a line starts with `prefix`, and returns it.
    ///
    /// # Errors
    /// When stdout ends first or [`DEV_TIMEOUT`] passes.
    pub async fn wait_for_line(&mut self, prefix: &str) -> anyhow::Result<String> {
        let read = async {
            while let Some(line) = self.stdout.next_line().await? {
                if test_log() {
                    eprintln!("taskpod dev: {line}");
                }
                self.lines.push(line.clone());
                if line.starts_with(prefix) {
                    return Ok(Some(line));
                }
            }
            Ok::<_, std::io::Error>(None)
        };
        match tokio::time::timeout(DEV_TIMEOUT, read).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!(
                "stdout ended before a line starting with {prefix:?}:\n{}",
                self.lines.join("\n")
            ),
            Ok(Err(err)) => Err(err).context("could not read taskpod dev's stdout"),
            Err(_) => bail!(
                "no line starting with {prefix:?} in time:\n{}",
                self.lines.join("\n")
            ),
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    ///
    /// # Errors
    /// When the process is gone or `kill` fails.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("taskpod dev has already exited")?;
        let status = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .await
            .context("could not run kill")?;
        if !status.success() {
            bail!("kill -s {name} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Reads the rest of stdout and waits for the exit.
    ///
    /// # Errors
    /// When it does not exit within [`DEV_TIMEOUT`].
    pub async fn wait(mut self) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        let finish = async {
            while let Some(line) = self.stdout.next_line().await? {
                if test_log() {
                    eprintln!("taskpod dev: {line}");
                }
                self.lines.push(line);
            }
            self.child.wait().await
        };
        let status = tokio::time::timeout(DEV_TIMEOUT, finish)
            .await
            .context("taskpod dev did not exit in time")?
            .context("could not wait for taskpod dev")?;
        Ok((status, self.lines))
    }
}

/// Spawns a server binary of this workspace with `env` and returns it with the rest of
/// its first stdout line after `prefix` (how the servers announce where they are). The
/// child is killed when dropped; its logs show with `TEST_LOG=1`.
///
/// # Errors
/// When the binary is missing, exits first, or says something else first.
pub async fn spawn_server(
    binary: &str,
    env: &[(&str, &str)],
    prefix: &str,
) -> anyhow::Result<(Child, String)> {
    const START_TIMEOUT: Duration = Duration::from_secs(60);
    let mut cmd = Command::new(self::binary(binary)?);
    let log = test_log();
    cmd.env("RUST_LOG", if log { "info" } else { "warn" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if log { Stdio::inherit() } else { Stdio::null() })
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("spawn {binary}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .with_context(|| format!("{binary} did not start in time"))??;
    match line.as_deref().and_then(|l| l.strip_prefix(prefix)) {
        Some(rest) => Ok((child, rest.trim().to_owned())),
        None => {
            let status = child.wait().await?;
            bail!("{binary} exited ({status}) before announcing itself; first line {line:?}");
        }
    }
}

/// The value of `series` (a name, with its labels as printed) in Prometheus or
/// OpenMetrics text, if it is there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The value of `series` as an integer; panics naming the series when it is missing
/// (a test's metric that is not exported is a failure).
pub fn metric_count(text: &str, series: &str) -> i64 {
    metric_value(text, series).unwrap_or_else(|| panic!("{series} not exported:\n{text}")) as i64
}

/// `GET /metrics` at `addr`: the whole response, status line and headers included.
///
/// # Errors
/// When the endpoint does not answer 200.
pub async fn scrape_metrics(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    anyhow::ensure!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    Ok(body)
}
