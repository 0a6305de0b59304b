//! The `Store` trait: everything opsbox keeps, behind one interface with one
//! implementation per database (SQLite now, PostgreSQL for scale-out).
//!
//! Rules every implementation keeps:
//! - a state change and its event are written in the same transaction, and the event
//!   gets the next global revision;
//! - a write is durable (fsynced) before its call returns;
//! - after each commit, [`Store::changes`] is bumped so that long-polls, log followers
//!   and watchers re-read what they wait for.
//!
//! The store holds no business rule: the core decides what to write and which event
//! describes it; the store only writes it atomically.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use opsbox_api::{
    Event, JobState, LogChunk, MessageStatus, PayloadKind, QueueStats, ResultFile, Role, Stream,
};
use tokio::sync::{broadcast, watch};

pub mod copy;
pub mod postgres;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store `spec` names: a `postgres://` (or `postgresql://`) URL, or `sqlite:PATH`
/// / a plain path for the embedded store. `owner` names this server in the records of
/// the jobs it runs (see [`JobRecord::server`]).
pub async fn open(spec: &str, owner: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        return Ok(std::sync::Arc::new(PgStore::open(spec, owner).await?));
    }
    let path = spec
        .strip_prefix("sqlite://")
        .or_else(|| spec.strip_prefix("sqlite:"));
    let path = std::path::Path::new(path.unwrap_or(spec));
    if spec.contains("://") && !spec.starts_with("sqlite://") {
        return Err(StoreError::Invalid(format!(
            "unknown store '{spec}': use postgres://USER@HOST/DB or sqlite:PATH"
        )));
    }
    Ok(std::sync::Arc::new(SqliteStore::open(path).await?))
}

/// The store tests run on for a test's temp dir `root`: `None` (SQLite in the data
/// dir), or, when `OPSBOX_TEST_STORE` is a PostgreSQL URL, a schema of that database
/// named after `root` (the same schema each time a test reopens its root, as a restart
/// would). The same test bodies run on both stores; `test.sh` runs them once per store.
#[doc(hidden)]
pub fn test_store(root: &std::path::Path) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let url = std::env::var("OPSBOX_TEST_STORE").ok()?;
    if url.is_empty() {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    root.hash(&mut hasher);
    let schema = format!("t_{:016x}", hasher.finish());
    let sep = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{sep}schema={schema}"))
}

/// A lock from [`Store::lock`], released when dropped.
#[derive(Default)]
pub struct StoreLock(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl StoreLock {
    pub fn new(guard: Box<dyn Send + Sync>) -> Self {
        StoreLock(Some(guard))
    }
}

/// A message for every server sharing a store (this one included), for what must reach
/// the server that holds something in memory: a kill for the server that runs the job.
/// Not stored: only servers up at the time hear it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub topic: String,
    pub message: String,
}

/// Errors of a store, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A record with that key exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// The record to change does not exist (any more).
    #[error("{0} not found")]
    NotFound(String),
    /// The database failed; the change was not made.
    #[error("store failure: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded store's writer connection failed; the change was not made.
    #[error("store failure: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database failed in a way no driver error describes (a commit shared with
    /// other writes, say); the change was not made.
    #[error("store failure: {0}")]
    Failed(String),
    #[error("store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (a bug or a hand-edited database).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store's writer is gone (the store is shutting down).
    #[error("the store is closed")]
    Closed,
    /// The store was asked for something it cannot do as asked (a bad URL, say).
    #[error("{0}")]
    Invalid(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One row of a store's queue-stats query: how many messages of `node`'s queue are in
/// `status`, and when the oldest of them was created.
pub(crate) struct StatusCount {
    pub node: String,
    pub status: String,
    pub n: u64,
    pub oldest: Option<DateTime<Utc>>,
}

impl StatusCount {
    /// The row of either store's stats query (`destination, status, n, oldest`, times
    /// in milliseconds).
    pub(crate) fn from_row<'r, R>(row: &'r R) -> StoreResult<Self>
    where
        R: sqlx::Row,
        &'static str: sqlx::ColumnIndex<R>,
        String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(StatusCount {
            node: row.try_get("destination")?,
            status: row.try_get("status")?,
            n: row.try_get::<i64, _>("n")?.max(0) as u64,
            oldest: millis(row.try_get("oldest")?),
        })
    }
}

