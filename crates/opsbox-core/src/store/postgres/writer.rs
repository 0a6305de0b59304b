//! Group commit for one server: the writes waiting at a moment share one transaction.
//!
//! The events of every write go through the `meta.revision` row, locked from the append
//! until the commit's WAL flush (see the store's module docs): with one transaction per
//! write, writes would commit one flush after another, whatever PostgreSQL's own group
//! commit could share. So a [`Writer`] takes the writes waiting at that moment and runs
//! them in one transaction: each in a savepoint (a write that fails is rolled back alone
//! and answered with its own error), their events appended in one statement, one notify,
//! one commit, one flush. While a batch commits, the next one gathers.
//!
//! One writer per server, measured (benches/README.md, queues-pg): with two or four,
//! each batch was smaller, they queued on the counter anyway, and PostgreSQL spent
//! half as much CPU again per message.
//!
//! The queue's hot writes are data, not closures: all pushes of a batch go in one
//! multi-row `INSERT` and all acks in one `UPDATE` (a conflicting push falls back to one
//! statement per push, so only it fails), and all claims in one statement too.
//!
//! No library does this for sqlx; it is the same group commit as the SQLite writer's.

use std::any::Any;
use std::collections::HashMap;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use opsbox_api::Event;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor};
use tokio::sync::{mpsc, oneshot, watch};

use super::{ack_rows, append_events, insert_rows, MAX_BATCH};
use crate::store::{Claim, MessageEvent, MessageRecord, NewEvent, StoreError, StoreResult};

/// One write's work, its value type erased so that writes of all kinds share a batch.
pub(super) type Op = Box<
    dyn for<'c> FnOnce(
            &'c mut PgConnection,
            &'c mut Vec<NewEvent>,
        ) -> BoxFuture<'c, StoreResult<Box<dyn Any + Send>>>
        + Send,
>;

/// What a write asks for.
pub(super) enum Work {
    /// Any write; answers the value its closure returns.
    Op(Op),
    /// Stores messages; answers `()`.
    Push {
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    },
    /// Claims messages (see `claim`); answers the claimed `Vec<MessageRecord>`.
    Claim { claim: Claim, event: MessageEvent },
    /// Acks messages of one queue that are being processed; answers the acked
    /// `Vec<MessageRecord>` in the order asked for.
    Ack {
        destination: String,
        ids: Vec<String>,
        at: DateTime<Utc>,
        event: MessageEvent,
    },
}

pub(super) type WriteAnswer = StoreResult<(Box<dyn Any + Send>, Vec<Event>)>;

/// A write waiting for a writer.
pub(super) struct WriteRequest {
    pub(super) work: Work,
    pub(super) reply: oneshot::Sender<WriteAnswer>,
}

/// A server's writer task.
pub(super) struct Writer {
    /// How to connect (the pool's options: its schema, its TLS).
    pub(super) options: PgConnectOptions,
    /// Its own connection (see [`Writer::connect`]), `None` until the first batch
    /// and after a failure that may have broken it.
    pub(super) conn: Option<PgConnection>,
    /// When it last ran a batch.
    pub(super) used: Instant,
    pub(super) replan: Replan,
    pub(super) channel: String,
    /// Tells this server's own notifications from other servers'.
    pub(super) instance: String,
    pub(super) bump: Arc<watch::Sender<u64>>,
}

/// When the writer next drops its cached plans: after 250 ms, then twice as long each
/// time, up to a minute.
///
/// A generic plan is made once per connection, for the tables as they were then: made
/// on an empty queue table, the ack's plan walked the whole claim index instead of
/// looking ids up, slower with every message stored (queues-pg on a new database, one
/// connection kept: 2.3k messages/s; with this schedule 4.2k). PostgreSQL drops plans
/// itself when `ANALYZE` changes a table's statistics, but autovacuum, which runs it
/// unasked, can be off (it is off on this machine kind); dropping them on a schedule
/// makes them follow the tables either way.
pub(super) struct Replan {
    next: Instant,
    every: Duration,
}

impl Replan {
    const FIRST: Duration = Duration::from_millis(250);
    const MOST: Duration = Duration::from_secs(60);

    pub(super) fn new() -> Self {
        Replan {
            next: Instant::now() + Self::FIRST,
            every: Self::FIRST,
        }
    }

    /// Whether the plans are to be dropped now (then the next time is set).
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.every = (self.every * 2).min(Self::MOST);
        self.next = now + self.every;
        true
    }
}

