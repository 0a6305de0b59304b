//! The embedded store: one SQLite file in WAL mode.
//!
//! Writes go through one writer thread that owns the only write connection and commits
//! whatever writes are waiting as one transaction (group commit, see `writer`): under
//! load, many requests share one fsync instead of paying one each, and SQLite never sees
//! two writers fighting over its lock. Each write runs inside its own savepoint, so one
//! failing write (a name conflict, say) does not undo the others of its group. Reads use
//! a separate pool and never wait for the writer.
//!
//! The writer also keeps the newest committed events in memory (the tail): a watcher
//! woken by a commit reads what it missed from there instead of from the database, so a
//! thousand watchers cost one insert and a thousand clones, not a thousand queries.
//! Every event insert goes through `Tx::insert_event` (or `Tx::note_event`) so the tail
//! sees it; events another process writes are found by the gap they leave.
//!
//! And it keeps the committed rows of the jobs that have not ended (the job cache):
//! the scheduler reads a running fan-out job at every round, and reading it through
//! the pool (a hand-off to sqlx's thread, a query, decoding its JSON columns) cost more
//! than the round's own work. Only this server writes jobs to its file (the admin
//! commands that open it write users and tokens), so the writer knows every change.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use opsbox_api::{Event, JobState, LogChunk, Role, Stream};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Claim, DeleteEvent, MessageEvent, MessageRecord, MessageSelector};
use super::{
    EventsSince, JobFilter, JobRecord, JobWrite, LogChunkBytes, NewEvent, NodeRecord, Store,
    StoreError, StoreResult, TaskRecord, TaskWrite, TokenRecord, UserRecord,
};
use opsbox_api::{PayloadKind, QueueStats};
use writer::{Op, QueueAnswer, QueueOp, QueueWork, Tx, TypedOp};

mod model;
mod nodes;
mod queues;
mod writer;

/// Committed events kept in memory for watchers (see the module docs).
const TAIL_EVENTS: usize = 2048;

/// The SQLite [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Read-only connections; WAL lets them read while the writer commits.
    read: SqlitePool,
    /// Queue of the writer thread.
    writes: mpsc::Sender<Box<dyn Op>>,
    /// Bumped by the writer after each commit with the newest revision.
    changes: watch::Receiver<u64>,
    /// The newest committed events, filled by the writer before it bumps `changes`.
    tail: Arc<Mutex<Tail>>,
    /// One server per file: signals stay in this process.
    signals: tokio::sync::broadcast::Sender<super::Signal>,
    /// Jobs not ended, as last committed (see the module docs).
    jobs: Arc<Mutex<JobCache>>,
}

/// The job cache: unended jobs by name, as committed.
#[derive(Debug, Default)]
struct JobCache {
    jobs: HashMap<String, JobRecord>,
}

impl JobCache {
    /// Most jobs kept; beyond, the cache starts over (reads fall back to the database).
    const MAX: usize = 1024;

    /// Takes a group's job writes once it committed; if it did not, forgets the jobs it
    /// touched (a failed commit may still have reached the disk).
    fn apply(&mut self, writes: Vec<(String, Option<JobRecord>)>, committed: bool) {
        for (name, job) in writes {
            match job.filter(|_| committed) {
                Some(job) => {
                    if self.jobs.len() >= Self::MAX && !self.jobs.contains_key(&name) {
                        self.jobs.clear();
                    }
                    self.jobs.insert(name, job);
                }
                None => {
                    self.jobs.remove(&name);
                }
            }
        }
    }

    fn get(&self, name: &str) -> Option<JobRecord> {
        self.jobs.get(name).cloned()
    }
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

    /// Like [`Tail::since`], copying only the events `wanted` keeps; with the revision
    /// of the last event looked at.
    fn since_matching(
        &self,
        since: u64,
        limit: u32,
        wanted: &(dyn for<'e> Fn(&'e Event) -> bool + Sync),
    ) -> Option<(Vec<Event>, u64)> {
        if since < self.from {
            return None;
        }
        let start = self.events.partition_point(|e| e.rev <= since);
        let looked = self.events.range(start..).take(limit as usize);
        let last = looked.clone().next_back().map_or(since, |e| e.rev);
        Some((looked.filter(|e| wanted(e)).cloned().collect(), last))
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

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The tail and the job cache hold plain data that every method leaves consistent,
    // so a panic elsewhere while one was held leaves nothing to repair.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let revision = {
            let mut setup = SqliteConnection::connect_with(&options).await?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&mut setup)
                .await?;
            let revision = read_revision(&mut setup).await?;
            setup.close().await?;
            revision
        };
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || writer_connection(&path))
            .await
            .map_err(|e| StoreError::Failed(format!("opening the writer connection: {e}")))??;
        let read = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            // A local file cannot go stale like a network connection; the default
            // liveness check would cost a round trip to the driver's thread per read.
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        let (changes_tx, changes) = watch::channel(revision);
        let (writes, queue) = mpsc::channel(4096);
        let tail = Arc::new(Mutex::new(Tail {
            from: revision,
            events: VecDeque::new(),
        }));
        let jobs = Arc::new(Mutex::new(JobCache::default()));
        writer::start(conn, queue, changes_tx, tail.clone(), jobs.clone())?;
        Ok(SqliteStore {
            read,
            writes,
            changes,
            tail,
            signals: tokio::sync::broadcast::channel(1024).0,
            jobs,
        })
    }

    /// Runs `work` in the writer's next transaction and returns its result once that
    /// transaction is committed.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx) -> StoreResult<T> + Send + 'static,
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
        self.writes
            .send(Box::new(QueueOp::new(work, reply)))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// The writer's connection, with the settings of the read pool's (the journal mode is
