//! Every write of the store announces what it committed, once, after its commit, with
//! every field a watcher filters on taken from the committed row (issue 13, deliver 1):
//! creates (alone and group-committed), commands (the guarded write and the locked
//! one, a request id's replay announcing nothing). Real Postgres, real Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{ctx, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::bus::{BusEvent, BusSettings, Publisher, Subscription, TaskUpdate, channels};
use taskpod_core::domain::{Command, NewTask, RequestContext, TaskId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn redis() -> BusSettings {
    BusSettings::with_url(
        std::env::var("TASKPOD_TEST_REDIS_URL").expect("TASKPOD_TEST_REDIS_URL (scripts/test.sh)"),
    )
}

/// Reads the `tasks` channel until nothing arrives for half a second; the updates of
/// `ids` (the server is shared with other tests), by task.
async fn drain(
    rx: &mut tokio::sync::mpsc::Receiver<BusEvent>,
    ids: &BTreeSet<TaskId>,
) -> BTreeMap<TaskId, Vec<TaskUpdate>> {
    let mut got: BTreeMap<TaskId, Vec<TaskUpdate>> = BTreeMap::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        if let BusEvent::Message { payload, .. } = event {
            let update: TaskUpdate = serde_json::from_slice(&payload).unwrap();
            if ids.contains(&update.task_id) {
                got.entry(update.task_id).or_default().push(update);
            }
        }
    }
    got
}

/// The update must say exactly what the stored row says.
async fn matches_row(store: &taskpod_core::store::Store, update: &TaskUpdate, event_type: &str) {
    let row = store.get_task(update.task_id).await.unwrap();
    assert_eq!(
        (
            update.version,
            update.status,
            update.phase,
            update.partition
        ),
        (row.version, row.status, row.phase, row.partition),
        "{update:?}"
    );
    assert_eq!(update.kind, row.kind);
    assert_eq!(update.priority, row.priority);
    assert_eq!(update.created_by.as_deref(), Some(row.created_by.as_str()));
    assert_eq!(update.created_at, Some(row.created_at));
    assert_eq!(update.updated_at, Some(row.updated_at), "{update:?}");
    assert_eq!(update.event_type, event_type);
    assert_eq!(update.epoch, row.pod.as_ref().map_or(0, |p| p.epoch));
}

#[sqlx::test(migrations = "../../migrations")]
async fn every_write_announces_its_committed_row_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let settings = redis();
    let tracker = TaskTracker::new();
    let bus = Publisher::start(&settings, &tracker).unwrap();
    let store = store(opts).await.with_bus(bus.clone());
    let shutdown = CancellationToken::new();
    let (sub, mut rx, _task) = Subscription::start(&settings, shutdown.clone()).unwrap();
    sub.set_channels([channels::TASKS.to_owned()].into());
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap(),
        Some(BusEvent::Connected)
    );

    let mut auto = NewTask::new("started at once", "manual");
    auto.auto_start = true;
    let alone = store
        .create_task(&auto, &ctx("alice"))
        .await
        .unwrap()
        .task_id()
        .unwrap();
    let batch: Vec<(NewTask, RequestContext)> = (0..3)
        .map(|i| (NewTask::new(format!("batched {i}"), "manual"), ctx("bob")))
        .collect();
    let batched: Vec<TaskId> = store
        .create_each(&batch)
        .await
        .into_iter()
        .map(|r| r.unwrap().task_id().unwrap())
        .collect();
    let mut ids: BTreeSet<TaskId> = batched.iter().copied().collect();
    ids.insert(alone);
    let created = drain(&mut rx, &ids).await;
    assert_eq!(created.len(), 4, "{created:?}");
    matches_row(&store, &created[&alone][0], "pod_requested").await;
    for id in &batched {
        assert_eq!(created[id].len(), 1);
        matches_row(&store, &created[id][0], "task_created").await;
    }

    // A command through the guarded write, one through the lock (a request id), and
    // that request's replay.
    store
        .execute(batched[0], &Command::RequestStart, &ctx("carol"))
        .await
        .unwrap();
    let keyed = ctx("carol").with_request_id("announce-once");
    store
        .execute(batched[1], &Command::RequestStart, &keyed)
        .await
        .unwrap();
    let replay = store
        .execute(batched[1], &Command::RequestStart, &keyed)
        .await
        .unwrap();
    assert!(replay.replayed);
    let commanded = drain(&mut rx, &ids).await;
    assert_eq!(commanded.len(), 2, "{commanded:?}");
    for id in &batched[..2] {
        assert_eq!(
            commanded[id].len(),
            1,
            "one announcement each: {commanded:?}"
        );
        matches_row(&store, &commanded[id][0], "pod_requested").await;
    }
    assert_eq!(bus.dropped(), 0);
    shutdown.cancel();
}
