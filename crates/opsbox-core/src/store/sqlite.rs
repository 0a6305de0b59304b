//! The embedded store: one SQLite file in WAL mode.
//!
//! Writes go through one writer task that owns the only write connection and commits
//! whatever writes are waiting as one transaction (group commit): under load, many
//! requests share one fsync instead of paying one each, and SQLite never sees two writers
//! fighting over its lock. Each write runs inside its own savepoint, so one failing write
//! (a name conflict, say) does not undo the others of its group. Reads use a separate
//! pool and never wait for the writer.
//!
//! The writer also keeps the newest committed events in memory (the tail): a watcher
//! woken by a commit reads what it missed from there instead of from the database, so a
//! thousand watchers cost one insert and a thousand clones, not a thousand queries.
//! Every event insert goes through `insert_event` (or `record_event`) so the tail
//! sees it; events another process writes are found by the gap they leave.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use opsbox_api::{Event, JobState, LogChunk, Role, Stream};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Claim, DeleteEvent, MessageEvent, MessageRecord, MessageSelector};
use super::{
    EventsSince, JobFilter, JobRecord, LogChunkBytes, NewEvent, NodeRecord, Store, StoreError,
    StoreResult, TaskRecord, TaskWrite, TokenRecord, UserRecord,
};
use opsbox_api::{PayloadKind, QueueStats};

mod model;
mod nodes;
mod queues;

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 512;

/// Committed events kept in memory for watchers (see the module docs).
const TAIL_EVENTS: usize = 2048;

type BoxFut<'c, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'c>>;

/// The SQLite [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Read-only connections; WAL lets them read while the writer commits.
    read: SqlitePool,
    /// Queue of the writer task.
    writes: mpsc::Sender<Box<dyn Op>>,
    /// Bumped by the writer after each commit with the newest revision.
    changes: watch::Receiver<u64>,
    /// The newest committed events, filled by the writer before it bumps `changes`.
    tail: Arc<Mutex<Tail>>,
    /// One server per file: signals stay in this process.
    signals: tokio::sync::broadcast::Sender<super::Signal>,
}

/// Every committed event with a revision above `from`, oldest first.
#[derive(Debug)]
struct Tail {
    from: u64,
    events: VecDeque<Event>,
}

impl Tail {
    fn push(&mut self, events: Vec<Event>) {
        // A gap in the revisions means another process (`opsbox users add --data` on a
        // live server, say) wrote events meanwhile: they are only in the database, so
        // the tail restarts after them and older reads go to the database.
        if let Some(first) = events.first() {
            let last = self.events.back().map_or(self.from, |e| e.rev);
            if first.rev != last + 1 {
                self.events.clear();
                self.from = first.rev - 1;
            }
        }
        self.events.extend(events);
        while self.events.len() > TAIL_EVENTS {
            if let Some(old) = self.events.pop_front() {
                self.from = old.rev;
            }
        }
    }

    /// Events after `since`, when the tail holds all of them.
    fn since(&self, since: u64, limit: u32) -> Option<Vec<Event>> {
        if since < self.from {
            return None;
        }
        let start = self.events.partition_point(|e| e.rev <= since);
        Some(
            self.events
                .range(start..)
                .take(limit as usize)
                .cloned()
                .collect(),
        )
    }

    /// Forgets what compaction dropped from the database, so a reader that far behind
    /// is told the log is gone, as it would be without the tail.
    fn compacted(&mut self, through: u64) {
        while self.events.front().is_some_and(|e| e.rev <= through) {
            self.events.pop_front();
        }
        self.from = self.from.max(through);
    }
}

fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    // The tail holds plain data that every method leaves consistent, so a panic
    // elsewhere while it was held leaves nothing to repair.
    tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a write acknowledged to a client survives power loss. Group commit
            // keeps this affordable.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            // A local file cannot go stale like a network connection; the default
            // liveness check would cost a round trip to the driver's thread per read.
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        let revision = read_revision(&mut writer).await?;
        let (changes_tx, changes) = watch::channel(revision);
        let (writes, queue) = mpsc::channel(4096);
        let tail = Arc::new(Mutex::new(Tail {
            from: revision,
            events: VecDeque::new(),
        }));
        tokio::spawn(writer_loop(writer, queue, changes_tx, tail.clone()));
        Ok(SqliteStore {
            read,
            writes,
            changes,
            tail,
            signals: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Runs `work` in the writer's next transaction and returns its result once that
    /// transaction is committed.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFut<'c, T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = TypedOp {
            work: Some(work),
            result: None,
            reply: Some(reply),
        };
        self.writes
            .send(Box::new(op))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Like [`SqliteStore::write`], for a queue write the writer runs together with the
    /// others of its kind in the group (see [`QueueOp`]).
    async fn write_queue(&self, work: QueueWork) -> StoreResult<QueueAnswer> {
        let (reply, answer) = oneshot::channel();
        let op = QueueOp {
            batch: match work {
                QueueWork::Push(messages, event) => QueueBatch::Pushes(vec![(messages, event)]),
                QueueWork::Claim(claim, event) => QueueBatch::Claims(vec![(claim, event)]),
                QueueWork::Ack(ack) => QueueBatch::Acks(vec![ack]),
            },
            results: vec![None],
            replies: vec![reply],
        };
        self.writes
            .send(Box::new(op))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

// ---------------------------------------------------------------------------------------
// The writer: group commit with one savepoint per write.
// ---------------------------------------------------------------------------------------

trait Op: Send {
    /// Applies the write; false when it failed (its savepoint is then rolled back).
    fn apply<'c>(
        &'c mut self,
        conn: &'c mut SqliteConnection,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'c>>;
    /// Delivers the result once the transaction is committed (or failed to commit).
    fn finish(self: Box<Self>, committed: Result<(), String>);
    /// A queue write that can join the others of its kind, or the op itself.
    fn into_queue(self: Box<Self>) -> Result<Box<QueueOp>, Box<dyn Op>>;
}

/// What a write answers once its transaction committed, or failed to.
fn deliver<T>(committed: Result<(), String>, result: Option<StoreResult<T>>) -> StoreResult<T> {
    match (committed, result) {
        (Ok(()), Some(result)) => result,
        // It panicked before it had a result (logged by the writer).
        (Ok(()), None) => Err(StoreError::Corrupt(
            "the write stopped half-way (a bug in the store) and was rolled back".into(),
        )),
        (Err(message), Some(Err(own))) => Err(StoreError::Corrupt(format!(
            "{own}; and the commit failed: {message}"
        ))),
        (Err(message), _) => Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "commit failed: {message}"
        )))),
    }
}

/// A queue write the writer may run together with the others of its kind.
enum QueueWork {
    Push(Vec<MessageRecord>, MessageEvent),
    Claim(Claim, MessageEvent),
    Ack(queues::Ack),
}

/// What a queue write answers: a push its events, a claim or an ack its messages.
enum QueueAnswer {
    Events(Vec<Event>),
    Messages(Vec<MessageRecord>),
}

enum QueueBatch {
    Pushes(Vec<(Vec<MessageRecord>, MessageEvent)>),
    Claims(Vec<(Claim, MessageEvent)>),
    Acks(Vec<queues::Ack>),
}

/// All pushes, all claims or all acks of a group as one write: their statements go to
/// the driver's thread together (a trip or two for all of them instead of several
/// each, plus a savepoint each). Claims and acks fail only when the database does, and
/// then together; a push that fails (an id taken) fails alone (see `queues::push`).
struct QueueOp {
    batch: QueueBatch,
    results: Vec<Option<StoreResult<QueueAnswer>>>,
    replies: Vec<oneshot::Sender<StoreResult<QueueAnswer>>>,
}

impl QueueOp {
    /// Takes `other`'s writes if they are of this kind; gives it back if not.
    fn absorb(&mut self, mut other: Box<QueueOp>) -> Option<Box<QueueOp>> {
        match (&mut self.batch, &mut other.batch) {
            (QueueBatch::Pushes(mine), QueueBatch::Pushes(theirs)) => mine.append(theirs),
            (QueueBatch::Claims(mine), QueueBatch::Claims(theirs)) => mine.append(theirs),
            (QueueBatch::Acks(mine), QueueBatch::Acks(theirs)) => mine.append(theirs),
            _ => return Some(other),
        }
        self.results.append(&mut other.results);
        self.replies.append(&mut other.replies);
        None
    }
}

impl Op for QueueOp {
    fn apply<'c>(
        &'c mut self,
        conn: &'c mut SqliteConnection,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'c>> {
        Box::pin(async move {
            let answers: StoreResult<Vec<StoreResult<QueueAnswer>>> = match &self.batch {
                QueueBatch::Pushes(pushes) => queues::push(conn, pushes).await.map(|all| {
                    all.into_iter()
                        .map(|r| r.map(QueueAnswer::Events))
                        .collect()
                }),
                QueueBatch::Claims(claims) => queues::claim(conn, claims).await.map(|all| {
                    all.into_iter()
                        .map(|m| Ok(QueueAnswer::Messages(m)))
                        .collect()
                }),
                QueueBatch::Acks(acks) => queues::ack(conn, acks).await.map(|all| {
                    all.into_iter()
                        .map(|m| Ok(QueueAnswer::Messages(m)))
                        .collect()
                }),
            };
            match answers {
                Ok(answers) => {
                    for (slot, answer) in self.results.iter_mut().zip(answers) {
                        *slot = Some(answer);
                    }
                    true
                }
                Err(error) => {
                    let reason = error.to_string();
                    let mut first = Some(error);
                    for slot in &mut self.results {
                        *slot = Some(Err(first.take().unwrap_or_else(|| {
                            StoreError::Database(sqlx::Error::Protocol(format!(
                                "the write shared with others failed: {reason}"
                            )))
                        })));
                    }
                    false
                }
            }
        })
    }

