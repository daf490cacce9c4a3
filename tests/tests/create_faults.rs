//! CreateTask under the store faults only a network causes (issue 13, defects 4 and 5):
//! a group-committed batch whose COMMIT answer is lost (an ambiguous commit), and store
//! connections that go silent right after their COMMIT (a partition between one replica
//! and Postgres). One API replica reaches Postgres through a fault proxy; assertions
//! read the store directly and hold it to what each client was told: every create is
//! stored at most once, acknowledged ones always, and nothing a client was told failed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::WAIT;
use taskpod_e2e::chaos::history::Outcome;
use taskpod_e2e::cluster::{Cluster, ClusterSpec};
use taskpod_e2e::proxy::{Delivery, FaultProxy};
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient};
use tonic::Code;
use tonic::transport::Channel;

type Client = TaskServiceClient<Channel>;

/// CreateTask calls per run.
const CALLS: usize = 300;
/// Calls in flight at once: enough to fill batches, few enough that a run is many
/// batches (each a COMMIT the proxy can cut).
const IN_FLIGHT: usize = 50;
/// COMMIT answers lost per run.
const CUTS: u64 = 5;
/// The most a call may take to answer, fault or not: well past the replica's call
/// bound (a few seconds), far below the minutes a silent TCP connection takes to die.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// One CreateTask a client makes: its title is unique to it (a request sent twice
/// with one request id shares its title).
#[derive(Clone, Debug)]
struct Create {
    title: String,
    request_id: Option<String>,
    auto_start: bool,
}

impl Create {
    fn request(&self) -> v1::CreateTaskRequest {
        v1::CreateTaskRequest {
            task: Some(v1::TaskSpec {
                title: self.title.clone(),
                kind: "manual".into(),
                auto_start: self.auto_start,
                ..Default::default()
            }),
            meta: Some(v1::RequestMeta {
                actor_id: "tester".into(),
                request_id: self.request_id.clone().unwrap_or_default(),
                ..Default::default()
            }),
        }
    }
}

/// `CALLS` creates titled `{prefix}-{i}`, every third one auto-started.
fn creates(prefix: &str, with_request_ids: bool) -> Vec<Create> {
    (0..CALLS)
        .map(|i| Create {
            title: format!("{prefix}-{i}"),
            request_id: with_request_ids.then(|| format!("{prefix}-rid-{i}")),
            auto_start: i % 3 == 0,
        })
        .collect()
}

/// Sends `create` once; a call with no answer within [`ANSWER_WITHIN`] is `None`.
async fn send(mut client: Client, create: &Create) -> Option<Outcome> {
    let answer = tokio::time::timeout(ANSWER_WITHIN, client.create_task(create.request())).await;
    Some(match answer.ok()? {
        Ok(r) => Outcome::Ok {
            task_id: r.into_inner().task_id,
            status: None,
        },
        Err(status) => Outcome::from_status(&status),
    })
}

/// Sends every create, `in_flight` at a time; answers in `creates`' order.
async fn send_all(client: &Client, creates: &[Create], in_flight: usize) -> Vec<Option<Outcome>> {
    let mut answers: Vec<(usize, Option<Outcome>)> =
        futures::stream::iter(creates.iter().enumerate())
            .map(|(i, c)| {
                let client = client.clone();
                async move { (i, send(client, c).await) }
            })
            .buffer_unordered(in_flight)
            .collect()
            .await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

/// Loses the answer of up to `cuts` COMMITs (Postgres commits each), one at a time,
/// until `done`; returns how many were lost.
async fn cut_commits(proxy: &FaultProxy, cuts: u64, done: &AtomicBool) -> u64 {
    let before = proxy.resets();
    for n in 1..=cuts {
        proxy.reset_once_on(b"COMMIT", Delivery::Deliver);
        while proxy.resets() < before + n && !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
    }
    proxy.heal();
    proxy.resets() - before
}

/// Sends every create, [`IN_FLIGHT`] at a time, while the answers of [`CUTS`] COMMITs
/// are lost; answers in `creates`' order.
async fn send_all_losing_commits(
    cluster: &Cluster,
    client: &Client,
    creates: &[Create],
) -> Vec<Option<Outcome>> {
    let done = AtomicBool::new(false);
    let (answers, cuts) = tokio::join!(
        async {
            let answers = send_all(client, creates, IN_FLIGHT).await;
            done.store(true, Ordering::Relaxed);
            answers
        },
        cut_commits(proxy(cluster), CUTS, &done),
    );
    assert!(cuts > 0, "no COMMIT answer was lost");
    eprintln!("{cuts} COMMIT answers lost");
    answers
}

/// Every task whose title starts with `prefix`: title -> ids.
async fn stored(cluster: &Cluster, prefix: &str) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT title, task_id::text FROM tasks WHERE title LIKE $1 || '-%'")
            .bind(prefix)
            .fetch_all(cluster.pool())
            .await
            .unwrap();
    let mut by_title: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (title, id) in rows {
        by_title.entry(title).or_default().push(id);
    }
    by_title
}

