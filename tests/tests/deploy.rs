//! The deployment files, checked offline: each test runs one check of
//! `scripts/validate-deploy.sh` (the compose spec, helm lint and the Kubernetes schemas,
//! promtool, hadolint, yamllint, and the cross-checks between the files, the metric
//! catalog and the code), so each shows up on its own in the test output. The tools are
//! installed by `scripts/test.sh` before the tests (or by the first check that needs
//! them).
//!
//! Two checks need no tools and live here: the chart's dashboards are byte-identical
//! to deploy/'s, and every Postgres query of the dashboards runs against the migrated
//! schema and finds a task's trace id in its first event's `traceparent`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use sqlx::Row as _;
use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_proto::v1;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `scripts/validate-deploy.sh <check>`; its output is the failure message.
fn validate(check: &str) -> anyhow::Result<()> {
    let out = Command::new(repo().join("scripts/validate-deploy.sh"))
        .arg(check)
        .current_dir(repo())
        .output()
        .context("could not run scripts/validate-deploy.sh")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if taskpod_e2e::test_log_enabled() {
        eprintln!("{text}");
    }
    ensure!(
        out.status.success(),
        "validate-deploy.sh {check}: {}\n{text}",
        out.status
    );
    ensure!(
        text.lines().any(|l| l.starts_with("ok: ")),
        "validate-deploy.sh {check} reported nothing:\n{text}"
    );
    Ok(())
}

#[test]
fn compose_file_follows_the_compose_spec_and_the_binaries_settings() -> anyhow::Result<()> {
    validate("compose")
}

#[test]
fn helm_chart_lints_renders_and_refuses_bad_values() -> anyhow::Result<()> {
    validate("helm")
}

#[test]
fn prometheus_config_and_alert_rules_check_and_their_tests_pass() -> anyhow::Result<()> {
    validate("prometheus")
}

#[test]
fn grafana_dashboards_use_provisioned_datasources_and_exported_metrics() -> anyhow::Result<()> {
    validate("grafana")
}

#[test]
fn collector_and_tempo_configs_wire_up() -> anyhow::Result<()> {
    validate("otel")
}

#[test]
fn dockerfile_is_non_root_and_ships_exactly_the_built_binaries() -> anyhow::Result<()> {
    validate("dockerfile")
}

#[test]
fn deploy_yaml_passes_yamllint() -> anyhow::Result<()> {
    validate("yaml")
}

#[test]
fn the_consistency_checks_catch_broken_inputs() -> anyhow::Result<()> {
    validate("selftest")
}

fn dashboard_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "json"));
    files.sort();
    Ok(files)
}

#[test]
fn helm_dashboards_are_byte_identical_to_deploy() -> anyhow::Result<()> {
    let source = dashboard_files(&repo().join("deploy/grafana/dashboards"))?;
    let copies = dashboard_files(&repo().join("helm/taskpod/dashboards"))?;
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    ensure!(
        !source.is_empty(),
        "no dashboards in deploy/grafana/dashboards"
    );
    ensure!(
        names(&source) == names(&copies),
        "helm/taskpod/dashboards has {:?}, deploy/ has {:?}: run scripts/sync-dashboards.sh",
        names(&copies),
        names(&source)
    );
    for (a, b) in source.iter().zip(&copies) {
        ensure!(
            std::fs::read(a)? == std::fs::read(b)?,
            "{} differs from {}: run scripts/sync-dashboards.sh",
            b.display(),
            a.display()
        );
    }
    Ok(())
}

/// Every Postgres query of the dashboards, with where it is: panel targets' `rawSql`
/// and query variables.
fn postgres_queries() -> anyhow::Result<Vec<(String, String)>> {
    fn uses_postgres(node: &Value) -> bool {
        node.pointer("/datasource/uid").and_then(Value::as_str) == Some("postgres")
    }
    fn walk(panels: &[Value], board: &str, out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let (true, Some(sql)) = (uses_postgres(target), target["rawSql"].as_str()) {
                    out.push((format!("{board}: panel {title:?}"), sql.to_owned()));
                }
            }
            if let Some(nested) = panel["panels"].as_array() {
                walk(nested, board, out);
            }
        }
    }
    let mut out = Vec::new();
    for path in dashboard_files(&repo().join("deploy/grafana/dashboards"))? {
        let board: Value = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let name = path.display().to_string();
        walk(
            board["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            &name,
            &mut out,
        );
        for var in board
            .pointer("/templating/list")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (true, Some(sql)) = (uses_postgres(var), var["query"].as_str()) {
                out.push((format!("{name}: variable {}", var["name"]), sql.to_owned()));
            }
        }
    }
    Ok(out)
}

