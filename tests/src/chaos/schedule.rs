//! The fault schedule of a chaos run, drawn from a seed: which faults, on whom, in which
//! order, how long each lasts and how quiet it is in between. The same seed and length
//! give the same schedule (the same faults in the same order; the cluster's timing
//! around them is never exactly the same), so a failing run is replayed with
//! `TASKPOD_CHAOS_SEED`.

use std::fmt;
use std::time::Duration;

use super::rng::Rng;
use crate::cluster::CutKind;

/// One fault. Members are indexes into the cluster's workers / API replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a worker, keep it down `down_ms`, start it again.
    KillWorker { worker: usize, down_ms: u64 },
    /// SIGSTOP a worker for `pause_ms` (longer than the lock session's
    /// `idle_session_timeout`, so its partitions are taken over meanwhile), then
    /// SIGCONT: a zombie owner wakes up.
    PauseWorker { worker: usize, pause_ms: u64 },
    /// `pg_terminate_backend` of a worker's lock session.
    TerminateLockSession { worker: usize },
    /// `pg_ctl stop -m immediate`, down `down_ms`, start again (crash recovery).
    CrashPostgres { down_ms: u64 },
    /// SIGKILL Redis, down `down_ms`, start again on the same port.
    KillRedis { down_ms: u64 },
    /// SIGKILL an API replica, down `down_ms`, start again on the same port.
    KillApi { api: usize, down_ms: u64 },
    /// Silence a worker's link to Postgres (its fault proxy holds every socket open
    /// and passes nothing) for `hold_ms`, then heal: a network partition that no FIN
    /// or RST announces.
    PartitionWorker { worker: usize, hold_ms: u64 },
    /// For `for_ms`, every COMMIT an API replica sends reaches Postgres and commits,
    /// and the answer is lost (its fault proxy resets the connection): ambiguous
    /// outcomes that only request ids make safe to retry.
    AmbiguousCommits { api: usize, for_ms: u64 },
    /// SIGSTOP Redis for `pause_ms`, then SIGCONT: a black hole, every connection open
    /// and silent (publishers must not stall, subscribers must notice).
    PauseRedis { pause_ms: u64 },
    /// `CLIENT KILL TYPE pubsub`: every subscription cut at once, Redis still up.
    KillSubscriptions,
    /// For `for_ms`, `client-output-buffer-limit pubsub` so small that Redis cuts any
    /// subscriber that falls a few messages behind.
    TinyPubsubBuffer { for_ms: u64 },
    /// A transaction with an id held open for `hold_ms` in another database of the
    /// same server: taskpod's change feed must not wait for it.
    HoldOtherDatabase { hold_ms: u64 },
    /// Hold an API replica's link to Postgres silent for `hold_ms` (its fault proxy
    /// passes nothing and keeps every socket open), then heal.
    SilenceApiStore { api: usize, hold_ms: u64 },
    /// For `for_ms`, an API replica's connections to Postgres are reset as soon as they
    /// send anything: a dead pooler.
    ResetApiStore { api: usize, for_ms: u64 },
    /// A real partition of the worker that runs in a network namespace: the kernel
    /// drops its packets to and/or from Postgres and Redis as `kind` says, for
    /// `hold_ms`, then the cut is healed.
    CutWorker {
        worker: usize,
        kind: CutKind,
        hold_ms: u64,
    },
}

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    KillWorker,
    PauseWorker,
    TerminateLockSession,
    CrashPostgres,
    KillRedis,
    KillApi,
    PartitionWorker,
    AmbiguousCommits,
    CutWorker,
    PauseRedis,
    KillSubscriptions,
    TinyPubsubBuffer,
    HoldOtherDatabase,
    SilenceApiStore,
    ResetApiStore,
}

impl FaultKind {
    /// The kinds every CI run must include at least once.
    pub const REQUIRED: [FaultKind; 10] = [
        FaultKind::KillWorker,
        FaultKind::PauseWorker,
        FaultKind::TerminateLockSession,
        FaultKind::CrashPostgres,
        FaultKind::KillRedis,
        FaultKind::KillApi,
        FaultKind::PauseRedis,
        FaultKind::KillSubscriptions,
        FaultKind::TinyPubsubBuffer,
        FaultKind::HoldOtherDatabase,
    ];