/// the file's, set when migrating).
fn writer_connection(path: &Path) -> StoreResult<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // FULL: a write acknowledged to a client survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every statement of the writer is one of a few dozen texts.
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

async fn read_revision(conn: &mut SqliteConnection) -> StoreResult<u64> {
    let rev: i64 = sqlx::query_scalar(REVISION).fetch_one(conn).await?;
    Ok(rev as u64)
}

/// The newest revision, counting compacted ones.
const REVISION: &str = "SELECT MAX(COALESCE((SELECT MAX(rev) FROM events), 0),
                   (SELECT value FROM meta WHERE key = 'compacted_through'))";

/// A time as the jobs, users and tokens tables store it: the text sqlx writes for a
/// `DateTime<Utc>` (RFC 3339, as many fraction digits as needed), so that rows written
/// by the writer and by earlier releases read back the same way.
fn time_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _)
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// `error`, as a conflict over `what` when it is a unique violation.
fn conflict(error: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    if is_unique_violation(&error) {
        StoreError::Conflict(what())
    } else {
        error.into()
    }
}

// ---------------------------------------------------------------------------------------
// Statements used inside write transactions
// ---------------------------------------------------------------------------------------

/// A value as JSON text. Also for a `serde_json::Value`: its `to_string()` goes
/// through `fmt::Write` one token at a time, several times slower than writing into a
/// buffer as this does.
fn json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain maps, vectors of strings and JSON values cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Writes a job's row (a new one, or over the existing one), its output chunks and its
/// events.
fn write_job(
    tx: &mut Tx,
    job: &JobRecord,
    insert: bool,
    output: &[LogChunkBytes],
) -> StoreResult<()> {
    let values = (
        &job.script,
        job.state.as_str(),
        json(&job.params),
        &job.node,
        &job.submitted_by,
        time_text(job.created_at),
        job.started_at.map(time_text),
        job.finished_at.map(time_text),
        job.exit_code,
        job.signal,
        &job.reason,
        json(&job.return_values),
        json(&job.results),
        json(&job.spec),
        job.pid.map(i64::from),
        &job.name,
    );
    let changed = if insert {
        tx.conn
            .prepare_cached(
                "INSERT INTO jobs (script, state, params, node, submitted_by, created_at, \
                 started_at, finished_at, exit_code, signal, reason, return_values, results, \
                 spec, pid, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(values)
            .map_err(|e| conflict(e, || format!("job {}", job.name)))?
    } else {
        tx.conn
            .prepare_cached(
                "UPDATE jobs SET (script, state, params, node, submitted_by, created_at, \
                 started_at, finished_at, exit_code, signal, reason, return_values, results, \
                 spec, pid) = (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE name = ?",
            )?
            .execute(values)?
    };
    if changed == 0 {
        // Cleaned meanwhile.
        return Err(StoreError::NotFound(format!("job {}", job.name)));
    }
    // As `job_from_row` reads it back: this store keeps no server name. An ended job
    // leaves the cache, so it is not copied for it.
    let stored = (!job.state.is_terminal()).then(|| JobRecord {
        server: None,
        ..job.clone()
    });
    tx.note_job(&job.name, stored);
    insert_output(tx, &job.name, output)
}

fn insert_output(tx: &Tx, job: &str, chunks: &[LogChunkBytes]) -> StoreResult<()> {
    let mut insert = tx
        .conn
        .prepare_cached("INSERT INTO job_output (job, seq, stream, data) VALUES (?, ?, ?, ?)")?;
    for chunk in chunks {
        insert.execute((
            job,
            chunk.seq as i64,
            stream_code(chunk.stream),
            &chunk.data,
        ))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Row decoding
// ---------------------------------------------------------------------------------------

fn decode<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A row of either driver, the writer's (rusqlite) or the read pool's (sqlx), so that
/// one decoder serves both.
trait Columns {
    fn col<T: Column>(&self, name: &str) -> StoreResult<T>;
}

/// A value both drivers can read.
trait Column:
    rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>
{
}

impl<T> Column for T where
    T: rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>
{
}

impl Columns for SqliteRow {
    fn col<T: Column>(&self, name: &str) -> StoreResult<T> {
        Ok(self.try_get(name)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn col<T: Column>(&self, name: &str) -> StoreResult<T> {
        Ok(self.get(name)?)
    }
}

/// A writer row read by name through its statement's column names, taken once per
/// statement ([`column_names`]): rusqlite finds a column by name by asking SQLite for
/// each column's name in turn (an FFI call, a `strlen` and a UTF-8 check each), which
/// was 7% of a queue cycle's instructions with a dozen columns read per message.
struct Named<'a, 'r> {
    row: &'a rusqlite::Row<'r>,
    names: &'a [String],
}

impl Columns for Named<'_, '_> {
    fn col<T: Column>(&self, name: &str) -> StoreResult<T> {
        match self.names.iter().position(|n| n == name) {
            Some(index) => Ok(self.row.get(index)?),
            // rusqlite's own lookup (and its error for a missing column).
            None => Ok(self.row.get(name)?),
        }
    }
}

fn column_names(statement: &rusqlite::Statement<'_>) -> Vec<String> {
    statement
        .column_names()
        .into_iter()
        .map(String::from)
        .collect()
}

/// A time stored by [`time_text`].
fn parse_time(text: &str, what: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{what}: time {text:?}: {e}")))
}

fn job_from_row(row: &impl Columns) -> StoreResult<JobRecord> {
    let state: String = row.col("state")?;
    let name: String = row.col("name")?;
    let time = |column: &str| -> StoreResult<Option<DateTime<Utc>>> {
        row.col::<Option<String>>(column)?
            .map(|text| parse_time(&text, &name))
            .transpose()
    };
    Ok(JobRecord {
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job {name}: state {state}")))?,
        script: row.col("script")?,
        params: decode(&row.col::<String>("params")?, "params")?,
        node: row.col("node")?,
        submitted_by: row.col("submitted_by")?,
        created_at: parse_time(&row.col::<String>("created_at")?, &name)?,
        started_at: time("started_at")?,
        finished_at: time("finished_at")?,
        exit_code: row.col("exit_code")?,
        signal: row.col("signal")?,
        reason: row.col("reason")?,
        return_values: decode(&row.col::<String>("return_values")?, "return_values")?,
        results: decode(&row.col::<String>("results")?, "results")?,
        spec: decode(&row.col::<String>("spec")?, "spec")?,
        pid: row
            .col::<Option<i64>>("pid")?
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
        source: row.try_get("source")?,
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

    async fn events_since_matching(
        &self,
        since: u64,
        limit: u32,
        wanted: &(dyn for<'e> Fn(&'e Event) -> bool + Sync),
    ) -> StoreResult<(EventsSince, u64)> {
        if let Some((events, last)) = lock(&self.tail).since_matching(since, limit, wanted) {
            return Ok((EventsSince::Events(events), last));
        }
        let found = self.events_since(since, limit).await?;
        Ok(super::keep_matching(found, since, wanted))
    }

    async fn append_event(&self, event: NewEvent) -> StoreResult<Event> {
        self.write(move |tx| tx.insert_event(event)).await
    }

    async fn compact_events(&self, keep: u64) -> StoreResult<u64> {
        let (dropped, cut) = self
            .write(move |tx| {
                let newest: i64 = tx.conn.query_row(REVISION, (), |row| row.get(0))?;
                // Saturating: a huge `keep` ("keep everything") must not wrap to a
                // negative number, which cut past the newest revision and dropped the
                // whole log.
                let cut = newest.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
                if cut <= 0 {
                    return Ok((0, 0));
                }
                let dropped = tx
                    .conn
                    .execute("DELETE FROM events WHERE rev <= ?", [cut])?;
                tx.conn.execute(
                    "UPDATE meta SET value = MAX(value, ?) WHERE key = 'compacted_through'",
                    [cut],
                )?;
                Ok((dropped as u64, cut as u64))
            })
            .await?;
        lock(&self.tail).compacted(cut);
        Ok(dropped)
    }

    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let job = job.clone();
        self.write(move |tx| {
            write_job(tx, &job, true, &[])?;
            tx.insert_event(event)
        })
        .await
    }

    async fn update_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let job = job.clone();
        self.write(move |tx| {
            write_job(tx, &job, false, &[])?;
            tx.insert_event(event)
        })
        .await
    }

    async fn write_job(
        &self,
        job: &JobRecord,
        row: JobWrite,
        output: Vec<LogChunkBytes>,
        events: Vec<NewEvent>,
    ) -> StoreResult<()> {
        let job = job.clone();
        self.write(move |tx| {
            write_job(tx, &job, row == JobWrite::Insert, &output)?;
            events.into_iter().try_for_each(|e| tx.note_event(e))
        })
        .await
    }

    async fn get_job(&self, name: &str) -> StoreResult<Option<JobRecord>> {
        if let Some(job) = lock(&self.jobs).get(name) {
            return Ok(Some(job));
        }
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
        self.write(move |tx| {
            if tx
                .conn
                .execute("DELETE FROM jobs WHERE name = ?", [&name])?
                == 0
            {
                return Err(StoreError::NotFound(format!("job {name}")));
            }
            tx.conn
                .execute("DELETE FROM tasks WHERE job = ?", [&name])?;
            tx.conn
                .execute("DELETE FROM job_output WHERE job = ?", [&name])?;
            tx.note_job(&name, None);
            tx.insert_event(event)
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
        self.write(move |tx| {
            let jobs = tx
                .conn
                .prepare(
                    // Fan-out jobs are not lost with the server: their tasks are in the
                    // store and the nodes service carries on with them.
                    "UPDATE jobs SET state = 'lost', reason = ?, finished_at = ?
                     WHERE state IN ('queued', 'running')
                       AND json_extract(spec, '$.fanout') IS NULL RETURNING *",
                )?
                .query_and_then((&reason, time_text(at)), |row| job_from_row(row))?
                .collect::<StoreResult<Vec<_>>>()?;
            for job in &jobs {
                // Ended: it leaves the cache.
                tx.note_job(&job.name, None);
            }
            jobs.iter().map(|job| tx.insert_event(event(job))).collect()
        })
        .await
    }

    async fn append_output(&self, job: &str, chunks: Vec<LogChunkBytes>) -> StoreResult<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let job = job.to_owned();
        self.write(move |tx| insert_output(tx, &job, &chunks)).await
    }

    async fn output_since(&self, job: &str, after: u64, limit: u32) -> StoreResult<Vec<LogChunk>> {
        // SQLite integers are i64: an `after` beyond that range is after every chunk,
        // never a negative one (which would replay them all).
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT seq, stream, data FROM job_output WHERE job = ? AND seq > ?
             ORDER BY seq LIMIT ?",
        )
        .bind(job)
        .bind(after)
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
        self.write(move |tx| {
            tx.conn
                .execute(
                    "INSERT INTO tokens (id, secret_hash, role, nodes, description, created_at)
                     VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        &token.id,
                        &token.secret_hash,
                        token.role.as_str(),
                        json(&token.nodes),
                        &token.description,
                        time_text(token.created_at),
                    ),
                )
                .map_err(|e| conflict(e, || format!("token {}", token.id)))?;
            tx.insert_event(event)
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

    async fn write_tasks(&self, write: TaskWrite) -> StoreResult<()> {
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
        self.write(move |tx| {
            let sql = if replace {
                "INSERT INTO users (name, password_hash, role, created_at, source)
                 VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                    role = excluded.role, source = excluded.source"
            } else {
                "INSERT INTO users (name, password_hash, role, created_at, source)
                 VALUES (?, ?, ?, ?, ?)"
            };
            tx.conn
                .execute(
                    sql,
                    (
                        &user.name,
                        &user.password_hash,
                        user.role.as_str(),
                        time_text(user.created_at),
                        &user.source,
                    ),
                )
                .map_err(|e| conflict(e, || format!("user {}", user.name)))?;
            tx.insert_event(event)
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
        self.write(move |tx| {
            let sql = format!("DELETE FROM {table} WHERE {key} = ?");
            if tx.conn.execute(&sql, [&value])? == 0 {
                return Err(StoreError::NotFound(value));
            }
            tx.insert_event(event)
        })
        .await
    }
}

/// Fails when a server has the database at `db` open: such a server holds a shared lock
/// on it, so an exclusive one cannot be had. Offline commands that replace or move a
/// store (`backups restore`, `store migrate`) check this first.
pub fn ensure_unused(db: &Path) -> StoreResult<()> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(std::time::Duration::from_millis(200))?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .and_then(|_| conn.execute_batch("BEGIN EXCLUSIVE; COMMIT"))
        .map_err(|_| {
            StoreError::Invalid(format!(
                "{} is in use: stop the server that has it open first",
                db.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).await.unwrap();
        fn boom(_: &mut Tx) -> StoreResult<()> {
            panic!("a bug in a write")
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
