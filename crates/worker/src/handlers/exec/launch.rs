//! The worker's side of the `exec` guard ([`super::guard`]): starting a program under
//! its guard, feeding the guard while the node holds its claim, and stopping the run
//! (close the feed, wait for the guard, a backup kill past the kill timeout).

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::guard::{ARGV_ENV, SUBCOMMAND, StartError};
use crate::liveness::Liveness;

/// A program about to start under a guard: set its environment and stdio on
/// [`Launch::command`], then [`Launch::spawn`].
#[derive(Debug)]
pub struct Launch {
    cmd: tokio::process::Command,
    ours: UnixStream,
    theirs: OwnedFd,
}

impl Launch {
    /// The guard is `exe` (the worker's own binary, `/proc/self/exe`, which stays valid
    /// when the file is replaced by an upgrade).
    ///
    /// # Errors
    /// When the feed socket cannot be made.
    pub fn new(exe: &Path, timeout: Duration, program: &Path, args: &[String]) -> io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        let mut argv = vec![program.display().to_string()];
        argv.extend(args.iter().cloned());
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg0("taskpod-worker")
            .arg(SUBCOMMAND)
            .arg("--feed-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--timeout-ms")
            .arg(timeout.as_millis().max(1).to_string())
            .env(ARGV_ENV, serde_json::Value::from(argv).to_string())
            // Its own group: a backup kill of the guard's group hits the guard alone.
            .process_group(0);
        inherit_feed(&mut cmd, theirs.as_raw_fd());
        Ok(Self { cmd, ours, theirs })
    }

    pub fn command(&mut self) -> &mut tokio::process::Command {
        &mut self.cmd
    }

    /// Starts the guard; its feed is then held by this process alone.
    ///
    /// # Errors
    /// When the guard cannot be started (fork or exec failed).
    pub fn spawn(mut self) -> io::Result<Guarded> {
        let child = self.cmd.spawn();
        drop(self.theirs);
        let child = child?;
        self.ours.set_nonblocking(true)?;
        let feed = tokio::net::UnixStream::from_std(self.ours)?;
        let guard = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        Ok(Guarded {
            child,
            feed: Some(feed),
            groups: [guard, None],
        })
    }
}

/// Clears close-on-exec on the guard's end of the feed in the forked child only, so a
/// concurrent fork of the worker (another run starting) never inherits it.
#[allow(unsafe_code)]
fn inherit_feed(cmd: &mut tokio::process::Command, fd: i32) {
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // fcntl(2) system call on a descriptor the parent keeps open until `spawn` returned
    // (it is `Launch::theirs`), and builds an io::Error from an errno: it allocates
    // nothing and takes no lock, as async-signal-safety requires.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
}

/// A running guard, from the worker's side.
#[derive(Debug)]
pub struct Guarded {
    /// The guard process: it exits as its program did.
    pub child: tokio::process::Child,
    feed: Option<tokio::net::UnixStream>,
    /// The guard's process group and, once started, the program's: what the backup kill
    /// hits when the guard itself does not exit.
    groups: [Option<Pid>; 2],
}

impl Guarded {
    /// Waits (at most `within`) for the guard's answer: the program started, or why not.
    ///
    /// # Errors
    /// [`StartError::Program`] when the program cannot start (a configuration error),
    /// [`StartError::Guard`] when the guard failed or did not answer in time.
    pub async fn started(&mut self, within: Duration) -> Result<(), StartError> {
        let Some(feed) = &self.feed else {
            return Err(StartError::Guard("its feed is closed".into()));
        };
        let line = tokio::time::timeout(within, read_line(feed))
            .await
            .map_err(|_| StartError::Guard(format!("no answer within {within:?}")))?
            .map_err(|e| StartError::Guard(e.to_string()))?;
        if let Some(pid) = line.strip_prefix("started ") {
            self.groups[1] = pid.trim().parse().ok().and_then(Pid::from_raw);
            return Ok(());
        }
        if let Some(reason) = line.strip_prefix("error ") {
            return Err(StartError::Program(reason.trim_end().to_owned()));
        }
        Err(StartError::Guard(if line.is_empty() {
            "it exited without a word".to_owned()
        } else {
            format!("unexpected answer {line:?}")
        }))
    }

    /// Waits for the guard to exit (as its program did), feeding it every `every` while
    /// `liveness` holds. Not polled (a stuck runtime), it feeds nothing either: the
    /// guard times out.
    ///
    /// # Errors
    /// When waiting for the guard fails.
    pub async fn wait_fed(
        &mut self,
        liveness: &Liveness,
        every: Duration,
    ) -> io::Result<ExitStatus> {
        let Self { child, feed, .. } = self;
        tokio::select! {
            status = child.wait() => status,
            () = feed_while(feed.as_ref(), liveness, every) => unreachable!("feeding never ends"),
        }
    }

    /// Tells the guard to kill the run now, as the worker's death would.
    pub fn close_feed(&mut self) {
        self.feed = None;
    }

    /// Stops the run: closes the feed so the guard kills the whole tree, waits for it,
    /// and past three quarters of `within` SIGKILLs the guard's and the program's
    /// groups as a backup.
    pub async fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        self.close_feed();
        let first = within.mul_f32(0.75);
        if let Ok(status) = tokio::time::timeout(first, self.child.wait()).await {
            return status.ok();
        }
        for group in self.groups.into_iter().flatten() {
            // ESRCH (already gone) is fine.
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
        tokio::time::timeout(within.saturating_sub(first), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

async fn feed_while(feed: Option<&tokio::net::UnixStream>, liveness: &Liveness, every: Duration) {
    let Some(feed) = feed else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if liveness.is_alive() {
            // A full buffer (a stopped guard) or a closed one (a gone guard) needs
            // nothing from us: the guard's own timeout or exit takes care of it.
            let _ = feed.try_write(&[1]);
        }
    }
}

async fn read_line(feed: &tokio::net::UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.ends_with(b"\n") && line.len() < 64 * 1024 {
        feed.readable().await?;
        match feed.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}
