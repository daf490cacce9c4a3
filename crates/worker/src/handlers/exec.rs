//! `exec`: runs a program from the worker's configuration once per phase.
//!
//! The client names the program in the payload (`{"program": "name", ...}`), never a
//! path. Each run gets the payload on stdin and `TASKPOD_TASK_ID`, `TASKPOD_EPOCH`,
//! `TASKPOD_PHASE` in its environment; exit 0 moves the task to the next phase, the
//! configured fail code fails it, anything else (or the phase timeout) is a crash.
//!
//! The child runs in its own process group, which is killed on stop, on timeout and on
//! self-fence, and dies with the worker (`PR_SET_PDEATHSIG`, set in the child before
//! exec; it fires when the forking thread exits, and tokio forks from its long-lived
//! runtime threads). The epoch fences rows, not programs: `exec` is at-least-once, with
//! overlap bounded by the fence margin an adopted pod waits (docs/architecture.md).
//!
//! Output goes to the task's output stream in chunks of at most `CHUNK_BYTES`, flushed at
//! least every `CHUNK_INTERVAL`, up to `OUTPUT_LIMIT` bytes per run (then truncated).

pub mod guard;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use rustix::process::{Pid, Signal};
use taskpod_core::domain::TaskId;
use taskpod_core::store::Store;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::handler::{Handler, HandlerError, PodContext};
use crate::settings::ProgramSettings;

/// How long a killed process group gets before the handler stops waiting for it.
pub const KILL_TIMEOUT_MS: u64 = 2_000;
const CHUNK_BYTES: usize = 64 * 1024;
const CHUNK_INTERVAL: Duration = Duration::from_secs(1);
const OUTPUT_LIMIT: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct Exec {
    programs: BTreeMap<String, ProgramSettings>,
}

impl Exec {
    pub fn new(programs: BTreeMap<String, ProgramSettings>) -> Self {
        Self { programs }
    }
}

enum RunEnd {
    Exited(Option<i32>),
    TimedOut,
    Stopped,
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
                let end = run_once(pod, program, &stdin, &mut seq).await?;
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
                }
            }
            Ok(())
        })
    }
}

async fn run_once(
    pod: &PodContext,
    program: &ProgramSettings,
    stdin: &[u8],
    seq: &mut i32,
) -> Result<RunEnd, HandlerError> {
    let mut cmd = Command::new(&program.path);
    cmd.args(&program.args)
        .env("TASKPOD_TASK_ID", pod.task().task_id.to_string())
        .env("TASKPOD_EPOCH", pod.epoch().to_string())
        .env("TASKPOD_PHASE", pod.phase().as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| HandlerError::Fail(format!("cannot start {}: {e}", program.path.display())))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    if let Some(mut input) = child.stdin.take() {
        // A program that does not read its stdin must not block the pod.
        let _ = tokio::time::timeout(Duration::from_secs(5), input.write_all(stdin)).await;
    }
    let store = pod.store_handle();
    let (task, epoch) = (pod.task().task_id, pod.epoch());
    let out = child.stdout.take();
    let err = child.stderr.take();
    let base = *seq;
    let capture = async move {
        let (a, b) = tokio::join!(
            capture(&store, task, epoch, "stdout", out, base, 2),
            capture(&store, task, epoch, "stderr", err, base + 1, 2),
        );
        a.max(b)
    };
    let timeout = Duration::from_millis(program.phase_timeout_ms);
    let end = tokio::select! {
        (status, next) = async { tokio::join!(child.wait(), capture) } => {
            *seq = next;
            RunEnd::Exited(status.ok().and_then(|s| s.code()))
        }
        () = tokio::time::sleep(timeout) => RunEnd::TimedOut,
        () = pod.stopped() => RunEnd::Stopped,
    };
    if !matches!(end, RunEnd::Exited(_)) {
        kill_group(pgid, &mut child).await;
    }
    Ok(end)
}

/// Kills the whole process group and waits (bounded) for the leader.
pub(crate) async fn kill_group(pgid: Option<Pid>, child: &mut Child) {
    if let Some(pgid) = pgid {
        // ESRCH (already gone) is fine.
        let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
    }
    let _ = tokio::time::timeout(Duration::from_millis(KILL_TIMEOUT_MS), child.wait()).await;
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

/// Makes the child receive SIGKILL when the worker dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // prctl(2) and getppid(2) system calls and builds an io::Error from an errno: it
    // allocates nothing and takes no lock, as async-signal-safety requires.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The worker may have died between fork and prctl: then nothing would kill
            // us later, so do not start at all.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}
