//! The shared store: one PostgreSQL database behind any number of servers.
//!
//! Writes are group-committed per server: the writes waiting at a moment share one
//! transaction, each in its own savepoint (see [`writer`]), and PostgreSQL's own group
//! commit shares WAL flushes between the servers. What keeps several servers from
//! stepping on each other lives here:
//!
//! - **Revisions in commit order.** A write collects its events and appends them last,
//!   taking the next revisions from the `meta.revision` row in the same statement. That
//!   row stays locked until the commit, so revisions are committed in order, and a
//!   reader of "rev > N" on any server never sees revision N+2 before N+1 (a plain
//!   sequence would hand out numbers in one order and commit them in another). The lock
//!   is held for one statement and the commit only, once per batch of writes.
//! - **Claims skip what others hold.** A pull locks its candidates with `FOR UPDATE SKIP
//!   LOCKED`, so two servers pulling one queue take different messages and never wait
//!   for each other; expired leases are settled the same way, by exactly one server.
//! - **Every server hears every commit.** Each commit sends a `NOTIFY` with its newest
//!   revision; every store listens and bumps [`Store::changes`], so long-polls, log
//!   followers, watchers and schedulers wake on changes made through any server.
//!   Signals ([`Store::signal`]) travel the same channel.
//!
//! A `schema=NAME` parameter on the URL keeps one opsbox in its own schema (created if
//! needed), so several installations, or tests, share a database.

use std::any::Any;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use opsbox_api::{
    Event, JobState, LogChunk, MessageStatus, PayloadKind, QueueStats, Role, Stream, TaskState,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::millis as time;

mod writer;
use writer::{Op, Work, WriteRequest, Writer};

use super::{
    fold_queue_stats, Claim, DeleteEvent, EventsSince, JobFilter, JobRecord, JobWrite,
    LogChunkBytes, MessageEvent, MessageRecord, MessageSelector, ModelData, ModelDoc, ModelWrite,
    NewEvent, NodeRecord, Signal, StatusCount, Store, StoreError, StoreLock, StoreResult,
    TaskRecord, TaskWrite, TokenRecord, UserRecord,
};

/// Expired leases settled per claim at most (the rest at the next claim).
const SETTLE_BATCH: i64 = 1000;
/// Ids listed in a delete event at most.
const EVENT_IDS: usize = 1000;
/// Rows per multi-row INSERT (PostgreSQL allows 65535 bound parameters).
const ROWS_PER_INSERT: usize = 1000;
/// Writes per transaction at most. Each may run in a savepoint, and PostgreSQL keeps
/// the subtransactions of a transaction in a 64-entry cache per backend: beyond it every
/// snapshot on the server gets slower.
const MAX_BATCH: usize = 48;

/// The PostgreSQL [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The NOTIFY channel of this installation (one per schema).
    channel: String,
    /// Who runs the jobs this store records (see [`JobRecord::server`]).
    owner: String,
    changes: watch::Receiver<u64>,
    signals: broadcast::Sender<Signal>,
    /// Writes go to this server's [`Writer`]s.
    writes: mpsc::Sender<WriteRequest>,
}

/// A PostgreSQL URL split into connect options and opsbox's own `schema` parameter.
fn parse_url(url: &str) -> StoreResult<(PgConnectOptions, Option<String>)> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut schema = None;
    let mut kept = form_urlencoded::Serializer::new(String::new());
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "schema" {
            schema = Some(value.into_owned());
        } else {
            kept.append_pair(&key, &value);
        }
    }
    let kept = kept.finish();
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{kept}")
    };
    if let Some(name) = &schema {
        let ok = !name.is_empty()
            && name.len() <= 48
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(StoreError::Invalid(format!(
                "schema '{name}': use lowercase letters, digits and _ (at most 48, not starting with a digit)"
            )));
        }
    }
    let options = PgConnectOptions::from_str(&url)?;
    Ok((options, schema))
}

impl PgStore {
    /// Opens a store that must already exist (a source to copy from): refuses, without
    /// creating anything, when the database or schema holds no opsbox store (a typo in
    /// the URL would otherwise read as an empty store).
    pub async fn open_existing(url: &str, owner: &str) -> StoreResult<Self> {
        let (options, schema) = parse_url(url)?;
        let mut conn: PgConnection = sqlx::Connection::connect_with(&options).await?;
        let schema_name = schema.as_deref().unwrap_or("public");
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM information_schema.tables
             WHERE table_schema = $1 AND table_name = 'events'",
        )
        .bind(schema_name)
        .fetch_optional(&mut conn)
        .await?;
        if found.is_none() {
            return Err(StoreError::Invalid(format!(
                "no opsbox store in schema '{schema_name}' of that database: check the URL"
            )));
        }
        Self::open(url, owner).await
    }

    /// Connects, creates the schema if asked for one, runs pending migrations and starts
    /// listening for the other servers' commits. `owner` names this server in the job
    /// records it writes.
    pub async fn open(url: &str, owner: &str) -> StoreResult<Self> {
        let (mut options, schema) = parse_url(url)?;
        if let Some(schema) = &schema {
            let mut conn: PgConnection = sqlx::Connection::connect_with(&options).await?;
            // The name was checked to be a plain identifier above.
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .execute(&mut conn)
                .await?;
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .min_connections(2)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        {
            // Two servers starting at once: one migrates, the other waits for it (sqlx
            // takes an advisory lock around the migrations).
            let mut conn = pool.acquire().await?;
            sqlx::migrate!("./migrations/postgres")
                .run(&mut *conn)
                .await?;
        }
        let channel = format!("opsbox_{}", schema.as_deref().unwrap_or("public"));
        let revision = read_revision(&pool).await?;
        let (bump, changes) = watch::channel(revision);
        let bump = Arc::new(bump);
        let (signals, _) = broadcast::channel(1024);
        let instance = hex::encode(rand::random::<[u8; 8]>());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channel).await?;
        tokio::spawn(listen(
            listener,
            pool.clone(),
            instance.clone(),
            Arc::downgrade(&bump),
            signals.clone(),
        ));
        let (writes, requests) = mpsc::channel(MAX_BATCH * 4);
        let writer = Writer {
            options: (*pool.connect_options()).clone(),
            conn: None,
            used: std::time::Instant::now(),
            replan: writer::Replan::new(),
            channel: channel.clone(),
            instance: instance.clone(),
            bump,
        };
        writer.start(requests)?;
        Ok(PgStore {
            pool,
            channel,
            owner: owner.to_owned(),
            changes,
            writes,
            signals,
        })
    }

    /// Runs `work` in a transaction shared with the other writes waiting at that moment
    /// (see [`Writer`]), then appends the events it collected (taking their revisions,
    /// see the module docs), notifies every server and commits.
    async fn write<T, F>(&self, work: F) -> StoreResult<(T, Vec<Event>)>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut PgConnection,
                &'c mut Vec<NewEvent>,
            ) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        let op: Op = Box::new(move |conn, events| {
            Box::pin(async move {
                let value = work(conn, events).await?;
                Ok(Box::new(value) as Box<dyn Any + Send>)
            })
        });
        let (value, events) = self.submit(Work::Op(op)).await?;
        Ok((downcast(value)?, events))
    }

    /// Hands a write to this server's writers and waits for its commit.
    async fn submit(&self, work: Work) -> StoreResult<(Box<dyn Any + Send>, Vec<Event>)> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(WriteRequest { work, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// A write that returns its events only.
    async fn write_events<F>(&self, work: F) -> StoreResult<Vec<Event>>
    where
        F: for<'c> FnOnce(
                &'c mut PgConnection,
                &'c mut Vec<NewEvent>,
            ) -> BoxFuture<'c, StoreResult<()>>
            + Send
            + 'static,
    {
        Ok(self.write(work).await?.1)
    }

    /// A write of one event.
    async fn write_event<F>(&self, work: F) -> StoreResult<Event>
    where
        F: for<'c> FnOnce(
                &'c mut PgConnection,
                &'c mut Vec<NewEvent>,
            ) -> BoxFuture<'c, StoreResult<()>>
            + Send
            + 'static,
    {
        self.write_events(work)
            .await?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a write lost its event".into()))
    }
}

