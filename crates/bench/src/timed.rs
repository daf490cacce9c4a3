//! A closed-loop timed run, shared by `get`, `list`, `create` and `limit`: `concurrency`
//! callers each make
//! one call after the other for a warm-up and then a fixed duration; only calls that
//! start after the warm-up are timed. Each call gets a fresh pseudo-random number
//! (which task to read, which variant), from a small seeded generator so two runs make
//! the same choices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::BenchError;
use super::progress::Progress;
use super::report::{Latencies, format_us};

/// One call: given a random number, makes it and returns how many items it got (or
/// why it failed, for the report's notes).
pub type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<u64, String>> + Send + Sync>;

/// A failed RPC as a call's error.
pub fn describe(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The warm-up and the timed stretch of a scenario that runs for a fixed time.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Stretch {
    /// Seconds of timed calls
    #[arg(long, value_name = "S", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Seconds of untimed calls first (the warm-up)
    #[arg(long, value_name = "S", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
}

impl Stretch {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup)
    }

    /// [`run_for`] over this stretch, with `concurrency` callers.
    pub async fn run(
        &self,
        label: &'static str,
        what: String,
        call: Call,
        concurrency: u64,
        seed: u64,
    ) -> Timed {
        let callers = usize::try_from(concurrency).unwrap_or(1);
        run_for(
            label,
            what,
            call,
            callers,
            self.warmup(),
            self.duration(),
            seed,
        )
        .await
    }

    /// The report's parameters.
    pub fn parameters(&self) -> [(&'static str, serde_json::Value); 2] {
        [
            ("duration_s", self.duration.into()),
            ("warmup_s", self.warmup.into()),
        ]
    }
}

/// xorshift64*: small, fast, deterministic from its seed; plenty for picking ids.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; any other seed will do.
        Self(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// An index below `len` from a random number (0 when `len` is 0), without the bias
/// of `%` that matters for small `len` (Lemire's multiply-shift).
pub fn index(random: u64, len: usize) -> usize {
    let len = len as u64;
    usize::try_from(((u128::from(random) * u128::from(len)) >> 64) as u64).unwrap_or(0)
}

/// What a timed run gave.
#[derive(Debug, Default)]
pub struct Timed {
    pub latencies: Latencies,
    /// The timed stretch (the duration asked for, or longer when calls ran over).
    pub elapsed: Duration,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Items returned by the timed calls (rows for ListTasks, 1 per GetTask).
    pub items: u64,
}

impl Timed {
    /// Refuses a run in which no call succeeded: its figures would mean nothing.
    ///
    /// # Errors
    /// [`BenchError::Failed`] naming `what` and the first error.
    pub fn require_some(&self, what: &str) -> Result<(), BenchError> {
        if self.latencies.count() > 0 {
            return Ok(());
        }
        Err(BenchError::Failed(format!(
            "{what}: {} errors; first: {}",
            self.errors,
            self.first_error.as_deref().unwrap_or("none")
        )))
    }

    /// The report's note on failed calls, if any failed.
    pub fn error_note(&self, what: &str) -> Option<String> {
        self.first_error
            .as_ref()
            .map(|first| format!("{what}: {} calls failed; the first: {first}", self.errors))
    }
}

#[derive(Debug, Default)]
struct Live {
    done: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Latencies>,
}

/// Runs `call` from `concurrency` callers for `warmup`, then `duration` timed.
pub async fn run_for(
    label: &'static str,
    what: String,
    call: Call,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    seed: u64,
) -> Timed {
    let live = Arc::new(Live::default());
    let started = Instant::now();
    let measure_from = started + warmup;
    let until = measure_from + duration;
    let progress = {
        let live = Arc::clone(&live);
        Progress::start(label, move || {
            let now = Instant::now();
            if now < measure_from {
                return format!("{what}: warming up");
            }
            let done = live.done.load(Ordering::Relaxed);
            let (p50, p99) = live
                .latencies
                .lock()
                .map(|l| (l.quantile_us(0.5), l.quantile_us(0.99)))
                .unwrap_or_default();
            format!(
                "{what}: {done} calls, {:.0}/s, p50 {}, p99 {}, errors {}",
                done as f64 / (now - measure_from).as_secs_f64().max(1e-3),
                format_us(p50),
                format_us(p99),
                live.errors.load(Ordering::Relaxed)
            )
        })
    };
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..concurrency.max(1) {
        let (call, live) = (Arc::clone(&call), Arc::clone(&live));
        let mut rng = Rng::new(seed.wrapping_add(caller as u64 + 1));
        callers.spawn(async move {
            let mut timed = Timed::default();
            loop {
                let start = Instant::now();
                if start >= until {
                    break;
                }
                let answer = call(rng.next_u64()).await;
                let latency = start.elapsed();
                if start < measure_from {
                    continue;
                }
                match answer {
                    Ok(items) => {
                        timed.items += items;
                        timed.latencies.record(latency);
                        if let Ok(mut l) = live.latencies.lock() {
                            l.record(latency);
                        }
                    }
                    Err(error) => {
                        timed.errors += 1;
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        timed.first_error.get_or_insert(error);
                    }
                }
                live.done.fetch_add(1, Ordering::Relaxed);
            }
            timed
        });
    }
    let mut timed = Timed::default();
    while let Some(joined) = callers.join_next().await {
        if let Ok(part) = joined {
            timed.latencies.merge(&part.latencies);
            timed.errors += part.errors;
            timed.items += part.items;
            if timed.first_error.is_none() {
                timed.first_error = part.first_error;
            }
        }
    }
    timed.elapsed = Instant::now().saturating_duration_since(measure_from);
    progress.finish();
    timed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_never_stuck() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut zero = Rng::new(0);
        assert_ne!(zero.next_u64(), zero.next_u64());
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn indexes_stay_in_range_and_cover_it() {
        assert_eq!(index(u64::MAX, 0), 0);
        assert_eq!(index(u64::MAX, 1), 0);
        assert_eq!(index(0, 10), 0);
        assert_eq!(index(u64::MAX, 10), 9);
        let mut rng = Rng::new(42);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let i = index(rng.next_u64(), 10);
            seen[i] += 1;
        }
        // Each bucket near 1000: the picks are spread, not clustered.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
