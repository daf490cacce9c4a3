//! The API's limits against real processes: a caller over its rate or its calls in
//! flight is refused with RESOURCE_EXHAUSTED while another is served, streams are
//! counted per caller, and a connection that opens streams past the HTTP/2 limit gets
//! them refused (raw HTTP/2 frames, so no client library queues them politely).
//! Counts and sizes, never times.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::time::Duration;

use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

type Client = TaskServiceClient<Channel>;

fn tokens() -> String {
    format!(
        "[{{principal=\"noisy\", sha256=\"{}\"}}, {{principal=\"quiet\", sha256=\"{}\"}}]",
        taskpod_api::auth::token_hash("noisy-token"),
        taskpod_api::auth::token_hash("quiet-token"),
    )
}

fn with_token<T>(token: Option<&str>, message: T) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

async fn list(c: &mut Client, token: Option<&str>) -> Result<(), Status> {
    c.list_tasks(with_token(
        token,
        v1::ListTasksRequest {
            page_size: 1,
            ..Default::default()
        },
    ))
    .await
    .map(drop)
}

fn exhausted_with_retry(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted && s.get_error_details().retry_info().is_some()
}

async fn db() -> TestDb {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    db
}

#[tokio::test]
async fn regression_a_caller_over_its_rate_is_refused_while_another_is_served() {
    let db = db().await;
    let tokens = tokens();
    let api = ApiProcess::spawn(
        &db,
        &[
            ("TASKPOD_AUTH__ENABLED", "true"),
            ("TASKPOD_AUTH__TOKENS", &tokens),
            ("TASKPOD_LIMITS__PER_CALLER_RATE", "1"),
            ("TASKPOD_LIMITS__PER_CALLER_BURST", "20"),
        ],
    )
    .await
    .unwrap();
    let mut noisy = api.client().await.unwrap();
    let mut quiet = api.client().await.unwrap();
    let mut refused = 0;
    let mut other = Vec::new();
    for _ in 0..200 {
        match list(&mut noisy, Some("noisy-token")).await {
            Ok(()) => {}
            Err(s) if exhausted_with_retry(&s) => refused += 1,
            Err(s) => other.push(s),
        }
    }
    assert!(other.is_empty(), "{other:?}");
    // 20 at once, then one a second: the 200 calls take far less than 100 s.
    assert!(refused >= 100, "only {refused} of 200 refused");
    for _ in 0..10 {
        list(&mut quiet, Some("quiet-token")).await.unwrap();
    }
    // Without a valid token a caller is limited by its address, before authentication.
    let mut anonymous = Vec::new();
    for _ in 0..100 {
        anonymous.push(list(&mut quiet, None).await.unwrap_err().code());
    }
    assert!(anonymous.contains(&Code::Unauthenticated));
    assert!(
        anonymous.contains(&Code::ResourceExhausted),
        "{anonymous:?}"
    );
}

