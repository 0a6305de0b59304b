//! The SQLite side of the queues: the statements behind the queue methods of
//! [`Store`](crate::store::Store). Every change goes through the group-commit writer
//! with its events; reads use the read pool.
//!
//! Times are stored as milliseconds since the epoch. `due_at` says when the claim
//! query may take a message (see the migration), so one index over
//! `(destination, status, due_at)` serves every claim, however many messages wait.

use chrono::{DateTime, Utc};
use opsbox_api::{Event, MessageStatus, PayloadKind, QueueStats};
use sqlx::sqlite::{Sqlite, SqliteConnection, SqliteRow};
use sqlx::{Executor, QueryBuilder, Row};

use super::{
    events_mark, insert_event, record_event, undo_events, QueueAnswer, QueueWork, SqliteStore,
};
use crate::store::{
    fold_queue_stats, Claim, DeleteEvent, MessageEvent, MessageRecord, MessageSelector, NewEvent,
    StatusCount, StoreError, StoreResult,
};

/// Expired leases settled per claim at most (the rest at the next claim).
const SETTLE_BATCH: i64 = 1000;
/// Ids listed in a delete event at most.
const EVENT_IDS: usize = 1000;

fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn time(value: Option<i64>) -> Option<DateTime<Utc>> {
    value.and_then(DateTime::from_timestamp_millis)
}

fn message_from_row(row: &SqliteRow) -> StoreResult<MessageRecord> {
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
        tries: row
            .try_get::<i64, _>("tries")?
            .try_into()
            .unwrap_or(u32::MAX),
        max_tries: row
            .try_get::<Option<i64>, _>("max_tries")?
            .map(|n| n.try_into().unwrap_or(u32::MAX)),
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

/// Appends `WHERE …` for a selector (always at least `WHERE 1`).
fn push_selector(query: &mut QueryBuilder<'_, Sqlite>, selector: &MessageSelector) {
    query.push(" WHERE 1");
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
        query.push(" AND status IN (");
        let mut list = query.separated(", ");
        for status in &selector.statuses {
            list.push_bind(status.as_str());
        }
        query.push(")");
    }
}

/// Messages per trip to the driver's thread when pushing.
const PUSH_ROWS: usize = 100;

fn due_at(m: &MessageRecord) -> Option<i64> {
    match m.status {
        MessageStatus::Pending => Some(ms(m.created_at)),
        MessageStatus::Scheduled => m.scheduled_at.map(ms),
        MessageStatus::Processing => m.lease_until.map(ms),
        MessageStatus::Processed | MessageStatus::Dead => None,
    }
}

/// `at` as stored (milliseconds), so that a record built here equals one read back.
fn stored(at: DateTime<Utc>) -> DateTime<Utc> {
    time(Some(ms(at))).unwrap_or(at)
}

// A queue write runs its statements and its event inserts as ONE query: sqlx's SQLite
// driver hands every query to its worker thread and back, and that hand-off costs more
// than the statements (see `write_job_batch`).

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Appends one event insert per event to `sql`; they return their revisions.
fn event_sql(sql: &mut String, events: &[NewEvent]) {
    for _ in events {
        sql.push_str(
            "INSERT INTO events (at, kind, subject, data) VALUES (?, ?, ?, ?) RETURNING rev;",
        );
    }
}

fn bind_events<'q>(
    mut q: SqliteQuery<'q>,
    events: &[NewEvent],
    at: DateTime<Utc>,
) -> SqliteQuery<'q> {
    for event in events {
        q = q
            .bind(at)
            .bind(event.kind.clone())
            .bind(event.subject.clone())
            .bind(event.data.to_string());
    }
    q
}

/// Runs the query; the only rows are the events' revisions. Returns the events, noted
/// for the group's tail.
async fn run_with_events(
    conn: &mut SqliteConnection,
    q: SqliteQuery<'_>,
    events: &[NewEvent],
    at: DateTime<Utc>,
) -> StoreResult<Vec<Event>> {
    let rows = q.fetch_all(&mut *conn).await.map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Conflict("message id".into())
        }
        e => e.into(),
    })?;
    if rows.len() != events.len() {
        return Err(StoreError::Corrupt(format!(
            "{} revisions for {} events",
            rows.len(),
            events.len()
        )));
    }
    let mut out = Vec::with_capacity(events.len());
    for (row, event) in rows.iter().zip(events) {
        out.push(record_event(row.try_get(0)?, at, event.clone()));
    }
    Ok(out)
}

