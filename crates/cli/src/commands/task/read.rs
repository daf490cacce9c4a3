//! `taskpod task get | list | count | events`.

use serde::Serialize;
use taskpod_proto::v1;

use super::FilterArgs;
use crate::commands::Context;
use crate::output::{self, EventView, Format, TaskView};
use taskpod_client::error::CliError;

/// The largest page the server serves.
const MAX_PAGE: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The task's id
    pub id: String,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// `created_at`, `updated_at` or `priority`, then optionally `asc` or `desc`
    /// [server default: updated_at desc]
    #[arg(long, value_name = "ORDER")]
    pub order_by: Option<String>,
    /// Stop after this many tasks [default: all]
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Tasks per call (1-1000) [default: 1000, or --limit if smaller]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: Option<u16>,
    /// Continue a listing from a previous `-o json` output's next_page_token
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Include each task's payload and description (the FULL view; lists leave them out)
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, clap::Args)]
pub struct CountArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The task's id
    pub id: String,
    /// The first version to show
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub from_version: i64,
    /// Stop after this many events [default: all]
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// Runs `task get`.
///
/// # Errors
/// The server's refusal (NOT_FOUND for an unknown id).
pub async fn get(ctx: &Context, args: GetArgs) -> Result<(), CliError> {
    let task = get_task(ctx, &args.id).await?;
    output::print_task(ctx.format, &task)
}

/// Reads one task.
///
/// # Errors
/// The server's refusal.
pub async fn get_task(ctx: &Context, id: &str) -> Result<v1::Task, CliError> {
    let client = &ctx.client;
    let response = client
        .grpc()
        .get_task(client.request(v1::GetTaskRequest {
            task_id: id.to_owned(),
        }))
        .await?
        .into_inner();
    response
        .task
        .ok_or_else(|| CliError::from(tonic::Status::internal("GetTask answered without a task")))
}

/// Pages through ListTasks until `limit` tasks or the last page; each page's tasks go
/// to `page` as they arrive. Returns how many were seen and the token after the last
/// page read (empty at the end), whose page boundary is exactly at the limit.
///
/// # Errors
/// The server's refusal of any page.
pub async fn page_tasks(
    ctx: &Context,
    request: v1::ListTasksRequest,
    limit: Option<usize>,
    page_size: Option<usize>,
    mut page: impl FnMut(Vec<v1::Task>) -> Result<(), CliError>,
) -> Result<(usize, String), CliError> {
    let client = &ctx.client;
    let mut seen = 0usize;
    let mut token = request.page_token.clone();
    loop {
        let want = limit.map_or(usize::MAX, |l| l - seen);
        if want == 0 {
            break;
        }
        let size = want.min(page_size.unwrap_or(MAX_PAGE)).min(MAX_PAGE);
        let response = client
            .grpc()
            .list_tasks(client.request(v1::ListTasksRequest {
                page_size: i32::try_from(size).unwrap_or(1000),
                page_token: token.clone(),
                ..request.clone()
            }))
            .await?
            .into_inner();
        let empty = response.tasks.is_empty();
        seen += response.tasks.len();
        page(response.tasks)?;
        let stuck = empty && response.next_page_token == token;
        token = response.next_page_token;
        if token.is_empty() || stuck {
            break;
        }
    }
    Ok((seen, token))
}

/// Runs `task list`.
///
/// # Errors
/// The server's refusal (INVALID_ARGUMENT for a bad filter or order).
pub async fn list(ctx: &Context, args: ListArgs) -> Result<(), CliError> {
    let request = v1::ListTasksRequest {
        page_size: 0,
        page_token: args.page_token.clone().unwrap_or_default(),
        filter: args.filter.filter(),
        criteria: args.filter.criteria(),
        order_by: args.order_by.clone().unwrap_or_default(),
        view: crate::commands::view(args.full),
    };
    let format = ctx.format;
    let mut tasks: Vec<v1::Task> = Vec::new();
    let (seen, next) = page_tasks(
        ctx,
        request,
        args.limit,
        args.page_size.map(usize::from),
        |page| {
            if format == Format::Jsonl {
                // Streamed page by page: a long listing starts printing at once.
                let lines: String = page
                    .iter()
                    .map(|t| output::compact(&TaskView::from(t)) + "\n")
                    .collect();
                output::emit(&lines)
            } else {
                tasks.extend(page);
                Ok(())
            }
        },
    )
    .await?;
    match format {
        Format::Jsonl => Ok(()),
        Format::Json => output::print_tasks(format, &tasks, &next),
        Format::Table | Format::Wide => {
            if seen == 0 {
                eprintln!("no tasks found");
                return Ok(());
            }
            output::print_tasks(format, &tasks, &next)?;
            if !next.is_empty() {
                eprintln!("more tasks follow: continue with --page-token {next}");
            }
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct Count {
    count: i64,
}

/// Runs `task count`.
///
/// # Errors
/// The server's refusal.
pub async fn count(ctx: &Context, args: CountArgs) -> Result<(), CliError> {
    let n = count_tasks(ctx, args.filter.filter(), args.filter.criteria()).await?;
    match ctx.format {
        Format::Table | Format::Wide => output::emit_line(&n.to_string()),
        Format::Json => output::emit_line(&output::pretty(&Count { count: n })),
        Format::Jsonl => output::emit_line(&output::compact(&Count { count: n })),
    }
}

/// # Errors
/// The server's refusal.
pub async fn count_tasks(
    ctx: &Context,
    filter: String,
    criteria: Option<v1::TaskCriteria>,
) -> Result<i64, CliError> {
    let client = &ctx.client;
    Ok(client
        .grpc()
        .count_tasks(client.request(v1::CountTasksRequest { filter, criteria }))
        .await?
        .into_inner()
        .count)
}

#[derive(Debug, Serialize)]
struct EventList {
    events: Vec<EventView>,
    next_page_token: String,
}

/// Runs `task events`.
///
/// # Errors
/// The server's refusal.
pub async fn events(ctx: &Context, args: EventsArgs) -> Result<(), CliError> {
    let client = &ctx.client;
    let mut events: Vec<v1::Event> = Vec::new();
    let mut token = String::new();
    loop {
        let want = args
            .limit
            .map_or(MAX_PAGE, |l| (l - events.len()).min(MAX_PAGE));
        if want == 0 {
            break;
        }
        let response = client
            .grpc()
            .list_task_events(client.request(v1::ListTaskEventsRequest {
                task_id: args.id.clone(),
                from_version: args.from_version,
                page_size: i32::try_from(want).unwrap_or(1000),
                page_token: token.clone(),
            }))
            .await?
            .into_inner();
        let empty = response.events.is_empty();
        events.extend(response.events);
        let stuck = empty && response.next_page_token == token;
        token = response.next_page_token;
        if token.is_empty() || stuck {
            break;
        }
    }
    let views: Vec<EventView> = events.iter().map(EventView::from).collect();
    match ctx.format {
        Format::Table => output::emit(&output::event_table(&views, false)),
        Format::Wide => output::emit(&output::event_table(&views, true)),
        Format::Json => output::emit_line(&output::pretty(&EventList {
            events: views,
            next_page_token: token,
        })),
        Format::Jsonl => {
            let lines: String = views.iter().map(|v| output::compact(v) + "\n").collect();
            output::emit(&lines)
        }
    }
}