/// How one write of a batch ended before the commit.
enum Outcome {
    /// Its value and the range of its events among the batch's.
    Done(Box<dyn Any + Send>, Range<usize>),
    Failed(StoreError),
}

/// The savepoint `w` that isolates each write of a batch from the others.
struct Savepoint {
    /// A lone write needs none: if it fails, the whole transaction goes.
    needed: bool,
    opened: bool,
    /// Whether `w` holds nothing yet (just set, or rolled back to).
    clean: bool,
}

impl Savepoint {
    async fn before(&mut self, conn: &mut PgConnection) -> StoreResult<()> {
        if !self.needed || self.clean {
            return Ok(());
        }
        // One round trip: keep the last write's changes, open the next's.
        let sql = if self.opened {
            "RELEASE SAVEPOINT w; SAVEPOINT w"
        } else {
            "SAVEPOINT w"
        };
        conn.execute(sql).await?;
        self.opened = true;
        self.clean = true;
        Ok(())
    }

    fn kept(&mut self) {
        self.clean = !self.needed;
    }

    /// Undoes the write since [`Savepoint::before`]; without a savepoint, the error
    /// ends the transaction.
    async fn undo(&mut self, conn: &mut PgConnection, error: StoreError) -> StoreResult<Outcome> {
        if !self.needed {
            return Err(error);
        }
        conn.execute("ROLLBACK TO SAVEPOINT w").await?;
        self.clean = true;
        Ok(Outcome::Failed(error))
    }
}

/// A copy of an error for the other writes of a batch that failed as a whole.
fn shared_failure(reason: &str) -> StoreError {
    StoreError::Failed(format!(
        "the transaction shared with other writes failed: {reason}"
    ))
}

impl Writer {
    /// Starts the writer on a thread of its own, with a runtime of its own: on the
    /// server's runtime, each answer from the database waited for a worker busy with
    /// HTTP requests before the next statement went out, and the writer, which every
    /// queue write waits for, was idle in its transaction a third of the time
    /// (`pg_stat_activity` under queues-pg). It ends when every store handle is gone.
    pub(super) fn start(self, requests: mpsc::Receiver<WriteRequest>) -> StoreResult<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(format!("cannot start the store writer: {e}")))?;
        std::thread::Builder::new()
            .name("opsbox-pg-writer".into())
            .spawn(move || runtime.block_on(self.run(requests)))
            .map_err(|e| StoreError::Failed(format!("cannot start the store writer: {e}")))?;
        Ok(())
    }

    async fn run(mut self, mut requests: mpsc::Receiver<WriteRequest>) {
        while let Some(batch) = next_batch(&mut requests).await {
            self.commit(batch).await;
        }
    }

    /// Runs a batch and answers each of its writes.
    async fn commit(&mut self, batch: Vec<WriteRequest>) {
        let (works, replies): (Vec<Work>, Vec<_>) =
            batch.into_iter().map(|r| (r.work, r.reply)).unzip();
        match self.transaction(works).await {
            Ok((outcomes, events)) => {
                let newest = events.last().map_or(0, |e| e.rev);
                // Sent even without events: followers of job output wake on every commit.
                self.bump.send_modify(|rev| *rev = (*rev).max(newest));
                let mut events: Vec<Option<Event>> = events.into_iter().map(Some).collect();
                for (outcome, reply) in outcomes.into_iter().zip(replies) {
                    let answer = match outcome {
                        Outcome::Done(value, range) => {
                            let mine = events[range].iter_mut().filter_map(Option::take);
                            Ok((value, mine.collect()))
                        }
                        Outcome::Failed(error) => Err(error),
                    };
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                // Nothing of the batch was committed; every write hears why.
                let reason = error.to_string();
                let mut replies = replies.into_iter();
                if let Some(first) = replies.next() {
                    let _ = first.send(Err(error));
                }
                for reply in replies {
                    let _ = reply.send(Err(shared_failure(&reason)));
                }
            }
        }
    }

    /// Makes sure the writer has a connection of its own (not the pool's: the pool
    /// checks a connection with a round trip at every acquire, one more per batch,
    /// [`Replan`] needs the same connection each time, and a connection belongs to
    /// the runtime that opened it). One that sat idle is checked first, as the pool
    /// would: the database may have closed it meanwhile.
    async fn connect(&mut self) -> StoreResult<()> {
        if let Some(conn) = self.conn.as_mut() {
            if self.used.elapsed() >= IDLE_CHECK && conn.ping().await.is_err() {
                tracing::debug!("the store writer's connection was closed; reconnecting");
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let mut conn = PgConnection::connect_with(&self.options).await?;
            // Generic plans: a batch's statements are the same few each time, and
            // planning them anew (PostgreSQL's default for the first runs, and for
            // array parameters) cost more than running them (queues-pg: 3.5k→3.9k/s).
            conn.execute("SET plan_cache_mode = force_generic_plan")
                .await?;
            self.conn = Some(conn);
        }
        Ok(())
    }

    /// Runs a batch in one transaction on the writer's connection. After a failure
    /// the connection is not used again: a failed commit leaves it in a state unknown.
    async fn transaction(&mut self, works: Vec<Work>) -> StoreResult<(Vec<Outcome>, Vec<Event>)> {
        self.connect().await?;
        let begin = if self.replan.due() {
            "DISCARD PLANS; BEGIN"
        } else {
            "BEGIN"
        };
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| StoreError::Failed("the store writer has no connection".into()))?;
        let done = run(conn, begin, &self.channel, &self.instance, works).await;
        self.used = Instant::now();
        if done.is_err() {
            self.conn = None;
        }
        done
    }
}

