//! `taskpod node ...`: the registered workers, what each offers, owns and runs.

use serde::Serialize;
use taskpod_proto::v1;

use super::Context;
use crate::output::{self, Format};
use taskpod_client::error::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Lists the registered worker incarnations by name: kinds, partitions owned, pods,
    /// last heartbeat
    List,
}

/// A node as the CLI prints it (JSON keys in snake case, times in RFC 3339).
#[derive(Debug, Serialize)]
struct NodeView {
    node_id: String,
    name: String,
    started_at: Option<String>,
    heartbeat_at: Option<String>,
    capacity: i32,
    kinds: Vec<String>,
    programs: Vec<String>,
    partitions: i32,
    pods: i32,
}

impl From<v1::Node> for NodeView {
    fn from(n: v1::Node) -> Self {
        Self {
            started_at: output::time(n.started_at.as_ref()),
            heartbeat_at: output::time(n.heartbeat_at.as_ref()),
            node_id: n.node_id,
            name: n.name,
            capacity: n.capacity,
            kinds: n.kinds,
            programs: n.programs,
            partitions: n.partitions,
            pods: n.pods,
        }
    }
}

const COLUMNS: [&str; 7] = [
    "NAME",
    "NODE",
    "KINDS",
    "PARTITIONS",
    "PODS",
    "CAPACITY",
    "HEARTBEAT",
];

fn row(n: &NodeView) -> Vec<String> {
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    vec![
        n.name.replace(char::is_control, " "),
        n.node_id.clone(),
        list(&n.kinds),
        n.partitions.to_string(),
        n.pods.to_string(),
        n.capacity.to_string(),
        n.heartbeat_at.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

#[derive(Debug, Serialize)]
struct NodeList {
    nodes: Vec<NodeView>,
}

/// Runs a `node` subcommand.
///
/// # Errors
/// The server's refusal, or the store unavailable behind it (UNAVAILABLE).
pub async fn run(ctx: &Context, command: NodeCommand) -> Result<(), CliError> {
    let NodeCommand::List = command;
    let client = &ctx.client;
    let nodes: Vec<NodeView> = client
        .grpc()
        .list_nodes(client.request(v1::ListNodesRequest {}))
        .await?
        .into_inner()
        .nodes
        .into_iter()
        .map(NodeView::from)
        .collect();
    match ctx.format {
        Format::Table | Format::Wide => {
            if nodes.is_empty() {
                eprintln!("no registered nodes");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes.iter().map(row).collect();
            output::emit(&output::table(&COLUMNS, &rows))
        }
        Format::Json => output::emit_line(&output::pretty(&NodeList { nodes })),
        Format::Jsonl => {
            let lines: String = nodes.iter().map(|n| output::compact(n) + "\n").collect();
            output::emit(&lines)
        }
    }
}
