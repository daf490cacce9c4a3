//! `taskpod bench create`: CreateTask throughput and latency; with `--batch N`,
//! CreateTasks calls of N tasks each.
//!
//! `--concurrency` callers each send one call after the other (a closed loop) for
//! `--warmup` seconds untimed, then `--duration` seconds timed. Every call creates
//! inactive `manual` tasks (no pod, so the figure is the create path alone: validation,
//! one transaction of one statement, the commit's WAL flush, the bus announcement). The
//! histogram is per call; the rate that matters with `--batch` is the tasks/s figure.
//! On a remote cluster the tasks stay behind (inactive; cancel or purge them after).

use std::sync::Arc;

use futures::FutureExt as _;
use taskpod_proto::v1;

use super::cluster::Target;
use super::report::{Figure, Report};
use super::timed::{self, Call, Stretch};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};
use taskpod_client::client::Client;

/// The seed of the callers' generators (titles only: every call creates new tasks).
const SEED: u64 = 0x0063_7265_6174_6573;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Tasks per call: CreateTasks batches of N instead of single CreateTask calls
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub batch: Option<u64>,
    /// Calls in flight at once
    #[arg(long, value_name = "C", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    #[command(flatten)]
    pub stretch: Stretch,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for CreateArgs {
    fn name(&self) -> &'static str {
        "create"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: false,
            database: Database::No,
            workers: Workers::Default(1),
            replicas: 1,
            worker_env: &[],
        }
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// `size` specs of inactive `manual` tasks, titled after `random`.
pub fn specs(size: u64, random: u64, auto_start: bool, kind: &str) -> Vec<v1::TaskSpec> {
    (0..size)
        .map(|i| v1::TaskSpec {
            title: format!("bench {random:016x}-{i}"),
            kind: kind.to_owned(),
            auto_start,
            ..v1::TaskSpec::default()
        })
        .collect()
}

/// One create call of `size` tasks (CreateTask when `size` is `None`); returns the ids.
///
/// # Errors
/// The server's refusal.
pub async fn create_call(
    client: &Client,
    size: Option<u64>,
    random: u64,
    auto_start: bool,
    kind: &str,
) -> Result<Vec<String>, tonic::Status> {
    match size {
        None => {
            let task = specs(1, random, auto_start, kind).pop();
            let response = client
                .grpc()
                .create_task(client.request(v1::CreateTaskRequest {
                    task,
                    meta: client.meta(None),
                }))
                .await?;
            Ok(vec![response.into_inner().task_id])
        }
        Some(n) => {
            let response = client
                .grpc()
                .create_tasks(client.request(v1::CreateTasksRequest {
                    tasks: specs(n, random, auto_start, kind),
                    meta: client.meta(None),
                }))
                .await?;
            Ok(response.into_inner().task_ids)
        }
    }
}

/// Runs the scenario.
///
/// # Errors
/// When every timed call failed.
async fn run(target: &mut Target, args: CreateArgs) -> Result<Report, BenchError> {
    let (name, what, rpc) = match args.batch {
        None => (
            "create_task",
            "one CreateTask call (an inactive manual task)",
            "CreateTask".to_owned(),
        ),
        Some(n) => (
            "create_tasks",
            "one CreateTasks call of --batch inactive manual tasks",
            format!("CreateTasks of {n}"),
        ),
    };
    let call: Call = {
        let (client, batch) = (target.client.clone(), args.batch);
        Arc::new(move |random| {
            let client = client.clone();
            async move {
                create_call(&client, batch, random, false, "manual")
                    .await
                    .map(|ids| ids.len() as u64)
                    .map_err(timed::describe)
            }
            .boxed()
        })
    };
    let timed = args
        .stretch
        .run("create", rpc.clone(), call, args.concurrency, SEED)
        .await;
    timed.require_some(&format!("create any task ({rpc})"))?;
    let mut notes: Vec<String> = timed.error_note(&rpc).into_iter().collect();
    if target.dev.is_none() {
        notes.push("the tasks created stay on the cluster (inactive, kind manual)".into());
    }
    Ok(Report {
        scenario: "create",
        parameters: [
            &[
                ("batch", args.batch.unwrap_or(1).into()),
                ("concurrency", args.concurrency.into()),
            ],
            args.stretch.parameters().as_slice(),
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies: vec![timed.latencies.summary(name, what, timed.elapsed)],
        figures: vec![
            Figure::rate(
                "tasks",
                "tasks created per second (timed stretch)",
                timed.items,
                timed.elapsed,
            ),
            Figure::count(
                "tasks_created",
                "tasks created in the timed stretch",
                timed.items,
            ),
            Figure::count("timed_calls", "calls timed", timed.latencies.count()),
            Figure::count("errors", "calls that failed", timed.errors),
        ],
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_numbered_inactive_tasks_of_the_kind() {
        let specs = specs(3, 0xab, false, "manual");
        assert_eq!(specs.len(), 3);
        assert!(specs.iter().all(|s| s.kind == "manual" && !s.auto_start));
        assert_eq!(specs[2].title, "bench 00000000000000ab-2");
    }
}