/// Stores messages and their `pushed` events, a trip per [`PUSH_ROWS`] messages.
async fn insert_messages(
    conn: &mut SqliteConnection,
    messages: &[&MessageRecord],
    kinds: &[MessageEvent],
) -> StoreResult<Vec<Event>> {
    let mut out = Vec::with_capacity(messages.len());
    for (group, kinds) in messages.chunks(PUSH_ROWS).zip(kinds.chunks(PUSH_ROWS)) {
        let mut sql = String::with_capacity(400 * group.len());
        for _ in group {
            sql.push_str(
                "INSERT INTO messages (id, source, destination, status, kind, payload_type,
                    payload, tries, max_tries, created_at, updated_at, scheduled_at,
                    processing_at, processed_at, lease_until, due_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);",
            );
        }
        let events: Vec<NewEvent> = group
            .iter()
            .zip(kinds)
            .map(|(m, event)| event("pushed", m))
            .collect();
        event_sql(&mut sql, &events);
        let at = Utc::now();
        let mut q = sqlx::query(&sql);
        for m in group {
            q = q
                .bind(&m.id)
                .bind(&m.source)
                .bind(&m.destination)
                .bind(m.status.as_str())
                .bind(m.kind.as_str())
                .bind(&m.payload_type)
                .bind(&m.payload)
                .bind(i64::from(m.tries))
                .bind(m.max_tries.map(i64::from))
                .bind(ms(m.created_at))
                .bind(m.updated_at.map(ms))
                .bind(m.scheduled_at.map(ms))
                .bind(m.processing_at.map(ms))
                .bind(m.processed_at.map(ms))
                .bind(m.lease_until.map(ms))
                .bind(due_at(m));
        }
        let q = bind_events(q, &events, at);
        out.extend(run_with_events(conn, q, &events, at).await?);
    }
    Ok(out)
}

/// Stores the messages of each push given, with their events: all in one go, or, if
/// that fails (an id taken, say), each push on its own, so that only the failing ones
/// fail. The outer error is the database's; the inner ones are each push's.
pub(super) async fn push(
    conn: &mut SqliteConnection,
    pushes: &[(Vec<MessageRecord>, MessageEvent)],
) -> StoreResult<Vec<StoreResult<Vec<Event>>>> {
    let mark = events_mark();
    conn.execute("SAVEPOINT pushes").await?;
    let all: Vec<&MessageRecord> = pushes.iter().flat_map(|(m, _)| m).collect();
    let kinds: Vec<MessageEvent> = pushes
        .iter()
        .flat_map(|(m, event)| m.iter().map(move |_| *event))
        .collect();
    let first = insert_messages(conn, &all, &kinds).await;
    let results = match first {
        Ok(mut events) => {
            let mut results = Vec::with_capacity(pushes.len());
            for (messages, _) in pushes {
                let rest = events.split_off(messages.len().min(events.len()));
                results.push(Ok(std::mem::replace(&mut events, rest)));
            }
            results
        }
        Err(error) => {
            undo_events(mark);
            conn.execute("ROLLBACK TO pushes").await?;
            if pushes.len() == 1 {
                vec![Err(error)]
            } else {
                let mut results = Vec::with_capacity(pushes.len());
                for (messages, event) in pushes {
                    let mark = events_mark();
                    conn.execute("SAVEPOINT one").await?;
                    let one: Vec<&MessageRecord> = messages.iter().collect();
                    let kinds = vec![*event; one.len()];
                    let result = insert_messages(conn, &one, &kinds).await;
                    if result.is_err() {
                        undo_events(mark);
                        conn.execute("ROLLBACK TO one").await?;
                    }
                    conn.execute("RELEASE one").await?;
                    results.push(result);
                }
                results
            }
        }
    };
    conn.execute("RELEASE pushes").await?;
    Ok(results)
}

/// Claims per candidate query (three compound terms each; SQLite allows 500).
const CLAIMS_PER_QUERY: usize = 100;
/// Acked ids per trip.
const ACKS_PER_QUERY: usize = 200;

