//! Steps the scenarios share: creating tasks in bulk, and waiting on the store until
//! pods run or partitions are spread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use sqlx::PgPool;
use taskpod_core::store::inspect;
use taskpod_proto::v1;
use tokio::time::Instant;

use super::progress::{Progress, say};
use super::report::{Figure, Latencies};
use super::{BenchError, CommonArgs, seed};
use taskpod_client::client::Client;

/// CreateTasks' largest batch.
pub const BATCH: usize = 1000;
/// How often a wait re-reads the store.
const POLL: Duration = Duration::from_millis(50);

/// The batches of `count` items: `[1000, 1000, ..., rest]`.
pub fn batches(count: usize) -> Vec<usize> {
    let mut sizes = vec![BATCH; count / BATCH];
    if !count.is_multiple_of(BATCH) {
        sizes.push(count % BATCH);
    }
    sizes
}

/// Tasks a scenario created.
#[derive(Debug)]
pub struct Created {
    /// In creation order.
    pub ids: Vec<String>,
    /// Each CreateTasks call.
    pub batches: Latencies,
    /// All the calls, one after the other.
    pub elapsed: Duration,
}

impl Created {
    /// The batch latencies, as a report's set-up line.
    pub fn summary(&self) -> super::report::Summary {
        self.batches.summary(
            "create_batch",
            "one CreateTasks call of up to 1000 manual tasks (set-up; rate in calls/s)",
            self.elapsed,
        )
    }

    /// [`Created::summary`], unless nothing was created.
    pub fn summary_if_any(&self) -> Option<super::report::Summary> {
        (self.batches.count() > 0).then(|| self.summary())
    }

    fn add(&mut self, other: Created) {
        self.ids.extend(other.ids);
        self.batches.merge(&other.batches);
        self.elapsed += other.elapsed;
    }
}

/// Creates `count` `manual` tasks through CreateTasks in batches of 1000, one call
/// after the other, started (`auto_start`) or not.
///
/// # Errors
/// The first batch the server refuses.
pub async fn create_manual_tasks(
    client: &Client,
    scenario: &'static str,
    count: usize,
    auto_start: bool,
) -> Result<Created, BenchError> {
    let created = Arc::new(AtomicU64::new(0));
    let progress = {
        let created = Arc::clone(&created);
        Progress::start(scenario, move || {
            format!("created {}/{count} tasks", created.load(Ordering::Relaxed))
        })
    };
    let mut ids = Vec::with_capacity(count);
    let mut latencies = Latencies::new();
    let started = Instant::now();
    for size in batches(count) {
        let first = ids.len();
        let tasks = (first..first + size)
            .map(|i| v1::TaskSpec {
                title: format!("bench {scenario} {i}"),
                kind: "manual".into(),
                auto_start,
                ..v1::TaskSpec::default()
            })
            .collect();
        let call = Instant::now();
        let response = client
            .grpc()
            .create_tasks(client.request(v1::CreateTasksRequest {
                tasks,
                meta: client.meta(None),
            }))
            .await
            .map_err(BenchError::rpc(format!(
                "create tasks {first}..{}",
                first + size
            )))?;
        latencies.record(call.elapsed());
        ids.extend(response.into_inner().task_ids);
        created.store(ids.len() as u64, Ordering::Relaxed);
    }
    progress.finish();
    let elapsed = started.elapsed();
    say(format!(
        "{scenario}: created {count} tasks{} in {:.2}s",
        if auto_start { " (auto_start)" } else { "" },
        elapsed.as_secs_f64()
    ));
    Ok(Created {
        ids,
        batches: latencies,
        elapsed,
    })
}

/// A table of `tasks` `manual` tasks to read, `active` of them started (`auto_start`,
/// created first) and the rest inactive. With a database, waits until the started
/// pods run, so they are active while the scenario measures.
///
/// # Errors
/// A refused batch, or the pods not running within five minutes.
pub async fn fill_table(
    client: &Client,
    pool: Option<&PgPool>,
    scenario: &'static str,
    tasks: usize,
    active: usize,
) -> Result<Created, BenchError> {
    let mut all = Created {
        ids: Vec::with_capacity(tasks),
        batches: Latencies::new(),
        elapsed: Duration::ZERO,
    };
    if active > 0 {
        let before = match pool {
            Some(pool) => running_pods(pool).await?,
            None => 0,
        };
        all.add(create_manual_tasks(client, scenario, active, true).await?);
        if let Some(pool) = pool {
            let expected = before + i64::try_from(active).unwrap_or(i64::MAX);
            let took = wait_running(pool, scenario, expected, Duration::from_secs(300)).await?;
            say(format!(
                "{scenario}: {active} pods running {:.2}s after the last batch",
                took.as_secs_f64()
            ));
        }
    }
    let rest = tasks.saturating_sub(active);
    if rest > 0 {
        all.add(create_manual_tasks(client, scenario, rest, false).await?);
    }
    Ok(all)
}

