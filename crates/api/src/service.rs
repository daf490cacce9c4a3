//! `taskpod.v1.TaskService`: thin handlers over the store. Each converts the request at
//! the edge, calls one store operation, and maps errors with [`crate::errors`].

use chrono::Utc;
use serde::{Deserialize, Serialize};
use taskpod_core::Error;
use taskpod_core::domain::filter;
use taskpod_core::domain::{Command, RequestContext, Status as TaskStatus, TaskId};
use taskpod_core::store::{Cursor, SortDirection, SortField, Store, TaskFilter, TaskOrder};
use taskpod_proto::convert;
use taskpod_proto::v1::task_service_server::TaskService;
use taskpod_proto::v1::{self, RequestMeta};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Caller, request_context};
use crate::errors::{Fields, to_status};
use taskpod_core::batch::{Batcher, Shape};
use taskpod_core::domain::NewTask;
use taskpod_core::store::Created;

use crate::hub::Hub;
use crate::kinds::KindCatalog;
use crate::listing::{self, PageRequest};
use crate::page_token::{PageTokens, fingerprint};
use crate::pods::{PodWaits, Until};
use crate::rpc_telemetry::record_task;
use crate::watch::{ResumeToken, Watches};

/// The service's shared state; cheap to clone.
#[derive(Clone, Debug)]
pub struct TaskApi {
    store: Store,
    tokens: PageTokens,
    watches: Watches,
    pods: PodWaits,
    kinds: KindCatalog,
    /// Announces every committed change (best effort, after the commit).
    /// Concurrent CreateTask calls share transactions (each keeps its own answer).
    creates: Batcher<(NewTask, RequestContext), Result<Created, Error>>,
    /// A list page's encoded size stays under this.
    max_page_bytes: usize,
}

/// Up to 256 CreateTask calls a transaction, four transactions in flight; a
/// transaction stuck for a second (a silent store connection) no longer holds the
/// calls behind it.
const CREATE_SHAPE: Shape = Shape {
    max_batch: 256,
    flushers: 4,
    stall: std::time::Duration::from_secs(1),
};

type Reply<T> = Result<Response<T>, Status>;

fn plain(err: Error) -> Status {
    to_status(err, Fields::Plain)
}

fn required(field: &str) -> Status {
    plain(Error::InvalidArgument {
        field: field.to_owned(),
        reason: "is required".into(),
    })
}

impl TaskApi {
    pub fn new(
        store: Store,
        tokens: PageTokens,
        watches: Watches,
        pod_wait: std::time::Duration,
        hub: Hub,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        // Each flush announces what it committed (the store does, after its commit).
        let creates = {
            let store = store.clone();
            Batcher::start(
                CREATE_SHAPE,
                tracker,
                move |batch: Vec<(NewTask, RequestContext)>| {
                    let store = store.clone();
                    async move { store.create_each(&batch).await }
                },
            )
        };
        Self {
            creates,
            pods: PodWaits::new(store.clone(), pod_wait, hub),
            kinds: KindCatalog::new(store.clone()),
            store,
            tokens,
            watches,
            max_page_bytes: crate::settings::ApiSettings::default().max_page_bytes,
        }
    }

    /// Caps list pages at `bytes` of encoded tasks.
    #[must_use]
    pub fn with_max_page_bytes(mut self, bytes: usize) -> Self {
        self.max_page_bytes = bytes;
        self
    }

    fn context<T>(req: &Request<T>, meta: Option<&RequestMeta>) -> Result<RequestContext, Status> {
        request_context(req.metadata(), req.extensions().get::<Caller>(), meta)
    }

