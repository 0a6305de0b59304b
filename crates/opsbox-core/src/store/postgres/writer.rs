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

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use opsbox_api::Event;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Executor;
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
    pub(super) pool: PgPool,
    pub(super) channel: String,
    /// Tells this server's own notifications from other servers'.
    pub(super) instance: String,
    pub(super) bump: Arc<watch::Sender<u64>>,
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
    pub(super) async fn run(self, mut requests: mpsc::Receiver<WriteRequest>) {
        while let Some(batch) = next_batch(&mut requests).await {
            self.commit(batch).await;
        }
    }

    /// Runs a batch and answers each of its writes.
    async fn commit(&self, batch: Vec<WriteRequest>) {
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

    // Boxed: spawning an unboxed future that calls the ops trips the compiler's
    // higher-ranked `Send` check (rust-lang/rust#100013).
    fn transaction(
        &self,
        works: Vec<Work>,
    ) -> BoxFuture<'_, StoreResult<(Vec<Outcome>, Vec<Event>)>> {
        Box::pin(async move {
            // Generic plans: a batch's statements are the same few each time, and
            // planning them anew (PostgreSQL's default for the first runs, and for
            // array parameters) cost more than running them (queues-pg: 3.5k→3.9k/s).
            let mut tx = self
                .pool
                .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
                .await?;
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
                    .bind(&self.channel)
                    .bind(format!("c:{}:0", self.instance))
                    .execute(&mut *tx)
                    .await?;
                Vec::new()
            } else {
                append_events(&mut tx, &self.channel, &self.instance, pending).await?
            };
            tx.commit().await?;
            let outcomes = outcomes
                .into_iter()
                .map(|o| o.ok_or_else(|| StoreError::Corrupt("a write was not run".into())))
                .collect::<StoreResult<_>>()?;
            Ok((outcomes, events))
        })
    }
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
fn next_batch(
    requests: &mut mpsc::Receiver<WriteRequest>,
) -> BoxFuture<'_, Option<Vec<WriteRequest>>> {
    // Boxed for the same reason as `Writer::transaction`.
    Box::pin(async move {
        let first = requests.recv().await?;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        Some(batch)
    })
}