/// Cancels `ids` with `concurrency` calls in flight; returns how many failed. Used to
/// leave a remote cluster as it was found.
pub async fn cancel_tasks(client: &Client, ids: &[String], concurrency: usize) -> usize {
    let results: Vec<bool> = futures::stream::iter(ids.iter().cloned())
        .map(|task_id| async move {
            client
                .grpc()
                .cancel_task(client.request(v1::CancelTaskRequest {
                    task_id,
                    reason: "taskpod bench: cleanup".into(),
                    meta: client.meta(None),
                }))
                .await
                .is_ok()
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.iter().filter(|ok| !**ok).count()
}

/// Pods in state `running`, across the cluster.
///
/// # Errors
/// When the query fails.
pub async fn running_pods(pool: &PgPool) -> Result<i64, BenchError> {
    inspect::running_pods(pool)
        .await
        .map_err(BenchError::store("count running pods"))
}

/// Waits until at least `expected` pods run, showing progress; returns how long it
/// took.
///
/// # Errors
/// A failed query, or `timeout` passing first.
pub async fn wait_running(
    pool: &PgPool,
    scenario: &'static str,
    expected: i64,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    let running = Arc::new(AtomicU64::new(0));
    let progress = {
        let running = Arc::clone(&running);
        Progress::start(scenario, move || {
            format!(
                "{}/{expected} pods running",
                running.load(Ordering::Relaxed)
            )
        })
    };
    let started = Instant::now();
    loop {
        let now = running_pods(pool).await?;
        running.store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
        if now >= expected {
            progress.finish();
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(BenchError::Timeout {
                what: format!("{expected} running pods ({now} run)"),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Partitions per owner, and how many have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub total: i64,
    pub unowned: i64,
    /// Partitions of each owning node, largest first.
    pub owned: Vec<i64>,
}

impl Spread {
    /// Every partition owned, by `workers` nodes, none holding more than its even share
    /// rounded up (what the workers' balancing converges to with equal capacities).
    pub fn is_even(&self, workers: usize) -> bool {
        let Ok(n) = i64::try_from(workers) else {
            return false;
        };
        n > 0
            && self.unowned == 0
            && self.owned.len() == workers
            && self.owned.iter().all(|&c| c <= (self.total + n - 1) / n)
    }
}

/// # Errors
/// When the query fails.
pub async fn partition_spread(pool: &PgPool) -> Result<Spread, BenchError> {
    let rows = inspect::partitions_per_node(pool)
        .await
        .map_err(BenchError::store("read partition owners"))?;
    let mut spread = Spread {
        total: 0,
        unowned: 0,
        owned: Vec::new(),
    };
    for row in rows {
        spread.total += row.count;
        match row.node {
            Some(_) => spread.owned.push(row.count),
            None => spread.unowned += row.count,
        }
    }
    Ok(spread)
}

/// Waits until the workers have spread the partitions evenly (a joining worker gets
/// its share after the others' settling delay), so pods are placed where they stay.
/// Gives up quietly after `timeout`: an uneven spread skews, but does not invalidate,
/// a run.
///
/// # Errors
/// When a query fails.
pub async fn wait_partitions_spread(
    pool: &PgPool,
    workers: usize,
    timeout: Duration,
) -> Result<Spread, BenchError> {
    let started = Instant::now();
    loop {
        let spread = partition_spread(pool).await?;
        if spread.is_even(workers) {
            say(format!(
                "partitions: {} over {workers} worker(s) {:?} after {:.1}s",
                spread.total,
                spread.owned,
                started.elapsed().as_secs_f64()
            ));
            return Ok(spread);
        }
        if started.elapsed() > timeout {
            say(format!(
                "partitions: still uneven after {timeout:?}: {spread:?}; going on"
            ));
            return Ok(spread);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Advisory locks held in the whole server (see `inspect::advisory_locks`).
///
/// # Errors
/// When the query fails.
pub async fn advisory_locks(pool: &PgPool) -> Result<i64, BenchError> {
    inspect::advisory_locks(pool)
        .await
        .map_err(BenchError::store("count advisory locks"))
}

/// Registered worker nodes.
///
/// # Errors
/// When the query fails.
pub async fn nodes(pool: &PgPool) -> Result<i64, BenchError> {
    inspect::nodes(pool)
        .await
        .map_err(BenchError::store("count nodes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_at_most_a_thousand() {
        assert_eq!(batches(0), Vec::<usize>::new());
        assert_eq!(batches(1), vec![1]);
        assert_eq!(batches(1000), vec![1000]);
        assert_eq!(batches(2500), vec![1000, 1000, 500]);
    }

    #[test]
    fn an_even_spread_owns_everything_within_the_share() {
        let spread = |unowned, owned: &[i64]| Spread {
            total: unowned + owned.iter().sum::<i64>(),
            unowned,
            owned: owned.to_vec(),
        };
        assert!(spread(0, &[128, 128]).is_even(2));
        assert!(spread(0, &[86, 85, 85]).is_even(3));
        assert!(spread(0, &[256]).is_even(1));
        assert!(!spread(0, &[256]).is_even(2), "the second has none");
        assert!(!spread(0, &[200, 56]).is_even(2), "above the share");
        assert!(!spread(10, &[123, 123]).is_even(2), "some unowned");
        assert!(!spread(0, &[]).is_even(0));
    }
}

/// Tasks `TableArgs` creates through the API when neither `--tasks` nor `--seed` is
/// given.
const DEFAULT_TABLE: u64 = 100_000;

/// The table `get` and `list` read: S tasks seeded in bulk, then N created through the
/// API, P of those with running pods.
#[derive(Debug, clap::Args)]
pub struct TableArgs {
    /// Tasks created through CreateTasks (batches of 1000) [default: 100000, or
    /// --active-pods with --seed]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub tasks: Option<u64>,
    /// Of those, tasks created with auto_start whose pods run while calls are timed
    #[arg(long, value_name = "P", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub active_pods: u64,
    /// Tasks written first in bulk, straight into Postgres (inactive, kind manual,
    /// read like any other): a table of a million in well under a minute. Needs the
    /// database (--dev or --database-url)
    #[arg(long, value_name = "S", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=50_000_000))]
    pub seed: u64,
}

impl TableArgs {
    /// Tasks created through the API.
    pub fn created(&self) -> u64 {
        self.tasks.unwrap_or(if self.seed > 0 {
            self.active_pods
        } else {
            DEFAULT_TABLE
        })
    }

    /// # Errors
    /// More active pods than created tasks; a seed without a database.
    pub fn check(&self, common: &CommonArgs) -> Result<(), String> {
        if self.active_pods > self.created() {
            return Err(format!(
                "--active-pods {} is more than --tasks {}",
                self.active_pods,
                self.created()
            ));
        }
        if self.seed > 0 && !common.dev && common.database_url.is_none() {
            return Err("--seed writes into Postgres: add --database-url (or --dev)".into());
        }
        Ok(())
    }

    /// Seeds the table (with `--seed`), then creates the rest through the API (see
    /// [`fill_table`]); every id is in the result, seeded ones first.
    ///
    /// # Errors
    /// As [`seed::seed`] and [`fill_table`].
    pub async fn fill(
        &self,
        client: &Client,
        pool: Option<&PgPool>,
        actor: &str,
        scenario: &'static str,
    ) -> Result<Table, BenchError> {
        let seeded = match (self.seed, pool) {
            (0, _) => None,
            (n, Some(pool)) => Some(seed::seed(pool, scenario, n, actor).await?),
            (_, None) => return Err(BenchError::Usage("--seed needs --database-url".into())),
        };
        let tasks = usize::try_from(self.created()).unwrap_or(usize::MAX);
        let active = usize::try_from(self.active_pods).unwrap_or(usize::MAX);
        let created = fill_table(client, pool, scenario, tasks, active).await?;
        let mut ids =
            Vec::with_capacity(created.ids.len() + seeded.as_ref().map_or(0, |s| s.ids.len()));
        let mut seed_elapsed = None;
        if let Some(seeded) = seeded {
            ids.extend(seeded.ids.iter().map(uuid::Uuid::to_string));
            seed_elapsed = Some(seeded.elapsed);
        }
        ids.extend(created.ids.iter().cloned());
        Ok(Table {
            ids,
            created,
            seed_elapsed,
        })
    }

    /// The report's parameters for the table.
    pub fn parameters(&self) -> [(&'static str, serde_json::Value); 3] {
        [
            ("seeded", self.seed.into()),
            ("tasks", self.created().into()),
            ("active_pods", self.active_pods.into()),
        ]
    }
}

/// A filled table.
#[derive(Debug)]
pub struct Table {
    /// Every task, seeded ones first.
    pub ids: Vec<String>,
    /// Those created through the API.
    pub created: Created,
    /// How long the seed took, when there was one.
    pub seed_elapsed: Option<Duration>,
}

impl Table {
    /// The set-up figures: how long the seed took, and at what rate.
    pub fn figures(&self, seeded: u64) -> Vec<Figure> {
        match self.seed_elapsed {
            Some(elapsed) => vec![
                Figure::millis("seed", format!("seeding {seeded} tasks in bulk"), elapsed),
                Figure::rate("seed_tasks", "tasks seeded per second", seeded, elapsed),
            ],
            None => Vec::new(),
        }
    }
}
