//! Every metric taskpod records, each defined once, seen two ways.
//!
//! - **`/metrics`** (OpenMetrics text, [`super::exposition`]): the process's own
//!   registry, with a `trace_id` exemplar on every latency histogram bucket, so a p99
//!   spike in Grafana opens the trace that caused it in Tempo.
//! - **OTLP**, when an endpoint is configured ([`Metrics::attach`]): the same
//!   measurements as OpenTelemetry instruments named by the semantic conventions.
//!
//! Both, because the OpenTelemetry Rust SDK does not sample exemplars (its data points
//! carry none), and a Prometheus scrape is where exemplars survive. Each recording
//! method writes both views from one call site, so they cannot drift; the names match
//! once the collector or Prometheus translates OTLP names (`rpc.server.call.duration`
//! in seconds is `rpc_server_call_duration_seconds` in both).
//!
//! Labels are bounded: method names come from a fixed list, node names from the
//! configuration, kinds from the cluster contract. `task_id` is never a label; it is a
//! span attribute.

use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter as OtelCounter, Gauge as OtelGauge, Histogram, Meter, UpDownCounter,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::context::sampled_trace_id;

/// Seconds, from a fast GetTask (well under a millisecond) to a slow statement.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
/// Seconds from creation to a terminal status: a `sleep` demo to a day-long review.
const TASK_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0,
];
/// Seconds from noticing a dead peer to its pods running here.
const FAILOVER_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];

/// Which process a registry is for: each serves only the metrics it records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
    /// Everything (tests, tools).
    All,
}

