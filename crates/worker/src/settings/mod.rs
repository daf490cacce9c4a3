//! The worker's typed settings: defaults, then an optional TOML file, then `TASKPOD_*`
//! environment variables (`__` nests). Unknown keys are rejected.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taskpod_core::bus::BusSettings;
pub use taskpod_core::config::SettingsError;

mod handlers;
pub use handlers::{ExecSettings, HandlerSettings, ProgramSettings};
use taskpod_core::config::{self, invalid};
use taskpod_core::domain::restart::RestartPolicy;
use taskpod_core::store::{Secret, StoreSettings};

/// The top-level keys, so `TASKPOD_*` variables meant for other programs are left alone.
const TOP_LEVEL_KEYS: &[&str] = &[
    "name",
    "store",
    "health_listen",
    "metrics_listen",
    "capacity",
    "lock",
    "tick_ms",
    "full_check_ms",
    "claim_interval_ms",
    "settle_ms",
    "drain_grace_ms",
    "handback_deadline_ms",
    "restart",
    "handlers",
    "bus",
    "maintenance",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// A stable, human-readable name (the host name by default).
    pub name: String,
    pub store: StoreSettings,
    /// gRPC health for probes; port 0 picks one (printed at start).
    pub health_listen: SocketAddr,
    /// Prometheus text at `GET /metrics`; port 0 picks one (printed at start).
    pub metrics_listen: SocketAddr,
    /// Pods this node runs at once, all kinds together; also its weight in shares.
    pub capacity: u32,
    pub lock: LockSettings,
    /// How often the controller checks the tasks changed since its last look (the
    /// change feed: the bound on how late a stop or cancel is noticed when Redis lost
    /// the wake-up).
    pub tick_ms: u64,
    /// How often it reads every active task of its partitions and every pod it runs
    /// anyway: the repair of last resort, and what an idle pod costs.
    pub full_check_ms: u64,
    /// How often membership is read and free partitions claimed.
    pub claim_interval_ms: u64,
    /// How long membership must be stable before extra partitions are handed back.
    pub settle_ms: u64,
    /// How long pods get to stop on SIGTERM before they are cut off.
    pub drain_grace_ms: u64,
    /// How long a partition being handed back (to balance the cluster) keeps running
    /// its pods: it is released as soon as they end, and their pods are stopped (not
    /// crashed) once this passes.
    pub handback_deadline_ms: u64,
    pub restart: RestartSettings,
    pub handlers: HandlerSettings,
    /// Redis, for prompt wake-ups and status fan-out; without it the worker notices
    /// changes at its next tick.
    pub bus: BusSettings,
    pub maintenance: MaintenanceSettings,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            name: std::env::var("HOSTNAME").unwrap_or_else(|_| "taskpod-worker".into()),
            store: StoreSettings {
                application_name: "taskpod-worker".into(),
                ..StoreSettings::default()
            },
            health_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            capacity: 10_000,
            lock: LockSettings::default(),
            tick_ms: 250,
            full_check_ms: 10_000,
            claim_interval_ms: 500,
            settle_ms: 2_000,
            drain_grace_ms: 10_000,
            handback_deadline_ms: 60_000,
            restart: RestartSettings::default(),
            handlers: HandlerSettings::default(),
            bus: BusSettings::default(),
            maintenance: MaintenanceSettings::default(),
        }
    }
}

/// The dedicated lock session: one unpooled connection whose loss means every lock is
/// lost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LockSettings {
    /// The database URL of the lock session; empty uses `store.url`. Set it when the
    /// pool goes through a transaction-mode pooler (PgBouncer): session advisory locks
    /// need a direct connection that no one else's transaction ever shares.
    pub url: Secret,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// Server-side TCP keepalive and user timeout on this session (user-settable, so
    /// they work on managed Postgres where server settings cannot be changed).
    pub keepalive_idle_secs: u32,
    pub keepalive_interval_secs: u32,
    pub keepalive_count: u32,
    pub tcp_user_timeout_ms: u32,
    /// Postgres ends this session when it has been idle this long: a worker that stops
    /// pinging without closing its socket (SIGSTOP, a hung process) loses its locks, so
    /// the others can take over. Keep it well above the longest control step.
    pub idle_session_timeout_ms: u32,
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            ping_interval_ms: 300,
            ping_timeout_ms: 1_000,
            keepalive_idle_secs: 5,
            keepalive_interval_secs: 1,
            keepalive_count: 3,
            tcp_user_timeout_ms: 5_000,
            idle_session_timeout_ms: 10_000,
        }
    }
}

