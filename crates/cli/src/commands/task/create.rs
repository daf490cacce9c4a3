//! `taskpod task create`: one task from flags, or many from a JSON Lines file.
//!
//! The file holds one task spec per line, with the fields of `TaskSpec`:
//! `{"title": "...", "description": "...", "kind": "sleep", "payload": {...},
//! "priority": 5, "metadata": {...}, "auto_start": true}`; only `title` is required,
//! blank lines are skipped and `--kind`, `--priority` and `--auto-start` fill the fields
//! a line leaves out. Every line is checked before anything is sent, then the tasks go
//! in batches of up to 1,000 (`CreateTasks`, one transaction each).

use std::io::Read as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use taskpod_proto::{convert, v1};

use crate::commands::Context;
use crate::output::{self, Format};
use taskpod_client::error::{CliError, RpcError};

/// The most tasks one CreateTasks call takes.
pub const BATCH_SIZE: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The title (1-255 characters)
    #[arg(long, required_unless_present = "from_file")]
    pub title: Option<String>,
    /// Free text
    #[arg(long, conflicts_with = "from_file")]
    pub description: Option<String>,
    /// The handler kind [server default: manual]
    #[arg(long)]
    pub kind: Option<String>,
    /// The handler's input, as JSON
    #[arg(long, value_name = "JSON", value_parser = parse_json, conflicts_with = "from_file")]
    pub payload: Option<Value>,
    /// -1000..=1000, higher runs first
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Labels, as a JSON object
    #[arg(long, value_name = "JSON", value_parser = parse_object, conflicts_with = "from_file")]
    pub metadata: Option<Value>,
    /// Requests a pod in the same transaction
    #[arg(long)]
    pub auto_start: bool,
    /// AIP-155 idempotency key: a retry with the same id gets the first response (with
    /// --from-file, batch N uses ID-N)
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Creates every task of a JSON Lines file (`-` reads stdin)
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

fn parse_object(text: &str) -> Result<Value, String> {
    match parse_json(text)? {
        Value::Object(o) => Ok(Value::Object(o)),
        _ => Err("must be a JSON object".into()),
    }
}

/// One line of a `--from-file` file.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileTask {
    title: String,
    #[serde(default)]
    description: String,
    kind: Option<String>,
    #[serde(default)]
    payload: Value,
    priority: Option<i32>,
    metadata: Option<serde_json::Map<String, Value>>,
    auto_start: Option<bool>,
}

/// Runs `task create`.
///
/// # Errors
/// A bad file (usage), or the server's refusal.
pub async fn run(ctx: &Context, args: CreateArgs) -> Result<(), CliError> {
    if let Some(path) = &args.from_file {
        let text = read_input(path)?;
        let specs = parse_file(&text, &args, &path.display().to_string())?;
        return create_many(ctx, specs, args.request_id.as_deref()).await;
    }
    let spec = v1::TaskSpec {
        title: args.title.clone().unwrap_or_default(),
        description: args.description.clone().unwrap_or_default(),
        kind: args.kind.clone().unwrap_or_default(),
        payload: args.payload.as_ref().map(convert::json_to_value),
        priority: args.priority.unwrap_or(0),
        metadata: args.metadata.as_ref().and_then(convert::json_to_struct),
        auto_start: args.auto_start,
    };
    let client = &ctx.client;
    let task_id = client
        .grpc()
        .create_task(client.request(v1::CreateTaskRequest {
            task: Some(spec),
            meta: client.meta(args.request_id.as_deref()),
        }))
        .await?
        .into_inner()
        .task_id;
    // The response carries only the id; the task is read back (any replica reads its
    // own writes) to print it whole. If that read fails the task still exists, so the
    // command succeeds with the id alone rather than invite a second create.
    match super::read::get_task(ctx, &task_id).await {
        Ok(task) => output::print_task(ctx.format, &task),
        Err(err) => {
            eprintln!("warning: created {task_id} but could not read it back: {err}");
            match ctx.format {
                Format::Json | Format::Jsonl => {
                    output::emit_line(&output::compact(&CreatedId { task_id: &task_id }))
                }
                Format::Table | Format::Wide => output::emit_line(&task_id),
            }
        }
    }
}

fn read_input(path: &std::path::Path) -> Result<String, CliError> {
    let failed = |source| CliError::ReadInput {
        path: path.display().to_string(),
        source,
    };
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(failed)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(failed)
    }
}

/// A spec and the file line it came from.
#[derive(Debug)]
struct Numbered {
    line: usize,
    spec: v1::TaskSpec,
}

