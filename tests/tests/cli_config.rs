//! Where the CLI's connection settings come from, end to end: bearer tokens against a
//! server with authentication on, and the precedence flags > `TASKPOD_*` > profile >
//! defaults with a real config file. Also `task wait` against a real worker, for the
//! endings only a handler can produce.
#![allow(clippy::unwrap_used)]

use anyhow::{Context as _, ensure};
use sha2::{Digest as _, Sha256};
use taskpod_e2e::cli::{CliDb, CliOutput, Taskpod};
use taskpod_e2e::spawn_api;
use taskpod_e2e::worker::WorkerProcess;

fn ok(out: &CliOutput) -> anyhow::Result<()> {
    ensure!(out.code == 0, "expected success: {out}");
    Ok(())
}

fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn tokens_authenticate_and_a_missing_or_wrong_one_exits_with_six() -> anyhow::Result<()> {
    let db = CliDb::create().await?;
    db.test_db().offer_kinds(&["manual"], &[]).await?;
    let tokens = format!(
        r#"[{{principal="ci", sha256="{}", act_on_behalf=false}}]"#,
        sha256_hex("s3cret-token")
    );
    let api = spawn_api(
        &db.url,
        &[
            ("TASKPOD_AUTH__ENABLED", "true"),
            ("TASKPOD_AUTH__TOKENS", &tokens),
        ],
    )
    .await?;
    let mut cli = Taskpod::new(&api.endpoint(), "")?;

    let out = cli.run(&["task", "list"]).await?;
    ensure!(out.code == 6, "no token is 6: {out}");
    ensure!(out.stderr.starts_with("error: unauthenticated: "), "{out}");
    let out = cli.run(&["task", "list", "--token", "wrong"]).await?;
    ensure!(out.code == 6, "a wrong token is 6: {out}");

    let out = cli
        .run(&[
            "task",
            "create",
            "--title",
            "t",
            "--token",
            "s3cret-token",
            "-o",
            "json",
        ])
        .await?;
    ok(&out)?;
    // The principal is the actor when the request names none.
    ensure!(out.json()?["created_by"] == "ci", "{out}");

    cli.set_env("TASKPOD_TOKEN", "s3cret-token");
    let out = cli.run(&["task", "count"]).await?;
    ok(&out)?;
    ensure!(out.stdout.trim() == "1", "{out}");
    // The flag beats the variable.
    let out = cli.run(&["task", "count", "--token", "wrong"]).await?;
    ensure!(out.code == 6, "{out}");

    let out = cli
        .run(&["task", "create", "--title", "t", "--actor", "mallory"])
        .await?;
    ensure!(out.code == 6, "acting for another actor is 6: {out}");
    ensure!(
        out.stderr.starts_with("error: permission denied: "),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn flags_beat_env_which_beats_the_profile() -> anyhow::Result<()> {
    let db = CliDb::create().await?;
    db.test_db().offer_kinds(&["manual"], &[]).await?;
    let api = spawn_api(&db.url, &[]).await?;
    let mut cli = Taskpod::new("", "")?;
    // Settings come only from the files and flags below.
    cli.set_env("TASKPOD_ADDRESS", "");
    cli.set_env("TASKPOD_ACTOR", "");
    let config = format!(
        r#"
default_profile = "good"

[profiles.good]
address = "{}"
actor = "from-profile"

[profiles.dead]
address = "http://127.0.0.1:1"
actor = "from-dead-profile"
"#,
        api.endpoint()
    );
    // The default location: $XDG_CONFIG_HOME/taskpod/config.toml.
    let dir = cli.config_home().join("taskpod");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.toml"), &config)?;

    let created_by = |out: CliOutput| -> anyhow::Result<String> {
        ok(&out)?;
        Ok(out.json()?["created_by"]
            .as_str()
            .context("no created_by")?
            .to_owned())
    };
    let create = ["task", "create", "--title", "t", "-o", "json"];

    // The default profile.
    ensure!(created_by(cli.run(&create).await?)? == "from-profile");
    // The environment beats the profile.
    let out = cli
        .run_with(&create, &[("TASKPOD_ACTOR", "from-env")])
        .await?;
    ensure!(created_by(out)? == "from-env");
    // A flag beats the environment.
    let mut args = create.to_vec();
    args.extend(["--actor", "from-flag"]);
    let out = cli
        .run_with(&args, &[("TASKPOD_ACTOR", "from-env")])
        .await?;
    ensure!(created_by(out)? == "from-flag");

    // Another profile, by flag and by variable: its address is dead.
    let out = cli.run(&["task", "count", "--profile", "dead"]).await?;
    ensure!(out.code == 7, "{out}");
    let out = cli
        .run_with(&["task", "count"], &[("TASKPOD_PROFILE", "dead")])
        .await?;
    ensure!(out.code == 7, "{out}");
    // ... unless the environment or a flag names the address.
    let live = api.endpoint();
    let out = cli
        .run_with(
            &["task", "count", "--profile", "dead"],
            &[("TASKPOD_ADDRESS", live.as_str())],
        )
        .await?;
    ok(&out)?;
    ensure!(out.stdout.trim() == "3", "{out}");
    let out = cli
        .run(&["task", "count", "--profile", "dead", "--address", &live])
        .await?;
    ok(&out)?;
    // --profile beats TASKPOD_PROFILE.
    let out = cli
        .run_with(
            &["task", "count", "--profile", "good"],
            &[("TASKPOD_PROFILE", "dead")],
        )
        .await?;
    ok(&out)?;

    let out = cli.run(&["task", "count", "--profile", "nope"]).await?;
    ensure!(
        out.code == 2 && out.stderr.contains("\"nope\" is not defined"),
        "{out}"
    );

    // An explicit --config replaces the default file.
    let other = cli.config_home().join("other.toml");
    std::fs::write(
        &other,
        "default_profile = \"x\"\n[profiles.x]\naddress = \"http://127.0.0.1:1\"\n",
    )?;
    let other = other.to_string_lossy().into_owned();
    let out = cli.run(&["task", "count", "--config", &other]).await?;
    ensure!(
        out.code == 7,
        "the other file's default profile applies: {out}"
    );
    let out = cli
        .run(&["task", "count", "--config", &other, "--profile", "good"])
        .await?;
    ensure!(out.code == 2, "{out}");
    let out = cli
        .run(&["task", "count", "--config", "/nonexistent.toml"])
        .await?;
    ensure!(out.code == 2, "{out}");
    Ok(())
}

#[tokio::test]
async fn wait_reports_a_completed_and_a_failed_run_of_a_real_worker() -> anyhow::Result<()> {
    let db = CliDb::create().await?;
    let api = spawn_api(&db.url, &[]).await?;
    let programs = r#"{fail={path="/bin/sh", args=["-c", "exit 3"]}}"#;
    let _worker = WorkerProcess::spawn(
        &db.test_db(),
        "w1",
        &[("TASKPOD_HANDLERS__PROGRAMS", programs)],
    )
    .await?;
    let cli = Taskpod::new(&api.endpoint(), "alice")?;

    let create = |kind: &'static str, payload: &'static str| {
        let cli = &cli;
        async move {
            let out = cli
                .run(&[
                    "task",
                    "create",
                    "--title",
                    kind,
                    "--kind",
                    kind,
                    "--payload",
                    payload,
                    "--auto-start",
                    "-o",
                    "json",
                ])
                .await?;
            ok(&out)?;
            Ok::<_, anyhow::Error>(out.json()?["task_id"].as_str().context("id")?.to_owned())
        }
    };
    let sleeper = create("sleep", "{}").await?;
    let failing = create("exec", r#"{"program": "fail"}"#).await?;

    let out = cli
        .run(&["task", "wait", &sleeper, "--timeout", "60s"])
        .await?;
    ensure!(out.code == 0, "the sleep handler completes: {out}");
    let out = cli
        .run(&["task", "wait", &failing, "--timeout", "60s", "-o", "json"])
        .await?;
    ensure!(out.code == 10, "failed is 10: {out}");
    ensure!(out.json()?["status"] == "failed", "{out}");
    ensure!(
        out.stderr.contains(&format!("task {failing} failed")),
        "{out}"
    );
    Ok(())
}
