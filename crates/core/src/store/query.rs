//! Reads: one task, keyset pages of tasks, counts, and a task's stream.
//!
//! Pages are keyset pages over `(sort_key, task_id)`: a row present and unchanged
//! during a whole scan is returned exactly once; a row whose sort key changes during the
//! scan (only `updated_at` can) may be returned twice or not at all.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use tracing::instrument;

use super::Store;
use super::errors::{corrupt, from_sqlx};
use super::rows::{TaskRow, state_columns, task_columns, task_columns_basic};
use super::traced::Traced as _;
use crate::domain::filter::{FilterExpr, FilterField, FilterValue};
use crate::domain::{Event, EventMetadata, Phase, Status, Task, TaskId, TaskState};
use crate::error::Error;

/// Page size when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Larger requests are clamped to this.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Normalises a requested page size the AIP-158 way: 0 means the default, above the
/// maximum is clamped, negative is invalid.
///
/// # Errors
/// [`Error::InvalidArgument`] on `page_size` when negative.
pub fn page_size(requested: i64) -> Result<usize, Error> {
    match requested {
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u64).min(MAX_PAGE_SIZE as u64) as usize),
    }
}

/// Filters for ListTasks and CountTasks; every set field must match (AND), a list field
/// matches any of its values (OR).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    pub statuses: Vec<Status>,
    pub phases: Vec<Phase>,
    pub kinds: Vec<String>,
    pub created_by: Option<String>,
    /// Strictly after.
    pub created_after: Option<DateTime<Utc>>,
    pub priority_min: Option<i32>,
    pub priority_max: Option<i32>,
    /// An AIP-160 filter ([`crate::domain::filter::parse`]), ANDed with the fields above.
    pub expr: Option<FilterExpr>,
}

impl TaskFilter {
    /// Whether `task` matches, with the same meaning as the SQL [`Store::list_tasks`]
    /// and [`Store::count_tasks`] run (for watch streams and tests).
    pub fn matches(&self, task: &Task) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&task.status))
            && (self.phases.is_empty() || self.phases.contains(&task.phase))
            && (self.kinds.is_empty() || self.kinds.contains(&task.kind))
            && self
                .created_by
                .as_ref()
                .is_none_or(|by| *by == task.created_by)
            && self
                .created_after
                .is_none_or(|after| task.created_at > after)
            && self.priority_min.is_none_or(|min| task.priority >= min)
            && self.priority_max.is_none_or(|max| task.priority <= max)
            && self.expr.as_ref().is_none_or(|e| e.matches(task))
    }

    /// The statuses a task this filter matches can have, in declaration order: those it
    /// allows whose phases (see [`Status::holds_phase`]) leave the filter possibly true.
    /// A listing walks one index range per status, and a range that cannot match would
    /// be read to its end.
    pub fn possible_statuses(&self) -> Vec<Status> {
        Status::ALL
            .iter()
            .copied()
            .filter(|status| self.statuses.is_empty() || self.statuses.contains(status))
            .filter(|status| {
                Phase::ALL.iter().any(|phase| {
                    status.holds_phase(*phase)
                        && (self.phases.is_empty() || self.phases.contains(phase))
                        && self
                            .expr
                            .as_ref()
                            .is_none_or(|e| e.decided_by(*status, *phase) != Some(false))
                })
            })
            .collect()
    }

    /// Whether the filter names only fields a task never changes (kind, creator,
    /// creation time, priority): then a task that does not match now never matched,
    /// and a watch stream need not look at its past to know.
    pub fn fixed_per_task(&self) -> bool {
        self.statuses.is_empty()
            && self.phases.is_empty()
            && self.expr.as_ref().is_none_or(|e| {
                [
                    FilterField::Status,
                    FilterField::Phase,
                    FilterField::UpdatedAt,
                ]
                .into_iter()
                .all(|f| !e.mentions(f))
            })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortField {
    CreatedAt,
    /// The last lifecycle change.
    #[default]
    UpdatedAt,
    Priority,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortDirection {
    Asc,
    #[default]
    Desc,
}

/// The order of a listing; ties are broken by task id in the same direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskOrder {
    pub field: SortField,
    pub direction: SortDirection,
}

/// A sort key value, typed by the field it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    Time(DateTime<Utc>),
    Priority(i32),
}

/// Where a page ends: the last row's sort key and id. The next page starts after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub key: SortKey,
    pub task_id: TaskId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: TaskFilter,
    pub order: TaskOrder,
    /// As the caller sent it; see [`page_size`].
    pub page_size: i64,
    pub after: Option<Cursor>,
    pub view: View,
}

