//! `taskpod task ...` and `taskpod pod ...` end to end: the real binary against a real
//! `taskpod-api` on a fresh database migrated by `taskpod migrate`. Each test checks
//! what a user sees: stdout in every output format, stderr, and the exit code.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use taskpod_e2e::api::ApiProcess;
use taskpod_e2e::cli::{CliDb, CliOutput, Taskpod, finish};
use taskpod_e2e::spawn_api;

/// No worker runs in these tests: the database offers the `manual` kind as if one did,
/// and the server answers pod requests without waiting for a pod.
const NO_POD_WAIT: (&str, &str) = ("TASKPOD_POD_WAIT_MS", "0");

async fn fresh_db() -> anyhow::Result<CliDb> {
    let db = CliDb::create().await?;
    db.test_db().offer_kinds(&["manual"], &[]).await?;
    Ok(db)
}

async fn setup() -> anyhow::Result<(CliDb, ApiProcess, Taskpod)> {
    let db = fresh_db().await?;
    let api = spawn_api(&db.url, &[NO_POD_WAIT]).await?;
    let cli = Taskpod::new(&api.endpoint(), "alice")?;
    Ok((db, api, cli))
}

fn ok(out: &CliOutput) -> anyhow::Result<()> {
    ensure!(out.code == 0, "expected success: {out}");
    Ok(())
}

/// Creates a task and returns its id (through `-o json`).
async fn create(cli: &Taskpod, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["task", "create", "-o", "json"];
    all.extend_from_slice(args);
    let out = cli.run(&all).await?;
    ok(&out)?;
    Ok(out.json()?["task_id"]
        .as_str()
        .context("no task_id")?
        .to_owned())
}

fn column<'a>(out: &'a CliOutput, row: usize, header: &str) -> Option<&'a str> {
    let lines = out.lines();
    let start = lines.first()?.find(header)?;
    let rest = lines.get(row)?.get(start..)?;
    rest.split_whitespace().next()
}

