//! Nodes and the scheduler: which machines run tasks, and which task runs where.
//!
//! A node is an `opsbox agent` connected over `GET /v1/agent`, or the server's own
//! `local` node, which speaks the same messages over in-process channels (an
//! [`Executor`] in this process), so placement, output, results, kill and failure
//! handling are one code path wherever a task lands.
//!
//! A fan-out job is a map script over inputs (one task each) with an optional reduce
//! over their outputs; a run on chosen nodes (`--node`, `--labels`, `--all`) is a fan-out
//! job with one task. Tasks live in the store, so a restart loses nothing: queued tasks
//! stay queued, tasks of remote nodes are resumed when their agent reconnects and reports
//! them (or become lost after the heartbeat timeout), tasks of the local node (whose
//! processes died with the server) are lost at once and retried.
//!
//! The scheduler is the only one to place tasks: a queued task goes to the least
//! loaded connected node that has a free slot, every label the job asks for, is not
//! blacklisted and (when possible) has not failed this task before. Jobs take turns, one
//! task each per round, so a big job does not starve a small one. A failed or lost
//! attempt is retried until the job has used up its `max_failures`; then the job fails
//! and its other tasks are killed.
//!
//! The scheduler works in rounds: the task ends that nodes reported since the last
//! round are settled together with the placements of the slots they freed, and each
//! job changed in the round is written once (the round's writes share one commit). A
//! node's connection only queues its ends, so it never waits for the store.
//!
//! Every change of a job, a task or a node is an event on the event log. All
//! read-modify-write of a job and its tasks holds one lock, so a task's end and the
//! scheduler never overwrite each other's view of a job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::Utc;
use opsbox_agent::executor::{safe_relative, Executor};
use opsbox_agent::Runtime;
use opsbox_api::{
    AgentMessage, FanoutRequest, FileData, Job, JobSpec, JobState, Node, PhaseProgress, Placement,
    Script, ServerMessage, Stream as OutStream, Task, TaskState, LOCAL_NODE,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::error::{CoreError, CoreResult};
use crate::jobs::{results_in, task_results, to_job, Jobs};
use crate::scripts::Scripts;
use crate::store::{
    JobRecord, LogChunkBytes, NewEvent, NodeRecord, Store, StoreError, StoreLock, TaskRecord,
    TaskWrite,
};

/// Inputs a fan-out job may have.
pub const MAX_INPUTS: usize = 100_000;

/// Inputs a job's record shows (as Disco's jobinfo did); its tasks hold all of them.
const SHOWN_INPUTS: usize = 100;

/// Limits and defaults of the nodes service.
#[derive(Debug, Clone)]
pub struct NodesConfig {
    /// A node silent this long is disconnected and its tasks are lost (and retried).
    pub heartbeat_timeout: Duration,
    /// Failed or lost task attempts a job survives unless it says otherwise.
    pub max_failures: u32,
    /// Labels of the local node.
    pub local_labels: Vec<String>,
    /// Tasks the local node runs at once (0: it takes none).
    pub local_slots: u32,
    /// Tasks the local node holds beyond its slots (as an agent's `--prefetch`);
    /// `None`: as many as its slots.
    pub local_prefetch: Option<u32>,
    /// Where tasks of the local node keep their scratch directories.
    pub local_work: PathBuf,
    /// Output kept per job in its log, and per task in its `.out`/`.err` file (the
    /// jobs service's `max_output_bytes`); the rest is dropped with a note.
    pub max_output_bytes: u64,
    /// This server, as the node list shows it.
    pub server_id: String,
    /// The id of the server's own node: `local`, unless servers share a store (each
    /// needs its own then).
    pub local_id: String,
}

impl NodesConfig {
    pub fn new(data_dir: &Path) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        NodesConfig {
            heartbeat_timeout: Duration::from_secs(15),
            max_failures: 3,
            local_labels: Vec::new(),
            local_slots: cpus.max(2),
            local_prefetch: None,
            local_work: data_dir.join("local-node"),
            max_output_bytes: 64 * 1024 * 1024,
            local_id: LOCAL_NODE.to_owned(),
            server_id: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "opsbox".into()),
        }
    }
}

/// What a fan-out job keeps in its spec (`spec.fanout`), beyond [`JobSpec`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Fanout {
    /// The first [`SHOWN_INPUTS`] inputs (each task keeps its own).
    inputs: Vec<String>,
    /// Map tasks.
    #[serde(default)]
    total: u32,
    #[serde(default)]
    reduce: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    node: Option<String>,
    max_failures: u32,
    #[serde(default)]
    failures: u32,
    #[serde(default)]
    progress: Vec<PhaseProgress>,
    /// The parameter values the tasks run with. Kept in the store because tasks may
    /// start after a restart; filtered values are shown as such everywhere else.
    #[serde(default)]
    params: BTreeMap<String, String>,
    /// Run this program instead of a catalog script (a charm's hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    program: Option<Program>,
}

/// A program outside the scripts catalog (a charm's hook) to run once on a node, with
/// the job's usual environment plus `env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// Shown as the job's script; the job is named `<name>@<timestamp>`.
    pub name: String,
    pub path: PathBuf,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: Option<u64>,
}

/// Fills the fan-out fields of a job from its `spec.fanout`.
pub(crate) fn describe(job: &mut Job, fanout: &serde_json::Value) {
    if let Ok(f) = serde_json::from_value::<Fanout>(fanout.clone()) {
        job.inputs = f.inputs;
        job.reduce = f.reduce;
        job.progress = f.progress;
        job.max_failures = Some(f.max_failures);
    }
}

fn fanout_of(record: &JobRecord) -> CoreResult<Fanout> {
    let value = record
        .spec
        .get("fanout")
        .ok_or_else(|| CoreError::Invalid(format!("job {} is not a fan-out job", record.name)))?;
    // Read in place: the scheduler reads a running job's spec at every round.
    Fanout::deserialize(value).map_err(|e| {
        CoreError::Store(StoreError::Corrupt(format!(
            "fan-out spec of {}: {e}",
            record.name
        )))
    })
}

fn set_fanout(record: &mut JobRecord, fanout: &Fanout) {
    if let Some(spec) = record.spec.as_object_mut() {
        spec.insert(
            "fanout".into(),
            serde_json::to_value(fanout).unwrap_or_default(),
        );
    }
}

/// The task's key in a node's list of running tasks.
fn key(job: &str, task: &str) -> String {
    opsbox_agent::executor::key(job, task)
}

/// A connected node, as the scheduler sees it.
struct Link {
    session: u64,
    tx: mpsc::UnboundedSender<ServerMessage>,
    labels: Vec<String>,
    slots: u32,
    /// Tasks it takes beyond its slots (they wait there for a slot).
    prefetch: u32,
    /// Its tasks, running or waiting for a slot there.
    running: HashSet<String>,
    /// The records of the tasks placed on it through this link, until their ends.
    placed: HashMap<String, TaskRecord>,
    last_seen: Instant,
    /// The agent process behind the link (its hello's `instance`).
    instance: Option<String>,
}

impl Link {
    /// Tasks it may hold: its slots, plus its prefetch when it has slots at all.
    fn capacity(&self) -> u32 {
        if self.slots == 0 {
            0
        } else {
            self.slots.saturating_add(self.prefetch)
        }
    }
}

#[derive(Default)]
struct State {
    links: HashMap<String, Link>,
    next_session: u64,
    /// Since when a node with running tasks has been away (restart: since the start).
    away: HashMap<String, Instant>,
    blacklisted: HashSet<String>,
    /// Task outcomes per node (ok, failed, lost) not yet added to its stored record:
    /// the sweep writes them, so a task's end costs no extra write.
    counters: HashMap<String, [u64; 3]>,
    /// When `refresh_seen` last wrote the connected nodes' records.
    seen_written: Option<Instant>,
    /// The job the scheduler placed a task of last (the turns go on after it).
    last_served: Option<String>,
    /// Task output not yet stored, per job: written with the job's next write, or by
    /// the output flusher within [`OUTPUT_EVERY`].
    pending_output: HashMap<String, Vec<(OutStream, Vec<u8>)>>,
    /// Task ends reported by nodes, settled by the next scheduling round.
    ends: Vec<PendingEnd>,
    /// How long the recent tasks of each running job took, from placement to end
    /// (a moving average, seconds): only tasks of jobs whose tasks are short are sent
    /// to nodes ahead of a free slot.
    task_secs: HashMap<String, f64>,
    /// What each running job's log has taken of `max_output_bytes` on this server.
    output_caps: HashMap<String, crate::output::OutputCap>,
}

/// Tasks of a job whose tasks take less than this are sent to nodes ahead of a free
/// slot (see `prefetch`). For them the trip of an end to the server and of the next
/// task back is a large share of a task's life; for longer ones it is noise, and a task
/// held by a busy node could have started sooner on a node that frees up later.
const AHEAD_BELOW_SECS: f64 = 1.0;

/// What a node comes with when it connects (an agent's hello, or the local node).
struct Joining {
    labels: Vec<String>,
    slots: u32,
    prefetch: u32,
    running: Vec<String>,
    hostname: Option<String>,
    version: Option<String>,
    instance: Option<String>,
}