/// A time stored as milliseconds since the epoch (the queue tables of both stores).
pub(crate) fn millis(value: Option<i64>) -> Option<DateTime<Utc>> {
    value.and_then(DateTime::from_timestamp_millis)
}

/// Per-queue stats from status counts ordered by queue (the same for every store).
pub(crate) fn fold_queue_stats(counts: Vec<StatusCount>) -> StoreResult<Vec<QueueStats>> {
    let mut stats: Vec<QueueStats> = Vec::new();
    for count in counts {
        if stats.last().is_none_or(|s| s.node != count.node) {
            stats.push(QueueStats {
                node: count.node.clone(),
                ..QueueStats::default()
            });
        }
        let Some(entry) = stats.last_mut() else {
            continue;
        };
        match MessageStatus::parse(&count.status) {
            Some(MessageStatus::Pending) => {
                entry.pending = count.n;
                entry.oldest_pending = count.oldest;
            }
            Some(MessageStatus::Scheduled) => entry.scheduled = count.n,
            Some(MessageStatus::Processing) => entry.processing = count.n,
            Some(MessageStatus::Processed) => entry.processed = count.n,
            Some(MessageStatus::Dead) => entry.dead = count.n,
            None => {
                return Err(StoreError::Corrupt(format!(
                    "message status {}",
                    count.status
                )))
            }
        }
    }
    Ok(stats)
}

/// An event to append: the store gives it its revision and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    pub subject: String,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: &str, subject: &str, data: serde_json::Value) -> Self {
        NewEvent {
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            data,
        }
    }
}

/// Whether [`Store::write_job`] makes a job's row or replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobWrite {
    Insert,
    Update,
}

/// A job as stored: the public [`opsbox_api::Job`] plus what is needed to run it again.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub name: String,
    pub script: String,
    pub state: JobState,
    pub params: BTreeMap<String, String>,
    pub node: Option<String>,
    pub submitted_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
    pub return_values: BTreeMap<String, String>,
    pub results: Vec<ResultFile>,
    /// The script metadata the job was started with ([`opsbox_api::JobSpec`] fields).
    pub spec: serde_json::Value,
    /// Process (group) id of the task while it runs on the local node.
    pub pid: Option<u32>,
    /// The server that runs the job's process, when several share the store (set by the
    /// store from its owner when the job is written without one).
    pub server: Option<String>,
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub script: Option<String>,
    pub limit: Option<u32>,
}

/// A user of the identity store.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub name: String,
    /// PHC string (argon2) or an imported htpasswd hash.
    pub password_hash: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// The htpasswd file a server keeps this user in step with; `None` for users made
    /// with opsbox or imported once.
    pub source: Option<String>,
}

/// An API token; only a hash of its secret is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub role: Role,
    pub nodes: Vec<String>,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Outcome of reading the event log from a revision.
#[derive(Debug, Clone, PartialEq)]
pub enum EventsSince {
    /// Events after the revision, oldest first (at most the limit asked for).
    Events(Vec<Event>),
    /// Events after the revision were compacted away: re-list from `current`.
    Gone { current: u64 },
}

/// What [`Store::events_since_matching`] answers, from what `events_since` did.
pub(crate) fn keep_matching(
    found: EventsSince,
    since: u64,
    wanted: &(dyn for<'e> Fn(&'e Event) -> bool + Sync),
) -> (EventsSince, u64) {
    match found {
        EventsSince::Events(mut events) => {
            let last = events.last().map_or(since, |e| e.rev);
            events.retain(|e| wanted(e));
            (EventsSince::Events(events), last)
        }
        gone @ EventsSince::Gone { .. } => (gone, since),
    }
}

