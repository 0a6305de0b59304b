//! Wire types of the opsbox native API (`/v1`).
//!
//! This crate owns the JSON shapes that the server renders and the client parses, so the
//! two can never drift apart. It holds no behaviour beyond small helpers on the types
//! (a state knows whether it is terminal, a role whether it may write).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod model;
pub mod nodes;
pub mod paths;
pub mod time;

pub use nodes::{
    AgentMessage, FanoutRequest, FileData, Node, NodeList, PhaseProgress, Placement, ServerMessage,
    Task, TaskList, TaskState, LOCAL_NODE,
};

/// The path prefix of the native API.
pub const API_PREFIX: &str = "/v1";

// ---------------------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------------------

/// HTTP method a script declares for the Jojo face (`http_method:` in its metadata block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
    Put,
    Delete,
}

impl HttpMethod {
    /// The lowercase word used in metadata blocks and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "get",
            HttpMethod::Post => "post",
            HttpMethod::Put => "put",
            HttpMethod::Delete => "delete",
        }
    }

    /// Parses a method word case-insensitively; `None` for anything but the four.
    pub fn parse(word: &str) -> Option<Self> {
        match word.trim().to_ascii_lowercase().as_str() {
            "get" => Some(HttpMethod::Get),
            "post" => Some(HttpMethod::Post),
            "put" => Some(HttpMethod::Put),
            "delete" => Some(HttpMethod::Delete),
            _ => None,
        }
    }
}

/// How a script's output is captured: stdout and stderr apart, or merged into stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    #[default]
    Split,
    Combined,
}

/// One declared script parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Param {
    pub name: String,
    /// `None` when the metadata declared no description.
    pub description: Option<String>,
    /// A run without this parameter is refused (opsbox extension: `required:` key).
    #[serde(default)]
    pub required: bool,
    /// Its value is masked in job records, logs and events (`filtered_params:` key).
    #[serde(default)]
    pub filtered: bool,
}

/// A script of the catalog with its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Script {
    pub name: String,
    /// Absolute path of the executable on the server.
    pub filename: String,
    pub description: Option<String>,
    pub http_method: HttpMethod,
    pub params: Vec<Param>,
    pub filtered_params: Vec<String>,
    pub tags: Vec<String>,
    pub output: OutputMode,
    /// At most one run of this script at a time; later runs queue.
    pub lock: bool,
    /// The run is killed (whole process group) after this many seconds.
    pub timeout_secs: Option<u64>,
}

/// A file of the scripts directory that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScriptProblem {
    pub file: String,
    pub message: String,
}

/// `GET /v1/scripts`: the catalog and the files that failed to load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScriptList {
    pub scripts: Vec<Script>,
    pub problems: Vec<ScriptProblem>,
}

/// `POST /v1/reload`: what the rescan found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReloadReport {
    pub scripts: usize,
    pub problems: Vec<ScriptProblem>,
    /// Revision of the `scripts.reloaded` event.
    pub revision: u64,
}

/// `POST /v1/scripts/{name}/run` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunRequest {
    /// Parameter values by name. They reach the script as environment variables.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Where to run it (`node`, `labels`, `all`); by default on the server's own node.
    #[serde(default, flatten)]
    pub placement: Placement,
}

/// Answer to a run: the job, and its output when the request waited for the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunResponse {
    pub job: Job,
    /// Present when the run was synchronous (the default).
    pub output: Option<JobOutput>,
    /// The other jobs of a run on every matching node (`all`), the first being `job`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Job>,
}

// ---------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------

/// Life cycle of a job. `succeeded`, `failed`, `killed` and `lost` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Killed,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Killed,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Killed => "killed",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }

    /// True once the job will never change state again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file a job wrote into its results directory (`$OPSBOX_RESULTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResultFile {
    /// Path relative to the results directory, `/`-separated.
    pub path: String,
    pub size: u64,
}

/// One run, as `GET /v1/jobs/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// `script@<hex megaseconds>:<hex seconds>:<hex microseconds>`, unique.
    pub name: String,
    pub script: String,
    pub state: JobState,
    /// Parameter values; filtered parameters show as `FILTERED`.
    pub params: BTreeMap<String, String>,
    /// Node that ran (or runs) it.
    pub node: Option<String>,
    /// Identity that submitted it; `None` when auth is off.
    pub submitted_by: Option<String>,
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    #[serde(default, with = "crate::time::option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::time::option")]
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    /// Signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// Why the job failed, was killed or lost, in words.
    pub reason: Option<String>,
    /// `jojo_return_value key=value` lines of stdout.
    pub return_values: BTreeMap<String, String>,
    pub results: Vec<ResultFile>,
    /// Inputs of a fan-out job (one map task each); empty for a single run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Reduce script of a fan-out job (`script` is its map script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<String>,
    /// Task counts per phase of a fan-out job; empty for a single run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<PhaseProgress>,
    /// Failed or lost task attempts a fan-out job survives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
}

