//! The SQLite store's writer: one thread that owns the only write connection and commits
//! whatever writes are waiting as one transaction (group commit).
//!
//! The writer is a plain thread with a synchronous connection (rusqlite), not a task
//! over sqlx's async connection: sqlx hands every statement to its own worker thread
//! and back, and on a small machine those two hand-offs per statement cost more than
//! SQLite running the statement (profiles of script runs and queue cycles put the
//! context switches and futex waits of that hop at about a third of the server's CPU).
//! Here a whole group (BEGIN, every write's statements, COMMIT and its fsync) runs
//! without leaving the thread: a request costs one hop in and one hop out, however many
//! statements its write has. Reads stay on sqlx's pool, which WAL lets run alongside.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use opsbox_api::Event;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::queues::{self, Ack};
use super::{lock, JobCache, Tail};
use crate::store::{
    Claim, JobRecord, MessageEvent, MessageRecord, NewEvent, StoreError, StoreResult,
};

/// Most writes committed in one transaction.
pub(super) const MAX_GROUP: usize = 512;

/// The write connection inside the current group's transaction, and the events the
/// group has inserted so far (announced and put in the tail once it commits).
pub(crate) struct Tx {
    pub(super) conn: Connection,
    newest: u64,
    events: Vec<Event>,
    /// The job rows the group wrote (`None`: ended or deleted), for the job cache once
    /// it commits.
    jobs: Vec<(String, Option<JobRecord>)>,
}

/// Where a group stood before a write: [`Tx::undo`] forgets what the write added.
#[derive(Clone, Copy)]
pub(super) struct Mark {
    newest: u64,
    events: usize,
    jobs: usize,
}

impl Tx {
    pub(super) fn mark(&self) -> Mark {
        Mark {
            newest: self.newest,
            events: self.events.len(),
            jobs: self.jobs.len(),
        }
    }

    /// Forgets the events and job rows of a write that was rolled back.
    pub(super) fn undo(&mut self, mark: Mark) {
        self.newest = mark.newest;
        self.events.truncate(mark.events);
        self.jobs.truncate(mark.jobs);
    }

    /// Notes a job row as written (`None`: deleted). Every write of the `jobs` table
    /// goes through here, so the job cache never answers a row the database no longer
    /// holds. Only jobs that have not ended are kept: those are the ones read over and
    /// over (a fan-out job at every scheduling round).
    pub(super) fn note_job(&mut self, name: &str, job: Option<JobRecord>) {
        let kept = job.filter(|j| !j.state.is_terminal());
        self.jobs.push((name.to_owned(), kept));
    }

    /// Runs one statement of the group's frame (BEGIN, SAVEPOINT, RELEASE, COMMIT)
    /// prepared once: `execute_batch` would parse it again each time, several per write.
    fn run(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Inserts an event and answers it. Every event insert of the writer goes through
    /// here or [`Tx::note_event`], so that the group's events reach the tail.
    pub(super) fn insert_event(&mut self, event: NewEvent) -> StoreResult<Event> {
        self.note_event(event)?;
        self.events
            .last()
            .cloned()
            .ok_or_else(|| StoreError::Failed("an event noted is missing".into()))
    }

    /// Inserts an event whose record the caller does not need: the group keeps the only
    /// copy (an event's data is a JSON tree, and copying it was a good part of a small
    /// write's cost on the writer thread).
    pub(super) fn note_event(&mut self, event: NewEvent) -> StoreResult<()> {
        let at = Utc::now();
        // `RETURNING rev` would cost SQLite an ephemeral table per insert (about half
        // of an event's cost on this thread); the writer's connection is its own, so
        // the last rowid is this insert's.
        self.conn
            .prepare_cached("INSERT INTO events (at, kind, subject, data) VALUES (?, ?, ?, ?)")?
            .execute((
                super::time_text(at),
                &event.kind,
                &event.subject,
                super::json(&event.data),
            ))?;
        let rev = self.conn.last_insert_rowid();
        let event = Event {
            rev: rev as u64,
            at,
            kind: event.kind,
            subject: event.subject,
            data: event.data,
        };
        self.newest = self.newest.max(event.rev);
        self.events.push(event);
        Ok(())
    }
}

/// A write waiting for the writer.
pub(super) trait Op: Send {
    /// Applies the write; false when it failed (its savepoint is then rolled back).
    fn apply(&mut self, tx: &mut Tx) -> bool;
    /// Delivers the result once the transaction is committed (or failed to commit).
    fn finish(self: Box<Self>, committed: Result<(), String>);
    /// A queue write that can join the others of its kind, or the op itself.
    fn into_queue(self: Box<Self>) -> Result<Box<QueueOp>, Box<dyn Op>>;
    /// Whether the write, in a group, runs in a savepoint of its own so that its failure
    /// undoes it alone. A write that answers no leaves its failures to the whole group:
    /// if it fails, the group's transaction is rolled back and every write in it fails.
    fn own_savepoint(&self) -> bool {
        true
    }
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
        (Err(message), _) => Err(StoreError::Failed(format!("commit failed: {message}"))),
    }
}

