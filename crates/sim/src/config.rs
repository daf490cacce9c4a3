//! What one simulated run looks like: how many nodes and partitions, the timers every
//! node uses (in its own clock's milliseconds), and how often faults, commands and
//! handler crashes come. Each seed draws its own cluster shape from these ranges.

use std::time::Duration;

use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use taskpod_core::domain::restart::RestartPolicy;

use crate::time::Millis;

/// The worker's timers, as the controller's settings name them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// How often the lock session is pinged (also during long steps).
    pub ping_interval: Millis,
    /// How long a confirmed ping keeps pods alive (ping interval + ping timeout).
    pub detection_bound: Millis,
    /// The server ends a lock session idle for longer (Postgres's
    /// `idle_session_timeout`, in global time).
    pub idle_timeout: Millis,
    pub tick: Millis,
    pub claim_interval: Millis,
    pub full_check: Millis,
    /// Membership stable this long before hand-backs.
    pub settle: Millis,
    /// A leaving partition's pods are stopped after this long.
    pub handback_deadline: Millis,
    /// Adoptions this soon after the node's own fence are interruptions.
    pub interruption_window: Millis,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            ping_interval: 100,
            detection_bound: 300,
            idle_timeout: 1_000,
            tick: 50,
            claim_interval: 200,
            full_check: 1_000,
            settle: 800,
            handback_deadline: 1_500,
            interruption_window: 3_000,
        }
    }
}

/// One run's shape.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: usize,
    pub partitions: u32,
    /// Tasks created at the start; the API creates more up to `max_tasks`.
    pub initial_tasks: usize,
    pub max_tasks: usize,
    /// Steps during which faults and commands come.
    pub fault_steps: u64,
    /// Steps after the faults stop within which every active task must have a pod.
    pub quiet_bound: u64,
    /// Chance per step of a fault, of an API command.
    pub fault_chance: f64,
    pub api_chance: f64,
    /// Chance per handler step that a `flaky` pod crashes.
    pub crash_chance: f64,
    /// Node rates (per mille of the global clock) are drawn from this range.
    pub skew_permille: (u64, u64),
    /// Some seeds give one node fewer kinds, so placement makes it ineligible.
    pub partial_node: bool,
    pub timers: Timers,
    pub policy: RestartPolicy,
}

impl Config {
    /// The shape of the run for this seed's generator.
    pub fn draw(rng: &mut ChaCha8Rng) -> Self {
        let nodes = rng.random_range(2..=4);
        let max_tasks = rng.random_range(4..=10);
        Self {
            nodes,
            partitions: rng.random_range(2..=8),
            initial_tasks: rng.random_range(2..=max_tasks),
            max_tasks,
            fault_steps: 1_500,
            quiet_bound: 3_000,
            fault_chance: 0.02,
            api_chance: 0.08,
            crash_chance: 0.05,
            skew_permille: (900, 1_100),
            partial_node: rng.random_bool(0.2),
            timers: Timers::default(),
            policy: RestartPolicy {
                max_restart_attempts: 3,
                window: Duration::from_secs(60),
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(400),
                max_node_losses: 4,
                adoption_margin: Duration::from_millis(300),
                // The model has no `exec`; `sleep` stands in so adoptions wait a margin.
                adoption_margin_kinds: vec!["sleep".to_owned()],
            },
        }
    }
}
