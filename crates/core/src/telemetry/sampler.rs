//! Which traces start: requests and task paths, not the background chatter of a
//! control loop.
//!
//! A worker reads its pods' rows four times a second, heartbeats, and claims; each of
//! those statements would otherwise be a trace of its own, burying the traces that
//! follow a task. A span with a parent is decided as its parent was (the configured
//! sampler, `OTEL_TRACES_SAMPLER`, is parent-based by default). A span without one
//! starts a trace only when it is where work begins: a SERVER span (a request), a
//! CONSUMER span (a message), or one of taskpod's own operations, named `taskpod.*`
//! (a pod claimed, a node's loss recorded). Anything else at the root is dropped.

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::{Link, SpanKind, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};

#[derive(Clone, Debug)]
pub struct TaskPaths {
    inner: Box<dyn ShouldSample>,
}

impl TaskPaths {
    /// `inner` decides everything this sampler does not drop.
    pub fn new(inner: Box<dyn ShouldSample>) -> Self {
        Self { inner }
    }
}

/// Whether a root span named `name` of `kind` may start a trace.
pub fn starts_a_trace(name: &str, kind: &SpanKind) -> bool {
    matches!(kind, SpanKind::Server | SpanKind::Consumer) || name.starts_with("taskpod.")
}

impl ShouldSample for TaskPaths {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let has_parent = parent_context.is_some_and(|cx| cx.span().span_context().is_valid());
        if !has_parent && !starts_a_trace(name, span_kind) {
            return SamplingResult {
                decision: SamplingDecision::Drop,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.inner
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_messages_and_task_operations_start_traces() {
        assert!(starts_a_trace(
            "taskpod.v1.TaskService/GetTask",
            &SpanKind::Server
        ));
        assert!(starts_a_trace("process partition", &SpanKind::Consumer));
        assert!(starts_a_trace("taskpod.pod.claim", &SpanKind::Internal));
        assert!(!starts_a_trace(
            "SELECT tasks task_heads",
            &SpanKind::Client
        ));
        assert!(!starts_a_trace("pod_candidates", &SpanKind::Internal));
        assert!(!starts_a_trace("publish tasks", &SpanKind::Producer));
    }

    #[test]
    fn a_root_client_span_is_dropped_and_a_child_one_is_not() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};
        use opentelemetry_sdk::trace::Sampler;
        let sampler = TaskPaths::new(Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))));
        let id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let root = sampler.should_sample(None, id, "SELECT tasks", &SpanKind::Client, &[], &[]);
        assert_eq!(root.decision, SamplingDecision::Drop);
        let parent = Context::new().with_remote_span_context(SpanContext::new(
            id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let child = sampler.should_sample(
            Some(&parent),
            id,
            "SELECT tasks",
            &SpanKind::Client,
            &[],
            &[],
        );
        assert_eq!(child.decision, SamplingDecision::RecordAndSample);
    }
}
