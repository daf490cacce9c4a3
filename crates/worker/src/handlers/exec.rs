//! `exec`: runs a program from the worker's configuration once per phase.
//!
//! The client names the program in the payload (`{"program": "name", ...}`), never a
//! path. Each run gets the payload on stdin and `TASKPOD_TASK_ID`, `TASKPOD_EPOCH`,
//! `TASKPOD_PHASE` in its environment; exit 0 moves the task to the next phase, the
//! configured fail code fails it, anything else (or the phase timeout) is a crash.
//!
//! Each run is started under a [`guard`] process (the worker's own binary in a hidden
//! mode) that kills the run's whole process tree, grandchildren and `setsid` escapees
//! included, when the worker closes its feed (stop, phase timeout, lost liveness), dies
//! (SIGKILL), or stops feeding it for `handlers.exec.guard_timeout_ms` (SIGSTOP, a hung
//! runtime, a lock session no longer confirmed); and when the program exits, so nothing
//! of a finished run lingers. The epoch fences rows, not programs: `exec` is
//! at-least-once, and the guard is what makes the fence margin an adopted pod waits
//! longer than any overlap of two epochs' runs (docs/architecture.md, "Workers").
//!
//! Output goes to the task's output stream in chunks of at most `CHUNK_BYTES`, flushed at
//! least every `CHUNK_INTERVAL`, up to `OUTPUT_LIMIT` bytes per run (then truncated).

pub mod guard;
pub mod launch;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use taskpod_core::domain::TaskId;
use taskpod_core::store::Store;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::handler::{Handler, HandlerError, PodContext};
use crate::settings::{ExecSettings, HandlerSettings, ProgramSettings};

/// How long a stopped run's guard gets to kill and reap the run's tree before the
/// handler SIGKILLs the guard's and the program's groups and stops waiting.
pub const KILL_TIMEOUT_MS: u64 = 2_000;
/// The guard is the worker's own binary: this path stays valid when the file is
/// replaced by an upgrade while the worker runs.
const GUARD_EXE: &str = "/proc/self/exe";
/// How long a guard may take to start its program and say so.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK_BYTES: usize = 64 * 1024;
const CHUNK_INTERVAL: Duration = Duration::from_secs(1);
const OUTPUT_LIMIT: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct Exec {
    programs: BTreeMap<String, ProgramSettings>,
    guard: ExecSettings,
}

impl Exec {
    pub fn new(settings: &HandlerSettings) -> Self {
        Self {
            programs: settings.programs.clone(),
            guard: settings.exec.clone(),
        }
    }
}

enum RunEnd {
    Exited(Option<i32>),
    TimedOut,
    Stopped,
    /// The node's liveness lapsed: it may no longer own the task, so the run is cut
    /// without waiting for the control loop (which may be stuck on the store). Not the
    /// task's fault: the pod stops, and a pod is minted again wherever the task's
    /// partition is owned.
    Lost,
}

impl Handler for Exec {
    fn run<'a>(&'a self, pod: &'a mut PodContext) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payload = pod.task().payload.clone();
            let name = payload
                .get("program")
                .and_then(|p| p.as_str())
                .unwrap_or_default();
            let Some(program) = self.programs.get(name) else {
                return Err(HandlerError::Fail(format!(
                    "program {name:?} is not configured on this worker"
                )));
            };
            let stdin = serde_json::to_vec(&payload).unwrap_or_default();
            let mut seq = 0i32;
            while !pod.phase().is_terminal() {
                let end = run_once(pod, program, &self.guard, &stdin, &mut seq).await?;
                match end {
                    RunEnd::Exited(Some(0)) => {
                        pod.advance().await?;
                    }
                    RunEnd::Exited(Some(code)) if code == program.fail_exit_code => {
                        return Err(HandlerError::Fail(format!(
                            "{name} exited with {code} in {}",
                            pod.phase()
                        )));
                    }
                    RunEnd::Exited(code) => {
                        let how = code.map_or_else(
                            || "was killed by a signal".to_owned(),
                            |c| format!("exited with {c}"),
                        );
                        return Err(HandlerError::Retry(format!(
                            "{name} {how} in {}",
                            pod.phase()
                        )));
                    }
                    RunEnd::TimedOut => {
                        return Err(HandlerError::Retry(format!(
                            "{name} timed out in {}",
                            pod.phase()
                        )));
                    }
                    RunEnd::Stopped => return Err(HandlerError::Stopped),
                    RunEnd::Lost => {
                        tracing::warn!(
                            task.id = %pod.task().task_id,
                            epoch = pod.epoch(),
                            "lock session not confirmed: {name} killed"
                        );
                        return Err(HandlerError::Stopped);
                    }
                }
            }
            Ok(())
        })
    }
}