/// Any write: a closure over the transaction.
pub(super) struct TypedOp<T, F> {
    pub(super) work: Option<F>,
    pub(super) result: Option<StoreResult<T>>,
    pub(super) reply: Option<oneshot::Sender<StoreResult<T>>>,
}

impl<T, F> Op for TypedOp<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Tx) -> StoreResult<T> + Send + 'static,
{
    fn apply(&mut self, tx: &mut Tx) -> bool {
        let Some(work) = self.work.take() else {
            return true;
        };
        let result = work(tx);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
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

/// A queue write the writer may run together with the others of its kind.
pub(super) enum QueueWork {
    Push(Vec<MessageRecord>, MessageEvent),
    Claim(Claim, MessageEvent),
    Ack(Ack),
}

/// What a queue write answers: a push its events, a claim or an ack its messages.
pub(super) enum QueueAnswer {
    Events(Vec<Event>),
    Messages(Vec<MessageRecord>),
}

enum QueueBatch {
    Pushes(Vec<(Vec<MessageRecord>, MessageEvent)>),
    Claims(Vec<(Claim, MessageEvent)>),
    Acks(Vec<Ack>),
}

/// All pushes, all claims or all acks of a group as one write, in one savepoint instead
/// of one each. Claims and acks fail only when the database does, and then together; a
/// push that fails (an id taken) fails alone (see `queues::push`).
pub(super) struct QueueOp {
    batch: QueueBatch,
    results: Vec<Option<StoreResult<QueueAnswer>>>,
    replies: Vec<oneshot::Sender<StoreResult<QueueAnswer>>>,
}

impl QueueOp {
    pub(super) fn new(work: QueueWork, reply: oneshot::Sender<StoreResult<QueueAnswer>>) -> Self {
        QueueOp {
            batch: match work {
                QueueWork::Push(messages, event) => QueueBatch::Pushes(vec![(messages, event)]),
                QueueWork::Claim(claim, event) => QueueBatch::Claims(vec![(claim, event)]),
                QueueWork::Ack(ack) => QueueBatch::Acks(vec![ack]),
            },
            results: vec![None],
            replies: vec![reply],
        }
    }

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
    fn apply(&mut self, tx: &mut Tx) -> bool {
        let answers: StoreResult<Vec<StoreResult<QueueAnswer>>> = match &self.batch {
            QueueBatch::Pushes(pushes) => queues::push(tx, pushes).map(|all| {
                all.into_iter()
                    .map(|r| r.map(QueueAnswer::Events))
                    .collect()
            }),
            QueueBatch::Claims(claims) => queues::claim(tx, claims).map(|all| {
                all.into_iter()
                    .map(|m| Ok(QueueAnswer::Messages(m)))
                    .collect()
            }),
            QueueBatch::Acks(acks) => queues::ack(tx, acks).map(|all| {
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
                        StoreError::Failed(format!("the write shared with others failed: {reason}"))
                    })));
                }
                false
            }
        }
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

    /// Claims and acks fail only when the database does (the group would not commit
    /// anyway), and pushes find taken ids before they write anything (see
    /// `queues::push`); a savepoint around them would only cost: SQLite copies every page a
    /// write touches into the statement journal once per open savepoint, and a queue
    /// cycle's writes touch the same few pages (the queue's index, the event log's last
    /// leaf) in every group. Profiled at 64 clients, that copying was a fifth of the
    /// writer thread's time.
    fn own_savepoint(&self) -> bool {
        false
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

/// Starts the writer thread over `conn`; it ends when every sender of `queue` is gone.
pub(super) fn start(
    conn: Connection,
    queue: mpsc::Receiver<Box<dyn Op>>,
    changes: watch::Sender<u64>,
    tail: Arc<Mutex<Tail>>,
    jobs: Arc<Mutex<JobCache>>,
) -> StoreResult<()> {
    std::thread::Builder::new()
        .name("opsbox-sqlite-writer".into())
        .spawn(move || run(conn, queue, changes, tail, jobs))
        .map(drop)
        .map_err(|e| StoreError::Failed(format!("cannot start the store's writer: {e}")))
}

fn run(
    conn: Connection,
    mut queue: mpsc::Receiver<Box<dyn Op>>,
    changes: watch::Sender<u64>,
    tail: Arc<Mutex<Tail>>,
    jobs: Arc<Mutex<JobCache>>,
) {
    let mut revision = *changes.borrow();
    let mut tx = Tx {
        conn,
        newest: revision,
        events: Vec::new(),
        jobs: Vec::new(),
    };
    let mut batch: Vec<Box<dyn Op>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        coalesce(&mut batch);
        let committed = commit_group(&mut tx, &mut batch);
        let events = std::mem::take(&mut tx.events);
        // Before the writes are answered: a caller reading its job back sees its write.
        lock(&jobs).apply(std::mem::take(&mut tx.jobs), committed.is_ok());
        if committed.is_ok() {
            revision = revision.max(tx.newest);
            if !events.is_empty() {
                lock(&tail).push(events);
            }
            // Sent even when no event was added (output appends): followers of logs
            // wake on every commit.
            changes.send_replace(revision);
        } else {
            tracing::error!(error = ?committed, "store commit failed");
        }
        tx.newest = revision;
        for op in batch.drain(..) {
            op.finish(committed.clone());
        }
    }
}