/// An advisory lock held on its own pooled connection.
struct AdvisoryLock {
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
    key: i64,
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let key = self.key;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .execute(&mut *conn)
                        .await;
                    if unlocked.is_err() {
                        // Never hand a connection that may still hold the lock back to
                        // the pool: closing the session releases it.
                        drop(conn.detach());
                    }
                });
            }
            Err(_) => drop(conn.detach()),
        }
    }
}

/// A stable 64-bit key for a lock name (FNV-1a: the same on every server and build).
fn lock_key(channel: &str, name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in channel.bytes().chain([0]).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Wakes this server on the other servers' commits and relays their signals.
async fn listen(
    mut listener: PgListener,
    pool: PgPool,
    instance: String,
    bump: std::sync::Weak<watch::Sender<u64>>,
    signals: broadcast::Sender<Signal>,
) {
    loop {
        let message = listener.try_recv().await;
        let Some(bump) = bump.upgrade() else { return };
        match message {
            Ok(Some(note)) => {
                let payload = note.payload();
                if let Some(rest) = payload.strip_prefix("c:") {
                    let (from, rev) = rest.split_once(':').unwrap_or((rest, "0"));
                    if from != instance {
                        let rev: u64 = rev.parse().unwrap_or(0);
                        bump.send_modify(|r| *r = (*r).max(rev));
                    }
                } else if let Some(rest) = payload.strip_prefix("s:") {
                    if let Some((topic, message)) = rest.split_once(':') {
                        let _ = signals.send(Signal {
                            topic: topic.to_owned(),
                            message: message.to_owned(),
                        });
                    }
                }
            }
            Ok(None) => {
                // The connection dropped and sqlx reconnected: what was notified
                // meanwhile is lost, so everyone re-reads from the newest revision.
                tracing::warn!("lost the PostgreSQL notification connection; reconnected");
                if let Ok(rev) = read_revision(&pool).await {
                    bump.send_modify(|r| *r = (*r).max(rev));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL notifications failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn read_revision<'e, E>(executor: E) -> StoreResult<u64>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let rev: i64 = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'revision'")
        .fetch_one(executor)
        .await?;
    Ok(rev.max(0) as u64)
}

/// Appends events at the end of a write: one statement takes the revisions (locking
/// the counter until the commit), inserts the events and notifies.
async fn append_events(
    conn: &mut PgConnection,
    channel: &str,
    instance: &str,
    events: Vec<NewEvent>,
) -> StoreResult<Vec<Event>> {
    let n = events.len() as i64;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    let data: Vec<String> = events.iter().map(|e| e.data.to_string()).collect();
    // The time is read once the counter is locked, from the database's clock: times
    // then grow with revisions, whichever server wrote them.
    let row = sqlx::query(
        "WITH r AS (
            UPDATE meta SET value = value + $1 WHERE key = 'revision'
            RETURNING value,
                (floor(extract(epoch FROM clock_timestamp()) * 1000000) * 1000)::bigint AS at
         ), ins AS (
            INSERT INTO events (rev, at, kind, subject, data)
            SELECT r.value - $1 + e.n, r.at, e.kind, e.subject, e.data
            FROM r, UNNEST($2::text[], $3::text[], $4::text[]) WITH ORDINALITY
                 AS e(kind, subject, data, n)
         )
         SELECT r.value, r.at FROM r, LATERAL (SELECT pg_notify($5, $6 || r.value::text)) AS n",
    )
    .bind(n)
    .bind(&kinds)
    .bind(&subjects)
    .bind(&data)
    .bind(channel)
    .bind(format!("c:{instance}:"))
    .fetch_one(&mut *conn)
    .await?;
    let last: i64 = row.try_get(0)?;
    let at = from_nanos(row.try_get(1)?);
    let first = (last - n + 1) as u64;
    Ok(events
        .into_iter()
        .enumerate()
        .map(|(i, e)| Event {
            rev: first + i as u64,
            at,
            kind: e.kind,
            subject: e.subject,
            data: e.data,
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// Row decoding
// ---------------------------------------------------------------------------------------

fn json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain maps and vectors of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn decode<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn role(text: &str) -> StoreResult<Role> {
    Role::parse(text).ok_or_else(|| StoreError::Corrupt(format!("role {text}")))
}

fn stream_code(stream: Stream) -> i16 {
    match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

fn conflict(what: String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(what),
        e => e.into(),
    }
}

fn job_from_row(row: &PgRow) -> StoreResult<JobRecord> {
    let state: String = row.try_get("state")?;
    let name: String = row.try_get("name")?;
    Ok(JobRecord {
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("job {name}: state {state}")))?,
        script: row.try_get("script")?,
        params: decode(&row.try_get::<String, _>("params")?, "params")?,
        node: row.try_get("node")?,
        submitted_by: row.try_get("submitted_by")?,
        created_at: nanos_col(row, "created_at")?,
        started_at: nanos_opt(row, "started_at")?,
        finished_at: nanos_opt(row, "finished_at")?,
        exit_code: row.try_get("exit_code")?,
        signal: row.try_get("signal")?,
        reason: row.try_get("reason")?,
        return_values: decode(&row.try_get::<String, _>("return_values")?, "return_values")?,
        results: decode(&row.try_get::<String, _>("results")?, "results")?,
        spec: decode(&row.try_get::<String, _>("spec")?, "spec")?,
        pid: row
            .try_get::<Option<i64>, _>("pid")?
            .and_then(|p| u32::try_from(p).ok()),
        server: row.try_get("server")?,
        name,
    })
}

fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    Ok(Event {
        rev: row.try_get::<i64, _>("rev")? as u64,
        at: nanos_col(row, "at")?,
        kind: row.try_get("kind")?,
        subject: row.try_get("subject")?,
        data: decode(&row.try_get::<String, _>("data")?, "event data")?,
    })
}

fn user_from_row(row: &PgRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        role: role(&row.try_get::<String, _>("role")?)?,
        created_at: nanos_col(row, "created_at")?,
        source: row.try_get("source")?,
    })
}

fn token_from_row(row: &PgRow) -> StoreResult<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        role: role(&row.try_get::<String, _>("role")?)?,
        nodes: decode(&row.try_get::<String, _>("nodes")?, "nodes")?,
        description: row.try_get("description")?,
        created_at: nanos_col(row, "created_at")?,
    })
}

