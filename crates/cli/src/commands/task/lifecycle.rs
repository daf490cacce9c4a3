//! `taskpod task cancel | complete | transition`.
//!
//! `cancel --filter` cancels every unfinished task a filter matches: it lists them
//! first and shows how many, then asks on a terminal, and refuses without `--yes` when
//! there is no terminal to ask on. A task that finished meanwhile is counted, not
//! failed.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use clap::ArgGroup;
use futures::StreamExt as _;
use serde::Serialize;
use taskpod_core::domain::{Phase, Status};
use taskpod_proto::{convert, v1};
use tonic::Code;

use super::{phase_parser, read};
use crate::commands::Context;
use crate::output::{self, Format};
use taskpod_client::error::{CliError, RpcError};

/// How many cancellations a bulk cancel keeps in flight.
const BULK_CONCURRENCY: usize = 8;

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["id", "filter"])))]
pub struct CancelArgs {
    /// The task to cancel
    pub id: Option<String>,
    /// Cancels every unfinished task this AIP-160 filter matches
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Why (required; recorded on the task_cancelled event)
    #[arg(long)]
    pub reason: String,
    /// With --filter: cancel without asking
    #[arg(long, short = 'y', conflicts_with = "id")]
    pub yes: bool,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID", conflicts_with = "filter")]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct CompleteArgs {
    /// The task to complete
    pub id: String,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct TransitionArgs {
    /// The task to move
    pub id: String,
    /// The phase to move to (an edge of the phase graph)
    #[arg(long, value_name = "PHASE", value_parser = phase_parser())]
    pub to: Phase,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

fn task_of(task: Option<v1::Task>) -> Result<v1::Task, CliError> {
    task.ok_or_else(|| {
        CliError::from(tonic::Status::internal(
            "the server answered without a task",
        ))
    })
}

/// Runs `task cancel`.
///
/// # Errors
/// The server's refusal; for `--filter`, a refusal to go on without confirmation, or
/// the first failed cancellation.
pub async fn cancel(ctx: &Context, args: CancelArgs) -> Result<(), CliError> {
    match (&args.id, &args.filter) {
        (Some(id), _) => {
            let task = cancel_one(ctx, id, &args.reason, args.request_id.as_deref()).await?;
            output::print_task(ctx.format, &task)
        }
        (None, Some(filter)) => cancel_matching(ctx, filter, &args.reason, args.yes).await,
        (None, None) => Err(CliError::Usage("give a task id or --filter".into())),
    }
}

async fn cancel_one(
    ctx: &Context,
    id: &str,
    reason: &str,
    request_id: Option<&str>,
) -> Result<v1::Task, CliError> {
    let client = &ctx.client;
    let response = client
        .grpc()
        .cancel_task(client.request(v1::CancelTaskRequest {
            task_id: id.to_owned(),
            reason: reason.to_owned(),
            meta: client.meta(request_id),
        }))
        .await?
        .into_inner();
    task_of(response.task)
}

/// What happened to one task of a bulk cancel.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Cancelled,
    /// It finished (completed, cancelled, failed) between the listing and the cancel.
    AlreadyFinished,
    Failed,
}

#[derive(Debug, Serialize)]
struct BulkLine<'a> {
    task_id: &'a str,
    result: &'a Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct BulkSummary {
    matched: usize,
    cancelled: usize,
    already_finished: usize,
    failed: usize,
}

/// Whether a refusal means "this task had finished already".
fn finished_meanwhile(err: &RpcError) -> bool {
    err.code == Code::FailedPrecondition
        && err.reason.as_deref().is_some_and(|r| {
            matches!(
                r,
                "ALREADY_CANCELLED" | "ALREADY_COMPLETED" | "ALREADY_FAILED"
            )
        })
}

