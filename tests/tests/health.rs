//! `taskpod health` against the real servers, as the compose healthchecks and the Helm
//! test run it: SERVING (exit 0) from an API replica with authentication on but no token,
//! and from a worker's health port; a closed port and an unknown service are failures
//! with their own exit codes.

use anyhow::ensure;
use sha2::{Digest as _, Sha256};
use taskpod_e2e::cli::{CliDb, Taskpod};
use taskpod_e2e::spawn_api;
use taskpod_e2e::worker::WorkerProcess;

#[tokio::test]
async fn health_is_serving_on_an_api_replica_without_a_token() -> anyhow::Result<()> {
    let db = CliDb::create().await?;
    let sha256: String = Sha256::digest(b"health-test-token")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tokens = format!(r#"[{{principal="ci", sha256="{sha256}"}}]"#);
    let api = spawn_api(
        &db.url,
        &[
            ("TASKPOD_AUTH__ENABLED", "true"),
            ("TASKPOD_AUTH__TOKENS", &tokens),
        ],
    )
    .await?;
    let cli = Taskpod::new(&api.endpoint(), "")?;

    let out = cli.run(&["health"]).await?;
    ensure!(out.code == 0, "the whole server is SERVING: {out}");
    ensure!(out.stdout == "SERVING\n", "{out}");

    // The service readiness probes name, and JSON output.
    let out = cli
        .run(&[
            "health",
            "--service",
            "taskpod.v1.TaskService",
            "-o",
            "json",
        ])
        .await?;
    ensure!(out.code == 0, "{out}");
    ensure!(out.json()?["status"] == "SERVING", "{out}");

    // The same server, while the authenticated service still refuses the caller.
    let out = cli.run(&["task", "list"]).await?;
    ensure!(out.code == 6, "task calls still need the token: {out}");

    let out = cli.run(&["health", "--service", "no.such.Service"]).await?;
    ensure!(out.code == 3, "an unknown service is NOT_FOUND: {out}");
    Ok(())
}

#[tokio::test]
async fn health_is_serving_on_a_workers_health_port() -> anyhow::Result<()> {
    let db = CliDb::create().await?;
    let worker = WorkerProcess::spawn(&db.test_db(), "health-w1", &[]).await?;
    let cli = Taskpod::new(&format!("http://{}", worker.health_addr), "")?;
    let out = cli.run(&["health"]).await?;
    ensure!(out.code == 0, "{out}");
    ensure!(out.stdout == "SERVING\n", "{out}");
    // `host:port` works too (it means http://).
    let out = cli
        .run(&["health", "--address", &worker.health_addr])
        .await?;
    ensure!(out.code == 0, "{out}");
    Ok(())
}

#[tokio::test]
async fn health_against_a_closed_port_exits_with_seven() -> anyhow::Result<()> {
    // A port that was just free: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cli = Taskpod::new(&format!("http://127.0.0.1:{port}"), "")?;
    let out = cli.run(&["health", "--timeout", "2s"]).await?;
    ensure!(out.code == 7, "unreachable is 7: {out}");
    ensure!(out.stdout.is_empty(), "no status is printed: {out}");
    ensure!(out.stderr.starts_with("error: unavailable"), "{out}");
    Ok(())
}
