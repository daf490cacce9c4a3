//! `taskpod bench` run end to end at tiny sizes: the real binary against real servers
//! on a fresh database (and, for one test each, a cluster it starts with `--dev`).
//! These check that each scenario runs, counts what it did and prints a report whose
//! JSON has its keys; they never assert timings.
#![allow(clippy::unwrap_used)]

use anyhow::{Context as _, ensure};
use serde_json::Value;
use sqlx::PgPool;
use taskpod_e2e::api::ApiProcess;
use taskpod_e2e::cli::{CliDb, CliOutput, Taskpod};
use taskpod_e2e::spawn_api;
use taskpod_e2e::worker::WorkerProcess;

/// A short run: no warm-up, one second timed.
const SHORT: [&str; 4] = ["--duration", "1", "--warmup", "0"];

/// A database, one API replica and, when `worker` is set, one worker running `sleep`
/// without delays (as `--dev` runs it for `e2e`).
struct Cluster {
    db: CliDb,
    _api: ApiProcess,
    _worker: Option<WorkerProcess>,
    cli: Taskpod,
}

async fn cluster(worker: bool) -> anyhow::Result<Cluster> {
    let db = CliDb::create().await?;
    let worker = if worker {
        Some(
            WorkerProcess::spawn(
                &db.test_db(),
                "bench-worker",
                &[("TASKPOD_HANDLERS__SLEEP_PHASE_MS", "0")],
            )
            .await?,
        )
    } else {
        db.test_db().offer_kinds(&["manual"], &[]).await?;
        None
    };
    let api = spawn_api(&db.url, &[("TASKPOD_POD_WAIT_MS", "0")]).await?;
    let cli = Taskpod::new(&api.endpoint(), "bench-test")?;
    Ok(Cluster {
        db,
        _api: api,
        _worker: worker,
        cli,
    })
}

impl Cluster {
    /// Runs `taskpod bench <args> --json` and returns its report.
    async fn bench(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.run(args).await?;
        ensure!(out.code == 0, "bench failed: {out}");
        report(&out)
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        all.push("--json");
        self.cli.run(&all).await
    }

    async fn pool(&self) -> anyhow::Result<PgPool> {
        Ok(PgPool::connect(&self.db.url).await?)
    }

    async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let pool = self.pool().await?;
        let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok(n)
    }
}

/// The JSON report, checked for the keys every scenario's report has.
fn report(out: &CliOutput) -> anyhow::Result<Value> {
    let v = out.json()?;
    for key in [
        "scenario",
        "parameters",
        "cluster",
        "latencies",
        "figures",
        "notes",
    ] {
        ensure!(v.get(key).is_some(), "no {key:?} in {v}");
    }
    for (name, summary) in v["latencies"].as_object().context("latencies")? {
        for key in [
            "count",
            "elapsed_s",
            "rate_per_s",
            "min_ms",
            "mean_ms",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p999_ms",
            "max_ms",
        ] {
            ensure!(summary[key].is_number(), "{name} has no {key}: {summary}");
        }
    }
    Ok(v)
}

fn int(v: &Value, path: &[&str]) -> anyhow::Result<i64> {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_i64()
        .with_context(|| format!("{} is not an integer in {v}", path.join(".")))
}

#[tokio::test]
async fn bench_create_counts_single_and_batched_creates() -> anyhow::Result<()> {
    let c = cluster(false).await?;
    let mut args = vec!["create", "--concurrency", "2"];
    args.extend(SHORT);
    let single = c.bench(&args).await?;
    ensure!(single["scenario"] == "create", "{single}");
    let calls = int(&single, &["latencies", "create_task", "count"])?;
    ensure!(calls > 0, "{single}");
    ensure!(int(&single, &["figures", "tasks_created"])? == calls);
    ensure!(int(&single, &["figures", "errors"])? == 0);
    ensure!(single["figures"]["tasks_per_s"].as_f64().unwrap() > 0.0);

    args.extend(["--batch", "10"]);
    let batched = c.bench(&args).await?;
    let calls = int(&batched, &["latencies", "create_tasks", "count"])?;
    let created = int(&batched, &["figures", "tasks_created"])?;
    ensure!(calls > 0 && created == calls * 10, "{batched}");
    ensure!(int(&batched, &["parameters", "batch"])? == 10);

    // No warm-up: every task the two runs made was counted.
    let stored = c.count("SELECT count(*) FROM tasks").await?;
    let single_created = int(&single, &["figures", "tasks_created"])?;
    ensure!(stored == single_created + created, "{stored} tasks stored");
    Ok(())
}

