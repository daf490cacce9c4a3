//! Real `taskpod-api` processes on a fresh, migrated database, and gRPC clients for them.
//!
//! The tests get a running Postgres from `DATABASE_URL` (scripts/test.sh starts one);
//! each [`TestDb`] is a new database on it, so tests never see each other's tasks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use taskpod_proto::v1::task_service_client::TaskServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The page-token key every test replica shares.
pub const PAGE_KEY: &str = "test-page-key-0123456789abcdef";
/// A new database with the migrations applied.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub url: String,
}

impl TestDb {
    /// # Errors
    /// When `DATABASE_URL` is unset or the server refuses.
    pub async fn create() -> anyhow::Result<Self> {
        let admin =
            std::env::var("DATABASE_URL").context("DATABASE_URL must point at a test server")?;
        let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .context("connect to DATABASE_URL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await?;
        pool.close().await;
        let (base, _) = admin
            .rsplit_once('/')
            .context("DATABASE_URL must end in /<database>")?;
        let url = format!("{base}/{name}");
        let pool = sqlx::PgPool::connect(&url).await?;
        taskpod_core::store::MIGRATOR.run(&pool).await?;
        pool.close().await;
        Ok(Self { url })
    }

    /// Registers a node row offering `kinds` and `programs`, as a worker would, for
    /// tests that run no worker (CreateTask refuses kinds nobody offers). No lock backs
    /// it, so a real worker started later would find it dead and remove it.
    ///
    /// # Errors
    /// When the database refuses.
    pub async fn offer_kinds(&self, kinds: &[&str], programs: &[&str]) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(&self.url).await?;
        sqlx::query("INSERT INTO nodes (node_id, name, capacity, kinds, programs) VALUES ($1, 'fixture', 1, $2, $3)")
            .bind(uuid::Uuid::now_v7())
            .bind(kinds.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>())
            .bind(programs.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>())
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok(())
    }
}

/// A `taskpod-api` process, killed when dropped.
#[derive(Debug)]
pub struct ApiProcess {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served, when asked for.
    pub metrics_addr: Option<String>,
    child: Child,
}

impl ApiProcess {
    /// Starts a replica on a free port with auth off, or with the settings `env` gives
    /// (`TASKPOD_*` variables override the defaults here).
    ///
    /// # Errors
    /// When the binary is missing or the process does not print its address in time.
    pub async fn spawn(db: &TestDb, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut all = vec![
            ("TASKPOD_LISTEN", "127.0.0.1:0"),
            ("TASKPOD_STORE__URL", db.url.as_str()),
            ("TASKPOD_AUTH__ENABLED", "false"),
            ("TASKPOD_PAGE_TOKENS__CURRENT_KEY", PAGE_KEY),
            ("TASKPOD_WATCH__POLL_INTERVAL_MS", "50"),
            ("TASKPOD_WATCH__HEARTBEAT_INTERVAL_MS", "500"),
            ("TASKPOD_SHUTDOWN_GRACE_MS", "3000"),
        ];
        all.extend_from_slice(env);
        let (child, rest) =
            crate::spawn_server("taskpod-api", &all, "taskpod-api listening on ").await?;
        // `<addr>[ metrics on <addr>]`
        let mut words = rest.split_whitespace();
        let addr = words
            .next()
            .unwrap_or_default()
            .parse()
            .context("unparsable address")?;
        let metrics_addr = rest
            .split_once(" metrics on ")
            .map(|(_, m)| m.trim().to_owned());
        Ok(Self {
            addr,
            metrics_addr,
            child,
        })
    }

    /// The OpenMetrics text the replica serves (with `TASKPOD_METRICS_LISTEN` set).
    ///
    /// # Errors
    /// When the replica serves no metrics or the endpoint does not answer.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        let addr = self
            .metrics_addr
            .as_deref()
            .context("started without TASKPOD_METRICS_LISTEN")?;
        crate::scrape_metrics(addr).await
    }

    /// The process's resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::os::rss_kib(self.child.id()?)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// # Errors
    /// When the server does not accept the connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.endpoint())?.connect().await?)
    }

    /// # Errors
    /// When the server does not accept the connection.
    pub async fn client(&self) -> anyhow::Result<TaskServiceClient<Channel>> {
        Ok(TaskServiceClient::new(self.channel().await?))
    }

    /// Sends SIGTERM (a graceful drain).
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit.
    ///
    /// # Errors
    /// When it does not exit within `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

/// A task's whole history (up to 1,000 events, one page), as `ListTaskEvents` gives it.
///
/// # Errors
/// The call's status.
pub async fn task_events(
    client: &mut TaskServiceClient<Channel>,
    task_id: &str,
) -> Result<Vec<taskpod_proto::v1::Event>, tonic::Status> {
    let page = client
        .list_task_events(taskpod_proto::v1::ListTaskEventsRequest {
            task_id: task_id.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await?;
    Ok(page.into_inner().events)
}