/// What an exemplar carries: Grafana's Prometheus data source finds the trace by it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;
type Latencies<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc_system_name: &'static str,
    rpc_method: &'static str,
    rpc_response_status_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DbLabels {
    db_system_name: &'static str,
    db_operation_name: &'static str,
    db_query_summary: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    status: &'static str,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CrashLabels {
    node: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriterLabels {
    writer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    service: String,
}

fn latency() -> LatencyHistogram {
    HistogramWithExemplars::new(LATENCY_BUCKETS.iter().copied())
}

fn task_latency() -> LatencyHistogram {
    HistogramWithExemplars::new(TASK_BUCKETS.iter().copied())
}

fn failover_latency() -> LatencyHistogram {
    HistogramWithExemplars::new(FAILOVER_BUCKETS.iter().copied())
}

/// The process's metrics; [`metrics`] is the one instance.
#[derive(Debug)]
pub struct Metrics {
    rpc_duration: Latencies<RpcLabels>,
    db_duration: Latencies<DbLabels>,
    event_append: Latencies<WriterLabels>,
    tasks_created: Family<KindLabels, Counter>,
    tasks_finished: Family<FinishedLabels, Counter>,
    task_duration: Latencies<FinishedLabels>,
    pods_running: Family<NodeLabels, Gauge>,
    partitions_owned: Family<NodeLabels, Gauge>,
    pods_unplaceable: Family<NodeLabels, Gauge>,
    pods_pending: Gauge,
    pods_pending_oldest: Gauge<f64, AtomicU64>,
    change_feed_lag: Gauge<f64, AtomicU64>,
    pod_crashes: Family<CrashLabels, Counter>,
    pod_restarts: Family<NodeLabels, Counter>,
    failover_adoption: Latencies<NodeLabels>,
    watch_streams: Family<StreamLabels, Gauge>,
    watch_tracked: Gauge,
    watch_lag: LatencyHistogram,
    bus_publish_failures: Counter,
    bus_publishes_dropped: Family<ReasonLabels, Counter>,
    bus_subscriptions_lost: Family<CauseLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    /// The OTLP view; unset while nothing exports metrics.
    otel: OnceLock<Otel>,
}

/// The OpenTelemetry instruments behind the OTLP view.
#[derive(Debug)]
struct Otel {
    rpc_duration: Histogram<f64>,
    db_duration: Histogram<f64>,
    event_append: Histogram<f64>,
    tasks_created: OtelCounter<u64>,
    tasks_finished: OtelCounter<u64>,
    task_duration: Histogram<f64>,
    pods_running: OtelGauge<i64>,
    partitions_owned: OtelGauge<i64>,
    pods_unplaceable: OtelGauge<i64>,
    pods_pending: OtelGauge<i64>,
    pods_pending_oldest: OtelGauge<f64>,
    change_feed_lag: OtelGauge<f64>,
    pod_crashes: OtelCounter<u64>,
    pod_restarts: OtelCounter<u64>,
    failover_adoption: Histogram<f64>,
    watch_streams: UpDownCounter<i64>,
    watch_tracked: UpDownCounter<i64>,
    watch_lag: Histogram<f64>,
    bus_publish_failures: OtelCounter<u64>,
    bus_publishes_dropped: OtelCounter<u64>,
    bus_subscriptions_lost: OtelCounter<u64>,
    build_info: OtelGauge<i64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics. Global like a logger: the store, the bus and the servers
/// all record into it, and a handle threaded through every constructor would say
/// nothing more.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

fn exemplar() -> Option<TraceExemplar> {
    sampled_trace_id().map(|trace_id| TraceExemplar { trace_id })
}

impl Metrics {
    fn new() -> Self {
        Self {
            rpc_duration: Family::new_with_constructor(latency),
            db_duration: Family::new_with_constructor(latency),
            event_append: Family::new_with_constructor(latency),
            tasks_created: Family::default(),
            tasks_finished: Family::default(),
            task_duration: Family::new_with_constructor(task_latency),
            pods_running: Family::default(),
            partitions_owned: Family::default(),
            pods_unplaceable: Family::default(),
            pods_pending: Gauge::default(),
            pods_pending_oldest: Gauge::default(),
            change_feed_lag: Gauge::default(),
            pod_crashes: Family::default(),
            pod_restarts: Family::default(),
            failover_adoption: Family::new_with_constructor(failover_latency),
            watch_streams: Family::default(),
            watch_tracked: Gauge::default(),
            watch_lag: latency(),
            bus_publish_failures: Counter::default(),
            bus_publishes_dropped: Family::default(),
            bus_subscriptions_lost: Family::default(),
            build_info: Family::default(),
            otel: OnceLock::new(),
        }
    }

    /// Starts the OTLP view on `meter` (once; later calls are ignored) and records
    /// `taskpod_build_info` for `service`.
    pub fn attach(&self, meter: Option<&Meter>, service: &str) {
        let version = env!("CARGO_PKG_VERSION");
        self.build_info
            .get_or_create(&BuildLabels {
                version,
                service: service.to_owned(),
            })
            .set(1);
        if let Some(meter) = meter {
            let otel = self.otel.get_or_init(|| Otel::new(meter));
            otel.build_info.record(
                1,
                &[
                    KeyValue::new("version", version),
                    KeyValue::new("service", service.to_owned()),
                ],
            );
        }
    }

    /// Creates at 0 every series a fresh `role` process can name before anything has
    /// happened: each kind's tasks created and finished (by terminal status), the
    /// appends of its writers, the watch streams, and a worker `node`'s crashes by cause,
    /// restarts and failovers. A dashboard's rate then reads 0 rather than "No data"
    /// until the first event. Histograms get their series on `/metrics` only: an OTLP
    /// histogram has no data point without an observation.
    pub fn known_series(&self, role: Role, node: Option<&str>) {
        let otel = self.otel.get();
        let terminal = || {
            crate::domain::Status::ALL
                .iter()
                .filter(|s| s.is_terminal())
        };
        for kind in crate::domain::KINDS.iter().map(|k| (*k).to_owned()) {
            if role != Role::Worker {
                drop(
                    self.tasks_created
                        .get_or_create(&KindLabels { kind: kind.clone() }),
                );
                if let Some(o) = otel {
                    o.tasks_created
                        .add(0, &[KeyValue::new("kind", kind.clone())]);
                }
            }
            for status in terminal().map(crate::domain::Status::as_str) {
                let labels = FinishedLabels {
                    status,
                    kind: kind.clone(),
                };
                drop(self.tasks_finished.get_or_create(&labels));
                drop(self.task_duration.get_or_create(&labels));
                if let Some(o) = otel {
                    let attrs = [
                        KeyValue::new("status", status),
                        KeyValue::new("kind", kind.clone()),
                    ];
                    o.tasks_finished.add(0, &attrs);
                }
            }
        }
        let writers: &[&'static str] = match role {
            Role::Api => &["api"],
            Role::Worker => &["pod", "worker"],
            Role::All => &["api", "pod", "worker"],
        };
        for writer in writers {
            drop(self.event_append.get_or_create(&WriterLabels { writer }));
        }
        if role != Role::Worker {
            self.add_watch_stream("task", 0);
            self.add_watch_stream("tasks", 0);
        }
        if let Some(node) = node.filter(|_| role != Role::Api) {
            self.known_node_series(node);
        }
        if let Some(o) = otel {
            o.bus_publish_failures.add(0, &[]);
        }
    }

    /// A worker node's crashes by cause, restarts and failovers, at 0.
    fn known_node_series(&self, node: &str) {
        let labels = NodeLabels {
            node: node.to_owned(),
        };
        drop(self.pod_restarts.get_or_create(&labels));
        drop(self.failover_adoption.get_or_create(&labels));
        let otel = self.otel.get();
        if let Some(o) = otel {
            o.pod_restarts
                .add(0, &[KeyValue::new("node", node.to_owned())]);
        }
        for cause in crate::domain::restart::CrashKind::ALL
            .iter()
            .map(|c| c.as_str())
        {
            drop(self.pod_crashes.get_or_create(&CrashLabels {
                node: node.to_owned(),
                cause,
            }));
            if let Some(o) = otel {
                let attrs = [
                    KeyValue::new("node", node.to_owned()),
                    KeyValue::new("cause", cause),
                ];
                o.pod_crashes.add(0, &attrs);
            }
        }
    }

    /// The registry `/metrics` serves for `role`.
    pub fn registry(&self, role: Role) -> Registry {
        let mut r = Registry::default();
        let api = matches!(role, Role::Api | Role::All);
        let worker = matches!(role, Role::Worker | Role::All);
        r.register(
            "taskpod_build_info",
            "Version of the running binary",
            self.build_info.clone(),
        );
        r.register_with_unit(
            "db_client_operation_duration",
            "Duration of Postgres statements and Redis commands",
            Unit::Seconds,
            self.db_duration.clone(),
        );
        r.register_with_unit(
            "taskpod_event_append",
            "Duration of the transactions that append events, by writer",
            Unit::Seconds,
            self.event_append.clone(),
        );
        r.register(
            "taskpod_tasks_finished",
            "Tasks that reached a terminal status",
            self.tasks_finished.clone(),
        );
        r.register_with_unit(
            "taskpod_task_duration",
            "Time from a task's creation to its terminal status",
            Unit::Seconds,
            self.task_duration.clone(),
        );
        r.register_with_unit(
            "taskpod_change_feed_lag",
            "How long the oldest open writing transaction of taskpod's database has held \
             the change feed's watermark (0 when none is open)",
            Unit::Seconds,
            self.change_feed_lag.clone(),
        );
        r.register(
            "taskpod_bus_publish_failures",
            "Attempts to reach Redis to publish (connects, round trips) that failed",
            self.bus_publish_failures.clone(),
        );
        r.register(
            "taskpod_bus_publishes_dropped",
            "Updates never published (readers repair from Postgres), by reason",
            self.bus_publishes_dropped.clone(),
        );
        r.register(
            "taskpod_bus_subscriptions_lost",
            "Subscription connections found dead and replaced, by cause",
            self.bus_subscriptions_lost.clone(),
        );
        if api {
            r.register_with_unit(
                "rpc_server_call_duration",
                "Duration of gRPC calls as the server saw them",
                Unit::Seconds,
                self.rpc_duration.clone(),
            );
            r.register(
                "taskpod_tasks_created",
                "Tasks created",
                self.tasks_created.clone(),
            );
            r.register(
                "taskpod_watch_streams",
                "Watch streams open on this replica",
                self.watch_streams.clone(),
            );
            r.register(
                "taskpod_watch_tracked",
                "Tasks the WatchTasks streams on this replica follow (the entries they keep)",
                self.watch_tracked.clone(),
            );
            r.register_with_unit(
                "taskpod_watch_lag",
                "Time from a change's commit to its delivery on a watch stream",
                Unit::Seconds,
                self.watch_lag.clone(),
            );
        }
        if worker {
            r.register(
                "taskpod_pods_running",
                "Pods this node runs",
                self.pods_running.clone(),
            );
            r.register(
                "taskpod_partitions_owned",
                "Partitions this node owns",
                self.partitions_owned.clone(),
            );
            r.register(
                "taskpod_pods_unplaceable",
                "Active tasks of this node's partitions whose kind or program it cannot run",
                self.pods_unplaceable.clone(),
            );
            r.register(
                "taskpod_pods_pending",
                "Tasks active without a running pod, cluster-wide",
                self.pods_pending.clone(),
            );
            r.register(
                "taskpod_pods_pending_oldest_seconds",
                "How long the oldest task active without a running pod has waited",
                self.pods_pending_oldest.clone(),
            );
            r.register(
                "taskpod_pod_crashes",
                "Pod crashes recorded, by cause",
                self.pod_crashes.clone(),
            );
            r.register(
                "taskpod_pod_restarts",
                "Pods started again after a crash",
                self.pod_restarts.clone(),
            );
            r.register_with_unit(
                "taskpod_failover_adoption",
                "Time from noticing a dead peer to one of its pods running here",
                Unit::Seconds,
                self.failover_adoption.clone(),
            );
        }
        r
    }

    /// A gRPC call ended; `method` is fully qualified (`taskpod.v1.TaskService/GetTask`)
    /// or `_OTHER`, `code` the gRPC code name.
    pub fn rpc_call(&self, method: &'static str, code: &'static str, seconds: f64) {
        self.rpc_duration
            .get_or_create(&RpcLabels {
                rpc_system_name: "grpc",
                rpc_method: method,
                rpc_response_status_code: code,
            })
            .observe(seconds, exemplar(), None);
        if let Some(o) = self.otel.get() {
            o.rpc_duration.record(
                seconds,
                &[
                    KeyValue::new("rpc.system.name", "grpc"),
                    KeyValue::new("rpc.method", method),
                    KeyValue::new("rpc.response.status_code", code),
                ],
            );
        }
    }

    /// A database or Redis operation ended (see `db.client.operation.duration`).
    pub fn db_operation(
        &self,
        system: &'static str,
        operation: &'static str,
        summary: &'static str,
        seconds: f64,
    ) {
        self.db_duration
            .get_or_create(&DbLabels {
                db_system_name: system,
                db_operation_name: operation,
                db_query_summary: summary,
            })
            .observe(seconds, exemplar(), None);
        if let Some(o) = self.otel.get() {
            o.db_duration.record(
                seconds,
                &[
                    KeyValue::new("db.system.name", system),
                    KeyValue::new("db.operation.name", operation),
                    KeyValue::new("db.query.summary", summary),
                ],
            );
        }
    }

    /// A transaction that appended events committed; `writer` is `api`, `pod` or
    /// `worker`.
    pub fn event_append(&self, writer: &'static str, seconds: f64) {
        self.event_append
            .get_or_create(&WriterLabels { writer })
            .observe(seconds, exemplar(), None);
        if let Some(o) = self.otel.get() {
            o.event_append
                .record(seconds, &[KeyValue::new("writer", writer)]);
        }
    }

    pub fn tasks_created(&self, kind: &str, count: u64) {
        self.tasks_created
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc_by(count);
        if let Some(o) = self.otel.get() {
            o.tasks_created
                .add(count, &[KeyValue::new("kind", kind.to_owned())]);
        }
    }

    /// A task reached `status` (`completed`, `cancelled`, `failed`) `seconds` after
    /// it was created.
    pub fn task_finished(&self, status: &'static str, kind: &str, seconds: f64) {
        let labels = FinishedLabels {
            status,
            kind: kind.to_owned(),
        };
        self.tasks_finished.get_or_create(&labels).inc();
        self.task_duration
            .get_or_create(&labels)
            .observe(seconds, exemplar(), None);
        if let Some(o) = self.otel.get() {
            let attrs = [
                KeyValue::new("status", status),
                KeyValue::new("kind", kind.to_owned()),
            ];
            o.tasks_finished.add(1, &attrs);
            o.task_duration.record(seconds, &attrs);
        }
    }

    /// The node's pods and partitions now.
    pub fn node_load(&self, node: &str, pods: i64, partitions: i64) {
        let labels = NodeLabels {
            node: node.to_owned(),
        };
        self.pods_running.get_or_create(&labels).set(pods);
        self.partitions_owned.get_or_create(&labels).set(partitions);
        if let Some(o) = self.otel.get() {
            let attrs = [KeyValue::new("node", node.to_owned())];
            o.pods_running.record(pods, &attrs);
            o.partitions_owned.record(partitions, &attrs);
        }
    }

    /// Active tasks of this node's partitions that wait for a node that can run their
    /// kind or program (a rolling deploy), as its last check counted them.
    pub fn pods_unplaceable(&self, node: &str, count: i64) {
        self.pods_unplaceable
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .set(count);
        if let Some(o) = self.otel.get() {
            o.pods_unplaceable
                .record(count, &[KeyValue::new("node", node.to_owned())]);
        }
    }

    /// How long the oldest open writing transaction of the database has held the change
    /// feed's watermark, as the last read of the watermark saw it.
    pub fn change_feed_lag(&self, seconds: f64) {
        self.change_feed_lag.set(seconds);
        if let Some(o) = self.otel.get() {
            o.change_feed_lag.record(seconds, &[]);
        }
    }

    /// The last value [`Metrics::change_feed_lag`] set.
    pub fn change_feed_lag_now(&self) -> f64 {
        self.change_feed_lag.get()
    }

    /// Cluster-wide: tasks active without a running pod, and the oldest one's wait.
    pub fn pods_pending(&self, count: i64, oldest_seconds: f64) {
        self.pods_pending.set(count);
        self.pods_pending_oldest.set(oldest_seconds);
        if let Some(o) = self.otel.get() {
            o.pods_pending.record(count, &[]);
            o.pods_pending_oldest.record(oldest_seconds, &[]);
        }
    }

    /// A crash was recorded; `cause` is `handler`, `node_lost` or `interrupted`.
    pub fn pod_crashed(&self, node: &str, cause: &'static str) {
        self.pod_crashes
            .get_or_create(&CrashLabels {
                node: node.to_owned(),
                cause,
            })
            .inc();
        if let Some(o) = self.otel.get() {
            o.pod_crashes.add(
                1,
                &[
                    KeyValue::new("node", node.to_owned()),
                    KeyValue::new("cause", cause),
                ],
            );
        }
    }

    /// A pod was started again after a crash.
    pub fn pod_restarted(&self, node: &str) {
        self.pod_restarts
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .inc();
        if let Some(o) = self.otel.get() {
            o.pod_restarts
                .add(1, &[KeyValue::new("node", node.to_owned())]);
        }
    }

    /// One adopted pod runs here, `seconds` after its old node was found dead.
    pub fn failover_adoption(&self, node: &str, seconds: f64) {
        self.failover_adoption
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .observe(seconds, exemplar(), None);
        if let Some(o) = self.otel.get() {
            o.failover_adoption
                .record(seconds, &[KeyValue::new("node", node.to_owned())]);
        }
    }

    /// A watch stream opened; it counts until the guard drops. `stream` is `task` or
    /// `tasks`.
    pub fn watch_stream(&'static self, stream: &'static str) -> WatchStreamGuard {
        self.add_watch_stream(stream, 1);
        WatchStreamGuard {
            metrics: self,
            stream,
        }
    }

    fn add_watch_stream(&self, stream: &'static str, delta: i64) {
        self.watch_streams
            .get_or_create(&StreamLabels { stream })
            .inc_by(delta);
        if let Some(o) = self.otel.get() {
            o.watch_streams
                .add(delta, &[KeyValue::new("stream", stream)]);
        }
    }

    /// WatchTasks streams follow `delta` more tasks (fewer when negative).
    pub fn watch_tracked(&self, delta: i64) {
        self.watch_tracked.inc_by(delta);
        if let Some(o) = self.otel.get() {
            o.watch_tracked.add(delta, &[]);
        }
    }

    /// Tasks the WatchTasks streams of this process follow.
    pub fn watch_tracked_now(&self) -> i64 {
        self.watch_tracked.get()
    }

    /// A change reached a watch stream `seconds` after it committed.
    pub fn watch_lag(&self, seconds: f64) {
        self.watch_lag.observe(seconds.max(0.0), exemplar(), None);
        if let Some(o) = self.otel.get() {
            o.watch_lag.record(seconds.max(0.0), &[]);
        }
    }

    /// A connect to Redis or a publishing round trip failed.
    pub fn bus_publish_failed(&self) {
        self.bus_publish_failures.inc();
        if let Some(o) = self.otel.get() {
            o.bus_publish_failures.add(1, &[]);
        }
    }

    /// Attempts to publish that failed so far in this process.
    pub fn bus_publish_failures(&self) -> u64 {
        self.bus_publish_failures.get()
    }

    /// `count` updates will never be published; `reason` is `queue_full` (the oldest
    /// queued, to make room), `failed` (in a round trip that failed) or `stopped` (the
    /// publisher was stopping or gone).
    pub fn bus_publishes_dropped(&self, reason: &'static str, count: u64) {
        if count == 0 {
            return;
        }
        self.bus_publishes_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(count);
        if let Some(o) = self.otel.get() {
            o.bus_publishes_dropped
                .add(count, &[KeyValue::new("reason", reason)]);
        }
    }

    /// A subscription's connection was found dead: `closed` (by Redis or the network)
    /// or `unresponsive` (a ping or a subscribe went unanswered).
    pub fn bus_subscription_lost(&self, cause: &'static str) {
        self.bus_subscriptions_lost
            .get_or_create(&CauseLabels { cause })
            .inc();
        if let Some(o) = self.otel.get() {
            o.bus_subscriptions_lost
                .add(1, &[KeyValue::new("cause", cause)]);
        }
    }
}

/// Counts one open watch stream until dropped.
#[derive(Debug)]
pub struct WatchStreamGuard {
    metrics: &'static Metrics,
    stream: &'static str,
}

impl Drop for WatchStreamGuard {
    fn drop(&mut self) {
        self.metrics.add_watch_stream(self.stream, -1);
    }
}

impl Otel {
    fn new(m: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str, buckets: &[f64]| {
            m.f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        Self {
            rpc_duration: seconds(
                "rpc.server.call.duration",
                "Duration of gRPC calls as the server saw them",
                LATENCY_BUCKETS,
            ),
            db_duration: seconds(
                "db.client.operation.duration",
                "Duration of Postgres statements and Redis commands",
                LATENCY_BUCKETS,
            ),
            event_append: seconds(
                "taskpod.event.append",
                "Duration of the transactions that append events, by writer",
                LATENCY_BUCKETS,
            ),
            tasks_created: m
                .u64_counter("taskpod.tasks.created")
                .with_unit("{task}")
                .with_description("Tasks created")
                .build(),
            tasks_finished: m
                .u64_counter("taskpod.tasks.finished")
                .with_unit("{task}")
                .with_description("Tasks that reached a terminal status")
                .build(),
            task_duration: seconds(
                "taskpod.task.duration",
                "Time from a task's creation to its terminal status",
                TASK_BUCKETS,
            ),
            pods_running: m
                .i64_gauge("taskpod.pods.running")
                .with_unit("{pod}")
                .with_description("Pods this node runs")
                .build(),
            partitions_owned: m
                .i64_gauge("taskpod.partitions.owned")
                .with_unit("{partition}")
                .with_description("Partitions this node owns")
                .build(),
            pods_unplaceable: m
                .i64_gauge("taskpod.pods.unplaceable")
                .with_unit("{task}")
                .with_description(
                    "Active tasks of this node's partitions whose kind or program it cannot run",
                )
                .build(),
            pods_pending: m
                .i64_gauge("taskpod.pods.pending")
                .with_unit("{task}")
                .with_description("Tasks active without a running pod, cluster-wide")
                .build(),
            change_feed_lag: m
                .f64_gauge("taskpod.change_feed.lag")
                .with_unit("s")
                .with_description(
                    "How long the oldest open writing transaction of taskpod's database has \
                     held the change feed's watermark",
                )
                .build(),
            pods_pending_oldest: m
                .f64_gauge("taskpod.pods.pending.oldest")
                .with_unit("s")
                .with_description(
                    "How long the oldest task active without a running pod has waited",
                )
                .build(),
            pod_crashes: m
                .u64_counter("taskpod.pod.crashes")
                .with_unit("{crash}")
                .with_description("Pod crashes recorded, by cause")
                .build(),
            pod_restarts: m
                .u64_counter("taskpod.pod.restarts")
                .with_unit("{pod}")
                .with_description("Pods started again after a crash")
                .build(),
            failover_adoption: seconds(
                "taskpod.failover.adoption",
                "Time from noticing a dead peer to one of its pods running here",
                FAILOVER_BUCKETS,
            ),
            watch_streams: m
                .i64_up_down_counter("taskpod.watch.streams")
                .with_unit("{stream}")
                .with_description("Watch streams open on this replica")
                .build(),
            watch_tracked: m
                .i64_up_down_counter("taskpod.watch.tracked")
                .with_unit("{task}")
                .with_description(
                    "Tasks the WatchTasks streams on this replica follow (the entries they keep)",
                )
                .build(),
            watch_lag: seconds(
                "taskpod.watch.lag",
                "Time from a change's commit to its delivery on a watch stream",
                LATENCY_BUCKETS,
            ),
            bus_publish_failures: m
                .u64_counter("taskpod.bus.publish.failures")
                .with_unit("{attempt}")
                .with_description(
                    "Attempts to reach Redis to publish (connects, round trips) that failed",
                )
                .build(),
            bus_publishes_dropped: m
                .u64_counter("taskpod.bus.publishes.dropped")
                .with_unit("{update}")
                .with_description(
                    "Updates never published (readers repair from Postgres), by reason",
                )
                .build(),
            bus_subscriptions_lost: m
                .u64_counter("taskpod.bus.subscriptions.lost")
                .with_unit("{connection}")
                .with_description("Subscription connections found dead and replaced, by cause")
                .build(),
            build_info: m
                .i64_gauge("taskpod.build.info")
                .with_description("Version of the running binary")
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_has(text: &str, expected: &[&str]) {
        for e in expected {
            assert!(text.contains(e), "missing {e}\nin\n{text}");
        }
    }

    fn text(m: &Metrics, role: Role) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry(role)).unwrap();
        out
    }

    #[test]
    fn names_are_the_ones_dashboards_query() {
        let m = Metrics::new();
        m.attach(None, "taskpod-test");
        m.rpc_call("taskpod.v1.TaskService/GetTask", "OK", 0.001);
        m.db_operation("postgresql", "SELECT", "SELECT tasks", 0.000_3);
        m.tasks_created("sleep", 3);
        m.task_finished("completed", "sleep", 1.5);
        m.node_load("w1", 4, 128);
        m.pods_pending(2, 0.5);
        m.pod_crashed("w1", "handler");
        m.pod_restarted("w1");
        m.failover_adoption("w1", 1.2);
        m.event_append("api", 0.002);
        m.watch_lag(0.003);
        m.bus_publish_failed();
        m.bus_publishes_dropped("queue_full", 3);
        m.bus_subscription_lost("unresponsive");
        let out = text(&m, Role::All);
        assert_has(
            &out,
            &[
                r#"rpc_server_call_duration_seconds_bucket{le="0.001",rpc_system_name="grpc",rpc_method="taskpod.v1.TaskService/GetTask",rpc_response_status_code="OK"} 1"#,
                r#"db_client_operation_duration_seconds_count{db_system_name="postgresql",db_operation_name="SELECT",db_query_summary="SELECT tasks"} 1"#,
                r#"taskpod_tasks_created_total{kind="sleep"} 3"#,
                r#"taskpod_tasks_finished_total{status="completed",kind="sleep"} 1"#,
                r#"taskpod_task_duration_seconds_count{status="completed",kind="sleep"} 1"#,
                r#"taskpod_pods_running{node="w1"} 4"#,
                r#"taskpod_partitions_owned{node="w1"} 128"#,
                "taskpod_pods_pending 2",
                "taskpod_pods_pending_oldest_seconds 0.5",
                r#"taskpod_pod_crashes_total{node="w1",cause="handler"} 1"#,
                r#"taskpod_pod_restarts_total{node="w1"} 1"#,
                r#"taskpod_failover_adoption_seconds_count{node="w1"} 1"#,
                r#"taskpod_event_append_seconds_count{writer="api"} 1"#,
                "taskpod_watch_lag_seconds_count 1",
                "taskpod_bus_publish_failures_total 1",
                r#"taskpod_bus_publishes_dropped_total{reason="queue_full"} 3"#,
                r#"taskpod_bus_subscriptions_lost_total{cause="unresponsive"} 1"#,
                r#"taskpod_build_info{version=""#,
            ],
        );
    }

    #[test]
    fn a_fresh_process_serves_its_known_series_at_zero() {
        let m = Metrics::new();
        m.known_series(Role::Api, None);
        let api = text(&m, Role::Api);
        assert_has(
            &api,
            &[
                r#"taskpod_tasks_created_total{kind="exec"} 0"#,
                r#"taskpod_tasks_finished_total{status="cancelled",kind="manual"} 0"#,
                r#"taskpod_task_duration_seconds_count{status="completed",kind="sleep"} 0"#,
                r#"taskpod_event_append_seconds_count{writer="api"} 0"#,
                r#"taskpod_watch_streams{stream="tasks"} 0"#,
                "taskpod_bus_publish_failures_total 0",
                "taskpod_watch_lag_seconds_count 0",
            ],
        );
        let m = Metrics::new();
        m.known_series(Role::Worker, Some("w1"));
        let worker = text(&m, Role::Worker);
        assert_has(
            &worker,
            &[
                r#"taskpod_tasks_finished_total{status="failed",kind="exec"} 0"#,
                r#"taskpod_event_append_seconds_count{writer="pod"} 0"#,
                r#"taskpod_pod_crashes_total{node="w1",cause="node_lost"} 0"#,
                r#"taskpod_pod_restarts_total{node="w1"} 0"#,
                r#"taskpod_failover_adoption_seconds_count{node="w1"} 0"#,
            ],
        );
        assert!(!worker.contains("taskpod_tasks_created"), "{worker}");
    }

    #[test]
    fn latencies_recorded_in_a_sampled_span_carry_its_trace_id() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let m = Metrics::new();
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("call");
            let _entered = span.enter();
            m.rpc_call("taskpod.v1.TaskService/GetTask", "OK", 0.001);
            sampled_trace_id()
        })
        .expect("a sampled span has a trace id");
        m.rpc_call("taskpod.v1.TaskService/GetTask", "OK", 0.2);
        let out = text(&m, Role::Api);
        assert!(
            out.contains(&format!(r#"# {{trace_id="{trace_id}"}} 0.001"#)),
            "{out}"
        );
        assert_eq!(
            out.matches("trace_id=").count(),
            1,
            "untraced calls carry none"
        );
    }

    #[test]
    fn each_role_serves_only_its_own_metrics() {
        let m = Metrics::new();
        m.node_load("w1", 1, 1);
        m.rpc_call("taskpod.v1.TaskService/GetTask", "OK", 0.001);
        let api = text(&m, Role::Api);
        let worker = text(&m, Role::Worker);
        assert!(api.contains("rpc_server_call_duration_seconds"));
        assert!(!api.contains("taskpod_pods_pending"), "{api}");
        assert!(worker.contains("taskpod_pods_running"));
        assert!(!worker.contains("rpc_server_call_duration"), "{worker}");
    }

    #[test]
    fn watch_streams_count_until_their_guard_drops() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let a = m.watch_stream("task");
        let b = m.watch_stream("task");
        assert!(text(m, Role::Api).contains(r#"taskpod_watch_streams{stream="task"} 2"#));
        drop(a);
        drop(b);
        assert!(text(m, Role::Api).contains(r#"taskpod_watch_streams{stream="task"} 0"#));
    }
}
