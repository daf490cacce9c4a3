//! What stops a local cluster from outside: SIGINT (Ctrl-C) and SIGTERM (what service
//! managers and `kill` send) both mean "stop cleanly and tear down", for `taskpod dev`
//! and `taskpod bench --dev` alike.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Both signals, listened for from [`Signals::install`] on.
#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Starts listening; from here on neither signal kills the process.
    ///
    /// # Errors
    /// When the handlers cannot be registered.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