    fn finish(mut self: Box<Self>, committed: Result<(), String>) {
        let results = std::mem::take(&mut self.results);
        for (result, reply) in results.into_iter().zip(self.replies.drain(..)) {
            let _ = reply.send(deliver(committed.clone(), result));
        }
    }

    fn into_queue(self: Box<Self>) -> Result<Box<QueueOp>, Box<dyn Op>> {
        Ok(self)
    }
}

/// Folds the group's pushes into one write, its claims into another and its acks into a
/// third.
fn coalesce(batch: &mut Vec<Box<dyn Op>>) {
    let mut queue_ops: Vec<Box<QueueOp>> = Vec::new();
    let mut others: Vec<Box<dyn Op>> = Vec::with_capacity(batch.len());
    for op in batch.drain(..) {
        match op.into_queue() {
            Ok(op) => {
                let mut left = Some(op);
                for group in &mut queue_ops {
                    if let Some(op) = left.take() {
                        left = group.absorb(op);
                    }
                }
                // One that no group took starts its own.
                queue_ops.extend(left);
            }
            Err(op) => others.push(op),
        }
    }
    batch.extend(others);
    batch.extend(queue_ops.into_iter().map(|op| op as Box<dyn Op>));
}

struct TypedOp<T, F> {
    work: Option<F>,
    result: Option<StoreResult<T>>,
    reply: Option<oneshot::Sender<StoreResult<T>>>,
}

