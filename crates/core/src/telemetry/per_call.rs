//! A per-layer filter that is asked at every span and event, never cached as "always".
//!
//! With per-layer filters, `tracing-subscriber` carries each layer's verdict from
//! `enabled` to `on_new_span` and `on_event` in a thread-local. A callsite every
//! filter accepts is cached as `Interest::always`, and the `tracing` macros then skip
//! `enabled`: each layer reads whatever the thread's last `enabled` call left there
//! (tokio-rs/tracing#2519). sqlx's query logger asks `log_enabled!` after every
//! statement, through the `log` bridge `try_init` installs, for a target the span
//! layer's filter refuses; the next always-accepted span on that thread reached no
//! exporter. That was the pod's span, created right after the mint's statement, and
//! with it the phases, the completion and the stop (the phases, left without a parent,
//! became unsampled roots whose fresh contexts the events stored). It takes the log
//! filter to accept the worker's spans too, which it does at `info`, the default.
//!
//! [`PerCall`] caps a filter's callsite interest at `sometimes`, so every span and
//! event asks every filter and no layer reads a stale verdict. The cost is one filter
//! evaluation per span and event, which `Targets` and a static `EnvFilter` answer
//! from their directives.

use tracing::span;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter};

/// `F`, asked at every span and event (see the module docs).
#[derive(Clone, Debug)]
pub struct PerCall<F>(pub F);

impl<S, F: Filter<S>> Filter<S> for PerCall<F> {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_never() {
            interest
        } else {
            Interest::sometimes()
        }
    }

    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }

    // An `EnvFilter` follows spans for its span-scoped directives: pass them on.
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
}
