//! The `taskpod` command line run as a user runs it, against real servers.
//!
//! - [`CliDb`]: a fresh database migrated with `taskpod migrate`, dropped when the test
//!   ends;
//! - [`Taskpod`]: runs the binary with a clean environment (no inherited `TASKPOD_*`, an
//!   empty config folder) plus what the test sets, and captures exit code and output.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::{Connection as _, PgConnection};
use tokio::process::{Child, Command};

use crate::api::TestDb;

/// How long one CLI call may take before the test calls it hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A database of its own for one test, migrated by `taskpod migrate`; dropped (with
/// its connections) when this is dropped.
#[derive(Debug)]
pub struct CliDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl CliDb {
    /// Creates `cli_<uuid>` on the server `DATABASE_URL` names and migrates it.
    ///
    /// # Errors
    /// When `DATABASE_URL` is unset, the server refuses, or the migration fails.
    pub async fn create() -> anyhow::Result<Self> {
        let admin_url =
            std::env::var("DATABASE_URL").context("DATABASE_URL must point at a test server")?;
        let name = format!("cli_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .context("connect to DATABASE_URL")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let (base, _) = admin_url
            .rsplit_once('/')
            .context("DATABASE_URL must end in /<database>")?;
        let db = Self {
            url: format!("{base}/{name}"),
            admin_url: admin_url.clone(),
            name,
        };
        let out = Command::new(crate::taskpod_bin()?)
            .args(["migrate", "--database-url", &db.url])
            .env_remove("TASKPOD_STORE__URL")
            .output()
            .await
            .context("run taskpod migrate")?;
        if !out.status.success() {
            bail!(
                "taskpod migrate failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(db)
    }

    /// The same database, for the helpers that take a [`TestDb`].
    pub fn test_db(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
        }
    }
}

impl Drop for CliDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await, and the test's runtime may be shutting down: a thread with
        // a runtime of its own does the cleanup. A failure only leaves a database behind
        // on a throwaway server.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
    }
}

/// What one `taskpod` run printed and how it exited.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// stdout as one JSON document.
    ///
    /// # Errors
    /// When it is not JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {self}"))
    }

    /// stdout as JSON Lines.
    ///
    /// # Errors
    /// When a line is not JSON.
    pub fn jsonl(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?} in {self}")))
            .collect()
    }

    /// Non-empty stdout lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}---",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `taskpod` with a controlled environment.
#[derive(Debug)]
pub struct Taskpod {
    env: Vec<(String, String)>,
    config_home: PathBuf,
}

impl Taskpod {
    /// A runner talking to `address` as `actor`, with an empty config folder (so a
    /// developer's own profiles never leak in).
    ///
    /// # Errors
    /// When the config folder cannot be created.
    pub fn new(address: &str, actor: &str) -> anyhow::Result<Self> {
        let config_home =
            std::env::temp_dir().join(format!("taskpod-cli-e2e-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&config_home)
            .with_context(|| format!("could not create {}", config_home.display()))?;
        Ok(Self {
            env: vec![
                ("TASKPOD_ADDRESS".into(), address.into()),
                ("TASKPOD_ACTOR".into(), actor.into()),
            ],
            config_home,
        })
    }

    /// Sets (or, with an empty value, blanks) a variable for every later run.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// The folder `$XDG_CONFIG_HOME` points at: `taskpod/config.toml` in it is the
    /// default config file.
    pub fn config_home(&self) -> &Path {
        &self.config_home
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(crate::taskpod_bin()?);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TASKPOD_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("XDG_CONFIG_HOME", &self.config_home)
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Runs to completion.
    ///
    /// # Errors
    /// When the binary cannot start or runs past [`CALL_TIMEOUT`].
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        self.run_with(args, &[]).await
    }

    /// Runs with extra variables for this run only.
    ///
    /// # Errors
    /// As [`Taskpod::run`].
    pub async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<CliOutput> {
        let mut cmd = self.command(args)?;
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().context("could not start taskpod")?;
        finish(child, args).await
    }

    /// Starts a long-running command (`watch`, `wait`) to be finished with [`finish`].
    ///
    /// # Errors
    /// When the binary cannot start.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        self.command(args)?
            .spawn()
            .context("could not start taskpod")
    }
}

impl Drop for Taskpod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.config_home);
    }
}

/// Waits for a spawned `taskpod` and collects its output.
///
/// # Errors
/// When it runs past [`CALL_TIMEOUT`].
pub async fn finish(child: Child, args: &[&str]) -> anyhow::Result<CliOutput> {
    let out = tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("taskpod {args:?} did not finish in time"))?
        .context("could not wait for taskpod")?;
    let out = CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if crate::test_log_enabled() {
        eprintln!("taskpod {args:?}: {out}");
    }
    Ok(out)
}
