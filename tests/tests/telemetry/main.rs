//! Telemetry end to end: a real `taskpod-api` and `taskpod-worker` export OTLP to a
//! receiver in this test, and serve `/metrics`. One client call's trace must cross both
//! processes (API span -> event metadata -> the pod that acts on it -> the published
//! update -> the watch stream), with the semantic conventions' names and attributes,
//! and the metrics must arrive both ways.
#![allow(clippy::unwrap_used)]

mod cluster;

use std::collections::BTreeSet;
use std::time::Duration;

use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_e2e::otlp::{ReceivedSpan, Receiver};
use taskpod_e2e::worker::WorkerProcess;
use taskpod_proto::v1;

/// The client's own trace: every call below carries it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traced<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    if let Ok(value) = traceparent.parse() {
        req.metadata_mut().insert("traceparent", value);
    }
    req
}

/// Creates a task in the client's trace.
async fn create(
    client: &mut v1::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    kind: &str,
    auto_start: bool,
) -> String {
    client
        .create_task(traced(v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: format!("traced {kind}"),
                kind: kind.into(),
                auto_start,
                ..Default::default()
            }),
            meta: Some(v1::RequestMeta {
                actor_id: "tester".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
        .task_id
}

fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        // Short intervals: the test does not wait for production ones.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".to_owned()),
        ("TASKPOD_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        // The servers' default log level: at `info` the log layer accepts the same
        // spans the span layer does, which once lost the pod's spans (issue 20).
        ("RUST_LOG", "info".to_owned()),
        (
            "TASKPOD_BUS__URL",
            std::env::var("TASKPOD_TEST_REDIS_URL")
                .expect("scripts/test.sh sets TASKPOD_TEST_REDIS_URL"),
        ),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn named<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service == service && s.span.name == name)
        .collect()
}

/// Whether `span` is `ancestor` or below it in `spans`.
fn descends(spans: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut current = span.span_id();
    for _ in 0..32 {
        if current == ancestor.span_id() {
            return true;
        }
        match spans.iter().find(|s| s.span_id() == current) {
            Some(s) => current = s.parent_span_id(),
            None => return false,
        }
    }
    false
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found = named(spans, service, name);
    assert!(
        !found.is_empty(),
        "no {name:?} span from {service}; got {:?}",
        spans
            .iter()
            .map(|s| (&s.service, &s.span.name))
            .collect::<BTreeSet<_>>()
    );
    found[0]
}

#[tokio::test]
async fn one_trace_follows_a_task_from_the_client_through_api_and_worker() {
    let receiver = Receiver::start().await.unwrap();
    let env = otel_env(&receiver.endpoint);
    let db = TestDb::create().await.unwrap();
    let mut worker = WorkerProcess::spawn(&db, "traced", &borrowed(&env))
        .await
        .unwrap();
    let mut api = ApiProcess::spawn(&db, &borrowed(&env)).await.unwrap();
    let mut client = api.client().await.unwrap();
    // The wake-up span below needs the worker subscribed to its partitions' channels,
    // which it does as it claims them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !worker
        .scrape()
        .await
        .is_ok_and(|t| t.contains(r#"taskpod_partitions_owned{node="traced"} 256"#))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker claims its partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fresh process serves its known series at 0: dashboards read 0, not "No data".
    let fresh = worker.scrape().await.unwrap();
    assert!(
        fresh.contains(r#"taskpod_pod_crashes_total{node="traced",cause="node_lost"} 0"#),
        "{fresh}"
    );
    let fresh = api.scrape().await.unwrap();
    assert!(
        fresh.contains(r#"taskpod_tasks_created_total{kind="sleep"} 0"#),
        "{fresh}"
    );

    let task_id = create(&mut client, "sleep", true).await;
    // Follow it to the end: the stream's deliveries are part of the trace too.
    let mut stream = client
        .watch_task(traced(v1::WatchTaskRequest {
            task_id: task_id.clone(),
            from_version: 1,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the task finishes")
        .unwrap()
    {
        if let Some(v1::watch_task_response::Kind::Event(e)) = msg.kind {
            seen.push(e.r#type);
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("task_completed"),
        "{seen:?}"
    );

    // /metrics, with exemplars pointing at the client's trace.
    let api_text = api.scrape().await.unwrap();
    assert!(
        api_text.contains("content-type: application/openmetrics-text"),
        "{api_text}"
    );
    let create_line = api_text
        .lines()
        .find(|l| {
            l.starts_with("rpc_server_call_duration_seconds_bucket")
                && l.contains(r#"rpc_method="taskpod.v1.TaskService/CreateTask""#)
                && l.contains(&format!(r#"trace_id="{TRACE_ID}""#))
        })
        .unwrap_or_else(|| panic!("no CreateTask bucket with the trace's exemplar:\n{api_text}"));
    assert!(
        create_line.contains(r#"rpc_response_status_code="OK""#),
        "{create_line}"
    );
    assert!(
        api_text.contains(r#"taskpod_tasks_created_total{kind="sleep"} 1"#),
        "{api_text}"
    );
    assert!(api_text.contains(r#"db_client_operation_duration_seconds_count{db_system_name="postgresql",db_operation_name="INSERT",db_query_summary="INSERT tasks task_heads events"} 1"#), "{api_text}");
    assert!(api_text.contains(r#"db_client_operation_duration_seconds_count{db_system_name="redis",db_operation_name="PUBLISH""#), "{api_text}");
    assert!(api_text.contains("taskpod_build_info{"), "{api_text}");
    let worker_text = worker.scrape().await.unwrap();
    assert!(
        worker_text.contains(r#"taskpod_tasks_finished_total{status="completed",kind="sleep"} 1"#),
        "{worker_text}"
    );
    assert!(
        worker_text.contains(r#"taskpod_partitions_owned{node="traced"} 256"#),
        "{worker_text}"
    );
    let append_line = worker_text.lines().find(|l| {
        l.starts_with("taskpod_event_append_seconds_bucket")
            && l.contains(r#"writer="pod""#)
            && l.contains(&format!(r#"trace_id="{TRACE_ID}""#))
    });
    assert!(
        append_line.is_some(),
        "the pod's appends point at the task's trace:\n{worker_text}"
    );

    // A drain flushes what the exporters still hold.
    api.terminate().await.unwrap();
    worker.signal("TERM").await.unwrap();
    assert!(api.wait(Duration::from_secs(20)).await.unwrap().success());
    assert!(
        worker
            .wait(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );

    let spans: Vec<ReceivedSpan> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id() == TRACE_ID)
        .collect();
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["taskpod-api", "taskpod-worker"]),
        "one trace spans both processes"
    );

    // The API's server span continues the client's span.
    let create = one(&spans, "taskpod-api", "taskpod.v1.TaskService/CreateTask");
    assert_eq!(create.span.kind, 2, "SERVER");
    assert_eq!(create.parent_span_id(), CLIENT_SPAN);
    assert_eq!(create.attr("rpc.system.name").as_deref(), Some("grpc"));
    assert_eq!(
        create.attr("rpc.method").as_deref(),
        Some("taskpod.v1.TaskService/CreateTask")
    );
    assert_eq!(
        create.attr("rpc.response.status_code").as_deref(),
        Some("OK")
    );
    assert_eq!(create.attr("server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        create.attr("server.port"),
        Some(api.addr.port().to_string())
    );
    let insert = one(&spans, "taskpod-api", "INSERT tasks task_heads events");
    assert_eq!(insert.span.kind, 3, "CLIENT");
    assert!(descends(&spans, insert, create), "{insert:?}");
    assert_eq!(insert.attr("db.system.name").as_deref(), Some("postgresql"));
    assert_eq!(insert.attr("db.operation.name").as_deref(), Some("INSERT"));
    assert_eq!(
        insert.attr("db.query.summary").as_deref(),
        Some("INSERT tasks task_heads events")
    );
    let publish = one(&spans, "taskpod-api", "publish tasks");
    assert_eq!(publish.span.kind, 4, "PRODUCER");
    // The store announces what it committed, inside the write's own span.
    assert!(descends(&spans, publish, create), "{publish:?}");
    assert_eq!(publish.attr("messaging.system").as_deref(), Some("redis"));
    assert_eq!(
        publish.attr("messaging.operation.type").as_deref(),
        Some("send")
    );
    let redis = one(&spans, "taskpod-api", "PUBLISH");
    assert_eq!(redis.parent_span_id(), publish.span_id());
    assert_eq!(redis.attr("db.system.name").as_deref(), Some("redis"));

    // The worker continues the trace the API recorded on the task: claim, pod, phases,
    // completion.
    let claim = one(&spans, "taskpod-worker", "taskpod.pod.claim");
    assert_eq!(claim.parent_span_id(), create.span_id());
    assert_eq!(claim.attr("task_id").as_deref(), Some(task_id.as_str()));
    assert!(
        named(&spans, "taskpod-worker", "UPDATE task_heads")
            .iter()
            .any(|s| descends(&spans, s, claim)),
        "the mint statement runs in the claim"
    );
    let pod = one(&spans, "taskpod-worker", "taskpod.pod");
    assert_eq!(pod.parent_span_id(), claim.span_id());
    assert_eq!(pod.attr("task_id").as_deref(), Some(task_id.as_str()));
    assert_eq!(pod.attr("taskpod.exit").as_deref(), Some("completed"));
    for phase in [
        "phase spec_clarification",
        "phase planning",
        "phase development",
        "phase review",
    ] {
        let p = one(&spans, "taskpod-worker", phase);
        assert_eq!(p.parent_span_id(), pod.span_id(), "{phase}");
    }
    let review = one(&spans, "taskpod-worker", "phase review");
    let complete = one(&spans, "taskpod-worker", "taskpod.task.complete");
    assert_eq!(complete.parent_span_id(), review.span_id());
    let stop = one(&spans, "taskpod-worker", "taskpod.pod.stop");
    assert_eq!(stop.parent_span_id(), pod.span_id());
    // The worker's wake-up consumed the API's announcement, linked to it.
    let woken = one(&spans, "taskpod-worker", "process partition");
    assert_eq!(woken.span.kind, 5, "CONSUMER");
    assert!(
        woken
            .span
            .links
            .iter()
            .any(|l| taskpod_e2e::otlp::hex(&l.trace_id) == TRACE_ID),
        "{woken:?}"
    );
    // The watch stream delivered the pod's events, each continuing the span that wrote
    // it: the completion among them.
    let delivered = named(&spans, "taskpod-api", "process task");
    assert!(
        delivered
            .iter()
            .any(|d| d.parent_span_id() == complete.span_id()
                && d.attr("task_id").as_deref() == Some(task_id.as_str())),
        "the completion's delivery continues the completing span"
    );
    assert!(
        delivered
            .iter()
            .all(|d| d.span.kind == 5 && !d.span.links.is_empty())
    );

    // Metrics over OTLP, named by the conventions.
    let metrics = receiver.metrics();
    let names: BTreeSet<(&str, &str)> = metrics
        .iter()
        .map(|m| (m.service.as_str(), m.metric.name.as_str()))
        .collect();
    for (service, name) in [
        ("taskpod-api", "rpc.server.call.duration"),
        ("taskpod-api", "db.client.operation.duration"),
        ("taskpod-api", "taskpod.tasks.created"),
        ("taskpod-api", "taskpod.event.append"),
        ("taskpod-api", "taskpod.watch.streams"),
        ("taskpod-api", "taskpod.watch.lag"),
        ("taskpod-api", "taskpod.build.info"),
        ("taskpod-worker", "db.client.operation.duration"),
        ("taskpod-worker", "taskpod.tasks.finished"),
        ("taskpod-worker", "taskpod.task.duration"),
        ("taskpod-worker", "taskpod.pods.running"),
        ("taskpod-worker", "taskpod.partitions.owned"),
        ("taskpod-worker", "taskpod.pods.pending"),
        ("taskpod-worker", "taskpod.event.append"),
        ("taskpod-worker", "taskpod.build.info"),
    ] {
        assert!(
            names.contains(&(service, name)),
            "{service} did not export {name}: {names:?}"
        );
    }
    let rpc = metrics
        .iter()
        .find(|m| m.metric.name == "rpc.server.call.duration")
        .unwrap();
    assert_eq!(rpc.metric.unit, "s");
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_a_bad_exporter_is_refused() {
    let receiver = Receiver::start().await.unwrap();
    let db = TestDb::create().await.unwrap();
    // No OTEL_EXPORTER_OTLP_ENDPOINT: the API serves, traces nothing, and still passes
    // the caller's trace context on to the events.
    let api = ApiProcess::spawn(&db, &[("TASKPOD_METRICS_LISTEN", "127.0.0.1:0")])
        .await
        .unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let mut client = api.client().await.unwrap();
    let task_id = create(&mut client, "manual", false).await;
    let events = client
        .list_task_events(v1::ListTaskEventsRequest {
            task_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events[0].traceparent,
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"),
        "passed on unchanged"
    );
    let text = api.scrape().await.unwrap();
    assert!(
        text.contains("rpc_server_call_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        !text.contains("trace_id="),
        "no exemplars without traces:\n{text}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.spans().is_empty() && receiver.metrics().is_empty());

    // An exporter this build does not have is refused at start, by name, with exit 2.
    let binary = taskpod_e2e::binary("taskpod-api").unwrap();
    let out = tokio::process::Command::new(binary)
        .env("TASKPOD_STORE__URL", &db.url)
        .env("TASKPOD_AUTH__ENABLED", "false")
        .env(
            "TASKPOD_PAGE_TOKENS__CURRENT_KEY",
            taskpod_e2e::api::PAGE_KEY,
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{stderr}");
}