async fn run_once(
    pod: &PodContext,
    program: &ProgramSettings,
    settings: &ExecSettings,
    stdin: &[u8],
    seq: &mut i32,
) -> Result<RunEnd, HandlerError> {
    let mut lost = pod.liveness().clone();
    if !lost.is_alive() {
        return Ok(RunEnd::Lost);
    }
    let cannot =
        |e: std::io::Error| HandlerError::Retry(format!("cannot start the exec guard: {e}"));
    let mut launch = launch::Launch::new(
        Path::new(GUARD_EXE),
        Duration::from_millis(settings.guard_timeout_ms),
        &program.path,
        &program.args,
    )
    .map_err(cannot)?;
    // The worker's own settings (the store's URL with its password among them) are
    // not the program's business: no `TASKPOD_*` variable of the worker reaches it.
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("TASKPOD_") && name != guard::ARGV_ENV {
            launch.command().env_remove(key);
        }
    }
    launch
        .command()
        .env("TASKPOD_TASK_ID", pod.task().task_id.to_string())
        .env("TASKPOD_EPOCH", pod.epoch().to_string())
        .env("TASKPOD_PHASE", pod.phase().as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guarded = launch.spawn().map_err(cannot)?;
    let kill_timeout = Duration::from_millis(KILL_TIMEOUT_MS);
    let started = tokio::select! {
        biased;
        () = pod.stopped() => Err(RunEnd::Stopped),
        () = lost.lost() => Err(RunEnd::Lost),
        started = guarded.started(START_TIMEOUT) => Ok(started),
    };
    match started {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            guarded.stop(kill_timeout).await;
            return Err(match e {
                guard::StartError::Program(reason) => HandlerError::Fail(reason),
                guard::StartError::Guard(_) => HandlerError::Retry(e.to_string()),
            });
        }
        Err(end) => {
            guarded.stop(kill_timeout).await;
            return Ok(end);
        }
    }
    let input = guarded.child.stdin.take();
    let store = pod.store_handle();
    let (task, epoch) = (pod.task().task_id, pod.epoch());
    let out = guarded.child.stdout.take();
    let err = guarded.child.stderr.take();
    let base = *seq;
    let io = async move {
        let ((), a, b) = tokio::join!(
            async move {
                if let Some(mut input) = input {
                    // A program that does not read its stdin must not block the pod.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), input.write_all(stdin)).await;
                }
            },
            capture(&store, task, epoch, "stdout", out, base, 2),
            capture(&store, task, epoch, "stderr", err, base + 1, 2),
        );
        a.max(b)
    };
    let timeout = Duration::from_millis(program.phase_timeout_ms);
    let feed_every = Duration::from_millis(settings.feed_interval_ms);
    let liveness = pod.liveness().clone();
    // Biased: a worker resumed after a pause finds its guard gone and its liveness
    // lapsed at once; the run was cut for the node's sake, not the program's.
    let end = tokio::select! {
        biased;
        () = pod.stopped() => RunEnd::Stopped,
        () = lost.lost() => RunEnd::Lost,
        (status, next) = async { tokio::join!(guarded.wait_fed(&liveness, feed_every), io) } => {
            *seq = next;
            match status.ok().and_then(|s| s.code()) {
                // Cut by its guard while this node was paused or starved: the node's
                // doing, not the program's.
                code if code != Some(0) && !liveness.is_alive() => RunEnd::Lost,
                code => RunEnd::Exited(code),
            }
        }
        () = tokio::time::sleep(timeout) => RunEnd::TimedOut,
    };
    if !matches!(end, RunEnd::Exited(_)) {
        guarded.stop(kill_timeout).await;
    }
    Ok(end)
}

/// Streams one pipe into output chunks; sequence numbers interleave stdout and stderr
/// (`start`, `start + step`, ...). Returns the next free number.
async fn capture(
    store: &Store,
    task: TaskId,
    epoch: i64,
    stream: &str,
    pipe: Option<impl AsyncRead + Unpin>,
    start: i32,
    step: i32,
) -> i32 {
    let mut seq = start;
    let Some(mut pipe) = pipe else { return seq };
    let mut buf = Vec::with_capacity(CHUNK_BYTES);
    let mut total = 0usize;
    let mut read = vec![0u8; 8192];
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let n = match tokio::time::timeout(CHUNK_INTERVAL, pipe.read(&mut read)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => 0,
        };
        if total < OUTPUT_LIMIT {
            let keep = n.min(OUTPUT_LIMIT - total);
            buf.extend_from_slice(&read[..keep]);
            total += keep;
        }
        if buf.len() >= CHUNK_BYTES || (!buf.is_empty() && last_flush.elapsed() >= CHUNK_INTERVAL) {
            if let Err(e) = store.append_output(task, epoch, seq, stream, &buf).await {
                tracing::warn!(task.id = %task, error = %e, "output chunk lost");
            }
            buf.clear();
            seq += step;
            last_flush = tokio::time::Instant::now();
        }
    }
    if !buf.is_empty() {
        if let Err(e) = store.append_output(task, epoch, seq, stream, &buf).await {
            tracing::warn!(task.id = %task, error = %e, "output chunk lost");
        }
        seq += step;
    }
    seq
}
