//! The client commands' one error enum, its exit codes and how it is shown.
//!
//! A gRPC error is shown as `error: <code>: <message>`, with the `google.rpc` details
//! the server attached (field violations, the ErrorInfo reason, RetryInfo) decoded
//! below it. Exit codes are a contract for scripts; `docs/cli.md` lists them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Exit codes, stable for scripts (`docs/cli.md`).
pub mod exit {
    pub const OK: u8 = 0;
    /// A server or internal error, or anything not listed below.
    pub const INTERNAL: u8 = 1;
    /// A usage error: clap's own, and local input the CLI refuses before calling.
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    /// FAILED_PRECONDITION, ALREADY_EXISTS or ABORTED: the task's state says no.
    pub const PRECONDITION: u8 = 4;
    /// INVALID_ARGUMENT (and OUT_OF_RANGE).
    pub const INVALID: u8 = 5;
    /// UNAUTHENTICATED or PERMISSION_DENIED.
    pub const AUTH: u8 = 6;
    /// UNAVAILABLE or DEADLINE_EXCEEDED: worth retrying later.
    pub const UNAVAILABLE: u8 = 7;
    /// `task wait`: the task failed.
    pub const TASK_FAILED: u8 = 10;
    /// `task wait`: the task was cancelled.
    pub const TASK_CANCELLED: u8 = 11;
    /// `task wait`: the timeout passed first.
    pub const WAIT_TIMED_OUT: u8 = 12;
    /// `health`: the server answered, but not SERVING.
    pub const NOT_SERVING: u8 = 13;
    /// `bench compare --fail-below`: B is worse than A by more than allowed.
    pub const BENCH_REGRESSED: u8 = 14;
}

/// Why a client command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server (or the transport) answered with an error status.
    #[error("{0}")]
    Rpc(Box<RpcError>),
    /// Input the CLI refuses before calling the server.
    #[error("{0}")]
    Usage(String),
    #[error("invalid configuration in {path}")]
    Config {
        path: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("could not read {path}")]
    ReadInput {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write the output")]
    Output(#[source] std::io::Error),
    /// One batch of `task create --from-file` failed; the earlier ones were created.
    #[error(
        "{rpc}\n  in batch {batch} (lines {first_line}-{last_line}); {created} tasks were created before it"
    )]
    Batch {
        batch: usize,
        first_line: usize,
        last_line: usize,
        created: usize,
        rpc: Box<RpcError>,
    },
    /// `task cancel --filter`: some cancellations failed (the first error is shown).
    #[error("{failed} of {total} cancellations failed; the first: {first}")]
    BulkCancel {
        failed: usize,
        total: usize,
        first: Box<RpcError>,
    },
    #[error("task {task_id} failed: {last_error}")]
    TaskFailed { task_id: String, last_error: String },
    #[error("task {task_id} was cancelled")]
    TaskCancelled { task_id: String },
    #[error("timed out after {after} waiting for task {task_id} (status {status}, phase {phase})")]
    WaitTimedOut {
        task_id: String,
        after: String,
        status: String,
        phase: String,
    },
    /// `health`: the server answered with a status other than SERVING.
    #[error("{} reports {status}", health_target(.service))]
    NotServing { service: String, status: String },
    /// `bench compare --fail-below`: numbers of B worse than A by more than allowed.
    #[error(
        "{regressed} number(s) of B are worse than A by more than --fail-below {factor} allows"
    )]
    BenchRegressed { regressed: usize, factor: f64 },
}

/// How `health` names what it checked: the empty service is the whole server.
fn health_target(service: &str) -> String {
    if service.is_empty() {
        "the server".to_owned()
    } else {
        format!("service {service:?}")
    }
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Rpc(rpc) => rpc.exit_code(),
            CliError::Batch { rpc, .. } => rpc.exit_code(),
            CliError::BulkCancel { first, .. } => first.exit_code(),
            CliError::Usage(_) | CliError::Config { .. } | CliError::ReadInput { .. } => {
                exit::USAGE
            }
            CliError::Output(_) => exit::INTERNAL,
            CliError::TaskFailed { .. } => exit::TASK_FAILED,
            CliError::TaskCancelled { .. } => exit::TASK_CANCELLED,
            CliError::WaitTimedOut { .. } => exit::WAIT_TIMED_OUT,
            CliError::NotServing { .. } => exit::NOT_SERVING,
            CliError::BenchRegressed { .. } => exit::BENCH_REGRESSED,
        }
    }

    /// Whether stdout was closed by its reader (`taskpod task list | head`): not a
    /// failure worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Rpc(Box::new(RpcError::from_status(&status)))
    }
}

/// An error status with its `google.rpc` details decoded, ready to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
    /// BadRequest field violations: (field, description).
    pub violations: Vec<(String, String)>,
    /// ErrorInfo: the stable reason and its metadata.
    pub reason: Option<String>,
    pub reason_metadata: BTreeMap<String, String>,
    /// RetryInfo's delay.
    pub retry_after: Option<Duration>,
    /// The transport's error chain, for errors raised on this side (connection refused).
    pub causes: Vec<String>,
}

impl std::error::Error for RpcError {}

