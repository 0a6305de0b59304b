//! `opsbox nodes list | info | blacklist | whitelist`.

use clap::Subcommand;
use opsbox_api::Node;

use super::{output, Ctx};

#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// Every node ever seen: connected, last seen, slots, running tasks, counters.
    List,
    /// One node in full, with the jobs of its running tasks.
    Info { id: String },
    /// Give the node no new tasks (running ones go on).
    Blacklist { id: String },
    /// Give the node tasks again.
    Whitelist { id: String },
}

pub async fn run(ctx: &Ctx, command: NodesCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        NodesCommand::List => {
            let nodes = client.nodes().await?;
            if ctx.json {
                output::json(&nodes)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.id.clone(),
                        state(n).into(),
                        format!("{}/{}", n.running.len(), n.slots),
                        n.labels.join(","),
                        output::opt_time(n.last_seen),
                        format!("{}/{}/{}", n.tasks_ok, n.tasks_failed, n.tasks_lost),
                        n.server.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "STATE",
                        "RUNNING",
                        "LABELS",
                        "LAST SEEN",
                        "OK/FAILED/LOST",
                        "SERVER"
                    ],
                    &rows
                )
            );
            Ok(0)
        }
        NodesCommand::Info { id } => show(ctx, &client.node(&id).await?),
        NodesCommand::Blacklist { id } => show(ctx, &client.blacklist(&id, true).await?),
        NodesCommand::Whitelist { id } => show(ctx, &client.blacklist(&id, false).await?),
    }
}

fn state(node: &Node) -> &'static str {
    match (node.connected, node.blacklisted) {
        (true, false) => "connected",
        (true, true) => "connected, blacklisted",
        (false, false) => "disconnected",
        (false, true) => "disconnected, blacklisted",
    }
}

fn show(ctx: &Ctx, node: &Node) -> anyhow::Result<u8> {
    if ctx.json {
        output::json(node)?;
        return Ok(0);
    }
    print!(
        "{}",
        output::fields(&[
            ("node", node.id.clone()),
            ("state", state(node).into()),
            ("labels", node.labels.join(",")),
            ("slots", node.slots.to_string()),
            ("running", output::list(&node.running)),
            ("jobs", output::list(&node.jobs)),
            ("tasks ok", node.tasks_ok.to_string()),
            ("tasks failed", node.tasks_failed.to_string()),
            ("tasks lost", node.tasks_lost.to_string()),
            ("last seen", output::opt_time(node.last_seen)),
            ("hostname", node.hostname.clone().unwrap_or_default()),
            ("version", node.version.clone().unwrap_or_default()),
            ("server", node.server.clone().unwrap_or_default()),
        ])
    );
    Ok(0)
}
