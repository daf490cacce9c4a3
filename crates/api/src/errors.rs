//! Domain errors as gRPC statuses: one exhaustive match, so a new variant forces a
//! decision here. Bad input carries `google.rpc.BadRequest` field violations named by
//! their wire path; every error carries `google.rpc.ErrorInfo` (domain `taskpod`, a
//! stable reason); UNAVAILABLE carries `google.rpc.RetryInfo`. Internal causes go to
//! the log, not to the client.

use std::collections::HashMap;
use std::time::Duration;

use taskpod_core::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of every taskpod error.
pub const DOMAIN: &str = "taskpod";
/// What RetryInfo suggests after a transient store failure.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where the request's fields live on the wire, to name them in field violations.
#[derive(Clone, Copy, Debug)]
pub enum Fields<'a> {
    /// Task fields sit in a `TaskSpec` at this path (`task`, or `tasks` for a batch,
    /// whose items are indexed).
    Spec(&'a str),
    /// Top-level fields only.
    Plain,
}

/// Maps a domain error to the status a client sees.
pub fn to_status(err: Error, fields: Fields<'_>) -> Status {
    let reason = err.reason();
    let message = err.to_string();
    let mut details = ErrorDetails::new();
    let mut info: HashMap<String, String> = HashMap::new();
    let code = match &err {
        Error::InvalidTitle(_)
        | Error::MissingActorId
        | Error::MissingReason
        | Error::InvalidArgument { .. }
        | Error::InvalidBatchItem { .. }
        | Error::IdempotencyKeyReused { .. } => {
            let path = wire_path(&err, fields);
            details.add_bad_request_violation(path.clone(), leaf_message(&err));
            info.insert("field".into(), path);
            Code::InvalidArgument
        }
        Error::TaskNotFound(id) => {
            info.insert("task_id".into(), id.to_string());
            Code::NotFound
        }
        Error::AlreadyStarted(id) => {
            info.insert("task_id".into(), id.to_string());
            Code::AlreadyExists
        }
        Error::AlreadyCompleted(id)
        | Error::AlreadyCancelled(id)
        | Error::AlreadyFailed(id)
        | Error::NotRunning(id) => {
            info.insert("task_id".into(), id.to_string());
            Code::FailedPrecondition
        }
        Error::InvalidTransition { from, to } => {
            info.insert("from".into(), from.to_string());
            info.insert("to".into(), to.to_string());
            Code::FailedPrecondition
        }
        Error::PhaseOwnedByHandler { kind } => {
            info.insert("kind".into(), kind.clone());
            Code::FailedPrecondition
        }
        Error::IllegalEvent { .. } | Error::BackingOff { .. } => Code::FailedPrecondition,
        Error::VersionConflict { .. }
        | Error::StaleEpoch { .. }
        | Error::StaleGeneration { .. }
        | Error::NodeFenced(_) => Code::Aborted,
        Error::StoreUnavailable(cause) => {
            tracing::warn!(%cause, "store unavailable");
            details.set_retry_info(Some(RETRY_AFTER));
            details.set_error_info(reason, DOMAIN, info);
            return Status::with_error_details(
                Code::Unavailable,
                "store unavailable, retry later",
                details,
            );
        }
        Error::Internal(cause) => {
            tracing::error!(%cause, "internal error");
            details.set_error_info(reason, DOMAIN, info);
            return Status::with_error_details(Code::Internal, "internal error", details);
        }
    };
    details.set_error_info(reason, DOMAIN, info);
    Status::with_error_details(code, message, details)
}

/// A WatchTasks resume token past its lifetime (`age`, unknown for a token from before
/// tokens carried one): FAILED_PRECONDITION, because retrying the same request cannot
/// succeed; the client starts a new stream, whose snapshot replaces what it held.
pub fn resume_token_expired(age: Option<Duration>, ttl: Duration) -> Status {
    let mut details = ErrorDetails::new();
    let description = match age {
        Some(age) => format!(
            "the resume token is {} s old; tokens are valid for {} s",
            age.as_secs(),
            ttl.as_secs()
        ),
        None => "the resume token is from an older server and carries no age".to_owned(),
    };
    details.add_precondition_failure_violation(
        "RESUME_TOKEN_EXPIRED",
        "resume_token",
        description.clone(),
    );
    let mut info = HashMap::new();
    info.insert("field".to_owned(), "resume_token".to_owned());
    details.set_error_info("RESUME_TOKEN_EXPIRED", DOMAIN, info);
    Status::with_error_details(
        Code::FailedPrecondition,
        format!("{description}: start a new watch without a resume token"),
        details,
    )
}

