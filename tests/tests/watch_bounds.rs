//! WatchTasks streams whose cost follows the stream: what a stream remembers is what it
//! follows, a resumed stream sends `left` only for a task its client held, no version is
//! sent twice without a resume, tokens expire, and a draining replica hands every stream
//! a last resume point. Real API processes against a real Postgres; counts, never times.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt as _;
use taskpod_e2e::api::{ApiProcess, TestDb};
use taskpod_proto::v1::{self, task_service_client::TaskServiceClient, watch_tasks_response::Kind};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type Client = TaskServiceClient<Channel>;

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        actor_id: "watch-bounds-test".into(),
        ..Default::default()
    })
}

fn spec(kind: &str, title: &str) -> v1::TaskSpec {
    v1::TaskSpec {
        title: title.into(),
        kind: kind.into(),
        ..Default::default()
    }
}

async fn create(c: &mut Client, kind: &str, title: &str) -> String {
    c.create_task(v1::CreateTaskRequest {
        task: Some(spec(kind, title)),
        meta: meta(),
    })
    .await
    .unwrap()
    .into_inner()
    .task_id
}

/// Creates `n` tasks of `kind` in batches; their ids.
async fn create_many(c: &mut Client, kind: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let tasks = (start..n.min(start + 1000))
            .map(|i| spec(kind, &format!("flood {i}")))
            .collect();
        let created = c
            .create_tasks(v1::CreateTasksRequest {
                tasks,
                meta: meta(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(created.task_ids);
    }
    ids
}

async fn start(c: &mut Client, id: &str) {
    c.start_pod(v1::StartPodRequest {
        task_id: id.into(),
        meta: meta(),
    })
    .await
    .unwrap();
}

async fn stop(c: &mut Client, id: &str) {
    c.stop_pod(v1::StopPodRequest {
        task_id: id.into(),
        reason: "test".into(),
        meta: meta(),
    })
    .await
    .unwrap();
}

async fn watch(
    c: &mut Client,
    filter: &str,
    resume_token: &str,
) -> Streaming<v1::WatchTasksResponse> {
    c.watch_tasks(v1::WatchTasksRequest {
        filter: filter.into(),
        resume_token: resume_token.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// A received message in short: `task <id> v<version>`, `left <id>`, `beat`, `done`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Task(String, i64),
    Left(String),
    Beat,
    Done,
}

async fn next(stream: &mut Streaming<v1::WatchTasksResponse>) -> (Seen, String) {
    let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the stream stalled")
        .expect("the stream ended")
        .unwrap();
    let seen = match m.kind.unwrap() {
        Kind::Task(t) => Seen::Task(t.task_id, t.version),
        Kind::Left(l) => Seen::Left(l.task_id),
        Kind::Heartbeat(_) => Seen::Beat,
        Kind::SnapshotDone(_) => Seen::Done,
    };
    (seen, m.resume_token)
}

/// Reads until `until` holds for a message; everything read, and the last token.
async fn read_until(
    stream: &mut Streaming<v1::WatchTasksResponse>,
    until: impl Fn(&Seen) -> bool,
) -> (Vec<Seen>, String) {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (seen, t) = next(stream).await;
        if !t.is_empty() {
            token = t;
        }
        let stop = until(&seen);
        all.push(seen);
        if stop {
            return (all, token);
        }
    }
}

/// The versions of `id` among `seen`, in the order they came.
fn versions_of(seen: &[Seen], id: &str) -> Vec<i64> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Task(t, v) if t == id => Some(*v),
            _ => None,
        })
        .collect()
}

fn gauge(metrics: &str, name: &str) -> i64 {
    taskpod_e2e::metric_count(metrics, name)
}