#[tokio::test]
async fn create_get_list_and_count_print_tables_json_and_jsonl() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let first = cli
        .run(&[
            "task",
            "create",
            "--title",
            "Write the docs",
            "--description",
            "all of them",
            "--payload",
            r#"{"pages": 3}"#,
            "--metadata",
            r#"{"team": "docs"}"#,
            "--priority",
            "7",
        ])
        .await?;
    ok(&first)?;
    let header = first.lines()[0];
    for col in [
        "ID", "TITLE", "KIND", "STATUS", "PHASE", "POD", "VERSION", "UPDATED",
    ] {
        ensure!(header.contains(col), "{col} missing: {first}");
    }
    ensure!(column(&first, 1, "STATUS") == Some("inactive"), "{first}");
    ensure!(
        column(&first, 1, "PHASE") == Some("spec_clarification"),
        "{first}"
    );
    ensure!(column(&first, 1, "KIND") == Some("manual"), "{first}");
    let first_id = column(&first, 1, "ID").context("no id")?.to_owned();
    let second_id = create(&cli, &["--title", "Second"]).await?;

    let got = cli.run(&["task", "get", &first_id, "-o", "json"]).await?;
    ok(&got)?;
    let task = got.json()?;
    ensure!(task["task_id"] == first_id.as_str(), "{got}");
    ensure!(task["payload"] == serde_json::json!({"pages": 3}), "{got}");
    ensure!(
        task["metadata"] == serde_json::json!({"team": "docs"}),
        "{got}"
    );
    ensure!(
        task["priority"] == 7 && task["created_by"] == "alice",
        "{got}"
    );
    ensure!(
        task["status"] == "inactive" && task["version"] == 1,
        "{got}"
    );

    let wide = cli.run(&["task", "get", &first_id, "-o", "wide"]).await?;
    ok(&wide)?;
    ensure!(column(&wide, 1, "PRIORITY") == Some("7"), "{wide}");
    ensure!(column(&wide, 1, "CREATED_BY") == Some("alice"), "{wide}");

    let table = cli.run(&["task", "list"]).await?;
    ok(&table)?;
    ensure!(
        table.lines().len() == 3,
        "header and two rows expected: {table}"
    );
    // Newest change first.
    ensure!(
        column(&table, 1, "ID") == Some(second_id.as_str()),
        "{table}"
    );

    let json = cli.run(&["task", "list", "-o", "json"]).await?;
    ok(&json)?;
    let doc = json.json()?;
    ensure!(doc["tasks"].as_array().map(Vec::len) == Some(2), "{json}");
    ensure!(doc["next_page_token"] == "", "{json}");

    let jsonl = cli.run(&["task", "list", "-o", "jsonl"]).await?;
    ok(&jsonl)?;
    let rows = jsonl.jsonl()?;
    ensure!(
        rows.len() == 2 && rows.iter().all(|r| r["status"] == "inactive"),
        "{jsonl}"
    );

    // --limit stops exactly there and hands back a token that continues after it.
    let limited = cli
        .run(&["task", "list", "--limit", "1", "-o", "json"])
        .await?;
    ok(&limited)?;
    let doc = limited.json()?;
    ensure!(
        doc["tasks"].as_array().map(Vec::len) == Some(1),
        "{limited}"
    );
    let token = doc["next_page_token"].as_str().context("no token")?;
    ensure!(!token.is_empty(), "{limited}");
    let rest = cli
        .run(&["task", "list", "--page-token", token, "-o", "jsonl"])
        .await?;
    ok(&rest)?;
    ensure!(rest.jsonl()?.len() == 1, "{rest}");
    // Small pages are followed to the end.
    let paged = cli
        .run(&["task", "list", "--page-size", "1", "-o", "jsonl"])
        .await?;
    ensure!(paged.jsonl()?.len() == 2, "{paged}");

    let filtered = cli
        .run(&["task", "list", "--filter", "priority >= 5", "-o", "jsonl"])
        .await?;
    ok(&filtered)?;
    let rows = filtered.jsonl()?;
    ensure!(
        rows.len() == 1 && rows[0]["task_id"] == first_id.as_str(),
        "{filtered}"
    );

    let count = cli.run(&["task", "count"]).await?;
    ensure!(count.stdout.trim() == "2", "{count}");
    let count = cli
        .run(&[
            "task", "count", "--status", "inactive", "--kind", "manual", "-o", "json",
        ])
        .await?;
    ensure!(count.json()?["count"] == 2, "{count}");
    let count = cli
        .run(&[
            "task",
            "count",
            "--filter",
            "priority >= 5",
            "--status",
            "active",
        ])
        .await?;
    ensure!(count.stdout.trim() == "0", "{count}");
    Ok(())
}

