//! The read-only diagnostics the benchmarks run (`store::inspect`), against tasks and
//! pods the store itself wrote.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{create, pod_meta, running_pod, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::domain::restart::{CrashKind, RestartPolicy};
use taskpod_core::store::crashes::CrashReport;
use taskpod_core::store::inspect::{self, PerNode, Takeover};

#[sqlx::test(migrations = "../../migrations")]
async fn a_running_pod_shows_in_every_reading(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let pool = store.pool();
    let idle = create(&store, "manual").await;
    let (task, epoch, live) = running_pod(&store, "sleep").await;
    let node = live.id;

    assert_eq!(inspect::running_pods(pool).await.unwrap(), 1);
    assert_eq!(
        inspect::running_pods_per_node(pool).await.unwrap(),
        vec![PerNode {
            node: Some(node),
            count: 1
        }]
    );
    assert_eq!(
        inspect::running_pods_of(pool, node).await.unwrap(),
        vec![task.as_uuid()]
    );
    assert_eq!(inspect::partitions_of(pool, node).await.unwrap(), 1);
    let partitions = inspect::partitions_per_node(pool).await.unwrap();
    let total = i64::from(store.partition_count());
    assert_eq!(
        partitions,
        vec![
            PerNode {
                node: None,
                count: total - 1
            },
            PerNode {
                node: Some(node),
                count: 1
            }
        ]
    );
    assert_eq!(inspect::nodes(pool).await.unwrap(), 1);
    assert!(
        inspect::advisory_locks(pool).await.unwrap() >= 1,
        "the node key"
    );
    assert_eq!(
        inspect::takeover(pool, node).await.unwrap(),
        Takeover {
            registered: true,
            unclaimed_partitions: total,
            running_elsewhere: 0,
        }
    );

    // The trails: the running task's stream, the idle one's first event.
    let ids = [task.as_uuid(), idle.as_uuid()];
    let mut trails = inspect::trails(pool, &ids).await.unwrap();
    trails.sort_by_key(|t| t.task_id != task.as_uuid());
    let running = &trails[0];
    assert_eq!(
        (running.status.as_str(), running.pod_state.as_str()),
        ("active", "running")
    );
    assert_eq!(
        running.types.first().map(String::as_str),
        Some("task_created")
    );
    assert_eq!(
        running.types.last().map(String::as_str),
        Some("pod_started")
    );
    assert_eq!(running.types.len() as i64, running.version);
    assert!(running.created_to_updated_us.unwrap() >= 0);
    assert_eq!(trails[1].types, ["task_created"]);
    let steps = inspect::steps(pool, &ids).await.unwrap();
    let versions: Vec<i64> = steps.iter().map(|s| s.version).collect();
    assert_eq!(versions, (2..=running.version).collect::<Vec<_>>());
    assert!(steps.iter().all(|s| 0 <= s.p50_us && s.p50_us <= s.p99_us));
    assert_eq!(steps.last().unwrap().event_type, "pod_started");

    // Start-up times: the running pod has them, the idle task has none.
    let requested = inspect::requested_to_started_us(pool, &ids).await.unwrap();
    assert_eq!(requested.len(), 1);
    assert!(requested[0] >= 0);
    let mut startup = inspect::created_to_pod_started_us(pool, &ids)
        .await
        .unwrap();
    startup.sort();
    assert_eq!(startup.len(), 2);
    assert!(startup[0].is_none() && startup[1].is_some_and(|us| us >= 0));
    let started = inspect::pod_started_at(pool, &[task.as_uuid()])
        .await
        .unwrap();
    let clock = inspect::clock(pool).await.unwrap();
    assert!(started[0].is_some_and(|at| at <= clock + chrono::Duration::seconds(5)));
    assert!((clock - chrono::Utc::now()).num_seconds().abs() < 60);

    // A node_lost record for the pod.
    assert_eq!(inspect::node_lost(pool, node).await.unwrap().crashes, 0);
    let partition = store.get_task(task).await.unwrap().partition;
    let generation = store.partitions().await.unwrap()[partition as usize].generation;
    store
        .record_crash(
            &CrashReport {
                task_id: task,
                epoch,
                node: Some(node),
                reason: "lost".into(),
                kind: CrashKind::NodeLost,
            },
            node,
            generation,
            &RestartPolicy {
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..RestartPolicy::default()
            },
            0.5,
            &pod_meta(),
        )
        .await
        .unwrap();
    let lost = inspect::node_lost(pool, node).await.unwrap();
    assert_eq!(lost.crashes, 1);
    assert!(lost.first.is_some() && lost.first == lost.last);
    drop(live);
}