async fn api(db: &TestDb, extra: &[(&str, &str)]) -> ApiProcess {
    let mut env = vec![
        ("TASKPOD_POD_WAIT_MS", "0"),
        ("TASKPOD_METRICS_LISTEN", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra);
    ApiProcess::spawn(db, &env).await.unwrap()
}

/// A database offering `manual` tasks, one API replica on it, and a client. The
/// database is returned to live as long as the test.
async fn manual_api() -> (TestDb, ApiProcess, Client) {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let api = api(&db, &[]).await;
    let c = api.client().await.unwrap();
    (db, api, c)
}

/// Defect: every stream kept a version for every task changed anywhere in the cluster,
/// forever (a narrow dashboard grew a replica by ~75 bytes per task created elsewhere).
#[tokio::test]
async fn regression_a_narrow_watch_keeps_only_the_tasks_it_follows() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["narrow", "other"], &[]).await.unwrap();
    let api = api(&db, &[]).await;
    let mut c = api.client().await.unwrap();
    for i in 0..3 {
        create(&mut c, "narrow", &format!("followed {i}")).await;
    }
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = watch(&mut c, r#"kind = "narrow""#, "").await;
        let (seen, _) = read_until(&mut s, |s| *s == Seen::Done).await;
        assert_eq!(seen.len(), 4, "the snapshot: {seen:?}");
        streams.push(s);
    }
    let flood = create_many(&mut c, "other", 5_000).await;
    for id in flood.iter().take(200) {
        start(&mut c, id).await;
    }
    // Created after the flood committed: once a stream shows it, it has read past it.
    let last = create(&mut c, "narrow", "the last").await;
    for s in &mut streams {
        let (seen, _) = read_until(s, |s| matches!(s, Seen::Task(id, _) if *id == last)).await;
        assert!(
            seen.iter()
                .all(|s| matches!(s, Seen::Beat | Seen::Task(..))),
            "only the new narrow task: {seen:?}"
        );
    }
    let metrics = api.scrape().await.unwrap();
    assert_eq!(
        gauge(&metrics, "taskpod_watch_tracked"),
        5 * 4,
        "five streams following four tasks each"
    );
    drop(streams);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = api.scrape().await.unwrap();
    assert_eq!(
        gauge(&metrics, "taskpod_watch_tracked"),
        0,
        "closed streams keep nothing"
    );
}

/// Defect: after a resume, every change of a task that did not match was sent as
/// `left`, forever; now only a task that matched at the resume point leaves.
#[tokio::test]
async fn regression_a_resumed_watch_sends_left_only_for_tasks_its_client_held() {
    let (_db, _api, mut c) = manual_api().await;
    let held = create(&mut c, "manual", "held").await;
    start(&mut c, &held).await;
    let still = create(&mut c, "manual", "still active").await;
    start(&mut c, &still).await;
    let mut s = watch(&mut c, "status = active", "").await;
    let (snapshot, token) = read_until(&mut s, |s| *s == Seen::Done).await;
    assert_eq!(snapshot.len(), 3, "{snapshot:?}");
    drop(s);
    // A task that matched within a second or two of the token may be one the client
    // held (the token's time is in seconds, with a margin for clocks): what follows is
    // later than that.
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    // 300 tasks that never matched; 20 that matched and stopped while the client was
    // away (it never held them); the one it held stops.
    let never = create_many(&mut c, "manual", 300).await;
    for id in never.iter().take(20) {
        start(&mut c, id).await;
        stop(&mut c, id).await;
    }
    stop(&mut c, &held).await;

    let mut resumed = watch(&mut c, "status = active", &token).await;
    let marker = create(&mut c, "manual", "marker").await;
    start(&mut c, &marker).await;
    let (seen, _) = read_until(
        &mut resumed,
        |s| matches!(s, Seen::Task(id, _) if *id == marker),
    )
    .await;
    let lefts: Vec<&Seen> = seen.iter().filter(|s| matches!(s, Seen::Left(_))).collect();
    assert_eq!(lefts, vec![&Seen::Left(held.clone())], "{seen:?}");
    // The token's watermark trails this database's open writers: when one was still
    // open while the stream began, `still`'s start sits above the token, and the resumed
    // stream may repeat that version (a repeat after a resume, never a skip); it never
    // reports `still` as leaving, nor at another version.
    assert!(
        seen.iter()
            .filter(|s| matches!(s, Seen::Task(id, _) if *id == still))
            .all(|s| *s == Seen::Task(still.clone(), 2)),
        "an unchanged task comes back only as it was: {seen:?}"
    );
}