/// A time as stored in the event, job and identity tables (see the migration).
fn nanos(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn from_nanos(value: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(value)
}

fn nanos_col(row: &PgRow, name: &str) -> StoreResult<DateTime<Utc>> {
    Ok(from_nanos(row.try_get::<i64, _>(name)?))
}

fn nanos_opt(row: &PgRow, name: &str) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(row.try_get::<Option<i64>, _>(name)?.map(from_nanos))
}

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn message_from_row(row: &PgRow) -> StoreResult<MessageRecord> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("kind")?;
    let created: i64 = row.try_get("created_at")?;
    Ok(MessageRecord {
        status: MessageStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: status {status}")))?,
        kind: PayloadKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: kind {kind}")))?,
        source: row.try_get("source")?,
        destination: row.try_get("destination")?,
        payload_type: row.try_get("payload_type")?,
        payload: row.try_get("payload")?,
        tries: row.try_get::<i32, _>("tries")?.max(0) as u32,
        max_tries: row
            .try_get::<Option<i32>, _>("max_tries")?
            .map(|n| n.max(0) as u32),
        created_at: DateTime::from_timestamp_millis(created)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: created_at")))?,
        updated_at: time(row.try_get("updated_at")?),
        scheduled_at: time(row.try_get("scheduled_at")?),
        processing_at: time(row.try_get("processing_at")?),
        processed_at: time(row.try_get("processed_at")?),
        lease_until: time(row.try_get("lease_until")?),
        id,
    })
}

/// Messages of rows, in queue order (`seq` breaks ties of `created_at`).
fn messages_in_order(rows: &[PgRow]) -> StoreResult<Vec<MessageRecord>> {
    let mut keyed = Vec::with_capacity(rows.len());
    for row in rows {
        keyed.push((row.try_get::<i64, _>("seq")?, message_from_row(row)?));
    }
    Ok(in_order(keyed).into_iter().map(|(_, m)| m).collect())
}

fn push_selector(query: &mut QueryBuilder<'_, Postgres>, selector: &MessageSelector) {
    query.push(" WHERE TRUE");
    if let Some(id) = &selector.id {
        query.push(" AND id = ").push_bind(id.clone());
    }
    if let Some(source) = &selector.source {
        query.push(" AND source = ").push_bind(source.clone());
    }
    if let Some(destination) = &selector.destination {
        query
            .push(" AND destination = ")
            .push_bind(destination.clone());
    }
    if let Some(party) = &selector.party {
        query
            .push(" AND (source = ")
            .push_bind(party.clone())
            .push(" OR destination = ")
            .push_bind(party.clone())
            .push(")");
    }
    if !selector.statuses.is_empty() {
        let statuses: Vec<&'static str> = selector.statuses.iter().map(|s| s.as_str()).collect();
        query
            .push(" AND status = ANY(")
            .push_bind(statuses)
            .push(")");
    }
}

// ---------------------------------------------------------------------------------------
// Statements used inside write transactions
// ---------------------------------------------------------------------------------------

async fn write_job(
    conn: &mut PgConnection,
    job: &JobRecord,
    insert: bool,
    owner: &str,
) -> StoreResult<()> {
    let sql = if insert {
        "INSERT INTO jobs (script, state, params, node, submitted_by, created_at, started_at,
            finished_at, exit_code, signal, reason, return_values, results, spec, pid, server,
            name)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    } else {
        "UPDATE jobs SET (script, state, params, node, submitted_by, created_at, started_at,
            finished_at, exit_code, signal, reason, return_values, results, spec, pid, server)
            = ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         WHERE name = $17"
    };
    let done = sqlx::query(sql)
        .bind(&job.script)
        .bind(job.state.as_str())
        .bind(json(&job.params))
        .bind(&job.node)
        .bind(&job.submitted_by)
        .bind(nanos(job.created_at))
        .bind(job.started_at.map(nanos))
        .bind(job.finished_at.map(nanos))
        .bind(job.exit_code)
        .bind(job.signal)
        .bind(&job.reason)
        .bind(json(&job.return_values))
        .bind(json(&job.results))
        .bind(job.spec.to_string())
        .bind(job.pid.map(i64::from))
        .bind(job.server.as_deref().unwrap_or(owner))
        .bind(&job.name)
        .execute(&mut *conn)
        .await
        .map_err(conflict(format!("job {}", job.name)))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("job {}", job.name)));
    }
    Ok(())
}