#[tokio::test]
async fn lifecycle_and_pod_commands_change_the_task_and_its_history() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let id = create(&cli, &["--title", "Drive me"]).await?;

    let moved = cli
        .run(&["task", "transition", &id, "--to", "planning", "-o", "json"])
        .await?;
    ok(&moved)?;
    ensure!(moved.json()?["phase"] == "planning", "{moved}");

    let started = cli.run(&["pod", "start", &id, "-o", "json"]).await?;
    ok(&started)?;
    ensure!(started.json()?["status"] == "active", "{started}");

    let pods = cli.run(&["pod", "list"]).await?;
    ok(&pods)?;
    ensure!(column(&pods, 1, "ID") == Some(id.as_str()), "{pods}");
    ensure!(pods.lines()[0].contains("EPOCH"), "{pods}");
    let pods = cli.run(&["pod", "list", "-o", "json"]).await?;
    ensure!(pods.json()?["tasks"][0]["task_id"] == id.as_str(), "{pods}");

    let restarted = cli.run(&["pod", "restart", &id, "-o", "jsonl"]).await?;
    ok(&restarted)?;
    ensure!(restarted.jsonl()?[0]["status"] == "active", "{restarted}");

    let stopped = cli
        .run(&["pod", "stop", &id, "--reason", "lunch", "-o", "json"])
        .await?;
    ok(&stopped)?;
    ensure!(stopped.json()?["status"] == "inactive", "{stopped}");
    let pods = cli.run(&["pod", "list", "-o", "jsonl"]).await?;
    ensure!(pods.stdout.is_empty(), "no active pod expected: {pods}");

    let done = cli.run(&["task", "complete", &id]).await?;
    ok(&done)?;
    ensure!(column(&done, 1, "STATUS") == Some("completed"), "{done}");
    ensure!(column(&done, 1, "PHASE") == Some("completed"), "{done}");

    let events = cli.run(&["task", "events", &id, "-o", "jsonl"]).await?;
    ok(&events)?;
    let events = events.jsonl()?;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    ensure!(
        types
            == [
                "task_created",
                "phase_changed",
                "pod_requested",
                "pod_restart_requested",
                "pod_stop_requested",
                "task_completed"
            ],
        "{types:?}"
    );
    let versions: Vec<i64> = events
        .iter()
        .filter_map(|e| e["version"].as_i64())
        .collect();
    ensure!(versions == [1, 2, 3, 4, 5, 6], "{versions:?}");
    ensure!(events[4]["data"]["reason"] == "lunch", "{events:?}");
    ensure!(
        events.iter().all(|e| e["actor_id"] == "alice"),
        "{events:?}"
    );

    let tail = cli
        .run(&["task", "events", &id, "--from-version", "5"])
        .await?;
    ok(&tail)?;
    ensure!(tail.lines().len() == 3, "header and versions 5, 6: {tail}");
    ensure!(column(&tail, 2, "TYPE") == Some("task_completed"), "{tail}");

    let other = create(&cli, &["--title", "Cancel me"]).await?;
    let cancelled = cli
        .run(&[
            "task", "cancel", &other, "--reason", "obsolete", "-o", "json",
        ])
        .await?;
    ok(&cancelled)?;
    let task = cancelled.json()?;
    ensure!(
        task["status"] == "cancelled" && task["phase"] == "cancelled",
        "{cancelled}"
    );
    Ok(())
}

#[tokio::test]
async fn refusals_exit_with_their_documented_codes() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let missing = "01a20000-0000-7000-8000-000000000000";

    let out = cli.run(&["task", "get", missing]).await?;
    ensure!(out.code == 3, "not found is 3: {out}");
    ensure!(out.stderr.starts_with("error: not found: "), "{out}");
    ensure!(out.stderr.contains("reason: TASK_NOT_FOUND"), "{out}");
    ensure!(out.stdout.is_empty(), "{out}");

    let out = cli.run(&["task", "create", "--title", " "]).await?;
    ensure!(out.code == 5, "invalid is 5: {out}");
    ensure!(
        out.stderr
            .starts_with("error: invalid argument: task.title: "),
        "{out}"
    );
    ensure!(out.stderr.contains("reason: INVALID_TITLE"), "{out}");

    let out = cli
        .run_with(
            &["task", "create", "--title", "t"],
            &[("TASKPOD_ACTOR", "")],
        )
        .await?;
    ensure!(out.code == 5, "{out}");
    ensure!(
        out.stderr
            .starts_with("error: invalid argument: meta.actor_id: "),
        "{out}"
    );

    let out = cli
        .run(&["task", "list", "--filter", "colour = red"])
        .await?;
    ensure!(out.code == 5, "{out}");
    ensure!(out.stderr.contains("filter: "), "{out}");

    let id = create(&cli, &["--title", "Once"]).await?;
    let out = cli
        .run(&["task", "transition", &id, "--to", "review"])
        .await?;
    ensure!(out.code == 4, "off-graph move is 4: {out}");
    ensure!(out.stderr.contains("reason: INVALID_TRANSITION"), "{out}");
    let out = cli.run(&["pod", "stop", &id]).await?;
    ensure!(out.code == 4 && out.stderr.contains("NOT_RUNNING"), "{out}");
    ok(&cli.run(&["pod", "start", &id]).await?)?;
    let out = cli.run(&["pod", "start", &id]).await?;
    ensure!(out.code == 4, "ALREADY_EXISTS is 4: {out}");
    ensure!(out.stderr.starts_with("error: already exists: "), "{out}");
    ok(&cli.run(&["task", "complete", &id]).await?)?;
    let out = cli.run(&["task", "complete", &id]).await?;
    ensure!(
        out.code == 4 && out.stderr.contains("ALREADY_COMPLETED"),
        "{out}"
    );
    let out = cli
        .run(&["task", "cancel", &id, "--reason", "late"])
        .await?;
    ensure!(
        out.code == 4 && out.stderr.contains("ALREADY_COMPLETED"),
        "{out}"
    );

    // Usage errors are clap's, before any call.
    let out = cli
        .run(&["task", "transition", &id, "--to", "done"])
        .await?;
    ensure!(out.code == 2, "{out}");
    let out = cli.run(&["task", "cancel", &id]).await?;
    ensure!(out.code == 2, "--reason is required: {out}");
    let out = cli
        .run(&["task", "create", "--title", "t", "--payload", "{oops"])
        .await?;
    ensure!(out.code == 2, "{out}");

    // Nothing listens on port 1.
    let out = cli
        .run(&["task", "list", "--address", "http://127.0.0.1:1"])
        .await?;
    ensure!(out.code == 7, "unreachable is 7: {out}");
    ensure!(out.stderr.starts_with("error: unavailable: "), "{out}");
    Ok(())
}