/// What was asked for: everything needed to run the job again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobSpec {
    pub name: String,
    pub script: String,
    pub filename: String,
    pub params: BTreeMap<String, String>,
    pub output: OutputMode,
    pub lock: bool,
    pub timeout_secs: Option<u64>,
    pub submitted_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Which stream an output chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A piece of output as it was produced. `seq` orders chunks within a job, from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogChunk {
    pub seq: u64,
    pub stream: Stream,
    /// The bytes, decoded as UTF-8 (invalid sequences replaced by U+FFFD).
    pub data: String,
}

/// A job's whole output as line arrays (line breaks `\n`, `\r`, `\r\n` removed).
/// With `output: combined`, both streams are merged into `stdout` and `stderr` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobOutput {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// `GET /v1/jobs`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `GET /v1/jobs/{name}/results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResultList {
    pub job: String,
    pub files: Vec<ResultFile>,
}

/// `GET /v1/jobs/{name}/wait?timeout=S`: the job as it is when it ended or the wait ran out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WaitResponse {
    /// True when the job reached a terminal state.
    pub done: bool,
    pub job: Job,
}

/// Events of a followed log (`GET /v1/jobs/{name}/log?follow=true`), one per SSE message
/// or WebSocket text frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LogEvent {
    /// A chunk of output.
    Output(LogChunk),
    /// The job ended; no more output follows.
    End(Box<Job>),
}

// ---------------------------------------------------------------------------------------
// Events (the watch stream)
// ---------------------------------------------------------------------------------------

/// One state change from the revisioned event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Global, strictly increasing revision.
    pub rev: u64,
    #[serde(with = "crate::time")]
    pub at: DateTime<Utc>,
    /// What happened: `job.created`, `job.started`, `job.finished`, `job.cleaned`,
    /// `scripts.reloaded`, `user.added`, `token.created`, ...
    pub kind: String,
    /// What it happened to (a job name, a user name...).
    pub subject: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `GET /v1/events?since=REV` without following: a page of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The newest revision of the log when the page was read.
    pub current_revision: u64,
}

// ---------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------

/// What an identity may do. Admin ⊃ operator ⊃ reader.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read catalogs, jobs, logs, events.
    Reader,
    /// Also run, kill, clean, reload.
    Operator,
    /// Also manage users and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "reader" => Some(Role::Reader),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// True when this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewUser {
    pub name: String,
    pub password: String,
    #[serde(default = "default_user_role")]
    pub role: Role,
}

fn default_user_role() -> Role {
    Role::Operator
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub users: Vec<User>,
}

/// An API token as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    /// Public id; the secret is `obx_<id>_<random>`.
    pub id: String,
    pub role: Role,
    /// Node ids a node token may act as (empty for user tokens).
    pub nodes: Vec<String>,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    pub role: Role,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub secret: String,
    pub token: Token,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<Token>,
}

// ---------------------------------------------------------------------------------------
// Server and errors
// ---------------------------------------------------------------------------------------

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub version: String,
    pub revision: u64,
    pub nodes: Vec<String>,
    pub scripts: usize,
    /// Whether requests must carry credentials.
    pub auth_required: bool,
    /// The identity of the caller, when it gave one.
    pub you: Option<String>,
}

/// Body of every native error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code: `not_found`, `bad_request`, `unauthorized`,
    /// `forbidden`, `conflict`, `gone`, `payload_too_large`, `internal`...
    pub error: String,
    /// A sentence for people.
    pub message: String,
    /// With `gone`: the revision to re-list from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// RPC
// ---------------------------------------------------------------------------------------

/// The JSON type a function parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum RpcType {
    #[default]
    Any,
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl RpcType {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcType::Any => "any",
            RpcType::String => "string",
            RpcType::Integer => "integer",
            RpcType::Number => "number",
            RpcType::Boolean => "boolean",
            RpcType::Array => "array",
            RpcType::Object => "object",
        }
    }
}

/// One declared parameter of an RPC function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RpcParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: RpcType,
    /// A call without it is refused.
    pub required: bool,
    /// The value an omitted optional parameter takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Where an RPC function comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RpcSource {
    /// ping and the introspection functions.
    Builtin,
    /// Host introspection (cpu, memory, disks...).
    Host,
    /// A script of the catalog; a call is a job.
    Script,
    /// Registered by the Rust program that embeds the server.
    Registered,
}

