//! Where a run's time went, phase by phase (start, storm or cut, settle, check, ...),
//! for the report of a storm or a partition.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Laps {
    laps: Vec<(&'static str, Duration)>,
    since: Instant,
}

impl Default for Laps {
    fn default() -> Self {
        Self::new()
    }
}

impl Laps {
    /// Starts timing the first phase now.
    pub fn new() -> Self {
        Self {
            laps: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Ends the current phase as `name` and starts the next.
    pub fn lap(&mut self, name: &'static str) {
        self.laps.push((name, self.since.elapsed()));
        self.since = Instant::now();
    }

    pub fn total(&self) -> Duration {
        self.laps.iter().map(|(_, d)| *d).sum()
    }

    /// `start 1.9s, warmup 3.3s, ... (total 22.7s)`.
    pub fn render(&self) -> String {
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(what, d)| format!("{what} {:.1}s", d.as_secs_f64()))
            .collect();
        format!(
            "{} (total {:.1}s)",
            laps.join(", "),
            self.total().as_secs_f64()
        )
    }
}