/// Everything opsbox keeps. See the module docs for the rules.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Bumped after every commit; the value is the newest revision of the event log.
    /// With a shared store, also after the other servers' commits.
    fn changes(&self) -> watch::Receiver<u64>;

    /// The server this store writes job records for, when servers share the store.
    fn owner(&self) -> Option<&str> {
        None
    }

    /// Holds the lock `name` across every server sharing the store until the guard is
    /// dropped: for read-modify-write that in-process locks protect with one server.
    /// A store that only one server uses needs none (the default).
    async fn lock(&self, name: &str) -> StoreResult<StoreLock> {
        let _ = name;
        Ok(StoreLock::default())
    }

    /// Sends a [`Signal`] to every server of the store.
    async fn signal(&self, topic: &str, message: &str) -> StoreResult<()>;
    /// Signals from now on.
    fn signals(&self) -> broadcast::Receiver<Signal>;

    // -- event log ---------------------------------------------------------------------
    async fn current_revision(&self) -> StoreResult<u64>;
    /// Events with a revision greater than `since`.
    async fn events_since(&self, since: u64, limit: u32) -> StoreResult<EventsSince>;
    /// Of the (at most `limit`) events after `since`, those `wanted` keeps, and the
    /// revision of the last event looked at (`since` when there was none). For readers
    /// that look for a few events among many (a wait for one job's end): a store that
    /// holds the events in memory copies only the kept ones.
    async fn events_since_matching(
        &self,
        since: u64,
        limit: u32,
        wanted: &(dyn for<'e> Fn(&'e Event) -> bool + Sync),
    ) -> StoreResult<(EventsSince, u64)> {
        Ok(keep_matching(
            self.events_since(since, limit).await?,
            since,
            wanted,
        ))
    }
    /// Appends an event that goes with no other change (e.g. a catalog reload).
    async fn append_event(&self, event: NewEvent) -> StoreResult<Event>;
    /// Drops all but the newest `keep` events; returns how many were dropped.
    async fn compact_events(&self, keep: u64) -> StoreResult<u64>;

    // -- jobs --------------------------------------------------------------------------
    /// Inserts a new job; [`StoreError::Conflict`] if the name is taken.
    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event>;
    /// Replaces an existing job's row; [`StoreError::NotFound`] if it was cleaned.
    async fn update_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event>;
    /// Inserts or replaces a job's row, appends output chunks and events, in one
    /// transaction: a job's end is one commit, and so is the whole of a short run that
    /// is first written when it ends. [`StoreError::Conflict`] / [`StoreError::NotFound`]
    /// as for [`Store::insert_job`] / [`Store::update_job`].
    async fn write_job(
        &self,
        job: &JobRecord,
        row: JobWrite,
        output: Vec<LogChunkBytes>,
        events: Vec<NewEvent>,
    ) -> StoreResult<()>;
    async fn get_job(&self, name: &str) -> StoreResult<Option<JobRecord>>;
    /// Newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;
    /// Deletes a job and its output; [`StoreError::NotFound`] if there is none.
    async fn delete_job(&self, name: &str, event: NewEvent) -> StoreResult<Event>;
    /// Marks every queued or running job of this server lost (startup after a crash or
    /// restart), with the event `event` makes of each updated record. Fan-out jobs are
    /// left to the nodes service, and other servers' jobs to them.
    async fn mark_unfinished_lost(
        &self,
        reason: &str,
        at: DateTime<Utc>,
        event: for<'r> fn(&'r JobRecord) -> NewEvent,
    ) -> StoreResult<Vec<Event>>;

    // -- job output --------------------------------------------------------------------
    /// Appends output chunks; each carries its own sequence number.
    async fn append_output(&self, job: &str, chunks: Vec<LogChunkBytes>) -> StoreResult<()>;
    /// Chunks with `seq > after`, in order, at most `limit`.
    async fn output_since(&self, job: &str, after: u64, limit: u32) -> StoreResult<Vec<LogChunk>>;
    /// All output of a job, per stream, as raw bytes.
    async fn output_bytes(&self, job: &str) -> StoreResult<(Vec<u8>, Vec<u8>)>;

    // -- identities --------------------------------------------------------------------
    async fn insert_user(&self, user: &UserRecord, event: NewEvent) -> StoreResult<Event>;
    /// Inserts or replaces (password change, htpasswd import).
    async fn upsert_user(&self, user: &UserRecord, event: NewEvent) -> StoreResult<Event>;
    async fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>>;
    async fn list_users(&self) -> StoreResult<Vec<UserRecord>>;
    async fn delete_user(&self, name: &str, event: NewEvent) -> StoreResult<Event>;
    async fn insert_token(&self, token: &TokenRecord, event: NewEvent) -> StoreResult<Event>;
    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>>;
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    async fn delete_token(&self, id: &str, event: NewEvent) -> StoreResult<Event>;
    /// Users plus tokens: zero means no credentials are configured.
    async fn count_identities(&self) -> StoreResult<u64>;

    // -- queues (see [`crate::queues`]) -----------------------------------------------
    /// Inserts new messages, each with the event `event("pushed", message)` makes.
    async fn insert_messages(
        &self,
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    ) -> StoreResult<Vec<Event>>;
    /// The atomic claim: first settles the destination's expired leases (back to
    /// `pending`, or `dead` once `max_tries` is used up: events "requeued"/"dead"), then
    /// moves its oldest deliverable messages (pending, or scheduled and due) to
    /// `processing` (event "pulled") and returns them, oldest first.
    async fn claim_messages(
        &self,
        claim: Claim,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>>;
    /// True when a claim for `destination` at `now` could return something (a cheap
    /// read, so empty polls do not go through the writer).
    async fn has_deliverable(&self, destination: &str, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Moves the messages among `ids` that are `processing` in `destination`'s queue to
    /// `processed` (event "acked"); returns them.
    async fn ack_messages(
        &self,
        destination: &str,
        ids: Vec<String>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>>;
    /// Replaces the payload of the messages `selector` matches (event "updated").
    async fn update_message_payload(
        &self,
        selector: MessageSelector,
        kind: PayloadKind,
        payload: Vec<u8>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>>;
    /// Deletes what `selector` matches, with one event made from the ids deleted (at
    /// most the first 1000 of them) and their count; returns the count.
    async fn delete_messages(
        &self,
        selector: MessageSelector,
        event: DeleteEvent,
    ) -> StoreResult<u64>;
    async fn get_message(&self, id: &str) -> StoreResult<Option<MessageRecord>>;
    /// Oldest first.
    async fn list_messages(&self, selector: &MessageSelector) -> StoreResult<Vec<MessageRecord>>;
    /// Counts per destination (only `destination`'s when given).
    async fn queue_stats(&self, destination: Option<&str>) -> StoreResult<Vec<QueueStats>>;

    // -- nodes and tasks (see [`crate::nodes`]) --------------------------------------
    /// Inserts or replaces a node, with its event if any.
    async fn put_node(&self, node: &NodeRecord, event: Option<NewEvent>) -> StoreResult<()>;
    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>>;
    /// Writes tasks, the job's row and events in one transaction;
    /// [`StoreError::NotFound`] when the job to replace was cleaned meanwhile.
    async fn write_tasks(&self, write: TaskWrite) -> StoreResult<()>;
    /// The tasks of a job, in order.
    async fn job_tasks(&self, job: &str) -> StoreResult<Vec<TaskRecord>>;
    /// Tasks in any of these states, oldest first.
    async fn tasks_in(&self, states: &[opsbox_api::TaskState]) -> StoreResult<Vec<TaskRecord>>;
    /// The oldest `per_job` queued tasks of each job, oldest first (what the scheduler
    /// can place now, without reading every queued task of a big job).
    async fn queued_tasks(&self, per_job: u32) -> StoreResult<Vec<TaskRecord>>;
    async fn get_task(&self, job: &str, id: &str) -> StoreResult<Option<TaskRecord>>;
    /// Deletes a job's tasks (when the job is cleaned).
    async fn delete_tasks(&self, job: &str) -> StoreResult<()>;

    // -- backups -----------------------------------------------------------------------
    /// Writes a consistent copy of the whole store to `path` (a new file), while the
    /// store keeps serving.
    async fn snapshot(&self, path: &std::path::Path) -> StoreResult<()>;

    // -- model -------------------------------------------------------------------------
    /// Every model document and sequence, for the model service to start from.
    async fn load_model(&self) -> StoreResult<ModelData>;
    /// Writes model documents, removals, sequences and their events in one transaction.
    async fn write_model(&self, write: ModelWrite) -> StoreResult<Vec<Event>>;
}

/// A model document: an application, unit, machine or relation (`kind`) as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDoc {
    pub kind: String,
    pub id: String,
    pub data: serde_json::Value,
}

/// The whole stored model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelData {
    pub docs: Vec<ModelDoc>,
    /// Next number of each sequence (`unit:blog`, `machine`, `relation`).
    pub sequences: BTreeMap<String, u64>,
    /// The revision of the event log the data is as of.
    pub revision: u64,
}

/// One change of the model, written atomically with its events.
#[derive(Debug, Clone, Default)]
pub struct ModelWrite {
    pub put: Vec<ModelDoc>,
    /// `(kind, id)` of documents to delete.
    pub remove: Vec<(String, String)>,
    pub sequences: BTreeMap<String, u64>,
    pub events: Vec<NewEvent>,
}

// ---------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------

/// Makes the event of a message change; the store names the change ("pushed",
/// "pulled", "requeued", "dead", "acked", "updated").
pub type MessageEvent = for<'r> fn(&'static str, &'r MessageRecord) -> NewEvent;

/// Makes the one event of a delete from the ids deleted (the first 1000) and their count.
pub type DeleteEvent = for<'r> fn(&'r [String], u64) -> NewEvent;