impl<T, F> Op for TypedOp<T, F>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFut<'c, T> + Send + 'static,
{
    fn apply<'c>(
        &'c mut self,
        conn: &'c mut SqliteConnection,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'c>> {
        Box::pin(async move {
            let Some(work) = self.work.take() else {
                return true;
            };
            let result = work(conn).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn finish(mut self: Box<Self>, committed: Result<(), String>) {
        let result = deliver(committed, self.result.take());
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }

    fn into_queue(self: Box<Self>) -> Result<Box<QueueOp>, Box<dyn Op>> {
        Err(self)
    }
}

/// What the event inserts of the current group produced: the newest revision (the
/// writer announces it after the commit without asking the database again) and the
/// events themselves (published to the tail after the commit).
#[derive(Default)]
struct GroupEvents {
    newest: u64,
    events: Vec<Event>,
}

tokio::task_local! {
    static GROUP: RefCell<GroupEvents>;
}

/// Where the group stands before a write: pass it to [`undo_events`] if the write fails.
fn events_mark() -> (u64, usize) {
    GROUP
        .try_with(|g| {
            let g = g.borrow();
            (g.newest, g.events.len())
        })
        .unwrap_or((0, 0))
}

/// Forgets the events of a write that was rolled back.
fn undo_events((newest, len): (u64, usize)) {
    let _ = GROUP.try_with(|g| {
        let mut g = g.borrow_mut();
        g.newest = newest;
        g.events.truncate(len);
    });
}

/// The event inserted at `rev`, noted in the current group.
fn record_event(rev: i64, at: DateTime<Utc>, event: NewEvent) -> Event {
    let event = Event {
        rev: rev as u64,
        at,
        kind: event.kind,
        subject: event.subject,
        data: event.data,
    };
    let _ = GROUP.try_with(|g| {
        let mut g = g.borrow_mut();
        g.newest = g.newest.max(event.rev);
        g.events.push(event.clone());
    });
    event
}

async fn writer_loop(
    mut conn: SqliteConnection,
    mut queue: mpsc::Receiver<Box<dyn Op>>,
    changes: watch::Sender<u64>,
    tail: Arc<Mutex<Tail>>,
) {
    let mut revision = *changes.borrow();
    let start = GroupEvents {
        newest: revision,
        events: Vec::new(),
    };
    GROUP
        .scope(RefCell::new(start), async move {
            let mut batch: Vec<Box<dyn Op>> = Vec::with_capacity(MAX_GROUP);
            while let Some(first) = queue.recv().await {
                batch.push(first);
                while batch.len() < MAX_GROUP {
                    match queue.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                coalesce(&mut batch);
                let committed = commit_group(&mut conn, &mut batch).await;
                let group = GROUP.with(|g| std::mem::take(&mut *g.borrow_mut()));
                if committed.is_ok() {
                    revision = revision.max(group.newest);
                    if !group.events.is_empty() {
                        lock(&tail).push(group.events);
                    }
                    // Sent even when no event was added (output appends): followers of
                    // logs wake on every commit.
                    changes.send_replace(revision);
                } else {
                    tracing::error!(error = ?committed, "store commit failed");
                }
                GROUP.with(|g| g.borrow_mut().newest = revision);
                for op in batch.drain(..) {
                    op.finish(committed.clone());
                }
            }
        })
        .await;
}

/// Applies one write; a write that panics fails alone (its caller hears of it), and
/// the writer, which every other write needs, goes on.
async fn apply(op: &mut dyn Op, conn: &mut SqliteConnection) -> bool {
    match AssertUnwindSafe(op.apply(conn)).catch_unwind().await {
        Ok(ok) => ok,
        Err(_) => {
            tracing::error!("a store write panicked; rolled back");
            false
        }
    }
}

/// One transaction for the whole group. Each write runs in its own savepoint, so a
/// failing one is undone alone; a group of one needs no savepoint (its failure rolls
/// the transaction back), which saves two statements when the server is not busy.
async fn commit_group(
    conn: &mut SqliteConnection,
    batch: &mut [Box<dyn Op>],
) -> Result<(), String> {
    let text = |e: sqlx::Error| e.to_string();
    if let [op] = batch {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(text)?;
        let before = events_mark();
        if !apply(op.as_mut(), conn).await {
            undo_events(before);
            // The write failed and delivers its own error; nothing else to keep.
            sqlx::query("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map_err(text)?;
            return Ok(());
        }
    } else {
        // Savepoint bookkeeping rides along with the statement before or after it, so a
        // write costs one extra trip to the driver's thread, not two.
        sqlx::query("BEGIN IMMEDIATE; SAVEPOINT op")
            .execute(&mut *conn)
            .await
            .map_err(text)?;
        let last = batch.len() - 1;
        for (i, op) in batch.iter_mut().enumerate() {
            let before = events_mark();
            let ok = apply(op.as_mut(), conn).await;
            if !ok {
                undo_events(before);
            }
            let next = match (ok, i == last) {
                (true, false) => "RELEASE op; SAVEPOINT op",
                (true, true) => "RELEASE op",
                (false, false) => "ROLLBACK TO op; RELEASE op; SAVEPOINT op",
                (false, true) => "ROLLBACK TO op; RELEASE op",
            };
            if let Err(e) = sqlx::query(next).execute(&mut *conn).await {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(e.to_string());
            }
        }
    }
    if let Err(e) = sqlx::query("COMMIT").execute(&mut *conn).await {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e.to_string());
    }
    Ok(())
}

async fn read_revision(conn: &mut SqliteConnection) -> StoreResult<u64> {
    let rev: i64 = sqlx::query_scalar(
        "SELECT MAX(COALESCE((SELECT MAX(rev) FROM events), 0),
                    (SELECT value FROM meta WHERE key = 'compacted_through'))",
    )
    .fetch_one(conn)
    .await?;
    Ok(rev as u64)
}

// ---------------------------------------------------------------------------------------
// Statements used inside write transactions
// ---------------------------------------------------------------------------------------

async fn insert_event(conn: &mut SqliteConnection, event: &NewEvent) -> StoreResult<Event> {
    let at = Utc::now();
    let rev: i64 = sqlx::query_scalar(
        "INSERT INTO events (at, kind, subject, data) VALUES (?, ?, ?, ?) RETURNING rev",
    )
    .bind(at)
    .bind(&event.kind)
    .bind(&event.subject)
    .bind(event.data.to_string())
    .fetch_one(conn)
    .await?;
    Ok(record_event(rev, at, event.clone()))
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain maps and vectors of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Most output rows written in the same statement batch as their job's row.
const INLINE_OUTPUT_ROWS: usize = 500;

/// Writes a job's row, output chunks and events as ONE multi-statement query: sqlx's
/// SQLite driver hands every query to a worker thread and back, and on a small machine
/// that hand-off costs more than the statements, so the hot path of every run makes one
/// trip instead of one per statement. Anonymous `?` parameters are bound in order across
/// the statements.
async fn write_job_batch(
    conn: &mut SqliteConnection,
    job: &JobRecord,
    insert: bool,
    mut output: Vec<LogChunkBytes>,
    events: Vec<NewEvent>,
) -> StoreResult<Vec<Event>> {
    if output.len() > INLINE_OUTPUT_ROWS {
        insert_output(conn, &job.name, &output).await?;
        output.clear();
    }
    let mut sql = String::with_capacity(512);
    if insert {
        sql.push_str(
            "INSERT INTO jobs (name, script, state, params, node, submitted_by, created_at, \
             started_at, finished_at, exit_code, signal, reason, return_values, results, spec, \
             pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);",
        );
    } else {
        // The RETURNING row tells a matched update from a job that was cleaned meanwhile.
        sql.push_str(
            "UPDATE jobs SET (script, state, params, node, submitted_by, created_at, \
             started_at, finished_at, exit_code, signal, reason, return_values, results, spec, \
             pid) = (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE name = ? RETURNING -1;",
        );
    }
    if !output.is_empty() {
        sql.push_str("INSERT INTO job_output (job, seq, stream, data) VALUES ");
        for i in 0..output.len() {
            sql.push_str(if i == 0 {
                "(?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?)"
            });
        }
        sql.push(';');
    }
    for _ in &events {
        sql.push_str(
            "INSERT INTO events (at, kind, subject, data) VALUES (?, ?, ?, ?) RETURNING rev;",
        );
    }
    let mut query = sqlx::query(&sql);
    if insert {
        query = query.bind(job.name.clone());
    }
    query = query
        .bind(job.script.clone())
        .bind(job.state.as_str())
        .bind(json(&job.params))
        .bind(job.node.clone())
        .bind(job.submitted_by.clone())
        .bind(job.created_at)
        .bind(job.started_at)
        .bind(job.finished_at)
        .bind(job.exit_code)
        .bind(job.signal)
        .bind(job.reason.clone())
        .bind(json(&job.return_values))
        .bind(json(&job.results))
        .bind(job.spec.to_string())
        .bind(job.pid.map(i64::from));
    if !insert {
        query = query.bind(job.name.clone());
    }
    for chunk in &output {
        query = query
            .bind(job.name.clone())
            .bind(chunk.seq as i64)
            .bind(stream_code(chunk.stream))
            .bind(chunk.data.clone());
    }
    let at = Utc::now();
    for event in &events {
        query = query
            .bind(at)
            .bind(event.kind.clone())
            .bind(event.subject.clone())
            .bind(event.data.to_string());
    }
    let rows = match query.fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(StoreError::Conflict(format!("job {}", job.name)));
        }
        Err(e) => return Err(e.into()),
    };
    let revs: Vec<i64> = rows
        .iter()
        .map(|row| row.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?;
    let revs = if insert {
        &revs[..]
    } else {
        match revs.split_first() {
            Some((-1, rest)) => rest,
            _ => return Err(StoreError::NotFound(format!("job {}", job.name))),
        }
    };
    if revs.len() != events.len() {
        return Err(StoreError::Corrupt(format!(
            "writing job {} gave {} revisions for {} events",
            job.name,
            revs.len(),
            events.len()
        )));
    }
    let mut written = Vec::with_capacity(events.len());
    for (event, rev) in events.into_iter().zip(revs) {
        written.push(record_event(*rev, at, event));
    }
    Ok(written)
}

/// Output chunks go in as one multi-row INSERT: one statement however many chunks.
async fn insert_output(
    conn: &mut SqliteConnection,
    job: &str,
    chunks: &[LogChunkBytes],
) -> StoreResult<()> {
    // SQLite allows 32766 bound parameters; 4 per row.
    for group in chunks.chunks(1000) {
        let mut builder: sqlx::QueryBuilder<sqlx::Sqlite> =
            sqlx::QueryBuilder::new("INSERT INTO job_output (job, seq, stream, data) ");
        builder.push_values(group, |mut row, chunk| {
            row.push_bind(job)
                .push_bind(chunk.seq as i64)
                .push_bind(stream_code(chunk.stream))
                .push_bind(chunk.data.as_slice());
        });
        builder.build().execute(&mut *conn).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Row decoding
// ---------------------------------------------------------------------------------------

fn decode<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn job_from_row(row: &SqliteRow) -> StoreResult<JobRecord> {
    let state: String = row.try_get("state")?;
    let name: String = row.try_get("name")?;
    Ok(JobRecord {
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job {name}: state {state}")))?,
        script: row.try_get("script")?,
        params: decode(&row.try_get::<String, _>("params")?, "params")?,
        node: row.try_get("node")?,
        submitted_by: row.try_get("submitted_by")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        exit_code: row.try_get("exit_code")?,
        signal: row.try_get("signal")?,
        reason: row.try_get("reason")?,
        return_values: decode(&row.try_get::<String, _>("return_values")?, "return_values")?,
        results: decode(&row.try_get::<String, _>("results")?, "results")?,
        spec: decode(&row.try_get::<String, _>("spec")?, "spec")?,
        pid: row
            .try_get::<Option<i64>, _>("pid")?
            .and_then(|p| u32::try_from(p).ok()),
        server: None,
        name,
    })
}

fn event_from_row(row: &SqliteRow) -> StoreResult<Event> {
    Ok(Event {
        rev: row.try_get::<i64, _>("rev")? as u64,
        at: row.try_get("at")?,
        kind: row.try_get("kind")?,
        subject: row.try_get("subject")?,
        data: decode(&row.try_get::<String, _>("data")?, "event data")?,
    })
}

fn role(text: &str) -> StoreResult<Role> {
    Role::parse(text).ok_or_else(|| StoreError::Corrupt(format!("role {text}")))
}

fn user_from_row(row: &SqliteRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        role: role(&row.try_get::<String, _>("role")?)?,
        created_at: row.try_get("created_at")?,
    })
}

fn token_from_row(row: &SqliteRow) -> StoreResult<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        role: role(&row.try_get::<String, _>("role")?)?,
        nodes: decode(&row.try_get::<String, _>("nodes")?, "nodes")?,
        description: row.try_get("description")?,
        created_at: row.try_get("created_at")?,
    })
}

