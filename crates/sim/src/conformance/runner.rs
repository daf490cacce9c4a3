//! One conformance run: set up tasks on Postgres and mirror them in the model, then
//! apply the same generated steps to both and compare, after each step, the answers,
//! the heads and the partition rows, and what each side's history oracle says.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use taskpod_core::domain::restart::RestartPolicy;
use taskpod_core::domain::{NewTask, NodeId, RequestContext, TaskState};

use super::generate::Generator;
use super::model_side::{Cluster, Incarnation, ModelSide, pod_event};
use super::real::RealSide;
use super::step::{Answer, Step, Value};
use crate::model::{History, PartitionRow, Write};

/// Node slots in a run.
const NODES: usize = 3;
/// Tasks in a run.
const TASKS: usize = 5;
/// The trace lines a mismatch shows.
const TRACE_TAIL: usize = 12;
/// A run stops after this many mismatches.
const MAX_MISMATCHES: usize = 12;

/// The restart policy both sides use: no backoff, so answers never depend on time;
/// small budgets, so failures happen.
pub fn policy() -> RestartPolicy {
    RestartPolicy {
        max_restart_attempts: 2,
        window: Duration::from_secs(3_600),
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        max_node_losses: 2,
        adoption_margin: Duration::ZERO,
        adoption_margin_kinds: Vec::new(),
    }
}

/// A run: how far it went, and every mismatch it found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: usize,
    pub accepted: usize,
    pub mismatches: Vec<Mismatch>,
}

