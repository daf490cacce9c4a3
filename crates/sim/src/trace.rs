//! A readable account of a run: one line per act, with short names (`t3` for a task,
//! `n1.2` for node 1's second incarnation). Lines are formatted only when the trace is
//! on, so the thousand-seed run pays nothing for it; a failing seed is run again with
//! the trace on, which gives the same run since everything is seeded.

use std::collections::BTreeMap;

use taskpod_core::domain::{NodeId, TaskId};

use crate::time::Millis;

/// The trace and the names it uses.
#[derive(Debug, Default)]
pub struct Trace {
    on: bool,
    lines: Vec<String>,
    tasks: BTreeMap<TaskId, String>,
    nodes: BTreeMap<NodeId, String>,
    pub step: u64,
}

impl Trace {
    pub fn new(on: bool) -> Self {
        Self {
            on,
            ..Self::default()
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Adds a line at global time `now`, formatted only when the trace is on.
    pub fn note(&mut self, now: Millis, line: impl FnOnce(&Self) -> String) {
        if self.on {
            let text = line(self);
            self.lines
                .push(format!("#{:<5} {now:>6}ms {text}", self.step));
        }
    }

    pub fn name_task(&mut self, id: TaskId, name: String) {
        self.tasks.insert(id, name);
    }

    pub fn name_node(&mut self, id: NodeId, name: String) {
        self.nodes.insert(id, name);
    }

    pub fn task(&self, id: TaskId) -> String {
        self.tasks
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    pub fn node(&self, id: NodeId) -> String {
        self.nodes
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// `text` with every id it knows replaced by its short name.
    pub fn rename(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (id, name) in &self.tasks {
            out = out.replace(&format!("TaskId({})", id.as_uuid()), name);
            out = out.replace(&id.as_uuid().to_string(), name);
        }
        for (id, name) in &self.nodes {
            out = out.replace(&format!("NodeId({})", id.0), name);
            out = out.replace(&id.0.to_string(), name);
        }
        out
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}
