//! The client load of a chaos run: CreateTask calls paced over the storm, every one
//! with its own request id (AIP-155) and retried with that same id until it gets an
//! answer, plus a few CancelTask calls on tasks already created. Every attempt goes
//! into the [`History`]; every request is kept, so that after healing the calls still
//! without an answer can be sent again, byte for byte.
//!
//! The mix: mostly `sleep` tasks (short phases), and `exec` tasks running the
//! [`Program`]s. Which task gets which kind is drawn from the seed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::history::{Call, History, Outcome, RESOLVER};
use super::programs::Program;
use super::rng::Rng;

/// The task metadata key holding the request id that created the task: how the
/// checker maps a stored task back to the call that made it.
pub const REQUEST_ID_KEY: &str = "chaos_request_id";

/// Which programs `exec` tasks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// The crash storm's: steady, flaky, long, doomed and fatal programs.
    Storm,
    /// Across a network cut: the first `leading` creates run [`Program::Span`] (long
    /// enough to be running when the cut comes), later `exec` tasks run
    /// [`Program::Steady`] or [`Program::Span`].
    Across { leading: usize },
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub seed: u64,
    /// Tasks to create, paced evenly over `duration`.
    pub tasks: usize,
    pub duration: Duration,
    /// Concurrent client loops.
    pub clients: usize,
    /// Share of `exec` tasks, in percent (the rest are `sleep`).
    pub exec_percent: u64,
    /// Which programs they run.
    pub mix: Mix,
    /// Share of created tasks that get a CancelTask soon after, in percent.
    pub cancel_percent: u64,
    /// Deadline of one attempt.
    pub call_timeout: Duration,
    /// How long past `duration` a call keeps being retried before the load gives up
    /// on it (the resolve pass after healing tries again).
    pub retry_grace: Duration,
}

/// A request as sent, for resending with the same request id.
#[derive(Clone, Debug)]
pub enum Request {
    Create(v1::CreateTaskRequest),
    Cancel(v1::CancelTaskRequest),
}

/// The load's clients, the history they write and the requests they sent.
#[derive(Debug)]
pub struct Load {
    config: LoadConfig,
    replicas: Vec<(String, TaskServiceClient<Channel>)>,
    history: Arc<History>,
    requests: Mutex<BTreeMap<String, Request>>,
}

impl Load {
    pub fn new(
        config: LoadConfig,
        replicas: Vec<(String, TaskServiceClient<Channel>)>,
        history: Arc<History>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            replicas,
            history,
            requests: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Runs the paced creates (and their cancels) to the end; returns how many
    /// creates were acknowledged.
    pub async fn run(self: &Arc<Self>) -> usize {
        let start = tokio::time::Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let give_up = start + self.config.duration + self.config.retry_grace;
        let mut loops = JoinSet::new();
        for client in 0..self.config.clients.max(1) {
            let load = Arc::clone(self);
            let next = Arc::clone(&next);
            loops.spawn(async move { load.client_loop(client, start, give_up, &next).await });
        }
        let mut acked = 0;
        while let Some(done) = loops.join_next().await {
            acked += done.unwrap_or(0);
        }
        acked
    }

    async fn client_loop(
        self: Arc<Self>,
        client: usize,
        start: tokio::time::Instant,
        give_up: tokio::time::Instant,
        next: &AtomicUsize,
    ) -> usize {
        let mut acked = 0;
        let mut cancels = JoinSet::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= self.config.tasks {
                break;
            }
            let due = start
                + self
                    .config
                    .duration
                    .mul_f64(i as f64 / self.config.tasks.max(1) as f64);
            tokio::time::sleep_until(due).await;
            let request = self.create_request(i);
            let rid = request_id_of(&request);
            let Some(Outcome::Ok { task_id, .. }) = self.send(client, &request, give_up).await
            else {
                continue;
            };
            acked += 1;
            let mut rng = Rng::derived(self.config.seed ^ i as u64, "cancel");
            if rng.chance(self.config.cancel_percent) {
                let delay = Duration::from_millis(rng.range(0, 3_000));
                let cancel = Request::Cancel(v1::CancelTaskRequest {
                    task_id,
                    reason: "chaos: cancelled by the load".into(),
                    meta: Some(meta(&format!("{rid}-cancel"))),
                });
                let load = Arc::clone(&self);
                cancels.spawn(async move {
                    tokio::time::sleep(delay).await;
                    load.send(client, &cancel, give_up).await;
                });
            }
        }
        cancels.join_all().await;
        acked
    }

