//! Client and messaging spans, named and attributed by the OpenTelemetry semantic
//! conventions (1.42), with `db.client.operation.duration` recorded beside each
//! client span.
//!
//! - A Postgres statement or a Redis command is a CLIENT span named by its query
//!   summary (`UPDATE task_heads`), with `db.system.name`, `db.operation.name` (the
//!   summary's first word) and `db.query.summary`.
//! - None of these spans is created when no spans are exported: they would cost every
//!   statement a span for nothing.
//! - Publishing updates to the bus is a PRODUCER span (`publish tasks`); consuming one
//!   is a CONSUMER span (`process <channel>`) linked to, and a child of, the context
//!   that created the message.

use std::time::Instant;

use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use super::context;
use super::metrics::metrics;
use super::traces_exported;

/// The target of the spans that exist only to be exported: created only when spans are
/// exported, and kept out of log lines (a statement's span would prefix every line
/// logged inside it).
pub const TARGET: &str = "otel";

/// `db.system.name` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbSystem {
    Postgres,
    Redis,
}

impl DbSystem {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgresql",
            Self::Redis => "redis",
        }
    }
}

/// The operation a query summary starts with (`SELECT tasks` -> `SELECT`).
pub fn operation_of(summary: &'static str) -> &'static str {
    summary.split(' ').next().unwrap_or(summary)
}

/// A CLIENT span for one database call; `summary` is low-cardinality by construction
/// (a literal at each call site).
pub fn db_span(system: DbSystem, summary: &'static str) -> Span {
    if !traces_exported() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "db",
        otel.name = summary,
        otel.kind = "client",
        otel.status_code = Empty,
        db.system.name = system.name(),
        db.operation.name = operation_of(summary),
        db.query.summary = summary,
        db.response.status_code = Empty,
        error.type = Empty,
    )
}

/// Runs one database call inside its client span and records its duration. On an
/// error, `classify` names it for `error.type` and `db.response.status_code` (a
/// SQLSTATE, when the server answered).
pub async fn db_call<T, E>(
    system: DbSystem,
    summary: &'static str,
    call: impl Future<Output = Result<T, E>>,
    classify: impl FnOnce(&E) -> (String, Option<String>),
) -> Result<T, E> {
    let span = db_span(system, summary);
    let start = Instant::now();
    let result = call.instrument(span.clone()).await;
    let seconds = start.elapsed().as_secs_f64();
    let _in_span = span.enter();
    metrics().db_operation(system.name(), operation_of(summary), summary, seconds);
    if let Err(e) = &result {
        let (error_type, code) = classify(e);
        span.record("otel.status_code", "ERROR");
        span.record("error.type", error_type);
        if let Some(code) = code {
            span.record("db.response.status_code", code);
        }
    }
    result
}

/// The PRODUCER span of one publish of `count` updates.
pub fn publish_span(count: usize) -> Span {
    if !traces_exported() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "publish",
        otel.name = "publish tasks",
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = "tasks",
        messaging.batch.message_count = count,
        error.type = Empty,
    )
}

/// Where a consumed update came from; names the CONSUMER span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// `task:{id}` channels, or a WatchTask stream's own reads.
    Task,
    /// `partition:{p}` channels: a worker's wake-ups.
    Partition,
    /// The `tasks` channel, or a WatchTasks stream's change feed.
    Tasks,
}

impl Destination {
    fn name(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Partition => "partition",
            Self::Tasks => "tasks",
        }
    }

    fn span_name(self) -> &'static str {
        match self {
            Self::Task => "process task",
            Self::Partition => "process partition",
            Self::Tasks => "process tasks",
        }
    }
}

/// The CONSUMER span of processing one update of `task_id` from `from`, continuing
/// and linking the trace the update was created in.
pub fn process_span(from: Destination, task_id: &str, traceparent: Option<&str>) -> Span {
    if !traces_exported() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = from.span_name(),
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = from.name(),
        task_id,
    );
    context::continue_trace(&span, traceparent);
    context::link(&span, traceparent);
    span
}