fn stream_code(stream: Stream) -> i64 {
    match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

// ---------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    async fn signal(&self, topic: &str, message: &str) -> StoreResult<()> {
        let _ = self.signals.send(super::Signal {
            topic: topic.to_owned(),
            message: message.to_owned(),
        });
        Ok(())
    }

    fn signals(&self) -> tokio::sync::broadcast::Receiver<super::Signal> {
        self.signals.subscribe()
    }

    async fn current_revision(&self) -> StoreResult<u64> {
        let mut conn = self.read.acquire().await?;
        read_revision(&mut conn).await
    }

    async fn events_since(&self, since: u64, limit: u32) -> StoreResult<EventsSince> {
        if let Some(events) = lock(&self.tail).since(since, limit) {
            return Ok(EventsSince::Events(events));
        }
        let mut conn = self.read.acquire().await?;
        // One read transaction, so the compaction mark and the rows agree.
        let mut tx = conn.begin().await?;
        let compacted: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'compacted_through'")
                .fetch_one(&mut *tx)
                .await?;
        // SQLite integers are i64: a `since` beyond that range is ahead of every
        // revision (no events yet), never a negative one (which read as "gone").
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        if since < compacted {
            let current = read_revision(&mut tx).await?;
            return Ok(EventsSince::Gone { current });
        }
        let rows = sqlx::query("SELECT * FROM events WHERE rev > ? ORDER BY rev LIMIT ?")
            .bind(since)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<StoreResult<_>>()?;
        Ok(EventsSince::Events(events))
    }

    async fn append_event(&self, event: NewEvent) -> StoreResult<Event> {
        self.write(move |conn| Box::pin(async move { insert_event(conn, &event).await }))
            .await
    }

    async fn compact_events(&self, keep: u64) -> StoreResult<u64> {
        let (dropped, cut) = self
            .write(move |conn| {
                Box::pin(async move {
                    let newest = read_revision(conn).await? as i64;
                    // Saturating: a huge `keep` ("keep everything") must not wrap to a
                    // negative number, which cut past the newest revision and dropped the
                    // whole log.
                    let cut = newest.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
                    if cut <= 0 {
                        return Ok((0, 0));
                    }
                    let dropped = sqlx::query("DELETE FROM events WHERE rev <= ?")
                        .bind(cut)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    sqlx::query(
                        "UPDATE meta SET value = MAX(value, ?) WHERE key = 'compacted_through'",
                    )
                    .bind(cut)
                    .execute(&mut *conn)
                    .await?;
                    Ok((dropped, cut as u64))
                })
            })
            .await?;
        lock(&self.tail).compacted(cut);
        Ok(dropped)
    }

    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let job = job.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let mut events = write_job_batch(conn, &job, true, Vec::new(), vec![event]).await?;
                events.pop().ok_or(StoreError::Closed)
            })
        })
        .await
    }

    async fn update_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let job = job.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let mut events =
                    write_job_batch(conn, &job, false, Vec::new(), vec![event]).await?;
                events.pop().ok_or(StoreError::Closed)
            })
        })
        .await
    }

    async fn complete_job(
        &self,
        job: &JobRecord,
        output: Vec<LogChunkBytes>,
        events: Vec<NewEvent>,
    ) -> StoreResult<Vec<Event>> {
        let job = job.clone();
        self.write(move |conn| {
            Box::pin(async move { write_job_batch(conn, &job, false, output, events).await })
        })
        .await
    }

    async fn get_job(&self, name: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR script = ?2)
             ORDER BY id DESC LIMIT ?3",
        )
        .bind(filter.state.map(|s| s.as_str()))
        .bind(&filter.script)
        .bind(filter.limit.map(i64::from).unwrap_or(-1))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn delete_job(&self, name: &str, event: NewEvent) -> StoreResult<Event> {
        let name = name.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let gone = sqlx::query("DELETE FROM jobs WHERE name = ?")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if gone == 0 {
                    return Err(StoreError::NotFound(format!("job {name}")));
                }
                sqlx::query("DELETE FROM tasks WHERE job = ?")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("DELETE FROM job_output WHERE job = ?")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?;
                insert_event(conn, &event).await
            })
        })
        .await
    }

    async fn mark_unfinished_lost(
        &self,
        reason: &str,
        at: DateTime<Utc>,
        event: for<'r> fn(&'r JobRecord) -> NewEvent,
    ) -> StoreResult<Vec<Event>> {
        let reason = reason.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    // Fan-out jobs are not lost with the server: their tasks are in the
                    // store and the nodes service carries on with them.
                    "UPDATE jobs SET state = 'lost', reason = ?, finished_at = ?
                     WHERE state IN ('queued', 'running')
                       AND json_extract(spec, '$.fanout') IS NULL RETURNING *",
                )
                .bind(&reason)
                .bind(at)
                .fetch_all(&mut *conn)
                .await?;
                let mut events = Vec::with_capacity(rows.len());
                for row in &rows {
                    let job = job_from_row(row)?;
                    events.push(insert_event(conn, &event(&job)).await?);
                }
                Ok(events)
            })
        })
        .await
    }

    async fn append_output(&self, job: &str, chunks: Vec<LogChunkBytes>) -> StoreResult<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let job = job.to_owned();
        self.write(move |conn| Box::pin(async move { insert_output(conn, &job, &chunks).await }))
            .await
    }

    async fn output_since(&self, job: &str, after: u64, limit: u32) -> StoreResult<Vec<LogChunk>> {
        let rows = sqlx::query(
            "SELECT seq, stream, data FROM job_output WHERE job = ? AND seq > ?
             ORDER BY seq LIMIT ?",
        )
        .bind(job)
        .bind(after as i64)
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|row| {
                let stream: i64 = row.try_get("stream")?;
                let data: Vec<u8> = row.try_get("data")?;
                Ok(LogChunk {
                    seq: row.try_get::<i64, _>("seq")? as u64,
                    stream: if stream == 2 {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    },
                    data: String::from_utf8_lossy(&data).into_owned(),
                })
            })
            .collect()
    }

    async fn output_bytes(&self, job: &str) -> StoreResult<(Vec<u8>, Vec<u8>)> {
        let rows = sqlx::query("SELECT stream, data FROM job_output WHERE job = ? ORDER BY seq")
            .bind(job)
            .fetch_all(&self.read)
            .await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for row in &rows {
            let stream: i64 = row.try_get("stream")?;
            let data: Vec<u8> = row.try_get("data")?;
            if stream == 2 {
                err.extend_from_slice(&data);
            } else {
                out.extend_from_slice(&data);
            }
        }
        Ok((out, err))
    }

    async fn insert_user(&self, user: &UserRecord, event: NewEvent) -> StoreResult<Event> {
        self.write_user(user, event, false).await
    }

    async fn upsert_user(&self, user: &UserRecord, event: NewEvent) -> StoreResult<Event> {
        self.write_user(user, event, true).await
    }

    async fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query("SELECT * FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn delete_user(&self, name: &str, event: NewEvent) -> StoreResult<Event> {
        self.delete_identity("users", "name", name, event).await
    }

    async fn insert_token(&self, token: &TokenRecord, event: NewEvent) -> StoreResult<Event> {
        let token = token.clone();
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO tokens (id, secret_hash, role, nodes, description, created_at)
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(&token.id)
                .bind(&token.secret_hash)
                .bind(token.role.as_str())
                .bind(json(&token.nodes))
                .bind(&token.description)
                .bind(token.created_at)
                .execute(&mut *conn)
                .await
                .map_err(|e| match e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        StoreError::Conflict(format!("token {}", token.id))
                    }
                    e => e.into(),
                })?;
                insert_event(conn, &event).await
            })
        })
        .await
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn delete_token(&self, id: &str, event: NewEvent) -> StoreResult<Event> {
        self.delete_identity("tokens", "id", id, event).await
    }

    async fn count_identities(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM tokens)",
        )
        .fetch_one(&self.read)
        .await?;
        Ok(n as u64)
    }

    // -- queues: the statements are in `sqlite/queues.rs` ------------------------------

    async fn insert_messages(
        &self,
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    ) -> StoreResult<Vec<Event>> {
        self.q_insert(messages, event).await
    }

    async fn claim_messages(
        &self,
        claim: Claim,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.q_claim(claim, event).await
    }

    async fn has_deliverable(&self, destination: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        self.q_has_deliverable(destination, now).await
    }

    async fn ack_messages(
        &self,
        destination: &str,
        ids: Vec<String>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.q_ack(destination, ids, at, event).await
    }

    async fn update_message_payload(
        &self,
        selector: MessageSelector,
        kind: PayloadKind,
        payload: Vec<u8>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.q_update_payload(selector, kind, payload, at, event)
            .await
    }

    async fn delete_messages(
        &self,
        selector: MessageSelector,
        event: DeleteEvent,
    ) -> StoreResult<u64> {
        self.q_delete(selector, event).await
    }

    async fn get_message(&self, id: &str) -> StoreResult<Option<MessageRecord>> {
        self.q_get(id).await
    }

    async fn list_messages(&self, selector: &MessageSelector) -> StoreResult<Vec<MessageRecord>> {
        self.q_list(selector).await
    }

    async fn queue_stats(&self, destination: Option<&str>) -> StoreResult<Vec<QueueStats>> {
        self.q_stats(destination).await
    }

    async fn put_node(&self, node: &NodeRecord, event: Option<NewEvent>) -> StoreResult<()> {
        self.n_put_node(node, event).await
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        self.n_list_nodes().await
    }

    async fn write_tasks(&self, write: TaskWrite) -> StoreResult<Vec<Event>> {
        self.n_write_tasks(write).await
    }

    async fn job_tasks(&self, job: &str) -> StoreResult<Vec<TaskRecord>> {
        self.n_job_tasks(job).await
    }

    async fn tasks_in(&self, states: &[opsbox_api::TaskState]) -> StoreResult<Vec<TaskRecord>> {
        self.n_tasks_in(states).await
    }

    async fn queued_tasks(&self, per_job: u32) -> StoreResult<Vec<TaskRecord>> {
        self.n_queued_tasks(per_job).await
    }

    async fn get_task(&self, job: &str, id: &str) -> StoreResult<Option<TaskRecord>> {
        self.n_get_task(job, id).await
    }

    async fn snapshot(&self, path: &Path) -> StoreResult<()> {
        // VACUUM INTO reads one consistent snapshot (a read transaction under WAL) and
        // writes a compact copy; writers go on meanwhile.
        sqlx::query("VACUUM INTO ?")
            .bind(path.display().to_string())
            .execute(&self.read)
            .await?;
        Ok(())
    }

    async fn load_model(&self) -> StoreResult<crate::store::ModelData> {
        self.m_load().await
    }

    async fn write_model(&self, write: crate::store::ModelWrite) -> StoreResult<Vec<Event>> {
        self.m_write(write).await
    }

    async fn delete_tasks(&self, job: &str) -> StoreResult<()> {
        self.n_delete_tasks(job).await
    }
}

