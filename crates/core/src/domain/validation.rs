//! Input limits, checked before anything is written.
//!
//! Limits are constants so the API can document them and tests can probe their edges.
//! Sizes of text fields are in characters where people type them (title) and in bytes
//! where they are stored blobs (description, payload, metadata).

use super::command::Command;
use super::request::RequestContext;
use super::task::NewTask;
use crate::error::Error;

pub const TITLE_MAX_CHARS: usize = 255;
pub const DESCRIPTION_MAX_BYTES: usize = 64 * 1024;
/// Serialised JSON size.
pub const PAYLOAD_MAX_BYTES: usize = 256 * 1024;
/// Serialised JSON size.
pub const METADATA_MAX_BYTES: usize = 16 * 1024;
pub const KIND_MAX_CHARS: usize = 64;
pub const ACTOR_ID_MAX_CHARS: usize = 255;
pub const CORRELATION_ID_MAX_CHARS: usize = 255;
pub const REQUEST_ID_MAX_CHARS: usize = 128;
pub const REASON_MAX_CHARS: usize = 1024;
pub const PRIORITY_MIN: i32 = -1000;
pub const PRIORITY_MAX: i32 = 1000;
/// The most tasks one CreateTasks call may create.
pub const BATCH_MAX: usize = 1000;

/// Checks a new task against every limit.
///
/// # Errors
/// The first field out of bounds: [`Error::InvalidTitle`] or [`Error::InvalidArgument`].
pub fn validate_new_task(task: &NewTask) -> Result<(), Error> {
    if task.title.contains('\0') {
        return Err(Error::InvalidTitle(NUL.into()));
    }
    if task.title.trim().is_empty() {
        return Err(Error::InvalidTitle("title must not be empty".into()));
    }
    let chars = task.title.chars().count();
    if chars > TITLE_MAX_CHARS {
        return Err(Error::InvalidTitle(format!(
            "title has {chars} characters, at most {TITLE_MAX_CHARS} allowed"
        )));
    }
    if task.description.len() > DESCRIPTION_MAX_BYTES {
        return Err(Error::invalid(
            "description",
            format!(
                "{} bytes, at most {DESCRIPTION_MAX_BYTES} allowed",
                task.description.len()
            ),
        ));
    }
    check_no_nul("description", &task.description)?;
    validate_kind(&task.kind)?;
    if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&task.priority) {
        return Err(Error::invalid(
            "priority",
            format!(
                "{} is outside {PRIORITY_MIN}..={PRIORITY_MAX}",
                task.priority
            ),
        ));
    }
    check_json_size("payload", &task.payload, PAYLOAD_MAX_BYTES)?;
    check_json_text("payload", &task.payload)?;
    if !task.metadata.is_object() {
        return Err(Error::invalid("metadata", "must be a JSON object"));
    }
    check_json_size("metadata", &task.metadata, METADATA_MAX_BYTES)?;
    check_json_text("metadata", &task.metadata)?;
    if let Some(restart) = task.metadata.get("restart") {
        super::restart::validate_task_limits(restart)
            .map_err(|(field, reason)| Error::invalid(&field, reason))?;
    }
    Ok(())
}

/// Kinds name handlers: short, lowercase, no spaces, so they are safe in metric labels
/// and configuration keys.
///
/// # Errors
/// [`Error::InvalidArgument`] on `kind`.
pub fn validate_kind(kind: &str) -> Result<(), Error> {
    if kind.is_empty() {
        return Err(Error::invalid("kind", "must not be empty"));
    }
    if kind.chars().count() > KIND_MAX_CHARS {
        return Err(Error::invalid(
            "kind",
            format!("at most {KIND_MAX_CHARS} characters"),
        ));
    }
    if !kind
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::invalid(
            "kind",
            "only a-z, 0-9, '_', '-' and '.' are allowed",
        ));
    }
    Ok(())
}

/// Checks who is asking: actor_id is required on every change.
///
/// # Errors
/// [`Error::MissingActorId`], or [`Error::InvalidArgument`] on an over-long field.
pub fn validate_context(ctx: &RequestContext) -> Result<(), Error> {
    if ctx.actor_id.trim().is_empty() {
        return Err(Error::MissingActorId);
    }
    check_len("actor_id", &ctx.actor_id, ACTOR_ID_MAX_CHARS)?;
    check_no_nul("actor_id", &ctx.actor_id)?;
    if let Some(c) = &ctx.correlation_id {
        check_len("correlation_id", c, CORRELATION_ID_MAX_CHARS)?;
        check_no_nul("correlation_id", c)?;
    }
    if let Some(c) = &ctx.causation_id {
        check_len("causation_id", c, CORRELATION_ID_MAX_CHARS)?;
        check_no_nul("causation_id", c)?;
    }
    if let Some(id) = &ctx.request_id {
        if id.is_empty() {
            return Err(Error::invalid("request_id", "must not be empty when set"));
        }
        check_len("request_id", id, REQUEST_ID_MAX_CHARS)?;
        if id.chars().any(char::is_control) {
            return Err(Error::invalid(
                "request_id",
                "must not contain control characters",
            ));
        }
    }
    Ok(())
}

/// Checks a command's own fields: cancel requires a reason.
///
/// # Errors
/// [`Error::MissingReason`], or [`Error::InvalidArgument`] on an over-long reason.
pub fn validate_command(command: &Command) -> Result<(), Error> {
    match command {
        Command::Cancel { reason } => {
            if reason.trim().is_empty() {
                return Err(Error::MissingReason);
            }
            check_len("reason", reason, REASON_MAX_CHARS)?;
            check_no_nul("reason", reason)
        }
        Command::RequestStop {
            reason: Some(reason),
        } => {
            check_len("reason", reason, REASON_MAX_CHARS)?;
            check_no_nul("reason", reason)
        }
        Command::Complete
        | Command::TransitionPhase { .. }
        | Command::RequestStart
        | Command::RequestStop { reason: None }
        | Command::RequestRestart => Ok(()),
    }
}

/// PostgreSQL text and jsonb cannot hold U+0000: refused here, by name, rather than
/// failing as an internal error when written.
const NUL: &str = "must not contain the NUL character (U+0000)";

fn check_no_nul(field: &str, value: &str) -> Result<(), Error> {
    if value.contains('\0') {
        return Err(Error::invalid(field, NUL));
    }
    Ok(())
}

/// Every string and key in a JSON document, at any depth, without U+0000.
fn check_json_text(field: &str, value: &serde_json::Value) -> Result<(), Error> {
    let mut pending = vec![value];
    while let Some(v) = pending.pop() {
        match v {
            serde_json::Value::String(s) => check_no_nul(field, s)?,
            serde_json::Value::Array(items) => pending.extend(items),
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    check_no_nul(field, key)?;
                    pending.push(item);
                }
            }
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
            }
        }
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Error> {
    let n = value.chars().count();
    if n > max {
        return Err(Error::invalid(
            field,
            format!("{n} characters, at most {max} allowed"),
        ));
    }
    Ok(())
}

fn check_json_size(field: &str, value: &serde_json::Value, max: usize) -> Result<(), Error> {
    // Serialising to count is fine at these sizes; a counting writer would save the
    // allocation if this ever shows in a profile.
    let n = serde_json::to_vec(value)
        .map_err(|e| Error::invalid(field, e.to_string()))?
        .len();
    if n > max {
        return Err(Error::invalid(
            field,
            format!("{n} bytes, at most {max} allowed"),
        ));
    }
    Ok(())
}
