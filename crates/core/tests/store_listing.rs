//! ListTasks and CountTasks: every filter and ordering against an in-memory model, and
//! the documented keyset guarantee under concurrent inserts and updates.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use std::collections::HashMap;

use common::{ctx, store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::{Command, NewTask, Phase, Status, Task, TaskId};
use taskpod_core::store::{
    Cursor, ListQuery, SortDirection, SortField, SortKey, Store, TaskFilter, TaskOrder,
};

/// Every task, in no particular order.
async fn all(store: &Store) -> Vec<Task> {
    scan(store, &TaskFilter::default(), TaskOrder::default(), 1000).await
}

/// Pages through a whole listing.
async fn scan(store: &Store, filter: &TaskFilter, order: TaskOrder, page_size: i64) -> Vec<Task> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_tasks(&ListQuery {
                filter: filter.clone(),
                order,
                page_size,
                after,
                view: Default::default(),
            })
            .await
            .unwrap();
        assert!(page.tasks.len() as i64 <= page_size);
        out.extend(page.tasks);
        match page.next {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

fn key(t: &Task, field: SortField) -> (i64, TaskId) {
    let k = match field {
        SortField::CreatedAt => t.created_at.timestamp_micros(),
        SortField::UpdatedAt => t.updated_at.timestamp_micros(),
        SortField::Priority => i64::from(t.priority),
    };
    (k, t.task_id)
}

fn matches(t: &Task, f: &TaskFilter) -> bool {
    (f.statuses.is_empty() || f.statuses.contains(&t.status))
        && (f.phases.is_empty() || f.phases.contains(&t.phase))
        && (f.kinds.is_empty() || f.kinds.contains(&t.kind))
        && f.created_by.as_ref().is_none_or(|b| *b == t.created_by)
        && f.created_after.is_none_or(|a| t.created_at > a)
        && f.priority_min.is_none_or(|m| t.priority >= m)
        && f.priority_max.is_none_or(|m| t.priority <= m)
}

/// 40 tasks over several creators, kinds, priorities, statuses and phases.
async fn seed(store: &Store) {
    for i in 0..40 {
        let kind = ["manual", "sleep", "exec"][i % 3];
        let who = ["alice", "bob"][i % 2];
        let new = NewTask {
            priority: (i % 5) as i32 - 2,
            ..NewTask::new(format!("t{i}"), kind)
        };
        let id = store
            .create_task(&new, &ctx(who))
            .await
            .unwrap()
            .task_id()
            .unwrap();
        let c = ctx(who);
        match i % 4 {
            0 => {}
            1 => {
                store.execute(id, &Command::RequestStart, &c).await.unwrap();
            }
            2 => {
                store
                    .execute(
                        id,
                        &Command::TransitionPhase {
                            to: Phase::Planning,
                        },
                        &c,
                    )
                    .await
                    .unwrap();
            }
            _ => {
                store
                    .execute(id, &Command::Cancel { reason: "r".into() }, &c)
                    .await
                    .unwrap();
            }
        }
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn every_filter_and_ordering_matches_the_model(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    seed(&store).await;
    let everything = all(&store).await;
    assert_eq!(everything.len(), 40);
    let mid = {
        let mut times: Vec<_> = everything.iter().map(|t| t.created_at).collect();
        times.sort();
        times[20]
    };
    let filters = vec![
        TaskFilter::default(),
        TaskFilter {
            statuses: vec![Status::Active],
            ..Default::default()
        },
        TaskFilter {
            statuses: vec![Status::Inactive, Status::Cancelled],
            ..Default::default()
        },
        TaskFilter {
            phases: vec![Phase::Planning],
            ..Default::default()
        },
        // Pruned to the one status that holds the phase, and to none.
        TaskFilter {
            phases: vec![Phase::Cancelled],
            ..Default::default()
        },
        TaskFilter {
            statuses: vec![Status::Active],
            phases: vec![Phase::Cancelled],
            ..Default::default()
        },
        TaskFilter {
            kinds: vec!["sleep".into()],
            ..Default::default()
        },
        TaskFilter {
            created_by: Some("bob".into()),
            ..Default::default()
        },
        TaskFilter {
            created_after: Some(mid),
            ..Default::default()
        },
        TaskFilter {
            priority_min: Some(0),
            ..Default::default()
        },
        TaskFilter {
            priority_min: Some(-1),
            priority_max: Some(1),
            ..Default::default()
        },
        TaskFilter {
            statuses: vec![Status::Inactive],
            kinds: vec!["manual".into(), "exec".into()],
            created_by: Some("alice".into()),
            ..Default::default()
        },
    ];
    for filter in &filters {
        let expected_count = everything.iter().filter(|t| matches(t, filter)).count();
        assert_eq!(
            store.count_tasks(filter).await.unwrap(),
            expected_count as i64,
            "{filter:?}"
        );
        for field in [
            SortField::CreatedAt,
            SortField::UpdatedAt,
            SortField::Priority,
        ] {
            for direction in [SortDirection::Asc, SortDirection::Desc] {
                let order = TaskOrder { field, direction };
                let got: Vec<_> = scan(&store, filter, order, 7)
                    .await
                    .iter()
                    .map(|t| t.task_id)
                    .collect();
                let mut want: Vec<_> = everything.iter().filter(|t| matches(t, filter)).collect();
                want.sort_by_key(|t| key(t, field));
                if direction == SortDirection::Desc {
                    want.reverse();
                }
                let want: Vec<_> = want.iter().map(|t| t.task_id).collect();
                assert_eq!(got, want, "{filter:?} {order:?}");
            }
        }
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_scan_returns_every_unchanged_row_exactly_once_despite_writes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let store = store(opts).await;
    seed(&store).await;
    for order in [
        TaskOrder {
            field: SortField::UpdatedAt,
            direction: SortDirection::Desc,
        },
        TaskOrder {
            field: SortField::CreatedAt,
            direction: SortDirection::Asc,
        },
        TaskOrder {
            field: SortField::Priority,
            direction: SortDirection::Desc,
        },
    ] {
        let present: Vec<Task> = all(&store).await;
        let mut changed = std::collections::HashSet::new();
        let mut seen: HashMap<TaskId, usize> = HashMap::new();
        let mut after = None;
        let mut round = 0;
        loop {
            let page = store
                .list_tasks(&ListQuery {
                    order,
                    page_size: 6,
                    after,
                    view: Default::default(),
                    ..Default::default()
                })
                .await
                .unwrap();
            for t in &page.tasks {
                *seen.entry(t.task_id).or_default() += 1;
            }
            // Between pages: new tasks arrive and some existing ones change.
            round += 1;
            store
                .create_tasks(
                    &[
                        NewTask::new(format!("late {round}"), "manual"),
                        NewTask {
                            priority: 2,
                            ..NewTask::new("late hi", "manual")
                        },
                    ],
                    &ctx("carol"),
                )
                .await
                .unwrap();
            if let Some(victim) = present.iter().find(|t| {
                t.status == Status::Inactive
                    && !changed.contains(&t.task_id)
                    && !seen.contains_key(&t.task_id)
            }) {
                store
                    .execute(victim.task_id, &Command::RequestStart, &ctx("carol"))
                    .await
                    .unwrap();
                changed.insert(victim.task_id);
            }
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        for t in present.iter().filter(|t| !changed.contains(&t.task_id)) {
            assert_eq!(
                seen.get(&t.task_id),
                Some(&1),
                "{order:?}: task {} seen {:?} times",
                t.task_id,
                seen.get(&t.task_id)
            );
        }
        assert!(!changed.is_empty(), "the scan must race some updates");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn page_sizes_follow_aip_158(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    let batch: Vec<_> = (0..1000)
        .map(|i| NewTask::new(format!("t{i}"), "manual"))
        .collect();
    store.create_tasks(&batch, &ctx("loader")).await.unwrap();
    store
        .create_tasks(&batch[..5], &ctx("loader"))
        .await
        .unwrap();

    let page = |page_size| ListQuery {
        page_size,
        ..Default::default()
    };
    let default = store.list_tasks(&page(0)).await.unwrap();
    assert_eq!(default.tasks.len(), 100);
    assert!(default.next.is_some());
    let clamped = store.list_tasks(&page(5000)).await.unwrap();
    assert_eq!(clamped.tasks.len(), 1000);
    let rest = store
        .list_tasks(&ListQuery {
            page_size: 5000,
            after: clamped.next,
            view: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.tasks.len(), 5);
    assert!(rest.next.is_none(), "no token after the last page");

    let err = store.list_tasks(&page(-1)).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref field, .. } if field == "page_size"),
        "{err:?}"
    );
    // A cursor of one ordering cannot continue another.
    let priority_order = TaskOrder {
        field: SortField::Priority,
        direction: SortDirection::Asc,
    };
    let time_cursor = Cursor {
        key: SortKey::Time(chrono::Utc::now()),
        task_id: TaskId::new(),
    };
    let err = store
        .list_tasks(&ListQuery {
            order: priority_order,
            after: Some(time_cursor),
            view: Default::default(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("page_token"), "{err:?}");
}