/// A message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub id: String,
    pub source: String,
    pub destination: String,
    pub status: MessageStatus,
    pub kind: PayloadKind,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub tries: u32,
    pub max_tries: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub processing_at: Option<DateTime<Utc>>,
    pub processed_at: Option<DateTime<Utc>>,
    pub lease_until: Option<DateTime<Utc>>,
}

/// Which messages a list, update or delete applies to; every field narrows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageSelector {
    pub id: Option<String>,
    /// Sent by this node.
    pub source: Option<String>,
    /// In this node's queue.
    pub destination: Option<String>,
    /// Sent by or to this node.
    pub party: Option<String>,
    /// Any of these statuses; empty means any status.
    pub statuses: Vec<MessageStatus>,
    pub limit: Option<u32>,
}

/// A pull: claim up to `max` messages of `destination` at `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub destination: String,
    pub now: DateTime<Utc>,
    pub max: u32,
    /// Claimed messages are delivered again after this time unless acked.
    pub lease_until: Option<DateTime<Utc>>,
}

/// An output chunk on its way into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunkBytes {
    pub seq: u64,
    pub stream: Stream,
    pub data: Vec<u8>,
}

// ---------------------------------------------------------------------------------------
// Nodes and tasks
// ---------------------------------------------------------------------------------------