async fn insert_output(
    conn: &mut PgConnection,
    job: &str,
    chunks: &[LogChunkBytes],
) -> StoreResult<()> {
    for group in chunks.chunks(ROWS_PER_INSERT) {
        let mut builder: QueryBuilder<Postgres> =
            QueryBuilder::new("INSERT INTO job_output (job, seq, stream, data) ");
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

async fn put_task(conn: &mut PgConnection, task: &TaskRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO tasks (job, id, seq, state, node, data) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (job, id) DO UPDATE SET state = excluded.state, node = excluded.node,
            data = excluded.data",
    )
    .bind(&task.task.job)
    .bind(&task.task.id)
    .bind(task.seq)
    .bind(task.task.state.as_str())
    .bind(&task.task.node)
    .bind(serde_json::to_string(task).map_err(|e| StoreError::Corrupt(e.to_string()))?)
    .execute(conn)
    .await?;
    Ok(())
}

/// A write's value, of the type its caller asked for.
fn downcast<T: 'static>(value: Box<dyn Any + Send>) -> StoreResult<T> {
    value
        .downcast::<T>()
        .map(|v| *v)
        .map_err(|_| StoreError::Corrupt("a write answered a value of another type".into()))
}

/// Inserts messages, in one statement of arrays (one prepared statement whatever the
/// count, unlike a multi-row `VALUES`).
async fn insert_rows(conn: &mut PgConnection, messages: &[&MessageRecord]) -> StoreResult<()> {
    // One array per column.
    let col = |f: fn(&MessageRecord) -> Option<i64>| -> Vec<Option<i64>> {
        messages.iter().map(|m| f(m)).collect()
    };
    let text = |f: for<'m> fn(&'m MessageRecord) -> &'m str| -> Vec<&str> {
        messages.iter().map(|m| f(m)).collect()
    };
    let tries = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    sqlx::query(
        "INSERT INTO messages (id, source, destination, status, kind,
            payload_type, payload, tries, max_tries, created_at, updated_at,
            scheduled_at, processing_at, processed_at, lease_until, due_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::text[], $7::bytea[], $8::int4[], $9::int4[], $10::int8[], $11::int8[],
            $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[])",
    )
    .bind(text(|m| &m.id))
    .bind(text(|m| &m.source))
    .bind(text(|m| &m.destination))
    .bind(text(|m| m.status.as_str()))
    .bind(text(|m| m.kind.as_str()))
    .bind(text(|m| &m.payload_type))
    .bind(
        messages
            .iter()
            .map(|m| m.payload.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(messages.iter().map(|m| tries(m.tries)).collect::<Vec<_>>())
    .bind(
        messages
            .iter()
            .map(|m| m.max_tries.map(tries))
            .collect::<Vec<_>>(),
    )
    .bind(col(|m| Some(ms(m.created_at))))
    .bind(col(|m| m.updated_at.map(ms)))
    .bind(col(|m| m.scheduled_at.map(ms)))
    .bind(col(|m| m.processing_at.map(ms)))
    .bind(col(|m| m.processed_at.map(ms)))
    .bind(col(|m| m.lease_until.map(ms)))
    .bind(col(due_at))
    .execute(&mut *conn)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Conflict("message id".into())
        }
        e => e.into(),
    })?;
    Ok(())
}

/// Marks processed the messages named (`ids[n]` in queue `destinations[n]`, acked at
/// `at[n]` ms) that are being processed; returns them.
async fn ack_rows(
    conn: &mut PgConnection,
    ids: &[&str],
    destinations: &[&str],
    at: &[i64],
) -> StoreResult<Vec<MessageRecord>> {
    let rows = sqlx::query(
        "UPDATE messages m SET status = 'processed', processed_at = a.at,
            updated_at = a.at, lease_until = NULL, due_at = NULL
         FROM (SELECT DISTINCT ON (id, destination) id, destination, at
               FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS u(id, destination, at)) a
         WHERE m.id = a.id AND m.destination = a.destination AND m.status = 'processing'
         RETURNING m.*",
    )
    .bind(ids)
    .bind(destinations)
    .bind(at)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(message_from_row).collect()
}

fn due_at(m: &MessageRecord) -> Option<i64> {
    match m.status {
        MessageStatus::Pending => Some(ms(m.created_at)),
        MessageStatus::Scheduled => m.scheduled_at.map(ms),
        MessageStatus::Processing => m.lease_until.map(ms),
        MessageStatus::Processed | MessageStatus::Dead => None,
    }
}

/// What one claim took (in order), with its events.
type Claimed = (Vec<MessageRecord>, Vec<NewEvent>);

