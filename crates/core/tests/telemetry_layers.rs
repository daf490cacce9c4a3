//! The servers' layer stack (`telemetry::subscriber`) with the log filter at `info`,
//! the default: a span both layers accept reaches the span layer even when the last
//! filter question on its thread was about something the span layer refuses (sqlx asks
//! one after every statement). Alone in its process: callsite interest is global.
#![allow(clippy::unwrap_used)]

use opentelemetry::trace::TracerProvider as _;
use taskpod_core::telemetry::LogFormat;
use taskpod_core::telemetry::context::{continue_trace, traceparent_of};
use tracing_subscriber::EnvFilter;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_span_after_a_question_the_span_layer_refused_still_reaches_it() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = taskpod_core::telemetry::subscriber(
        EnvFilter::new("info"),
        LogFormat::Text,
        Some(provider.tracer("test")),
    );
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..3 {
            // What sqlx's query logger does: a question, for a target only the log
            // layer accepts, that no event follows.
            assert!(tracing::enabled!(target: "h2", tracing::Level::INFO));
            let span = tracing::info_span!("taskpod.pod", task_id = "t");
            continue_trace(&span, Some(PARENT));
            let traceparent = traceparent_of(&span);
            assert!(
                traceparent
                    .as_deref()
                    .is_some_and(|t| t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")),
                "the span layer never saw the span: {traceparent:?}"
            );
        }
    });
}