/// A task end waiting for the scheduler. Ends are settled in rounds, not one by one as
/// they arrive: all ends that came in while the previous round was writing, plus the
/// placements of the slots they freed, become one write per job, and the writes of a
/// round share one commit. An agent's connection never waits for the store.
#[derive(Clone)]
struct PendingEnd {
    node: String,
    job: String,
    task: String,
    end: TaskEnd,
    /// The task as this server placed it on the node, when it did in this connection:
    /// settling the end needs no read of it (nothing else changes a running task's
    /// record; its end comes only from its node).
    placed: Option<TaskRecord>,
}

/// The signal topic of a task kill for the server its node is connected to.
const TASK_KILL: &str = "task.kill";

/// Task output reaches the store (and `jobs log --follow`) at least this often.
const OUTPUT_EVERY: Duration = Duration::from_millis(100);

/// One agent connection, from [`Nodes::connect`].
pub struct Connection {
    pub node_id: String,
    pub session: u64,
    /// Messages for the agent; ends when the node is disconnected by the server.
    pub messages: mpsc::UnboundedReceiver<ServerMessage>,
    pub heartbeat_secs: u64,
}

/// The nodes service. Cheap to clone.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    scripts: Arc<Scripts>,
    jobs: Jobs,
    config: NodesConfig,
    results_dir: PathBuf,
    state: Mutex<State>,
    /// Wakes the scheduler.
    kick: Arc<Notify>,
    /// Serialises read-modify-write of jobs and tasks (see the module docs).
    ops: tokio::sync::Mutex<()>,
    /// Output chunk numbers: increasing across restarts (they start from the clock).
    out_seq: AtomicU64,
    /// The local node's executor, to stop its tasks when the server stops.
    local: std::sync::OnceLock<Executor>,
    /// The server is stopping: the local tasks it kills for that are not failures (they
    /// stay running in the store and are retried after the restart), and nothing new
    /// is placed.
    stopping: std::sync::atomic::AtomicBool,
}

