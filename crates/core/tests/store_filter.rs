//! AIP-160 filters through ListTasks and CountTasks: the SQL the store compiles an
//! expression to selects exactly the tasks `TaskFilter::matches` selects in memory, for
//! hand-written filters and for random expressions; invalid filters are
//! INVALID_ARGUMENT on `filter`.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic to fail the test

mod common;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use common::{ctx, store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use taskpod_core::Error;
use taskpod_core::domain::filter::{self, CompareOp, FilterExpr, FilterField, FilterValue};
use taskpod_core::domain::{Command, NewTask, Phase, Status, Task, TaskId};
use taskpod_core::store::{ListQuery, SortDirection, SortField, Store, TaskFilter, TaskOrder};

const KINDS: &[&str] = &["manual", "sleep", "exec", "data.load"];
/// Creators, one with a quote and a space so that text values must be bound properly.
const CREATORS: &[&str] = &["alice", "bob", "carol o'hara"];
const PRIORITIES: &[i32] = &[-2, -1, 0, 1, 2, 1000, -1000];

/// 42 tasks over every kind, creator, priority, status and most phases.
async fn seed(store: &Store) {
    for i in 0..42 {
        let who = CREATORS[i % CREATORS.len()];
        let new = NewTask {
            priority: PRIORITIES[i % PRIORITIES.len()],
            ..NewTask::new(format!("t{i}"), KINDS[i % KINDS.len()])
        };
        let id = store
            .create_task(&new, &ctx(who))
            .await
            .unwrap()
            .task_id()
            .unwrap();
        let c = ctx(who);
        let phases = [Phase::Planning, Phase::Development, Phase::Review];
        for to in &phases[..i % 4] {
            store
                .execute(id, &Command::TransitionPhase { to: *to }, &c)
                .await
                .unwrap();
        }
        let commands: &[Command] = match i % 6 {
            1 => &[Command::RequestStart],
            2 => &[Command::Cancel { reason: "r".into() }],
            3 => &[Command::Complete],
            4 => &[
                Command::RequestStart,
                Command::RequestStop {
                    reason: Some("later".into()),
                },
            ],
            _ => &[],
        };
        for command in commands {
            store.execute(id, command, &c).await.unwrap();
        }
    }
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
        out.extend(page.tasks);
        match page.next {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

fn ids<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> Vec<TaskId> {
    let mut ids: Vec<TaskId> = tasks.into_iter().map(|t| t.task_id).collect();
    ids.sort();
    ids
}

/// Checks count and a full listing (in `order`, pages of `page_size`) against the
/// in-memory model; returns how many tasks matched.
async fn check(
    store: &Store,
    everything: &[Task],
    filter: &TaskFilter,
    order: TaskOrder,
    page_size: i64,
) -> usize {
    let expected = ids(everything.iter().filter(|t| filter.matches(t)));
    let count = store.count_tasks(filter).await.unwrap();
    assert_eq!(count, expected.len() as i64, "count of {filter:?}");
    let listed = scan(store, filter, order, page_size).await;
    assert_eq!(ids(&listed), expected, "listing of {filter:?} in {order:?}");
    expected.len()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[sqlx::test(migrations = "../../migrations")]
async fn filter_strings_select_what_the_model_selects(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    seed(&store).await;
    let everything = scan(&store, &TaskFilter::default(), TaskOrder::default(), 1000).await;
    assert_eq!(everything.len(), 42);
    let mut created: Vec<_> = everything.iter().map(|t| t.created_at).collect();
    created.sort();
    let mid = created[21];
    let changed = everything
        .iter()
        .find(|t| t.updated_at != t.created_at)
        .unwrap()
        .updated_at;
    // The same instant as `mid`, written with an offset.
    let mid_offset = mid
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::AutoSi, false);
    let (mid, changed) = (rfc3339(mid), rfc3339(changed));

    let filters = vec![
        "status = active".to_owned(),
        "status != active".into(),
        "status = inactive".into(),
        "phase = planning OR phase = development".into(),
        "phase = review".into(),
        "kind = manual AND priority > 0".into(),
        "kind = sleep kind = exec".into(),
        "kind = sleep OR kind = exec priority >= 0".into(),
        // OR binds tighter than AND.
        "status = active AND kind = manual OR kind = exec".into(),
        "(status = active AND kind = manual) OR kind = exec".into(),
        "NOT status = cancelled".into(),
        "-kind = manual".into(),
        "-(kind = manual OR kind = sleep) status = inactive".into(),
        "(status = active OR status = completed) AND NOT (priority < 0)".into(),
        "NOT (NOT (phase = planning))".into(),
        "created_by = \"carol o'hara\"".into(),
        "created_by = 'carol o\\'hara' OR created_by = bob".into(),
        "created_by = \"x' OR '1'='1\"".into(),
        "created_by != alice".into(),
        "kind = \"data.load\"".into(),
        "priority >= -1 priority <= 1".into(),
        "priority = 1000 OR priority = -1000".into(),
        "priority != 0 AND priority > -1000".into(),
        "phase = review OR NOT (phase = spec_clarification OR kind = \"data.load\")".into(),
        format!("created_at > \"{mid}\""),
        format!("created_at >= \"{mid}\""),
        format!("created_at < \"{mid}\" OR priority = 2"),
        format!("created_at <= \"{mid}\" AND updated_at > \"{mid}\""),
        format!("created_at = \"{mid_offset}\""),
        format!("created_at = '{mid}' OR (created_at > '{mid}' AND NOT status = active)"),
        format!("updated_at = \"{changed}\""),
        format!("updated_at != \"{changed}\" status = cancelled"),
        format!("-updated_at <= \"{changed}\""),
    ];
    let orders = [
        TaskOrder::default(),
        TaskOrder {
            field: SortField::CreatedAt,
            direction: SortDirection::Asc,
        },
        TaskOrder {
            field: SortField::Priority,
            direction: SortDirection::Desc,
        },
    ];
    let mut selective = 0;
    for (i, text) in filters.iter().enumerate() {
        let expr = filter::parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .unwrap();
        let f = TaskFilter {
            expr: Some(expr),
            ..TaskFilter::default()
        };
        let n = check(&store, &everything, &f, orders[i % orders.len()], 7).await;
        if n > 0 && n < everything.len() {
            selective += 1;
        }
    }
    // The model is not trivially agreeing: most filters select some but not all.
    assert!(selective >= filters.len() * 3 / 4, "{selective} selective");

    // The expression ANDs with the typed fields.
    let typed = [
        TaskFilter {
            statuses: vec![Status::Inactive, Status::Active],
            ..TaskFilter::default()
        },
        TaskFilter {
            kinds: vec!["manual".into(), "exec".into()],
            priority_min: Some(-1),
            ..TaskFilter::default()
        },
        TaskFilter {
            created_by: Some("bob".into()),
            phases: vec![Phase::SpecClarification, Phase::Review],
            ..TaskFilter::default()
        },
    ];
    for base in typed {
        for text in ["kind = manual OR priority > 0", "NOT status = active"] {
            let f = TaskFilter {
                expr: filter::parse(text).unwrap(),
                ..base.clone()
            };
            check(&store, &everything, &f, TaskOrder::default(), 5).await;
        }
    }
}

/// A random comparison whose values are near the seeded data, so that every operator
/// meets equal, smaller and larger values.
fn random_comparison(rng: &mut StdRng, everything: &[Task]) -> FilterExpr {
    let field = FilterField::ALL[rng.random_range(0..FilterField::ALL.len())];
    let ops: Vec<CompareOp> = CompareOp::ALL
        .iter()
        .copied()
        .filter(|op| field.allows(*op))
        .collect();
    let op = ops[rng.random_range(0..ops.len())];
    let value = match field {
        FilterField::Status => {
            FilterValue::Status(Status::ALL[rng.random_range(0..Status::ALL.len())])
        }
        FilterField::Phase => FilterValue::Phase(Phase::ALL[rng.random_range(0..Phase::ALL.len())]),
        FilterField::Kind => {
            let kinds: Vec<&str> = KINDS.iter().copied().chain(["nope"]).collect();
            FilterValue::Text(kinds[rng.random_range(0..kinds.len())].to_owned())
        }
        FilterField::CreatedBy => {
            let creators: Vec<&str> = CREATORS
                .iter()
                .copied()
                .chain(["nobody", "Alice"])
                .collect();
            FilterValue::Text(creators[rng.random_range(0..creators.len())].to_owned())
        }
        FilterField::CreatedAt | FilterField::UpdatedAt => {
            let task = &everything[rng.random_range(0..everything.len())];
            let base = if rng.random_bool(0.5) {
                task.created_at
            } else {
                task.updated_at
            };
            let nudge = TimeDelta::microseconds(rng.random_range(-1..=1));
            FilterValue::Time(base + nudge)
        }
        FilterField::Priority => {
            let near = [-1001, -1000, -999, -3, -2, -1, 0, 1, 2, 3, 999, 1000, 1001];
            FilterValue::Int(near[rng.random_range(0..near.len())])
        }
    };
    FilterExpr::Compare { field, op, value }
}

fn random_expr(rng: &mut StdRng, everything: &[Task], depth: u32) -> FilterExpr {
    if depth == 0 || rng.random_bool(0.35) {
        return random_comparison(rng, everything);
    }
    let operands = |rng: &mut StdRng| {
        let n = rng.random_range(2..=3);
        (0..n)
            .map(|_| random_expr(rng, everything, depth - 1))
            .collect::<Vec<_>>()
    };
    match rng.random_range(0..3) {
        0 => FilterExpr::And(operands(rng)),
        1 => FilterExpr::Or(operands(rng)),
        _ => FilterExpr::Not(Box::new(random_expr(rng, everything, depth - 1))),
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn random_expressions_in_sql_match_the_model(_: PgPoolOptions, opts: PgConnectOptions) {
    let store = store(opts).await;
    seed(&store).await;
    let everything = scan(&store, &TaskFilter::default(), TaskOrder::default(), 1000).await;
    let mut rng = StdRng::seed_from_u64(0x7a5c_b0d5);
    let mut selective = 0;
    for case in 0..64 {
        let expr = random_expr(&mut rng, &everything, 3);
        // Through the canonical text, as a client would send it.
        let text = expr.to_string();
        let parsed = filter::parse(&text)
            .unwrap_or_else(|e| panic!("case {case}: {text:?}: {e}"))
            .unwrap();
        assert_eq!(parsed, expr, "case {case}: {text:?}");
        let f = TaskFilter {
            expr: Some(parsed),
            ..TaskFilter::default()
        };
        let n = check(&store, &everything, &f, TaskOrder::default(), 1000).await;
        if n > 0 && n < everything.len() {
            selective += 1;
        }
    }
    assert!(
        selective >= 16,
        "only {selective} of 64 cases were selective"
    );
}

#[test]
fn invalid_filters_are_invalid_argument_on_filter() {
    let too_long = format!("kind = \"{}\"", "x".repeat(filter::MAX_BYTES));
    let too_deep = format!("{}kind = x{}", "(".repeat(33), ")".repeat(33));
    let too_many = vec!["priority = 1"; 65].join(" OR ");
    let invalid = [
        "colour = red",
        "status < active",
        "kind > x",
        "status = \"bogus\"",
        "phase = done",
        "priority = \"x\"",
        "priority = x",
        "priority = 99999999999",
        "created_at = \"not a time\"",
        "updated_at > 2024-01-01",
        "status active",
        "status =",
        "status:active",
        "(kind = x",
        "kind = x)",
        "()",
        "kind = x AND",
        "NOT",
        "kind = \"unterminated",
        "kind = \"bad \\escape\"",
        "kind = x = y",
        &too_long,
        &too_deep,
        &too_many,
    ];
    for text in invalid {
        match filter::parse(text) {
            Err(e @ Error::InvalidArgument { .. }) => {
                assert_eq!(e.field(), Some("filter"), "{text:?}");
                assert_eq!(e.reason(), "INVALID_ARGUMENT");
                assert!(e.to_string().starts_with("invalid filter: at "), "{e}");
            }
            other => panic!("{text:?} should be invalid, got {other:?}"),
        }
    }
}
