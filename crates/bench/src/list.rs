//! `taskpod bench list`: ListTasks latency for pages of 1000 rows, per variant.
//!
//! Fills a table as `get` does (`--tasks`, `--active-pods` of them running), then times
//! the first page (`page_size` 1000) of each [`VARIANTS`] entry in turn: every ordering
//! unfiltered, then each filter. Each variant runs one call after the other (one
//! caller, so the figure is a page's own latency, not queueing), `--warmup` seconds
//! untimed and `--duration` seconds timed.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use taskpod_proto::v1;

use super::cluster::Target;
use super::load::TableArgs;
use super::report::{Figure, Report, Unit};
use super::timed::{self, Call};
use super::{BenchError, CommonArgs, Database, Needs, Scenario, Workers};

/// ListTasks' largest page.
pub const PAGE_SIZE: i32 = 1000;

/// One ListTasks request shape that is timed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The report's key.
    pub name: &'static str,
    /// For people.
    pub what: &'static str,
    pub order_by: &'static str,
    pub filter: &'static str,
}

impl Variant {
    pub fn request(&self) -> v1::ListTasksRequest {
        v1::ListTasksRequest {
            page_size: PAGE_SIZE,
            order_by: self.order_by.into(),
            filter: self.filter.into(),
            ..v1::ListTasksRequest::default()
        }
    }
}

/// Every ordering with no filter, then each filter in the default order.
pub const VARIANTS: [Variant; 5] = [
    Variant {
        name: "list_created_at_desc",
        what: "first page of 1000, order_by created_at desc, no filter",
        order_by: "created_at desc",
        filter: "",
    },
    Variant {
        name: "list_updated_at_desc",
        what: "first page of 1000, order_by updated_at desc, no filter",
        order_by: "updated_at desc",
        filter: "",
    },
    Variant {
        name: "list_priority_desc",
        what: "first page of 1000, order_by priority desc, no filter",
        order_by: "priority desc",
        filter: "",
    },
    Variant {
        name: "list_status_active",
        what: "first page of up to 1000, filter status = active, updated_at desc",
        order_by: "updated_at desc",
        filter: "status = active",
    },
    Variant {
        name: "list_kind_manual",
        what: "first page of 1000, filter kind = manual, updated_at desc",
        order_by: "updated_at desc",
        filter: "kind = manual",
    },
];

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub table: TableArgs,
    /// Seconds of timed calls per variant
    #[arg(long, value_name = "S", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Seconds of untimed calls per variant first
    #[arg(long, value_name = "S", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Scenario for ListArgs {
    fn name(&self) -> &'static str {
        "list"
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
/// When the table cannot be filled, or every call of a variant failed.
async fn run(target: &mut Target, args: ListArgs) -> Result<Report, BenchError> {
    let table = args
        .table
        .fill(&target.client, target.pool.as_ref(), &target.actor, "list")
        .await?;
    let mut latencies = Vec::new();
    let mut figures = table.figures(args.table.seed);
    let mut notes = Vec::new();
    for (i, variant) in VARIANTS.iter().enumerate() {
        let call: Call = {
            let client = target.client.clone();
            let request = variant.request();
            Arc::new(move |_| {
                let (client, request) = (client.clone(), request.clone());
                async move {
                    client
                        .grpc()
                        .list_tasks(client.request(request))
                        .await
                        .map(|r| r.into_inner().tasks.len() as u64)
                        .map_err(timed::describe)
                }
                .boxed()
            })
        };
        let timed = timed::run_for(
            "list",
            variant.name.into(),
            call,
            1,
            Duration::from_secs(args.warmup),
            Duration::from_secs(args.duration),
            i as u64,
        )
        .await;
        timed.require_some(&format!("list ({})", variant.name))?;
        notes.extend(timed.error_note(variant.name));
        let rows = timed.items as f64 / timed.latencies.count() as f64;
        figures.push(Figure::new(
            format!("{}_rows", variant.name),
            format!("rows per page, {}", variant.name),
            rows,
            Unit::Count,
        ));
        latencies.push(
            timed
                .latencies
                .summary(variant.name, variant.what, timed.elapsed),
        );
    }
    latencies.extend(table.created.summary_if_any());
    Ok(Report {
        scenario: "list",
        parameters: [
            args.table.parameters().as_slice(),
            &[
                ("duration_s", args.duration.into()),
                ("warmup_s", args.warmup.into()),
                ("page_size", u64::from(PAGE_SIZE.unsigned_abs()).into()),
            ],
        ]
        .concat(),
        cluster: target.info.clone(),
        latencies,
        figures,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_cover_each_ordering_and_both_filters_with_unique_names() {
        let mut names: Vec<_> = VARIANTS.iter().map(|v| v.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VARIANTS.len());
        for order in ["created_at desc", "updated_at desc", "priority desc"] {
            assert!(
                VARIANTS
                    .iter()
                    .any(|v| v.order_by == order && v.filter.is_empty()),
                "{order}"
            );
        }
        for filter in ["status = active", "kind = manual"] {
            assert!(VARIANTS.iter().any(|v| v.filter == filter), "{filter}");
        }
    }

    #[test]
    fn requests_ask_for_full_first_pages() {
        for variant in VARIANTS {
            let request = variant.request();
            assert_eq!(request.page_size, 1000);
            assert!(request.page_token.is_empty());
            assert_eq!(request.order_by, variant.order_by);
            assert_eq!(request.filter, variant.filter);
        }
    }
}