/// How much of each task a read returns (AIP-157).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Every field.
    #[default]
    Full,
    /// Without payload and description (empty and null): what a listing shows. They
    /// are the two large fields, and not read from the table at all.
    Basic,
}

impl Cursor {
    /// The cursor that continues a scan in `order` right after `task`: how a page cut
    /// short (by bytes) ends.
    pub fn after(order: TaskOrder, task: &Task) -> Self {
        Self {
            key: sort_key(order.field, task),
            task_id: task.task_id,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub tasks: Vec<Task>,
    /// `None` only when this is the last page.
    pub next: Option<Cursor>,
}

/// One stored event with its position and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    pub task_id: TaskId,
    pub version: i64,
    pub event: Event,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// An `events` row as stored: the event from its type and data, the metadata from
    /// its JSON.
    ///
    /// # Errors
    /// [`Error::Internal`] for a row that does not decode.
    pub(super) fn decode(
        task_id: TaskId,
        version: i64,
        ty: &str,
        data: serde_json::Value,
        metadata: serde_json::Value,
        recorded_at: DateTime<Utc>,
    ) -> Result<Self, Error> {
        Ok(Self {
            task_id,
            version,
            event: Event::from_parts(ty, data).map_err(corrupt)?,
            metadata: serde_json::from_value(metadata).map_err(corrupt)?,
            recorded_at,
        })
    }
}

impl Store {
    /// Reads one task: the listing row and the head, as committed.
    ///
    /// # Errors
    /// [`Error::TaskNotFound`]; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id))]
    pub async fn get_task(&self, task_id: TaskId) -> Result<Task, Error> {
        let row: Option<TaskRow> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t JOIN task_heads h ON h.task_id = t.task_id WHERE t.task_id = $1"
        ))
        .bind(task_id.as_uuid())
        .fetch_optional(&self.pool)
        .traced("SELECT tasks task_heads")
        .await
        .map_err(from_sqlx)?;
        row.ok_or(Error::TaskNotFound(task_id))?.try_into()
    }

    /// Reads the state the state table decides on, without locking.
    ///
    /// # Errors
    /// [`Error::TaskNotFound`]; [`Error::StoreUnavailable`].
    pub async fn state(&self, task_id: TaskId) -> Result<TaskState, Error> {
        let row: Option<super::rows::StateRow> = sqlx::query_as(concat!(
            "SELECT ",
            state_columns!(),
            " FROM task_heads h JOIN tasks t ON t.task_id = h.task_id WHERE h.task_id = $1"
        ))
        .bind(task_id.as_uuid())
        .fetch_optional(&self.pool)
        .traced("SELECT task_heads tasks")
        .await
        .map_err(from_sqlx)?;
        row.ok_or(Error::TaskNotFound(task_id))?.try_into()
    }

    /// Lists one keyset page.
    ///
    /// The listing row has no plain ordering index: a page is a merge of one ordered
    /// walk per status the filter lets through (`(status, sort_key, task_id)` indexes),
    /// each a branch of a `UNION ALL` that Postgres reads as a Merge Append, so a page
    /// reads about as many rows as it returns. Three fewer indexes on the listing row is
    /// three fewer entries written on every create and lifecycle change
    /// (docs/architecture.md, "Listing indexes").
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a negative page size or a cursor of another
    /// ordering; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(order = ?query.order, page_size = query.page_size))]
    pub async fn list_tasks(&self, query: &ListQuery) -> Result<Page, Error> {
        let limit = page_size(query.page_size)?;
        let (column, dir, cmp) = order_sql(query.order);
        let after = match query.after {
            None => None,
            Some(cursor) => match (query.order.field, cursor.key) {
                (SortField::CreatedAt | SortField::UpdatedAt, SortKey::Time(_))
                | (SortField::Priority, SortKey::Priority(_)) => Some(cursor),
                _ => {
                    return Err(Error::invalid(
                        "page_token",
                        "it belongs to another ordering",
                    ));
                }
            },
        };
        let statuses = query.filter.possible_statuses();
        if statuses.is_empty() {
            return Ok(Page {
                tasks: Vec::new(),
                next: None,
            });
        }
        // Each branch fixes its status, so the filter's own status list is redundant there.
        let branch_filter = TaskFilter {
            statuses: Vec::new(),
            ..query.filter.clone()
        };
        let mut qb = QueryBuilder::new(format!("SELECT {} FROM (", columns(query.view)));
        for (i, status) in statuses.iter().enumerate() {
            if i > 0 {
                qb.push(" UNION ALL ");
            }
            // A literal from the enum's fixed spelling, so each branch is planned for
            // its own status.
            qb.push(format_args!(
                "(SELECT * FROM tasks t WHERE t.status = '{}'",
                status.as_str()
            ));
            push_filter(&mut qb, &branch_filter);
            if let Some(cursor) = &after {
                qb.push(format_args!(" AND ({column}, t.task_id) {cmp} ("));
                match cursor.key {
                    SortKey::Time(t) => qb.push_bind(t),
                    SortKey::Priority(p) => qb.push_bind(p),
                };
                qb.push(", ").push_bind(cursor.task_id.as_uuid()).push(")");
            }
            // Ordered and limited in the branch: a branch with a WHERE is planned as a
            // subquery of its own, which offers its index order only when it is asked
            // for one. The Merge Append reads the branches lazily, so the limits bound
            // them without making each read a whole page.
            qb.push(format_args!(
                " ORDER BY {column} {dir}, t.task_id {dir} LIMIT "
            ))
            .push_bind((limit + 1) as i64)
            .push(")");
        }
        qb.push(format_args!(
            ") t JOIN task_heads h ON h.task_id = t.task_id \
             ORDER BY {column} {dir}, t.task_id {dir} LIMIT "
        ))
        .push_bind((limit + 1) as i64);

        let rows: Vec<TaskRow> = qb
            .build_query_as()
            .fetch_all(&self.pool)
            .traced("SELECT tasks task_heads")
            .await
            .map_err(from_sqlx)?;
        let mut tasks = rows
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|t| Cursor {
                key: sort_key(query.order.field, t),
                task_id: t.task_id,
            })
        } else {
            None
        };
        Ok(Page { tasks, next })
    }

    /// Counts the tasks a filter matches.
    ///
    /// # Errors
    /// [`Error::StoreUnavailable`].
    #[instrument(skip_all)]
    pub async fn count_tasks(&self, filter: &TaskFilter) -> Result<i64, Error> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT count(*) FROM tasks t WHERE TRUE");
        push_filter(&mut qb, filter);
        qb.build_query_scalar()
            .fetch_one(&self.pool)
            .traced("SELECT tasks")
            .await
            .map_err(from_sqlx)
    }

    /// Reads up to `limit` events of a task's stream from `from_version` (inclusive).
    /// A version below 1 reads from the start.
    ///
    /// # Errors
    /// [`Error::TaskNotFound`] when the task does not exist; [`Error::StoreUnavailable`].
    #[instrument(skip_all, fields(task.id = %task_id, from_version, limit))]
    pub async fn read_stream(
        &self,
        task_id: TaskId,
        from_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        type Row = (
            i64,
            String,
            serde_json::Value,
            serde_json::Value,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT version, type, data, metadata, recorded_at FROM events \
             WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3",
        )
        .bind(task_id.as_uuid())
        .bind(from_version.max(1))
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .traced("SELECT events")
        .await
        .map_err(from_sqlx)?;
        if rows.is_empty() {
            // Distinguish "nothing newer" from "no such task".
            self.state(task_id).await?;
        }
        rows.into_iter()
            .map(|(version, ty, data, metadata, recorded_at)| {
                RecordedEvent::decode(task_id, version, &ty, data, metadata, recorded_at)
            })
            .collect()
    }
}