/// Settles expired leases and claims for several queues, in one statement; the
/// queues must differ. Answers each claim's messages and events, in the order given.
///
/// An expired lease is a candidate like a pending message (at its place by creation
/// time), unless it is out of tries: then it goes dead. Expired messages not taken now
/// go back to pending. A claim's events are those of settling first and claiming after:
/// `requeued` or `dead` for every expired message, then `pulled` for every claimed one.
async fn claim(
    conn: &mut PgConnection,
    claims: &[(Claim, MessageEvent)],
) -> StoreResult<Vec<Claimed>> {
    let destinations: Vec<&str> = claims.iter().map(|(c, _)| c.destination.as_str()).collect();
    let now: Vec<i64> = claims.iter().map(|(c, _)| ms(c.now)).collect();
    let take: Vec<i64> = claims
        .iter()
        .map(|(c, _)| i64::from(c.max.max(1)))
        .collect();
    let lease: Vec<Option<i64>> = claims.iter().map(|(c, _)| c.lease_until.map(ms)).collect();
    // Each kind of candidate is locked in its own index order, skipping what another
    // claim holds; the oldest of all are taken. Candidates locked but not taken stay
    // locked only until this commit. `claimed` and `settled` update disjoint rows.
    let rows = sqlx::query(
        "WITH r AS (
            SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[])
                AS r(destination, at_ms, take, lease_ms)
         ), expired AS (
            SELECT x.* FROM r CROSS JOIN LATERAL (
                SELECT seq, destination, created_at,
                       (max_tries IS NOT NULL AND tries >= max_tries) AS dies
                FROM messages
                WHERE destination = r.destination AND status = 'processing'
                      AND due_at <= r.at_ms
                ORDER BY due_at LIMIT $5 FOR UPDATE SKIP LOCKED
            ) x
         ), p AS (
            SELECT x.* FROM r CROSS JOIN LATERAL (
                SELECT seq, destination, created_at, false AS was FROM messages
                WHERE destination = r.destination AND status = 'pending'
                ORDER BY due_at, seq LIMIT r.take FOR UPDATE SKIP LOCKED
            ) x
         ), s AS (
            SELECT x.* FROM r CROSS JOIN LATERAL (
                SELECT seq, destination, created_at, false AS was FROM messages
                WHERE destination = r.destination AND status = 'scheduled'
                      AND due_at <= r.at_ms
                ORDER BY created_at, seq LIMIT r.take FOR UPDATE SKIP LOCKED
            ) x
         ), c AS (
            SELECT u.seq, u.was, r.at_ms, r.lease_ms FROM (
                SELECT a.*, row_number() OVER (
                    PARTITION BY a.destination ORDER BY a.created_at, a.seq) AS k
                FROM (SELECT * FROM p UNION ALL SELECT * FROM s
                      UNION ALL SELECT seq, destination, created_at, true
                                FROM expired WHERE NOT dies) a
            ) u JOIN r ON r.destination = u.destination
            WHERE u.k <= r.take
         ), claimed AS (
            UPDATE messages m SET status = 'processing', tries = m.tries + 1,
                processing_at = c.at_ms, updated_at = c.at_ms,
                lease_until = c.lease_ms, due_at = c.lease_ms
            FROM c WHERE m.seq = c.seq
            RETURNING m.*, c.was AS requeued, true AS taken
         ), settled AS (
            UPDATE messages m SET
                status = CASE WHEN e.dies THEN 'dead' ELSE 'pending' END,
                due_at = CASE WHEN e.dies THEN NULL ELSE m.created_at END,
                lease_until = NULL, updated_at = r.at_ms
            FROM expired e JOIN r ON r.destination = e.destination
            WHERE m.seq = e.seq AND NOT EXISTS (SELECT 1 FROM c WHERE c.seq = e.seq)
            RETURNING m.*, false AS requeued, false AS taken
         )
         SELECT * FROM settled UNION ALL SELECT * FROM claimed",
    )
    .bind(&destinations)
    .bind(&now)
    .bind(&take)
    .bind(&lease)
    .bind(SETTLE_BATCH)
    .fetch_all(&mut *conn)
    .await?;
    let index: HashMap<&str, usize> = destinations
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, i))
        .collect();
    let mut settled: Vec<Vec<(i64, MessageRecord)>> = claims.iter().map(|_| Vec::new()).collect();
    let mut taken: Vec<Vec<(i64, MessageRecord)>> = claims.iter().map(|_| Vec::new()).collect();
    for row in &rows {
        let seq: i64 = row.try_get("seq")?;
        let message = message_from_row(row)?;
        let Some(&i) = index.get(message.destination.as_str()) else {
            return Err(StoreError::Corrupt(format!(
                "a claim returned message {} of another queue",
                message.id
            )));
        };
        if row.try_get::<bool, _>("taken")? {
            if row.try_get::<bool, _>("requeued")? {
                // As it was between settling and claiming.
                let mut requeued = message.clone();
                requeued.status = MessageStatus::Pending;
                requeued.tries = requeued.tries.saturating_sub(1);
                settled[i].push((seq, requeued));
            }
            taken[i].push((seq, message));
        } else {
            settled[i].push((seq, message));
        }
    }
    let mut answers = Vec::with_capacity(claims.len());
    for (((_, event), settled), taken) in claims.iter().zip(settled).zip(taken) {
        let mut events = Vec::new();
        for (_, message) in in_order(settled) {
            let name = if message.status == MessageStatus::Dead {
                "dead"
            } else {
                "requeued"
            };
            events.push(event(name, &message));
        }
        let claimed: Vec<MessageRecord> = in_order(taken).into_iter().map(|(_, m)| m).collect();
        for message in &claimed {
            events.push(event("pulled", message));
        }
        answers.push((claimed, events));
    }
    Ok(answers)
}

/// Messages by creation time, then by insertion.
fn in_order(mut keyed: Vec<(i64, MessageRecord)>) -> Vec<(i64, MessageRecord)> {
    keyed.sort_by(|(a_seq, a), (b_seq, b)| (a.created_at, a_seq).cmp(&(b.created_at, b_seq)));
    keyed
}

