//! Nodes, tasks and fan-out jobs (`/v1/nodes`, `POST /v1/jobs`, `/v1/jobs/{name}/tasks`),
//! and the messages agents and the server exchange over `GET /v1/agent` (a WebSocket,
//! one JSON message per text frame).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ResultFile, Stream};

/// The node id of the agent embedded in every server.
pub const LOCAL_NODE: &str = "local";

/// A machine that runs tasks: an `opsbox agent`, or the server's own `local` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: String,
    pub labels: Vec<String>,
    /// Tasks it runs at once.
    pub slots: u32,
    pub connected: bool,
    /// Gets no new tasks; running ones go on.
    pub blacklisted: bool,
    pub last_seen: Option<DateTime<Utc>>,
    /// Task ids (`job/phase:index`) running there now.
    pub running: Vec<String>,
    /// The job of each running task (a job once per task, as Disco shows it).
    pub jobs: Vec<String>,
    pub tasks_ok: u64,
    pub tasks_failed: u64,
    pub tasks_lost: u64,
    pub hostname: Option<String>,
    pub version: Option<String>,
    /// The server the agent is connected to.
    pub server: Option<String>,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Killed,
    Lost,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Killed => "killed",
            TaskState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        Some(match s {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "killed" => TaskState::Killed,
            "lost" => TaskState::Lost,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }
}

/// One unit of a fan-out job: a map task per input, or the reduce task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub job: String,
    /// `map:3`, `reduce:0`.
    pub id: String,
    pub phase: String,
    pub index: u32,
    pub input: Option<String>,
    pub state: TaskState,
    /// Where it runs or ran last.
    pub node: Option<String>,
    /// Times it was started (a failed or lost attempt is retried elsewhere).
    pub attempts: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Its stdout (`map-3.out`), stderr (`map-3.err`) and result files (`map-3/...`),
    /// under the job's results.
    pub results: Vec<ResultFile>,
}

impl Task {
    /// A task of `job` that has not run yet: `<phase>:<index>`, on `input` if any.
    pub fn queued(job: &str, phase: &str, index: u32, input: Option<String>) -> Task {
        Task {
            job: job.to_owned(),
            id: format!("{phase}:{index}"),
            phase: phase.to_owned(),
            index,
            input,
            state: TaskState::Queued,
            node: None,
            attempts: 0,
            exit_code: None,
            reason: None,
            started_at: None,
            finished_at: None,
            results: Vec::new(),
        }
    }
}

/// Task counts of one phase of a fan-out job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PhaseProgress {
    pub phase: String,
    pub total: u32,
    pub queued: u32,
    pub running: u32,
    pub done: u32,
    pub failed: u32,
}

/// `POST /v1/jobs`: a map script over inputs, one task each, with an optional reduce
/// over their outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FanoutRequest {
    /// Script run once per input, with the input in `$INPUT`.
    pub map: String,
    pub inputs: Vec<String>,
    /// Script run once after every map task succeeded, with their outputs in
    /// `$OPSBOX_INPUTS_DIR`.
    #[serde(default)]
    pub reduce: Option<String>,
    /// Parameters of both scripts (checked against the map script's).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Only nodes that have every one of these labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Only this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Failed or lost task attempts the job survives (default: the server's).
    #[serde(default)]
    pub max_failures: Option<u32>,
}

/// `POST /v1/scripts/{name}/run` placement: where a single run goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Placement {
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// One run on every matching node.
    #[serde(default)]
    pub all: bool,
}

impl Placement {
    /// True when the run may go straight to the local node (no placement asked).
    pub fn is_local(&self) -> bool {
        self.node.is_none() && self.labels.is_empty() && !self.all
    }
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}

/// `GET /v1/jobs/{name}/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

// ---------------------------------------------------------------------------------------
// Agent protocol
// ---------------------------------------------------------------------------------------

/// A file carried inside a message (result files up, reduce inputs down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    pub path: String,
    /// Base64.
    pub data: String,
}

/// Agent → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message after connecting.
    Hello {
        node_id: String,
        labels: Vec<String>,
        slots: u32,
        hostname: Option<String>,
        version: Option<String>,
        /// Tasks (`job/task`) still running from before a reconnect.
        running: Vec<String>,
        /// Names this agent process (not the node): a reconnect of the same process
        /// takes its node's place at once, another process with the same node id is
        /// refused while the first one is alive.
        #[serde(default)]
        instance: Option<String>,
        /// Tasks it takes beyond its slots, held until a slot frees (the agent's
        /// `--prefetch`). Agents from before this field take none.
        #[serde(default)]
        prefetch: u32,
    },
    Heartbeat,
    /// The agent is stopping: it has killed its tasks and sent their ends, and will not
    /// come back with them. The server settles what it still has running there at once
    /// instead of after the heartbeat timeout.
    Goodbye,
    /// A piece of a running task's output (base64).
    Output {
        job: String,
        task: String,
        stream: Stream,
        data: String,
    },
    /// The task's process ended (or could not start).
    Finished {
        job: String,
        task: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// Why it did not succeed, in words (timeout, killed, could not start).
        reason: Option<String>,
        /// Files the task wrote into `$OPSBOX_RESULTS`.
        results: Vec<FileData>,
        /// True when it ended because the server asked (a kill).
        killed: bool,
    },
}

/// Server → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to `Hello`: the agent must send a heartbeat at least this often.
    Welcome {
        node_id: String,
        heartbeat_secs: u64,
    },
    /// Run a task: the script travels with it, so agents need no scripts directory.
    Run {
        job: String,
        task: String,
        script: String,
        /// The script file's bytes (base64).
        program: String,
        env: BTreeMap<String, String>,
        timeout_secs: Option<u64>,
        /// Files to put into `$OPSBOX_INPUTS_DIR` before it starts (the reduce task's).
        inputs: Vec<FileData>,
        /// The node's slots as the server counts them: a task that arrives while this
        /// many run waits for one of them to end (it was sent ahead, see `prefetch`).
        /// Absent from older servers, which never send more tasks than slots.
        #[serde(default)]
        slots: Option<u32>,
    },
    /// Stop a running task's process group.
    Kill { job: String, task: String },
    /// The connection is refused (unknown node id for the token, say); then closed.
    Refused { reason: String },
}
