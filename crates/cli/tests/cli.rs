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
    for subcommand in ["migrate", "dev"] {
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