/// Found by CI: a stream's token trails what its snapshot showed when a transaction of
/// the database was open as it began (the snapshot reads rows as they are, the token
/// names the watermark). Resumed from it, the stream rebuilt what the client held as
/// of the watermark alone, missed that the client held a task started above it, and
/// never sent that task's `left`.
#[tokio::test]
async fn regression_a_resume_sends_left_for_a_task_shown_above_the_tokens_watermark() {
    let (db, _api, mut c) = manual_api().await;

    // A writer of this database opens before the task starts: the watermark stays
    // below the start while it is open.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut open = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    let held = create(&mut c, "manual", "held").await;
    start(&mut c, &held).await;
    let mut s = watch(&mut c, "status = active", "").await;
    let (snapshot, token) = read_until(&mut s, |s| *s == Seen::Done).await;
    assert_eq!(snapshot, vec![Seen::Task(held.clone(), 2), Seen::Done]);
    drop(s);
    open.rollback().await.unwrap();

    stop(&mut c, &held).await;
    let mut resumed = watch(&mut c, "status = active", &token).await;
    let marker = create(&mut c, "manual", "marker").await;
    start(&mut c, &marker).await;
    let (seen, _) = read_until(
        &mut resumed,
        |s| matches!(s, Seen::Task(id, _) if *id == marker),
    )
    .await;
    assert!(
        seen.contains(&Seen::Left(held.clone())),
        "the client holds {held} from the snapshot: {seen:?}"
    );
}

/// Found by the long crash storm (seed 220861): a task created after a token's mark but
/// within the second it was issued may have been shown, so a resumed stream follows it
/// from "before version 1". Its next change was then replayed from an empty stream and
/// every resume from that token failed INTERNAL, so broad watchers never caught up.
#[tokio::test]
async fn regression_a_resume_follows_a_task_created_just_after_the_token() {
    let (_db, _api, mut c) = manual_api().await;

    // The token is issued between `before` and the create's answer; when both fall in
    // one wall-clock second, the task's first event is recorded no later than the
    // second after the token's (what the token names as its issue time).
    let mut created = None;
    for _ in 0..10 {
        let before = chrono::Utc::now();
        let mut s = watch(&mut c, "", "").await;
        let (_, token) = read_until(&mut s, |s| *s == Seen::Done).await;
        drop(s);
        let id = create(&mut c, "manual", "just after the token").await;
        if chrono::Utc::now().timestamp() == before.timestamp() {
            created = Some((id, token));
            break;
        }
    }
    let (id, token) = created.expect("a token and a create within one second");
    start(&mut c, &id).await;

    let mut resumed = watch(&mut c, "", &token).await;
    let (seen, _) = read_until(&mut resumed, |s| *s == Seen::Task(id.clone(), 2)).await;
    let versions = versions_of(&seen, &id);
    // The client may never have seen it: it is shown from its creation on.
    assert_eq!(versions, vec![1, 2], "{seen:?}");
}

/// Defect 3: the feed's watermark was the cluster-wide snapshot xmin, so a transaction
/// left open in another database froze every WatchTasks stream (heartbeats went on).
/// No bus here: every update comes through the change feed.
#[tokio::test]
async fn regression_a_transaction_open_in_another_database_does_not_freeze_watchers() {
    let (_db, api, mut c) = manual_api().await;
    let mut s = watch(&mut c, "", "").await;
    read_until(&mut s, |s| *s == Seen::Done).await;

    let admin = sqlx::PgPool::connect(&std::env::var("DATABASE_URL").unwrap())
        .await
        .unwrap();
    let mut held = admin.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *held)
        .await
        .unwrap();

    let id = create(&mut c, "manual", "under a held transaction").await;
    start(&mut c, &id).await;
    stop(&mut c, &id).await;
    let (seen, _) = read_until(&mut s, |s| *s == Seen::Task(id.clone(), 3)).await;
    let versions = versions_of(&seen, &id);
    // A stream shows rows as they are when read: versions may be skipped, never repeated.
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]) && versions.last() == Some(&3),
        "versions in order, each once: {seen:?}"
    );
    let metrics = api.scrape().await.unwrap();
    assert_eq!(
        gauge(&metrics, "taskpod_change_feed_lag_seconds"),
        0,
        "nothing of taskpod's database holds the feed"
    );
    held.rollback().await.unwrap();
}