#[tokio::test]
async fn bulk_create_goes_in_batches_and_bulk_cancel_needs_a_yes() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let file = cli.config_home().join("tasks.jsonl");
    let mut lines: Vec<String> = (0..1001)
        .map(|i| format!(r#"{{"title": "bulk {i}", "payload": {{"i": {i}}}}}"#))
        .collect();
    lines[10] = r#"{"title": "urgent", "priority": 9}"#.into();
    lines[20] = r#"{"title": "urgent too", "priority": 9, "kind": "manual"}"#.into();
    std::fs::write(&file, lines.join("\n") + "\n")?;
    let path = file.to_string_lossy().into_owned();

    let out = cli.run(&["task", "create", "--from-file", &path]).await?;
    ok(&out)?;
    ensure!(out.lines().len() == 1001, "one id a line: {out}");
    ensure!(
        out.stderr.contains("created 1001 tasks in 2 batches"),
        "{out}"
    );
    let count = cli.run(&["task", "count"]).await?;
    ensure!(count.stdout.trim() == "1001", "{count}");

    // A bad line is caught before anything is sent.
    std::fs::write(&file, "{\"title\": \"fine\"}\n{\"titel\": \"typo\"}\n")?;
    let out = cli.run(&["task", "create", "--from-file", &path]).await?;
    ensure!(out.code == 2 && out.stderr.contains(":2: "), "{out}");
    let count = cli.run(&["task", "count"]).await?;
    ensure!(count.stdout.trim() == "1001", "{count}");

    // A batch the server refuses names the item and the batch.
    std::fs::write(&file, "{\"title\": \"fine\"}\n{\"title\": \"\"}\n")?;
    let out = cli.run(&["task", "create", "--from-file", &path]).await?;
    ensure!(out.code == 5, "{out}");
    ensure!(
        out.stderr
            .starts_with("error: invalid argument: tasks[1].title: "),
        "{out}"
    );
    ensure!(out.stderr.contains("in batch 1 (lines 1-2)"), "{out}");

    // Without a terminal to ask on, a bulk cancel shows the count and refuses.
    let out = cli
        .run(&[
            "task",
            "cancel",
            "--filter",
            "priority >= 5",
            "--reason",
            "triage",
        ])
        .await?;
    ensure!(out.code == 2, "{out}");
    ensure!(out.stderr.contains("2 unfinished tasks match"), "{out}");
    ensure!(
        out.stderr
            .contains("refusing to cancel 2 tasks without --yes"),
        "{out}"
    );
    let active = cli.run(&["task", "count", "--status", "cancelled"]).await?;
    ensure!(active.stdout.trim() == "0", "{active}");

    let out = cli
        .run(&[
            "task",
            "cancel",
            "--filter",
            "priority >= 5",
            "--reason",
            "triage",
            "--yes",
        ])
        .await?;
    ok(&out)?;
    ensure!(
        out.stdout.trim() == "cancelled 2 of 2 tasks (0 had already finished, 0 failed)",
        "{out}"
    );
    let rows = cli
        .run(&["task", "list", "--status", "cancelled", "-o", "jsonl"])
        .await?
        .jsonl()?;
    ensure!(
        rows.len() == 2 && rows.iter().all(|r| r["priority"] == 9),
        "{rows:?}"
    );
    let events = cli
        .run(&[
            "task",
            "events",
            rows[0]["task_id"].as_str().context("id")?,
            "-o",
            "jsonl",
        ])
        .await?
        .jsonl()?;
    ensure!(events.last().map(|e| &e["data"]["reason"]) == Some(&Value::from("triage")));

    // Nothing left to cancel.
    let out = cli
        .run(&[
            "task",
            "cancel",
            "--filter",
            "priority >= 5",
            "--reason",
            "again",
            "-o",
            "json",
        ])
        .await?;
    ok(&out)?;
    ensure!(out.json()?["matched"] == 0, "{out}");
    Ok(())
}

#[tokio::test]
async fn wait_exits_with_how_the_task_ended() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;

    let done = create(&cli, &["--title", "will complete"]).await?;
    let waiting = cli.spawn(&["task", "wait", &done, "-o", "json"])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&cli
        .run(&["task", "transition", &done, "--to", "planning"])
        .await?)?;
    ok(&cli.run(&["task", "complete", &done]).await?)?;
    let out = finish(waiting, &["wait"]).await?;
    ensure!(out.code == 0, "completed is 0: {out}");
    ensure!(out.json()?["status"] == "completed", "{out}");

    let cancelled = create(&cli, &["--title", "will be cancelled"]).await?;
    let waiting = cli.spawn(&["task", "wait", &cancelled])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&cli
        .run(&["task", "cancel", &cancelled, "--reason", "no"])
        .await?)?;
    let out = finish(waiting, &["wait"]).await?;
    ensure!(out.code == 11, "cancelled is 11: {out}");
    ensure!(out.stderr.contains("was cancelled"), "{out}");

    // Already finished: answered at once.
    let out = cli.run(&["task", "wait", &done]).await?;
    ensure!(out.code == 0, "{out}");

    let idle = create(&cli, &["--title", "never finishes"]).await?;
    let started = std::time::Instant::now();
    let out = cli.run(&["task", "wait", &idle, "--timeout", "1s"]).await?;
    ensure!(out.code == 12, "timeout is 12: {out}");
    ensure!(
        out.stderr.contains("timed out after 1s") && out.stderr.contains("status inactive"),
        "{out}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let out = cli
        .run(&["task", "wait", "01a20000-0000-7000-8000-000000000000"])
        .await?;
    ensure!(out.code == 3, "{out}");
    Ok(())
}