/// What Grafana would send: its macros and variables replaced. A macro this does not
/// know fails the test, so a new one gets a deliberate translation here.
fn as_grafana_sends(sql: &str, task_id: &str) -> anyhow::Result<String> {
    let mut sql = sql.replace(
        "${task_id:sqlstring}",
        &format!("'{}'", task_id.replace('\'', "''")),
    );
    while let Some(start) = sql.find("$__timeFilter(") {
        let open = start + "$__timeFilter(".len();
        let close = open + sql[open..].find(')').context("unclosed $__timeFilter(")?;
        let column = sql[open..close].to_owned();
        sql.replace_range(
            start..=close,
            &format!("{column} BETWEEN now() - interval '1 day' AND now() + interval '1 minute'"),
        );
    }
    // `$` followed by a name or a brace is Grafana's; a bare `$` (a regex anchor) is not.
    let macro_at = sql.match_indices('$').find(|(at, _)| {
        sql[at + 1..]
            .chars()
            .next()
            .is_some_and(|c| c == '{' || c == '_' || c.is_ascii_alphabetic())
    });
    if let Some((at, _)) = macro_at {
        bail!("unsupported Grafana macro at {:?}", &sql[at..]);
    }
    Ok(sql)
}

#[tokio::test]
async fn dashboard_queries_run_on_the_schema_and_find_the_creating_calls_trace()
-> anyhow::Result<()> {
    let queries = postgres_queries()?;
    ensure!(!queries.is_empty(), "no Postgres queries in the dashboards");

    let db = TestDb::create().await?;
    db.offer_kinds(&["manual"], &[]).await?;
    let api = ApiProcess::spawn(&db, &[]).await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(v1::CreateTaskRequest {
        task: Some(v1::TaskSpec {
            title: "traced".into(),
            kind: "manual".into(),
            ..Default::default()
        }),
        meta: Some(v1::RequestMeta {
            actor_id: "grafana-test".into(),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?,
    );
    let task_id = api
        .client()
        .await?
        .create_task(request)
        .await?
        .into_inner()
        .task_id;

    let pool = sqlx::PgPool::connect(&db.url).await?;
    let mut found_trace = false;
    let mut found_events = false;
    for (place, raw) in &queries {
        let sql = as_grafana_sends(raw, &task_id).with_context(|| place.clone())?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_all(&pool)
            .await
            .with_context(|| format!("{place} fails on the migrated schema:\n{sql}"))?;
        ensure!(!rows.is_empty(), "{place} finds nothing for the task");
        if sql.contains("FROM events") && sql.contains("e.type") {
            found_events = true;
        }
        if let Ok(id) = rows[0].try_get::<Option<String>, _>("trace_id") {
            ensure!(
                id.as_deref() == Some(trace_id),
                "{place} reads trace id {id:?}, the creating call's is {trace_id}"
            );
            found_trace = true;
        }
        // A typo in the textbox shows no rows rather than a cast error.
        if sql.contains(&task_id) {
            let typo = as_grafana_sends(raw, "not-a-uuid'; --")?;
            let rows = sqlx::query(sqlx::AssertSqlSafe(typo))
                .fetch_all(&pool)
                .await
                .with_context(|| format!("{place} fails on a task id that is not a uuid"))?;
            ensure!(rows.is_empty(), "{place} matched a task id that is not one");
        }
    }
    ensure!(found_events, "no dashboard query lists the task's events");
    ensure!(found_trace, "no dashboard query reads a trace id");
    pool.close().await;
    Ok(())
}
