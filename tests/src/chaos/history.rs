//! The client-side history of a chaos run: every call a client made, recorded when it
//! was invoked and again when it completed, as `ok`, `fail` (the server said no: the
//! call did not happen) or `unknown` (a deadline or transport error: it may or may not
//! have happened). The checker holds the store to what clients were told, so this is
//! the only place a call's outcome is decided.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use tonic::Code;
use tonic_types::StatusExt as _;

/// What a call asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// CreateTask with `request_id`; `what` names the kind (and program).
    Create { request_id: String, what: String },
    /// CancelTask of `task_id` with `request_id`.
    Cancel { request_id: String, task_id: String },
}

impl Call {
    pub fn request_id(&self) -> &str {
        match self {
            Call::Create { request_id, .. } | Call::Cancel { request_id, .. } => request_id,
        }
    }
}

/// How a call ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered. `task_id` is the created or cancelled task; `status` the
    /// task's status in the answer, when it carries one.
    Ok {
        task_id: String,
        status: Option<String>,
    },
    /// The server refused: nothing happened. `reason` is the ErrorInfo reason.
    Fail {
        code: Code,
        reason: String,
        message: String,
    },
    /// No answer (deadline, transport, an unavailable store that may have committed):
    /// it may or may not have happened.
    Unknown { code: Code, message: String },
}

impl Outcome {
    /// Classifies an error answer. Only refusals that mean "not done" are failures;
    /// anything that may hide a commit is unknown.
    pub fn from_status(status: &tonic::Status) -> Self {
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
            | Code::ResourceExhausted => Outcome::Fail {
                code: status.code(),
                reason: status
                    .get_error_details()
                    .error_info()
                    .map(|info| info.reason.clone())
                    .unwrap_or_default(),
                message: status.message().to_owned(),
            },
            code => Outcome::Unknown {
                code,
                message: status.message().to_owned(),
            },
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    /// Worth sending again with the same request id: unknown, or a refusal that only
    /// says "not now".
    pub fn is_retryable(&self) -> bool {
        match self {
            Outcome::Ok { .. } => false,
            Outcome::Unknown { .. } => true,
            Outcome::Fail { code, .. } => *code == Code::ResourceExhausted,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Fail { .. } => "fail",
            Outcome::Unknown { .. } => "unknown",
        }
    }
}

/// The `client` of calls resent after healing ([`super::load::Load::resolve`]).
pub const RESOLVER: usize = usize::MAX;

/// One call: invoke, then (unless the run ended first) its outcome.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: usize,
    /// Which client loop made it, and to which replica.
    pub client: usize,
    pub replica: String,
    pub call: Call,
    /// Milliseconds since the history began.
    pub invoked_ms: u64,
    pub completed_ms: Option<u64>,
    pub outcome: Option<Outcome>,
}

/// Everything clients did, shared by every client loop.
#[derive(Debug)]
pub struct History {
    start: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            entries: Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records an invocation; returns its id for [`History::complete`].
    pub fn invoke(&self, client: usize, replica: &str, call: Call) -> usize {
        let invoked_ms = self.now_ms();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let id = entries.len();
        entries.push(Entry {
            id,
            client,
            replica: replica.to_owned(),
            call,
            invoked_ms,
            completed_ms: None,
            outcome: None,
        });
        id
    }

    pub fn complete(&self, id: usize, outcome: Outcome) {
        let completed_ms = self.now_ms();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(id) {
            entry.completed_ms = Some(completed_ms);
            entry.outcome = Some(outcome);
        }
    }

    /// A copy of every entry, in invocation order.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every request id's calls, in order: what the checker judges.
    pub fn intents(&self) -> Vec<Intent> {
        let mut by_id: BTreeMap<String, Intent> = BTreeMap::new();
        for entry in self.entries() {
            let intent = by_id
                .entry(entry.call.request_id().to_owned())
                .or_insert_with(|| Intent {
                    call: entry.call.clone(),
                    attempts: Vec::new(),
                });
            intent.attempts.push(entry);
        }
        by_id.into_values().collect()
    }

