//! The `exec` guard on its own: the real `taskpod-worker exec-guard` process, fed (or
//! not) from the test as a worker would, around shell programs whose trees include a
//! background grandchild and an orphaned `setsid` great-grandchild. No store, no worker.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taskpod_worker::handlers::exec::guard::StartError;
use taskpod_worker::handlers::exec::launch::{Guarded, Launch};
use taskpod_worker::liveness::{Liveness, LivenessFeed};

const WAIT: Duration = Duration::from_secs(20);

/// A scratch folder of scripts; every process of their trees has the folder in its
/// command line, so they can be counted.
struct Programs {
    dir: PathBuf,
}

impl Programs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "taskpod-guard-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let programs = Self { dir };
        let d = programs.dir.display().to_string();
        programs.write("spin.sh", "while :; do sleep 0.05; done");
        // The program, a grandchild in its group, and a great-grandchild that left the
        // group and the session and whose parent exited (an orphan).
        programs.write(
            "tree.sh",
            &format!("sh {d}/spin.sh child &\nsh -c \"setsid sh {d}/spin.sh setsid &\"\nwait"),
        );
        programs.write("exits.sh", &format!("sh {d}/spin.sh left &\nexit 7"));
        programs.write("signals.sh", "kill -TERM $$\nsleep 5");
        programs
    }

    fn write(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Processes running one of these scripts.
    fn running(&self) -> usize {
        let out = std::process::Command::new("pgrep")
            .arg("-f")
            .arg(self.dir.to_str().unwrap())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    async fn until_running(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.running() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} processes started",
                self.running()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start(&self, name: &str, timeout: Duration) -> Guarded {
        let mut launch = Launch::new(
            Path::new(env!("CARGO_BIN_EXE_taskpod-worker")),
            timeout,
            &self.path(name),
            &[],
        )
        .unwrap();
        // No kill_on_drop: dropping the feed is what kills a run, tree and all.
        launch.command().stdin(std::process::Stdio::null());
        let mut guarded = launch.spawn().unwrap();
        guarded.started(WAIT).await.unwrap();
        guarded
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_closed_feed_kills_the_whole_tree() {
    let programs = Programs::new();
    let mut guarded = programs.start("tree.sh", Duration::from_secs(600)).await;
    programs.until_running(3).await;
    guarded.close_feed();
    let status = tokio::time::timeout(WAIT, guarded.child.wait())
        .await
        .expect("the guard exits once its feed closes")
        .unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert_eq!(programs.running(), 0, "the orphaned setsid process too");
}

#[tokio::test]
async fn a_silent_feed_kills_the_whole_tree_after_the_guard_timeout() {
    let programs = Programs::new();
    let started = tokio::time::Instant::now();
    let mut guarded = programs.start("tree.sh", Duration::from_millis(500)).await;
    programs.until_running(3).await;
    let status = tokio::time::timeout(WAIT, guarded.child.wait())
        .await
        .expect("an unfed guard exits")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert_eq!(programs.running(), 0, "the orphaned setsid process too");
}

#[tokio::test]
async fn a_fed_guard_lets_its_program_run_until_liveness_lapses() {
    let programs = Programs::new();
    let mut guarded = programs.start("tree.sh", Duration::from_millis(500)).await;
    programs.until_running(3).await;
    // Alive for 3 s from now, then never confirmed again: fed for 3 s, then silent.
    let (feed, liveness) = LivenessFeed::new(Duration::from_secs(3));
    feed.confirm();
    let fed = tokio::time::timeout(
        Duration::from_millis(2_000),
        guarded.wait_fed(&liveness, Duration::from_millis(50)),
    )
    .await;
    assert!(
        fed.is_err(),
        "still running 2 s in, well past its 0.5 s timeout"
    );
    assert_eq!(programs.running(), 3);
    let status = tokio::time::timeout(WAIT, guarded.wait_fed(&liveness, Duration::from_millis(50)))
        .await
        .expect("killed once liveness lapsed")
        .unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert_eq!(programs.running(), 0);
}

#[tokio::test]
async fn the_guard_exits_as_its_program_did_and_leaves_nothing_behind() {
    let programs = Programs::new();
    let mut exits = programs.start("exits.sh", Duration::from_secs(600)).await;
    let status = tokio::time::timeout(
        WAIT,
        exits.wait_fed(&Liveness::always(), Duration::from_millis(100)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(7));
    assert_eq!(programs.running(), 0, "its background child is killed");

    let mut signals = programs.start("signals.sh", Duration::from_secs(600)).await;
    let status = tokio::time::timeout(
        WAIT,
        signals.wait_fed(&Liveness::always(), Duration::from_millis(100)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.signal(), Some(15), "{status:?}");
    assert!(!status.core_dumped());
}

#[tokio::test]
async fn a_program_that_cannot_start_is_reported_as_such() {
    let programs = Programs::new();
    let mut launch = Launch::new(
        Path::new(env!("CARGO_BIN_EXE_taskpod-worker")),
        Duration::from_secs(600),
        &programs.path("missing.sh"),
        &[],
    )
    .unwrap();
    launch.command().stderr(std::process::Stdio::null());
    let mut guarded = launch.spawn().unwrap();
    match guarded.started(WAIT).await {
        Err(StartError::Program(reason)) => {
            assert!(reason.contains("missing.sh"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let status = tokio::time::timeout(WAIT, guarded.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
}