    /// Runs a lifecycle command, waits for the pod if `until` says so, and answers with
    /// the task as committed then.
    async fn command(
        &self,
        task_id: &str,
        command: Command,
        ctx: &RequestContext,
        until: Option<fn(i64) -> Until>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<v1::Task, Status> {
        let id = convert::task_id("task_id", task_id).map_err(plain)?;
        record_task(&id);
        let executed = self.store.execute(id, &command, ctx).await.map_err(plain)?;
        // The row read back serves the answer (the store announced the change).
        let mut task = self.store.get_task(id).await.map_err(plain)?;
        if let Some(until) = until {
            // A replayed answer carries the epoch of the first call, so a retry waits
            // for the same pod.
            let before = executed.state.pod_epoch;
            self.pods
                .wait(id, until(before), metadata)
                .await
                .map_err(plain)?;
            task = self.store.get_task(id).await.map_err(plain)?;
        }
        Ok(convert::task(&task))
    }

    /// One page of `kind` (`tasks` or `pods`, which names its tokens) in `view`.
    async fn page(
        &self,
        kind: &str,
        filter: TaskFilter,
        order: TaskOrder,
        page_size: i32,
        page_token: &str,
        view: i32,
    ) -> Result<(Vec<v1::Task>, String), Status> {
        let view = listing::view_of(view).map_err(plain)?;
        let fp = fingerprint(&(&filter, &order));
        let after = if page_token.is_empty() {
            None
        } else {
            Some(
                self.tokens
                    .verify::<Cursor>("page_token", kind, &fp, page_token)
                    .map_err(plain)?,
            )
        };
        let page = listing::read_page(
            &self.store,
            PageRequest {
                filter,
                order,
                page_size: i64::from(page_size),
                after,
                view,
                max_bytes: self.max_page_bytes,
            },
        )
        .await
        .map_err(plain)?;
        let next = page
            .next
            .map(|c| self.tokens.sign(kind, &fp, &c))
            .unwrap_or_default();
        Ok((page.tasks, next))
    }
}

/// The typed criteria and the AIP-160 string as one store filter.
///
/// # Errors
/// `InvalidArgument` on `filter` or the criterion at fault.
pub fn task_filter(text: &str, criteria: Option<&v1::TaskCriteria>) -> Result<TaskFilter, Error> {
    let mut f = TaskFilter {
        expr: filter::parse(text)?,
        ..TaskFilter::default()
    };
    if let Some(c) = criteria {
        f.statuses = c
            .statuses
            .iter()
            .map(|s| convert::from_status("criteria.statuses", *s))
            .collect::<Result<_, _>>()?;
        f.phases = c
            .phases
            .iter()
            .map(|p| convert::from_phase("criteria.phases", *p))
            .collect::<Result<_, _>>()?;
        f.kinds = c.kinds.clone();
        f.created_by = (!c.created_by.is_empty()).then(|| c.created_by.clone());
        f.created_after = c
            .created_after
            .as_ref()
            .map(|t| convert::from_timestamp("criteria.created_after", t))
            .transpose()?;
        f.priority_min = c.priority_min;
        f.priority_max = c.priority_max;
    }
    Ok(f)
}

/// Parses AIP-132 `order_by`: a field, optionally followed by `asc` or `desc`.
///
/// # Errors
/// `InvalidArgument` on `order_by`.
pub fn task_order(order_by: &str) -> Result<TaskOrder, Error> {
    let mut words = order_by.split_whitespace();
    let Some(field) = words.next() else {
        return Ok(TaskOrder::default());
    };
    let bad = |reason: String| Error::InvalidArgument {
        field: "order_by".into(),
        reason,
    };
    let field = match field {
        "created_at" => SortField::CreatedAt,
        "updated_at" => SortField::UpdatedAt,
        "priority" => SortField::Priority,
        other => {
            return Err(bad(format!(
                "{other:?} is not one of created_at, updated_at, priority"
            )));
        }
    };
    let direction = match words.next() {
        None | Some("desc") => SortDirection::Desc,
        Some("asc") => SortDirection::Asc,
        Some(other) => return Err(bad(format!("{other:?} is not asc or desc"))),
    };
    if let Some(extra) = words.next() {
        return Err(bad(format!("unexpected {extra:?}: one field only")));
    }
    Ok(TaskOrder { field, direction })
}

/// Where a ListTaskEvents page ends.
#[derive(Serialize, Deserialize)]
struct EventsCursor {
    next_version: i64,
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn create_task(
        &self,
        req: Request<v1::CreateTaskRequest>,
    ) -> Reply<v1::CreateTaskResponse> {
        let ctx = Self::context(&req, req.get_ref().meta.as_ref())?;
        let spec = req
            .get_ref()
            .task
            .as_ref()
            .ok_or_else(|| required("task"))?;
        let fields = Fields::Spec("task");
        let new = convert::new_task(spec).map_err(|e| to_status(e, fields))?;
        self.kinds
            .check(std::slice::from_ref(&new), false)
            .await
            .map_err(|e| to_status(e, fields))?;
        // Created, and announced, with the other calls of its batch (a request id is
        // claimed in the batch's transaction).
        let created = self
            .creates
            .call((new, ctx))
            .await
            .unwrap_or_else(|e| Err(Error::StoreUnavailable(e.to_string())))
            .map_err(|e| to_status(e, fields))?;
        let task_id = created
            .task_id()
            .map(|id| id.to_string())
            .unwrap_or_default();
        record_task(&task_id);
        Ok(Response::new(v1::CreateTaskResponse { task_id }))
    }

