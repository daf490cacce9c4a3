//! Carries out one [`Fault`] on a [`Cluster`], including its end (the restart, the
//! SIGCONT), and says what it actually did: a fault that found nothing to act on (a
//! worker without a lock session at that instant) is reported as not effective, so a
//! run can tell which faults really happened.

use std::time::{Duration, Instant};

use super::schedule::Fault;
use crate::cluster::{Cluster, CutKind};
use crate::proxy::{Delivery, FaultProxy};

/// What became of one scheduled fault.
#[derive(Clone, Debug)]
pub struct Applied {
    pub index: usize,
    pub fault: Fault,
    /// Milliseconds since the storm began.
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Whether it acted on something.
    pub effective: bool,
    /// Whom it hit (names, pids), or why it did nothing.
    pub note: String,
}

/// How long to look for a worker's lock session (it may be reconnecting).
const FIND_SESSION_FOR: Duration = Duration::from_secs(5);

/// Applies `fault` and waits out its planned duration.
///
/// # Errors
/// When the cluster cannot be put back (a restart fails): the run cannot go on.
pub async fn apply(cluster: &mut Cluster, fault: &Fault) -> anyhow::Result<(bool, String)> {
    let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    match fault {
        Fault::KillWorker { worker, down_ms } => {
            let name = worker_name(cluster, *worker)?;
            let member = cluster.worker_mut(&name)?;
            let pid = member.pid();
            member.kill().await?;
            sleep(*down_ms).await;
            member.restart().await?;
            Ok((
                true,
                format!("{name} (pid {pid:?}) killed, now pid {:?}", member.pid()),
            ))
        }
        Fault::PauseWorker { worker, pause_ms } => {
            let name = worker_name(cluster, *worker)?;
            let member = cluster.worker_mut(&name)?;
            member.pause()?;
            sleep(*pause_ms).await;
            member.resume()?;
            Ok((true, format!("{name} (pid {:?}) paused", member.pid())))
        }
        Fault::TerminateLockSession { worker } => {
            let name = worker_name(cluster, *worker)?;
            let started = Instant::now();
            loop {
                if let Some(backend) = cluster.terminate_lock_session(&name).await? {
                    return Ok((
                        true,
                        format!("{name}'s lock session (backend {backend}) terminated"),
                    ));
                }
                if started.elapsed() > FIND_SESSION_FOR {
                    return Ok((
                        false,
                        format!("{name} had no lock session for {FIND_SESSION_FOR:?}"),
                    ));
                }
                sleep(200).await;
            }
        }
        Fault::CrashPostgres { down_ms } => {
            let pid = cluster.postgres().pid();
            cluster.crash_postgres().await?;
            sleep(*down_ms).await;
            cluster.restart_postgres().await?;
            Ok((
                true,
                format!("postmaster {pid:?} stopped -m immediate, restarted"),
            ))
        }
        Fault::KillRedis { down_ms } => {
            cluster.kill_redis().await?;
            sleep(*down_ms).await;
            cluster.restart_redis().await?;
            Ok((true, "redis killed, restarted".to_owned()))
        }
        Fault::KillApi { api, down_ms } => {
            let name = cluster
                .apis()
                .get(*api)
                .map(|m| m.name().to_owned())
                .ok_or_else(|| anyhow::anyhow!("no API replica #{api}"))?;
            let member = cluster.api_mut(&name)?;
            member.kill().await?;
            sleep(*down_ms).await;
            member.restart().await?;
            Ok((true, format!("{name} killed, restarted")))
        }
        Fault::PartitionWorker { worker, hold_ms } => {
            let name = worker_name(cluster, *worker)?;
            let proxy = cluster
                .worker(&name)?
                .proxy()
                .ok_or_else(|| anyhow::anyhow!("{name} has no fault proxy"))?;
            proxy.hold();
            sleep(*hold_ms).await;
            proxy.heal();
            Ok((true, format!("{name}'s link to Postgres held silent")))
        }
        Fault::CutWorker {
            worker,
            kind,
            hold_ms,
        } => {
            let name = worker_name(cluster, *worker)?;
            cut_worker(cluster, &name, *kind, *hold_ms).await
        }
        Fault::PauseRedis { pause_ms } => {
            cluster.pause_redis()?;
            sleep(*pause_ms).await;
            cluster.resume_redis()?;
            Ok((
                true,
                format!("redis (pid {:?}) paused", cluster.redis()?.pid()),
            ))
        }
        Fault::KillSubscriptions => {
            let killed = cluster
                .redis()?
                .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
                .await?;
            let n = match killed {
                redis::Value::Int(n) => n,
                _ => 0,
            };
            Ok((n > 0, format!("{n} subscriber connections killed")))
        }
        Fault::TinyPubsubBuffer { for_ms } => {
            let limit =
                |value: &'static str| ["CONFIG", "SET", "client-output-buffer-limit", value];
            cluster
                .redis()?
                .command(&limit("pubsub 1kb 512b 1"))
                .await?;
            sleep(*for_ms).await;
            cluster
                .redis()?
                .command(&limit("pubsub 32mb 8mb 60"))
                .await?;
            Ok((true, "pubsub output buffers limited to 1 KiB".to_owned()))
        }
        Fault::HoldOtherDatabase { hold_ms } => {
            use sqlx::Connection as _;
            let mut other = cluster.other_database().await?;
            let mut tx = other.begin().await?;
            let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
                .fetch_one(&mut *tx)
                .await?;
            sleep(*hold_ms).await;
            // The server may have restarted meanwhile: the transaction is gone either way.
            let _ = tx.rollback().await;
            Ok((
                true,
                format!("transaction {xid} held open in database postgres"),
            ))
        }
        Fault::SilenceApiStore { api, hold_ms } => {
            let (name, proxy) = api_proxy(cluster, *api)?;
            proxy.hold();
            sleep(*hold_ms).await;
            proxy.heal();
            Ok((true, format!("{name}'s link to Postgres held silent")))
        }
        Fault::ResetApiStore { api, for_ms } => {
            let (name, proxy) = api_proxy(cluster, *api)?;
            let before = proxy.resets();
            proxy.refuse();
            sleep(*for_ms).await;
            proxy.heal();
            let reset = proxy.resets() - before;
            Ok((
                true,
                format!("{name}: {reset} connections to Postgres reset"),
            ))
        }
        Fault::AmbiguousCommits { api, for_ms } => {
            let member = cluster
                .apis()
                .get(*api)
                .ok_or_else(|| anyhow::anyhow!("no API replica #{api}"))?;
            let proxy = member
                .proxy()
                .ok_or_else(|| anyhow::anyhow!("{} has no fault proxy", member.name()))?;
            let before = proxy.resets();
            proxy.reset_on(b"COMMIT", Delivery::Deliver);
            sleep(*for_ms).await;
            proxy.heal();
            let lost = proxy.resets() - before;
            Ok((
                lost > 0,
                format!(
                    "{}: {lost} committed transactions lost their answer",
                    member.name()
                ),
            ))
        }
    }
}

/// The fault's end is the heal of its cut (also when the cut itself fails halfway).
async fn cut_worker(
    cluster: &Cluster,
    name: &str,
    kind: CutKind,
    hold_ms: u64,
) -> anyhow::Result<(bool, String)> {
    let cut = cluster.cut(name, kind).await;
    if cut.is_ok() {
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    }
    cluster.heal_cut(name).await?;
    cut?;
    Ok((true, format!("{name}: {kind}, healed")))
}

/// An API replica's name and fault proxy.
fn api_proxy(cluster: &Cluster, index: usize) -> anyhow::Result<(String, &FaultProxy)> {
    let member = cluster
        .apis()
        .get(index)
        .ok_or_else(|| anyhow::anyhow!("no API replica #{index}"))?;
    let proxy = member
        .proxy()
        .ok_or_else(|| anyhow::anyhow!("{} has no fault proxy", member.name()))?;
    Ok((member.name().to_owned(), proxy))
}

fn worker_name(cluster: &Cluster, index: usize) -> anyhow::Result<String> {
    cluster
        .workers()
        .get(index)
        .map(|m| m.name().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no worker #{index}"))
}