fn order_sql(order: TaskOrder) -> (&'static str, &'static str, &'static str) {
    let column = match order.field {
        SortField::CreatedAt => "t.created_at",
        SortField::UpdatedAt => "t.updated_at",
        SortField::Priority => "t.priority",
    };
    match order.direction {
        SortDirection::Asc => (column, "ASC", ">"),
        SortDirection::Desc => (column, "DESC", "<"),
    }
}

fn sort_key(field: SortField, task: &Task) -> SortKey {
    match field {
        SortField::CreatedAt => SortKey::Time(task.created_at),
        SortField::UpdatedAt => SortKey::Time(task.updated_at),
        SortField::Priority => SortKey::Priority(task.priority),
    }
}

/// A view's task columns, of `tasks t` and `task_heads h`.
fn columns(view: View) -> &'static str {
    match view {
        View::Full => task_columns!(),
        View::Basic => task_columns_basic!(),
    }
}

/// `SELECT` of a view's task columns from `tasks t JOIN task_heads h`, ready for
/// ` AND ...` conditions.
pub(super) fn select_tasks(view: View) -> QueryBuilder<Postgres> {
    QueryBuilder::new(format!(
        "SELECT {} FROM tasks t JOIN task_heads h ON h.task_id = t.task_id WHERE TRUE",
        columns(view)
    ))
}

