//! The command line's surface, without a database. Having integration tests here also
//! makes `cargo test` build `target/<profile>/taskpod`, which the end-to-end tests in
//! `tests/` run.

use std::process::Command;

fn taskpod(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_taskpod"))
        .args(args)
        .output()
}

#[test]
fn help_lists_the_subcommands() -> std::io::Result<()> {
    let out = taskpod(&["--help"])?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for subcommand in ["task", "pod", "completions", "migrate", "dev"] {
        assert!(
            help.contains(subcommand),
            "{subcommand} missing from:\n{help}"
        );
    }
    Ok(())
}

#[test]
fn dev_with_a_folder_that_is_not_a_bindir_fails_clearly() -> std::io::Result<()> {
    let data_dir = std::env::temp_dir().join(format!("taskpod-cli-test-{}", std::process::id()));
    let out = taskpod(&[
        "dev",
        "--once",
        "--pg-bindir",
        "/nonexistent",
        "--data-dir",
        &data_dir.to_string_lossy(),
    ])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent has no initdb and pg_ctl"),
        "unexpected error output:\n{stderr}"
    );
    // It fails before it touches the data folder.
    assert!(!data_dir.exists());
    Ok(())
}

#[test]
fn migrate_reports_why_it_cannot_connect() -> std::io::Result<()> {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let out = taskpod(&[
        "migrate",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/taskpod",
    ])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Connection refused"),
        "unexpected error output:\n{stderr}"
    );
    Ok(())
}

#[test]
fn task_help_lists_every_verb() -> std::io::Result<()> {
    let out = taskpod(&["task", "--help"])?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for verb in [
        "create",
        "get",
        "list",
        "count",
        "cancel",
        "complete",
        "transition",
        "events",
        "watch",
        "wait",
    ] {
        assert!(help.contains(verb), "{verb} missing from:\n{help}");
    }
    Ok(())
}

#[test]
fn completions_are_generated_for_each_shell() -> std::io::Result<()> {
    for (shell, marker) in [
        ("bash", "_taskpod()"),
        ("zsh", "#compdef taskpod"),
        ("fish", "complete -c taskpod"),
        ("elvish", "taskpod"),
        ("powershell", "taskpod"),
    ] {
        let out = taskpod(&["completions", shell])?;
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        // Nouns and verbs are completed, and so are the statuses a flag takes.
        assert!(
            script.contains("transition"),
            "{shell} script lacks the verbs"
        );
    }
    let bash = taskpod(&["completions", "bash"])?;
    assert!(String::from_utf8_lossy(&bash.stdout).contains("spec_clarification"));
    let out = taskpod(&["completions", "tcsh"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn dev_without_the_api_binary_says_where_it_looked() -> std::io::Result<()> {
    let data_dir =
        std::env::temp_dir().join(format!("taskpod-cli-test-api-{}", std::process::id()));
    let out = taskpod(&[
        "dev",
        "--once",
        "--api-bin",
        "/nonexistent/taskpod-api",
        "--data-dir",
        &data_dir.to_string_lossy(),
    ])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/taskpod-api is not a file"),
        "unexpected error output:\n{stderr}"
    );
    assert!(!data_dir.exists(), "it fails before it starts anything");
    Ok(())
}

#[test]
fn an_unreachable_server_exits_with_seven() -> std::io::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_taskpod"))
        .args(["task", "get", "01a20000-0000-7000-8000-000000000000"])
        .env("TASKPOD_ADDRESS", "http://127.0.0.1:1")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()?;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: unavailable: "), "{stderr}");
    assert!(stderr.contains("caused by: "), "{stderr}");
    Ok(())
}

/// A report as `taskpod bench start --json` prints it, with a p50 and an error count.
fn start_report(p50_ms: f64, errors: u64) -> String {
    format!(
        r#"{{"scenario":"start","parameters":{{"tasks":50,"concurrency":4}},"cluster":{{"mode":"dev","address":"http://127.0.0.1:1","workers":2,"replicas":1}},"latencies":{{"start_to_running":{{"what":"StartPod until the pod runs","count":50,"elapsed_s":1.0,"rate_per_s":50.0,"min_ms":1.0,"mean_ms":2.0,"p50_ms":{p50_ms},"p90_ms":3.0,"p99_ms":4.0,"p999_ms":4.0,"max_ms":4.0}}}},"figures":{{"timed_calls":50,"errors":{errors}}},"notes":[]}}"#
    )
}

#[test]
fn bench_compare_shows_b_over_a_and_fails_below_the_factor() -> std::io::Result<()> {
    let dir = std::env::temp_dir().join(format!("taskpod-cli-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(dir.join("a.json"), start_report(2.0, 0))?;
    std::fs::write(dir.join("same.json"), start_report(2.0, 0))?;
    std::fs::write(dir.join("slower.json"), start_report(3.0, 1))?;
    std::fs::write(
        dir.join("other.json"),
        start_report(2.0, 0).replace("\"start\"", "\"create\""),
    )?;

    // The same figures: compared, exit 0 even with a factor.
    let out = taskpod(&[
        "bench",
        "compare",
        &path("a.json"),
        &path("same.json"),
        "--fail-below",
        "0.9",
    ])?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("compare: start\n"), "{text}");
    assert!(text.contains("ok: none of"), "{text}");

    // Slower and with errors: shown without a factor, exit 14 with one.
    let out = taskpod(&["bench", "compare", &path("a.json"), &path("slower.json")])?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let p50 = text
        .lines()
        .find(|l| l.starts_with("start_to_running.p50_ms"))
        .expect("a p50 row");
    assert!(p50.contains("1.500") && p50.ends_with("worse"), "{p50}");
    let out = taskpod(&[
        "bench",
        "compare",
        &path("a.json"),
        &path("slower.json"),
        "--fail-below",
        "0.9",
        "-o",
        "json",
    ])?;
    assert_eq!(out.status.code(), Some(14), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let regressed: Vec<&str> = json["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["verdict"] == "regressed" || r["verdict"] == "rose_from_zero")
        .map(|r| r["measure"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(regressed, ["start_to_running.p50_ms", "errors"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 number(s) of B are worse"), "{stderr}");

    // Different scenarios, a missing file, a bad factor: usage errors.
    for args in [
        vec![path("a.json"), path("other.json")],
        vec![path("a.json"), path("missing.json")],
        vec![
            path("a.json"),
            path("same.json"),
            "--fail-below".into(),
            "2".into(),
        ],
    ] {
        let mut all = vec!["bench".to_owned(), "compare".to_owned()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = taskpod(&all)?;
        assert_eq!(out.status.code(), Some(2), "{all:?}: {out:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