async fn write_model(
    conn: &mut PgConnection,
    write: &ModelWrite,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    for doc in &write.put {
        sqlx::query(
            "INSERT INTO model (kind, id, data) VALUES ($1, $2, $3)
             ON CONFLICT (kind, id) DO UPDATE SET data = excluded.data",
        )
        .bind(&doc.kind)
        .bind(&doc.id)
        .bind(doc.data.to_string())
        .execute(&mut *conn)
        .await?;
    }
    for (kind, id) in &write.remove {
        sqlx::query("DELETE FROM model WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    for (name, next) in &write.sequences {
        sqlx::query(
            "INSERT INTO model_sequences (name, next) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET next = excluded.next",
        )
        .bind(name)
        .bind(*next as i64)
        .execute(&mut *conn)
        .await?;
    }
    events.extend(write.events.iter().cloned());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------

#[async_trait]
impl Store for PgStore {
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    fn owner(&self) -> Option<&str> {
        Some(&self.owner)
    }

    async fn lock(&self, name: &str) -> StoreResult<StoreLock> {
        let key = lock_key(&self.channel, name);
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(StoreLock::new(Box::new(AdvisoryLock {
            conn: Some(conn),
            key,
        })))
    }

    async fn signal(&self, topic: &str, message: &str) -> StoreResult<()> {
        if topic.contains(':') {
            return Err(StoreError::Invalid(format!(
                "signal topic '{topic}' has a ':'"
            )));
        }
        // NOTIFY payloads are limited to 8000 bytes.
        if topic.len() + message.len() > 7000 {
            return Err(StoreError::Invalid("signal too long".into()));
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(format!("s:{topic}:{message}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn signals(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    async fn current_revision(&self) -> StoreResult<u64> {
        read_revision(&self.pool).await
    }

    async fn events_since(&self, since: u64, limit: u32) -> StoreResult<EventsSince> {
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        // One statement, one snapshot: the compaction mark and the rows agree.
        let rows = sqlx::query(
            "SELECT m.value AS compacted, e.rev, e.at, e.kind, e.subject, e.data
             FROM meta m LEFT JOIN LATERAL (
                SELECT * FROM events WHERE rev > $1 ORDER BY rev LIMIT $2
             ) e ON TRUE
             WHERE m.key = 'compacted_through'",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let compacted: i64 = match rows.first() {
            Some(row) => row.try_get("compacted")?,
            None => return Err(StoreError::Corrupt("meta has no compaction mark".into())),
        };
        if since < compacted {
            let current = read_revision(&self.pool).await?;
            return Ok(EventsSince::Gone { current });
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>("rev")?.is_some() {
                events.push(event_from_row(row)?);
            }
        }
        Ok(EventsSince::Events(events))
    }

    async fn append_event(&self, event: NewEvent) -> StoreResult<Event> {
        self.write_event(move |_, events| {
            Box::pin(async move {
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    async fn compact_events(&self, keep: u64) -> StoreResult<u64> {
        let (dropped, _) = self
            .write(move |conn, _| {
                Box::pin(async move {
                    let newest = read_revision(&mut *conn).await? as i64;
                    let cut = newest.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
                    if cut <= 0 {
                        return Ok(0);
                    }
                    let dropped = sqlx::query("DELETE FROM events WHERE rev <= $1")
                        .bind(cut)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    sqlx::query(
                        "UPDATE meta SET value = GREATEST(value, $1) WHERE key = 'compacted_through'",
                    )
                    .bind(cut)
                    .execute(&mut *conn)
                    .await?;
                    Ok(dropped)
                })
            })
            .await?;
        Ok(dropped)
    }

    async fn insert_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let owner = self.owner.clone();
        let job = job.clone();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                write_job(conn, &job, true, &owner).await?;
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    async fn update_job(&self, job: &JobRecord, event: NewEvent) -> StoreResult<Event> {
        let owner = self.owner.clone();
        let job = job.clone();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                write_job(conn, &job, false, &owner).await?;
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    async fn write_job(
        &self,
        job: &JobRecord,
        row: JobWrite,
        output: Vec<LogChunkBytes>,
        new_events: Vec<NewEvent>,
    ) -> StoreResult<()> {
        let owner = self.owner.clone();
        let job = job.clone();
        self.write_events(move |conn, events| {
            Box::pin(async move {
                insert_output(conn, &job.name, &output).await?;
                write_job(conn, &job, row == JobWrite::Insert, &owner).await?;
                events.extend(new_events);
                Ok(())
            })
        })
        .await
        .map(drop)
    }

    async fn get_job(&self, name: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR script = $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(filter.state.map(|s| s.as_str()))
        .bind(&filter.script)
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn delete_job(&self, name: &str, event: NewEvent) -> StoreResult<Event> {
        let name = name.to_owned();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                let gone = sqlx::query("DELETE FROM jobs WHERE name = $1")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if gone == 0 {
                    return Err(StoreError::NotFound(format!("job {name}")));
                }
                sqlx::query("DELETE FROM tasks WHERE job = $1")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("DELETE FROM job_output WHERE job = $1")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?;
                events.push(event);
                Ok(())
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
        let owner = self.owner.clone();
        let reason = reason.to_owned();
        self.write_events(move |conn, events| {
            Box::pin(async move {
                // Only this server's own runs: the other servers' are alive. Fan-out
                // jobs carry on with the nodes service.
                let rows = sqlx::query(
                    "UPDATE jobs SET state = 'lost', reason = $1, finished_at = $2
                     WHERE state IN ('queued', 'running')
                       AND (spec::jsonb -> 'fanout') IS NULL
                       AND (server IS NULL OR server = $3)
                     RETURNING *",
                )
                .bind(&reason)
                .bind(nanos(at))
                .bind(&owner)
                .fetch_all(&mut *conn)
                .await?;
                for row in &rows {
                    events.push(event(&job_from_row(row)?));
                }
                Ok(())
            })
        })
        .await
    }

    async fn append_output(&self, job: &str, chunks: Vec<LogChunkBytes>) -> StoreResult<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let job = job.to_owned();
        self.write(move |conn, _| {
            Box::pin(async move { insert_output(conn, &job, &chunks).await })
        })
        .await?;
        Ok(())
    }

    async fn output_since(&self, job: &str, after: u64, limit: u32) -> StoreResult<Vec<LogChunk>> {
        let rows = sqlx::query(
            "SELECT seq, stream, data FROM job_output WHERE job = $1 AND seq > $2
             ORDER BY seq LIMIT $3",
        )
        .bind(job)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let stream: i16 = row.try_get("stream")?;
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
        let rows = sqlx::query("SELECT stream, data FROM job_output WHERE job = $1 ORDER BY seq")
            .bind(job)
            .fetch_all(&self.pool)
            .await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for row in &rows {
            let stream: i16 = row.try_get("stream")?;
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
        let row = sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn delete_user(&self, name: &str, event: NewEvent) -> StoreResult<Event> {
        self.delete_identity("DELETE FROM users WHERE name = $1", name, event)
            .await
    }

    async fn insert_token(&self, token: &TokenRecord, event: NewEvent) -> StoreResult<Event> {
        let token = token.clone();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO tokens (id, secret_hash, role, nodes, description, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&token.id)
                .bind(&token.secret_hash)
                .bind(token.role.as_str())
                .bind(json(&token.nodes))
                .bind(&token.description)
                .bind(nanos(token.created_at))
                .execute(&mut *conn)
                .await
                .map_err(conflict(format!("token {}", token.id)))?;
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    async fn get_token(&self, id: &str) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn delete_token(&self, id: &str, event: NewEvent) -> StoreResult<Event> {
        self.delete_identity("DELETE FROM tokens WHERE id = $1", id, event)
            .await
    }

    async fn count_identities(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM tokens)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn insert_messages(
        &self,
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    ) -> StoreResult<Vec<Event>> {
        Ok(self.submit(Work::Push { messages, event }).await?.1)
    }

    async fn claim_messages(
        &self,
        claim: Claim,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        downcast(self.submit(Work::Claim { claim, event }).await?.0)
    }

    async fn has_deliverable(&self, destination: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE destination = $1 AND status = 'pending')
                 OR EXISTS (SELECT 1 FROM messages WHERE destination = $1
                            AND status = 'scheduled' AND due_at <= $2)
                 OR EXISTS (SELECT 1 FROM messages WHERE destination = $1
                            AND status = 'processing' AND due_at <= $2)",
        )
        .bind(destination)
        .bind(ms(now))
        .fetch_one(&self.pool)
        .await?;
        Ok(found)
    }

    async fn ack_messages(
        &self,
        destination: &str,
        ids: Vec<String>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        let work = Work::Ack {
            destination: destination.to_owned(),
            ids,
            at,
            event,
        };
        downcast(self.submit(work).await?.0)
    }

    async fn update_message_payload(
        &self,
        selector: MessageSelector,
        kind: PayloadKind,
        payload: Vec<u8>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        Ok(self
            .write(move |conn, events| {
                Box::pin(async move {
                    let mut query = QueryBuilder::<Postgres>::new("UPDATE messages SET kind = ");
                    query
                        .push_bind(kind.as_str())
                        .push(", payload = ")
                        .push_bind(payload)
                        .push(", updated_at = ")
                        .push_bind(ms(at));
                    push_selector(&mut query, &selector);
                    query.push(" RETURNING *");
                    let rows = query.build().fetch_all(&mut *conn).await?;
                    let updated = messages_in_order(&rows)?;
                    for message in &updated {
                        events.push(event("updated", message));
                    }
                    Ok(updated)
                })
            })
            .await?
            .0)
    }

    async fn delete_messages(
        &self,
        selector: MessageSelector,
        event: DeleteEvent,
    ) -> StoreResult<u64> {
        Ok(self
            .write(move |conn, events| {
                Box::pin(async move {
                    let mut query = QueryBuilder::<Postgres>::new("DELETE FROM messages");
                    push_selector(&mut query, &selector);
                    query.push(" RETURNING id");
                    let mut ids = Vec::new();
                    let mut count = 0u64;
                    {
                        use futures::TryStreamExt;
                        let built = query.build();
                        let mut rows = built.fetch(&mut *conn);
                        while let Some(row) = rows.try_next().await? {
                            count += 1;
                            if ids.len() < EVENT_IDS {
                                ids.push(row.try_get::<String, _>("id")?);
                            }
                        }
                    }
                    if count > 0 {
                        events.push(event(&ids, count));
                    }
                    Ok(count)
                })
            })
            .await?
            .0)
    }

    async fn get_message(&self, id: &str) -> StoreResult<Option<MessageRecord>> {
        let row = sqlx::query("SELECT * FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    async fn list_messages(&self, selector: &MessageSelector) -> StoreResult<Vec<MessageRecord>> {
        let mut query = QueryBuilder::<Postgres>::new("SELECT * FROM messages");
        push_selector(&mut query, selector);
        query
            .push(" ORDER BY created_at, seq LIMIT ")
            .push_bind(selector.limit.map(i64::from));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn queue_stats(&self, destination: Option<&str>) -> StoreResult<Vec<QueueStats>> {
        let rows = sqlx::query(
            "SELECT destination, status, COUNT(*) AS n, MIN(created_at) AS oldest
             FROM messages WHERE ($1::text IS NULL OR destination = $1)
             GROUP BY destination, status ORDER BY destination",
        )
        .bind(destination)
        .fetch_all(&self.pool)
        .await?;
        let counts = rows
            .iter()
            .map(StatusCount::from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        fold_queue_stats(counts)
    }

    async fn put_node(&self, node: &NodeRecord, event: Option<NewEvent>) -> StoreResult<()> {
        let data = serde_json::to_string(node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let id = node.id.clone();
        self.write(move |conn, events| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO nodes (id, data) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                )
                .bind(&id)
                .bind(&data)
                .execute(&mut *conn)
                .await?;
                events.extend(event);
                Ok(())
            })
        })
        .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        let rows = sqlx::query("SELECT data FROM nodes ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| decode(&row.try_get::<String, _>(0)?, "node"))
            .collect()
    }

    async fn write_tasks(&self, write: TaskWrite) -> StoreResult<()> {
        let owner = self.owner.clone();
        self.write_events(move |conn, events| {
            Box::pin(async move {
                let job_name = write
                    .job
                    .as_ref()
                    .map(|j| j.name.clone())
                    .or_else(|| write.tasks.first().map(|t| t.task.job.clone()));
                if let (false, Some(name)) = (write.output.is_empty(), &job_name) {
                    insert_output(conn, name, &write.output).await?;
                }
                if let Some(job) = &write.job {
                    write_job(conn, job, write.insert_job, &owner).await?;
                }
                for task in &write.tasks {
                    put_task(conn, task).await?;
                }
                events.extend(write.events);
                Ok(())
            })
        })
        .await
        .map(drop)
    }

    async fn job_tasks(&self, job: &str) -> StoreResult<Vec<TaskRecord>> {
        let rows = sqlx::query("SELECT data FROM tasks WHERE job = $1 ORDER BY seq")
            .bind(job)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| decode(&row.try_get::<String, _>(0)?, "task"))
            .collect()
    }

    async fn tasks_in(&self, states: &[TaskState]) -> StoreResult<Vec<TaskRecord>> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query("SELECT data FROM tasks WHERE state = ANY($1) ORDER BY seq")
            .bind(&states)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| decode(&row.try_get::<String, _>(0)?, "task"))
            .collect()
    }

    async fn queued_tasks(&self, per_job: u32) -> StoreResult<Vec<TaskRecord>> {
        // The jobs with queued tasks, one index seek each (a loose index scan), then
        // the first `per_job` queued tasks of each: the cost grows with the jobs and
        // the tasks answered, not with every queued task.
        let rows = sqlx::query(
            "WITH RECURSIVE jobs(job) AS (
                SELECT MIN(job) FROM tasks WHERE state = 'queued'
                UNION ALL
                SELECT (SELECT MIN(job) FROM tasks WHERE state = 'queued' AND job > jobs.job)
                FROM jobs WHERE job IS NOT NULL
             )
             SELECT t.data FROM jobs CROSS JOIN LATERAL (
                SELECT data, seq FROM tasks WHERE state = 'queued' AND job = jobs.job
                ORDER BY seq LIMIT $1) t
             ORDER BY t.seq",
        )
        .bind(i64::from(per_job))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| decode(&row.try_get::<String, _>(0)?, "task"))
            .collect()
    }

    async fn get_task(&self, job: &str, id: &str) -> StoreResult<Option<TaskRecord>> {
        let row = sqlx::query("SELECT data FROM tasks WHERE job = $1 AND id = $2")
            .bind(job)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| decode(&row.try_get::<String, _>(0)?, "task"))
            .transpose()
    }

    async fn delete_tasks(&self, job: &str) -> StoreResult<()> {
        let job = job.to_owned();
        self.write(move |conn, _| {
            Box::pin(async move {
                sqlx::query("DELETE FROM tasks WHERE job = $1")
                    .bind(&job)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .await?;
        Ok(())
    }

    async fn snapshot(&self, path: &std::path::Path) -> StoreResult<()> {
        super::copy::to_sqlite(self, path).await
    }

    async fn load_model(&self) -> StoreResult<ModelData> {
        let mut tx = self.pool.begin().await?;
        // One snapshot: the documents and the revision agree.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query("SELECT kind, id, data FROM model ORDER BY kind, id")
            .fetch_all(&mut *tx)
            .await?;
        let mut data = ModelData::default();
        for row in rows {
            let kind: String = row.try_get(0)?;
            let id: String = row.try_get(1)?;
            let value = decode(&row.try_get::<String, _>(2)?, &format!("model {kind} {id}"))?;
            data.docs.push(ModelDoc {
                kind,
                id,
                data: value,
            });
        }
        for row in sqlx::query("SELECT name, next FROM model_sequences")
            .fetch_all(&mut *tx)
            .await?
        {
            let next: i64 = row.try_get(1)?;
            data.sequences.insert(row.try_get(0)?, next.max(0) as u64);
        }
        data.revision = read_revision(&mut *tx).await?;
        tx.commit().await?;
        Ok(data)
    }

    async fn write_model(&self, write: ModelWrite) -> StoreResult<Vec<Event>> {
        self.write_events(move |conn, events| {
            Box::pin(async move { write_model(conn, &write, events).await })
        })
        .await
    }
}

impl PgStore {
    async fn write_user(
        &self,
        user: &UserRecord,
        event: NewEvent,
        replace: bool,
    ) -> StoreResult<Event> {
        let user = user.clone();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                let sql = if replace {
                    "INSERT INTO users (name, password_hash, role, created_at, source)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                        role = excluded.role, source = excluded.source"
                } else {
                    "INSERT INTO users (name, password_hash, role, created_at, source)
                     VALUES ($1, $2, $3, $4, $5)"
                };
                sqlx::query(sql)
                    .bind(&user.name)
                    .bind(&user.password_hash)
                    .bind(user.role.as_str())
                    .bind(nanos(user.created_at))
                    .bind(&user.source)
                    .execute(&mut *conn)
                    .await
                    .map_err(conflict(format!("user {}", user.name)))?;
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    async fn delete_identity(
        &self,
        sql: &'static str,
        key: &str,
        event: NewEvent,
    ) -> StoreResult<Event> {
        let key = key.to_owned();
        self.write_event(move |conn, events| {
            Box::pin(async move {
                let gone = sqlx::query(sql)
                    .bind(&key)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if gone == 0 {
                    return Err(StoreError::NotFound(key));
                }
                events.push(event);
                Ok(())
            })
        })
        .await
    }

    /// The connection pool, for the store copier.
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL only: runs when `OPSBOX_TEST_STORE` names a database (test.sh does).
    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = crate::store::test_store(dir.path()) else {
            eprintln!("not run here: OPSBOX_TEST_STORE is not set (test.sh sets it)");
            return;
        };
        let store = PgStore::open(&url, "test").await.unwrap();
        fn boom<'c>(
            _: &'c mut PgConnection,
            _: &'c mut Vec<NewEvent>,
        ) -> BoxFuture<'c, StoreResult<()>> {
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

    /// PostgreSQL only. The writer keeps one connection of its own; when the database
    /// closes it (a restart, an administrator's `pg_terminate_backend`), writes go on.
    #[tokio::test]
    async fn writes_go_on_after_the_database_closes_the_writers_connection() {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = crate::store::test_store(dir.path()) else {
            eprintln!("not run here: OPSBOX_TEST_STORE is not set (test.sh sets it)");
            return;
        };
        let name = format!("opsbox_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        let store = PgStore::open(&format!("{url}&application_name={name}"), "test")
            .await
            .unwrap();
        let event = |kind: &str| NewEvent::new(kind, "s", serde_json::json!({}));
        store.append_event(event("t.before")).await.unwrap();
        let closed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert!(closed.iter().filter(|c| **c).count() >= 1, "{closed:?}");
        tokio::time::sleep(writer::IDLE_CHECK + Duration::from_millis(200)).await;
        let after = store.append_event(event("t.after")).await.unwrap();
        let EventsSince::Events(seen) = store.events_since(0, 10).await.unwrap() else {
            panic!("events compacted away");
        };
        let kinds: Vec<&str> = seen.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["t.before", "t.after"]);
        assert_eq!(seen[1].rev, after.rev);
    }
}
