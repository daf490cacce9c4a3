//! The `taskpod-worker` nodes and `taskpod-api` replicas of a local cluster (`taskpod
//! dev`, `taskpod bench --dev`).
//!
//! Both binaries are found beside this executable (or on `PATH`) and started with
//! loopback listeners on free ports; each prints one line on stdout when ready, which
//! is read here, and logs to `<data-dir>/logs/<name>.log`. Replicas run with
//! authentication off and one page-token key shared by all of them, and are also
//! checked with gRPC health until SERVING. Everything is stopped with SIGTERM (a drain),
//! then SIGKILL after a grace period; if the `taskpod` that started them is killed, the
//! kernel sends them SIGTERM.
//!
//! The children inherit no `TASKPOD_*` variable from our environment: the servers read
//! every such variable as a setting and refuse the ones they do not know (the CLI's own
//! `TASKPOD_ADDRESS`, `TASKPOD_PG_BINDIR`, ...).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The server binaries.
pub const API_BIN: &str = "taskpod-api";
pub const WORKER_BIN: &str = "taskpod-worker";
/// How long a process may take to print its ready line, and a replica to report
/// SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to drain after SIGTERM before it is killed. Above the
/// servers' default drain limits (10 s), so a clean drain is never cut short.
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "{name} not found next to {} nor on PATH; build it (`cargo build --workspace \
         --bins`) or pass {flag}",
        beside.display()
    )]
    NotFound {
        name: &'static str,
        flag: &'static str,
        beside: PathBuf,
    },
    #[error("{0} is not a file")]
    NotAFile(PathBuf),
    #[error("could not create {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; the end of {log}:\n{tail}")]
    Exited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} did not {what} within {START_TIMEOUT:?}; see {log}")]
    Timeout {
        name: String,
        what: &'static str,
        log: PathBuf,
    },
    #[error("{name} printed {line:?} instead of its ready line")]
    Unexpected { name: String, line: String },
}

/// Finds a server binary: `explicit`, else beside the running `taskpod`, else on
/// `PATH`.
///
/// # Errors
/// [`ProcessError::NotFound`] naming where it looked, [`ProcessError::NotAFile`] for an
/// explicit path that is not a file.
pub fn find_binary(
    name: &'static str,
    flag: &'static str,
    explicit: Option<&Path>,
) -> Result<PathBuf, ProcessError> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(ProcessError::NotAFile(path.to_path_buf()))
        };
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let beside = exe
        .parent()
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file());
    if let Some(path) = beside {
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    on_path.ok_or(ProcessError::NotFound {
        name,
        flag,
        beside: exe,
    })
}

/// One running child: a replica or a worker.
#[derive(Debug)]
pub struct Managed {
    /// `api-1`, `worker-2`: also the log's name.
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

/// What every child of one cluster shares.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub api_bin: PathBuf,
    pub worker_bin: PathBuf,
    pub database_url: String,
    /// Signs page and resume tokens; the same on every replica, so a token from one is
    /// accepted by the others.
    pub page_token_key: String,
    pub log_dir: PathBuf,
    /// The status bus every child announces on and workers wake up from.
    pub bus_url: String,
    /// More settings for every worker (`taskpod bench e2e` runs `sleep` without delays).
    pub worker_env: Vec<(String, String)>,
}

