//! Real network partitions (issue 19): a worker, or an API replica, in a network
//! namespace of its own whose link to Postgres and Redis the kernel cuts (nftables
//! `netdev` ingress tables on both ends of its veth pair; see
//! `taskpod_e2e::cluster::Netns`), under a load that keeps creating tasks on its
//! partitions and with `exec` programs running across the cut.
//!
//! First the harness proves each cut drops exactly what it says, on a bare namespace.
//! Then one test per cut kind. Needs root; without namespaces or nft the tests fail
//! with the reason, never pass.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskpod_e2e::chaos::partition::{self, PartitionConfig, Target};
use taskpod_e2e::cluster::{CutKind, Netns, Ports};

/// Set to 1 to run with the product's lock defaults (idle_session_timeout 10 s) and a
/// 16 s cut instead of CI's settings.
const DEFAULTS_ENV: &str = "TASKPOD_PARTITION_DEFAULTS";
/// Seconds each cut lasts, instead of the default (10 s; 12 s for a replica).
const CUT_SECS_ENV: &str = "TASKPOD_PARTITION_CUT_SECS";
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

/// What crossed one connection after a cut: whether the host end got the member's
/// line, and whether the member got the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Crossed {
    to_host: bool,
    to_member: bool,
}

/// Connects from inside `ns` to `port` on the host end, then applies `cut` (if any),
/// then sends a line each way and reports which arrived.
async fn exchange(ns: &Netns, port: u16, cut: Option<(CutKind, Ports)>) -> Crossed {
    let listener = TcpListener::bind((ns.host_addr(), port)).await.unwrap();
    // The member side: connect, say it is ready, wait for "go", then send a line and
    // wait up to 2 s for one.
    let script = format!(
        "exec 3<>/dev/tcp/{}/{port} || exit 2; echo ready; read -r go; echo ping >&3; \
         if read -r -t 2 line <&3; then echo got; else echo nothing; fi",
        ns.host_addr()
    );
    let mut member = Command::new("ip")
        .args(["netns", "exec", ns.name(), "bash", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().await.unwrap();
    let mut out = BufReader::new(member.stdout.take().unwrap()).lines();
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("ready"));
    if let Some((kind, ports)) = cut {
        ns.cut(kind, ports).await.unwrap();
    }
    let mut stdin = member.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    conn.write_all(b"pong\n").await.unwrap();
    let mut host_side = BufReader::new(&mut conn).lines();
    let to_host = matches!(
        tokio::time::timeout(Duration::from_secs(2), host_side.next_line()).await,
        Ok(Ok(Some(line))) if line == "ping"
    );
    let to_member = out.next_line().await.unwrap().as_deref() == Some("got");
    ns.heal().await.unwrap();
    Crossed { to_host, to_member }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn each_cut_drops_exactly_what_it_says() {
    let both = Crossed {
        to_host: true,
        to_member: true,
    };
    let none = Crossed {
        to_host: false,
        to_member: false,
    };
    // (cut, what crosses on the "Postgres" port, what crosses on the "Redis" port)
    let cases = [
        (None, both, both),
        (Some(CutKind::Full), none, none),
        (Some(CutKind::Postgres), none, both),
        (Some(CutKind::Redis), both, none),
        (
            Some(CutKind::ToPostgres),
            Crossed {
                to_host: false,
                to_member: true,
            },
            both,
        ),
        (
            Some(CutKind::FromPostgres),
            Crossed {
                to_host: true,
                to_member: false,
            },
            both,
        ),
    ];
    let runs = cases.into_iter().map(|(kind, pg, redis)| async move {
        let ns = tokio::task::spawn_blocking(Netns::create)
            .await
            .unwrap()
            .expect("network namespaces are required for these tests");
        let ports = Ports {
            postgres: free_port(),
            redis: Some(free_port()),
        };
        let got_pg = exchange(&ns, ports.postgres, kind.map(|k| (k, ports))).await;
        let got_redis = exchange(&ns, ports.redis.unwrap(), kind.map(|k| (k, ports))).await;
        assert_eq!((got_pg, got_redis), (pg, redis), "{kind:?}");
        // Removed on drop: nothing of it is left.
        let name = ns.name().to_owned();
        drop(ns);
        let listed = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&listed.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "{name} is left"
        );
    });
    futures::future::join_all(runs).await;
}

/// Runs one cut and fails with its whole report when anything is violated.
async fn partition(kind: CutKind, target: Target) {
    let seed = std::env::var("TASKPOD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()));
    let mut config = PartitionConfig::new(kind, target, seed);
    if std::env::var_os(DEFAULTS_ENV).is_some_and(|v| v != "0") {
        config = config.with_product_defaults();
    }
    if let Some(secs) = std::env::var(CUT_SECS_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        config.cut_for = Duration::from_secs(secs);
    }
    let outcome = partition::run(&config)
        .await
        .unwrap_or_else(|e| panic!("the partition could not run: {e:#}"));
    eprintln!("{}", outcome.render());
    assert!(
        outcome.report.is_clean(),
        "{} violation(s) under a {kind}; the report is printed above",
        outcome.report.violations.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_from_postgres_and_redis() {
    partition(CutKind::Full, Target::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_from_postgres_only() {
    partition(CutKind::Postgres, Target::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_from_redis_only() {
    partition(CutKind::Redis, Target::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_packets_to_postgres_are_lost() {
    partition(CutKind::ToPostgres, Target::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_replies_from_postgres_are_lost() {
    partition(CutKind::FromPostgres, Target::Worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_replica_cut_from_postgres() {
    partition(CutKind::Postgres, Target::Api).await;
}

/// The timeline of every cut (issue 19, item 6), as a markdown table for
/// BENCHMARKS.md: one cut of the namespaced worker per kind, one after the other, each
/// `TASKPOD_PARTITION_ROUNDS` times (default 1), with CI's settings or, with
/// `TASKPOD_PARTITION_DEFAULTS=1`, the product's lock defaults and a 16 s cut. Prints
/// the table (and writes it to `TASKPOD_PARTITION_TABLE` when set); fails only when a
/// cut could not be run: violations are listed in the table, the tests above assert
/// them.
///
/// `cargo nextest run -p taskpod-e2e --test network_partitions --run-ignored only
/// --no-capture partition_timelines`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (about 30 s per cut): run by hand for BENCHMARKS.md"]
async fn partition_timelines() {
    let rounds: usize = std::env::var("TASKPOD_PARTITION_ROUNDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1);
    let defaults = std::env::var_os(DEFAULTS_ENV).is_some_and(|v| v != "0");
    let mut table = partition::timeline::Timeline::header()
        .replace("| rejoin: owning |\n", "| rejoin: owning | violations |\n")
        .replace("| ---: |\n", "| ---: | --- |\n");
    let mut api_lines = Vec::new();
    for round in 0..rounds {
        for kind in CutKind::ALL {
            let seed = u64::from(std::process::id()) + round as u64;
            let mut config = PartitionConfig::new(kind, Target::Worker, seed);
            if defaults {
                config = config.with_product_defaults();
            }
            let outcome = partition::run(&config)
                .await
                .unwrap_or_else(|e| panic!("{kind}: the partition could not run: {e:#}"));
            eprintln!("{}", outcome.render());
            let mut invariants: Vec<&str> = outcome
                .report
                .violations
                .iter()
                .map(|v| v.invariant)
                .collect();
            invariants.sort_unstable();
            invariants.dedup();
            table.push_str(&outcome.timeline.row().replace(
                " |\n",
                &format!(
                    " | {} |\n",
                    if invariants.is_empty() {
                        "none".to_owned()
                    } else {
                        invariants.join(", ")
                    }
                ),
            ));
        }
        let mut config = PartitionConfig::new(CutKind::Postgres, Target::Api, round as u64);
        if defaults {
            config.cut_for = Duration::from_secs(16);
        }
        let outcome = partition::run(&config)
            .await
            .unwrap_or_else(|e| panic!("replica cut: the partition could not run: {e:#}"));
        eprintln!("{}", outcome.render());
        let during = &outcome.api.during;
        let unavailable: Vec<i64> = during
            .iter()
            .filter(|p| p.code == Some(tonic::Code::Unavailable))
            .map(|p| p.latency_ms())
            .collect();
        api_lines.push(format!(
            "replica cut from Postgres for {:?}: {} of {} calls answered UNAVAILABLE during it \
             (slowest {} ms, bound {:?}); serving again {} ms after the heal; violations: {}",
            config.cut_for,
            unavailable.len(),
            during.len(),
            unavailable.iter().max().copied().unwrap_or_default(),
            partition::API_CALL_LIMIT,
            outcome
                .api
                .serving_again_ms
                .map_or("never".to_owned(), |ms| ms.to_string()),
            if outcome.report.is_clean() {
                "none".to_owned()
            } else {
                outcome
                    .report
                    .violations
                    .iter()
                    .map(|v| v.invariant)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    let text = format!(
        "settings: {}\n\n{table}\n{}\n",
        if defaults {
            "the product's lock defaults (idle_session_timeout 10 s, keepalives 5 s + 3 x 1 s), 16 s cuts"
        } else {
            "CI's (idle_session_timeout 3 s, other lock settings default), 10 s cuts (12 s for the replica)"
        },
        api_lines.join("\n")
    );
    println!("{text}");
    if let Some(path) = std::env::var_os("TASKPOD_PARTITION_TABLE") {
        std::fs::write(path, &text).unwrap();
    }
}