    /// The `i`th task of the run, drawn from the seed.
    fn create_request(&self, i: usize) -> Request {
        let seed = self.config.seed;
        let mut rng = Rng::derived(seed ^ (i as u64).wrapping_mul(0x9E37), "task");
        let rid = format!("s{seed}-c{i}");
        let mut metadata = serde_json::json!({ REQUEST_ID_KEY: rid });
        let leading = match self.config.mix {
            Mix::Across { leading } => i < leading,
            Mix::Storm => false,
        };
        let (kind, payload, what) = if leading || rng.chance(self.config.exec_percent) {
            let program = match (self.config.mix, rng.range(0, 99)) {
                (Mix::Across { .. }, _) if leading => Program::Span,
                (Mix::Across { .. }, 0..=69) => Program::Steady,
                (Mix::Across { .. }, _) => Program::Span,
                (Mix::Storm, 0..=34) => Program::Steady,
                (Mix::Storm, 35..=64) => Program::Flaky,
                (Mix::Storm, 65..=74) => Program::Long,
                (Mix::Storm, 75..=84) => Program::Doomed,
                (Mix::Storm, _) => Program::Fatal,
            };
            if let Some(limit) = program.restart_limit() {
                metadata["restart"] = serde_json::json!({ "max_restart_attempts": limit });
            }
            (
                "exec",
                serde_json::json!({ "program": program.name() }),
                format!("exec:{}", program.name()),
            )
        } else {
            ("sleep", serde_json::Value::Null, "sleep".to_owned())
        };
        let metadata = match taskpod_proto::convert::json_to_value(&metadata).kind {
            Some(prost_types::value::Kind::StructValue(s)) => Some(s),
            _ => None,
        };
        Request::Create(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: format!("chaos {seed} #{i} {what}"),
                kind: kind.into(),
                payload: Some(taskpod_proto::convert::json_to_value(&payload)),
                metadata,
                auto_start: true,
                ..Default::default()
            }),
            meta: Some(meta(&rid)),
        })
    }

    /// Sends `request` until it gets an answer or a refusal, or `give_up` passes.
    /// Returns the last outcome.
    async fn send(
        &self,
        client: usize,
        request: &Request,
        give_up: tokio::time::Instant,
    ) -> Option<Outcome> {
        let rid = request_id_of(request);
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rid, request.clone());
        let mut backoff = Duration::from_millis(100);
        let mut attempt = client;
        loop {
            let outcome = self.attempt(client, attempt, request).await;
            attempt += 1;
            if !outcome.is_retryable() || tokio::time::Instant::now() + backoff > give_up {
                return Some(outcome);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt, on replica `attempt % replicas`, recorded in the history.
    async fn attempt(&self, client: usize, attempt: usize, request: &Request) -> Outcome {
        let Some((replica, stub)) = self.replicas.get(attempt % self.replicas.len().max(1)) else {
            return Outcome::Unknown {
                code: tonic::Code::Internal,
                message: "no API replica".into(),
            };
        };
        let mut stub = stub.clone();
        let timeout = self.config.call_timeout;
        let call = match request {
            Request::Create(req) => Call::Create {
                request_id: request_id_of(request),
                what: req
                    .task
                    .as_ref()
                    .map(|t| t.title.clone())
                    .unwrap_or_default(),
            },
            Request::Cancel(req) => Call::Cancel {
                request_id: request_id_of(request),
                task_id: req.task_id.clone(),
            },
        };
        let id = self.history.invoke(client, replica, call);
        let answer = tokio::time::timeout(timeout + Duration::from_secs(1), async {
            match request {
                Request::Create(req) => {
                    let mut req = tonic::Request::new(req.clone());
                    req.set_timeout(timeout);
                    stub.create_task(req).await.map(|r| Outcome::Ok {
                        task_id: r.into_inner().task_id,
                        status: None,
                    })
                }
                Request::Cancel(req) => {
                    let mut req = tonic::Request::new(req.clone());
                    req.set_timeout(timeout);
                    stub.cancel_task(req).await.map(|r| {
                        let task = r.into_inner().task.unwrap_or_default();
                        Outcome::Ok {
                            status: v1::TaskStatus::try_from(task.status)
                                .ok()
                                .map(|s| s.as_str_name().to_owned()),
                            task_id: task.task_id,
                        }
                    })
                }
            }
        })
        .await;
        let outcome = match answer {
            Ok(Ok(ok)) => ok,
            Ok(Err(status)) => Outcome::from_status(&status),
            Err(_) => Outcome::Unknown {
                code: tonic::Code::DeadlineExceeded,
                message: "client-side timeout".into(),
            },
        };
        self.history.complete(id, outcome.clone());
        outcome
    }

    /// After healing: sends every request still without an answer again (same request
    /// id, same body), up to `rounds` times each. Returns how many remain unresolved.
    pub async fn resolve(&self, rounds: usize) -> usize {
        let mut remaining = 0;
        for intent in self.history.intents() {
            let needs = intent
                .attempts
                .last()
                .and_then(|a| a.outcome.as_ref())
                .is_none_or(Outcome::is_retryable)
                && !intent
                    .attempts
                    .iter()
                    .any(|a| a.outcome.as_ref().is_some_and(Outcome::is_ok));
            if !needs {
                continue;
            }
            let request = self
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(intent.request_id())
                .cloned();
            let Some(request) = request else { continue };
            let mut resolved = false;
            for round in 0..rounds.max(1) {
                if !self.attempt(RESOLVER, round, &request).await.is_retryable() {
                    resolved = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !resolved {
                remaining += 1;
            }
        }
        remaining
    }
}

fn meta(request_id: &str) -> v1::RequestMeta {
    v1::RequestMeta {
        actor_id: "chaos".into(),
        correlation_id: request_id.into(),
        request_id: request_id.into(),
    }
}

fn request_id_of(request: &Request) -> String {
    let meta = match request {
        Request::Create(r) => r.meta.as_ref(),
        Request::Cancel(r) => r.meta.as_ref(),
    };
    meta.map(|m| m.request_id.clone()).unwrap_or_default()
}
