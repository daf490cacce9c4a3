//! What an API replica cut from Postgres answers (issue 19, item 2: "a replica cut
//! from Postgres answers UNAVAILABLE within its deadline and serves again within 5 s
//! of the heal"): a GetTask and a CreateTask sent together at a steady pace through
//! the cut, each on its own (one that hangs does not hold up the next: calls overlap,
//! as a busy replica's do), with a client deadline far above the replica's own, so
//! what is measured is the replica's bound, not the client's. Creates carry request
//! ids and go into the run's [`History`], so the checker holds the store to them like
//! to any client's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::chaos::history::{Call, History, Outcome};
use crate::chaos::load::REQUEST_ID_KEY;
use crate::chaos::storm::unix_ms;

/// The client's deadline on a probe: well above any replica's store bound.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// One probe: which call, when it was sent and answered (unix ms), and with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub what: &'static str,
    pub sent_ms: i64,
    pub answered_ms: i64,
    /// `None`: answered with the task.
    pub code: Option<tonic::Code>,
    /// The error's message, if any.
    pub message: String,
}

impl Probe {
    pub fn latency_ms(&self) -> i64 {
        self.answered_ms - self.sent_ms
    }
}

/// Probes in flight and done.
#[derive(Debug, Default)]
pub struct Prober {
    done: Arc<Mutex<Vec<Probe>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    creates: usize,
}

impl Prober {
    /// Sends GetTask of `task` and a CreateTask (recorded in `history`) every `every`
    /// until `stop`, each probe on its own task.
    pub async fn run(
        &mut self,
        client: &TaskServiceClient<Channel>,
        task: &str,
        history: &Arc<History>,
        every: Duration,
        stop: CancellationToken,
    ) {
        while !stop.is_cancelled() {
            self.send(client, task);
            self.create(client, history);
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Sends one CreateTask of a `sleep` task with a request id of its own.
    pub fn create(&mut self, client: &TaskServiceClient<Channel>, history: &Arc<History>) {
        self.creates += 1;
        let rid = format!("probe-{}", self.creates);
        let metadata =
            taskpod_proto::convert::json_to_struct(&serde_json::json!({ REQUEST_ID_KEY: rid }));
        let request = v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: format!("{rid} sleep"),
                kind: "sleep".into(),
                metadata,
                auto_start: true,
                ..Default::default()
            }),
            meta: Some(v1::RequestMeta {
                actor_id: "probe".into(),
                correlation_id: rid.clone(),
                request_id: rid.clone(),
            }),
        };
        let (mut client, done, history) =
            (client.clone(), Arc::clone(&self.done), Arc::clone(history));
        self.tasks.push(tokio::spawn(async move {
            let id = history.invoke(
                usize::MAX - 1,
                "probe",
                Call::Create {
                    request_id: rid,
                    what: "sleep".into(),
                },
            );
            let sent_ms = unix_ms();
            let mut request = tonic::Request::new(request);
            request.set_timeout(CLIENT_DEADLINE);
            let answer = tokio::time::timeout(
                CLIENT_DEADLINE + Duration::from_secs(1),
                client.create_task(request),
            )
            .await;
            let (code, message, outcome) = match answer {
                Ok(Ok(r)) => (
                    None,
                    String::new(),
                    Outcome::Ok {
                        task_id: r.into_inner().task_id,
                        status: None,
                    },
                ),
                Ok(Err(status)) => (
                    Some(status.code()),
                    status.message().to_owned(),
                    Outcome::from_status(&status),
                ),
                Err(_) => (
                    Some(tonic::Code::DeadlineExceeded),
                    "client-side timeout".to_owned(),
                    Outcome::Unknown {
                        code: tonic::Code::DeadlineExceeded,
                        message: "client-side timeout".into(),
                    },
                ),
            };
            history.complete(id, outcome);
            done.lock().unwrap_or_else(|e| e.into_inner()).push(Probe {
                what: "CreateTask",
                sent_ms,
                answered_ms: unix_ms(),
                code,
                message,
            });
        }));
    }

    /// Sends one probe.
    pub fn send(&mut self, client: &TaskServiceClient<Channel>, task: &str) {
        let (mut client, done) = (client.clone(), Arc::clone(&self.done));
        let request = v1::GetTaskRequest {
            task_id: task.to_owned(),
        };
        self.tasks.push(tokio::spawn(async move {
            let sent_ms = unix_ms();
            let mut request = tonic::Request::new(request);
            request.set_timeout(CLIENT_DEADLINE);
            let answer = tokio::time::timeout(
                CLIENT_DEADLINE + Duration::from_secs(1),
                client.get_task(request),
            )
            .await;
            let (code, message) = match answer {
                Ok(Ok(_)) => (None, String::new()),
                Ok(Err(status)) => (Some(status.code()), status.message().to_owned()),
                Err(_) => (
                    Some(tonic::Code::DeadlineExceeded),
                    "client-side timeout".to_owned(),
                ),
            };
            done.lock().unwrap_or_else(|e| e.into_inner()).push(Probe {
                what: "GetTask",
                sent_ms,
                answered_ms: unix_ms(),
                code,
                message,
            });
        }));
    }

    /// The first probe answered with the task, if any yet.
    pub fn first_ok(&self) -> Option<Probe> {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.code.is_none())
            .min_by_key(|p| p.answered_ms)
            .cloned()
    }

    /// Waits for every probe sent (each ends by its deadline) and returns them all.
    pub async fn finish(self) -> Vec<Probe> {
        for task in self.tasks {
            let _ = task.await;
        }
        let mut all = self.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        all.sort_by_key(|p| p.sent_ms);
        all
    }
}