/// The periodic chores, each a service of its own (see [`crate::maintenance`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceSettings {
    /// How often the node row's heartbeat is written (shown in membership listings;
    /// liveness itself is the lock probe's).
    pub heartbeat_ms: u64,
    /// How often the cluster-wide pending-pod gauges are read (a scan of the active
    /// tasks: often enough for a gauge, not every tick).
    pub gauges_ms: u64,
    /// How often crash rows past `restart.crash_retention_seconds` are pruned.
    pub crash_prune_ms: u64,
    /// How often the monthly event partitions are kept ahead of the clock.
    pub partition_upkeep_ms: u64,
    /// How often the store is probed through the pool.
    pub store_probe_ms: u64,
    /// A node that cannot reach the store through its pool this long, while its lock
    /// session still answers (a dead pooler or sidecar on `store.url`), lets go of its
    /// partitions, so that a node that can reach the store runs their tasks.
    pub store_fence_after_ms: u64,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 5_000,
            gauges_ms: 2_000,
            crash_prune_ms: 3_600_000,
            partition_upkeep_ms: 3_600_000,
            store_probe_ms: 1_000,
            store_fence_after_ms: 5_000,
        }
    }
}

impl MaintenanceSettings {
    fn check(&self) -> Result<(), SettingsError> {
        for (name, ms) in [
            ("maintenance.heartbeat_ms", self.heartbeat_ms),
            ("maintenance.gauges_ms", self.gauges_ms),
            ("maintenance.crash_prune_ms", self.crash_prune_ms),
            ("maintenance.partition_upkeep_ms", self.partition_upkeep_ms),
            ("maintenance.store_probe_ms", self.store_probe_ms),
        ] {
            if ms == 0 {
                return invalid(name, "must be positive");
            }
        }
        if self.store_fence_after_ms < self.store_probe_ms {
            return invalid(
                "maintenance.store_fence_after_ms",
                "must be at least one probe interval (maintenance.store_probe_ms)",
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RestartSettings {
    /// Off: a crash fails the task at once.
    pub auto_restart: bool,
    pub max_restart_attempts: u32,
    pub restart_window_seconds: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub max_node_losses: u32,
    /// Crash rows older than this are pruned (keep it above the window).
    pub crash_retention_seconds: u64,
}

impl Default for RestartSettings {
    fn default() -> Self {
        let p = RestartPolicy::default();
        Self {
            auto_restart: true,
            max_restart_attempts: p.max_restart_attempts,
            restart_window_seconds: p.window.as_secs(),
            backoff_base_ms: p.backoff_base.as_millis() as u64,
            backoff_max_ms: p.backoff_max.as_millis() as u64,
            max_node_losses: p.max_node_losses,
            crash_retention_seconds: 24 * 3600,
        }
    }
}

impl RestartSettings {
    pub fn policy(&self) -> RestartPolicy {
        RestartPolicy {
            max_restart_attempts: if self.auto_restart {
                self.max_restart_attempts
            } else {
                0
            },
            window: Duration::from_secs(self.restart_window_seconds),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            max_node_losses: self.max_node_losses,
            adoption_margin: Duration::ZERO,
            adoption_margin_kinds: Vec::new(),
        }
    }
}

impl WorkerSettings {
    /// # Errors
    /// A file or variable that does not parse, an unknown key, or a setting that cannot
    /// work.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let settings: Self = config::load(file, TOP_LEVEL_KEYS)?;
        settings.check()?;
        Ok(settings)
    }

    /// # Errors
    /// [`SettingsError::Invalid`] naming the setting.
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.capacity == 0 {
            return invalid("capacity", "must be positive");
        }
        if self.tick_ms == 0 || self.claim_interval_ms == 0 || self.full_check_ms == 0 {
            return invalid("tick_ms", "intervals must be positive");
        }
        if self.lock.ping_timeout_ms == 0 || self.lock.ping_interval_ms == 0 {
            return invalid("lock", "ping interval and timeout must be positive");
        }
        if self.handlers.kinds.is_empty() {
            return invalid("handlers.kinds", "a worker must offer at least one kind");
        }
        for kind in &self.handlers.kinds {
            if !taskpod_core::domain::KINDS.contains(&kind.as_str()) {
                return invalid("handlers.kinds", format!("no handler for kind {kind:?}"));
            }
        }
        self.maintenance.check()?;
        let exec = &self.handlers.exec;
        if exec.feed_interval_ms == 0 {
            return invalid("handlers.exec.feed_interval_ms", "must be positive");
        }
        if exec.guard_timeout_ms
            < exec
                .feed_interval_ms
                .saturating_mul(ExecSettings::MIN_INTERVALS_PER_TIMEOUT)
        {
            return invalid(
                "handlers.exec.guard_timeout_ms",
                format!(
                    "must be at least {} feed intervals",
                    ExecSettings::MIN_INTERVALS_PER_TIMEOUT
                ),
            );
        }
        self.check_fencing()?;
        if self.restart.crash_retention_seconds < self.restart.restart_window_seconds {
            return invalid(
                "restart.crash_retention_seconds",
                "must cover the restart window",
            );
        }
        Ok(())
    }

    /// The relation that keeps one live run per task (docs/architecture.md, "What each
    /// fault costs"): with D = ping interval + ping timeout (how long after its last
    /// answered ping a node has fenced itself), S the soonest Postgres may end a silent
    /// lock session after that ping (`lock.keepalive_idle_secs` for a cut network,
    /// `lock.idle_session_timeout_ms` for a paused process), G the guard timeout and M
    /// the fence margin:
    /// - D < S: a node fences itself before Postgres frees its locks for another node,
    ///   and a healthy session's pings keep it from ever looking idle;
    /// - M >= D + G - S: an adopted `exec` pod starts only after the old owner's runs
    ///   were killed (at the latest when their guards starve, D + G after that ping).
    ///
    /// # Errors
    /// [`SettingsError::Invalid`] naming the settings when either does not hold.
    fn check_fencing(&self) -> Result<(), SettingsError> {
        let d = self.lock.ping_interval_ms + self.lock.ping_timeout_ms;
        let s = (u64::from(self.lock.keepalive_idle_secs) * 1000)
            .min(u64::from(self.lock.idle_session_timeout_ms));
        if d >= s {
            return invalid(
                "lock.ping_interval_ms",
                format!(
                    "lock.ping_interval_ms + lock.ping_timeout_ms ({d} ms) must be below the \
                     soonest Postgres ends a silent lock session, the smaller of \
                     lock.keepalive_idle_secs and lock.idle_session_timeout_ms ({s} ms): \
                     otherwise another node could take this one's partitions before it \
                     has fenced itself"
                ),
            );
        }
        let needed = (d + self.handlers.exec.guard_timeout_ms).saturating_sub(s);
        if let Some(margin) = self.handlers.exec.fence_margin_ms
            && margin < needed
        {
            return invalid(
                "handlers.exec.fence_margin_ms",
                format!(
                    "{margin} ms is too short: with lock.ping_interval_ms + \
                     lock.ping_timeout_ms = {d} ms, handlers.exec.guard_timeout_ms = {} ms \
                     and Postgres ending a silent session after {s} ms at the soonest, an \
                     adopted program could start while the old owner's still runs; it \
                     must be at least {needed} ms",
                    self.handlers.exec.guard_timeout_ms
                ),
            );
        }
        Ok(())
    }

    /// Where the lock session connects: `lock.url`, else `store.url`.
    pub fn lock_url(&self) -> &str {
        match self.lock.url.expose() {
            "" => self.store.url.expose(),
            url => url,
        }
    }

    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    pub fn full_check(&self) -> Duration {
        Duration::from_millis(self.full_check_ms)
    }

    pub fn claim_interval(&self) -> Duration {
        Duration::from_millis(self.claim_interval_ms)
    }

    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms)
    }

    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.drain_grace_ms)
    }

    pub fn handback_deadline(&self) -> Duration {
        Duration::from_millis(self.handback_deadline_ms)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.lock.ping_interval_ms)
    }

    /// How long after its last answered ping a node still counts its lock session as
    /// alive: one ping interval for the next ping to start, one timeout for it to fail.
    pub fn lock_detection_bound(&self) -> Duration {
        Duration::from_millis(self.lock.ping_interval_ms + self.lock.ping_timeout_ms)
    }

    /// The restart policy crash records are decided by: the operator's limits, and the
    /// fence margin for `exec` tasks lost with their node, so whichever node adopts one
    /// waits it (recorded as the task's `not_before`).
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy {
            adoption_margin: self.fence_margin(),
            adoption_margin_kinds: vec!["exec".to_owned()],
            ..self.restart.policy()
        }
    }

    /// How long an adopted `exec` pod waits so that the old owner's programs are dead
    /// first. The old owner's lock session ended before this node could adopt; its
    /// liveness went stale at most a detection bound (ping interval + ping timeout)
    /// after its last answered ping, its guards heard their last byte then and kill
    /// within the guard timeout; the kill timeout is the guards' slack to do it.
    pub fn fence_margin(&self) -> Duration {
        Duration::from_millis(self.handlers.exec.fence_margin_ms.unwrap_or(
            self.lock.ping_interval_ms
                + self.lock.ping_timeout_ms
                + self.handlers.exec.guard_timeout_ms
                + crate::handlers::exec::KILL_TIMEOUT_MS,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_would_notice_its_loss_after_postgres_frees_its_locks_is_refused() {
        let mut s = WorkerSettings::default();
        assert!(s.check().is_ok());
        s.lock.ping_timeout_ms = 4_800;
        let err = s.check().unwrap_err().to_string();
        for setting in [
            "lock.ping_interval_ms",
            "lock.ping_timeout_ms",
            "lock.keepalive_idle_secs",
            "lock.idle_session_timeout_ms",
        ] {
            assert!(err.contains(setting), "{err}");
        }
        s.lock.ping_timeout_ms = 1_000;
        s.lock.idle_session_timeout_ms = 1_200;
        assert!(s.check().is_err(), "a healthy session would look idle");
    }

    #[test]
    fn a_fence_margin_shorter_than_the_old_owners_kill_is_refused() {
        let mut s = WorkerSettings::default();
        // D = 1.3 s, G = 1 s, S = 5 s: the old runs are dead before Postgres frees the
        // locks, so no wait is needed at all.
        s.handlers.exec.fence_margin_ms = Some(0);
        assert!(s.check().is_ok());
        assert_eq!(s.fence_margin(), Duration::ZERO);
        s.lock.keepalive_idle_secs = 2;
        s.lock.ping_timeout_ms = 1_500;
        // D = 1.8 s, G = 1 s, S = 2 s: 0.8 s needed.
        let err = s.check().unwrap_err().to_string();
        assert!(
            err.contains("handlers.exec.fence_margin_ms") && err.contains("800 ms"),
            "{err}"
        );
        s.handlers.exec.fence_margin_ms = Some(800);
        assert!(s.check().is_ok());
        s.handlers.exec.fence_margin_ms = None;
        assert_eq!(
            s.fence_margin(),
            Duration::from_millis(300 + 1_500 + 1_000 + 2_000)
        );
    }

    #[test]
    fn the_lock_session_uses_its_own_url_when_set() {
        let mut s = WorkerSettings::default();
        s.store.url = Secret::new("postgres://pooler:6432/taskpod");
        assert_eq!(s.lock_url(), "postgres://pooler:6432/taskpod");
        s.lock.url = Secret::new("postgres://primary:5432/taskpod");
        assert_eq!(s.lock_url(), "postgres://primary:5432/taskpod");
    }

    #[test]
    fn the_guard_timeout_must_span_several_feed_intervals() {
        let mut s = WorkerSettings::default();
        assert!(s.check().is_ok());
        s.handlers.exec.guard_timeout_ms = 399;
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("handlers.exec.guard_timeout_ms"), "{err}");
        s.handlers.exec.guard_timeout_ms = 400;
        assert!(s.check().is_ok());
        s.handlers.exec.feed_interval_ms = 0;
        assert!(s.check().is_err());
    }

    #[test]
    fn an_adopted_exec_pod_waits_out_the_old_owners_guard() {
        let s = WorkerSettings::default();
        // 300 ms ping interval + 1 s ping timeout + 1 s guard timeout + 2 s kill timeout.
        assert_eq!(s.fence_margin(), Duration::from_millis(4_300));
    }

    #[test]
    fn every_top_level_setting_is_reachable_from_the_environment() {
        let value = serde_json::to_value(WorkerSettings::default()).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = TOP_LEVEL_KEYS.to_vec();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys);
    }
}