/// Settles expired leases, then claims, for each claim given; runs inside the writer's
/// transaction and answers each claim's messages in order. Two trips to the driver per
/// round: one query reads every candidate of every claim, one writes all the changes
/// and their events. Claims on a queue already claimed from go in a later round.
///
/// An expired lease goes dead when out of tries, else back to pending, where it is a
/// candidate at its place by creation time. A claim's events: `dead` or `requeued` for
/// each expired message, then `pulled` for each claimed one.
pub(super) async fn claim(
    conn: &mut SqliteConnection,
    claims: &[(Claim, MessageEvent)],
) -> StoreResult<Vec<Vec<MessageRecord>>> {
    let mut answers: Vec<Option<Vec<MessageRecord>>> = claims.iter().map(|_| None).collect();
    let mut left: Vec<usize> = (0..claims.len()).collect();
    while !left.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let (now, later): (Vec<usize>, Vec<usize>) = left
            .into_iter()
            .partition(|&i| seen.insert(claims[i].0.destination.as_str()));
        left = later;
        for round in now.chunks(CLAIMS_PER_QUERY) {
            let picked: Vec<&(Claim, MessageEvent)> = round.iter().map(|&i| &claims[i]).collect();
            for (&i, claimed) in round.iter().zip(claim_round(conn, &picked).await?) {
                answers[i] = Some(claimed);
            }
        }
    }
    Ok(answers.into_iter().map(Option::unwrap_or_default).collect())
}

/// One round of [`claim`]: the claims' queues all differ.
async fn claim_round(
    conn: &mut SqliteConnection,
    claims: &[&(Claim, MessageEvent)],
) -> StoreResult<Vec<Vec<MessageRecord>>> {
    let mut sql = String::with_capacity(600 * claims.len());
    for k in 0..claims.len() {
        if k > 0 {
            sql.push_str(" UNION ALL ");
        }
        sql.push_str(&format!(
            "SELECT * FROM (SELECT *, {k} AS k, 0 AS what FROM messages
                            WHERE destination = ? AND status = 'processing' AND due_at <= ?
                            ORDER BY due_at LIMIT ?)
             UNION ALL
             SELECT * FROM (SELECT *, {k} AS k, 1 AS what FROM messages
                            WHERE destination = ? AND status = 'pending'
                            ORDER BY due_at, seq LIMIT ?)
             UNION ALL
             SELECT * FROM (SELECT *, {k} AS k, 2 AS what FROM messages
                            WHERE destination = ? AND status = 'scheduled' AND due_at <= ?
                            ORDER BY created_at, seq LIMIT ?)"
        ));
    }
    let mut q = sqlx::query(&sql);
    for (claim, _) in claims {
        let max = i64::from(claim.max.max(1));
        q = q
            .bind(&claim.destination)
            .bind(ms(claim.now))
            .bind(SETTLE_BATCH)
            .bind(&claim.destination)
            .bind(max)
            .bind(&claim.destination)
            .bind(ms(claim.now))
            .bind(max);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    // Per claim: (seq, the record as it will be), in the order the changes are made.
    let mut settled: Vec<Vec<(i64, MessageRecord)>> = claims.iter().map(|_| Vec::new()).collect();
    let mut candidates: Vec<Vec<(i64, MessageRecord)>> =
        claims.iter().map(|_| Vec::new()).collect();
    for row in &rows {
        let k: i64 = row.try_get("k")?;
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| k < claims.len())
            .ok_or_else(|| StoreError::Corrupt(format!("claim query answered for claim {k}")))?;
        let seq: i64 = row.try_get("seq")?;
        let mut message = message_from_row(row)?;
        if row.try_get::<i64, _>("what")? == 0 {
            let dead = message.max_tries.is_some_and(|max| message.tries >= max);
            message.status = if dead {
                MessageStatus::Dead
            } else {
                MessageStatus::Pending
            };
            message.lease_until = None;
            message.updated_at = Some(stored(claims[k].0.now));
            settled[k].push((seq, message.clone()));
            if dead {
                continue;
            }
        }
        candidates[k].push((seq, message));
    }
    let mut changes: Vec<(i64, MessageRecord)> = Vec::new();
    let mut events = Vec::new();
    let mut answers = Vec::with_capacity(claims.len());
    for (((claim, event), settled), mut candidates) in claims.iter().zip(settled).zip(candidates) {
        candidates
            .sort_by(|(a_seq, a), (b_seq, b)| (a.created_at, a_seq).cmp(&(b.created_at, b_seq)));
        candidates.truncate(claim.max.max(1) as usize);
        let at = stored(claim.now);
        let lease = claim.lease_until.map(stored);
        for (_, m) in &settled {
            let name = if m.status == MessageStatus::Dead {
                "dead"
            } else {
                "requeued"
            };
            events.push(event(name, m));
        }
        let mut claimed = Vec::with_capacity(candidates.len());
        for (seq, mut m) in candidates {
            m.status = MessageStatus::Processing;
            m.tries = m.tries.saturating_add(1);
            m.processing_at = Some(at);
            m.updated_at = Some(at);
            m.lease_until = lease;
            events.push(event("pulled", &m));
            claimed.push((seq, m));
        }
        // A requeued message that is claimed at once is written twice, as it was
        // settled and then claimed: the last write wins.
        changes.extend(settled);
        changes.extend(claimed.iter().cloned());
        answers.push(claimed.into_iter().map(|(_, m)| m).collect());
    }
    if changes.is_empty() {
        return Ok(answers);
    }
    let mut sql = String::with_capacity(200 * changes.len());
    for _ in &changes {
        sql.push_str(
            "UPDATE messages SET status = ?, tries = ?, updated_at = ?, processing_at = ?,
                lease_until = ?, due_at = ? WHERE seq = ?;",
        );
    }
    event_sql(&mut sql, &events);
    let logged = Utc::now();
    let mut q = sqlx::query(&sql);
    for (seq, m) in &changes {
        q = q
            .bind(m.status.as_str())
            .bind(i64::from(m.tries))
            .bind(m.updated_at.map(ms))
            .bind(m.processing_at.map(ms))
            .bind(m.lease_until.map(ms))
            .bind(due_at(m))
            .bind(*seq);
    }
    let q = bind_events(q, &events, logged);
    run_with_events(conn, q, &events, logged).await?;
    Ok(answers)
}

