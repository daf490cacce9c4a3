//! ListNodes and `taskpod node list`: every registered worker with what it offers, the
//! partitions it owns and the pods it holds, from the store through any replica.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use taskpod_e2e::cli::Taskpod;
use taskpod_e2e::cluster::{Cluster, ClusterSpec};
use taskpod_e2e::eventually;
use taskpod_proto::v1;

const PARTITIONS: i32 = 256;
const PODS: usize = 6;

/// The nodes by name, as api1 lists them.
async fn nodes(cluster: &Cluster) -> BTreeMap<String, v1::Node> {
    let mut client = cluster.api("api1").unwrap().client().unwrap();
    client
        .list_nodes(v1::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect()
}

/// The nodes once `settled` holds of them (the cluster is quiet by then, so the answer
/// read after it still holds).
async fn nodes_when(
    cluster: &Cluster,
    what: &str,
    settled: impl Fn(&BTreeMap<String, v1::Node>) -> bool + Copy,
) -> BTreeMap<String, v1::Node> {
    eventually(what, || async move { settled(&nodes(cluster).await) }).await;
    let now = nodes(cluster).await;
    assert!(settled(&now), "{what}, then not: {now:#?}");
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_nodes_shows_each_worker_with_its_partitions_and_pods() {
    // Phases long enough that every pod is still running when it is counted.
    let spec = ClusterSpec::new(2, 1).worker_env("TASKPOD_HANDLERS__SLEEP_PHASE_MS", 600_000);
    let mut cluster = Cluster::start(spec).await.unwrap();
    let mut client = cluster.api("api1").unwrap().client().unwrap();
    for i in 0..PODS {
        client
            .create_task(v1::CreateTaskRequest {
                task: Some(v1::TaskSpec {
                    title: format!("counted {i}"),
                    kind: "sleep".into(),
                    auto_start: true,
                    ..Default::default()
                }),
                meta: Some(v1::RequestMeta {
                    actor_id: "alice".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let both = nodes_when(
        &cluster,
        "both workers own partitions and hold the pods",
        |nodes| {
            nodes.len() == 2
                && nodes.values().map(|n| n.partitions).sum::<i32>() == PARTITIONS
                && nodes.values().all(|n| n.partitions > 0)
                && nodes.values().map(|n| n.pods as usize).sum::<usize>() == PODS
        },
    )
    .await;
    for name in ["w1", "w2"] {
        let node = &both[name];
        assert_eq!(
            Some(node.node_id.as_str()),
            cluster.worker(name).unwrap().node_id(),
            "{node:?}"
        );
        assert!(node.kinds.iter().any(|k| k == "sleep"), "{node:?}");
        assert!(node.capacity > 0, "{node:?}");
        let (started, beat) = (node.started_at.unwrap(), node.heartbeat_at.unwrap());
        assert!(beat.seconds >= started.seconds, "{node:?}");
    }

    // The CLI prints the same: a table by name, and JSON.
    let address = format!("http://{}", cluster.api("api1").unwrap().addr().unwrap());
    let cli = Taskpod::new(&address, "alice").unwrap();
    let table = cli.run(&["node", "list"]).await.unwrap();
    assert_eq!(table.code, 0, "{table}");
    let lines = table.lines();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("PARTITIONS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("w1") && lines[2].starts_with("w2"),
        "{table}"
    );
    let json = cli.run(&["node", "list", "-o", "json"]).await.unwrap();
    let listed = json.json().unwrap();
    let listed = listed["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{json}");
    let pods: i64 = listed.iter().map(|n| n["pods"].as_i64().unwrap()).sum();
    assert_eq!(pods, PODS as i64, "{json}");

    // A killed worker's pods are adopted: the survivor holds them all, and its peer's
    // incarnation leaves the listing with the partitions it owned.
    cluster.worker_mut("w2").unwrap().kill().await.unwrap();
    let survivor = nodes_when(
        &cluster,
        "w1 alone holds every partition and pod",
        |nodes| {
            nodes.len() == 1
                && nodes
                    .get("w1")
                    .is_some_and(|n| n.partitions == PARTITIONS && n.pods as usize == PODS)
        },
    )
    .await;
    assert_eq!(survivor["w1"].node_id, both["w1"].node_id);
}