/// How long the writer's connection may sit idle before it is checked.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Runs a batch in one transaction (opened with `begin`) and commits it.
async fn run(
    conn: &mut PgConnection,
    begin: &'static str,
    channel: &str,
    instance: &str,
    works: Vec<Work>,
) -> StoreResult<(Vec<Outcome>, Vec<Event>)> {
    let mut tx = conn.begin_with(begin).await?;
    let mut point = Savepoint {
        needed: works.len() > 1,
        opened: false,
        clean: false,
    };
    let mut outcomes: Vec<Option<Outcome>> = works.iter().map(|_| None).collect();
    let mut pending: Vec<NewEvent> = Vec::new();
    let mut pushes = Vec::new();
    let mut acks = Vec::new();
    let mut claims = Vec::new();
    for (i, work) in works.into_iter().enumerate() {
        match work {
            Work::Op(op) => {
                point.before(&mut tx).await?;
                let mut events = Vec::new();
                // A write that panics fails alone; the writer, which every
                // other write needs, goes on.
                let run = AssertUnwindSafe(op(&mut tx, &mut events)).catch_unwind();
                let result = run.await.unwrap_or_else(|_| {
                    tracing::error!("a store write panicked; rolled back");
                    Err(StoreError::Corrupt(
                        "the write stopped half-way (a bug in the store) and was \
                         rolled back"
                            .into(),
                    ))
                });
                outcomes[i] = Some(match result {
                    Ok(value) => {
                        point.kept();
                        Outcome::Done(value, take_events(&mut pending, events))
                    }
                    Err(error) => point.undo(&mut tx, error).await?,
                });
            }
            Work::Claim { claim, event } => claims.push((i, (claim, event))),
            Work::Push { messages, event } => pushes.push((i, messages, event)),
            Work::Ack {
                destination,
                ids,
                at,
                event,
            } => acks.push((i, destination, ids, at, event)),
        }
    }
    push(&mut tx, &mut point, pushes, &mut outcomes, &mut pending).await?;
    claim(&mut tx, &mut point, claims, &mut outcomes, &mut pending).await?;
    ack(&mut tx, &mut point, acks, &mut outcomes, &mut pending).await?;
    let events = if pending.is_empty() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(format!("c:{}:0", instance))
            .execute(&mut *tx)
            .await?;
        Vec::new()
    } else {
        append_events(&mut tx, channel, instance, pending).await?
    };
    tx.commit().await?;
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Corrupt("a write was not run".into())))
        .collect::<StoreResult<_>>()?;
    Ok((outcomes, events))
}

/// Moves a write's events to the batch's; returns where they are.
fn take_events(pending: &mut Vec<NewEvent>, mut events: Vec<NewEvent>) -> Range<usize> {
    let start = pending.len();
    pending.append(&mut events);
    start..pending.len()
}

type PushWork = (usize, Vec<MessageRecord>, MessageEvent);

