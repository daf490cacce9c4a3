//! The state model, tested without a database: `decide`, `evolve`, `mint_pod`, replay
//! and the restart policy (DESIGN.md, "State model" and "Pods and supervision").
//!
//! The properties drive random sequences of steps. A step is either a caller's
//! [`Command`] (decided, then its events evolved) or something a pod or worker does,
//! appended with `evolve` directly: starting a pod (minting an epoch and appending
//! `pod_started` under it, as one step, since minting writes no event), stopping or
//! crashing a pod under the current or a stale epoch, moving a phase, completing or
//! failing the task. Refusals are fine; every accepted step must keep the invariants.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::collection::vec;
use proptest::prelude::*;
use taskpod_core::Error;
use taskpod_core::domain::restart::{CrashKind, RestartDecision, RestartPolicy};
use taskpod_core::domain::{
    Command, Event, MANUAL_KIND, NodeId, Phase, PodState, Status, TaskId, TaskState, decide,
    evolve, mint_pod,
};
use uuid::Uuid;

const SLEEP_KIND: &str = "sleep";
const NON_TERMINAL_PHASES: [Phase; 4] = [
    Phase::SpecClarification,
    Phase::Planning,
    Phase::Development,
    Phase::Review,
];

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn task_id() -> TaskId {
    TaskId(Uuid::from_u128(0x7a5c_0001))
}

fn node(n: u8) -> NodeId {
    NodeId(Uuid::from_u128(0x0de0_0000 + u128::from(n)))
}

fn at(secs: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + i64::from(secs), 0)
        .single()
        .expect("a valid timestamp")
}

fn created(kind: &str) -> Event {
    Event::TaskCreated {
        title: "write the tests".into(),
        description: String::new(),
        kind: kind.into(),
        payload: serde_json::Value::Null,
        priority: 7,
        metadata: serde_json::json!({}),
    }
}

/// A new task of `kind`, and its stream so far.
fn new_task(kind: &str) -> (TaskState, Vec<Event>) {
    let event = created(kind);
    let state = TaskState::genesis(task_id(), &event).expect("task_created starts a stream");
    (state, vec![event])
}

fn fold(state: &TaskState, events: &[Event]) -> Result<TaskState, Error> {
    events.iter().try_fold(state.clone(), |s, e| evolve(&s, e))
}

/// Every command a caller can send, each phase target included.
fn every_command() -> Vec<Command> {
    let mut commands = vec![
        Command::Cancel {
            reason: "no longer needed".into(),
        },
        Command::Complete,
        Command::RequestStart,
        Command::RequestStop { reason: None },
        Command::RequestStop {
            reason: Some("pause".into()),
        },
        Command::RequestRestart,
    ];
    commands.extend(Phase::ALL.iter().map(|&to| Command::TransitionPhase { to }));
    commands
}

/// Every event, with epochs around the state's current one and every phase pair.
fn every_event(state: &TaskState) -> Vec<Event> {
    let mut events = vec![
        created(SLEEP_KIND),
        Event::PodRequested {},
        Event::PodStopRequested { reason: None },
        Event::PodRestartRequested {},
    ];
    for epoch in [state.pod_epoch - 1, state.pod_epoch, state.pod_epoch + 1] {
        events.push(Event::PodStarted {
            epoch,
            node: node(9),
            started_at: at(9),
        });
        events.push(Event::PodStopped {
            epoch,
            reason: "stopped".into(),
        });
        for kind in [CrashKind::Handler, CrashKind::NodeLost] {
            events.push(Event::PodCrashed {
                epoch,
                reason: "crashed".into(),
                kind,
            });
        }
    }
    for &from in Phase::ALL {
        for &to in Phase::ALL {
            events.push(Event::PhaseChanged { from, to });
        }
        events.push(Event::TaskCompleted { from_phase: from });
        events.push(Event::TaskCancelled {
            reason: "late".into(),
            from_phase: from,
        });
        events.push(Event::TaskFailed {
            error: "late".into(),
            from_phase: from,
        });
    }
    events
}

// ---------------------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------------------

/// Which epoch a pod event carries, relative to the task's current one.
#[derive(Clone, Copy, Debug)]
enum EpochPick {
    Current,
    /// `current - n`.
    Stale(i64),
    /// `current + 1`: an epoch nobody minted.
    Future,
}

