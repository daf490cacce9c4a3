//! One trace as an [`otlp::Receiver`](crate::otlp::Receiver) got it, and the W3C
//! `traceparent`s events carry: what a Tempo user would follow, read back to check that
//! it holds together.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::otlp::ReceivedSpan;

/// A W3C `traceparent`, version 00, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

impl Traceparent {
    /// `None` unless it is `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('-');
        let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_owned(),
            span_id: span.to_owned(),
            sampled: flags & 1 == 1,
        })
    }

    /// A fresh sampled context, as a client that traces would send.
    pub fn fresh() -> Self {
        let span = uuid::Uuid::new_v4().simple().to_string();
        Self {
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
            span_id: span[..16].to_owned(),
            sampled: true,
        }
    }
}

impl std::fmt::Display for Traceparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = u8::from(self.sampled);
        write!(f, "00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }
}

/// The spans of one trace.
#[derive(Debug)]
pub struct Trace {
    pub id: String,
    pub spans: Vec<ReceivedSpan>,
}

impl Trace {
    /// The spans of `spans` in trace `id`.
    pub fn of(spans: &[ReceivedSpan], id: &str) -> Self {
        Self {
            id: id.to_owned(),
            spans: spans
                .iter()
                .filter(|s| s.trace_id() == id)
                .cloned()
                .collect(),
        }
    }

    /// Spans named `name` from `service`.
    pub fn named(&self, service: &str, name: &str) -> Vec<&ReceivedSpan> {
        self.spans
            .iter()
            .filter(|s| s.service == service && s.span.name == name)
            .collect()
    }

    pub fn span(&self, span_id: &str) -> Option<&ReceivedSpan> {
        self.spans.iter().find(|s| s.span_id() == span_id)
    }

    /// The spans whose parent is neither in this trace nor one of `outside` (a client's
    /// own span, which no process here exports); roots are fine.
    pub fn dangling(&self, outside: &[&str]) -> Vec<&ReceivedSpan> {
        let ids: HashSet<String> = self.spans.iter().map(ReceivedSpan::span_id).collect();
        self.spans
            .iter()
            .filter(|s| {
                let parent = s.parent_span_id();
                !parent.is_empty() && !ids.contains(&parent) && !outside.contains(&&*parent)
            })
            .collect()
    }

    /// Whether `span` is `ancestor` or below it.
    pub fn descends(&self, span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
        let mut current = span.span_id();
        for _ in 0..64 {
            if current == ancestor.span_id() {
                return true;
            }
            match self.span(&current) {
                Some(s) => current = s.parent_span_id(),
                None => return false,
            }
        }
        false
    }

    /// `(service, name)` -> how many, for failure messages.
    pub fn census(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for s in &self.spans {
            *out.entry((s.service.clone(), s.span.name.clone()))
                .or_insert(0) += 1;
        }
        out
    }
}

/// Every `(trace id, span id)` in `spans`: what a stored traceparent must name.
pub fn exported(spans: &[ReceivedSpan]) -> BTreeSet<(String, String)> {
    spans.iter().map(|s| (s.trace_id(), s.span_id())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_garbage_is_refused() {
        let t = Traceparent::fresh();
        assert_eq!(Traceparent::parse(&t.to_string()), Some(t));
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            Traceparent::parse(unsampled).map(|t| t.sampled),
            Some(false)
        );
        for bad in [
            "",
            "00-abc-def-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Traceparent::parse(bad), None, "{bad}");
        }
    }
}