/// The field's path in the request message, e.g. `task.title`, `tasks[3].kind`,
/// `meta.actor_id`.
fn wire_path(err: &Error, fields: Fields<'_>) -> String {
    let (index, leaf) = match err {
        Error::InvalidBatchItem { index, source } => {
            (Some(*index), source.field().unwrap_or("tasks"))
        }
        other => (None, other.field().unwrap_or("request")),
    };
    match leaf {
        "actor_id" | "correlation_id" | "causation_id" | "request_id" => format!("meta.{leaf}"),
        "title" | "description" | "kind" | "payload" | "priority" | "metadata" => {
            match (fields, index) {
                (Fields::Spec(prefix), Some(i)) => format!("{prefix}[{i}].{leaf}"),
                (Fields::Spec(prefix), None) => format!("{prefix}.{leaf}"),
                (Fields::Plain, _) => leaf.to_owned(),
            }
        }
        other => other.to_owned(),
    }
}

/// The innermost message, without the batch item prefix the path already shows.
fn leaf_message(err: &Error) -> String {
    match err {
        Error::InvalidBatchItem { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskpod_core::domain::TaskId;

    fn violation(status: &Status) -> (String, String) {
        let details = status.get_error_details();
        let v = &details.bad_request().expect("bad request").field_violations[0];
        (v.field.clone(), v.description.clone())
    }

    #[test]
    fn invalid_input_names_its_wire_field() {
        let s = to_status(Error::InvalidTitle("empty".into()), Fields::Spec("task"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(violation(&s).0, "task.title");
        let s = to_status(Error::MissingActorId, Fields::Spec("task"));
        assert_eq!(violation(&s).0, "meta.actor_id");
        let s = to_status(
            Error::InvalidBatchItem {
                index: 3,
                source: Box::new(Error::InvalidTitle("empty".into())),
            },
            Fields::Spec("tasks"),
        );
        assert_eq!(
            violation(&s),
            ("tasks[3].title".into(), "invalid title: empty".into())
        );
        let s = to_status(Error::MissingReason, Fields::Plain);
        assert_eq!(violation(&s).0, "reason");
    }

    #[test]
    fn refusals_carry_stable_reasons() {
        let id = TaskId::new();
        for (err, code, reason) in [
            (Error::TaskNotFound(id), Code::NotFound, "TASK_NOT_FOUND"),
            (
                Error::AlreadyStarted(id),
                Code::AlreadyExists,
                "ALREADY_STARTED",
            ),
            (
                Error::AlreadyCancelled(id),
                Code::FailedPrecondition,
                "ALREADY_CANCELLED",
            ),
            (
                Error::AlreadyCompleted(id),
                Code::FailedPrecondition,
                "ALREADY_COMPLETED",
            ),
            (
                Error::AlreadyFailed(id),
                Code::FailedPrecondition,
                "ALREADY_FAILED",
            ),
            (
                Error::NotRunning(id),
                Code::FailedPrecondition,
                "NOT_RUNNING",
            ),
            (
                Error::VersionConflict {
                    expected: 1,
                    actual: 2,
                },
                Code::Aborted,
                "VERSION_CONFLICT",
            ),
        ] {
            let s = to_status(err, Fields::Plain);
            assert_eq!(s.code(), code);
            let details = s.get_error_details();
            let info = details.error_info().expect("error info");
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, DOMAIN)
            );
        }
    }

    #[test]
    fn unavailable_suggests_a_retry_and_hides_the_cause() {
        let s = to_status(
            Error::StoreUnavailable("connection refused to 10.0.0.1".into()),
            Fields::Plain,
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("10.0.0.1"));
        assert!(s.get_error_details().retry_info().is_some());
        let s = to_status(Error::Internal("secret detail".into()), Fields::Plain);
        assert_eq!((s.code(), s.message()), (Code::Internal, "internal error"));
    }
}
