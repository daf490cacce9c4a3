//! `taskpod bench get`: GetTask latency on random existing tasks.
//!
//! Fills a table of `--tasks` `manual` tasks (CreateTasks, batches of 1000), of which
//! `--active-pods` are created with `auto_start` and waited on until their pods run
//! (with a database), so pods are active while the reads are timed. Then
//! `--concurrency` callers each read a uniformly random task of the table, one GetTask
//! after the other, for `--warmup` seconds untimed and `--duration` seconds timed.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use taskpod_proto::v1;

use super::cluster::Target;
use super::load::TableArgs;
use super::report::{Figure, Report};
use super::timed::{self, Call};
use super::{BenchError, CommonArgs, Database, Needs, Workers};

pub const NEEDS: Needs = Needs {
    dev_only: false,
    database: Database::Optional,
    workers: Workers::Default(1),
    replicas: 1,
};

/// The seed of the task picks: the same reads in every run.
const SEED: u64 = 0x0067_6574_7461_736b;

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub table: TableArgs,
    /// Seconds of timed reads
    #[arg(long, value_name = "S", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Seconds of untimed reads first
    #[arg(long, value_name = "S", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
    /// GetTask calls in flight at once
    #[arg(long, value_name = "C", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl GetArgs {
    /// # Errors
    /// Flags that do not fit together.
    pub fn check(&self) -> Result<(), String> {
        self.table.check()
    }
}

/// Runs the scenario.
///
/// # Errors
/// When the table cannot be filled, or every timed call failed.
pub async fn run(target: &mut Target, args: GetArgs) -> Result<Report, BenchError> {
    let created = args
        .table
        .fill(&target.client, target.pool.as_ref(), "get")
        .await?;
    let ids = Arc::new(created.ids.clone());
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
            }
            .boxed()
        })
    };
    let timed = timed::run_for(
        "get",
        "GetTask".into(),
        call,
        usize::try_from(args.concurrency).unwrap_or(1),
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.duration),
        SEED,
    )
    .await;
    if timed.latencies.count() == 0 {
        return Err(BenchError::Failed(format!(
            "read any task: {} errors; first: {}",
            timed.errors,
            timed.first_error.as_deref().unwrap_or("none")
        )));
    }
    let mut notes = Vec::new();
    if let Some(first) = &timed.first_error {
        notes.push(format!(
            "{} GetTask calls failed; the first: {first}",
            timed.errors
        ));
    }
    Ok(Report {
        scenario: "get",
        parameters: [
            args.table.parameters().as_slice(),
            &[
                ("duration_s", args.duration.into()),
                ("warmup_s", args.warmup.into()),
                ("concurrency", args.concurrency.into()),
            ],
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies: vec![
            timed.latencies.summary(
                "get_task",
                "one GetTask call on a random task of the table",
                timed.elapsed,
            ),
            created.summary(),
        ],
        figures: vec![
            Figure::count(
                "timed_calls",
                "GetTask calls timed",
                timed.latencies.count(),
            ),
            Figure::count("errors", "GetTask calls that failed", timed.errors),
        ],
        notes,
    })
}
