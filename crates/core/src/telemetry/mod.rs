//! Logs, traces and metrics, set up the same way by every server.
//!
//! - [`config`]: what the standard `OTEL_*` environment (and `TASKPOD_LOG_FORMAT`) asks
//!   for;
//! - [`context`]: W3C trace context handed from span to event to span across
//!   processes;
//! - [`metrics`]: every metric, recorded once into the `/metrics` registry and, when
//!   configured, the OTLP exporter;
//! - [`exposition`]: the `/metrics` endpoint;
//! - [`spans`]: client spans for Postgres and Redis, messaging spans for the bus;
//! - [`sampler`]: which spans may start a trace;
//! - [`per_call`]: the per-layer filter wrapper that keeps every layer's verdict fresh.
//!
//! [`init`] installs it all and returns a [`Telemetry`] whose
//! [`shutdown`](Telemetry::shutdown) flushes what is buffered. With no OTLP endpoint it
//! installs only the log layer: no exporter, no background thread, no span context.

pub mod config;
pub mod context;
pub mod exposition;
pub mod metrics;
pub mod per_call;
pub mod sampler;
pub mod spans;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use config::{ConfigError, LogFormat, TelemetryConfig};
pub use metrics::Role;

/// Whether spans are exported: consumers skip the work of continuing a trace (reading
/// a message's trace context) when nothing would record it.
static TRACES_EXPORTED: AtomicBool = AtomicBool::new(false);

pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(Ordering::Relaxed)
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {reason}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        reason: String,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The installed providers; [`Telemetry::shutdown`] exports what they still hold.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

/// The spans exported: the program's own at INFO and above; none of the transport
/// crates' (their spans are per frame and say nothing about a task), and none of the
/// exporter's own, which would otherwise trace their own export.
fn exported_spans() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

/// Installs logging to stderr (levels from `RUST_LOG`, else `default_filter`), and the
/// OTLP trace and metric pipelines the configuration asks for, and records
/// `taskpod_build_info`. Call it inside the Tokio runtime the program runs on: the
/// gRPC exporter needs one.
///
/// # Errors
/// An exporter that cannot be built, or a subscriber already installed.
pub fn init(config: &TelemetryConfig, default_filter: &str) -> Result<Telemetry, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ])
        .build();

    let tracer = match &config.traces_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    signal: "trace",
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    // The configured sampler (OTEL_TRACES_SAMPLER), behind the rule of
                    // which roots may start a trace.
                    .with_sampler(sampler::TaskPaths::new(
                        opentelemetry_sdk::trace::Config::default().sampler,
                    ))
                    .with_resource(resource.clone())
                    .build(),
            )
        }
        None => None,
    };
    let meter = match &config.metrics_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    signal: "metric",
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?;
            Some(
                SdkMeterProvider::builder()
                    .with_periodic_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let tracer_of_spans = tracer.as_ref().map(|provider| provider.tracer("taskpod"));
    subscriber(filter, config.log_format, tracer_of_spans)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    TRACES_EXPORTED.store(tracer.is_some(), Ordering::Relaxed);

    metrics::metrics().attach(
        meter.as_ref().map(|m| m.meter("taskpod")).as_ref(),
        &config.service_name,
    );
    if let Some(endpoint) = &config.traces_endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    if let Some(endpoint) = &config.metrics_endpoint {
        tracing::info!(%endpoint, "exporting metrics over OTLP");
    }
    Ok(Telemetry { tracer, meter })
}

/// The layers every server installs: log lines to stderr as `log_filter` and `format`
/// say, and, given a tracer, the spans [`exported_spans`] names. Both filters are
/// [`per_call::PerCall`]: see there why.
pub fn subscriber(
    log_filter: EnvFilter,
    format: LogFormat,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    // Spans that exist only to be exported stay out of log lines.
    let filter = log_filter.and(tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target() == spans::TARGET)
    }));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Pretty => logs.pretty().boxed(),
        LogFormat::Json => logs.json().boxed(),
    }
    .with_filter(per_call::PerCall(filter));
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(per_call::PerCall(exported_spans()))
    });
    tracing_subscriber::registry().with(logs).with(spans)
}

impl Telemetry {
    /// Whether spans are exported (and so carry a trace context).
    pub fn traces(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports everything still buffered and stops the pipelines. Blocks while the
    /// exporters finish: call it from the main thread once the server has stopped,
    /// with the runtime still alive (the gRPC exporter runs on it).
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(e) = tracer.shutdown()
        {
            eprintln!("warning: flushing traces failed: {e}");
        }
        if let Some(meter) = self.meter
            && let Err(e) = meter.shutdown()
        {
            eprintln!("warning: flushing metrics failed: {e}");
        }
    }
}
