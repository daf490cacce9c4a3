//! `taskpod task ...`: create, read, drive and watch tasks.
//!
//! - [`create`]: `create`, one task or a JSON Lines file in batches;
//! - [`read`]: `get`, `list`, `count`, `events`;
//! - [`lifecycle`]: `cancel` (one, or every match of a filter), `complete`, `transition`;
//! - [`watch`]: `watch` (one task, or a filter) and `wait`, both resuming without a gap.

pub mod create;
pub mod lifecycle;
pub mod read;
pub mod watch;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use taskpod_core::domain::{Phase, Status};
use taskpod_proto::{convert, v1};

use super::Context;
use taskpod_client::error::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Creates a task, or many from a JSON Lines file
    Create(create::CreateArgs),
    /// Shows one task
    Get(read::GetArgs),
    /// Lists tasks, following pages until --limit or the end
    List(read::ListArgs),
    /// Counts the tasks a filter matches
    Count(read::CountArgs),
    /// Cancels a task, or every unfinished task a filter matches
    Cancel(lifecycle::CancelArgs),
    /// Completes a task from any unfinished phase
    Complete(lifecycle::CompleteArgs),
    /// Moves a task along the phase graph
    Transition(lifecycle::TransitionArgs),
    /// Shows a task's history
    Events(read::EventsArgs),
    /// Streams a task's events (or a filter's changes) as they happen
    Watch(watch::WatchArgs),
    /// Waits until a task finishes; the exit code says how it ended
    #[command(
        long_about = "Waits until a task finishes; the exit code says how it ended.\n\n\
        Exits 0 when the task completes, 10 when it fails, 11 when it is cancelled and 12 \
        when --timeout passes first (without --timeout it waits as long as it takes). \
        A dropped connection is resumed without missing an event."
    )]
    Wait(watch::WaitArgs),
}

/// Runs a `task` subcommand.
///
/// # Errors
/// The command's [`CliError`].
pub async fn run(ctx: &Context, command: TaskCommand) -> Result<(), CliError> {
    match command {
        TaskCommand::Create(args) => create::run(ctx, args).await,
        TaskCommand::Get(args) => read::get(ctx, args).await,
        TaskCommand::List(args) => read::list(ctx, args).await,
        TaskCommand::Count(args) => read::count(ctx, args).await,
        TaskCommand::Events(args) => read::events(ctx, args).await,
        TaskCommand::Cancel(args) => lifecycle::cancel(ctx, args).await,
        TaskCommand::Complete(args) => lifecycle::complete(ctx, args).await,
        TaskCommand::Transition(args) => lifecycle::transition(ctx, args).await,
        TaskCommand::Watch(args) => watch::watch(ctx, args).await,
        TaskCommand::Wait(args) => watch::wait(ctx, args).await,
    }
}

/// Parses a status flag; its possible values show in `--help` and completions.
fn status_parser() -> impl clap::builder::TypedValueParser<Value = Status> {
    PossibleValuesParser::new(Status::ALL.iter().map(Status::as_str))
        .try_map(|s| s.parse::<Status>())
}

fn phase_parser() -> impl clap::builder::TypedValueParser<Value = Phase> {
    PossibleValuesParser::new(Phase::ALL.iter().map(Phase::as_str)).try_map(|s| s.parse::<Phase>())
}

/// The filters `list`, `count` and `watch --filter` share. Everything given must
/// match; a repeated flag matches any of its values.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// AIP-160 filter, e.g. 'status = active AND priority >= 5'
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Only tasks with this status (repeatable)
    #[arg(long = "status", value_name = "STATUS", value_parser = status_parser())]
    pub statuses: Vec<Status>,
    /// Only tasks in this phase (repeatable)
    #[arg(long = "phase", value_name = "PHASE", value_parser = phase_parser())]
    pub phases: Vec<Phase>,
    /// Only tasks of this kind (repeatable)
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only tasks created by this actor
    #[arg(long, value_name = "ACTOR")]
    pub created_by: Option<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> String {
        self.filter.clone().unwrap_or_default()
    }

    /// The typed criteria, or none when no typed flag was given.
    pub fn criteria(&self) -> Option<v1::TaskCriteria> {
        if self.statuses.is_empty()
            && self.phases.is_empty()
            && self.kinds.is_empty()
            && self.created_by.is_none()
        {
            return None;
        }
        Some(v1::TaskCriteria {
            statuses: self
                .statuses
                .iter()
                .map(|s| convert::status(*s) as i32)
                .collect(),
            phases: self
                .phases
                .iter()
                .map(|p| convert::phase(*p) as i32)
                .collect(),
            kinds: self.kinds.clone(),
            created_by: self.created_by.clone().unwrap_or_default(),
            ..v1::TaskCriteria::default()
        })
    }
}

/// Whether an event type ends a task.
pub fn is_terminal_event(event_type: &str) -> bool {
    matches!(
        event_type,
        "task_completed" | "task_cancelled" | "task_failed"
    )
}

/// Whether a wire status is terminal.
pub fn is_terminal_status(raw: i32) -> bool {
    convert::from_status("status", raw).is_ok_and(|s| s.is_terminal())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        filter: FilterArgs,
    }

    #[test]
    fn typed_filters_become_criteria() {
        let p = Probe::try_parse_from([
            "probe",
            "--status",
            "active",
            "--status",
            "inactive",
            "--phase",
            "spec_clarification",
            "--kind",
            "sleep",
            "--created-by",
            "ci",
        ])
        .unwrap();
        let c = p.filter.criteria().unwrap();
        assert_eq!(
            c.statuses,
            [
                v1::TaskStatus::Active as i32,
                v1::TaskStatus::Inactive as i32
            ]
        );
        assert_eq!(c.phases, [v1::TaskPhase::SpecClarification as i32]);
        assert_eq!(
            (c.kinds, c.created_by.as_str()),
            (vec!["sleep".to_owned()], "ci")
        );
        assert!(
            Probe::try_parse_from(["probe"])
                .unwrap()
                .filter
                .criteria()
                .is_none()
        );
    }

    #[test]
    fn unknown_statuses_are_refused_with_the_possible_values() {
        let err = Probe::try_parse_from(["probe", "--status", "running"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("inactive") && text.contains("cancelled"),
            "{text}"
        );
    }
}