pub(super) fn push_filter(qb: &mut QueryBuilder<Postgres>, f: &TaskFilter) {
    if !f.statuses.is_empty() {
        let v: Vec<&str> = f.statuses.iter().map(Status::as_str).collect();
        qb.push(" AND t.status = ANY(").push_bind(v).push(")");
    }
    if !f.phases.is_empty() {
        let v: Vec<&str> = f.phases.iter().map(Phase::as_str).collect();
        qb.push(" AND t.phase = ANY(").push_bind(v).push(")");
    }
    if !f.kinds.is_empty() {
        qb.push(" AND t.kind = ANY(")
            .push_bind(f.kinds.clone())
            .push(")");
    }
    if let Some(by) = &f.created_by {
        qb.push(" AND t.created_by = ").push_bind(by.clone());
    }
    if let Some(after) = f.created_after {
        qb.push(" AND t.created_at > ").push_bind(after);
    }
    if let Some(min) = f.priority_min {
        qb.push(" AND t.priority >= ").push_bind(min);
    }
    if let Some(max) = f.priority_max {
        qb.push(" AND t.priority <= ").push_bind(max);
    }
    if let Some(expr) = &f.expr {
        qb.push(" AND ");
        push_expr(qb, expr);
    }
}

/// Compiles a filter expression to SQL over `tasks t`. Values are always bound; column
/// names and operators come from fixed tables. Every column is NOT NULL, so SQL's
/// three-valued logic never differs from [`FilterExpr::matches`]; an ill-typed
/// comparison (which `parse` never builds) is `FALSE`, as it is in memory.
fn push_expr(qb: &mut QueryBuilder<Postgres>, expr: &FilterExpr) {
    match expr {
        FilterExpr::And(items) => push_junction(qb, items, " AND ", "TRUE"),
        FilterExpr::Or(items) => push_junction(qb, items, " OR ", "FALSE"),
        FilterExpr::Not(inner) => {
            qb.push("(NOT ");
            push_expr(qb, inner);
            qb.push(")");
        }
        FilterExpr::Compare { field, op, value } => {
            if !field.allows(*op) || !field.accepts(value) {
                qb.push("FALSE");
                return;
            }
            let column = match field {
                FilterField::Status => "t.status",
                FilterField::Phase => "t.phase",
                FilterField::Kind => "t.kind",
                FilterField::CreatedBy => "t.created_by",
                FilterField::CreatedAt => "t.created_at",
                FilterField::UpdatedAt => "t.updated_at",
                FilterField::Priority => "t.priority",
            };
            qb.push(format_args!("({column} {} ", op.as_str()));
            match value {
                FilterValue::Status(s) => qb.push_bind(s.as_str()),
                FilterValue::Phase(p) => qb.push_bind(p.as_str()),
                FilterValue::Text(s) => qb.push_bind(s.clone()),
                FilterValue::Time(t) => qb.push_bind(*t),
                FilterValue::Int(i) => qb.push_bind(*i),
            };
            qb.push(")");
        }
    }
}

fn push_junction(
    qb: &mut QueryBuilder<Postgres>,
    items: &[FilterExpr],
    separator: &str,
    empty: &str,
) {
    if items.is_empty() {
        qb.push(empty);
        return;
    }
    qb.push("(");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            qb.push(separator);
        }
        push_expr(qb, item);
    }
    qb.push(")");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::filter::parse;

    fn statuses(filter: &str) -> Vec<Status> {
        TaskFilter {
            expr: parse(filter).expect("a valid filter"),
            ..TaskFilter::default()
        }
        .possible_statuses()
    }

    #[test]
    fn a_listing_walks_only_the_statuses_a_match_can_have() {
        use Status::*;
        assert_eq!(TaskFilter::default().possible_statuses(), Status::ALL);
        assert_eq!(statuses("kind = x OR priority > 2"), Status::ALL);
        assert_eq!(statuses("phase = review"), [Inactive, Active]);
        assert_eq!(statuses("phase = cancelled"), [Cancelled]);
        assert_eq!(
            statuses("phase != completed"),
            [Inactive, Active, Cancelled, Failed]
        );
        assert_eq!(
            statuses("status = active OR phase = failed"),
            [Active, Failed]
        );
        assert_eq!(
            statuses("NOT status = active kind = x"),
            [Inactive, Completed, Cancelled, Failed]
        );
        assert_eq!(statuses("status = completed phase = review"), []);
        let fields = TaskFilter {
            statuses: vec![Failed, Active],
            phases: vec![Phase::Failed, Phase::Completed],
            ..TaskFilter::default()
        };
        assert_eq!(fields.possible_statuses(), [Failed]);
    }
}
