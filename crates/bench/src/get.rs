//! `taskpod bench get`: GetTask latency on random existing tasks.
//!
//! Fills a table of `--tasks` `manual` tasks (CreateTasks, batches of 1000), of which
//! `--active-pods` are created with `auto_start` and waited on until their pods run
//! (with a database), so pods are active while the reads are timed. Then
//! `--concurrency` callers each read a uniformly random task of the table, one GetTask
//! after the other, for `--warmup` seconds untimed and `--duration` seconds timed.

use std::sync::Arc;

use futures::FutureExt as _;
use taskpod_proto::v1;

use super::cluster::Target;
use super::load::TableArgs;
use super::report::{Figure, Report};
use super::timed::{self, Call, Stretch};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};

/// The seed of the task picks: the same reads in every run.
const SEED: u64 = 0x0067_6574_7461_736b;

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub table: TableArgs,
    #[command(flatten)]
    pub stretch: Stretch,
    /// GetTask calls in flight at once
    #[arg(long, value_name = "C", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for GetArgs {
    fn name(&self) -> &'static str {
        "get"
    }

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn needs(&self) -> Needs {
        Needs {
            dev_only: false,
            database: Database::Optional,
            workers: Workers::Default(1),
            replicas: 1,
            worker_env: &[],
        }
    }

    /// Flags that do not fit together.
    fn check(&self) -> Result<(), String> {
        self.table.check(&self.common)
    }

    async fn run(self, target: &mut Target) -> Result<Report, BenchError> {
        run(target, self).await
    }
}

/// Runs the scenario.
///
/// # Errors
/// When the table cannot be filled, or every timed call failed.
async fn run(target: &mut Target, args: GetArgs) -> Result<Report, BenchError> {
    let mut table = args
        .table
        .fill(&target.client, target.pool.as_ref(), &target.actor, "get")
        .await?;
    let ids = Arc::new(std::mem::take(&mut table.ids));
    let call: Call = {
        let (client, ids) = (target.client.clone(), Arc::clone(&ids));
        Arc::new(move |random| {
            let (client, ids) = (client.clone(), Arc::clone(&ids));
            async move {
                let task_id = ids[timed::index(random, ids.len())].clone();
                client
                    .grpc()
                    .get_task(client.request(v1::GetTaskRequest { task_id }))
                    .await
                    .map(|_| 1)
                    .map_err(timed::describe)
            }
            .boxed()
        })
    };
    let timed = args
        .stretch
        .run("get", "GetTask".into(), call, args.concurrency, SEED)
        .await;
    timed.require_some("read any task")?;
    let notes: Vec<String> = timed.error_note("GetTask").into_iter().collect();
    Ok(Report {
        scenario: "get",
        parameters: [
            args.table.parameters().as_slice(),
            &args.stretch.parameters(),
            &[("concurrency", args.concurrency.into())],
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies: [
            vec![timed.latencies.summary(
                "get_task",
                "one GetTask call on a random task of the table",
                timed.elapsed,
            )],
            table.created.summary_if_any().into_iter().collect(),
        ]
        .concat(),
        figures: [
            table.figures(args.table.seed),
            vec![
                Figure::count(
                    "timed_calls",
                    "GetTask calls timed",
                    timed.latencies.count(),
                ),
                Figure::count("errors", "GetTask calls that failed", timed.errors),
            ],
        ]
        .concat(),
        notes,
    })
}