/// Defect: a row read above the watermark (an older transaction still open) was read
/// again by the next range and its version sent twice.
#[tokio::test]
async fn regression_no_version_is_sent_twice_without_a_resume() {
    let (db, _api, mut c) = manual_api().await;
    let x = create(&mut c, "manual", "x").await;
    let mut s = watch(&mut c, "", "").await;
    read_until(&mut s, |s| *s == Seen::Done).await;

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let hold = || async {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    };
    // p1 < a1 < p2 < a2: when p1 ends, the range below p2 holds a1, and the row read
    // for it already shows a2; when p2 ends, the range holding a2 reads it again.
    let p1 = hold().await;
    start(&mut c, &x).await; // a1
    let p2 = hold().await;
    stop(&mut c, &x).await; // a2
    p1.commit().await.unwrap();
    let (first, _) = read_until(&mut s, |s| matches!(s, Seen::Task(id, _) if *id == x)).await;
    p2.commit().await.unwrap();
    let marker = create(&mut c, "manual", "marker").await;
    let (rest, _) = read_until(&mut s, |s| matches!(s, Seen::Task(id, _) if *id == marker)).await;
    let versions: Vec<i64> = first
        .iter()
        .chain(&rest)
        .filter_map(|s| match s {
            Seen::Task(id, v) if *id == x => Some(*v),
            _ => None,
        })
        .collect();
    let mut once = versions.clone();
    once.dedup();
    assert_eq!(versions, once, "a version of x repeated");
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

/// Defect: resume tokens never expired; a week-old one made one read of every change
/// since, which timed out and was retried forever.
#[tokio::test]
async fn regression_an_expired_resume_token_is_a_failed_precondition() {
    let db = TestDb::create().await.unwrap();
    let api = api(&db, &[("TASKPOD_WATCH__RESUME_TOKEN_TTL_SECS", "1")]).await;
    let mut c = api.client().await.unwrap();
    let mut s = watch(&mut c, "", "").await;
    let (_, token) = read_until(&mut s, |s| *s == Seen::Done).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let refused = c
        .watch_tasks(v1::WatchTasksRequest {
            resume_token: token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("start a new watch"),
        "{refused:?}"
    );
    // Fresh tokens still resume.
    let mut s = watch(&mut c, "", "").await;
    let (_, token) = read_until(&mut s, |s| *s == Seen::Done).await;
    let mut resumed = watch(&mut c, "", &token).await;
    read_until(&mut resumed, |s| *s == Seen::Beat).await;
}

/// Defect: a draining replica ended streams with OK, so a client could not tell a
/// drain from the end of what it watched; now each gets a last resume point, then
/// UNAVAILABLE, and resumes on another replica without a gap.
#[tokio::test]
async fn regression_a_draining_replica_hands_streams_a_last_token_then_unavailable() {
    let db = TestDb::create().await.unwrap();
    db.offer_kinds(&["manual"], &[]).await.unwrap();
    let mut draining = api(&db, &[("TASKPOD_WATCH__HEARTBEAT_INTERVAL_MS", "60000")]).await;
    let other = api(&db, &[]).await;
    let mut c = draining.client().await.unwrap();
    let mut s = watch(&mut c, "", "").await;
    read_until(&mut s, |s| *s == Seen::Done).await;
    draining.terminate().await.unwrap();
    let (seen, token) = read_until(&mut s, |s| *s == Seen::Beat).await;
    assert_eq!(seen, vec![Seen::Beat]);
    let end = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .expect("a status ends the stream");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    draining.wait(Duration::from_secs(10)).await.unwrap();

    let mut c2 = other.client().await.unwrap();
    let created_meanwhile = create(&mut c2, "manual", "meanwhile").await;
    let mut resumed = watch(&mut c2, "", &token).await;
    let (seen, _) = read_until(
        &mut resumed,
        |s| matches!(s, Seen::Task(id, _) if *id == created_meanwhile),
    )
    .await;
    assert!(!seen.iter().any(|s| matches!(s, Seen::Left(_))), "{seen:?}");
}