    async fn create_tasks(
        &self,
        req: Request<v1::CreateTasksRequest>,
    ) -> Reply<v1::CreateTasksResponse> {
        let ctx = Self::context(&req, req.get_ref().meta.as_ref())?;
        let fields = Fields::Spec("tasks");
        let tasks = req
            .get_ref()
            .tasks
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                convert::new_task(spec).map_err(|e| Error::InvalidBatchItem {
                    index,
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_status(e, fields))?;
        self.kinds
            .check(&tasks, true)
            .await
            .map_err(|e| to_status(e, fields))?;
        let created = self
            .store
            .create_tasks(&tasks, &ctx)
            .await
            .map_err(|e| to_status(e, fields))?;
        Ok(Response::new(v1::CreateTasksResponse {
            task_ids: created.task_ids.iter().map(TaskId::to_string).collect(),
        }))
    }

    async fn get_task(&self, req: Request<v1::GetTaskRequest>) -> Reply<v1::GetTaskResponse> {
        let id = convert::task_id("task_id", &req.get_ref().task_id).map_err(plain)?;
        record_task(&id);
        let task = self.store.get_task(id).await.map_err(plain)?;
        Ok(Response::new(v1::GetTaskResponse {
            task: Some(convert::task(&task)),
        }))
    }

    async fn list_tasks(&self, req: Request<v1::ListTasksRequest>) -> Reply<v1::ListTasksResponse> {
        let r = req.get_ref();
        let filter = task_filter(&r.filter, r.criteria.as_ref()).map_err(plain)?;
        let order = task_order(&r.order_by).map_err(plain)?;
        let (tasks, next_page_token) = self
            .page("tasks", filter, order, r.page_size, &r.page_token, r.view)
            .await?;
        Ok(Response::new(v1::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn count_tasks(
        &self,
        req: Request<v1::CountTasksRequest>,
    ) -> Reply<v1::CountTasksResponse> {
        let r = req.get_ref();
        let filter = task_filter(&r.filter, r.criteria.as_ref()).map_err(plain)?;
        let count = self.store.count_tasks(&filter).await.map_err(plain)?;
        Ok(Response::new(v1::CountTasksResponse { count }))
    }

    async fn start_pod(&self, req: Request<v1::StartPodRequest>) -> Reply<v1::StartPodResponse> {
        let ctx = Self::context(&req, req.get_ref().meta.as_ref())?;
        let task = self
            .command(
                &req.get_ref().task_id,
                Command::RequestStart,
                &ctx,
                Some(Until::RunningAfter),
                req.metadata(),
            )
            .await?;
        Ok(Response::new(v1::StartPodResponse { task: Some(task) }))
    }

    async fn stop_pod(&self, req: Request<v1::StopPodRequest>) -> Reply<v1::StopPodResponse> {
        let r = req.get_ref();
        let ctx = Self::context(&req, r.meta.as_ref())?;
        let reason = (!r.reason.is_empty()).then(|| r.reason.clone());
        let task = self
            .command(
                &r.task_id,
                Command::RequestStop { reason },
                &ctx,
                Some(|_| Until::Stopped),
                req.metadata(),
            )
            .await?;
        Ok(Response::new(v1::StopPodResponse { task: Some(task) }))
    }

    async fn restart_pod(
        &self,
        req: Request<v1::RestartPodRequest>,
    ) -> Reply<v1::RestartPodResponse> {
        let ctx = Self::context(&req, req.get_ref().meta.as_ref())?;
        let task = self
            .command(
                &req.get_ref().task_id,
                Command::RequestRestart,
                &ctx,
                Some(Until::RunningAfter),
                req.metadata(),
            )
            .await?;
        Ok(Response::new(v1::RestartPodResponse { task: Some(task) }))
    }

    async fn list_active_pods(
        &self,
        req: Request<v1::ListActivePodsRequest>,
    ) -> Reply<v1::ListActivePodsResponse> {
        let r = req.get_ref();
        let filter = TaskFilter {
            statuses: vec![TaskStatus::Active],
            ..TaskFilter::default()
        };
        let order = TaskOrder {
            field: SortField::CreatedAt,
            direction: SortDirection::Asc,
        };
        let (tasks, next_page_token) = self
            .page("pods", filter, order, r.page_size, &r.page_token, r.view)
            .await?;
        Ok(Response::new(v1::ListActivePodsResponse {
            tasks,
            next_page_token,
        }))
    }

    async fn list_nodes(&self, _: Request<v1::ListNodesRequest>) -> Reply<v1::ListNodesResponse> {
        let nodes = self.store.node_summaries().await.map_err(plain)?;
        Ok(Response::new(v1::ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|n| v1::Node {
                    node_id: n.node.node_id.to_string(),
                    name: n.node.name,
                    started_at: Some(convert::timestamp(n.started_at)),
                    heartbeat_at: Some(convert::timestamp(n.node.heartbeat_at)),
                    capacity: n.node.capacity,
                    kinds: n.node.kinds,
                    programs: n.node.programs,
                    partitions: i32::try_from(n.partitions).unwrap_or(i32::MAX),
                    pods: i32::try_from(n.pods).unwrap_or(i32::MAX),
                })
                .collect(),
        }))
    }

    async fn complete_task(
        &self,
        req: Request<v1::CompleteTaskRequest>,
    ) -> Reply<v1::CompleteTaskResponse> {
        let ctx = Self::context(&req, req.get_ref().meta.as_ref())?;
        let task = self
            .command(
                &req.get_ref().task_id,
                Command::Complete,
                &ctx,
                None,
                req.metadata(),
            )
            .await?;
        Ok(Response::new(v1::CompleteTaskResponse { task: Some(task) }))
    }

    async fn cancel_task(
        &self,
        req: Request<v1::CancelTaskRequest>,
    ) -> Reply<v1::CancelTaskResponse> {
        let r = req.get_ref();
        let ctx = Self::context(&req, r.meta.as_ref())?;
        let command = Command::Cancel {
            reason: r.reason.clone(),
        };
        let task = self
            .command(&r.task_id, command, &ctx, None, req.metadata())
            .await?;
        Ok(Response::new(v1::CancelTaskResponse { task: Some(task) }))
    }

    async fn transition_phase(
        &self,
        req: Request<v1::TransitionPhaseRequest>,
    ) -> Reply<v1::TransitionPhaseResponse> {
        let r = req.get_ref();
        let ctx = Self::context(&req, r.meta.as_ref())?;
        let to = convert::from_phase("to_phase", r.to_phase).map_err(plain)?;
        let task = self
            .command(
                &r.task_id,
                Command::TransitionPhase { to },
                &ctx,
                None,
                req.metadata(),
            )
            .await?;
        Ok(Response::new(v1::TransitionPhaseResponse {
            task: Some(task),
        }))
    }

    async fn list_task_events(
        &self,
        req: Request<v1::ListTaskEventsRequest>,
    ) -> Reply<v1::ListTaskEventsResponse> {
        let r = req.get_ref();
        let id = convert::task_id("task_id", &r.task_id).map_err(plain)?;
        record_task(&id);
        let size = taskpod_core::store::query::page_size(i64::from(r.page_size)).map_err(plain)?;
        let fp = fingerprint(&(id, r.from_version));
        let from = if r.page_token.is_empty() {
            r.from_version.max(1)
        } else {
            self.tokens
                .verify::<EventsCursor>("page_token", "events", &fp, &r.page_token)
                .map_err(plain)?
                .next_version
        };
        let mut events = self
            .store
            .read_stream(id, from, size + 1)
            .await
            .map_err(plain)?;
        let next_page_token = if events.len() > size {
            events.truncate(size);
            let next_version = events.last().map_or(from, |e| e.version + 1);
            self.tokens
                .sign("events", &fp, &EventsCursor { next_version })
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListTaskEventsResponse {
            events: events.iter().map(convert::event).collect(),
            next_page_token,
        }))
    }

    type WatchTaskStream = ReceiverStream<Result<v1::WatchTaskResponse, Status>>;

    async fn watch_task(&self, req: Request<v1::WatchTaskRequest>) -> Reply<Self::WatchTaskStream> {
        let r = req.get_ref();
        let id = convert::task_id("task_id", &r.task_id).map_err(plain)?;
        record_task(&id);
        // Fail fast on an unknown task rather than in the stream.
        self.store.state(id).await.map_err(plain)?;
        Ok(Response::new(self.watches.watch_task(id, r.from_version)))
    }

    type WatchTasksStream = ReceiverStream<Result<v1::WatchTasksResponse, Status>>;

    async fn watch_tasks(
        &self,
        req: Request<v1::WatchTasksRequest>,
    ) -> Reply<Self::WatchTasksStream> {
        let r = req.get_ref();
        let filter = task_filter(&r.filter, r.criteria.as_ref()).map_err(plain)?;
        let fp = fingerprint(&filter);
        let resume = if r.resume_token.is_empty() {
            None
        } else {
            let token = self
                .tokens
                .verify::<ResumeToken>("resume_token", "watch", &fp, &r.resume_token)
                .map_err(plain)?;
            Some(self.watches.resume_point(token)?)
        };
        let view = listing::view_of(r.view).map_err(plain)?;
        Ok(Response::new(
            self.watches.watch_tasks(filter, fp, resume, view),
        ))
    }
}

/// Now, as the wire wants it.
pub(crate) fn now() -> prost_types::Timestamp {
    convert::timestamp(Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_by_follows_aip_132() {
        assert_eq!(task_order("").unwrap(), TaskOrder::default());
        let o = task_order("priority asc").unwrap();
        assert_eq!(
            (o.field, o.direction),
            (SortField::Priority, SortDirection::Asc)
        );
        assert_eq!(
            task_order("created_at").unwrap().direction,
            SortDirection::Desc
        );
        for bad in ["colour", "priority sideways", "priority asc extra"] {
            assert_eq!(
                task_order(bad).unwrap_err().field(),
                Some("order_by"),
                "{bad}"
            );
        }
    }

    #[test]
    fn criteria_and_filter_combine() {
        let c = v1::TaskCriteria {
            statuses: vec![v1::TaskStatus::Active as i32],
            kinds: vec!["sleep".into()],
            ..Default::default()
        };
        let f = task_filter("priority >= 3", Some(&c)).unwrap();
        assert_eq!(f.statuses, vec![TaskStatus::Active]);
        assert!(f.expr.is_some());
        let bad = v1::TaskCriteria {
            statuses: vec![0],
            ..Default::default()
        };
        assert_eq!(
            task_filter("", Some(&bad)).unwrap_err().field(),
            Some("criteria.statuses")
        );
        assert_eq!(
            task_filter("colour = red", None).unwrap_err().field(),
            Some("filter")
        );
    }
}