#[tokio::test]
async fn watch_prints_each_event_until_the_task_ends() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let id = create(&cli, &["--title", "watched"]).await?;
    let watching = cli.spawn(&["task", "watch", &id, "-o", "jsonl"])?;
    let table = cli.spawn(&["task", "watch", &id, "--since-version", "2"])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&cli
        .run(&["task", "transition", &id, "--to", "planning"])
        .await?)?;
    ok(&cli.run(&["pod", "start", &id]).await?)?;
    ok(&cli
        .run(&["task", "cancel", &id, "--reason", "seen enough"])
        .await?)?;

    let out = finish(watching, &["watch"]).await?;
    ok(&out)?;
    let events = out.jsonl()?;
    let seen: Vec<(i64, &str)> = events
        .iter()
        .filter_map(|e| Some((e["version"].as_i64()?, e["type"].as_str()?)))
        .collect();
    ensure!(
        seen == [
            (1, "task_created"),
            (2, "phase_changed"),
            (3, "pod_requested"),
            (4, "task_cancelled")
        ],
        "{out}"
    );

    let out = finish(table, &["watch"]).await?;
    ok(&out)?;
    ensure!(out.lines().len() == 4, "header and versions 2-4: {out}");
    ensure!(out.lines()[0].starts_with("VERSION"), "{out}");
    ensure!(column(&out, 3, "TYPE") == Some("task_cancelled"), "{out}");

    let out = cli
        .run(&["task", "watch", "01a20000-0000-7000-8000-000000000000"])
        .await?;
    ensure!(out.code == 3 && out.stdout.is_empty(), "{out}");
    Ok(())
}