fn parse_file(text: &str, defaults: &CreateArgs, name: &str) -> Result<Vec<Numbered>, CliError> {
    let mut specs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let item: FileTask = serde_json::from_str(line)
            .map_err(|e| CliError::Usage(format!("{name}:{number}: {e}")))?;
        specs.push(Numbered {
            line: number,
            spec: v1::TaskSpec {
                title: item.title,
                description: item.description,
                kind: item
                    .kind
                    .or_else(|| defaults.kind.clone())
                    .unwrap_or_default(),
                payload: (!item.payload.is_null()).then(|| convert::json_to_value(&item.payload)),
                priority: item.priority.or(defaults.priority).unwrap_or(0),
                metadata: item
                    .metadata
                    .and_then(|m| convert::json_to_struct(&Value::Object(m))),
                auto_start: item.auto_start.unwrap_or(defaults.auto_start),
            },
        });
    }
    if specs.is_empty() {
        return Err(CliError::Usage(format!("{name} holds no tasks")));
    }
    Ok(specs)
}

#[derive(Debug, Serialize)]
struct Created<'a> {
    task_ids: &'a [String],
}

#[derive(Debug, Serialize)]
struct CreatedId<'a> {
    task_id: &'a str,
}

async fn create_many(
    ctx: &Context,
    specs: Vec<Numbered>,
    request_id: Option<&str>,
) -> Result<(), CliError> {
    let client = &ctx.client;
    let batches = specs.len().div_ceil(BATCH_SIZE);
    let mut ids: Vec<String> = Vec::with_capacity(specs.len());
    for (index, batch) in specs.chunks(BATCH_SIZE).enumerate() {
        let number = index + 1;
        let batch_request_id = request_id.map(|r| format!("{r}-{number}"));
        let request = v1::CreateTasksRequest {
            tasks: batch.iter().map(|n| n.spec.clone()).collect(),
            meta: client.meta(batch_request_id.as_deref()),
        };
        let created = client.grpc().create_tasks(client.request(request)).await;
        let created = match created {
            Ok(response) => response.into_inner().task_ids,
            Err(status) => {
                return Err(CliError::Batch {
                    batch: number,
                    first_line: batch.first().map_or(0, |n| n.line),
                    last_line: batch.last().map_or(0, |n| n.line),
                    created: ids.len(),
                    rpc: Box::new(RpcError::from_status(&status)),
                });
            }
        };
        // Ids are printed batch by batch, so a later failure leaves the user a record
        // of what exists.
        match ctx.format {
            Format::Table | Format::Wide => {
                let lines: String = created.iter().map(|id| format!("{id}\n")).collect();
                output::emit(&lines)?;
            }
            Format::Jsonl => {
                let lines: String = created
                    .iter()
                    .map(|id| output::compact(&CreatedId { task_id: id }) + "\n")
                    .collect();
                output::emit(&lines)?;
            }
            Format::Json => {}
        }
        ids.extend(created);
        tracing::debug!(batch = number, of = batches, "batch created");
    }
    if ctx.format == Format::Json {
        output::emit_line(&output::pretty(&Created { task_ids: &ids }))?;
    }
    eprintln!(
        "created {} tasks in {batches} batch{}",
        ids.len(),
        if batches == 1 { "" } else { "es" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn parse(args: &[&str]) -> Result<CreateArgs, clap::Error> {
        Probe::try_parse_from(std::iter::once("create").chain(args.iter().copied())).map(|p| p.args)
    }

    #[test]
    fn a_title_or_a_file_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--title", "t"]).is_ok());
        assert!(parse(&["--from-file", "f.jsonl"]).is_ok());
        assert!(parse(&["--from-file", "f.jsonl", "--payload", "{}"]).is_err());
    }

    #[test]
    fn json_flags_are_checked_locally() {
        let args = parse(&["--title", "t", "--payload", "[1, 2]", "--priority", "-5"]).unwrap();
        assert_eq!(args.payload, Some(serde_json::json!([1, 2])));
        assert_eq!(args.priority, Some(-5));
        assert!(parse(&["--title", "t", "--payload", "{nope"]).is_err());
        assert!(parse(&["--title", "t", "--metadata", "[1]"]).is_err());
        assert!(parse(&["--title", "t", "--metadata", r#"{"team": "a"}"#]).is_ok());
    }

    #[test]
    fn file_lines_take_defaults_from_flags() {
        let args = parse(&["--from-file", "f", "--kind", "sleep", "--auto-start"]).unwrap();
        let text = "{\"title\": \"a\"}\n\n{\"title\": \"b\", \"kind\": \"manual\", \"auto_start\": false, \"priority\": 3}\n";
        let specs = parse_file(text, &args, "f").unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[0].line, specs[1].line), (1, 3));
        assert_eq!(
            (specs[0].spec.kind.as_str(), specs[0].spec.auto_start),
            ("sleep", true)
        );
        assert_eq!(
            (
                specs[1].spec.kind.as_str(),
                specs[1].spec.auto_start,
                specs[1].spec.priority
            ),
            ("manual", false, 3)
        );
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let args = parse(&["--from-file", "f"]).unwrap();
        let err = parse_file("{\"title\": \"a\"}\n{\"titel\": \"b\"}\n", &args, "f").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("f:2: "), "{err}");
        assert!(parse_file("\n\n", &args, "f").is_err());
    }
}