/// A step where the two sides disagreed.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub seed: u64,
    pub step: usize,
    pub what: String,
    /// The steps up to it, with both answers.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} step {}: {}", self.seed, self.step, self.what)?;
        let from = self.trace.len().saturating_sub(TRACE_TAIL);
        for line in &self.trace[from..] {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Runs `steps` steps of `seed` against a fresh model and the database of `opts`.
/// After a mismatch the model takes Postgres's state and the run goes on, so one run
/// reports every kind of difference it meets.
///
/// # Errors
/// When the run cannot be set up or a session cannot be opened.
pub async fn conform(seed: u64, steps: usize, opts: PgConnectOptions) -> Result<Report, Mismatch> {
    let mut trace = Vec::new();
    let fail = |step: usize, what: String, trace: &Vec<String>| Mismatch {
        seed,
        step,
        what,
        trace: trace.clone(),
    };
    let mut real = RealSide::new(opts, NODES)
        .await
        .map_err(|e| fail(0, format!("setup: {e}"), &trace))?;
    let rows: Vec<(i32, PartitionRow)> = real
        .store
        .partitions()
        .await
        .map_err(|e| fail(0, format!("setup: {e}"), &trace))?
        .into_iter()
        .map(|p| {
            (
                p.partition,
                PartitionRow {
                    owner: p.owner_node,
                    generation: p.generation,
                },
            )
        })
        .collect();
    let mut model = ModelSide::new(NODES, rows.clone());
    let mut cluster = Cluster {
        incs: vec![Vec::new(); NODES],
        ..Cluster::default()
    };
    let ctx = RequestContext::new("conformance").with_correlation_id("conformance");
    for i in 0..TASKS {
        let active = i % 2 == 0;
        let created = real
            .store
            .create_task(
                &NewTask {
                    auto_start: active,
                    ..NewTask::new(format!("t{i}"), "sleep")
                },
                &ctx,
            )
            .await
            .map_err(|e| fail(0, format!("setup: {e}"), &trace))?;
        let Some(id) = created.task_id() else {
            return Err(fail(0, "setup: no task id".into(), &trace));
        };
        let task = real
            .store
            .get_task(id)
            .await
            .map_err(|e| fail(0, format!("setup: {e}"), &trace))?;
        model
            .model
            .create_task(id, task.partition, "sleep", 0, task.created_at, active);
        cluster.tasks.push(id);
        cluster.partitions.push(task.partition);
    }
    let mut real_log: Vec<(u64, Write)> = Vec::new();
    let mut model_oracle = History::new(rows.clone());
    let mut real_oracle = History::new(rows);
    let mut generator = Generator::new(seed, NODES);
    let mut report = Report::default();
    let mut node_ids = 0u128;
    for i in 1..=steps {
        if report.mismatches.len() >= MAX_MISMATCHES {
            break;
        }
        let step = generator.next(&model, &cluster);
        let (answer_m, answer_r) = match &step {
            Step::Connect { node } => {
                node_ids += 1;
                let id = NodeId(uuid::Uuid::from_u128((u128::from(seed) << 64) | node_ids));
                match real.connect(*node, id).await {
                    Ok(key) => {
                        cluster.incs[*node].push(Incarnation { id, lock_key: key });
                        let m = model.apply(&step, &cluster, Some(key), None);
                        (m, Answer::Accepted(Value::Done))
                    }
                    Err(e) => return Err(fail(i, format!("connect: {e}"), &trace)),
                }
            }
            _ => {
                let event = match &step {
                    Step::Append {
                        task, epoch, event, ..
                    } => model
                        .model
                        .task(cluster.tasks[*task])
                        .map(|r| pod_event(&r.state, *epoch, *event, cluster.incs[0][0].id)),
                    _ => None,
                };
                if let Step::KillSession { node } = &step
                    && let Some(inc) = cluster.incs[*node].last()
                    && model.alive(*node)
                {
                    real_log.push((0, Write::NodeLockLost { node: inc.id }));
                }
                let r = real.apply(&step, &cluster, event.as_ref()).await;
                let m = model.apply(&step, &cluster, None, event.as_ref());
                (m, r)
            }
        };
        trace.push(format!(
            "#{i} {step}: model {answer_m}, postgres {answer_r}"
        ));
        report.steps = i;
        let real_write = write_of(&step, &answer_r, &cluster);
        if answer_r.accepted() {
            report.accepted += 1;
            if let Some(w) = &real_write {
                real_log.push((0, w.clone()));
            }
        }
        let mut found = Vec::new();
        if !answer_m.agrees(&answer_r) {
            found.push(format!(
                "answers differ on {}: model {answer_m}, postgres {answer_r}",
                kind_of(&step)
            ));
        }
        if let Some(stale) = real_oracle.follow(&real_log).into_iter().next() {
            found.push(format!("postgres accepted a stale write: {}", stale.why));
        }
        let model_stale = model_oracle.follow(model.model.log()).into_iter().next();
        if let Some(stale) = model_stale {
            found.push(format!("the model accepted a stale write: {stale}"));
        }
        if !found.is_empty() {
            // Take Postgres's answer, so the run goes on and finds the next difference
            // rather than the consequences of this one. The model's oracle reads the
            // write taken over as well, without judging it again.
            resync(
                &real, &mut model, &cluster, &step, &answer_m, &answer_r, real_write,
            )
            .await
            .map_err(|e| fail(i, e, &trace))?;
            model_oracle.follow(model.model.log());
        }
        if let Err(what) = same_state(&real, &model, &cluster).await {
            found.push(what);
        }
        if !found.is_empty() {
            let what = rename(&cluster, &found.join("; "));
            report.mismatches.push(fail(i, what, &trace));
        }
    }
    real.close().await;
    Ok(report)
}

/// After a mismatch: the model takes the heads and partition rows Postgres holds, and
/// the crash record and write Postgres made (or did not make).
async fn resync(
    real: &RealSide,
    model: &mut ModelSide,
    c: &Cluster,
    step: &Step,
    answer_m: &Answer,
    answer_r: &Answer,
    real_write: Option<Write>,
) -> Result<(), String> {
    for (i, head) in real.heads(c).await?.into_iter().enumerate() {
        model.model.resync_head(c.tasks[i], head);
    }
    let rows = real.store.partitions().await.map_err(|e| e.to_string())?;
    for p in rows {
        model.model.resync_partition(
            p.partition,
            PartitionRow {
                owner: p.owner_node,
                generation: p.generation,
            },
        );
    }
    if let Step::Crash {
        task, epoch, kind, ..
    } = step
    {
        let recorded =
            |a: &Answer| matches!(a, Answer::Accepted(Value::Crash(o)) if *o != "already recorded");
        match (recorded(answer_m), recorded(answer_r)) {
            (false, true) => model.model.resync_crash(c.tasks[*task], *epoch, *kind),
            (true, false) => model.model.resync_uncrash(c.tasks[*task], *epoch),
            _ => {}
        }
    }
    if !answer_m.accepted()
        && let Some(w) = real_write
    {
        model.model.resync_write(w);
    }
    Ok(())
}

/// `text` with the run's ids replaced by the names the trace uses (`n1.0`, `t3`).
fn rename(c: &Cluster, text: &str) -> String {
    let mut out = text.to_owned();
    for (n, incs) in c.incs.iter().enumerate() {
        for (i, inc) in incs.iter().enumerate() {
            out = out.replace(&format!("NodeId({})", inc.id.0), &format!("n{n}.{i}"));
            out = out.replace(&inc.id.0.to_string(), &format!("n{n}.{i}"));
        }
    }
    for (i, t) in c.tasks.iter().enumerate() {
        out = out.replace(&format!("TaskId({})", t.as_uuid()), &format!("t{i}"));
        out = out.replace(&t.as_uuid().to_string(), &format!("t{i}"));
    }
    out
}

/// The operation's kind, to group mismatches by.
fn kind_of(step: &Step) -> String {
    match step {
        Step::Append { event, .. } => format!("append {event:?}"),
        Step::Crash { kind, batch, .. } => format!(
            "{} {}",
            if *batch {
                "record_crashes"
            } else {
                "record_crash"
            },
            kind.as_str()
        ),
        Step::Command { command, .. } => format!("command {}", command.name()),
        other => format!("{other:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or_default()
            .to_lowercase(),
    }
}

/// The write an accepted step made, as the oracle reads it.
fn write_of(step: &Step, answer: &Answer, c: &Cluster) -> Option<Write> {
    let value = match answer {
        Answer::Accepted(v) => v.clone(),
        Answer::Refused(_) => return None,
    };
    match (step, value) {
        (
            Step::Claim {
                node,
                inc,
                partition,
            },
            Value::Generation(generation),
        ) => Some(Write::Claim {
            node: c.inc(*node, *inc)?.id,
            partition: *partition,
            generation,
        }),
        (
            Step::Release {
                node,
                inc,
                partition,
                generation,
            },
            _,
        ) => Some(Write::Release {
            node: c.inc(*node, *inc)?.id,
            partition: *partition,
            generation: *generation,
        }),
        (
            Step::Mint {
                node,
                inc,
                task,
                generation,
                ..
            },
            Value::Epoch(epoch),
        ) => Some(Write::Mint {
            node: c.inc(*node, *inc)?.id,
            partition: c.partitions[*task],
            generation: *generation,
            task: c.tasks[*task],
            epoch,
        }),
        (Step::Append { task, epoch, .. }, _) => Some(Write::Pod {
            task: c.tasks[*task],
            epoch: *epoch,
            events: vec![event_name(step)],
        }),
        (
            Step::Crash {
                node,
                inc,
                task,
                epoch,
                generation,
                ..
            },
            Value::Crash(outcome),
        ) if outcome != "already recorded" => Some(Write::Crash {
            node: c.inc(*node, *inc)?.id,
            partition: c.partitions[*task],
            generation: *generation,
            task: c.tasks[*task],
            epoch: *epoch,
        }),
        _ => None,
    }
}

fn event_name(step: &Step) -> &'static str {
    match step {
        Step::Append { event, .. } => match event {
            super::step::PodEvent::Started => "pod_started",
            super::step::PodEvent::Advance => "phase_changed",
            super::step::PodEvent::Stopped => "pod_stopped",
        },
        _ => "",
    }
}

/// The fields both sides must agree on.
fn head_key(s: &TaskState) -> String {
    format!(
        "{} {} v{} e{} {} {:?}",
        s.status, s.phase, s.version, s.pod_epoch, s.pod_state, s.owner_node
    )
}

async fn same_state(real: &RealSide, model: &ModelSide, c: &Cluster) -> Result<(), String> {
    let heads = real.heads(c).await?;
    for (i, h) in heads.iter().enumerate() {
        let Some(m) = model.model.task(c.tasks[i]) else {
            return Err(format!("t{i} is missing from the model"));
        };
        if head_key(h) != head_key(&m.state) {
            return Err(format!(
                "t{i}'s head differs: model {}, postgres {}",
                head_key(&m.state),
                head_key(h)
            ));
        }
    }
    let rows = real.store.partitions().await.map_err(|e| e.to_string())?;
    for p in rows.iter().filter(|p| c.partitions.contains(&p.partition)) {
        let m = model.model.partition(p.partition);
        let r = Some(PartitionRow {
            owner: p.owner_node,
            generation: p.generation,
        });
        if m != r {
            return Err(format!(
                "p{}'s row differs: model {m:?}, postgres {r:?}",
                p.partition
            ));
        }
    }
    Ok(())
}