#[tokio::test]
async fn watch_with_a_filter_lists_then_follows_changes() -> anyhow::Result<()> {
    let (_db, _api, cli) = setup().await?;
    let before = create(&cli, &["--title", "before", "--priority", "5"]).await?;
    let watching = cli.spawn(&["task", "watch", "--filter", "priority >= 5", "-o", "jsonl"])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = create(&cli, &["--title", "after", "--priority", "6"]).await?;
    create(&cli, &["--title", "not matching", "--priority", "1"]).await?;
    ok(&cli
        .run(&["task", "cancel", &before, "--reason", "x"])
        .await?)?;
    // A watch never ends by itself: give the changes time to arrive, then stop it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = watching.id().context("watch exited early")?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let out = finish(watching, &["watch"]).await?;
    let lines = out.jsonl()?;
    let ids: Vec<&str> = lines.iter().filter_map(|l| l["task_id"].as_str()).collect();
    ensure!(
        ids.first() == Some(&before.as_str()),
        "snapshot first: {out}"
    );
    ensure!(
        lines.get(1) == Some(&serde_json::json!({"snapshot_done": true})),
        "{out}"
    );
    ensure!(ids.contains(&after.as_str()), "{out}");
    ensure!(
        lines
            .iter()
            .any(|l| l["task_id"] == before.as_str() && l["status"] == "cancelled"),
        "the cancel is a change of a matching task: {out}"
    );
    ensure!(!out.stdout.contains("not matching"), "{out}");
    Ok(())
}

/// The stream resumes from the last version it printed: the replica it watches is
/// killed, changes land on another, a new replica takes the old port, and the output
/// holds every version exactly once.
#[tokio::test]
async fn watch_resumes_after_the_server_dies_without_gap_or_duplicate() -> anyhow::Result<()> {
    let db = fresh_db().await?;
    let watched = spawn_api(&db.url, &[NO_POD_WAIT]).await?;
    let other = spawn_api(&db.url, &[NO_POD_WAIT]).await?;
    let port_addr = watched.addr.to_string();
    let cli = Taskpod::new(&other.endpoint(), "alice")?;
    let id = create(&cli, &["--title", "resume me"]).await?;
    let watching = cli.spawn(&[
        "task",
        "watch",
        &id,
        "-o",
        "jsonl",
        "--address",
        &watched.endpoint(),
    ])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&cli
        .run(&["task", "transition", &id, "--to", "planning"])
        .await?)?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    drop(watched); // SIGKILL: the connection breaks mid-stream.
    ok(&cli
        .run(&["task", "transition", &id, "--to", "development"])
        .await?)?;
    ok(&cli
        .run(&["task", "transition", &id, "--to", "review"])
        .await?)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listen = port_addr.as_str();
    let revived = spawn_api(&db.url, &[NO_POD_WAIT, ("TASKPOD_LISTEN", listen)]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A graceful drain ends the stream too; the watch comes back to the same port.
    revived.terminate().await?;
    ok(&cli
        .run(&["task", "transition", &id, "--to", "development"])
        .await?)?;
    let mut revived = revived;
    revived.wait(Duration::from_secs(20)).await?;
    let _again = spawn_api(&db.url, &[NO_POD_WAIT, ("TASKPOD_LISTEN", listen)]).await?;
    ok(&cli.run(&["task", "complete", &id]).await?)?;

    let out = finish(watching, &["watch"]).await?;
    ok(&out)?;
    let versions: Vec<i64> = out
        .jsonl()?
        .iter()
        .filter_map(|e| e["version"].as_i64())
        .collect();
    ensure!(versions == [1, 2, 3, 4, 5, 6], "{out}");
    ensure!(out.stderr.contains("resuming from version"), "{out}");
    drop(other);
    Ok(())
}