impl Nodes {
    /// Starts the service: the local node, the scheduler and the heartbeat sweep.
    pub async fn start(
        store: Arc<dyn Store>,
        scripts: Arc<Scripts>,
        jobs: Jobs,
        config: NodesConfig,
        results_dir: PathBuf,
        kill_grace: Duration,
    ) -> CoreResult<Nodes> {
        let now_us = Utc::now().timestamp_micros().max(0) as u64;
        let mut state = State::default();
        for node in store.list_nodes().await? {
            if node.blacklisted {
                state.blacklisted.insert(node.id.clone());
            }
            // With a shared store, nodes connected to another server are that
            // server's to watch: only ours wait here to come back.
            if node.server.is_none() || node.server.as_deref() == Some(&config.server_id) {
                state.away.insert(node.id, Instant::now());
            }
        }
        let nodes = Nodes {
            inner: Arc::new(Inner {
                store,
                scripts,
                jobs: jobs.clone(),
                config,
                results_dir,
                state: Mutex::new(state),
                kick: Arc::new(Notify::new()),
                ops: tokio::sync::Mutex::new(()),
                out_seq: AtomicU64::new(now_us),
                local: std::sync::OnceLock::new(),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let weak = Arc::downgrade(&nodes.inner);
        jobs.set_fanout_kill(Arc::new(move |name, by| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(inner) => Nodes { inner }.kill(&name, by.as_deref()).await,
                    None => Ok(()),
                }
            })
        }));
        // Tasks the local node ran before a restart died with the server.
        let local_running: Vec<TaskRecord> = nodes
            .inner
            .store
            .tasks_in(&[TaskState::Running])
            .await?
            .into_iter()
            .filter(|t| t.task.node.as_deref() == Some(nodes.local_id()))
            .collect();
        for task in local_running {
            let local = nodes.local_id().to_owned();
            nodes
                .lost(
                    &task.task.job,
                    &task.task.id,
                    &local,
                    "the server restarted while it ran",
                    true,
                )
                .await?;
        }
        nodes.start_local(kill_grace).await?;
        nodes.spawn_loops();
        Ok(nodes)
    }

    /// The id of this server's own node.
    pub fn local_id(&self) -> &str {
        &self.inner.config.local_id
    }

    /// Serialises read-modify-write of jobs and tasks: in this process, and across the
    /// servers sharing the store.
    async fn ops(&self) -> CoreResult<(tokio::sync::MutexGuard<'_, ()>, StoreLock)> {
        let local = self.inner.ops.lock().await;
        let shared = self.inner.store.lock("nodes.ops").await?;
        Ok((local, shared))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent, so a poisoned lock is sound.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local node: an executor in this process, fed through channels.
    async fn start_local(&self, kill_grace: Duration) -> CoreResult<()> {
        // A server killed outright could not stop its node's tasks; their jobs are
        // marked lost, so what is left of them must go too.
        let local = self.local_id().to_owned();
        let reaped = tokio::task::spawn_blocking(move || opsbox_agent::reap_orphaned_tasks(&local))
            .await
            .unwrap_or(0);
        if reaped > 0 {
            tracing::warn!(
                processes = reaped,
                "killed the tasks a previous run of the local node left behind"
            );
        }
        let executor = Executor::new(
            Runtime::new(kill_grace),
            self.inner.config.local_work.clone(),
            self.local_id(),
        );
        let connection = self
            .register(
                self.local_id(),
                Joining {
                    labels: self.inner.config.local_labels.clone(),
                    slots: self.inner.config.local_slots,
                    prefetch: self
                        .inner
                        .config
                        .local_prefetch
                        .unwrap_or(self.inner.config.local_slots),
                    running: Vec::new(),
                    hostname: self.inner.config.server_id.clone().into(),
                    version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                    instance: None,
                },
            )
            .await?;
        let _ = self.inner.local.set(executor.clone());
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let mut messages = connection.messages;
        tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                executor.handle(message, out_tx.clone());
            }
        });
        let weak = Arc::downgrade(&self.inner);
        let session = connection.session;
        let local = self.local_id().to_owned();
        tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let nodes = Nodes { inner };
                if let Err(e) = nodes.message(&local, session, message).await {
                    tracing::warn!(error = %e, "local node message failed");
                }
            }
        });
        Ok(())
    }

    /// Stops the tasks of the local node (the server is stopping) and waits until their
    /// processes are gone; after the restart they are retried.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let Some(executor) = self.inner.local.get() else {
            return;
        };
        executor.kill_all();
        let deadline = Instant::now() + grace + Duration::from_secs(2);
        while !executor.running().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills of tasks on this server's nodes asked for through another server.
    fn spawn_kill_listener(&self) {
        let mut signals = self.inner.store.signals();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let signal = match signals.recv().await {
                    Ok(signal) => signal,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if signal.topic != TASK_KILL {
                    continue;
                }
                let Some(inner) = weak.upgrade() else { return };
                let nodes = Nodes { inner };
                let Ok(ask) = serde_json::from_str::<serde_json::Value>(&signal.message) else {
                    continue;
                };
                let (Some(job), Some(task), Some(node)) = (
                    ask["job"].as_str(),
                    ask["task"].as_str(),
                    ask["node"].as_str(),
                ) else {
                    continue;
                };
                let state = nodes.lock();
                if let Some(link) = state.links.get(node) {
                    let _ = link.tx.send(ServerMessage::Kill {
                        job: job.to_owned(),
                        task: task.to_owned(),
                    });
                }
            }
        });
    }

    fn spawn_loops(&self) {
        self.spawn_kill_listener();
        let weak = Arc::downgrade(&self.inner);
        let kick = self.inner.kick.clone();
        tokio::spawn(async move {
            loop {
                let kicked = kick.notified();
                tokio::pin!(kicked);
                kicked.as_mut().enable();
                {
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = (Nodes { inner }).round().await {
                        tracing::warn!(error = %e, "scheduling failed; retrying");
                    }
                }
                // The sweep kicks twice a second, so a failed dispatch is retried.
                kicked.await;
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OUTPUT_EVERY);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let nodes = Nodes { inner };
                if nodes.lock().pending_output.is_empty() {
                    continue;
                }
                if let Err(e) = nodes.flush_output().await {
                    tracing::warn!(error = %e, "storing task output failed");
                }
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let nodes = Nodes { inner };
                if let Err(e) = nodes.sweep().await {
                    tracing::warn!(error = %e, "node sweep failed");
                }
                nodes.inner.kick.notify_one();
            }
        });
    }

    // -----------------------------------------------------------------------------------
    // Agents
    // -----------------------------------------------------------------------------------

    /// An agent said `Hello`: registers it (replacing an older connection of the same
    /// node) and reconciles the tasks it runs.
    pub async fn connect(&self, hello: AgentMessage) -> CoreResult<Connection> {
        let AgentMessage::Hello {
            node_id,
            labels,
            slots,
            hostname,
            version,
            running,
            instance,
            prefetch,
        } = hello
        else {
            return Err(CoreError::Invalid(
                "the first message of an agent must be hello".into(),
            ));
        };
        check_node_id(&node_id)?;
        if node_id == LOCAL_NODE || node_id == self.local_id() {
            return Err(CoreError::Invalid(format!(
                "node id '{node_id}' is a server's own node: give the agent another --node-id"
            )));
        }
        if slots == 0 || slots > 4096 {
            return Err(CoreError::Invalid(format!(
                "slots must be between 1 and 4096, not {slots}"
            )));
        }
        self.refuse_a_second_agent(&node_id, instance.as_deref())
            .await?;
        let connection = self
            .register(
                &node_id,
                Joining {
                    labels,
                    slots,
                    prefetch: prefetch.min(slots),
                    running: running.clone(),
                    hostname,
                    version,
                    instance,
                },
            )
            .await?;
        // Tasks the store has running there that the agent no longer knows are lost.
        let stale: Vec<TaskRecord> = self
            .inner
            .store
            .tasks_in(&[TaskState::Running])
            .await?
            .into_iter()
            .filter(|t| {
                t.task.node.as_deref() == Some(node_id.as_str())
                    && !running.contains(&key(&t.task.job, &t.task.id))
            })
            .collect();
        for task in stale {
            self.lost(
                &task.task.job,
                &task.task.id,
                &node_id,
                "the agent restarted while it ran",
                true,
            )
            .await?;
        }
        self.inner.kick.notify_one();
        Ok(connection)
    }

    /// Another agent process under a node id whose agent is alive here (heard from
    /// within the heartbeat timeout) is refused: taking its place would cut off the
    /// real one and hand its node to the newcomer's labels and slots. The same process
    /// reconnecting (its old connection not noticed dead yet) takes its place.
    /// With a shared store the same holds for an agent connected to another server.
    async fn refuse_a_second_agent(&self, node_id: &str, instance: Option<&str>) -> CoreResult<()> {
        let taken = |where_: String| {
            CoreError::Conflict(format!(
                "node id '{node_id}' is taken: another agent with that id is connected \
                 ({where_}). Stop that agent, or give this one another --node-id"
            ))
        };
        {
            let state = self.lock();
            if let Some(link) = state.links.get(node_id) {
                let same = instance.is_some() && link.instance.as_deref() == instance;
                let heard = link.last_seen.elapsed();
                if !same && heard < self.inner.config.heartbeat_timeout {
                    return Err(taken(format!("heard from {}s ago", heard.as_secs())));
                }
                return Ok(());
            }
        }
        if let Some(record) = self.record(node_id).await? {
            let same = instance.is_some() && record.instance.as_deref() == instance;
            if !same && self.connected_elsewhere(&record) {
                let server = record.server.unwrap_or_default();
                return Err(taken(format!("to server {server}")));
            }
        }
        Ok(())
    }

    async fn register(&self, node_id: &str, joining: Joining) -> CoreResult<Connection> {
        let Joining {
            labels,
            slots,
            prefetch,
            running,
            hostname,
            version,
            instance,
        } = joining;
        let (tx, messages) = mpsc::unbounded_channel();
        let session = {
            let mut state = self.lock();
            state.next_session += 1;
            let session = state.next_session;
            state.away.remove(node_id);
            state.links.insert(
                node_id.to_owned(),
                Link {
                    session,
                    tx,
                    labels: labels.clone(),
                    slots,
                    prefetch,
                    running: running.into_iter().collect(),
                    placed: HashMap::new(),
                    last_seen: Instant::now(),
                    instance: instance.clone(),
                },
            );
            session
        };
        let mut record = self.record(node_id).await?.unwrap_or_default();
        record.id = node_id.to_owned();
        record.labels = labels;
        record.slots = slots;
        record.hostname = hostname;
        record.version = version;
        record.server = Some(self.inner.config.server_id.clone());
        record.last_seen = Some(Utc::now());
        record.instance = instance;
        // The local node comes up with the server: no event of its own.
        let event = (node_id != self.local_id()).then_some("node.connected");
        self.put_node(&record, event).await?;
        Ok(Connection {
            node_id: node_id.to_owned(),
            session,
            messages,
            heartbeat_secs: self.inner.config.heartbeat_timeout.as_secs().max(1),
        })
    }

    /// The connection of `session` ended. Its running tasks stay running for the
    /// heartbeat timeout, so an agent that reconnects at once keeps them.
    pub async fn disconnect(&self, node_id: &str, session: u64) -> CoreResult<()> {
        let removed = {
            let mut state = self.lock();
            let mine = state
                .links
                .get(node_id)
                .is_some_and(|link| link.session == session);
            if mine {
                state.away.insert(node_id.to_owned(), Instant::now());
                state.links.remove(node_id).map(|link| link.last_seen)
            } else {
                None
            }
        };
        if let Some(heard) = removed {
            if let Some(mut record) = self.record(node_id).await? {
                record.server = None;
                // The node list shows when it was last heard from, not when it came.
                record.last_seen = chrono::Duration::from_std(heard.elapsed())
                    .ok()
                    .map(|ago| Utc::now() - ago)
                    .or(record.last_seen);
                self.put_node(&record, Some("node.disconnected")).await?;
            }
        }
        Ok(())
    }

    /// A message from a connected agent.
    pub async fn message(
        &self,
        node_id: &str,
        session: u64,
        message: AgentMessage,
    ) -> CoreResult<()> {
        {
            let mut state = self.lock();
            match state.links.get_mut(node_id) {
                Some(link) if link.session == session => link.last_seen = Instant::now(),
                // A replaced connection: what it still says no longer counts.
                _ => return Ok(()),
            }
        }
        match message {
            AgentMessage::Heartbeat | AgentMessage::Hello { .. } => Ok(()),
            AgentMessage::Goodbye => self.leave(node_id, session).await,
            AgentMessage::Output {
                job,
                task,
                stream,
                data,
            } => self.output(&job, &task, stream, &data).await,
            AgentMessage::Finished {
                job,
                task,
                exit_code,
                signal,
                reason,
                results,
                killed,
            } => {
                if killed
                    && node_id == self.local_id()
                    && self.inner.stopping.load(Ordering::SeqCst)
                {
                    // Killed because this server stops: left running in the store, so
                    // the restart retries it rather than count a failure.
                    return Ok(());
                }
                {
                    let mut state = self.lock();
                    let placed = state.links.get_mut(node_id).and_then(|link| {
                        let key = key(&job, &task);
                        link.running.remove(&key);
                        link.placed.remove(&key)
                    });
                    state.ends.push(PendingEnd {
                        node: node_id.to_owned(),
                        job,
                        task,
                        end: TaskEnd {
                            exit_code,
                            signal,
                            reason,
                            results,
                            killed,
                        },
                        placed,
                    });
                }
                // The scheduler settles the end and fills the slot it freed.
                self.inner.kick.notify_one();
                Ok(())
            }
        }
    }

    /// Disconnects nodes that stopped beating and loses the tasks of nodes away for
    /// longer than the heartbeat timeout.
    async fn sweep(&self) -> CoreResult<()> {
        self.flush_counters().await?;
        if self.inner.store.owner().is_some() {
            self.refresh_seen().await?;
        }
        let timeout = self.inner.config.heartbeat_timeout;
        let silent: Vec<(String, u64)> = self
            .lock()
            .links
            .iter()
            .filter(|(id, link)| {
                id.as_str() != self.local_id() && link.last_seen.elapsed() > timeout
            })
            .map(|(id, link)| (id.clone(), link.session))
            .collect();
        for (id, session) in silent {
            tracing::warn!(node = %id, "no heartbeat within {timeout:?}: disconnected");
            self.disconnect(&id, session).await?;
        }
        let gone: HashSet<String> = self
            .lock()
            .away
            .iter()
            .filter(|(_, since)| since.elapsed() > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        self.lose_tasks_on(&gone, "stopped responding").await
    }

    /// An agent said goodbye: it killed its tasks and sent their ends, and will not
    /// come back with any. What the store still has running there is lost now, not
    /// after the heartbeat timeout.
    async fn leave(&self, node_id: &str, session: u64) -> CoreResult<()> {
        self.disconnect(node_id, session).await?;
        // The ends it sent just before are settled first (a round is queued for them).
        self.round().await?;
        self.lose_tasks_on(
            &HashSet::from([node_id.to_owned()]),
            "stopped (its agent left)",
        )
        .await
    }

    /// Loses the running tasks of nodes that are gone, each with `why`.
    async fn lose_tasks_on(&self, gone: &HashSet<String>, why: &str) -> CoreResult<()> {
        if gone.is_empty() {
            return Ok(());
        }
        let lost: Vec<TaskRecord> = self
            .inner
            .store
            .tasks_in(&[TaskState::Running])
            .await?
            .into_iter()
            .filter(|t| t.task.node.as_ref().is_some_and(|n| gone.contains(n)))
            .collect();
        {
            // Their tasks are settled below; nothing more to wait for from them.
            let mut state = self.lock();
            for id in gone {
                state.away.remove(id);
            }
        }
        // A node runs its tasks in the order they were placed, and holds those beyond
        // its slots until one ends (prefetch): of a node's lost tasks, the ones placed
        // last, beyond its slots, never started and are not failed attempts. Counting
        // them would fail a job for a node that merely went away with a full queue.
        let mut per_node: HashMap<String, Vec<TaskRecord>> = HashMap::new();
        for task in lost {
            let node = task.task.node.clone().unwrap_or_default();
            per_node.entry(node).or_default().push(task);
        }
        for (node, mut tasks) in per_node {
            let slots = self.record(&node).await?.map_or(0, |r| r.slots) as usize;
            tasks.sort_by_key(|t| t.task.started_at);
            for (i, task) in tasks.into_iter().enumerate() {
                let counted = i < slots.max(1);
                self.lost(
                    &task.task.job,
                    &task.task.id,
                    &node,
                    &format!("node {node} {why}"),
                    counted,
                )
                .await?;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Node list
    // -----------------------------------------------------------------------------------

    /// The output waiting for `job`, numbered now. Callers hold the `ops` lock until it
    /// is committed, so chunks are committed in the order of their numbers and a
    /// follower reading "after N" never skips one.
    fn take_output(&self, job: &str) -> Vec<LogChunkBytes> {
        let pieces = self.lock().pending_output.remove(job).unwrap_or_default();
        pieces
            .into_iter()
            .map(|(stream, data)| LogChunkBytes {
                seq: self.inner.out_seq.fetch_add(1, Ordering::SeqCst),
                stream,
                data,
            })
            .collect()
    }

    /// Stores the output waiting for every job.
    async fn flush_output(&self) -> CoreResult<()> {
        let _ops = self.ops().await?;
        let jobs: Vec<String> = self.lock().pending_output.keys().cloned().collect();
        for job in jobs {
            let chunks = self.take_output(&job);
            match self.inner.store.append_output(&job, chunks).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Counts a task outcome of a node: 0 ok, 1 failed, 2 lost.
    fn count(&self, node: &str, outcome: usize) {
        self.lock().counters.entry(node.to_owned()).or_default()[outcome] += 1;
    }

    /// Adds the counted outcomes to the stored node records.
    /// With a shared store, the other servers learn which nodes are connected here from
    /// their records: `last_seen` is written again a few times per heartbeat timeout.
    async fn refresh_seen(&self) -> CoreResult<()> {
        let every = self.inner.config.heartbeat_timeout / 3;
        let due: Vec<String> = {
            let mut state = self.lock();
            if state.seen_written.is_some_and(|at| at.elapsed() < every) {
                return Ok(());
            }
            state.seen_written = Some(Instant::now());
            // The server's own node too: other servers see it connected through this.
            state.links.keys().cloned().collect()
        };
        for id in due {
            if let Some(mut record) = self.record(&id).await? {
                record.last_seen = Some(Utc::now());
                record.server = Some(self.inner.config.server_id.clone());
                self.inner.store.put_node(&record, None).await?;
            }
        }
        Ok(())
    }

    async fn flush_counters(&self) -> CoreResult<()> {
        let pending: Vec<(String, [u64; 3])> = self.lock().counters.drain().collect();
        for (node, [ok, failed, lost]) in pending {
            if let Some(mut record) = self.record(&node).await? {
                record.tasks_ok += ok;
                record.tasks_failed += failed;
                record.tasks_lost += lost;
                self.inner.store.put_node(&record, None).await?;
            }
        }
        Ok(())
    }

    async fn record(&self, id: &str) -> CoreResult<Option<NodeRecord>> {
        Ok(self
            .inner
            .store
            .list_nodes()
            .await?
            .into_iter()
            .find(|n| n.id == id))
    }

    async fn put_node(&self, record: &NodeRecord, event: Option<&str>) -> CoreResult<()> {
        let event = event.map(|kind| {
            NewEvent::new(
                kind,
                &record.id,
                serde_json::to_value(self.view(record)).unwrap_or_default(),
            )
        });
        self.inner.store.put_node(record, event).await?;
        Ok(())
    }

    fn view(&self, record: &NodeRecord) -> Node {
        let state = self.lock();
        let link = state.links.get(&record.id);
        let [ok, failed, lost] = state.counters.get(&record.id).copied().unwrap_or_default();
        let mut running: Vec<String> = link
            .map(|l| l.running.iter().cloned().collect())
            .unwrap_or_default();
        running.sort();
        let jobs = running
            .iter()
            .map(|k| {
                k.split_once('/')
                    .map_or(k.clone(), |(job, _)| job.to_owned())
            })
            .collect();
        Node {
            id: record.id.clone(),
            labels: link.map_or(record.labels.clone(), |l| l.labels.clone()),
            slots: link.map_or(record.slots, |l| l.slots),
            connected: link.is_some() || self.connected_elsewhere(record),
            blacklisted: state.blacklisted.contains(&record.id),
            // The server's own node is this process: seen now. A connected node's last
            // heartbeat; else what was stored.
            last_seen: if record.id == self.local_id() {
                Some(Utc::now())
            } else {
                link.and_then(|l| chrono::Duration::from_std(l.last_seen.elapsed()).ok())
                    .map(|ago| Utc::now() - ago)
                    .or(record.last_seen)
            },
            running,
            jobs,
            tasks_ok: record.tasks_ok + ok,
            tasks_failed: record.tasks_failed + failed,
            tasks_lost: record.tasks_lost + lost,
            hostname: record.hostname.clone(),
            version: record.version.clone(),
            server: (link.is_some() || self.connected_elsewhere(record))
                .then(|| record.server.clone())
                .flatten(),
        }
    }

    /// True for a node connected to another server sharing the store: that server
    /// refreshes its record's `last_seen` while it is (see `sweep`).
    fn connected_elsewhere(&self, record: &NodeRecord) -> bool {
        let timeout = chrono::Duration::from_std(self.inner.config.heartbeat_timeout)
            .unwrap_or_else(|_| chrono::Duration::seconds(15));
        record
            .server
            .as_ref()
            .is_some_and(|s| *s != self.inner.config.server_id)
            && record
                .last_seen
                .is_some_and(|seen| Utc::now() - seen < timeout)
    }

    /// Every node ever seen, connected or not.
    pub async fn list(&self) -> CoreResult<Vec<Node>> {
        let records = self.inner.store.list_nodes().await?;
        let mut nodes: Vec<Node> = records.iter().map(|r| self.view(r)).collect();
        self.fill_running_elsewhere(&mut nodes).await?;
        Ok(nodes)
    }

    pub async fn get(&self, id: &str) -> CoreResult<Node> {
        let record = self
            .record(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("node '{id}'")))?;
        let mut node = [self.view(&record)];
        self.fill_running_elsewhere(&mut node).await?;
        let [node] = node;
        Ok(node)
    }

    /// The running tasks of nodes connected to other servers (shared store): only the
    /// store knows them here, so every server's list says the same.
    async fn fill_running_elsewhere(&self, nodes: &mut [Node]) -> CoreResult<()> {
        let own = &self.inner.config.server_id;
        let elsewhere = |n: &Node| n.connected && n.server.as_ref().is_some_and(|s| s != own);
        if !nodes.iter().any(elsewhere) {
            return Ok(());
        }
        let running = self.inner.store.tasks_in(&[TaskState::Running]).await?;
        for node in nodes.iter_mut().filter(|n| elsewhere(n)) {
            let mut keys: Vec<String> = running
                .iter()
                .filter(|t| t.task.node.as_deref() == Some(node.id.as_str()))
                .map(|t| key(&t.task.job, &t.task.id))
                .collect();
            keys.sort();
            node.jobs = keys
                .iter()
                .map(|k| {
                    k.split_once('/')
                        .map_or(k.clone(), |(job, _)| job.to_owned())
                })
                .collect();
            node.running = keys;
        }
        Ok(())
    }

    /// Ids of the blacklisted nodes.
    pub fn blacklisted(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().blacklisted.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// Stops giving the node new tasks (running ones go on).
    pub async fn blacklist(&self, id: &str) -> CoreResult<Node> {
        self.set_blacklisted(id, true).await
    }

    pub async fn whitelist(&self, id: &str) -> CoreResult<Node> {
        self.set_blacklisted(id, false).await
    }

    async fn set_blacklisted(&self, id: &str, on: bool) -> CoreResult<Node> {
        let mut record = self
            .record(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("node '{id}'")))?;
        record.blacklisted = on;
        {
            let mut state = self.lock();
            if on {
                state.blacklisted.insert(id.to_owned());
            } else {
                state.blacklisted.remove(id);
            }
        }
        let kind = if on {
            "node.blacklisted"
        } else {
            "node.whitelisted"
        };
        self.put_node(&record, Some(kind)).await?;
        self.inner.kick.notify_one();
        Ok(self.view(&record))
    }

    /// Sets how many tasks a node runs at once (until it reconnects with its own).
    pub async fn set_slots(&self, id: &str, slots: u32) -> CoreResult<Node> {
        let mut record = self
            .record(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("node '{id}'")))?;
        record.slots = slots;
        if let Some(link) = self.lock().links.get_mut(id) {
            link.slots = slots;
        }
        self.put_node(&record, Some("node.changed")).await?;
        self.inner.kick.notify_one();
        Ok(self.view(&record))
    }

    // -----------------------------------------------------------------------------------
    // Jobs
    // -----------------------------------------------------------------------------------

    /// Queues a fan-out job: one map task per input, a reduce after them if asked.
    pub async fn submit(
        &self,
        request: FanoutRequest,
        submitted_by: Option<String>,
    ) -> CoreResult<Job> {
        self.submit_with(request, None, submitted_by).await
    }

    /// Runs `program` once, on `node` if given (any node otherwise), as a job of one
    /// task: placed, retried and killed like any other. Returns the queued job.
    pub async fn run_program(
        &self,
        program: Program,
        node: Option<String>,
        submitted_by: Option<String>,
    ) -> CoreResult<Job> {
        let request = FanoutRequest {
            map: program.name.clone(),
            inputs: vec![String::new()],
            reduce: None,
            params: BTreeMap::new(),
            labels: Vec::new(),
            node,
            max_failures: Some(0),
        };
        self.submit_with(request, Some(program), submitted_by).await
    }

    async fn submit_with(
        &self,
        request: FanoutRequest,
        program: Option<Program>,
        submitted_by: Option<String>,
    ) -> CoreResult<Job> {
        let map = match &program {
            Some(program) => Arc::new(program_script(program)),
            None => {
                let catalog = self.inner.scripts.catalog();
                let map = catalog
                    .get(&request.map)
                    .ok_or_else(|| CoreError::UnknownScript(request.map.clone()))?;
                if let Some(reduce) = &request.reduce {
                    catalog
                        .get(reduce)
                        .ok_or_else(|| CoreError::UnknownScript(reduce.clone()))?;
                }
                map
            }
        };
        Jobs::check_params(&map, &request.params)?;
        if request.inputs.is_empty() {
            return Err(CoreError::Invalid(
                "a fan-out job needs at least one input".into(),
            ));
        }
        if request.inputs.len() > MAX_INPUTS {
            return Err(CoreError::Invalid(format!(
                "at most {MAX_INPUTS} inputs per job, not {}",
                request.inputs.len()
            )));
        }
        if let Some(input) = request.inputs.iter().find(|i| i.contains('\0')) {
            return Err(CoreError::Invalid(format!(
                "input {input:?} holds a NUL byte, which an environment variable cannot carry"
            )));
        }
        if let Some(node) = &request.node {
            check_node_id(node)?;
        }
        let name = self.inner.jobs.new_name(&map.name);
        let now = Utc::now();
        let shown: BTreeMap<String, String> = request
            .params
            .iter()
            .map(|(k, v)| {
                let filtered = map.filtered_params.iter().any(|f| f == k);
                (
                    k.clone(),
                    if filtered {
                        crate::jobs::FILTERED.into()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect();
        let spec = JobSpec {
            name: name.clone(),
            script: map.name.clone(),
            filename: map.filename.clone(),
            params: shown.clone(),
            output: map.output,
            lock: false,
            timeout_secs: map.timeout_secs,
            submitted_by: submitted_by.clone(),
            created_at: now,
        };
        let mut fanout = Fanout {
            inputs: request.inputs.iter().take(SHOWN_INPUTS).cloned().collect(),
            total: request.inputs.len() as u32,
            reduce: request.reduce.clone(),
            labels: request.labels.clone(),
            node: request.node.clone(),
            max_failures: request
                .max_failures
                .unwrap_or(self.inner.config.max_failures),
            failures: 0,
            progress: Vec::new(),
            params: request.params.clone(),
            program,
        };
        let base = now.timestamp_millis().max(0) * 100_000;
        let tasks: Vec<TaskRecord> = request
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| TaskRecord {
                task: Task::queued(&name, "map", i as u32, Some(input.clone())),
                seq: base + i as i64,
                excluded: Vec::new(),
            })
            .collect();
        fanout.progress = progress(&tasks, fanout.reduce.is_some());
        let mut record = JobRecord {
            name: name.clone(),
            script: map.name.clone(),
            state: JobState::Queued,
            params: shown,
            node: request.node.clone(),
            submitted_by,
            created_at: now,
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            return_values: BTreeMap::new(),
            results: Vec::new(),
            spec: serde_json::to_value(&spec).unwrap_or_default(),
            pid: None,
            server: None,
        };
        set_fanout(&mut record, &fanout);
        std::fs::create_dir_all(self.inner.results_dir.join(&name)).map_err(|source| {
            CoreError::Io {
                action: format!("create the results directory of {name}"),
                source,
            }
        })?;
        self.inner
            .store
            .write_tasks(TaskWrite {
                events: vec![job_event("job.created", &record)],
                job: Some(record.clone()),
                insert_job: true,
                tasks,
                output: Vec::new(),
            })
            .await?;
        self.inner.kick.notify_one();
        Ok(to_job(&record))
    }

    /// Runs one script where `placement` says: one job with one task on the chosen node
    /// or any node with the labels, or with `all`, one such job per matching node.
    pub async fn run_on(
        &self,
        script: &str,
        params: BTreeMap<String, String>,
        placement: &Placement,
        submitted_by: Option<String>,
    ) -> CoreResult<Vec<Job>> {
        let request = |node: Option<String>| FanoutRequest {
            map: script.to_owned(),
            inputs: vec![String::new()],
            reduce: None,
            params: params.clone(),
            labels: placement.labels.clone(),
            node,
            max_failures: Some(0),
        };
        if !placement.all {
            if let Some(node) = &placement.node {
                self.get(node).await.map_err(|_| {
                    CoreError::NotFound(format!("node '{node}' (see opsbox nodes list)"))
                })?;
            } else if !placement.labels.is_empty() {
                // A run waits for a fitting node that is away, not for one that was
                // never seen: that would wait forever without a word.
                let known = self.list().await?;
                if !known
                    .iter()
                    .any(|n| has_labels(&n.labels, &placement.labels))
                {
                    return Err(CoreError::Invalid(format!(
                        "no node has the labels {}: see opsbox nodes list",
                        placement.labels.join(",")
                    )));
                }
            }
            return Ok(vec![
                self.submit(request(placement.node.clone()), submitted_by)
                    .await?,
            ]);
        }
        // Every connected node, to this server or (a shared store) to another one: the
        // server a node is connected to places its task.
        let records = self.inner.store.list_nodes().await?;
        let targets: Vec<String> = {
            let state = self.lock();
            let mut ids: Vec<String> = records
                .iter()
                .filter(|r| {
                    let (labels, slots) = match state.links.get(&r.id) {
                        Some(link) => (&link.labels, link.slots),
                        None if self.connected_elsewhere(r) => (&r.labels, r.slots),
                        None => return false,
                    };
                    !(state.blacklisted.contains(&r.id) || r.blacklisted)
                        && has_labels(labels, &placement.labels)
                        && placement.node.as_ref().is_none_or(|n| *n == r.id)
                        && slots > 0
                })
                .map(|r| r.id.clone())
                .collect();
            ids.sort();
            ids
        };
        if targets.is_empty() {
            return Err(CoreError::Invalid(
                "no connected node matches: see opsbox nodes list".into(),
            ));
        }
        let mut jobs = Vec::new();
        for node in targets {
            jobs.push(
                self.submit(request(Some(node)), submitted_by.clone())
                    .await?,
            );
        }
        Ok(jobs)
    }

    /// The tasks of a fan-out job, in order.
    pub async fn tasks(&self, job: &str) -> CoreResult<Vec<Task>> {
        let record = self
            .inner
            .store
            .get_job(job)
            .await?
            .ok_or_else(|| CoreError::UnknownJob(job.to_owned()))?;
        if record.spec.get("fanout").is_none() {
            return Ok(Vec::new());
        }
        Ok(self
            .inner
            .store
            .job_tasks(job)
            .await?
            .into_iter()
            .map(|t| t.task)
            .collect())
    }

    /// Kills a fan-out job: queued tasks never start, running ones are stopped on their
    /// nodes. The job is `killed` at once.
    pub async fn kill(&self, job: &str, by: Option<&str>) -> CoreResult<()> {
        let _ops = self.ops().await?;
        let Some(record) = self.inner.store.get_job(job).await? else {
            return Err(CoreError::UnknownJob(job.to_owned()));
        };
        if record.state.is_terminal() {
            return Ok(());
        }
        let mut work = JobWork::new(record)?;
        let mut tasks = self.inner.store.job_tasks(job).await?;
        let reason = match by {
            Some(who) => format!("killed by {who}"),
            None => "killed".to_owned(),
        };
        // Tasks running on nodes of another server sharing the store: that server tells
        // their nodes (see `spawn_kill_listener`).
        let elsewhere: Vec<serde_json::Value> = {
            let state = self.lock();
            tasks
                .iter()
                .filter(|t| t.task.state == TaskState::Running)
                .filter(|t| {
                    t.task
                        .node
                        .as_ref()
                        .is_some_and(|n| !state.links.contains_key(n))
                })
                .map(|t| serde_json::json!({"job": t.task.job, "task": t.task.id, "node": t.task.node}))
                .collect()
        };
        if self.inner.store.owner().is_some() {
            for ask in &elsewhere {
                self.inner.store.signal(TASK_KILL, &ask.to_string()).await?;
            }
        }
        for stopped in self.stop_tasks(&mut tasks, TaskState::Killed, &reason) {
            work.change(stopped);
        }
        work.fanout.progress = progress(&tasks, work.fanout.reduce.is_some());
        let record = &mut work.record;
        record.state = JobState::Killed;
        record.reason = Some(reason);
        record.finished_at = Some(Utc::now());
        record.results = results_in(&self.inner.results_dir.join(job));
        work.finish();
        self.commit(work).await
    }

    /// Ends every unfinished task of a job with `state`: queued ones at once, running
    /// ones after telling their node (or at once when the node is away). Returns those
    /// changed.
    fn stop_tasks(
        &self,
        tasks: &mut [TaskRecord],
        state: TaskState,
        reason: &str,
    ) -> Vec<TaskRecord> {
        let links = self.lock();
        let mut changed = Vec::new();
        for t in tasks.iter_mut() {
            match t.task.state {
                TaskState::Queued => {}
                TaskState::Running => {
                    let node = t.task.node.clone().unwrap_or_default();
                    if let Some(link) = links.links.get(&node) {
                        let _ = link.tx.send(ServerMessage::Kill {
                            job: t.task.job.clone(),
                            task: t.task.id.clone(),
                        });
                        // It ends when the node reports it.
                        continue;
                    }
                }
                _ => continue,
            }
            t.task.state = state;
            t.task.reason = Some(reason.to_owned());
            t.task.finished_at = Some(Utc::now());
            changed.push(t.clone());
        }
        changed
    }

    /// Writes a job's changes of this round in one transaction: its row, the changed
    /// tasks with their events, the job's own event and its waiting output.
    async fn commit(&self, mut work: JobWork) -> CoreResult<()> {
        if work.record.state.is_terminal() {
            let mut state = self.lock();
            state.task_secs.remove(&work.record.name);
            state.output_caps.remove(&work.record.name);
        }
        set_fanout(&mut work.record, &work.fanout);
        work.events.push(job_event(work.kind, &work.record));
        let job = work.record.name.clone();
        let output = self.take_output(&job);
        match self
            .inner
            .store
            .write_tasks(TaskWrite {
                job: Some(work.record),
                insert_job: false,
                tasks: work.tasks,
                events: work.events,
                output,
            })
            .await
        {
            // Cleaned meanwhile: nothing left to record, nor to keep.
            Err(StoreError::NotFound(_)) => {
                let _ = std::fs::remove_dir_all(self.inner.results_dir.join(&job));
                Ok(())
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// The job's work of this round, read on first use; `None` when the job is gone.
    async fn work<'a>(
        &self,
        works: &'a mut HashMap<String, JobWork>,
        job: &str,
    ) -> CoreResult<Option<&'a mut JobWork>> {
        if !works.contains_key(job) {
            let Some(record) = self.inner.store.get_job(job).await? else {
                return Ok(None);
            };
            match JobWork::new(record) {
                Ok(work) => {
                    works.insert(job.to_owned(), work);
                }
                Err(e) => {
                    tracing::warn!(job, error = %e, "left alone a job without a readable fan-out spec");
                    return Ok(None);
                }
            }
        }
        Ok(works.get_mut(job))
    }

    // -----------------------------------------------------------------------------------
    // Scheduling
    // -----------------------------------------------------------------------------------

    /// One scheduling round: settles the task ends that came in since the last one,
    /// places queued tasks on the free slots, and writes what changed, one write per
    /// job, all at once (the store's group commit makes them one transaction). While a
    /// round writes, the next round's ends gather: the busier the nodes, the more each
    /// commit carries.
    async fn round(&self) -> CoreResult<()> {
        let _ops = self.ops().await?;
        let mut works: HashMap<String, JobWork> = HashMap::new();
        let ends = std::mem::take(&mut self.lock().ends);
        for end in &ends {
            if let Err(e) = self.settle(&mut works, end).await {
                // A read failed: nothing of this round is written, and all its ends
                // wait for the next round (settling one again rewrites the same result
                // files; only the node's outcome counters may count it twice).
                self.lock().ends.splice(0..0, ends);
                return Err(e);
            }
        }
        // Places sent before a failed read must be written: the nodes run them.
        let failed = self.place_queued(&mut works).await.err();
        let writes = works.into_values().filter(JobWork::changed).map(|work| {
            let job = work.record.name.clone();
            async move { (job, self.commit(work).await) }
        });
        let mut failed = failed;
        for (job, written) in futures::future::join_all(writes).await {
            if let Err(e) = written {
                // The job's ends are settled again by the next round (its tasks are
                // still running in the store). Tasks this round sent to nodes are
                // still queued there: after a failed commit one may run twice, as
                // when the server dies between a send and its commit.
                let mut state = self.lock();
                state
                    .ends
                    .extend(ends.iter().filter(|end| end.job == job).cloned());
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Applies a task end to its job's work of this round, unless it is about an
    /// attempt that was already settled (lost, then found).
    async fn settle(
        &self,
        works: &mut HashMap<String, JobWork>,
        end: &PendingEnd,
    ) -> CoreResult<()> {
        let Some(work) = self.work(works, &end.job).await? else {
            return Ok(());
        };
        let task = match (work.task(&end.task), &end.placed) {
            (Some(task), _) => task,
            (None, Some(placed)) => placed.clone(),
            (None, None) => match self.inner.store.get_task(&end.job, &end.task).await? {
                Some(task) => task,
                None => return Ok(()),
            },
        };
        if task.task.state != TaskState::Running || task.task.node.as_deref() != Some(&end.node) {
            return Ok(());
        }
        self.finished(work, &end.node, task, &end.end).await
    }

    /// Places what can be placed of the queued tasks.
    async fn place_queued(&self, works: &mut HashMap<String, JobWork>) -> CoreResult<()> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let free: u32 = self
            .lock()
            .links
            .values()
            .map(|l| l.capacity().saturating_sub(l.running.len() as u32))
            .sum();
        if free == 0 {
            return Ok(());
        }
        // Tasks queued by this round (a retry, a reduce) are not in the store yet: the
        // round that follows this one places them.
        let queued = self.inner.store.queued_tasks(free).await?;
        if queued.is_empty() {
            return Ok(());
        }
        // Round robin between jobs, oldest job first within a round.
        let mut per_job: Vec<(String, std::collections::VecDeque<TaskRecord>)> = Vec::new();
        for task in queued {
            match per_job.iter_mut().find(|(job, _)| *job == task.task.job) {
                Some((_, list)) => list.push_back(task),
                None => per_job.push((task.task.job.clone(), [task].into())),
            }
        }
        // Turns go on from the job after the one served last, across rounds: when one
        // slot frees at a time, the oldest job must not win every time.
        let last = self.lock().last_served.clone();
        if let Some(at) = last.and_then(|l| per_job.iter().position(|(job, _)| *job == l)) {
            per_job.rotate_left(at + 1);
        }
        for (job, _) in &per_job {
            self.work(works, job).await?;
        }
        let mut placed_any = true;
        while placed_any {
            placed_any = false;
            for (job, list) in per_job.iter_mut() {
                let Some(task) = list.front() else { continue };
                let Some(work) = works.get_mut(job) else {
                    list.clear();
                    continue;
                };
                if work.record.state.is_terminal() {
                    list.clear();
                    continue;
                }
                let ahead = self
                    .lock()
                    .task_secs
                    .get(job)
                    .is_some_and(|secs| *secs < AHEAD_BELOW_SECS);
                let Some(node) = self.choose(task, &work.fanout, ahead) else {
                    // Nothing fits this job's next task now; its others need the same.
                    list.clear();
                    continue;
                };
                let task = list.pop_front().expect("front exists");
                if self.place(work, task, &node).await? {
                    self.lock().last_served = Some(job.clone());
                }
                placed_any = true;
            }
        }
        Ok(())
    }

    /// The node for a task now, if any has room.
    /// `ahead`: the task may go to a node whose slots are all busy, within its
    /// prefetch.
    fn choose(&self, task: &TaskRecord, fanout: &Fanout, ahead: bool) -> Option<String> {
        let state = self.lock();
        let fits = |id: &String, link: &Link| {
            !state.blacklisted.contains(id)
                && has_labels(&link.labels, &fanout.labels)
                && fanout.node.as_ref().is_none_or(|n| n == id)
        };
        // A node's load counts the tasks it holds ahead (prefetched) too, so a node with
        // an idle slot always wins over one that would have to hold the task.
        let free = |link: &Link| {
            let held = link.running.len() as u32;
            held < link.slots || (ahead && held < link.capacity())
        };
        let load = |link: &Link| link.running.len() as f64 / link.slots.max(1) as f64;
        let pick = |allow_excluded: bool| {
            state
                .links
                .iter()
                .filter(|(id, link)| {
                    fits(id, link) && free(link) && (allow_excluded || !task.excluded.contains(id))
                })
                .min_by(|a, b| load(a.1).total_cmp(&load(b.1)).then(a.0.cmp(b.0)))
                .map(|(id, _)| id.clone())
        };
        // A node that failed this task is used again only when no other fitting node
        // exists at all (busy or not).
        let others_exist = state
            .links
            .iter()
            .any(|(id, link)| fits(id, link) && !task.excluded.contains(id));
        pick(false).or_else(|| if others_exist { None } else { pick(true) })
    }

    /// Sends a task to a node and records it as running in the job's work; false when
    /// it could not be sent.
    async fn place(
        &self,
        work: &mut JobWork,
        mut task: TaskRecord,
        node: &str,
    ) -> CoreResult<bool> {
        let mut message = match self.run_message(&work.record, &work.fanout, &task) {
            Ok(message) => message,
            Err(reason) => {
                // The script vanished (a reload) or its inputs cannot be read: the task
                // cannot run anywhere, so the job fails.
                self.fail_job(work, task, &reason).await?;
                return Ok(false);
            }
        };
        task.task.state = TaskState::Running;
        task.task.node = Some(node.to_owned());
        task.task.attempts += 1;
        task.task.started_at = Some(Utc::now());
        task.task.finished_at = None;
        task.task.exit_code = None;
        let sent = {
            let mut state = self.lock();
            match state.links.get_mut(node) {
                Some(link) => {
                    if let ServerMessage::Run { slots, .. } = &mut message {
                        *slots = Some(link.slots);
                    }
                    let key = key(&task.task.job, &task.task.id);
                    link.running.insert(key.clone());
                    link.placed.insert(key, task.clone());
                    link.tx.send(message).is_ok()
                }
                None => false,
            }
        };
        if !sent {
            return Ok(false);
        }
        let record = &mut work.record;
        if record.state == JobState::Queued {
            record.state = JobState::Running;
            record.started_at = Some(Utc::now());
        }
        if work.fanout.total == 1 && work.fanout.reduce.is_none() {
            record.node = Some(node.to_owned());
        }
        shift(
            &mut work.fanout.progress,
            &task.task.phase,
            TaskState::Queued,
            TaskState::Running,
        );
        work.change(task);
        Ok(true)
    }

    /// The `Run` message of a task.
    fn run_message(
        &self,
        record: &JobRecord,
        fanout: &Fanout,
        task: &TaskRecord,
    ) -> Result<ServerMessage, String> {
        let script_name = if task.task.phase == "reduce" {
            fanout.reduce.clone().unwrap_or_default()
        } else {
            record.script.clone()
        };
        let script = match &fanout.program {
            Some(program) => Arc::new(program_script(program)),
            None => self
                .inner
                .scripts
                .catalog()
                .get(&script_name)
                .ok_or_else(|| format!("script '{script_name}' is no longer in the catalog"))?,
        };
        let path = self.inner.scripts.dir().join(&script.filename);
        let program =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let params: BTreeMap<String, String> = fanout
            .params
            .iter()
            .filter(|(k, _)| script.params.iter().any(|p| &p.name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut env = self
            .inner
            .jobs
            .task_environment(&record.name, &script, &params);
        if let Some(program) = &fanout.program {
            env.extend(program.env.clone());
        }
        env.insert("OPSBOX_TASK".into(), task.task.id.clone());
        if let Some(input) = &task.task.input {
            env.insert("INPUT".into(), input.clone());
        }
        let inputs = if task.task.phase == "reduce" {
            self.reduce_inputs(&record.name)
                .map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        Ok(ServerMessage::Run {
            job: record.name.clone(),
            task: task.task.id.clone(),
            script: script.filename.clone(),
            program: b64().encode(program),
            env,
            timeout_secs: script.timeout_secs,
            inputs,
            slots: None,
        })
    }

    /// The map outputs, for the reduce task: `map-N.out` and `map-N/...` of each.
    fn reduce_inputs(&self, job: &str) -> std::io::Result<Vec<FileData>> {
        let dir = self.inner.results_dir.join(job);
        let mut files = Vec::new();
        for file in results_in(&dir) {
            if file.path.starts_with("map-") {
                let data = std::fs::read(dir.join(&file.path))?;
                files.push(FileData {
                    path: file.path,
                    data: b64().encode(data),
                });
            }
        }
        Ok(files)
    }

    // -----------------------------------------------------------------------------------
    // Task ends
    // -----------------------------------------------------------------------------------

    /// Stores a piece of a task's output: in its `.out`/`.err` result file and in the
    /// job's output (what `jobs log` shows).
    async fn output(&self, job: &str, task: &str, stream: OutStream, data: &str) -> CoreResult<()> {
        let Ok(bytes) = b64().decode(data) else {
            return Ok(());
        };
        let suffix = match stream {
            OutStream::Stdout => "out",
            OutStream::Stderr => "err",
        };
        let dir = self.inner.results_dir.join(job);
        // A job submitted through another server sharing the store has its directory
        // there: this server keeps the files of the tasks its own nodes run. (Were the
        // job cleaned meanwhile, its next write finds it gone and removes this again.)
        if !dir.is_dir() {
            let _ = std::fs::create_dir_all(&dir);
        }
        let path = dir.join(format!("{}.{suffix}", task.replace(':', "-")));
        let max = self.inner.config.max_output_bytes;
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let used = file.metadata().map_or(0, |m| m.len());
            let (fits, note) = crate::output::OutputCap::starting_at(max, used).take(bytes.len());
            let _ = file.write_all(&bytes[..fits]);
            if let Some(note) = note {
                let _ = file.write_all(note.as_bytes());
            }
        }
        let mut state = self.lock();
        let (fits, note) = state
            .output_caps
            .entry(job.to_owned())
            .or_insert_with(|| crate::output::OutputCap::new(max))
            .take(bytes.len());
        let pending = state.pending_output.entry(job.to_owned()).or_default();
        if fits > 0 {
            let mut bytes = bytes;
            bytes.truncate(fits);
            pending.push((stream, bytes));
        }
        if let Some(note) = note {
            pending.push((OutStream::Stderr, note.into_bytes()));
        }
        Ok(())
    }

    /// Applies a task's end to its job: a success moves the job on (its reduce task,
    /// its end), a failure is retried or fails the job.
    async fn finished(
        &self,
        work: &mut JobWork,
        node: &str,
        mut task: TaskRecord,
        end: &TaskEnd,
    ) -> CoreResult<()> {
        let job = work.record.name.clone();
        let task_id = task.task.id.clone();
        let success = end.exit_code == Some(0) && !end.killed && end.signal.is_none();
        task.task.results = self.save_results(&job, &task_id, &end.results);
        self.count(node, if success { 0 } else { 1 });
        task.task.exit_code = end.exit_code;
        let now = Utc::now();
        task.task.finished_at = Some(now);
        if let Some(started) = task.task.started_at {
            let secs = (now - started).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            let mut state = self.lock();
            let average = state.task_secs.entry(job.clone()).or_insert(secs);
            *average = 0.7 * *average + 0.3 * secs;
        }
        task.task.reason = end.reason.clone();
        if work.record.state.is_terminal() {
            let state = if end.killed {
                TaskState::Killed
            } else if success {
                TaskState::Succeeded
            } else {
                TaskState::Failed
            };
            shift(
                &mut work.fanout.progress,
                &task.task.phase,
                TaskState::Running,
                state,
            );
            task.task.state = state;
            work.change(task);
            return Ok(());
        }
        if !success {
            let reason = end
                .reason
                .clone()
                .unwrap_or_else(|| match (end.exit_code, end.signal) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, Some(signal)) => format!("ended by signal {signal}"),
                    _ => "failed".into(),
                });
            let why = if work.is_single_run() {
                // A run on a node (`scripts run --node`): the job is its one task and
                // ends the way it did, exit code included (the CLI's follows it), in
                // the words of a local run.
                work.record.exit_code = end.exit_code;
                work.record.signal = end.signal;
                format!("{reason} on {node}")
            } else {
                format!("{task_id} failed on {node}: {reason}")
            };
            return self.retry_or_fail(work, task, node, &why, true).await;
        }
        shift(
            &mut work.fanout.progress,
            &task.task.phase,
            TaskState::Running,
            TaskState::Succeeded,
        );
        task.task.state = TaskState::Succeeded;
        let seq = task.seq;
        work.change(task);
        let fanout = &mut work.fanout;
        let phase = |name: &str| fanout.progress.iter().find(|p| p.phase == name).cloned();
        let maps_done = phase("map").is_some_and(|p| p.done == p.total);
        let reduce_started = phase("reduce")
            .as_ref()
            .is_some_and(|p| p.queued + p.running + p.done + p.failed > 0);
        if maps_done && fanout.reduce.is_some() && !reduce_started {
            let reduce = TaskRecord {
                task: Task::queued(&job, "reduce", 0, None),
                seq: seq + i64::from(fanout.total) + 1,
                excluded: Vec::new(),
            };
            if let Some(p) = fanout.progress.iter_mut().find(|p| p.phase == "reduce") {
                p.queued += 1;
            }
            work.change(reduce);
            self.inner.kick.notify_one();
        }
        if work.fanout.progress.iter().all(|p| p.done == p.total) {
            let record = &mut work.record;
            record.state = JobState::Succeeded;
            record.exit_code = Some(0);
            record.finished_at = Some(Utc::now());
            record.results = results_in(&self.inner.results_dir.join(&job));
            work.finish();
        }
        Ok(())
    }

    /// A task's node is gone: the attempt counts as failed and is retried elsewhere.
    /// `counted`: whether the attempt counts against the job's `max_failures` (not for a
    /// task that was only held on the node, waiting for a slot, see `lose_tasks_on`).
    async fn lost(
        &self,
        job: &str,
        task_id: &str,
        node: &str,
        why: &str,
        counted: bool,
    ) -> CoreResult<()> {
        let _ops = self.ops().await?;
        {
            let mut state = self.lock();
            if let Some(link) = state.links.get_mut(node) {
                link.running.remove(&key(job, task_id));
            }
            // An end the node reported before it went away settles the task instead.
            if state
                .ends
                .iter()
                .any(|e| e.job == job && e.task == task_id && e.node == node)
            {
                return Ok(());
            }
        }
        let Some(record) = self.inner.store.get_job(job).await? else {
            return Ok(());
        };
        let Some(mut task) = self.inner.store.get_task(job, task_id).await? else {
            return Ok(());
        };
        if task.task.state != TaskState::Running {
            return Ok(());
        }
        self.count(node, 2);
        task.task.finished_at = Some(Utc::now());
        let mut work = JobWork::new(record)?;
        if work.record.state.is_terminal() {
            shift(
                &mut work.fanout.progress,
                &task.task.phase,
                TaskState::Running,
                TaskState::Lost,
            );
            task.task.state = TaskState::Lost;
            task.task.reason = Some(why.to_owned());
            work.change(task);
        } else {
            let why = format!("{task_id} lost on {node}: {why}");
            self.retry_or_fail(&mut work, task, node, &why, counted)
                .await?;
        }
        self.commit(work).await
    }

    /// After a failed or lost attempt of a running task: queue it again (away from that
    /// node), or, past the job's failure limit, fail the job and stop its other tasks.
    /// An attempt that is not `counted` is only queued again.
    async fn retry_or_fail(
        &self,
        work: &mut JobWork,
        mut task: TaskRecord,
        node: &str,
        reason: &str,
        counted: bool,
    ) -> CoreResult<()> {
        let fanout = &mut work.fanout;
        if counted {
            fanout.failures += 1;
        }
        if fanout.failures > fanout.max_failures {
            shift(
                &mut fanout.progress,
                &task.task.phase,
                TaskState::Running,
                TaskState::Failed,
            );
            return self.fail_job(work, task, reason).await;
        }
        shift(
            &mut fanout.progress,
            &task.task.phase,
            TaskState::Running,
            TaskState::Queued,
        );
        task.task.state = TaskState::Queued;
        task.task.reason = Some(format!("{reason}; retrying"));
        if !task.excluded.iter().any(|n| n == node) {
            task.excluded.push(node.to_owned());
        }
        // The task's own event is the "retried" one: written as a queued task.
        work.change_as("task.retried", task);
        self.inner.kick.notify_one();
        Ok(())
    }

    /// Fails the job because of `task`, and stops its other tasks.
    async fn fail_job(
        &self,
        work: &mut JobWork,
        mut task: TaskRecord,
        reason: &str,
    ) -> CoreResult<()> {
        task.task.state = TaskState::Failed;
        task.task.reason = Some(reason.to_owned());
        let mut tasks = self.inner.store.job_tasks(&work.record.name).await?;
        // The store does not have this round's changes yet.
        for newer in work.tasks.iter().chain([&task]) {
            match tasks.iter_mut().find(|t| t.task.id == newer.task.id) {
                Some(t) => *t = newer.clone(),
                None => tasks.push(newer.clone()),
            }
        }
        for stopped in self.stop_tasks(&mut tasks, TaskState::Killed, "the job failed") {
            work.change(stopped);
        }
        work.change(task);
        let fanout = &mut work.fanout;
        let record = &mut work.record;
        record.state = JobState::Failed;
        let single = fanout.total == 1 && fanout.reduce.is_none() && fanout.max_failures == 0;
        record.reason = Some(if fanout.failures > fanout.max_failures && !single {
            format!(
                "{reason} ({} failed attempts, more than the job's max_failures {})",
                fanout.failures, fanout.max_failures
            )
        } else {
            reason.to_owned()
        });
        record.finished_at = Some(Utc::now());
        record.results = results_in(&self.inner.results_dir.join(&record.name));
        fanout.progress = progress(&tasks, fanout.reduce.is_some());
        work.finish();
        Ok(())
    }

    /// Writes a task's result files under `<results>/<job>/<phase>-<index>/`.
    fn save_results(
        &self,
        job: &str,
        task: &str,
        files: &[FileData],
    ) -> Vec<opsbox_api::ResultFile> {
        let dir = self.inner.results_dir.join(job);
        let prefix = task.replace(':', "-");
        for file in files {
            let (Some(relative), Ok(data)) = (safe_relative(&file.path), b64().decode(&file.data))
            else {
                tracing::warn!(job, task, path = %file.path, "refused a result file");
                continue;
            };
            let target = dir.join(&prefix).join(relative);
            if let Some(parent) = target.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Err(e) = std::fs::write(&target, data) {
                tracing::warn!(job, task, error = %e, "cannot store a result file");
            }
        }
        task_results(&dir, &prefix)
    }
}

/// A job being changed under the `ops` lock, by a scheduling round or a single
/// operation; [`Nodes::commit`] writes it in one transaction.
struct JobWork {
    record: JobRecord,
    fanout: Fanout,
    /// Changed tasks in the order of their changes (a later copy of a task wins).
    tasks: Vec<TaskRecord>,
    /// The tasks' events, in the same order.
    events: Vec<NewEvent>,
    /// The job's event: `job.progress`, or `job.finished` once it ended.
    kind: &'static str,
}

impl JobWork {
    fn new(record: JobRecord) -> CoreResult<JobWork> {
        Ok(JobWork {
            fanout: fanout_of(&record)?,
            record,
            tasks: Vec::new(),
            events: Vec::new(),
            kind: "job.progress",
        })
    }

    /// Records a task's change, with its `task.<state>` event.
    fn change(&mut self, task: TaskRecord) {
        let kind = format!("task.{}", task.task.state.as_str());
        self.change_as(&kind, task);
    }

    fn change_as(&mut self, kind: &str, task: TaskRecord) {
        self.events.push(NewEvent::new(
            kind,
            &task.task.job,
            serde_json::to_value(&task.task).unwrap_or_default(),
        ));
        self.tasks.push(task);
    }

    /// The task as this work changed it, if it did.
    fn task(&self, id: &str) -> Option<TaskRecord> {
        self.tasks.iter().rev().find(|t| t.task.id == id).cloned()
    }

    /// A job of one task and no reduce: a script run placed on a node.
    fn is_single_run(&self) -> bool {
        self.fanout.total == 1 && self.fanout.reduce.is_none()
    }

    /// The job ended.
    fn finish(&mut self) {
        self.kind = "job.finished";
    }

    /// Something to write: every change of the job's record comes with a task's
    /// change or its end.
    fn changed(&self) -> bool {
        !self.tasks.is_empty() || self.kind == "job.finished"
    }
}

/// What a node reported about a task's end.
#[derive(Clone)]
struct TaskEnd {
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<String>,
    results: Vec<FileData>,
    killed: bool,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn job_event(kind: &str, record: &JobRecord) -> NewEvent {
    NewEvent::new(
        kind,
        &record.name,
        serde_json::to_value(to_job(record)).unwrap_or_default(),
    )
}

fn has_labels(node: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| node.iter().any(|l| l == w))
}

/// Node ids are names: letters, digits, `.`, `_`, `-`, at most 64.
/// The script a program runs as: no params, its own file.
fn program_script(program: &Program) -> Script {
    Script {
        name: program.name.clone(),
        filename: program.path.display().to_string(),
        description: None,
        http_method: Default::default(),
        params: Vec::new(),
        filtered_params: Vec::new(),
        tags: Vec::new(),
        output: Default::default(),
        lock: false,
        timeout_secs: program.timeout_secs,
    }
}

pub fn check_node_id(id: &str) -> CoreResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "invalid node id '{id}': use letters, digits, '.', '_' and '-' (at most 64)"
        )))
    }
}

/// Moves one task of `phase` from one state's counter to another's.
fn shift(progress: &mut [PhaseProgress], phase: &str, from: TaskState, to: TaskState) {
    fn counter(p: &mut PhaseProgress, state: TaskState) -> &mut u32 {
        match state {
            TaskState::Queued => &mut p.queued,
            TaskState::Running => &mut p.running,
            TaskState::Succeeded => &mut p.done,
            TaskState::Failed | TaskState::Killed | TaskState::Lost => &mut p.failed,
        }
    }
    if let Some(p) = progress.iter_mut().find(|p| p.phase == phase) {
        let old = counter(p, from);
        *old = old.saturating_sub(1);
        *counter(p, to) += 1;
    }
}

/// Task counts per phase.
fn progress(tasks: &[TaskRecord], reduce: bool) -> Vec<PhaseProgress> {
    let mut phases = vec![PhaseProgress {
        phase: "map".into(),
        ..PhaseProgress::default()
    }];
    if reduce {
        phases.push(PhaseProgress {
            phase: "reduce".into(),
            total: 1,
            ..PhaseProgress::default()
        });
    }
    for t in tasks {
        let Some(p) = phases.iter_mut().find(|p| p.phase == t.task.phase) else {
            continue;
        };
        if t.task.phase == "map" {
            p.total += 1;
        }
        match t.task.state {
            TaskState::Queued => p.queued += 1,
            TaskState::Running => p.running += 1,
            TaskState::Succeeded => p.done += 1,
            TaskState::Failed | TaskState::Killed | TaskState::Lost => p.failed += 1,
        }
    }
    phases
}