/// Holds the store to the answers: no title stored twice, every acknowledged create
/// stored under the id its client got, nothing stored that a client was told failed,
/// and every error that leaves the outcome open an UNAVAILABLE or DEADLINE_EXCEEDED
/// (never INTERNAL). So tasks stored = acknowledged + some of the unknown ones.
fn check_exactly_once(
    creates: &[Create],
    answers: &[Option<Outcome>],
    stored: &BTreeMap<String, Vec<String>>,
) {
    let twice: Vec<_> = stored.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{} titles stored more than once (of {} stored), e.g. {:?}",
        twice.len(),
        stored.values().map(Vec::len).sum::<usize>(),
        twice.first()
    );
    // Per title (a request sent twice is one title): acknowledged if any of its calls
    // was, else open if any of its calls' outcome is.
    let mut acked = std::collections::HashSet::new();
    let mut open = std::collections::HashSet::new();
    for (create, answer) in creates.iter().zip(answers) {
        let ids = stored.get(&create.title);
        match answer {
            Some(Outcome::Ok { task_id, .. }) => {
                acked.insert(create.title.as_str());
                assert_eq!(
                    ids,
                    Some(&vec![task_id.clone()]),
                    "{} was acknowledged as {task_id}",
                    create.title
                );
            }
            Some(Outcome::Unknown { code, message }) => {
                open.insert(create.title.as_str());
                assert!(
                    matches!(code, Code::Unavailable | Code::DeadlineExceeded),
                    "{}: an open outcome must say so: {code:?} {message}",
                    create.title
                );
            }
            Some(Outcome::Fail { code, message, .. }) => {
                assert!(
                    ids.is_none(),
                    "{} is stored though its call failed: {code:?} {message}",
                    create.title
                );
            }
            None => panic!("{} got no answer within {ANSWER_WITHIN:?}", create.title),
        }
    }
    let open: Vec<&str> = open.difference(&acked).copied().collect();
    let stored_open = open.iter().filter(|t| stored.contains_key(**t)).count();
    eprintln!(
        "{} calls: {} titles acknowledged, {} open ({stored_open} of them stored); {} stored",
        creates.len(),
        acked.len(),
        open.len(),
        stored.len()
    );
    let asked: std::collections::HashSet<&str> = creates.iter().map(|c| c.title.as_str()).collect();
    assert!(
        stored.keys().all(|t| asked.contains(t.as_str())),
        "a stored task nobody asked for"
    );
    assert_eq!(
        stored.len(),
        acked.len() + stored_open,
        "stored = acknowledged + those of the open outcomes that were stored"
    );
}

fn proxied_cluster() -> ClusterSpec {
    ClusterSpec::new(1, 1)
        .api_via_proxy(0)
        .api_env("TASKPOD_METRICS_LISTEN", "127.0.0.1:0")
}

fn proxy(cluster: &Cluster) -> &FaultProxy {
    cluster.api("api1").unwrap().proxy().unwrap()
}