    /// The kinds a cluster of `shape` can take: the network faults need a member that
    /// reaches Postgres through a fault proxy, or a worker in a network namespace.
    pub fn available(shape: &Shape) -> Vec<FaultKind> {
        let mut kinds = Self::REQUIRED.to_vec();
        if shape.proxied_worker.is_some() {
            kinds.push(FaultKind::PartitionWorker);
        }
        if shape.proxied_api.is_some() {
            kinds.push(FaultKind::AmbiguousCommits);
            kinds.push(FaultKind::SilenceApiStore);
            kinds.push(FaultKind::ResetApiStore);
        }
        if shape.netns_worker.is_some() {
            kinds.push(FaultKind::CutWorker);
        }
        kinds
    }
}

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::KillWorker { .. } => FaultKind::KillWorker,
            Fault::PauseWorker { .. } => FaultKind::PauseWorker,
            Fault::TerminateLockSession { .. } => FaultKind::TerminateLockSession,
            Fault::CrashPostgres { .. } => FaultKind::CrashPostgres,
            Fault::KillRedis { .. } => FaultKind::KillRedis,
            Fault::KillApi { .. } => FaultKind::KillApi,
            Fault::PartitionWorker { .. } => FaultKind::PartitionWorker,
            Fault::AmbiguousCommits { .. } => FaultKind::AmbiguousCommits,
            Fault::CutWorker { .. } => FaultKind::CutWorker,
            Fault::PauseRedis { .. } => FaultKind::PauseRedis,
            Fault::KillSubscriptions => FaultKind::KillSubscriptions,
            Fault::TinyPubsubBuffer { .. } => FaultKind::TinyPubsubBuffer,
            Fault::HoldOtherDatabase { .. } => FaultKind::HoldOtherDatabase,
            Fault::SilenceApiStore { .. } => FaultKind::SilenceApiStore,
            Fault::ResetApiStore { .. } => FaultKind::ResetApiStore,
        }
    }

    /// How long the fault itself is planned to last.
    pub fn planned(&self) -> Duration {
        Duration::from_millis(match self {
            Fault::KillWorker { down_ms, .. }
            | Fault::CrashPostgres { down_ms }
            | Fault::KillRedis { down_ms }
            | Fault::KillApi { down_ms, .. } => *down_ms,
            Fault::PauseWorker { pause_ms, .. } | Fault::PauseRedis { pause_ms } => *pause_ms,
            Fault::PartitionWorker { hold_ms, .. }
            | Fault::CutWorker { hold_ms, .. }
            | Fault::HoldOtherDatabase { hold_ms }
            | Fault::SilenceApiStore { hold_ms, .. } => *hold_ms,
            Fault::AmbiguousCommits { for_ms, .. }
            | Fault::TinyPubsubBuffer { for_ms }
            | Fault::ResetApiStore { for_ms, .. } => *for_ms,
            Fault::TerminateLockSession { .. } | Fault::KillSubscriptions => 0,
        })
    }

    fn draw(kind: FaultKind, rng: &mut Rng, shape: &Shape) -> Self {
        let worker = rng.index(shape.workers);
        match kind {
            FaultKind::KillWorker => Fault::KillWorker {
                worker,
                down_ms: rng.range(300, 3_000),
            },
            FaultKind::PauseWorker => Fault::PauseWorker {
                worker,
                pause_ms: shape.idle_session_timeout_ms + rng.range(2_000, 6_000),
            },
            FaultKind::TerminateLockSession => Fault::TerminateLockSession { worker },
            FaultKind::CrashPostgres => Fault::CrashPostgres {
                down_ms: rng.range(300, 3_000),
            },
            FaultKind::KillRedis => Fault::KillRedis {
                down_ms: rng.range(300, 3_000),
            },
            FaultKind::KillApi => Fault::KillApi {
                api: rng.index(shape.apis),
                down_ms: rng.range(200, 2_000),
            },
            FaultKind::PartitionWorker => Fault::PartitionWorker {
                worker: shape.proxied_worker.unwrap_or_default(),
                hold_ms: shape.idle_session_timeout_ms + rng.range(1_000, 5_000),
            },
            FaultKind::AmbiguousCommits => Fault::AmbiguousCommits {
                api: shape.proxied_api.unwrap_or_default(),
                for_ms: rng.range(1_000, 4_000),
            },
            FaultKind::CutWorker => Fault::CutWorker {
                worker: shape.netns_worker.unwrap_or_default(),
                kind: CutKind::ALL[rng.index(CutKind::ALL.len())],
                hold_ms: shape.idle_session_timeout_ms + rng.range(1_000, 6_000),
            },
            FaultKind::PauseRedis => Fault::PauseRedis {
                pause_ms: rng.range(1_000, 4_000),
            },
            FaultKind::KillSubscriptions => Fault::KillSubscriptions,
            FaultKind::TinyPubsubBuffer => Fault::TinyPubsubBuffer {
                for_ms: rng.range(1_500, 4_000),
            },
            FaultKind::HoldOtherDatabase => Fault::HoldOtherDatabase {
                hold_ms: rng.range(3_000, 8_000),
            },
            FaultKind::SilenceApiStore => Fault::SilenceApiStore {
                api: shape.proxied_api.unwrap_or_default(),
                hold_ms: rng.range(1_000, 5_000),
            },
            FaultKind::ResetApiStore => Fault::ResetApiStore {
                api: shape.proxied_api.unwrap_or_default(),
                for_ms: rng.range(500, 2_500),
            },
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillWorker { worker, down_ms } => {
                write!(f, "SIGKILL worker #{worker}, restart after {down_ms} ms")
            }
            Fault::PauseWorker { worker, pause_ms } => {
                write!(
                    f,
                    "SIGSTOP worker #{worker} for {pause_ms} ms, then SIGCONT"
                )
            }
            Fault::TerminateLockSession { worker } => {
                write!(f, "pg_terminate_backend(lock session of worker #{worker})")
            }
            Fault::CrashPostgres { down_ms } => {
                write!(f, "pg_ctl stop -m immediate, restart after {down_ms} ms")
            }
            Fault::KillRedis { down_ms } => write!(f, "SIGKILL redis, restart after {down_ms} ms"),
            Fault::KillApi { api, down_ms } => {
                write!(f, "SIGKILL API replica #{api}, restart after {down_ms} ms")
            }
            Fault::PartitionWorker { worker, hold_ms } => {
                write!(
                    f,
                    "silence worker #{worker}'s Postgres link for {hold_ms} ms"
                )
            }
            Fault::AmbiguousCommits { api, for_ms } => write!(
                f,
                "lose the answer to every COMMIT of API replica #{api} for {for_ms} ms"
            ),
            Fault::CutWorker {
                worker,
                kind,
                hold_ms,
            } => write!(f, "{kind} of worker #{worker} for {hold_ms} ms"),
            Fault::PauseRedis { pause_ms } => {
                write!(f, "SIGSTOP redis for {pause_ms} ms, then SIGCONT")
            }
            Fault::KillSubscriptions => write!(f, "redis CLIENT KILL TYPE pubsub"),
            Fault::TinyPubsubBuffer { for_ms } => write!(
                f,
                "redis client-output-buffer-limit pubsub 1kb 512b 1 for {for_ms} ms"
            ),
            Fault::HoldOtherDatabase { hold_ms } => write!(
                f,
                "hold a transaction open in another database for {hold_ms} ms"
            ),
            Fault::SilenceApiStore { api, hold_ms } => write!(
                f,
                "silence API replica #{api}'s Postgres link for {hold_ms} ms"
            ),
            Fault::ResetApiStore { api, for_ms } => write!(
                f,
                "reset API replica #{api}'s Postgres connections for {for_ms} ms"
            ),
        }
    }
}

