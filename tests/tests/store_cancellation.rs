//! A store call abandoned while its transaction's `BEGIN` is on the wire (a caller's
//! deadline, a pod fenced mid-call, the store's own bound on a silent connection) must
//! give its connection back outside any transaction.
//!
//! sqlx 0.9.0 did not (launchbadge/sqlx#4393): the dropped `begin()` queued no
//! rollback, the release check drained the `ReadyForQuery` without reading its status,
//! and the pool handed the connection on. Every later statement on it ran inside that
//! transaction, committed by nobody: a worker cut from Postgres registered again after
//! the heal into a transaction no one else could see, and the transaction id the stale
//! transaction then took held the change feed's watermark, freezing WatchTasks on every
//! replica (the partition suite's `to-postgres` cut, CI of 2026-12-07).
//!
//! The store reaches Postgres through a [`FaultProxy`]: held while the call starts, so
//! the `BEGIN` waits on the wire, healed once the call is dropped, so the connection
//! answers its release check and goes back to the pool. One connection in the pool:
//! the next call gets that one.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use taskpod_core::domain::NodeId;
use taskpod_core::store::{Store, StoreSettings};
use taskpod_e2e::api::TestDb;
use taskpod_e2e::proxy::FaultProxy;

/// Turns a hang into a failure; no call here should come near it.
const HANG: Duration = Duration::from_secs(20);

/// A proxy in front of `url`'s server, and `url` through it.
async fn through_proxy(url: &str) -> (FaultProxy, String) {
    let rest = url.split_once("://").unwrap().1;
    let (auth_host, path) = rest.split_once('/').unwrap();
    let (auth, host) = auth_host.rsplit_once('@').unwrap();
    let upstream: SocketAddr = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let proxied = format!("postgres://{auth}@{}/{path}", proxy.addr());
    (proxy, proxied)
}

#[tokio::test]
async fn regression_a_call_dropped_during_begin_leaves_no_transaction_on_its_connection() {
    let db = TestDb::create().await.unwrap();
    let oracle = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (proxy, url) = through_proxy(&db.url).await;
    let store = Store::connect(&StoreSettings {
        max_connections: 1,
        acquire_timeout_ms: 2_000,
        statement_timeout_ms: 2_000,
        lock_timeout_ms: 1_000,
        ..StoreSettings::with_url(url)
    })
    .await
    .unwrap();
    store.ping().await.unwrap();
    // The ping's connection goes back after a check of its own: wait until it is idle
    // in the pool, or the hold below catches that check instead of the BEGIN.
    tokio::time::timeout(HANG, async {
        while store.pool().num_idle() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();

    // The full check's transaction is the store's first statement there: its BEGIN
    // is what waits on the wire when the caller gives up.
    proxy.hold();
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        store.pod_candidates(NodeId::new(), &[0], &[]),
    )
    .await;
    assert!(dropped.is_err(), "the call answered through a held proxy");
    proxy.heal();

    // The next write on that connection commits: others see it.
    let node = NodeId::new();
    tokio::time::timeout(HANG, store.register_node(node, 7, "w", 1, &[], &[]))
        .await
        .unwrap()
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE node_id = $1")
        .bind(node.0)
        .fetch_one(&oracle)
        .await
        .unwrap();
    let open: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT state, backend_xid::text FROM pg_stat_activity \
          WHERE datname = current_database() AND pid <> pg_backend_pid() \
            AND (state LIKE 'idle in transaction%' OR backend_xid IS NOT NULL)",
    )
    .fetch_all(&oracle)
    .await
    .unwrap();
    assert_eq!(
        (seen, open),
        (1, vec![]),
        "the registration after the dropped call is not committed, or a session is left in a transaction"
    );
}