/// Applies one write; a write that panics fails alone (its caller hears of it), and
/// the writer, which every other write needs, goes on.
fn apply(op: &mut dyn Op, tx: &mut Tx) -> bool {
    match std::panic::catch_unwind(AssertUnwindSafe(|| op.apply(tx))) {
        Ok(ok) => ok,
        Err(_) => {
            tracing::error!("a store write panicked; rolled back");
            false
        }
    }
}

/// One transaction for the whole group. Each write runs in its own savepoint, so a
/// failing one is undone alone, unless it says it needs none ([`Op::own_savepoint`]);
/// a group of one needs no savepoint (its failure rolls the transaction back).
fn commit_group(tx: &mut Tx, batch: &mut [Box<dyn Op>]) -> Result<(), String> {
    let text = |e: rusqlite::Error| e.to_string();
    tx.run("BEGIN IMMEDIATE").map_err(text)?;
    if let [op] = batch {
        let before = tx.mark();
        if !apply(op.as_mut(), tx) {
            tx.undo(before);
            // The write failed and delivers its own error; nothing else to keep.
            return tx.conn.execute_batch("ROLLBACK").map_err(text);
        }
    } else {
        for op in batch.iter_mut() {
            if !op.own_savepoint() {
                if !apply(op.as_mut(), tx) {
                    let _ = tx.conn.execute_batch("ROLLBACK");
                    return Err("rolled back: a write of the group failed, which happens only when the database does".into());
                }
                continue;
            }
            let before = tx.mark();
            let step = tx.run("SAVEPOINT op").and_then(|()| {
                if apply(op.as_mut(), tx) {
                    tx.run("RELEASE op")
                } else {
                    tx.undo(before);
                    tx.conn.execute_batch("ROLLBACK TO op; RELEASE op")
                }
            });
            if let Err(e) = step {
                let _ = tx.conn.execute_batch("ROLLBACK");
                return Err(e.to_string());
            }
        }
    }
    if let Err(e) = tx.run("COMMIT") {
        let _ = tx.conn.execute_batch("ROLLBACK");
        return Err(e.to_string());
    }
    Ok(())
}
