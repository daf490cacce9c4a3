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