/// A fault and the quiet time before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub quiet_ms: u64,
    pub fault: Fault,
}

/// The cluster a schedule is drawn for.
#[derive(Clone, Debug)]
pub struct Shape {
    pub workers: usize,
    pub apis: usize,
    /// The workers' `lock.idle_session_timeout_ms`: a pause must outlast it.
    pub idle_session_timeout_ms: u64,
    /// The worker and the replica that reach Postgres through a fault proxy.
    pub proxied_worker: Option<usize>,
    pub proxied_api: Option<usize>,
    /// The worker that runs in a network namespace (real partitions).
    pub netns_worker: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

impl Schedule {
    /// Every available fault kind once, in a random order, then random faults until
    /// the planned time (quiet gaps plus fault durations) reaches `length`.
    pub fn generate(seed: u64, length: Duration, shape: &Shape) -> Self {
        let mut rng = Rng::derived(seed, "schedule");
        let available = FaultKind::available(shape);
        let mut kinds = available.clone();
        rng.shuffle(&mut kinds);
        let budget = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        let mut steps = Vec::new();
        let mut planned = 0u64;
        let mut i = 0usize;
        loop {
            let kind = match kinds.get(i) {
                Some(kind) => *kind,
                None if planned < budget => available[rng.index(available.len())],
                None => break,
            };
            i += 1;
            let step = Step {
                quiet_ms: rng.range(1_500, 5_000),
                fault: Fault::draw(kind, &mut rng, shape),
            };
            planned += step.quiet_ms + u64::try_from(step.fault.planned().as_millis()).unwrap_or(0);
            steps.push(step);
        }
        Self { seed, steps }
    }