/// Asks on the terminal; `None` when there is no terminal to ask on.
fn confirm(question: &str) -> Option<bool> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return None;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return Some(false);
    }
    Some(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

async fn cancel_matching(
    ctx: &Context,
    filter: &str,
    reason: &str,
    yes: bool,
) -> Result<(), CliError> {
    // Only unfinished tasks can be cancelled; finished ones would only fail.
    let criteria = v1::TaskCriteria {
        statuses: [Status::Inactive, Status::Active]
            .into_iter()
            .map(|s| convert::status(s) as i32)
            .collect(),
        ..v1::TaskCriteria::default()
    };
    let request = v1::ListTasksRequest {
        filter: filter.to_owned(),
        criteria: Some(criteria),
        // Oldest first: creation times never change, so the scan is stable while the
        // tasks it already passed are being cancelled.
        order_by: "created_at asc".into(),
        ..v1::ListTasksRequest::default()
    };
    let mut ids: Vec<String> = Vec::new();
    read::page_tasks(ctx, request, None, None, |page| {
        ids.extend(page.into_iter().map(|t| t.task_id));
        Ok(())
    })
    .await?;
    let matched = ids.len();
    if matched == 0 {
        eprintln!("no unfinished task matches the filter {filter:?}");
        return print_summary(
            ctx.format,
            &BulkSummary {
                matched: 0,
                cancelled: 0,
                already_finished: 0,
                failed: 0,
            },
        );
    }
    if matched == 1 {
        eprintln!("1 unfinished task matches the filter {filter:?}");
    } else {
        eprintln!("{matched} unfinished tasks match the filter {filter:?}");
    }
    if !yes {
        match confirm(&format!("Cancel {matched} tasks?")) {
            Some(true) => {}
            Some(false) => {
                return Err(CliError::Usage("nothing was cancelled".into()));
            }
            None => {
                return Err(CliError::Usage(format!(
                    "refusing to cancel {matched} tasks without --yes (no terminal to confirm on)"
                )));
            }
        }
    }

    let mut results = futures::stream::iter(ids.iter())
        .map(|id| async move {
            let outcome = cancel_one(ctx, id, reason, None).await;
            (id, outcome)
        })
        .buffer_unordered(BULK_CONCURRENCY);
    let mut summary = BulkSummary {
        matched,
        cancelled: 0,
        already_finished: 0,
        failed: 0,
    };
    let mut first_error: Option<RpcError> = None;
    while let Some((id, result)) = results.next().await {
        let (outcome, error) = match result {
            Ok(_) => (Outcome::Cancelled, None),
            Err(CliError::Rpc(err)) if finished_meanwhile(&err) => (Outcome::AlreadyFinished, None),
            Err(CliError::Rpc(err)) => {
                let text = err.to_string();
                first_error.get_or_insert(*err);
                (Outcome::Failed, Some(text))
            }
            Err(other) => return Err(other),
        };
        match outcome {
            Outcome::Cancelled => summary.cancelled += 1,
            Outcome::AlreadyFinished => summary.already_finished += 1,
            Outcome::Failed => summary.failed += 1,
        }
        if ctx.format == Format::Jsonl {
            output::emit_line(&output::compact(&BulkLine {
                task_id: id,
                result: &outcome,
                error,
            }))?;
        } else if let Some(error) = error {
            eprintln!("could not cancel {id}: {error}");
        }
    }
    print_summary(ctx.format, &summary)?;
    match first_error {
        Some(first) => Err(CliError::BulkCancel {
            failed: summary.failed,
            total: matched,
            first: Box::new(first),
        }),
        None => Ok(()),
    }
}

fn print_summary(format: Format, s: &BulkSummary) -> Result<(), CliError> {
    match format {
        Format::Table | Format::Wide => output::emit_line(&format!(
            "cancelled {} of {} tasks ({} had already finished, {} failed)",
            s.cancelled, s.matched, s.already_finished, s.failed
        )),
        Format::Json => output::emit_line(&output::pretty(s)),
        // Each task had its line.
        Format::Jsonl => Ok(()),
    }
}

/// Runs `task complete`.
///
/// # Errors
/// The server's refusal (FAILED_PRECONDITION for a finished task).
pub async fn complete(ctx: &Context, args: CompleteArgs) -> Result<(), CliError> {
    let client = &ctx.client;
    let response = client
        .grpc()
        .complete_task(client.request(v1::CompleteTaskRequest {
            task_id: args.id,
            meta: client.meta(args.request_id.as_deref()),
        }))
        .await?
        .into_inner();
    output::print_task(ctx.format, &task_of(response.task)?)
}

/// Runs `task transition`.
///
/// # Errors
/// The server's refusal (FAILED_PRECONDITION for a move off the phase graph).
pub async fn transition(ctx: &Context, args: TransitionArgs) -> Result<(), CliError> {
    let client = &ctx.client;
    let response = client
        .grpc()
        .transition_phase(client.request(v1::TransitionPhaseRequest {
            task_id: args.id,
            to_phase: convert::phase(args.to) as i32,
            meta: client.meta(args.request_id.as_deref()),
        }))
        .await?
        .into_inner();
    output::print_task(ctx.format, &task_of(response.task)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        args: CancelArgs,
    }

    fn parse(args: &[&str]) -> Result<CancelArgs, clap::Error> {
        Probe::try_parse_from(std::iter::once("cancel").chain(args.iter().copied())).map(|p| p.args)
    }

    #[test]
    fn cancel_takes_an_id_or_a_filter_and_always_a_reason() {
        assert!(parse(&["t1", "--reason", "r"]).is_ok());
        assert!(parse(&["--filter", "kind = sleep", "--reason", "r", "--yes"]).is_ok());
        assert!(parse(&["t1"]).is_err(), "reason is required");
        assert!(parse(&["--reason", "r"]).is_err(), "a target is required");
        assert!(parse(&["t1", "--filter", "x", "--reason", "r"]).is_err());
        assert!(
            parse(&["t1", "--reason", "r", "--yes"]).is_err(),
            "--yes needs --filter"
        );
    }

    #[test]
    fn only_already_finished_refusals_count_as_finished() {
        let mut err = RpcError::from_status(&tonic::Status::failed_precondition("x"));
        assert!(!finished_meanwhile(&err));
        err.reason = Some("ALREADY_CANCELLED".into());
        assert!(finished_meanwhile(&err));
        err.reason = Some("INVALID_TRANSITION".into());
        assert!(!finished_meanwhile(&err));
    }
}