/// One ack: ids of messages in `destination`'s queue.
pub(super) struct Ack {
    pub(super) destination: String,
    pub(super) ids: Vec<String>,
    pub(super) at: DateTime<Utc>,
    pub(super) event: MessageEvent,
}

/// Marks processed the messages named that are being processed, for each ack given,
/// with their events; answers each ack's messages in the order it named them. A
/// message named twice is acked by the first ack only. Two trips per
/// [`ACKS_PER_QUERY`] ids: the updates, then the events.
pub(super) async fn ack(
    conn: &mut SqliteConnection,
    acks: &[Ack],
) -> StoreResult<Vec<Vec<MessageRecord>>> {
    let named: Vec<(usize, &str)> = acks
        .iter()
        .enumerate()
        .flat_map(|(k, a)| a.ids.iter().map(move |id| (k, id.as_str())))
        .collect();
    let mut answers: Vec<Vec<MessageRecord>> = acks.iter().map(|_| Vec::new()).collect();
    let mut events = Vec::new();
    for group in named.chunks(ACKS_PER_QUERY) {
        let mut sql = String::with_capacity(200 * group.len());
        for (k, _) in group {
            // The ack's index rides along to tell the answers apart.
            sql.push_str(&format!(
                "UPDATE messages SET status = 'processed', processed_at = ?,
                    updated_at = ?, lease_until = NULL, due_at = NULL
                 WHERE id = ? AND destination = ? AND status = 'processing'
                 RETURNING *, {k} AS k;"
            ));
        }
        let mut q = sqlx::query(&sql);
        for (k, id) in group {
            let a = &acks[*k];
            q = q
                .bind(ms(a.at))
                .bind(ms(a.at))
                .bind(*id)
                .bind(&a.destination);
        }
        for row in q.fetch_all(&mut *conn).await? {
            let k: i64 = row.try_get("k")?;
            let k = usize::try_from(k)
                .ok()
                .filter(|&k| k < acks.len())
                .ok_or_else(|| StoreError::Corrupt(format!("ack query answered for ack {k}")))?;
            let message = message_from_row(&row)?;
            events.push((k, (acks[k].event)("acked", &message)));
            answers[k].push(message);
        }
    }
    // Events grouped by ack, in the order each named its messages.
    events.sort_by_key(|(k, _)| *k);
    let events: Vec<NewEvent> = events.into_iter().map(|(_, e)| e).collect();
    if !events.is_empty() {
        let mut sql = String::new();
        event_sql(&mut sql, &events);
        let logged = Utc::now();
        let q = bind_events(sqlx::query(&sql), &events, logged);
        run_with_events(conn, q, &events, logged).await?;
    }
    Ok(answers)
}

