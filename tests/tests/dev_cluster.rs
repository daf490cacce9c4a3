//! `taskpod dev`, run as a user runs it: the real binary, the system's PostgreSQL.
//!
//! Needs the `taskpod` binary built (`cargo build -p taskpod-cli`) and PostgreSQL's
//! server binaries installed (`scripts/dev.sh` installs them).

use anyhow::{Context as _, ensure};
use sqlx::{Connection as _, PgConnection};
use taskpod_e2e::{DataDir, DevProcess, run_dev_once, taskpod_bin};

/// The lines the smoke check prints, in order.
const SMOKE_STEPS: [&str; 5] = [
    "smoke: created task ",
    "smoke: requested a start: status active",
    "smoke: cancelled it: status cancelled, phase cancelled",
    // A worker runs the pod, so its pod_started and pod_stopped interleave.
    "smoke: read its stream: ",
    "smoke: listed tasks: ",
];

fn assert_smoke_steps_in_order(stdout: &str) -> anyhow::Result<()> {
    let mut rest = stdout;
    for step in SMOKE_STEPS {
        let at = rest
            .find(step)
            .with_context(|| format!("missing (or out of order) {step:?} in:\n{stdout}"))?;
        rest = &rest[at + step.len()..];
    }
    Ok(())
}

#[tokio::test]
async fn dev_once_runs_the_smoke_check_and_reuses_its_data_dir() -> anyhow::Result<()> {
    let dir = DataDir::new("once")?;

    let first = run_dev_once(dir.path()).await?;
    ensure!(first.status.success(), "first run failed: {first}");
    ensure!(
        first.line("postgres: initialised a new cluster").is_some(),
        "first run did not initialise: {first}"
    );
    ensure!(first.line("database: created taskpod").is_some(), "{first}");
    assert_smoke_steps_in_order(&first.stdout)?;
    ensure!(
        first
            .line("smoke: listed tasks: ")
            .is_some_and(|l| l.ends_with(" 1 created by taskpod-dev in all")),
        "{first}"
    );
    ensure!(
        first
            .line("ready: DATABASE_URL=postgres://postgres@127.0.0.1:")
            .is_some(),
        "{first}"
    );
    for prefix in [
        "workers: worker 1 registered as node ",
        "workers: worker 2 registered as node ",
        "smoke: requested a start: status active, pod running on node ",
        "api: replica 1 listening on 127.0.0.1:",
        "api: replica 2 listening on 127.0.0.1:",
        "ready: API replicas at http://127.0.0.1:",
        "ready: export TASKPOD_ADDRESS=http://127.0.0.1:",
        "api: stopped 2 replicas",
        "workers: stopped 2 workers",
        "postgres: stopped",
    ] {
        ensure!(first.line(prefix).is_some(), "no {prefix:?}: {first}");
    }
    ensure!(
        dir.postmaster_pid().is_none(),
        "postgres still running after --once"
    );

    let second = run_dev_once(dir.path()).await?;
    ensure!(second.status.success(), "second run failed: {second}");
    ensure!(
        second.line("postgres: reusing the cluster in ").is_some(),
        "second run did not reuse the cluster: {second}"
    );
    ensure!(
        second.line("database: taskpod exists").is_some(),
        "{second}"
    );
    ensure!(
        second
            .line("migrations: ")
            .is_some_and(|l| l.contains("no new migrations")),
        "{second}"
    );
    assert_smoke_steps_in_order(&second.stdout)?;
    // The first run's task survived the restart.
    ensure!(
        second
            .line("smoke: listed tasks: ")
            .is_some_and(|l| l.ends_with(" 2 created by taskpod-dev in all")),
        "{second}"
    );
    ensure!(
        dir.postmaster_pid().is_none(),
        "postgres still running after the second --once"
    );
    Ok(())
}

#[tokio::test]
async fn dev_serves_its_database_until_sigterm_then_stops_postgres() -> anyhow::Result<()> {
    let dir = DataDir::new("sigterm")?;
    let mut dev = DevProcess::spawn(dir.path())?;

    let ready = dev.wait_for_line("ready: DATABASE_URL=").await?;
    let url = ready
        .strip_prefix("ready: DATABASE_URL=")
        .context("no url on the ready line")?
        .to_owned();
    let export = dev.wait_for_line("ready: export ").await?;
    dev.wait_for_line("running: ").await?;

    // The printed URL is how users and later binaries reach the cluster.
    let mut conn = PgConnection::connect(&url)
        .await
        .with_context(|| format!("could not connect to {url}"))?;
    let tasks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE created_by = 'taskpod-dev'")
            .fetch_one(&mut conn)
            .await?;
    ensure!(tasks == 1, "expected the smoke task, found {tasks} tasks");
    conn.close().await?;

    // The export line, pasted into a shell, points the CLI at a replica.
    let mut cli = std::process::Command::new(taskpod_bin()?);
    cli.args(["task", "list", "-o", "jsonl"])
        .env("XDG_CONFIG_HOME", dir.path());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TASKPOD_") {
            cli.env_remove(key);
        }
    }
    for assignment in export
        .strip_prefix("ready: export ")
        .context("no export")?
        .split_whitespace()
    {
        let (key, value) = assignment.split_once('=').context("not KEY=VALUE")?;
        cli.env(key, value);
    }
    let out = cli.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.lines().count() == 1 && stdout.contains("\"title\":\"taskpod dev smoke check\""),
        "{stdout}"
    );

    dev.signal("TERM").await?;
    let (status, lines) = dev.wait().await?;
    let stdout = lines.join("\n");
    ensure!(
        status.success(),
        "taskpod dev exited with {status} on SIGTERM:\n{stdout}"
    );
    ensure!(stdout.contains("SIGTERM received, stopping"), "{stdout}");
    ensure!(stdout.contains("api: stopped 2 replicas"), "{stdout}");
    ensure!(stdout.contains("workers: stopped 2 workers"), "{stdout}");
    ensure!(stdout.contains("postgres: stopped"), "{stdout}");
    ensure!(
        dir.postmaster_pid().is_none(),
        "postgres still running after SIGTERM"
    );
    Ok(())
}

#[tokio::test]
async fn dev_adopts_the_postgres_a_killed_run_left_behind() -> anyhow::Result<()> {
    let dir = DataDir::new("adopt")?;
    let mut dev = DevProcess::spawn(dir.path())?;
    let replica = dev.wait_for_line("api: replica 1 listening on ").await?;
    let replica: std::net::SocketAddr = replica
        .strip_prefix("api: replica 1 listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .context("no address")?
        .parse()?;
    dev.wait_for_line("running: ").await?;

    // SIGKILL gives it no chance to stop the server.
    dev.signal("KILL").await?;
    let (status, _) = dev.wait().await?;
    ensure!(!status.success(), "taskpod dev survived SIGKILL");
    // Its replicas go with it (the kernel sends them SIGTERM), Postgres stays.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(replica).await.is_ok() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "replica {replica} outlived the killed taskpod dev"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let orphan = dir
        .postmaster_pid()
        .context("the server was expected to outlive SIGKILL")?;

    let next = run_dev_once(dir.path()).await?;
    ensure!(next.status.success(), "run after the kill failed: {next}");
    ensure!(
        next.line("postgres: adopted the server an earlier run left running")
            .is_some(),
        "the running server was not adopted: {next}"
    );
    assert_smoke_steps_in_order(&next.stdout)?;
    ensure!(next.line("postgres: stopped").is_some(), "{next}");
    ensure!(
        dir.postmaster_pid().is_none(),
        "the adopted server (pid {orphan}) is still running"
    );
    Ok(())
}