impl RpcError {
    /// Decodes a status. A client-side deadline surfaces from tonic as CANCELLED
    /// "Timeout expired"; it is reported as the DEADLINE_EXCEEDED it is.
    pub fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map(|br| {
                br.field_violations
                    .iter()
                    .map(|v| (v.field.clone(), v.description.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let (reason, reason_metadata) = match details.error_info() {
            Some(info) if !info.reason.is_empty() => (
                Some(info.reason.clone()),
                info.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => (None, BTreeMap::new()),
        };
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(status);
        while let Some(err) = source {
            let text = err.to_string();
            if !causes.contains(&text) && text != status.message() {
                causes.push(text);
            }
            source = err.source();
        }
        let (code, message) =
            if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
                (
                    Code::DeadlineExceeded,
                    "the call's deadline passed".to_owned(),
                )
            } else {
                (status.code(), status.message().to_owned())
            };
        Self {
            code,
            message,
            violations,
            reason,
            reason_metadata,
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            causes,
        }
    }

    pub fn exit_code(&self) -> u8 {
        code_exit(self.code)
    }
}

/// The exit code for a gRPC status code.
pub fn code_exit(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::NotFound => exit::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => exit::PRECONDITION,
        Code::InvalidArgument | Code::OutOfRange => exit::INVALID,
        Code::Unauthenticated | Code::PermissionDenied => exit::AUTH,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => exit::INTERNAL,
    }
}

/// The code as people read it: `invalid argument`, `not found`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl fmt::Display for RpcError {
    /// The first line names the code and, when the server named the fields at fault,
    /// the first field and what is wrong with it; further violations, the reason, a
    /// retry hint and transport causes follow, indented.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = code_name(self.code);
        match self.violations.split_first() {
            Some(((field, description), rest)) => {
                write!(f, "{code}: {field}: {description}")?;
                for (field, description) in rest {
                    write!(f, "\n  {field}: {description}")?;
                }
            }
            None if self.message.is_empty() => f.write_str(code)?,
            None => write!(f, "{code}: {}", self.message)?,
        }
        if let Some(reason) = &self.reason {
            write!(f, "\n  reason: {reason}")?;
            if !self.reason_metadata.is_empty() {
                let pairs: Vec<String> = self
                    .reason_metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                write!(f, " ({})", pairs.join(", "))?;
            }
        }
        if let Some(delay) = self.retry_after {
            write!(f, "\n  retry after: {}", crate::duration::format(delay))?;
        }
        for cause in &self.causes {
            write!(f, "\n  caused by: {cause}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn every_documented_code_has_its_exit_code() {
        let table = [
            (Code::Internal, 1),
            (Code::Unknown, 1),
            (Code::NotFound, 3),
            (Code::FailedPrecondition, 4),
            (Code::AlreadyExists, 4),
            (Code::Aborted, 4),
            (Code::InvalidArgument, 5),
            (Code::Unauthenticated, 6),
            (Code::PermissionDenied, 6),
            (Code::Unavailable, 7),
            (Code::DeadlineExceeded, 7),
        ];
        for (code, exit) in table {
            assert_eq!(code_exit(code), exit, "{code:?}");
            let err = CliError::from(Status::new(code, "x"));
            assert_eq!(err.exit_code(), exit, "{code:?}");
        }
    }

    #[test]
    fn wait_outcomes_and_usage_have_distinct_codes() {
        let codes = [
            CliError::Usage("x".into()).exit_code(),
            CliError::TaskFailed {
                task_id: "t".into(),
                last_error: "e".into(),
            }
            .exit_code(),
            CliError::TaskCancelled {
                task_id: "t".into(),
            }
            .exit_code(),
            CliError::WaitTimedOut {
                task_id: "t".into(),
                after: "1s".into(),
                status: "active".into(),
                phase: "planning".into(),
            }
            .exit_code(),
            CliError::NotServing {
                service: String::new(),
                status: "NOT_SERVING".into(),
            }
            .exit_code(),
            CliError::BenchRegressed {
                regressed: 1,
                factor: 0.9,
            }
            .exit_code(),
        ];
        assert_eq!(codes, [2, 10, 11, 12, 13, 14]);
    }

    #[test]
    fn field_violations_lead_the_message() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("task.title", "title must not be empty");
        details.set_error_info(
            "INVALID_TITLE",
            "taskpod",
            [("field".to_owned(), "task.title".to_owned())],
        );
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid title: title must not be empty",
            details,
        );
        let shown = CliError::from(status).to_string();
        assert_eq!(
            shown,
            "invalid argument: task.title: title must not be empty\n  reason: INVALID_TITLE (field=task.title)"
        );
    }

    #[test]
    fn plain_errors_show_code_and_message_and_retry_hint() {
        let mut details = ErrorDetails::new();
        details.set_retry_info(Some(Duration::from_secs(1)));
        let status = Status::with_error_details(Code::Unavailable, "store unavailable", details);
        assert_eq!(
            CliError::from(status).to_string(),
            "unavailable: store unavailable\n  retry after: 1s"
        );
        let status = Status::not_found("task 0193 not found");
        assert_eq!(
            CliError::from(status).to_string(),
            "not found: task 0193 not found"
        );
    }

    #[test]
    fn a_client_side_timeout_is_a_deadline_exceeded() {
        let err = RpcError::from_status(&Status::cancelled("Timeout expired"));
        assert_eq!(err.code, Code::DeadlineExceeded);
        assert_eq!(err.exit_code(), exit::UNAVAILABLE);
    }
}