/// A node as stored: what outlives its connection.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub labels: Vec<String>,
    pub slots: u32,
    pub blacklisted: bool,
    pub hostname: Option<String>,
    pub version: Option<String>,
    pub server: Option<String>,
    pub last_seen: Option<DateTime<Utc>>,
    pub tasks_ok: u64,
    pub tasks_failed: u64,
    pub tasks_lost: u64,
    /// The agent process last connected as this node (its hello's `instance`).
    #[serde(default)]
    pub instance: Option<String>,
}

/// A task as stored: the public [`opsbox_api::Task`] plus the scheduler's bookkeeping.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskRecord {
    pub task: opsbox_api::Task,
    /// Submission order: tasks are taken oldest job first within a round.
    pub seq: i64,
    /// Nodes where an attempt failed or was lost: not tried again while others fit.
    pub excluded: Vec<String>,
}

/// One transaction of the scheduler: tasks inserted or replaced, the job's row
/// inserted or replaced, and their events.
#[derive(Debug, Clone, Default)]
pub struct TaskWrite {
    pub job: Option<JobRecord>,
    /// Insert the job (a new fan-out job) rather than replace it.
    pub insert_job: bool,
    pub tasks: Vec<TaskRecord>,
    pub events: Vec<NewEvent>,
    /// Output chunks of the job, stored before its row and events.
    pub output: Vec<LogChunkBytes>,
}