    /// `"creates: 1000 ok, 3 fail, 40 unknown; cancels: ..."`.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
        for entry in self.entries() {
            let call = match entry.call {
                Call::Create { .. } => "create",
                Call::Cancel { .. } => "cancel",
            };
            let outcome = entry.outcome.as_ref().map_or("pending", Outcome::label);
            *counts.entry((call, outcome)).or_default() += 1;
        }
        counts
            .iter()
            .map(|((call, outcome), n)| format!("{call} {outcome}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// All the attempts made under one request id.
#[derive(Clone, Debug)]
pub struct Intent {
    pub call: Call,
    pub attempts: Vec<Entry>,
}

/// What an intent came to, from the client's side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Some attempt got an answer.
    Acked { task_id: String },
    /// Every attempt was refused: it never happened.
    Refused { reason: String },
    /// A refusal after an unknown attempt (the first may have happened after all).
    RefusedAfterUnknown { reason: String },
    /// No attempt got an answer.
    Unresolved,
}

impl Intent {
    pub fn request_id(&self) -> &str {
        self.call.request_id()
    }

    pub fn resolution(&self) -> Resolution {
        let outcomes: Vec<&Outcome> = self
            .attempts
            .iter()
            .filter_map(|a| a.outcome.as_ref())
            .collect();
        if let Some(Outcome::Ok { task_id, .. }) = outcomes.iter().find(|o| o.is_ok()) {
            return Resolution::Acked {
                task_id: task_id.clone(),
            };
        }
        let any_unknown = self
            .attempts
            .iter()
            .any(|a| !matches!(a.outcome, Some(Outcome::Fail { .. })));
        match outcomes.iter().rev().find_map(|o| match o {
            Outcome::Fail { reason, .. } => Some(reason.clone()),
            _ => None,
        }) {
            Some(reason) if any_unknown => Resolution::RefusedAfterUnknown { reason },
            Some(reason) => Resolution::Refused { reason },
            None => Resolution::Unresolved,
        }
    }

    /// Every task id an `ok` answer named (more than one is itself a violation).
    pub fn acked_task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .attempts
            .iter()
            .filter_map(|a| match &a.outcome {
                Some(Outcome::Ok { task_id, .. }) => Some(task_id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// One line per attempt, for evidence.
    pub fn describe(&self) -> Vec<String> {
        self.attempts
            .iter()
            .map(|a| {
                format!(
                    "  attempt {} by {} via {} at {}ms -> {}",
                    a.id,
                    if a.client == RESOLVER {
                        "the resolver".to_owned()
                    } else {
                        format!("client {}", a.client)
                    },
                    a.replica,
                    a.invoked_ms,
                    match (&a.outcome, a.completed_ms) {
                        (Some(o), Some(ms)) => format!("{o:?} at {ms}ms"),
                        _ => "no outcome".to_owned(),
                    }
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(id: &str) -> Call {
        Call::Create {
            request_id: id.into(),
            what: "sleep".into(),
        }
    }

    #[test]
    fn an_unknown_then_ok_intent_is_acked() {
        let h = History::new();
        let a = h.invoke(0, "api1", create("r1"));
        h.complete(
            a,
            Outcome::Unknown {
                code: Code::Unavailable,
                message: "reset".into(),
            },
        );
        let b = h.invoke(0, "api2", create("r1"));
        h.complete(
            b,
            Outcome::Ok {
                task_id: "t1".into(),
                status: None,
            },
        );
        let intents = h.intents();
        assert_eq!(intents.len(), 1);
        assert_eq!(
            intents[0].resolution(),
            Resolution::Acked {
                task_id: "t1".into()
            }
        );
    }

    #[test]
    fn refusals_are_told_apart_from_refusals_after_an_unknown() {
        let h = History::new();
        let fail = || Outcome::Fail {
            code: Code::InvalidArgument,
            reason: "INVALID_TITLE".into(),
            message: String::new(),
        };
        let a = h.invoke(0, "api1", create("r1"));
        h.complete(a, fail());
        let b = h.invoke(0, "api1", create("r2"));
        let _pending = b;
        let c = h.invoke(0, "api1", create("r2"));
        h.complete(c, fail());
        let intents = h.intents();
        assert!(matches!(
            intents[0].resolution(),
            Resolution::Refused { .. }
        ));
        assert!(matches!(
            intents[1].resolution(),
            Resolution::RefusedAfterUnknown { .. }
        ));
    }

    #[test]
    fn status_codes_split_into_fail_and_unknown() {
        assert!(matches!(
            Outcome::from_status(&tonic::Status::failed_precondition("no")),
            Outcome::Fail { .. }
        ));
        assert!(matches!(
            Outcome::from_status(&tonic::Status::unavailable("down")),
            Outcome::Unknown { .. }
        ));
        assert!(matches!(
            Outcome::from_status(&tonic::Status::deadline_exceeded("slow")),
            Outcome::Unknown { .. }
        ));
    }
}
