//! The crash budget: whether a crashed pod is restarted, and after how long.
//!
//! Pure: the caller counts crashes in the window with Postgres's clock (under the task's
//! row lock, in the transaction that would start the next pod) and supplies the jitter,
//! so the policy is testable without time or randomness.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a pod died, for the two separate budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashKind {
    /// The handler returned Retry, panicked or timed out.
    Handler,
    /// The pod's node died under it. Counted against the poison budget, so a task that
    /// kills every node it lands on stops too.
    NodeLost,
    /// The pod's node lost the store together with every other node (a Postgres restart
    /// or outage). Recorded, charged to no budget.
    Interrupted,
}

impl CrashKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CrashKind::Handler => "handler",
            CrashKind::NodeLost => "node_lost",
            CrashKind::Interrupted => "interrupted",
        }
    }
}

/// Restart limits, from the worker's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// A task restarts at most this many times within the window: the handler crash
    /// that would need one more restart fails it. With 3, it runs at most 4 times; with
    /// 0, its first crash fails it.
    pub max_restart_attempts: u32,
    pub window: Duration,
    /// The first backoff; it doubles with each crash in the window, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Node losses tolerated within the window before the task is failed as poison.
    pub max_node_losses: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restart_attempts: 3,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_node_losses: 5,
        }
    }
}

/// What to do after a crash.
#[derive(Clone, Debug, PartialEq)]
pub enum RestartDecision {
    /// Start a new pod no earlier than `delay` from now.
    Restart { delay: Duration },
    /// The budget is spent: the task becomes `failed` with this error.
    Fail { error: String },
}

impl RestartPolicy {
    /// Decides after a crash, given the crashes of each kind within the window (the new
    /// one included) and a jitter in `[0, 1)`.
    pub fn decide(&self, handler_crashes: u32, node_losses: u32, jitter: f64) -> RestartDecision {
        if handler_crashes > self.max_restart_attempts {
            return RestartDecision::Fail {
                error: format!(
                    "restart budget spent: {handler_crashes} handler crashes within {}s",
                    self.window.as_secs()
                ),
            };
        }
        if node_losses > self.max_node_losses {
            return RestartDecision::Fail {
                error: format!(
                    "poison budget spent: {node_losses} nodes lost within {}s",
                    self.window.as_secs()
                ),
            };
        }
        RestartDecision::Restart {
            delay: self.backoff(handler_crashes.max(1), jitter),
        }
    }

    /// Exponential backoff with "equal jitter": half fixed, half random, so retries of
    /// many tasks that crashed together spread out but never restart at once.
    pub fn backoff(&self, crashes: u32, jitter: f64) -> Duration {
        let exp = crashes.saturating_sub(1).min(31);
        let full = self
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        let jitter = jitter.clamp(0.0, 1.0);
        full.mul_f64(0.5 + jitter / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_default_budget_allows_three_restarts() {
        let p = RestartPolicy::default();
        assert!(matches!(
            p.decide(1, 0, 0.0),
            RestartDecision::Restart { .. }
        ));
        assert!(matches!(
            p.decide(2, 0, 0.0),
            RestartDecision::Restart { .. }
        ));
        assert!(matches!(
            p.decide(3, 0, 0.0),
            RestartDecision::Restart { .. }
        ));
        assert!(matches!(p.decide(4, 0, 0.0), RestartDecision::Fail { .. }));
    }

    #[test]
    fn node_losses_have_their_own_budget() {
        let p = RestartPolicy::default();
        assert!(matches!(
            p.decide(0, 5, 0.5),
            RestartDecision::Restart { .. }
        ));
        assert!(matches!(p.decide(0, 6, 0.5), RestartDecision::Fail { .. }));
    }

    proptest! {
        #[test]
        fn backoff_is_bounded_and_grows(crashes in 1u32..64, jitter in 0.0f64..1.0) {
            let p = RestartPolicy::default();
            let d = p.backoff(crashes, jitter);
            prop_assert!(d <= p.backoff_max);
            prop_assert!(d >= p.backoff_base / 2);
            prop_assert!(p.backoff(crashes + 1, 0.0) >= p.backoff(crashes, 0.0));
        }
    }
}