/// All pushes of a batch in one statement; if that fails (a message id taken, say),
/// one statement per push, so that only the failing ones fail.
async fn push(
    conn: &mut PgConnection,
    point: &mut Savepoint,
    pushes: Vec<PushWork>,
    outcomes: &mut [Option<Outcome>],
    pending: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    if pushes.is_empty() {
        return Ok(());
    }
    if pushes.len() > 1 {
        point.before(conn).await?;
        let all: Vec<&MessageRecord> = pushes.iter().flat_map(|(_, m, _)| m).collect();
        match insert_rows(conn, &all).await {
            Ok(()) => {
                point.kept();
                for (i, messages, event) in &pushes {
                    let events = messages.iter().map(|m| event("pushed", m)).collect();
                    let range = take_events(pending, events);
                    outcomes[*i] = Some(Outcome::Done(Box::new(()), range));
                }
                return Ok(());
            }
            Err(error) => {
                // Rolled back; each push on its own below.
                point.undo(conn, error).await?;
            }
        }
    }
    for (i, messages, event) in pushes {
        point.before(conn).await?;
        let all: Vec<&MessageRecord> = messages.iter().collect();
        outcomes[i] = Some(match insert_rows(conn, &all).await {
            Ok(()) => {
                point.kept();
                let events = messages.iter().map(|m| event("pushed", m)).collect();
                Outcome::Done(Box::new(()), take_events(pending, events))
            }
            Err(error) => point.undo(conn, error).await?,
        });
    }
    Ok(())
}

/// The claims of a batch, after its pushes (a pull may take what was pushed along with
/// it): one statement for all queues, and one more for each further claim on a queue
/// already claimed from. No savepoint of their own: a claim skips what is locked, so it
/// fails only when the database does, and then so does the batch.
async fn claim(
    conn: &mut PgConnection,
    point: &mut Savepoint,
    mut claims: Vec<(usize, (Claim, MessageEvent))>,
    outcomes: &mut [Option<Outcome>],
    pending: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    while !claims.is_empty() {
        // The first claim of each queue now; the others in a later round.
        let mut seen = std::collections::HashSet::new();
        let (now, later): (Vec<_>, Vec<_>) = claims
            .into_iter()
            .partition(|(_, (c, _))| seen.insert(c.destination.clone()));
        claims = later;
        let (slots, work): (Vec<usize>, Vec<(Claim, MessageEvent)>) = now.into_iter().unzip();
        let answers = super::claim(conn, &work).await?;
        point.kept();
        for (i, (claimed, events)) in slots.into_iter().zip(answers) {
            let range = take_events(pending, events);
            outcomes[i] = Some(Outcome::Done(Box::new(claimed), range));
        }
    }
    Ok(())
}

type AckWork = (usize, String, Vec<String>, DateTime<Utc>, MessageEvent);

/// All acks of a batch in one statement. A message named by two acks is acked by the
/// first of them only, as if they had run one after the other.
async fn ack(
    conn: &mut PgConnection,
    point: &mut Savepoint,
    acks: Vec<AckWork>,
    outcomes: &mut [Option<Outcome>],
    pending: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    if acks.is_empty() {
        return Ok(());
    }
    point.before(conn).await?;
    let mut rows = (Vec::new(), Vec::new(), Vec::new());
    for (_, destination, ids, at, _) in &acks {
        for id in ids {
            rows.0.push(id.as_str());
            rows.1.push(destination.as_str());
            rows.2.push(super::ms(*at));
        }
    }
    let acked = match ack_rows(conn, &rows.0, &rows.1, &rows.2).await {
        Ok(acked) => {
            point.kept();
            acked
        }
        Err(error) => {
            let reason = error.to_string();
            point.undo(conn, error).await?;
            for (i, ..) in acks {
                outcomes[i] = Some(Outcome::Failed(shared_failure(&reason)));
            }
            return Ok(());
        }
    };
    // Each acked message goes to the first ack that named it.
    let mut owner: HashMap<(&str, &str), usize> = HashMap::new();
    for (k, (_, destination, ids, _, _)) in acks.iter().enumerate() {
        for id in ids {
            owner.entry((destination, id)).or_insert(k);
        }
    }
    let mut mine: Vec<Vec<MessageRecord>> = acks.iter().map(|_| Vec::new()).collect();
    for message in acked {
        if let Some(&k) = owner.get(&(message.destination.as_str(), message.id.as_str())) {
            mine[k].push(message);
        }
    }
    for ((i, _, ids, _, event), mut acked) in acks.into_iter().zip(mine) {
        // In the order asked for, as one ack after another would give them.
        let order: HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| (id.as_str(), n))
            .collect();
        acked.sort_by_key(|m| order.get(m.id.as_str()).copied());
        let events = acked.iter().map(|m| event("acked", m)).collect();
        let range = take_events(pending, events);
        outcomes[i] = Some(Outcome::Done(Box::new(acked), range));
    }
    Ok(())
}

/// The writes waiting now (at least one, at most [`MAX_BATCH`]); `None` once every
/// store handle is gone.
async fn next_batch(requests: &mut mpsc::Receiver<WriteRequest>) -> Option<Vec<WriteRequest>> {
    let first = requests.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match requests.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    Some(batch)
}
