//! `opsbox agent`: runs tasks for a server on this machine (see
//! [`opsbox_agent::client`]). Uses the global `--server` (several URLs comma-separated:
//! tried in turn when one goes away), `--token` and `--insecure`.

use std::path::PathBuf;

use clap::Args;
use opsbox_agent::client::AgentConfig;
use opsbox_agent::executor::Executor;
use opsbox_agent::Runtime;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's id (letters, digits, '.', '_', '-') [default: the host name]
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Labels jobs can ask for (comma-separated).
    #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
    labels: Vec<String>,
    /// Tasks run at once [default: the number of CPUs]
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
    /// Short tasks taken ahead, beyond the slots, to start the moment a slot frees
    /// (0: none) [default: as many as the slots]
    #[arg(long, env = "OPSBOX_PREFETCH", value_name = "N")]
    prefetch: Option<u32>,
    /// Scratch space for running tasks [default: a directory under the system's temp dir]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a task is stopped.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    kill_grace: u64,
}

pub async fn run(
    args: AgentArgs,
    server: Option<String>,
    token: Option<String>,
    insecure: bool,
) -> anyhow::Result<()> {
    let servers: Vec<String> = server
        .or_else(|| std::env::var("OPSBOX_SERVER").ok())
        .unwrap_or_else(|| "http://127.0.0.1:3000".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let node_id = match args.node_id {
        Some(id) => id,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .map_err(|e| anyhow::anyhow!("cannot read the host name ({e}): give --node-id"))?,
    };
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let work = args
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("opsbox-agent-{node_id}")));
    // Absolute: tasks run in their own directories.
    let work = std::path::absolute(&work).unwrap_or(work);
    std::fs::create_dir_all(&work)
        .map_err(|e| anyhow::anyhow!("cannot create the work directory {}: {e}", work.display()))?;
    // An agent killed outright could not stop its tasks; the server has handed them to
    // other nodes since, so what is left of them here must go.
    let reaped = opsbox_agent::reap_orphaned_tasks(&node_id);
    if reaped > 0 {
        tracing::warn!(
            processes = reaped,
            "killed the tasks a previous run of this agent left behind"
        );
    }
    let executor = Executor::new(
        Runtime::new(std::time::Duration::from_secs(args.kill_grace)),
        work,
        &node_id,
    );
    let config = AgentConfig {
        servers,
        token: token.or_else(|| std::env::var("OPSBOX_TOKEN").ok()),
        node_id,
        labels: args.labels,
        slots,
        prefetch: args.prefetch.unwrap_or(slots),
        insecure,
    };
    tracing::info!(node = %config.node_id, servers = ?config.servers, slots, "agent starting");
    opsbox_agent::client::run(config, executor, shutdown()).await?;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