#[tokio::test]
async fn regression_calls_and_streams_in_flight_are_bounded_per_caller() {
    let db = db().await;
    let api = ApiProcess::spawn(
        &db,
        &[
            // StartPod waits for a pod no worker will run: a call that stays in flight.
            ("TASKPOD_POD_WAIT_MS", "4000"),
            ("TASKPOD_LIMITS__PER_CALLER_IN_FLIGHT", "2"),
            ("TASKPOD_LIMITS__PER_CALLER_STREAMS", "3"),
        ],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = c
            .create_task(v1::CreateTaskRequest {
                task: Some(v1::TaskSpec {
                    title: format!("waits {i}"),
                    kind: "manual".into(),
                    ..Default::default()
                }),
                meta: Some(v1::RequestMeta {
                    actor_id: "a".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .task_id;
        ids.push(id);
    }
    let start = |id: String| {
        let mut c = c.clone();
        async move {
            c.start_pod(v1::StartPodRequest {
                task_id: id,
                meta: Some(v1::RequestMeta {
                    actor_id: "a".into(),
                    ..Default::default()
                }),
            })
            .await
        }
    };
    let first = tokio::spawn(start(ids[0].clone()));
    let second = tokio::spawn(start(ids[1].clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = start(ids[2].clone()).await.unwrap_err();
    assert!(exhausted_with_retry(&third), "{third:?}");
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    start(ids[2].clone()).await.unwrap();

    // Streams are counted apart from calls.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            c.watch_tasks(v1::WatchTasksRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let fourth = c
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap_err();
    assert!(exhausted_with_retry(&fourth), "{fourth:?}");
    list(&mut c, None).await.unwrap();
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap();
}

/// Defect: tonic left the streams one connection may open unlimited. A client that
/// ignores the server's SETTINGS and opens 3,000 streams gets every one past the limit
/// refused (RST_STREAM REFUSED_STREAM, or GOAWAY), and the replica does not grow.
#[tokio::test]
async fn regression_a_stream_flood_on_one_connection_is_refused_without_growth() {
    let db = db().await;
    let api = ApiProcess::spawn(
        &db,
        &[("TASKPOD_LIMITS__HTTP2_MAX_CONCURRENT_STREAMS", "100")],
    )
    .await
    .unwrap();
    let mut c = api.client().await.unwrap();
    list(&mut c, None).await.unwrap();
    let before = api.rss_kib().unwrap();

    let addr = api.addr;
    let flood = tokio::task::spawn_blocking(move || h2_flood(addr, 3_000))
        .await
        .unwrap();
    assert!(
        flood.accepted <= 100,
        "{} streams were accepted past the limit of 100: {flood:?}",
        flood.accepted
    );
    assert_eq!(flood.opened, 3_000);
    eprintln!("{flood:?}");
    // The replica still serves, and did not grow by the flood.
    list(&mut c, None).await.unwrap();
    let after = api.rss_kib().unwrap();
    assert!(
        after < before + before / 10 + 4096,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[derive(Debug, Default)]
struct Flood {
    opened: u32,
    refused: u32,
    goaway_last_stream: Option<u32>,
    accepted: u32,
}

/// Opens `n` WatchTasks streams on one raw HTTP/2 connection without waiting for the
/// server's SETTINGS or answers, then reads what the server said about them.
fn h2_flood(addr: std::net::SocketAddr, n: u32) -> Flood {
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    let block = request_headers("/taskpod.v1.TaskService/WatchTasks");
    for i in 0..n {
        // HEADERS with END_HEADERS, without END_STREAM: each stream stays open.
        frame(&mut out, 0x1, 0x4, 2 * i + 1, &block);
    }
    // The server may close the connection mid-write; what it said is read below.
    let _ = sock.write_all(&out);
    let mut flood = Flood {
        opened: n,
        ..Flood::default()
    };
    let mut inbox = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => inbox.extend_from_slice(&buf[..k]),
        }
    }
    let mut refused_ids = Vec::new();
    let mut at = 0;
    while inbox.len() >= at + 9 {
        let word =
            |i: usize| u32::from_be_bytes([inbox[i], inbox[i + 1], inbox[i + 2], inbox[i + 3]]);
        let len = (word(at) >> 8) as usize;
        let kind = inbox[at + 3];
        let stream = word(at + 5) & 0x7fff_ffff;
        if inbox.len() < at + 9 + len {
            break;
        }
        let p = at + 9;
        match kind {
            // RST_STREAM REFUSED_STREAM (7)
            0x3 if len == 4 && word(p) == 7 => refused_ids.push(stream),
            0x7 if len >= 8 => flood.goaway_last_stream = Some(word(p) & 0x7fff_ffff),
            _ => {}
        }
        at += 9 + len;
    }
    // Streams above the last one a GOAWAY names were not processed; of the rest, those
    // reset as REFUSED_STREAM were not accepted either.
    let last = flood.goaway_last_stream.unwrap_or(u32::MAX);
    let processed = (0..n).map(|i| 2 * i + 1).filter(|id| *id <= last).count() as u32;
    flood.refused = refused_ids.iter().filter(|id| **id <= last).count() as u32;
    flood.accepted = processed.saturating_sub(flood.refused);
    flood
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK block for a gRPC POST to `path`: static-table entries and literals without
/// indexing, no Huffman coding (every length below 127).
fn request_headers(path: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    literal_indexed_name(&mut b, 4, path); // :path
    literal_indexed_name(&mut b, 1, "localhost"); // :authority
    literal(&mut b, "content-type", "application/grpc");
    literal(&mut b, "te", "trailers");
    b
}

fn literal_indexed_name(b: &mut Vec<u8>, index: u8, value: &str) {
    b.push(index); // 0000xxxx: literal without indexing, indexed name
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
}

fn literal(b: &mut Vec<u8>, name: &str, value: &str) {
    b.push(0);
    b.push(name.len() as u8);
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
}

/// A stream lives at most `stream_max_age_secs`, then ends with UNAVAILABLE: its client
/// resumes, and no stream holds a replica's resources forever.
#[tokio::test]
async fn a_stream_past_its_age_ends_with_unavailable() {
    use futures::StreamExt as _;
    let db = db().await;
    let api = ApiProcess::spawn(&db, &[("TASKPOD_LIMITS__STREAM_MAX_AGE_SECS", "1")])
        .await
        .unwrap();
    let mut c = api.client().await.unwrap();
    let mut s = c
        .watch_tasks(v1::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends");
    let status = end.expect("with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("age limit"), "{status:?}");
}