fn messages(answer: QueueAnswer) -> StoreResult<Vec<MessageRecord>> {
    match answer {
        QueueAnswer::Messages(messages) => Ok(messages),
        QueueAnswer::Events(_) => Err(StoreError::Corrupt("a claim or ack answered events".into())),
    }
}

impl SqliteStore {
    pub(super) async fn q_insert(
        &self,
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    ) -> StoreResult<Vec<Event>> {
        match self.write_queue(QueueWork::Push(messages, event)).await? {
            QueueAnswer::Events(events) => Ok(events),
            QueueAnswer::Messages(_) => Err(StoreError::Corrupt("a push answered messages".into())),
        }
    }

    pub(super) async fn q_claim(
        &self,
        request: Claim,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        messages(self.write_queue(QueueWork::Claim(request, event)).await?)
    }

    pub(super) async fn q_has_deliverable(
        &self,
        destination: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let found: i64 = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE destination = ?1 AND status = 'pending')
                 OR EXISTS (SELECT 1 FROM messages WHERE destination = ?1
                            AND status = 'scheduled' AND due_at <= ?2)
                 OR EXISTS (SELECT 1 FROM messages WHERE destination = ?1
                            AND status = 'processing' AND due_at <= ?2)",
        )
        .bind(destination)
        .bind(ms(now))
        .fetch_one(&self.read)
        .await?;
        Ok(found != 0)
    }

    pub(super) async fn q_ack(
        &self,
        destination: &str,
        ids: Vec<String>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        let ack = Ack {
            destination: destination.to_owned(),
            ids,
            at,
            event,
        };
        messages(self.write_queue(QueueWork::Ack(ack)).await?)
    }

    pub(super) async fn q_update_payload(
        &self,
        selector: MessageSelector,
        kind: PayloadKind,
        payload: Vec<u8>,
        at: DateTime<Utc>,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.write(move |conn| {
            Box::pin(async move {
                let mut query = QueryBuilder::<Sqlite>::new("UPDATE messages SET kind = ");
                query
                    .push_bind(kind.as_str())
                    .push(", payload = ")
                    .push_bind(payload)
                    .push(", updated_at = ")
                    .push_bind(ms(at));
                push_selector(&mut query, &selector);
                query.push(" RETURNING *");
                let rows = query.build().fetch_all(&mut *conn).await?;
                let mut updated = Vec::with_capacity(rows.len());
                for row in &rows {
                    let message = message_from_row(row)?;
                    insert_event(conn, &event("updated", &message)).await?;
                    updated.push(message);
                }
                Ok(updated)
            })
        })
        .await
    }

    pub(super) async fn q_delete(
        &self,
        selector: MessageSelector,
        event: DeleteEvent,
    ) -> StoreResult<u64> {
        self.write(move |conn| {
            Box::pin(async move {
                let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM messages");
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
                    insert_event(conn, &event(&ids, count)).await?;
                }
                Ok(count)
            })
        })
        .await
    }

    pub(super) async fn q_get(&self, id: &str) -> StoreResult<Option<MessageRecord>> {
        let row = sqlx::query("SELECT * FROM messages WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    pub(super) async fn q_list(
        &self,
        selector: &MessageSelector,
    ) -> StoreResult<Vec<MessageRecord>> {
        let mut query = QueryBuilder::<Sqlite>::new("SELECT * FROM messages");
        push_selector(&mut query, selector);
        query
            .push(" ORDER BY created_at, seq LIMIT ")
            .push_bind(selector.limit.map(i64::from).unwrap_or(-1));
        let rows = query.build().fetch_all(&self.read).await?;
        rows.iter().map(message_from_row).collect()
    }

    pub(super) async fn q_stats(&self, destination: Option<&str>) -> StoreResult<Vec<QueueStats>> {
        let rows = sqlx::query(
            "SELECT destination, status, COUNT(*) AS n, MIN(created_at) AS oldest
             FROM messages WHERE (?1 IS NULL OR destination = ?1)
             GROUP BY destination, status ORDER BY destination",
        )
        .bind(destination)
        .fetch_all(&self.read)
        .await?;
        let counts = rows
            .iter()
            .map(|row| {
                Ok(StatusCount {
                    node: row.try_get("destination")?,
                    status: row.try_get("status")?,
                    n: row.try_get::<i64, _>("n")?.max(0) as u64,
                    oldest: time(row.try_get("oldest")?),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        fold_queue_stats(counts)
    }
}
