//! `taskpod pod ...`: start, stop and restart a task's pod (its one live runtime on a
//! worker), and list the running ones.

use serde::Serialize;
use taskpod_proto::v1;

use super::Context;
use crate::output::{self, Format, TaskView};
use taskpod_client::error::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum PodCommand {
    /// Requests a pod for an inactive task (it becomes active)
    Start(StartArgs),
    /// Sets the task inactive and stops its pod
    Stop(StopArgs),
    /// Replaces the task's pod with a new one (a new epoch)
    Restart(RestartArgs),
    /// Lists active tasks with their pod fields, oldest first
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The task's id
    pub id: String,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The task's id
    pub id: String,
    /// Why (recorded on the pod_stop_requested event)
    #[arg(long)]
    pub reason: Option<String>,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    /// The task's id
    pub id: String,
    /// AIP-155 idempotency key
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Stop after this many pods [default: all]
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Pods per call (1-1000) [default: 1000, or --limit if smaller]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: Option<u16>,
    /// Include each task's payload and description (the FULL view; lists leave them out)
    #[arg(long)]
    pub full: bool,
}

fn task_of(task: Option<v1::Task>) -> Result<v1::Task, CliError> {
    task.ok_or_else(|| {
        CliError::from(tonic::Status::internal(
            "the server answered without a task",
        ))
    })
}

/// Runs a `pod` subcommand.
///
/// # Errors
/// The server's refusal: ALREADY_EXISTS (4) to start an active task,
/// FAILED_PRECONDITION (4) to stop one that is not running or to touch a finished one.
pub async fn run(ctx: &Context, command: PodCommand) -> Result<(), CliError> {
    let client = &ctx.client;
    let mut grpc = client.grpc();
    let task = match command {
        PodCommand::Start(args) => {
            grpc.start_pod(client.request(v1::StartPodRequest {
                task_id: args.id,
                meta: client.meta(args.request_id.as_deref()),
            }))
            .await?
            .into_inner()
            .task
        }
        PodCommand::Stop(args) => {
            grpc.stop_pod(client.request(v1::StopPodRequest {
                task_id: args.id,
                reason: args.reason.unwrap_or_default(),
                meta: client.meta(args.request_id.as_deref()),
            }))
            .await?
            .into_inner()
            .task
        }
        PodCommand::Restart(args) => {
            grpc.restart_pod(client.request(v1::RestartPodRequest {
                task_id: args.id,
                meta: client.meta(args.request_id.as_deref()),
            }))
            .await?
            .into_inner()
            .task
        }
        PodCommand::List(args) => return list(ctx, args).await,
    };
    output::print_task(ctx.format, &task_of(task)?)
}

const POD_COLUMNS: [&str; 8] = [
    "ID", "TITLE", "KIND", "PHASE", "POD", "NODE", "EPOCH", "STARTED",
];

fn pod_row(t: &TaskView) -> Vec<String> {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    vec![
        t.task_id.clone(),
        dash(&t.title.replace(char::is_control, " ")),
        dash(&t.kind),
        t.phase.clone(),
        t.pod_state.clone(),
        dash(&t.pod_node),
        t.pod_epoch.to_string(),
        dash(t.pod_started_at.as_deref().unwrap_or("")),
    ]
}

#[derive(Debug, Serialize)]
struct PodList {
    tasks: Vec<TaskView>,
    next_page_token: String,
}

async fn list(ctx: &Context, args: ListArgs) -> Result<(), CliError> {
    let client = &ctx.client;
    let mut tasks: Vec<v1::Task> = Vec::new();
    let mut token = String::new();
    loop {
        let want = args.limit.map_or(usize::MAX, |l| l - tasks.len());
        if want == 0 {
            break;
        }
        let size = want.min(args.page_size.map_or(1000, usize::from)).min(1000);
        let response = client
            .grpc()
            .list_active_pods(client.request(v1::ListActivePodsRequest {
                page_size: i32::try_from(size).unwrap_or(1000),
                page_token: token.clone(),
                view: crate::commands::view(args.full),
            }))
            .await?
            .into_inner();
        let empty = response.tasks.is_empty();
        tasks.extend(response.tasks);
        let stuck = empty && response.next_page_token == token;
        token = response.next_page_token;
        if token.is_empty() || stuck {
            break;
        }
    }
    let views: Vec<TaskView> = tasks.iter().map(TaskView::from).collect();
    match ctx.format {
        Format::Table => {
            if views.is_empty() {
                eprintln!("no active pods");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = views.iter().map(pod_row).collect();
            output::emit(&output::table(&POD_COLUMNS, &rows))
        }
        Format::Wide => output::print_tasks(Format::Wide, &tasks, &token),
        Format::Json => output::emit_line(&output::pretty(&PodList {
            tasks: views,
            next_page_token: token,
        })),
        Format::Jsonl => {
            let lines: String = views.iter().map(|v| output::compact(v) + "\n").collect();
            output::emit(&lines)
        }
    }
}
