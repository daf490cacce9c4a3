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

/// The current span's context to store, else `fallback` (the context this work was
/// handed, passed on when this process does not trace): [`traceparent_in`] the current
/// span. A fallback that is not a W3C traceparent is dropped, as the W3C spec asks of a
/// malformed one, and a valid one is passed on in its canonical 55 characters: it is
/// stored on every event a call writes, so a client cannot make that 16 KB.
pub fn traceparent_or(fallback: Option<&str>) -> Option<String> {
    traceparent_in(&Span::current(), fallback)
}

/// The `traceparent` an event written in `span` stores, for work that was `handed` a
/// context: the span's own when it is sampled (it will be exported), or when it carries
/// on the handed trace unsampled (a caller chose not to sample: the choice is passed
/// on); otherwise the handed one. Never the fresh context of a span the sampler dropped
/// at the root: nothing exported it, and whoever continued it would inherit "not
/// sampled" for a trace nobody sampled, which is how a task's phases, completion and
/// node losses went missing from its trace.
pub fn traceparent_in(span: &Span, handed: Option<&str>) -> Option<String> {
    let handed = handed.and_then(span_context);
    let cx = span.context();
    let own = cx.span().span_context().clone();
    let continues_handed = handed
        .as_ref()
        .is_some_and(|h| h.trace_id() == own.trace_id());
    if own.is_valid() && (own.is_sampled() || continues_handed) {
        return traceparent_of(span);
    }
    handed.map(|sc| format_traceparent(&sc))
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// `traceparent` as version 00 of the W3C format, when it names a valid span.
pub fn canonical(traceparent: &str) -> Option<String> {
    span_context(traceparent).map(|sc| format_traceparent(&sc))
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
    fn a_span_dropped_at_the_root_stores_what_it_was_handed_and_a_caller_unsampled_trace_is_kept() {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
        let provider = SdkTracerProvider::builder()
            .with_sampler(crate::telemetry::sampler::TaskPaths::new(Box::new(
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            )))
            .build();
        let subscriber = crate::telemetry::subscriber(
            tracing_subscriber::EnvFilter::new("off"),
            crate::telemetry::LogFormat::Text,
            Some(provider.tracer("test")),
        );
        let handed = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        tracing::subscriber::with_default(subscriber, || {
            // No parent and no task operation: the sampler drops it, with a fresh id.
            let root = tracing::info_span!("phase planning");
            assert!(traceparent_of(&root).is_some_and(|t| t.ends_with("-00")));
            assert_eq!(traceparent_in(&root, Some(handed)).as_deref(), Some(handed));
            assert_eq!(traceparent_in(&root, None), None);

            // A span that continues what it was handed stores its own context, in the
            // handed trace, sampled or (a caller that chose not to sample) not.
            let stored = |handed: &str| {
                let pod = tracing::info_span!("taskpod.pod");
                continue_trace(&pod, Some(handed));
                traceparent_in(&pod, Some(handed)).unwrap()
            };
            let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
            for (given, flags) in [(handed, "-01"), (unsampled, "-00")] {
                let own = stored(given);
                assert!(
                    own.starts_with(&given[..36]) && own.ends_with(flags),
                    "{own}"
                );
                assert_ne!(own[..52], given[..52], "its own span");
            }
        });
    }

    #[test]
    fn without_a_tracing_layer_the_fallback_is_passed_on() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_or(Some(given)).as_deref(), Some(given));
        assert_eq!(traceparent_or(None), None);
        assert_eq!(sampled_trace_id(), None);
    }
}