/// What `describe` tells about one function (the CLI's `opsbox rpc help`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RpcMethod {
    pub name: String,
    pub doc: String,
    pub params: Vec<RpcParam>,
    /// The least role that may call it.
    pub role: Role,
    pub source: RpcSource,
}

// ---------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------

/// Where a message is in its life: `pending` → `processing` (pulled) → `processed`
/// (acked); `scheduled` waits for its time; `dead` has used up its tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Pending,
    Scheduled,
    Processing,
    Processed,
    Dead,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 5] = [
        MessageStatus::Pending,
        MessageStatus::Scheduled,
        MessageStatus::Processing,
        MessageStatus::Processed,
        MessageStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Scheduled => "scheduled",
            MessageStatus::Processing => "processing",
            MessageStatus::Processed => "processed",
            MessageStatus::Dead => "dead",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl std::fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a payload is: a JSON object or array, UTF-8 text, or raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    Json,
    Text,
    Binary,
}

impl PayloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadKind::Json => "json",
            PayloadKind::Text => "text",
            PayloadKind::Binary => "binary",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        [PayloadKind::Json, PayloadKind::Text, PayloadKind::Binary]
            .into_iter()
            .find(|k| k.as_str() == word)
    }
}

/// A message of a node's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// 24 lowercase hex characters.
    pub id: String,
    /// The node that sent it.
    pub source: String,
    /// The node whose queue it is in.
    pub destination: String,
    pub status: MessageStatus,
    pub kind: PayloadKind,
    /// Free text chosen by the sender (a MIME type, `.bin`...).
    pub payload_type: String,
    /// `json`: the value; `text`: a string; `binary`: standard base64 of the bytes.
    pub payload: serde_json::Value,
    /// Times it was pulled.
    pub tries: u32,
    /// Pulled this many times without an ack, it goes `dead` instead of again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tries: Option<u32>,
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option"
    )]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option"
    )]
    pub scheduled_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option"
    )]
    pub processing_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option"
    )]
    pub processed_at: Option<DateTime<Utc>>,
    /// While `processing` under a lease: when it is delivered again if not acked.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::time::option"
    )]
    pub lease_until: Option<DateTime<Utc>>,
}

/// One message to push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct NewMessage {
    /// `json` (default for anything but a string), `text` (default for a string) or
    /// `binary` (the payload is then a base64 string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PayloadKind>,
    pub payload: serde_json::Value,
    /// Default: `application/json`, `text/plain` or `application/octet-stream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_type: Option<String>,
    /// Hold the message until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Dead-letter it after this many un-acked pulls (pull with a lease to retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tries: Option<u32>,
}

/// `POST /v1/queues/{node}/messages`: messages for `node`, sent by `?from=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct PushRequest {
    pub messages: Vec<NewMessage>,
}

/// Messages, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct MessageList {
    pub messages: Vec<Message>,
}

/// `POST /v1/queues/{node}/pull`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct PullRequest {
    /// Most messages to claim (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Seconds to wait for a message when none is deliverable (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<f64>,
    /// Seconds after which an un-acked message is delivered again (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<f64>,
}

/// `POST /v1/queues/{node}/ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct AckRequest {
    pub ids: Vec<String>,
}

/// What an ack did: messages now `processed`, and ids that were not `processing` in
/// this queue (unknown, someone else's, not pulled, acked already).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct AckResponse {
    pub acked: Vec<Message>,
    pub missing: Vec<String>,
}

/// `PATCH /v1/messages/{id}`: a new payload for a message not yet pulled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PayloadKind>,
    pub payload: serde_json::Value,
}

/// How many messages were deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct DeleteReport {
    pub deleted: u64,
}

/// Counts of one node's queue, by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct QueueStats {
    pub node: String,
    pub pending: u64,
    pub scheduled: u64,
    pub processing: u64,
    pub processed: u64,
    pub dead: u64,
    /// Creation time of the oldest pending message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// `GET /v1/queues`: every queue that holds a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct QueueStatsList {
    pub queues: Vec<QueueStats>,
}

/// A backup: a consistent copy of the whole store (`/v1/backups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    /// `YYYYMMDD-HHMMSS.<model uuid>`, as Juju named them.
    pub id: String,
    pub notes: String,
    pub size: u64,
    /// SHA-1 of the file, base64.
    pub checksum: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub hostname: String,
    pub version: String,
    pub model_uuid: String,
}