/// A ready replica.
#[derive(Debug)]
pub struct Replica {
    pub process: Managed,
    pub addr: SocketAddr,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A registered worker node.
#[derive(Debug)]
pub struct Worker {
    pub process: Managed,
    pub node: String,
}

impl ClusterConfig {
    /// Starts worker `index` and waits until it registered its node.
    ///
    /// # Errors
    /// When it cannot start, exits, or does not register in time.
    pub async fn start_worker(&self, index: usize) -> Result<Worker, ProcessError> {
        let name = format!("worker-{index}");
        let mut env = vec![
            ("TASKPOD_NAME", format!("dev-worker-{index}")),
            ("TASKPOD_STORE__URL", self.database_url.clone()),
            ("TASKPOD_HEALTH_LISTEN", "127.0.0.1:0".to_owned()),
            ("TASKPOD_BUS__URL", self.bus_url.clone()),
        ];
        env.extend(self.worker_env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let (mut process, line) = self.spawn(&self.worker_bin, name, &env).await?;
        // `taskpod-worker <node> health on <addr>`
        let node = line
            .strip_prefix("taskpod-worker ")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        match node {
            Some(node) => Ok(Worker { process, node }),
            None => Err(process.unexpected(line).await),
        }
    }

    /// Starts replica `index` and waits until it listens and reports SERVING.
    ///
    /// # Errors
    /// When it cannot start, exits, or is not ready in time.
    pub async fn start_replica(&self, index: usize) -> Result<Replica, ProcessError> {
        let name = format!("api-{index}");
        let env = [
            ("TASKPOD_LISTEN", "127.0.0.1:0".to_owned()),
            ("TASKPOD_STORE__URL", self.database_url.clone()),
            ("TASKPOD_AUTH__ENABLED", "false".to_owned()),
            (
                "TASKPOD_PAGE_TOKENS__CURRENT_KEY",
                self.page_token_key.clone(),
            ),
            ("TASKPOD_BUS__URL", self.bus_url.clone()),
        ];
        let (mut process, line) = self.spawn(&self.api_bin, name, &env).await?;
        // `taskpod-api listening on <addr>[ metrics on <addr>]`
        let addr = line
            .strip_prefix("taskpod-api listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok());
        let Some(addr) = addr else {
            return Err(process.unexpected(line).await);
        };
        let replica = Replica { process, addr };
        wait_serving(replica).await
    }

    /// Spawns `binary` and reads its first stdout line.
    async fn spawn(
        &self,
        binary: &Path,
        name: String,
        env: &[(&str, String)],
    ) -> Result<(Managed, String), ProcessError> {
        std::fs::create_dir_all(&self.log_dir).map_err(|source| ProcessError::Log {
            path: self.log_dir.clone(),
            source,
        })?;
        let log = self.log_dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).map_err(|source| ProcessError::Log {
            path: log.clone(),
            source,
        })?;
        let mut command = Command::new(binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TASKPOD_") {
                command.env_remove(key);
            }
        }
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            // The log is a file: no terminal colour codes in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            // Killed if the `taskpod` that started it unwinds without stopping it.
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: binary.to_path_buf(),
            source,
        })?;
        let stdout = child.stdout.take();
        let mut process = Managed { name, log, child };
        let Some(stdout) = stdout else {
            return Err(process.exited().await);
        };
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        // The servers log to stderr; anything more on stdout is drained so that it can
        // never block on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        match line {
            Err(_) => Err(process.timeout("print its ready line")),
            Ok(Ok(Some(line))) => Ok((process, line)),
            Ok(Ok(None) | Err(_)) => Err(process.exited().await),
        }
    }
}

/// Polls `grpc.health.v1.Health/Check` until the replica reports SERVING.
async fn wait_serving(mut replica: Replica) -> Result<Replica, ProcessError> {
    let url = replica.url();
    let poll = async {
        loop {
            let channel = match tonic::transport::Endpoint::from_shared(url.clone()) {
                Ok(endpoint) => endpoint.connect().await.ok(),
                Err(_) => None,
            };
            if let Some(mut client) = channel.map(HealthClient::new) {
                let request = tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                if let Ok(response) = client.check(request).await
                    && response.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let process = &mut replica.process;
    let outcome = tokio::select! {
        () = poll => None,
        _ = process.child.wait() => Some(false),
        () = tokio::time::sleep(START_TIMEOUT) => Some(true),
    };
    match outcome {
        None => Ok(replica),
        Some(false) => Err(replica.process.exited().await),
        Some(true) => Err(replica.process.timeout("report SERVING")),
    }
}

impl Managed {
    /// The process id until it is reaped (`taskpod bench` reads a worker's memory and
    /// kills workers).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn timeout(&self, what: &'static str) -> ProcessError {
        ProcessError::Timeout {
            name: self.name.clone(),
            what,
            log: self.log.clone(),
        }
    }

    async fn unexpected(&mut self, line: String) -> ProcessError {
        let _ = self.child.start_kill();
        ProcessError::Unexpected {
            name: self.name.clone(),
            line,
        }
    }

    async fn exited(&mut self) -> ProcessError {
        let status = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => "still running, stdout closed".into(),
        };
        let tail = std::fs::read_to_string(&self.log)
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .unwrap_or_default();
        ProcessError::Exited {
            name: self.name.clone(),
            status,
            log: self.log.clone(),
            tail,
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after the grace period.
    ///
    /// # Errors
    /// When the process cannot be waited for.
    pub async fn stop(mut self) -> io::Result<ExitStatus> {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            // ESRCH (already gone) is fine: the wait below reports how it ended.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(process = %self.name, "did not drain in time; killing it");
                self.child.kill().await?;
                self.child.wait().await
            }
        }
    }
}

/// Asks the kernel to SIGTERM the child when the thread that spawned it dies, so a
/// `taskpod` killed with SIGKILL leaves no server behind. The spawning thread is a
/// runtime worker (or the main thread), which lives as long as the process.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(command: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: it makes two syscalls (prctl, getppid) and
    // builds an io::Error from an errno, none of which allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
            // The parent may have died between fork and prctl: then nobody would
            // signal us, so do not start at all.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_binary_must_exist() {
        let err = find_binary(
            API_BIN,
            "--api-bin",
            Some(Path::new("/nonexistent/taskpod-api")),
        )
        .unwrap_err();
        assert!(matches!(err, ProcessError::NotAFile(_)), "{err}");
    }

    #[test]
    fn a_missing_binary_names_the_flag() {
        let err = ProcessError::NotFound {
            name: WORKER_BIN,
            flag: "--worker-bin",
            beside: PathBuf::from("/x/taskpod"),
        };
        assert!(err.to_string().contains("pass --worker-bin"), "{err}");
    }
}
