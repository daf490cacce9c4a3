//! A private Redis for `taskpod dev` and `taskpod bench --dev`, run from the system's
//! `redis-server` as a child process: no persistence (the bus carries hints, not data),
//! loopback only, a free port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The Debian package that provides the binary.
const PACKAGE: &str = "redis-server";
/// How long Redis may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error(
        "redis-server is not installed; install the Debian package `{PACKAGE}` (or run scripts/dev.sh)"
    )]
    NotInstalled,
    #[error("could not pick a free port for redis")]
    Port(#[source] std::io::Error),
    #[error("could not start redis-server")]
    Spawn(#[source] std::io::Error),
    #[error("redis-server did not accept connections on port {0} in time (log: {1})")]
    NotReady(u16, PathBuf),
}

/// The running server; killed when dropped, stopped cleanly by [`LocalRedis::stop`].
#[derive(Debug)]
pub struct LocalRedis {
    port: u16,
    child: Child,
}

impl LocalRedis {
    /// Starts `redis-server` with its log in `dir`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub async fn start(dir: &Path) -> Result<Self, RedisError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(RedisError::Port)?
            .port();
        std::fs::create_dir_all(dir).map_err(RedisError::Spawn)?;
        let log = dir.join("redis.log");
        let mut command = Command::new("redis-server");
        // A `taskpod` killed with SIGKILL must not leave its Redis behind.
        super::processes::die_with_parent(&mut command);
        let child = command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    RedisError::NotInstalled
                } else {
                    RedisError::Spawn(e)
                }
            })?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self { port, child });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(RedisError::NotReady(port, log))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