    /// How long the schedule is planned to take.
    pub fn planned(&self) -> Duration {
        self.steps
            .iter()
            .map(|s| Duration::from_millis(s.quiet_ms) + s.fault.planned())
            .sum()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fault schedule of seed {} ({} faults, {:.0?} planned):",
            self.seed,
            self.steps.len(),
            self.planned()
        )?;
        for (i, step) in self.steps.iter().enumerate() {
            writeln!(
                f,
                "  {i:>3}. after {:>5} ms quiet: {}",
                step.quiet_ms, step.fault
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn shape() -> Shape {
        Shape {
            workers: 3,
            apis: 2,
            idle_session_timeout_ms: 3_000,
            proxied_worker: Some(2),
            proxied_api: Some(1),
            netns_worker: Some(1),
        }
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let a = Schedule::generate(9, Duration::from_secs(60), &shape());
        let b = Schedule::generate(9, Duration::from_secs(60), &shape());
        assert_eq!(a, b);
        assert_ne!(a, Schedule::generate(10, Duration::from_secs(60), &shape()));
    }

    #[test]
    fn every_kind_appears_and_the_length_is_reached() {
        for seed in 0..50 {
            let s = Schedule::generate(seed, Duration::from_secs(45), &shape());
            let kinds: BTreeSet<FaultKind> = s.steps.iter().map(|st| st.fault.kind()).collect();
            assert_eq!(kinds.len(), FaultKind::available(&shape()).len(), "{s}");
            assert!(FaultKind::REQUIRED.iter().all(|k| kinds.contains(k)), "{s}");
            assert!(s.planned() >= Duration::from_secs(45), "{s}");
        }
    }

    #[test]
    fn pauses_and_partitions_outlast_the_idle_session_timeout() {
        for seed in 0..50 {
            let s = Schedule::generate(seed, Duration::from_secs(30), &shape());
            for step in &s.steps {
                match step.fault {
                    Fault::PauseWorker { pause_ms, .. } => assert!(pause_ms >= 5_000),
                    Fault::PartitionWorker { worker, hold_ms } => {
                        assert_eq!(worker, 2, "only the proxied worker");
                        assert!(hold_ms >= 4_000);
                    }
                    Fault::CutWorker {
                        worker, hold_ms, ..
                    } => {
                        assert_eq!(worker, 1, "only the worker in a namespace");
                        assert!(hold_ms >= 4_000);
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn network_faults_need_a_proxy() {
        let direct = Shape {
            proxied_worker: None,
            proxied_api: None,
            netns_worker: None,
            ..shape()
        };
        assert_eq!(FaultKind::available(&direct), FaultKind::REQUIRED);
    }
}