/// How many times the replica ran the statement that inserts tasks.
async fn task_inserts(cluster: &Cluster) -> u64 {
    let announced = cluster.api("api1").unwrap().process().announced();
    let (_, addr) = announced.split_once(" metrics on ").unwrap();
    let text = taskpod_e2e::scrape_metrics(addr.trim()).await.unwrap();
    let wanted = r#"db_query_summary="INSERT tasks task_heads events"}"#;
    text.lines()
        .filter(|l| l.starts_with("db_client_operation_duration_seconds_count{"))
        .find(|l| l.contains(wanted))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Defect 4: a create batch whose COMMIT answer was lost was replayed request by
/// request with fresh ids, storing each of its tasks twice (and running the
/// auto-started ones twice).
#[tokio::test]
async fn regression_creates_whose_commit_answer_is_lost_are_stored_once() {
    let cluster = Cluster::start(proxied_cluster()).await.unwrap();
    let client = cluster.api("api1").unwrap().client().unwrap();
    let creates = creates("plain", false);
    let answers = send_all_losing_commits(&cluster, &client, &creates).await;
    check_exactly_once(&creates, &answers, &stored(&cluster, "plain").await);
}

/// Defect 4 with request ids: the same under lost COMMIT answers, a request sent twice
/// at once shares one task, a retry with the request id gets the task its first
/// answer named (or would have), and such creates share transactions too (they ran
/// one transaction each).
#[tokio::test]
async fn regression_creates_with_request_ids_are_group_committed_and_stored_once() {
    let cluster = Cluster::start(proxied_cluster()).await.unwrap();
    let client = cluster.api("api1").unwrap().client().unwrap();
    let mut creates = creates("keyed", true);
    // Twenty requests sent twice, the copies among the others.
    let copies: Vec<Create> = creates.iter().step_by(15).cloned().collect();
    for (n, copy) in copies.into_iter().enumerate() {
        creates.insert(n * 14 + 7, copy);
    }
    let inserts_before = task_inserts(&cluster).await;
    let answers = send_all_losing_commits(&cluster, &client, &creates).await;
    let inserts = task_inserts(&cluster).await - inserts_before;
    eprintln!("{} creates, {inserts} task inserts", creates.len());

    // Every request, retried with its request id until answered, names one task: the
    // one its first answer named, if it got one.
    let mut settled: BTreeMap<String, String> = BTreeMap::new();
    for (create, first) in creates.iter().zip(&answers) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let id = loop {
            match send(client.clone(), create).await {
                Some(Outcome::Ok { task_id, .. }) => break task_id,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "{}: no answer to its retries: {other:?}",
                    create.title
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(Outcome::Ok { task_id, .. }) = first {
            assert_eq!(&id, task_id, "{}: a retry names another task", create.title);
        }
        let earlier = settled.insert(create.title.clone(), id.clone());
        assert!(
            earlier.is_none_or(|e| e == id),
            "{}: one request id, two tasks",
            create.title
        );
    }
    let stored = stored(&cluster, "keyed").await;
    check_exactly_once(&creates, &answers, &stored);
    assert_eq!(stored.len(), CALLS, "every request is stored once retried");
    for (title, id) in &settled {
        assert_eq!(stored.get(title), Some(&vec![id.clone()]), "{title}");
    }
    assert!(
        inserts < (CALLS / 2) as u64,
        "{CALLS} creates with request ids ran {inserts} inserts: they did not share \
         transactions"
    );
}

/// Defect 5: with four store connections silent after their COMMIT (each holding one
/// flush of the replica's four), every create on the replica timed out, while reads
/// through the same proxy answered at once. Now the stuck creates answer within the
/// call bound, as unavailable; the 300 creates sent while they hang all succeed, and so
/// do creates after them, the four connections still silent; reads answer throughout;
/// nothing is stored twice.
#[tokio::test]
async fn regression_silent_store_connections_do_not_stall_creates() {
    let cluster = Cluster::start(proxied_cluster()).await.unwrap();
    let client = cluster.api("api1").unwrap().client().unwrap();
    let warm = Create {
        title: "warm-up".into(),
        request_id: None,
        auto_start: false,
    };
    let Some(Outcome::Ok {
        task_id: read_id, ..
    }) = send(client.clone(), &warm).await
    else {
        panic!("the warm-up create failed");
    };

    let done = AtomicBool::new(false);
    let (answers, reads) = tokio::join!(
        async {
            let answers = creates_while_four_commits_hang(&cluster, &client).await;
            done.store(true, Ordering::Relaxed);
            answers
        },
        read_until(client.clone(), &read_id, &done),
    );
    let (stuck, sent) = answers;
    let refused: Vec<_> = reads.iter().filter(|r| r.is_err()).collect();
    assert!(
        refused.is_empty(),
        "{} of {} reads failed while creates hung, e.g. {:?}",
        refused.len(),
        reads.len(),
        refused.first()
    );
    let failed: Vec<_> = sent
        .creates
        .iter()
        .zip(&sent.answers)
        .filter(|(_, a)| !matches!(a, Some(Outcome::Ok { .. })))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of the {CALLS} creates sent while four transactions hung failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );

    // The four stay silent: later creates go through all the same.
    let mut later = Vec::new();
    for i in 0..20 {
        let create = Create {
            title: format!("silent-later-{i}"),
            request_id: None,
            auto_start: false,
        };
        let answer = send(client.clone(), &create).await;
        assert!(
            matches!(answer, Some(Outcome::Ok { .. })),
            "a create after the stuck ones failed: {answer:?}"
        );
        later.push((create, answer));
    }
    proxy(&cluster).heal();

    let mut all: Vec<(Create, Option<Outcome>)> =
        stuck.creates.into_iter().zip(stuck.answers).collect();
    all.extend(sent.creates.into_iter().zip(sent.answers));
    all.extend(later);
    let (all_creates, all_answers): (Vec<_>, Vec<_>) = all.into_iter().unzip();
    check_exactly_once(
        &all_creates,
        &all_answers,
        &stored(&cluster, "silent").await,
    );
}

/// Creates sent, and what each was answered.
struct Sent {
    creates: Vec<Create>,
    answers: Vec<Option<Outcome>>,
}

/// Four creates, one after the other, each left hanging on a connection that went
/// silent after its COMMIT; then [`CALLS`] creates at once while those four hang.
/// Returns the four, then the others.
async fn creates_while_four_commits_hang(cluster: &Cluster, client: &Client) -> (Sent, Sent) {
    let proxy = proxy(cluster);
    proxy.silence_on(b"COMMIT", 4);
    let stuck: Vec<Create> = (0..4)
        .map(|i| Create {
            title: format!("silent-stuck-{i}"),
            request_id: None,
            auto_start: false,
        })
        .collect();
    let mut hanging = Vec::new();
    for (n, create) in (1..).zip(&stuck) {
        let (client, create) = (client.clone(), create.clone());
        hanging.push(tokio::spawn(async move { send(client, &create).await }));
        let deadline = tokio::time::Instant::now() + WAIT;
        while proxy.silenced() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "COMMIT {n} never went silent"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // All at once, as in the report.
    let creates = creates("silent", false);
    let answers = send_all(client, &creates, CALLS).await;
    let mut stuck_answers = Vec::new();
    for hung in hanging {
        stuck_answers.push(hung.await.unwrap());
    }
    (
        Sent {
            creates: stuck,
            answers: stuck_answers,
        },
        Sent { creates, answers },
    )
}

/// GetTask of `id` every 100 ms until `done`; each answer, or the failure (one with no
/// answer within [`ANSWER_WITHIN`] included).
async fn read_until(mut client: Client, id: &str, done: &AtomicBool) -> Vec<Result<(), String>> {
    let mut reads = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let read = client.get_task(v1::GetTaskRequest {
            task_id: id.to_owned(),
        });
        reads.push(match tokio::time::timeout(ANSWER_WITHIN, read).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{:?} {}", status.code(), status.message())),
            Err(_) => Err("no answer".into()),
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reads
}
