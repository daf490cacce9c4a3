//! The built-in handlers, one per kind.
//!
//! - [`manual`]: phases move only by TransitionPhase (the human-in-the-loop flow);
//! - [`sleep`]: walks the phases with a configured delay (demos, benchmarks);
//! - [`exec`]: runs a program named in the worker's configuration, once per phase.

pub mod exec;
pub mod manual;
pub mod sleep;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::handler::Handler;
use crate::settings::HandlerSettings;

/// The handlers this node offers, by kind.
pub fn registry(settings: &HandlerSettings) -> BTreeMap<String, Arc<dyn Handler>> {
    let mut map: BTreeMap<String, Arc<dyn Handler>> = BTreeMap::new();
    for kind in &settings.kinds {
        let handler: Arc<dyn Handler> = match kind.as_str() {
            "manual" => Arc::new(manual::Manual),
            "sleep" => Arc::new(sleep::Sleep::new(settings.sleep_phase_ms)),
            "exec" => Arc::new(exec::Exec::new(settings)),
            // Settings::check refuses unknown kinds.
            _ => continue,
        };
        map.insert(kind.clone(), handler);
    }
    map
}