#[tokio::test]
async fn bench_get_and_list_read_a_seeded_table() -> anyhow::Result<()> {
    let c = cluster(false).await?;
    let url = c.db.url.clone();
    let mut args = vec![
        "get",
        "--seed",
        "2500",
        "--tasks",
        "20",
        "--concurrency",
        "2",
    ];
    args.extend(["--database-url", &url]);
    args.extend(SHORT);
    let get = c.bench(&args).await?;
    ensure!(int(&get, &["parameters", "seeded"])? == 2500, "{get}");
    ensure!(int(&get, &["latencies", "get_task", "count"])? > 0, "{get}");
    ensure!(int(&get, &["figures", "errors"])? == 0, "{get}");
    ensure!(get["figures"]["seed_ms"].is_number(), "{get}");
    ensure!(c.count("SELECT count(*) FROM tasks").await? == 2520);

    let mut args = vec!["list", "--seed", "1500", "--database-url", &url];
    args.extend(SHORT);
    let list = c.bench(&args).await?;
    for variant in ["list_created_at_desc", "list_kind_manual"] {
        ensure!(int(&list, &["latencies", variant, "count"])? > 0, "{list}");
        ensure!(
            list["figures"][format!("{variant}_rows")] == 1000,
            "{variant}: {list}"
        );
    }
    // Seeded tasks are as good as created ones: a pod starts on one through the API.
    let seeded: String = sqlx::query_scalar(
        "SELECT task_id::text FROM tasks WHERE title = 'bench seed 0' ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&c.pool().await?)
    .await?;
    let out = c
        .cli
        .run(&[
            "task",
            "transition",
            &seeded,
            "--to",
            "planning",
            "-o",
            "json",
        ])
        .await?;
    ensure!(out.code == 0, "{out}");
    ensure!(out.json()?["version"] == 2, "{out}");
    Ok(())
}

#[tokio::test]
async fn bench_seed_needs_a_database() -> anyhow::Result<()> {
    let c = cluster(false).await?;
    let out = c.run(&["get", "--seed", "10"]).await?;
    ensure!(out.code == 2, "{out}");
    ensure!(out.stderr.contains("--database-url"), "{out}");
    Ok(())
}

#[tokio::test]
async fn bench_e2e_completes_every_task_with_its_full_trail() -> anyhow::Result<()> {
    let c = cluster(true).await?;
    let url = c.db.url.clone();
    let mut args = vec![
        "e2e",
        "--batch",
        "10",
        "--concurrency",
        "2",
        "--in-flight",
        "40",
        "--database-url",
        &url,
    ];
    args.extend(SHORT);
    let e2e = c.bench(&args).await?;
    let created = int(&e2e, &["figures", "tasks_created"])?;
    ensure!(created > 0, "{e2e}");
    ensure!(
        int(&e2e, &["figures", "trails_complete"])? == created,
        "{e2e}"
    );
    ensure!(int(&e2e, &["figures", "trails_incomplete"])? == 0, "{e2e}");
    ensure!(int(&e2e, &["latencies", "create_to_completed", "count"])? > 0);
    ensure!(
        int(&e2e, &["latencies", "store_created_to_completed", "count"])? > 0,
        "{e2e}"
    );
    let completed = c
        .count("SELECT count(*) FROM tasks WHERE status = 'completed' AND kind = 'sleep'")
        .await?;
    ensure!(completed == created, "{completed} of {created} completed");
    Ok(())
}

#[tokio::test]
async fn bench_e2e_fails_loudly_when_an_event_is_missing() -> anyhow::Result<()> {
    let c = cluster(true).await?;
    // Every pod_stopped append is silently dropped: heads move on, streams do not.
    let pool = c.pool().await?;
    sqlx::raw_sql(
        "CREATE FUNCTION drop_pod_stopped() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.type = 'pod_stopped' THEN RETURN NULL; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER drop_pod_stopped BEFORE INSERT ON events \
         FOR EACH ROW EXECUTE FUNCTION drop_pod_stopped();",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let url = c.db.url.clone();
    let mut args = vec![
        "e2e",
        "--batch",
        "5",
        "--in-flight",
        "10",
        "--database-url",
        &url,
    ];
    args.extend(SHORT);
    let out = c.run(&args).await?;
    ensure!(out.code != 0, "an incomplete trail passed: {out}");
    ensure!(out.stderr.contains("incomplete trail"), "{out}");
    ensure!(out.stdout.is_empty(), "no report for a failed run: {out}");
    Ok(())
}

#[tokio::test]
async fn bench_limit_measures_postgres_and_redis_and_cleans_up() -> anyhow::Result<()> {
    let c = cluster(false).await?;
    let redis = std::env::var("TASKPOD_TEST_REDIS_URL")
        .context("TASKPOD_TEST_REDIS_URL must point at a test Redis")?;
    let url = c.db.url.clone();
    let mut args = vec![
        "limit",
        "--concurrency",
        "2",
        "--database-url",
        &url,
        "--redis-url",
        &redis,
    ];
    args.extend(SHORT);
    let limit = c.bench(&args).await?;
    for name in [
        "pg_select_one",
        "pg_insert_one",
        "pg_create",
        "redis_publish",
    ] {
        ensure!(
            int(&limit, &["latencies", name, "count"])? > 0,
            "{name}: {limit}"
        );
        ensure!(
            limit["figures"][format!("{name}_per_s")].as_f64().unwrap() > 0.0,
            "{name}: {limit}"
        );
    }
    ensure!(
        c.count("SELECT count(*) FROM pg_namespace WHERE nspname = 'taskpod_limit'")
            .await?
            == 0,
        "the scratch schema is left behind"
    );
    ensure!(c.count("SELECT count(*) FROM tasks").await? == 0);
    Ok(())
}

#[tokio::test]
async fn bench_dev_runs_e2e_on_workers_without_sleep_delays() -> anyhow::Result<()> {
    let mut cli = Taskpod::new("", "bench-test")?;
    cli.set_env("TASKPOD_ADDRESS", "");
    let mut args = vec![
        "bench",
        "e2e",
        "--dev",
        "--workers",
        "1",
        "--batch",
        "5",
        "--in-flight",
        "20",
        "--json",
    ];
    args.extend(SHORT);
    let out = cli.run(&args).await?;
    ensure!(out.code == 0, "{out}");
    let e2e = report(&out)?;
    ensure!(e2e["cluster"]["mode"] == "dev", "{e2e}");
    ensure!(int(&e2e, &["cluster", "workers"])? == 1, "{e2e}");
    let created = int(&e2e, &["figures", "tasks_created"])?;
    ensure!(created > 0, "{e2e}");
    ensure!(
        int(&e2e, &["figures", "trails_complete"])? == created,
        "{e2e}"
    );
    Ok(())
}
