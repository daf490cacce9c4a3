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
    pub const ALL: &'static [CrashKind] = &[
        CrashKind::Handler,
        CrashKind::NodeLost,
        CrashKind::Interrupted,
    ];

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
    /// How long after a pod's loss with its node (or an interruption) is recorded a
    /// successor may start it, for the kinds in `adoption_margin_kinds`: those whose
    /// work outlives the worker process (`exec` programs), which the old owner's fence
    /// and kill must end first (docs/architecture.md, "Side effects"). It is recorded
    /// as the task's `not_before`, so whichever node adopts the task waits it, counted
    /// from the transaction that recorded the loss.
    #[serde(default)]
    pub adoption_margin: Duration,
    #[serde(default)]
    pub adoption_margin_kinds: Vec<String>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restart_attempts: 3,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            max_node_losses: 5,
            adoption_margin: Duration::ZERO,
            adoption_margin_kinds: Vec::new(),
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

    /// The least delay before a successor of a pod lost with its node may start, for a
    /// task of `kind`.
    pub fn adoption_delay(&self, kind: &str) -> Duration {
        if self.adoption_margin_kinds.iter().any(|k| k == kind) {
            self.adoption_margin
        } else {
            Duration::ZERO
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

/// The longest restart window a task may ask for in `metadata.restart`: a crash older
/// than this counts for nothing anywhere (crash rows are pruned long before).
pub const MAX_TASK_WINDOW_SECONDS: u64 = 30 * 24 * 3600;
/// The most restart attempts a task may name in `metadata.restart`; the operator's
/// setting caps it further.
pub const MAX_TASK_RESTART_ATTEMPTS: u64 = 1_000;

/// What a task's `metadata.restart` may say, checked at create so a stored task never
/// carries a limit that breaks the crash recorder.
///
/// # Errors
/// The field and the reason: not an object, an unknown key, or a value that is not a
/// whole number within its bounds.
pub fn validate_task_limits(restart: &serde_json::Value) -> Result<(), (String, String)> {
    let Some(limits) = restart.as_object() else {
        return Err(("metadata.restart".into(), "must be a JSON object".into()));
    };
    for (key, value) in limits {
        let (min, max) = match key.as_str() {
            "max_restart_attempts" => (0, MAX_TASK_RESTART_ATTEMPTS),
            "restart_window_seconds" => (1, MAX_TASK_WINDOW_SECONDS),
            other => {
                return Err((
                    format!("metadata.restart.{other}"),
                    "unknown key (max_restart_attempts, restart_window_seconds)".into(),
                ));
            }
        };
        let field = format!("metadata.restart.{key}");
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => {}
            _ => return Err((field, format!("must be a whole number in {min}..={max}"))),
        }
    }
    Ok(())
}

impl RestartPolicy {
    /// This policy with a task's own limits applied, which may only tighten it: fewer
    /// attempts, or a longer window (more crashes counted). A task never restarts more
    /// than the operator allows, and `auto_restart = false` (no attempts) stays off.
    /// Values a stored task carries from before validation are clamped, never trusted.
    pub fn tightened_by(&self, restart: Option<&serde_json::Value>) -> RestartPolicy {
        let mut policy = self.clone();
        let Some(limits) = restart else {
            return policy;
        };
        if let Some(n) = limits
            .get("max_restart_attempts")
            .and_then(serde_json::Value::as_u64)
        {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            policy.max_restart_attempts = policy.max_restart_attempts.min(n);
        }
        if let Some(s) = limits
            .get("restart_window_seconds")
            .and_then(serde_json::Value::as_u64)
        {
            let asked = Duration::from_secs(s.min(MAX_TASK_WINDOW_SECONDS));
            policy.window = policy.window.max(asked);
        }
        policy
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

    #[test]
    fn regression_task_limits_out_of_range_are_refused_naming_the_field() {
        use serde_json::json;
        for (limits, field) in [
            (
                json!({"restart_window_seconds": 1e12}),
                "metadata.restart.restart_window_seconds",
            ),
            (
                json!({"restart_window_seconds": 1_000_000_000_000u64}),
                "metadata.restart.restart_window_seconds",
            ),
            (
                json!({"restart_window_seconds": 0}),
                "metadata.restart.restart_window_seconds",
            ),
            (
                json!({"restart_window_seconds": -5}),
                "metadata.restart.restart_window_seconds",
            ),
            (
                json!({"max_restart_attempts": u32::MAX}),
                "metadata.restart.max_restart_attempts",
            ),
            (
                json!({"max_restart_attempts": 1.5}),
                "metadata.restart.max_restart_attempts",
            ),
            (
                json!({"max_restart_attempts": "3"}),
                "metadata.restart.max_restart_attempts",
            ),
            (json!({"max_restarts": 3}), "metadata.restart.max_restarts"),
            (json!(3), "metadata.restart"),
        ] {
            let refused = validate_task_limits(&limits);
            assert_eq!(
                refused.map_err(|(f, _)| f),
                Err(field.to_owned()),
                "{limits}"
            );
        }
        assert!(validate_task_limits(&json!({})).is_ok());
        assert!(
            validate_task_limits(
                &json!({"max_restart_attempts": 0, "restart_window_seconds": 600})
            )
            .is_ok()
        );
    }

    #[test]
    fn regression_task_limits_never_loosen_the_operators() {
        use serde_json::json;
        let operator = RestartPolicy::default();
        // More attempts, or a shorter window (crashes forgotten sooner), would loosen it.
        let loose = json!({"max_restart_attempts": 1000, "restart_window_seconds": 1});
        assert_eq!(operator.tightened_by(Some(&loose)), operator);
        let strict = json!({"max_restart_attempts": 1, "restart_window_seconds": 600});
        let tightened = operator.tightened_by(Some(&strict));
        assert_eq!(tightened.max_restart_attempts, 1);
        assert_eq!(tightened.window, Duration::from_secs(600));
        // auto_restart = false is a budget of no attempts: a task cannot turn it on.
        let off = RestartPolicy {
            max_restart_attempts: 0,
            ..RestartPolicy::default()
        };
        let asks = json!({"max_restart_attempts": u32::MAX});
        assert_eq!(off.tightened_by(Some(&asks)).max_restart_attempts, 0);
        // A stored value from before validation is clamped, so the window query holds.
        let legacy = json!({"restart_window_seconds": u64::MAX});
        assert_eq!(
            operator.tightened_by(Some(&legacy)).window,
            Duration::from_secs(MAX_TASK_WINDOW_SECONDS)
        );
    }

    proptest! {
        #[test]
        fn task_limits_only_tighten(attempts in 0u64..u64::MAX, window in 0u64..u64::MAX) {
            let operator = RestartPolicy::default();
            let limits = serde_json::json!({
                "max_restart_attempts": attempts,
                "restart_window_seconds": window,
            });
            let p = operator.tightened_by(Some(&limits));
            prop_assert!(p.max_restart_attempts <= operator.max_restart_attempts);
            prop_assert!(p.window >= operator.window);
            prop_assert!(p.window <= operator.window.max(Duration::from_secs(MAX_TASK_WINDOW_SECONDS)));
        }
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
