//! W3C trace context (`traceparent`) in and out of spans.
//!
//! A task's path crosses processes through the store and the bus, not through calls:
//! the API records the context of its span in each event's metadata and on the task's
//! head, the worker that later acts on the event continues that trace, and every
//! published update carries the writer's context so consumers can link to it. These
//! helpers are that hand-over. With no trace exporter configured spans carry no
//! OpenTelemetry context, and each helper degrades to passing on what it was given, so
//! a traceparent sent by a client still reaches the events unchanged.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of `span`, when it is part of a trace.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The current span's `traceparent`, else `fallback` (the context this work was
/// handed, passed on when this process does not trace). A fallback that is not a W3C
/// traceparent is dropped, as the W3C spec asks of a malformed one, and a valid one is
/// passed on in its canonical 55 characters: it is stored on every event a call
/// writes, so a client cannot make that 16 KB.
pub fn traceparent_or(fallback: Option<&str>) -> Option<String> {
    traceparent_of(&Span::current()).or_else(|| fallback.and_then(canonical))
}

/// `traceparent` as version 00 of the W3C format, when it names a valid span.
pub fn canonical(traceparent: &str) -> Option<String> {
    let sc = span_context(traceparent)?;
    Some(format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
}

/// The remote span a `traceparent` names; `None` when it does not parse.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the remote span `traceparent` names. Call it right after
/// creating `span`, before anything enters it: a started span keeps its parent.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(span_context) {
        // Fails only when the span is disabled or already started; then it stays where
        // it is, which loses a parent link and nothing else.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// Links `span` to the span `traceparent` names (a message's creating context).
pub fn link(span: &Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(span_context) {
        span.add_link(sc);
    }
}

/// The current span's trace id, when it is sampled: what a metric exemplar points to.
pub fn sampled_trace_id() -> Option<String> {
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_traceparent_is_passed_on_only_when_valid_and_in_canonical_form() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_or(Some(valid)).as_deref(), Some(valid));
        assert_eq!(traceparent_or(Some("not a traceparent")), None);
        let huge = format!("{valid}-{}", "a".repeat(16 * 1024));
        assert!(traceparent_or(Some(&huge)).is_none_or(|t| t.len() == 55));
        // A later version with extra fields is read as version 00, and stored as one.
        let future = format!("cc-{}-extra", &valid[3..]);
        assert!(traceparent_or(Some(&future)).is_none_or(|t| t == valid));
    }

    #[test]
    fn a_valid_traceparent_names_its_span_and_garbage_names_none() {
        let sc = span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(span_context(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_a_tracing_layer_the_fallback_is_passed_on() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_or(Some(given)).as_deref(), Some(given));
        assert_eq!(traceparent_or(None), None);
        assert_eq!(sampled_trace_id(), None);
    }
}
