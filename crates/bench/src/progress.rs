//! The progress line a scenario shows on stderr while it runs (stdout stays the report).
//!
//! On a terminal the line is redrawn in place a few times a second; in a log (stderr
//! not a terminal) a new line is written every few seconds instead, so a CI log shows
//! the run without thousands of carriage returns.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

const TERMINAL_EVERY: Duration = Duration::from_millis(250);
const LOG_EVERY: Duration = Duration::from_secs(2);

/// A running progress line; [`Progress::finish`] stops it.
#[derive(Debug)]
pub struct Progress {
    ticker: Option<JoinHandle<()>>,
    terminal: bool,
}

impl Progress {
    /// Shows `line()` (with the time since the start) until [`Progress::finish`].
    /// `line` runs on a timer, so it should only read counters.
    pub fn start<F>(label: &'static str, line: F) -> Self
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        let terminal = std::io::stderr().is_terminal();
        let line = Arc::new(line);
        let started = Instant::now();
        let every = if terminal { TERMINAL_EVERY } else { LOG_EVERY };
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                interval.tick().await;
                let text = format!(
                    "{label}: {} [{:.1}s]",
                    line(),
                    started.elapsed().as_secs_f64()
                );
                let mut err = std::io::stderr().lock();
                let _ = if terminal {
                    // Carriage return, clear the line, redraw.
                    write!(err, "\r\x1b[2K{text}")
                } else {
                    writeln!(err, "{text}")
                };
                let _ = err.flush();
            }
        });
        Self {
            ticker: Some(ticker),
            terminal,
        }
    }

    /// Stops the line and leaves the cursor on a fresh line.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
            if self.terminal {
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A one-off status line on stderr (cluster start-up, set-up steps).
pub fn say(text: impl AsRef<str>) {
    eprintln!("bench: {}", text.as_ref());
}