impl EpochPick {
    fn resolve(self, state: &TaskState) -> i64 {
        match self {
            EpochPick::Current => state.pod_epoch,
            EpochPick::Stale(n) => state.pod_epoch - n,
            EpochPick::Future => state.pod_epoch + 1,
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// A caller's command, through `decide`.
    Command(Command),
    /// The worker mints an epoch and the pod appends `pod_started` under it.
    StartPod { node: u8, at: u32 },
    /// The pod reports it stopped.
    StopPod { epoch: EpochPick },
    /// The worker records a crash.
    CrashPod { epoch: EpochPick, kind: CrashKind },
    /// The handler moves the phase; `from: None` means from the current phase.
    PhaseChanged { from: Option<Phase>, to: Phase },
    /// The handler completes the task.
    PodCompletes { from_phase: Option<Phase> },
    /// The handler's `Fail`, or the worker failing a task whose budget is spent.
    PodFails { from_phase: Option<Phase> },
}

enum Outcome {
    Accepted {
        state: TaskState,
        events: Vec<Event>,
    },
    Refused(Error),
}

/// Applies one step. An `Err` is a broken property (decide's events refused by evolve,
/// or a freshly minted epoch that cannot start), not a refusal.
fn apply(state: &TaskState, step: &Step) -> Result<Outcome, TestCaseError> {
    let pod_event = |event: Event| match evolve(state, &event) {
        Ok(next) => Outcome::Accepted {
            state: next,
            events: vec![event],
        },
        Err(e) => Outcome::Refused(e),
    };
    let from_or_current = |from: &Option<Phase>| from.unwrap_or(state.phase);
    Ok(match step {
        Step::Command(command) => match decide(state, command) {
            Err(e) => Outcome::Refused(e),
            Ok(events) => {
                let next = fold(state, &events).map_err(|e| {
                    TestCaseError::fail(format!(
                        "decide({command:?}) on {state:?} gave {events:?}, which evolve refuses: {e}"
                    ))
                })?;
                Outcome::Accepted {
                    state: next,
                    events,
                }
            }
        },
        Step::StartPod { node: n, at: t } => match mint_pod(state, node(*n)) {
            Err(e) => Outcome::Refused(e),
            Ok(minted) => {
                let event = Event::PodStarted {
                    epoch: minted.pod_epoch,
                    node: node(*n),
                    started_at: at(*t),
                };
                let next = evolve(&minted, &event).map_err(|e| {
                    TestCaseError::fail(format!(
                        "pod_started under the epoch just minted from {state:?} was refused: {e}"
                    ))
                })?;
                Outcome::Accepted {
                    state: next,
                    events: vec![event],
                }
            }
        },
        Step::StopPod { epoch } => pod_event(Event::PodStopped {
            epoch: epoch.resolve(state),
            reason: "handler returned".into(),
        }),
        Step::CrashPod { epoch, kind } => pod_event(Event::PodCrashed {
            epoch: epoch.resolve(state),
            reason: format!("crash ({})", kind.as_str()),
            kind: *kind,
        }),
        Step::PhaseChanged { from, to } => pod_event(Event::PhaseChanged {
            from: from_or_current(from),
            to: *to,
        }),
        Step::PodCompletes { from_phase } => pod_event(Event::TaskCompleted {
            from_phase: from_or_current(from_phase),
        }),
        Step::PodFails { from_phase } => pod_event(Event::TaskFailed {
            error: "handler failed".into(),
            from_phase: from_or_current(from_phase),
        }),
    })
}

// ---------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------

/// What must hold of every state.
fn check_state(s: &TaskState) -> Result<(), TestCaseError> {
    prop_assert!(
        s.status.holds_phase(s.phase),
        "a phase its status cannot hold: {:?}",
        s
    );
    let terminal_phase = match s.status {
        Status::Completed => Some(Phase::Completed),
        Status::Cancelled => Some(Phase::Cancelled),
        Status::Failed => Some(Phase::Failed),
        Status::Inactive | Status::Active => None,
    };
    match terminal_phase {
        Some(phase) => prop_assert_eq!(s.phase, phase, "terminal status, other phase: {:?}", s),
        None => prop_assert!(
            !s.phase.is_terminal(),
            "terminal phase, live status: {:?}",
            s
        ),
    }
    if s.pod_state == PodState::Running {
        prop_assert!(
            s.owner_node.is_some(),
            "a running pod without an owner: {:?}",
            s
        );
        prop_assert!(
            s.pod_started_at.is_some(),
            "a running pod without a start: {:?}",
            s
        );
    }
    if s.pod_state == PodState::None {
        prop_assert!(s.owner_node.is_none(), "no pod but an owner: {:?}", s);
        prop_assert!(
            s.pod_started_at.is_none(),
            "no pod but a start time: {:?}",
            s
        );
    }
    prop_assert!(s.pod_epoch >= 0, "negative epoch: {:?}", s);
    prop_assert!(s.version >= 1, "version below 1: {:?}", s);
    Ok(())
}

/// What must hold of every accepted step that appended `events`.
fn check_step(
    before: &TaskState,
    after: &TaskState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    prop_assert!(!events.is_empty(), "an accepted step appended nothing");
    let appended = i64::try_from(events.len()).expect("a short batch");
    prop_assert_eq!(
        after.version,
        before.version + appended,
        "version must grow by the number of events {:?}",
        events
    );
    prop_assert!(
        after.pod_epoch >= before.pod_epoch,
        "pod_epoch went back from {} to {} on {:?}",
        before.pod_epoch,
        after.pod_epoch,
        events
    );
    prop_assert_eq!(after.task_id, before.task_id);
    prop_assert_eq!(&after.kind, &before.kind);
    prop_assert_eq!(after.priority, before.priority);
    check_state(after)
}

/// A pod starts only under an epoch that never ran: records the epochs `events` release
/// in `spent`, and refuses a start under one of them.
fn check_epochs(spent: &mut BTreeSet<i64>, events: &[Event]) -> Result<(), TestCaseError> {
    for event in events {
        match event {
            Event::PodStarted { epoch, .. } => {
                prop_assert!(!spent.contains(epoch), "epoch {} started again", epoch);
            }
            Event::PodStopped { epoch, .. } | Event::PodCrashed { epoch, .. } => {
                spent.insert(*epoch);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The refusals `decide` and `mint_pod` may answer with: the table's, nothing else.
fn is_table_refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::AlreadyCompleted(_)
            | Error::AlreadyCancelled(_)
            | Error::AlreadyFailed(_)
            | Error::AlreadyStarted(_)
            | Error::NotRunning(_)
            | Error::InvalidTransition { .. }
            | Error::PhaseOwnedByHandler { .. }
    )
}

/// The error `decide` must give for any command on a terminal task.
fn is_already_error_for(status: Status, e: &Error) -> bool {
    let id = task_id();
    match status {
        Status::Completed => matches!(e, Error::AlreadyCompleted(t) if *t == id),
        Status::Cancelled => matches!(e, Error::AlreadyCancelled(t) if *t == id),
        Status::Failed => matches!(e, Error::AlreadyFailed(t) if *t == id),
        Status::Inactive | Status::Active => false,
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn kind() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(MANUAL_KIND), Just(SLEEP_KIND)]
}

fn phase() -> impl Strategy<Value = Phase> {
    proptest::sample::select(Phase::ALL)
}

/// Mostly the current phase, so the handler's steps are often accepted.
fn from_phase() -> impl Strategy<Value = Option<Phase>> {
    prop_oneof![3 => Just(None), 1 => phase().prop_map(Some)]
}

fn epoch_pick() -> impl Strategy<Value = EpochPick> {
    prop_oneof![
        4 => Just(EpochPick::Current),
        2 => (1i64..=2).prop_map(EpochPick::Stale),
        1 => Just(EpochPick::Future),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        1 => Just(Command::Cancel { reason: "no longer needed".into() }),
        1 => Just(Command::Complete),
        5 => phase().prop_map(|to| Command::TransitionPhase { to }),
        3 => Just(Command::RequestStart),
        2 => proptest::option::of(Just("pause".to_owned()))
            .prop_map(|reason| Command::RequestStop { reason }),
        2 => Just(Command::RequestRestart),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => command().prop_map(Step::Command),
        3 => (0u8..3, 0u32..10_000).prop_map(|(node, at)| Step::StartPod { node, at }),
        2 => epoch_pick().prop_map(|epoch| Step::StopPod { epoch }),
        1 => (epoch_pick(), prop_oneof![Just(CrashKind::Handler), Just(CrashKind::NodeLost)])
            .prop_map(|(epoch, kind)| Step::CrashPod { epoch, kind }),
        3 => (from_phase(), phase()).prop_map(|(from, to)| Step::PhaseChanged { from, to }),
        1 => from_phase().prop_map(|from_phase| Step::PodCompletes { from_phase }),
        1 => from_phase().prop_map(|from_phase| Step::PodFails { from_phase }),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    vec(step(), 0..40)
}

/// A step that ends a live task.
fn ending() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Command(Command::Cancel {
            reason: "stop it".into()
        })),
        Just(Step::Command(Command::Complete)),
        Just(Step::PodCompletes { from_phase: None }),
        Just(Step::PodFails { from_phase: None }),
    ]
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_command_or_event_sequence_reaches_an_invalid_state(kind in kind(), steps in steps()) {
        let (mut state, _) = new_task(kind);
        check_state(&state)?;
        // Epochs whose pod reported stopping or crashing: they never start again.
        let mut spent = BTreeSet::new();
        for step in &steps {
            match apply(&state, step)? {
                Outcome::Accepted { state: next, events } => {
                    check_step(&state, &next, &events)?;
                    check_epochs(&mut spent, &events)?;
                    // Minting and starting are one step here, so no state is left starting.
                    prop_assert_ne!(next.pod_state, PodState::Starting);
                    state = next;
                }
                Outcome::Refused(e) => match step {
                    Step::Command(_) | Step::StartPod { .. } => {
                        prop_assert!(is_table_refusal(&e), "{:?} refused with {:?}", step, e);
                    }
                    _ => prop_assert!(
                        matches!(e, Error::IllegalEvent { .. }),
                        "{:?} refused with {:?}", step, e
                    ),
                },
            }
            // Whatever a pod or worker appends next, evolve keeps the invariants.
            for event in every_event(&state) {
                if let Ok(next) = evolve(&state, &event) {
                    let events = std::slice::from_ref(&event);
                    check_step(&state, &next, events)?;
                    check_epochs(&mut spent.clone(), events)?;
                }
            }
        }
    }

    #[test]
    fn terminal_statuses_stay_terminal(
        kind in kind(),
        prefix in steps(),
        end in ending(),
        suffix in steps(),
    ) {
        let (mut state, _) = new_task(kind);
        let steps: Vec<&Step> = prefix.iter().chain([&end]).chain(&suffix).collect();
        for (i, step) in steps.iter().enumerate() {
            if i == prefix.len() + 1 {
                prop_assert!(state.status.is_terminal(), "{:?} did not end {:?}", end, state);
            }
            let ended = state.status.is_terminal();
            if ended {
                for command in every_command() {
                    let refused = decide(&state, &command);
                    prop_assert!(
                        matches!(&refused, Err(e) if is_already_error_for(state.status, e)),
                        "{:?} on a {} task gave {:?}", command, state.status, refused
                    );
                }
                prop_assert!(matches!(mint_pod(&state, NodeId::new()), Err(Error::NotRunning(_))));
                for event in every_event(&state) {
                    if let Ok(next) = evolve(&state, &event) {
                        // Only the pod's leaving may still be recorded.
                        let releases_pod = matches!(
                            event,
                            Event::PodStopped { epoch, .. } | Event::PodCrashed { epoch, .. }
                                if epoch == state.pod_epoch
                        );
                        prop_assert!(releases_pod, "{:?} accepted on {:?}", event, state);
                        prop_assert!(state.has_pod());
                        prop_assert_eq!(next.pod_state, PodState::None);
                        prop_assert_eq!(next.status, state.status);
                        prop_assert_eq!(next.phase, state.phase);
                        prop_assert_eq!(&next.last_error, &state.last_error);
                    }
                }
            }
            if let Outcome::Accepted { state: next, .. } = apply(&state, step)? {
                if ended {
                    prop_assert_eq!(next.status, state.status);
                    prop_assert_eq!(next.phase, state.phase);
                    prop_assert_eq!(&next.last_error, &state.last_error);
                }
                state = next;
            }
        }
    }

    #[test]
    fn replaying_the_accepted_events_reproduces_the_live_state(
        kind in kind(),
        steps in steps(),
    ) {
        let (mut state, mut stream) = new_task(kind);
        for step in &steps {
            if let Outcome::Accepted { state: next, events } = apply(&state, step)? {
                stream.extend(events);
                state = next;
                if state.pod_state != PodState::Starting {
                    let replayed = TaskState::replay(task_id(), &stream).map_err(|e| {
                        TestCaseError::fail(format!("replay of {stream:?} failed: {e}"))
                    })?;
                    prop_assert_eq!(&replayed, &state, "replay differs after {:?}", step);
                }
            }
        }
        // The state after each event is the replay of the stream up to it.
        let history = TaskState::history(task_id(), &stream)
            .map_err(|e| TestCaseError::fail(format!("history of {stream:?} failed: {e}")))?;
        prop_assert_eq!(history.len(), stream.len());
        for (n, state) in history.iter().enumerate() {
            let replayed = TaskState::replay(task_id(), &stream[..=n])
                .map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
            prop_assert_eq!(&replayed, state, "history differs at event {}", n);
        }
    }

    #[test]
    fn decide_never_returns_events_that_evolve_refuses(kind in kind(), steps in steps()) {
        let (mut state, _) = new_task(kind);
        for step in steps.iter().map(Some).chain([None]) {
            // Every reachable state, and the same state with a pod just minted.
            let reachable = [Some(state.clone()), mint_pod(&state, NodeId::new()).ok()];
            for s in reachable.iter().flatten() {
                for command in every_command() {
                    match decide(s, &command) {
                        Ok(events) => {
                            prop_assert_eq!(events.len(), 1, "{:?} gave {:?}", command, events);
                            let next = fold(s, &events).map_err(|e| {
                                TestCaseError::fail(format!(
                                    "decide({command:?}) on {s:?} gave {events:?}; evolve: {e}"
                                ))
                            })?;
                            check_step(s, &next, &events)?;
                        }
                        Err(e) => prop_assert!(is_table_refusal(&e), "{:?}: {:?}", command, e),
                    }
                }
            }
            let Some(step) = step else { break };
            if let Outcome::Accepted { state: next, .. } = apply(&state, step)? {
                state = next;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Retry and Fail: the pod loop under the restart policy always ends
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum HandlerOutcome {
    /// A crash, counted against the restart budget.
    Retry,
    /// The task becomes failed.
    Fail,
}

fn handler_outcome() -> impl Strategy<Value = HandlerOutcome> {
    prop_oneof![4 => Just(HandlerOutcome::Retry), 1 => Just(HandlerOutcome::Fail)]
}

/// A policy whose window holds every crash of a run: at most 9 runs of at most 30 s,
/// each followed by at most a minute of backoff, is far less than an hour.
fn policy() -> impl Strategy<Value = RestartPolicy> {
    (1u32..10, 1u64..5_000, 1u64..60_000, 0u32..5).prop_map(
        |(max_restart_attempts, base_ms, max_ms, max_node_losses)| RestartPolicy {
            max_restart_attempts,
            window: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(base_ms),
            backoff_max: Duration::from_millis(max_ms),
            max_node_losses,
            ..RestartPolicy::default()
        },
    )
}

/// Appends `events` as a pod or worker would; they must be accepted.
fn append(
    state: &TaskState,
    stream: &mut Vec<Event>,
    events: Vec<Event>,
) -> Result<TaskState, TestCaseError> {
    let next = fold(state, &events)
        .map_err(|e| TestCaseError::fail(format!("{events:?} refused on {state:?}: {e}")))?;
    check_step(state, &next, &events)?;
    stream.extend(events);
    Ok(next)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_retry_and_fail_sequence_always_ends_in_failed(
        kind in kind(),
        policy in policy(),
        outcomes in vec(handler_outcome(), 0..12),
        run_secs in vec(0u64..30, 12),
        jitters in vec(0.0f64..1.0, 12),
    ) {
        let max = policy.max_restart_attempts;
        let (state, mut stream) = new_task(kind);
        let start = decide(&state, &Command::RequestStart).expect("an inactive task starts");
        let mut state = append(&state, &mut stream, start)?;

        let mut now = Duration::ZERO;
        let mut crashes: Vec<Duration> = Vec::new();
        let mut runs = 0usize;
        let mut last_epoch = state.pod_epoch;
        let ended_by = loop {
            prop_assert!(runs < 12, "the pod loop did not end after {} runs", runs);
            // The worker mints a new epoch and the pod starts under it.
            let minted = mint_pod(&state, NodeId::new()).map_err(|e| TestCaseError::fail(format!("mint: {e}")))?;
            prop_assert_eq!(minted.pod_epoch, last_epoch + 1, "every run gets a new epoch");
            let epoch = minted.pod_epoch;
            last_epoch = epoch;
            state = append(&minted, &mut stream, vec![Event::PodStarted {
                epoch,
                node: node(1),
                started_at: at(u32::try_from(now.as_secs()).expect("under an hour")),
            }])?;
            now += Duration::from_secs(run_secs[runs]);
            let outcome = outcomes.get(runs).copied().unwrap_or(HandlerOutcome::Retry);
            runs += 1;
            match outcome {
                HandlerOutcome::Fail => {
                    // The pod appends the failure, then says it stopped.
                    state = append(&state, &mut stream, vec![Event::TaskFailed {
                        error: "handler: Fail".into(),
                        from_phase: state.phase,
                    }])?;
                    prop_assert_eq!(state.pod_state, PodState::Stopping);
                    state = append(&state, &mut stream, vec![Event::PodStopped {
                        epoch,
                        reason: "task failed".into(),
                    }])?;
                    prop_assert_eq!(state.last_error.as_deref(), Some("handler: Fail"));
                    break HandlerOutcome::Fail;
                }
                HandlerOutcome::Retry => {
                    let before = crashes.iter().filter(|&&t| now - t < policy.window).count();
                    state = append(&state, &mut stream, vec![Event::PodCrashed {
                        epoch,
                        reason: "handler: Retry".into(),
                        kind: CrashKind::Handler,
                    }])?;
                    prop_assert_eq!(state.pod_state, PodState::None);
                    prop_assert_eq!(state.status, Status::Active, "a crash keeps the task active");
                    crashes.push(now);
                    let in_window = crashes.iter().filter(|&&t| now - t < policy.window).count();
                    prop_assert_eq!(in_window, before + 1, "every crash so far is in the window");
                    prop_assert_eq!(in_window, crashes.len());
                    let count = u32::try_from(in_window).expect("a few crashes");
                    match policy.decide(count, 0, jitters[runs - 1]) {
                        RestartDecision::Restart { delay } => {
                            prop_assert!(count <= max, "restart after {} of {} crashes", count, max);
                            prop_assert!(
                                delay <= policy.backoff_max,
                                "delay {:?} over backoff_max {:?}", delay, policy.backoff_max
                            );
                            now += delay;
                        }
                        RestartDecision::Fail { error } => {
                            prop_assert_eq!(count, max + 1, "failed after {} crashes, {} restarts allowed", count, max);
                            // The worker fails the task under its generation.
                            state = append(&state, &mut stream, vec![Event::TaskFailed {
                                error: error.clone(),
                                from_phase: state.phase,
                            }])?;
                            prop_assert_eq!(state.last_error.as_deref(), Some(error.as_str()));
                            break HandlerOutcome::Retry;
                        }
                    }
                }
            }
        };

        prop_assert_eq!(state.status, Status::Failed);
        prop_assert_eq!(state.phase, Phase::Failed);
        prop_assert_eq!(state.pod_state, PodState::None);
        prop_assert!(state.last_error.is_some());
        // max restarts allowed: at most max + 1 runs, and as many crashes.
        prop_assert!(crashes.len() <= max as usize + 1);
        let first_fail = outcomes.iter().position(|&o| o == HandlerOutcome::Fail);
        match first_fail {
            // The first Fail ends it, unless the budget ran out before.
            Some(i) if i <= max as usize => {
                prop_assert_eq!(ended_by, HandlerOutcome::Fail);
                prop_assert_eq!(runs, i + 1);
                prop_assert_eq!(crashes.len(), i);
            }
            _ => {
                prop_assert_eq!(ended_by, HandlerOutcome::Retry);
                prop_assert_eq!(crashes.len(), max as usize + 1);
                prop_assert_eq!(runs, max as usize + 1);
            }
        }
        // The ended task refuses to start again, and its stream replays to it.
        prop_assert!(matches!(
            decide(&state, &Command::RequestStart),
            Err(Error::AlreadyFailed(_))
        ));
        prop_assert!(matches!(mint_pod(&state, NodeId::new()), Err(Error::NotRunning(_))));
        let replayed = TaskState::replay(task_id(), &stream)
            .map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
        prop_assert_eq!(replayed, state);
    }

    #[test]
    fn backoff_delays_are_bounded_by_backoff_max(
        policy in policy(),
        crashes in 0u32..100,
        jitter in 0.0f64..1.0,
    ) {
        let delay = policy.backoff(crashes, jitter);
        prop_assert!(delay <= policy.backoff_max);
        if let RestartDecision::Restart { delay } = policy.decide(crashes, 0, jitter) {
            prop_assert!(crashes <= policy.max_restart_attempts);
            prop_assert!(delay <= policy.backoff_max);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The table's examples (DESIGN.md, "State model")
// ---------------------------------------------------------------------------------------

/// Decides `command` and applies its events; the command must be accepted.
fn accept(state: &TaskState, command: Command) -> TaskState {
    let events =
        decide(state, &command).unwrap_or_else(|e| panic!("{command:?} refused on {state:?}: {e}"));
    fold(state, &events).unwrap_or_else(|e| panic!("{events:?} refused on {state:?}: {e}"))
}

fn apply_event(state: &TaskState, event: Event) -> TaskState {
    evolve(state, &event).unwrap_or_else(|e| panic!("{event:?} refused on {state:?}: {e}"))
}

/// An inactive task of `kind` walked to `phase` by TransitionPhase.
fn task_at(kind: &str, phase: Phase) -> TaskState {
    let (mut state, _) = new_task(kind);
    for &next in NON_TERMINAL_PHASES.iter().skip(1) {
        if state.phase == phase {
            break;
        }
        state = accept(&state, Command::TransitionPhase { to: next });
    }
    assert_eq!(state.phase, phase);
    state
}

fn start_pod(state: &TaskState, n: u8) -> TaskState {
    let minted = mint_pod(state, NodeId::new()).expect("mint");
    apply_event(
        &minted,
        Event::PodStarted {
            epoch: minted.pod_epoch,
            node: node(n),
            started_at: at(1),
        },
    )
}

/// The task in each non-terminal phase, inactive, active without a pod and active with
/// a running pod, for a manual and a handler-driven kind.
fn every_live_task() -> Vec<TaskState> {
    let mut tasks = Vec::new();
    for kind in [MANUAL_KIND, SLEEP_KIND] {
        for phase in NON_TERMINAL_PHASES {
            let inactive = task_at(kind, phase);
            let active = accept(&inactive, Command::RequestStart);
            let running = start_pod(&active, 0);
            tasks.extend([inactive, active, running]);
        }
    }
    tasks
}

#[test]
fn complete_works_from_every_non_terminal_phase_and_sets_the_phase() {
    for task in every_live_task() {
        let events = decide(&task, &Command::Complete).expect("complete");
        assert_eq!(
            events,
            vec![Event::TaskCompleted {
                from_phase: task.phase
            }]
        );
        let done = fold(&task, &events).expect("evolve");
        assert_eq!(done.status, Status::Completed);
        assert_eq!(done.phase, Phase::Completed);
        let expected_pod = if task.has_pod() {
            PodState::Stopping
        } else {
            PodState::None
        };
        assert_eq!(
            done.pod_state, expected_pod,
            "a running pod is asked to stop"
        );
    }
}

#[test]
fn cancel_works_from_every_non_terminal_phase_and_sets_the_phase() {
    for task in every_live_task() {
        let cancel = Command::Cancel {
            reason: "not needed".into(),
        };
        let events = decide(&task, &cancel).expect("cancel");
        assert_eq!(
            events,
            vec![Event::TaskCancelled {
                reason: "not needed".into(),
                from_phase: task.phase
            }]
        );
        let done = fold(&task, &events).expect("evolve");
        assert_eq!(done.status, Status::Cancelled);
        assert_eq!(done.phase, Phase::Cancelled);
        let expected_pod = if task.has_pod() {
            PodState::Stopping
        } else {
            PodState::None
        };
        assert_eq!(
            done.pod_state, expected_pod,
            "a running pod is asked to stop"
        );
    }
}

#[test]
fn repeated_complete_and_cancel_fail_with_the_already_errors() {
    let cancel = || Command::Cancel {
        reason: "again".into(),
    };
    for task in every_live_task() {
        let completed = accept(&task, Command::Complete);
        let cancelled = accept(&task, cancel());
        let failed = apply_event(
            &task,
            Event::TaskFailed {
                error: "boom".into(),
                from_phase: task.phase,
            },
        );
        for ended in [&completed, &cancelled, &failed] {
            for command in [Command::Complete, cancel()] {
                let err = decide(ended, &command).expect_err("an ended task refuses");
                match ended.status {
                    Status::Completed => {
                        assert!(matches!(err, Error::AlreadyCompleted(id) if id == task.task_id));
                    }
                    Status::Cancelled => {
                        assert!(matches!(err, Error::AlreadyCancelled(id) if id == task.task_id));
                    }
                    Status::Failed => {
                        assert!(matches!(err, Error::AlreadyFailed(id) if id == task.task_id));
                    }
                    other => panic!("{other} is not terminal"),
                }
                assert_eq!(
                    err.reason(),
                    format!("ALREADY_{}", ended.status.as_str().to_uppercase())
                );
            }
        }
    }
}

#[test]
fn every_command_on_an_ended_task_fails_with_its_already_error() {
    let task = start_pod(
        &accept(
            &task_at(SLEEP_KIND, Phase::Development),
            Command::RequestStart,
        ),
        0,
    );
    let completed = accept(&task, Command::Complete);
    let cancelled = accept(&task, Command::Cancel { reason: "x".into() });
    let failed = apply_event(
        &task,
        Event::TaskFailed {
            error: "boom".into(),
            from_phase: Phase::Development,
        },
    );
    for command in every_command() {
        assert!(matches!(
            decide(&completed, &command),
            Err(Error::AlreadyCompleted(_))
        ));
        assert!(matches!(
            decide(&cancelled, &command),
            Err(Error::AlreadyCancelled(_))
        ));
        assert!(matches!(
            decide(&failed, &command),
            Err(Error::AlreadyFailed(_))
        ));
    }
}

#[test]
fn transition_phase_is_allowed_on_an_inactive_task() {
    for kind in [MANUAL_KIND, SLEEP_KIND, "exec"] {
        let (mut state, _) = new_task(kind);
        for to in [
            Phase::Planning,
            Phase::Development,
            Phase::Review,
            Phase::Development,
            Phase::Review,
        ] {
            let from = state.phase;
            let events = decide(&state, &Command::TransitionPhase { to }).expect("inactive");
            assert_eq!(events, vec![Event::PhaseChanged { from, to }]);
            state = fold(&state, &events).expect("evolve");
            assert_eq!(state.phase, to);
            assert_eq!(state.status, Status::Inactive);
        }
    }
}

#[test]
fn transition_phase_is_allowed_on_an_active_manual_task() {
    let inactive = task_at(MANUAL_KIND, Phase::SpecClarification);
    let active = accept(&inactive, Command::RequestStart);
    for mut state in [active.clone(), start_pod(&active, 0)] {
        for to in [
            Phase::Planning,
            Phase::Development,
            Phase::Review,
            Phase::Development,
        ] {
            state = accept(&state, Command::TransitionPhase { to });
            assert_eq!(state.phase, to);
            assert_eq!(state.status, Status::Active);
        }
    }
}

#[test]
fn transition_phase_on_an_active_task_of_another_kind_is_owned_by_its_handler() {
    for kind in [SLEEP_KIND, "exec"] {
        for phase in NON_TERMINAL_PHASES {
            let active = accept(&task_at(kind, phase), Command::RequestStart);
            for state in [active.clone(), start_pod(&active, 0)] {
                for &to in Phase::ALL {
                    let err = decide(&state, &Command::TransitionPhase { to })
                        .expect_err("the handler owns the phases");
                    assert!(
                        matches!(&err, Error::PhaseOwnedByHandler { kind: k } if k == kind),
                        "{err:?}"
                    );
                }
            }
            // Once stopped, the caller may move the phases again.
            let stopped = accept(&active, Command::RequestStop { reason: None });
            if let Some(&to) = Phase::ALL.iter().find(|&&to| phase.can_move_to(to)) {
                assert!(decide(&stopped, &Command::TransitionPhase { to }).is_ok());
            }
        }
    }
}

#[test]
fn the_phase_graph_has_exactly_the_documented_edges() {
    use Phase::*;
    let documented = [
        (SpecClarification, Planning),
        (Planning, Development),
        (Development, Review),
        (Review, Completed),
        (Review, Development),
    ];
    for &from in Phase::ALL {
        for &to in Phase::ALL {
            assert_eq!(
                from.can_move_to(to),
                documented.contains(&(from, to)),
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn invalid_phase_edges_give_invalid_transition() {
    for kind in [MANUAL_KIND, SLEEP_KIND] {
        for phase in NON_TERMINAL_PHASES {
            let inactive = task_at(kind, phase);
            let mut states = vec![inactive.clone()];
            if kind == MANUAL_KIND {
                states.push(accept(&inactive, Command::RequestStart));
            }
            for state in &states {
                for &to in Phase::ALL.iter().filter(|&&to| !phase.can_move_to(to)) {
                    let err =
                        decide(state, &Command::TransitionPhase { to }).expect_err("not an edge");
                    assert!(
                        matches!(err, Error::InvalidTransition { from, to: t } if from == phase && t == to),
                        "{phase} -> {to}: {err:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn transition_to_completed_from_review_completes_the_task() {
    let review = task_at(MANUAL_KIND, Phase::Review);
    let events = decide(
        &review,
        &Command::TransitionPhase {
            to: Phase::Completed,
        },
    )
    .expect("edge");
    assert_eq!(
        events,
        vec![Event::TaskCompleted {
            from_phase: Phase::Review
        }]
    );
    let done = fold(&review, &events).expect("evolve");
    assert_eq!(
        (done.status, done.phase),
        (Status::Completed, Phase::Completed)
    );
}

#[test]
fn a_handler_cannot_move_a_phase_off_the_graph_or_into_an_end() {
    let dev = accept(
        &task_at(SLEEP_KIND, Phase::Development),
        Command::RequestStart,
    );
    let dev = start_pod(&dev, 0);
    // The handler's own moves are allowed while active...
    let review = apply_event(
        &dev,
        Event::PhaseChanged {
            from: Phase::Development,
            to: Phase::Review,
        },
    );
    assert_eq!(review.phase, Phase::Review);
    // ...but not off the graph, from a phase the task is not in, or into an end.
    for event in [
        Event::PhaseChanged {
            from: Phase::Development,
            to: Phase::Planning,
        },
        Event::PhaseChanged {
            from: Phase::Planning,
            to: Phase::Development,
        },
        Event::PhaseChanged {
            from: Phase::Review,
            to: Phase::Completed,
        },
        Event::TaskCompleted {
            from_phase: Phase::Review,
        },
    ] {
        let err = evolve(&dev, &event).expect_err("refused");
        assert!(matches!(err, Error::IllegalEvent { .. }), "{err:?}");
    }
}

#[test]
fn request_start_on_an_active_task_gives_already_started() {
    let active = accept(&task_at(SLEEP_KIND, Phase::Planning), Command::RequestStart);
    for state in [active.clone(), start_pod(&active, 0)] {
        let err = decide(&state, &Command::RequestStart).expect_err("already active");
        assert!(matches!(err, Error::AlreadyStarted(id) if id == state.task_id));
    }
}

#[test]
fn request_start_on_an_inactive_task_makes_it_active() {
    let inactive = task_at(SLEEP_KIND, Phase::Planning);
    let events = decide(&inactive, &Command::RequestStart).expect("start");
    assert_eq!(events, vec![Event::PodRequested {}]);
    let active = fold(&inactive, &events).expect("evolve");
    assert_eq!(active.status, Status::Active);
    assert_eq!(active.pod_state, PodState::None, "the worker mints the pod");
    assert_eq!(active.phase, Phase::Planning);
}

#[test]
fn request_stop_on_an_inactive_task_gives_not_running() {
    let inactive = task_at(SLEEP_KIND, Phase::Planning);
    for reason in [None, Some("pause".to_owned())] {
        let err = decide(&inactive, &Command::RequestStop { reason }).expect_err("not running");
        assert!(matches!(err, Error::NotRunning(id) if id == inactive.task_id));
    }
}

#[test]
fn request_stop_on_an_active_task_makes_it_inactive_and_stops_its_pod() {
    let active = accept(&task_at(SLEEP_KIND, Phase::Planning), Command::RequestStart);
    let stopped = accept(&active, Command::RequestStop { reason: None });
    assert_eq!(
        (stopped.status, stopped.pod_state),
        (Status::Inactive, PodState::None)
    );

    let running = start_pod(&active, 2);
    let stopping = accept(&running, Command::RequestStop { reason: None });
    assert_eq!(
        (stopping.status, stopping.pod_state),
        (Status::Inactive, PodState::Stopping)
    );
    let gone = apply_event(
        &stopping,
        Event::PodStopped {
            epoch: running.pod_epoch,
            reason: "stop requested".into(),
        },
    );
    assert_eq!(gone.pod_state, PodState::None);
    assert_eq!((gone.owner_node, gone.pod_started_at), (None, None));
}

#[test]
fn request_restart_on_an_active_task_with_a_running_pod_stops_the_pod_and_keeps_the_task_active() {
    let active = accept(&task_at(SLEEP_KIND, Phase::Planning), Command::RequestStart);
    let running = start_pod(&active, 0);
    let events = decide(&running, &Command::RequestRestart).expect("restart");
    assert_eq!(events, vec![Event::PodRestartRequested {}]);
    let restarting = fold(&running, &events).expect("evolve");
    assert_eq!(restarting.status, Status::Active);
    assert_eq!(restarting.pod_state, PodState::Stopping);
    assert_eq!(restarting.pod_epoch, running.pod_epoch);
    // No new pod until the old one is gone.
    assert!(matches!(
        mint_pod(&restarting, NodeId::new()),
        Err(Error::AlreadyStarted(_))
    ));
    let gone = apply_event(
        &restarting,
        Event::PodStopped {
            epoch: running.pod_epoch,
            reason: "restart".into(),
        },
    );
    assert_eq!(gone.status, Status::Active);
    let restarted = start_pod(&gone, 1);
    assert_eq!(restarted.pod_epoch, running.pod_epoch + 1);
    assert_eq!(restarted.pod_state, PodState::Running);
    assert_eq!(restarted.owner_node, Some(node(1)));
}

#[test]
fn request_restart_on_an_inactive_task_wants_a_new_pod() {
    let inactive = task_at(SLEEP_KIND, Phase::Planning);
    let restarted = accept(&inactive, Command::RequestRestart);
    assert_eq!(
        (restarted.status, restarted.pod_state),
        (Status::Active, PodState::None)
    );

    // Stopped but its pod not yet gone: the old pod goes first, then a new epoch.
    let running = start_pod(&accept(&inactive, Command::RequestStart), 0);
    let stopping = accept(&running, Command::RequestStop { reason: None });
    let restarting = accept(&stopping, Command::RequestRestart);
    assert_eq!(
        (restarting.status, restarting.pod_state),
        (Status::Active, PodState::Stopping)
    );
    let gone = apply_event(
        &restarting,
        Event::PodStopped {
            epoch: running.pod_epoch,
            reason: "restart".into(),
        },
    );
    assert_eq!(start_pod(&gone, 1).pod_epoch, running.pod_epoch + 1);
}

#[test]
fn an_epoch_whose_pod_stopped_or_crashed_never_starts_again() {
    let active = accept(&task_at(SLEEP_KIND, Phase::Planning), Command::RequestStart);
    let running = start_pod(&active, 0);
    let minted = mint_pod(&active, NodeId::new()).expect("mint");
    let epoch = minted.pod_epoch;
    for released in [
        // A pod that ran, then stopped.
        apply_event(
            &running,
            Event::PodStopped {
                epoch,
                reason: "done".into(),
            },
        ),
        // A pod minted but crashed (node lost) before it got its handler slot.
        apply_event(
            &minted,
            Event::PodCrashed {
                epoch,
                reason: "node lost".into(),
                kind: CrashKind::NodeLost,
            },
        ),
    ] {
        assert_eq!(
            (released.status, released.pod_state),
            (Status::Active, PodState::None)
        );
        let late_start = Event::PodStarted {
            epoch,
            node: node(0),
            started_at: at(3),
        };
        let err = evolve(&released, &late_start).expect_err("a spent epoch");
        assert!(matches!(err, Error::IllegalEvent { .. }), "{err:?}");
        // The worker mints the next epoch instead.
        assert_eq!(start_pod(&released, 1).pod_epoch, epoch + 1);
    }
    // Under a pod just minted, only its own epoch starts.
    for other in [epoch - 1, epoch + 1] {
        let start = Event::PodStarted {
            epoch: other,
            node: node(0),
            started_at: at(3),
        };
        assert!(matches!(
            evolve(&minted, &start),
            Err(Error::IllegalEvent { .. })
        ));
    }
}

#[test]
fn mint_pod_needs_an_active_task_without_a_pod() {
    let inactive = task_at(SLEEP_KIND, Phase::Planning);
    assert!(matches!(
        mint_pod(&inactive, NodeId::new()),
        Err(Error::NotRunning(_))
    ));
    let active = accept(&inactive, Command::RequestStart);
    let minted = mint_pod(&active, NodeId::new()).expect("mint");
    assert_eq!(
        (minted.pod_epoch, minted.pod_state),
        (1, PodState::Starting)
    );
    assert_eq!(minted.version, active.version, "minting writes no event");
    assert!(matches!(
        mint_pod(&minted, NodeId::new()),
        Err(Error::AlreadyStarted(_))
    ));
    assert!(matches!(
        mint_pod(&start_pod(&active, 0), NodeId::new()),
        Err(Error::AlreadyStarted(_))
    ));
}

#[test]
fn stale_or_unminted_epochs_cannot_stop_or_crash_the_current_pod() {
    let active = accept(&task_at(SLEEP_KIND, Phase::Planning), Command::RequestStart);
    let first = start_pod(&active, 0);
    let first_epoch = first.pod_epoch;
    let gone = apply_event(
        &first,
        Event::PodCrashed {
            epoch: first_epoch,
            reason: "boom".into(),
            kind: CrashKind::Handler,
        },
    );
    let second = start_pod(&gone, 1);
    for epoch in [first_epoch, second.pod_epoch + 1] {
        for event in [
            Event::PodStopped {
                epoch,
                reason: "late".into(),
            },
            Event::PodCrashed {
                epoch,
                reason: "late".into(),
                kind: CrashKind::NodeLost,
            },
            Event::PodStarted {
                epoch: first_epoch,
                node: node(0),
                started_at: at(5),
            },
        ] {
            let err = evolve(&second, &event).expect_err("stale");
            assert!(
                matches!(err, Error::IllegalEvent { .. }),
                "{event:?}: {err:?}"
            );
        }
    }
}

#[test]
fn a_handler_fail_ends_the_task_as_failed_with_its_error() {
    let running = start_pod(
        &accept(&task_at(SLEEP_KIND, Phase::Review), Command::RequestStart),
        0,
    );
    let failed = apply_event(
        &running,
        Event::TaskFailed {
            error: "bad input".into(),
            from_phase: Phase::Review,
        },
    );
    assert_eq!(
        (failed.status, failed.phase),
        (Status::Failed, Phase::Failed)
    );
    assert_eq!(failed.last_error.as_deref(), Some("bad input"));
    assert_eq!(failed.pod_state, PodState::Stopping);
}

#[test]
fn a_crash_of_the_stopping_pod_of_an_ended_task_keeps_its_outcome() {
    let running = start_pod(
        &accept(&task_at(SLEEP_KIND, Phase::Review), Command::RequestStart),
        0,
    );
    let failed = apply_event(
        &running,
        Event::TaskFailed {
            error: "bad input".into(),
            from_phase: Phase::Review,
        },
    );
    let completed = accept(&running, Command::Complete);
    for ended in [failed, completed] {
        // The pod's node dies while it is stopping: the worker records the crash.
        let after = apply_event(
            &ended,
            Event::PodCrashed {
                epoch: running.pod_epoch,
                reason: "node lost".into(),
                kind: CrashKind::NodeLost,
            },
        );
        assert_eq!(after.pod_state, PodState::None, "the pod is released");
        assert_eq!((after.status, after.phase), (ended.status, ended.phase));
        assert_eq!(
            after.last_error, ended.last_error,
            "the outcome's error is kept"
        );
    }
}

#[test]
fn a_stream_starts_with_task_created_and_has_only_one() {
    let err = TaskState::genesis(task_id(), &Event::PodRequested {}).expect_err("not a genesis");
    assert!(matches!(err, Error::IllegalEvent { .. }));
    let (state, _) = new_task(MANUAL_KIND);
    assert_eq!(
        (state.status, state.phase, state.version),
        (Status::Inactive, Phase::SpecClarification, 1)
    );
    assert_eq!((state.pod_epoch, state.pod_state), (0, PodState::None));
    assert!(matches!(
        evolve(&state, &created(MANUAL_KIND)),
        Err(Error::IllegalEvent { .. })
    ));
    assert!(matches!(
        TaskState::replay(task_id(), &[]),
        Err(Error::Internal(_))
    ));
}