impl SqliteStore {
    async fn write_user(
        &self,
        user: &UserRecord,
        event: NewEvent,
        replace: bool,
    ) -> StoreResult<Event> {
        let user = user.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let sql = if replace {
                    "INSERT INTO users (name, password_hash, role, created_at) VALUES (?, ?, ?, ?)
                     ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                        role = excluded.role"
                } else {
                    "INSERT INTO users (name, password_hash, role, created_at) VALUES (?, ?, ?, ?)"
                };
                sqlx::query(sql)
                    .bind(&user.name)
                    .bind(&user.password_hash)
                    .bind(user.role.as_str())
                    .bind(user.created_at)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| match e {
                        sqlx::Error::Database(d) if d.is_unique_violation() => {
                            StoreError::Conflict(format!("user {}", user.name))
                        }
                        e => e.into(),
                    })?;
                insert_event(conn, &event).await
            })
        })
        .await
    }

    async fn delete_identity(
        &self,
        table: &'static str,
        key: &'static str,
        value: &str,
        event: NewEvent,
    ) -> StoreResult<Event> {
        let value = value.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let sql = format!("DELETE FROM {table} WHERE {key} = ?");
                let gone = sqlx::query(&sql)
                    .bind(&value)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if gone == 0 {
                    return Err(StoreError::NotFound(value));
                }
                insert_event(conn, &event).await
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).await.unwrap();
        fn boom(_: &mut SqliteConnection) -> BoxFut<'_, ()> {
            Box::pin(async { panic!("a bug in a write") })
        }
        let (failed, fine) = tokio::join!(
            store.write(boom),
            store.append_event(NewEvent::new("t.one", "s", serde_json::json!({})))
        );
        assert!(matches!(failed, Err(StoreError::Corrupt(_))), "{failed:?}");
        fine.unwrap();
        store
            .append_event(NewEvent::new("t.two", "s", serde_json::json!({})))
            .await
            .unwrap();
    }
}
