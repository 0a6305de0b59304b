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
use sqlx::{QueryBuilder, Row};

use super::{insert_event, record_event, SqliteStore};
use crate::store::{
    Claim, DeleteEvent, MessageEvent, MessageRecord, MessageSelector, NewEvent, StoreError,
    StoreResult,
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
        let rev: i64 = row.try_get(0)?;
        let event = Event {
            rev: rev as u64,
            at,
            kind: event.kind.clone(),
            subject: event.subject.clone(),
            data: event.data.clone(),
        };
        record_event(&event);
        out.push(event);
    }
    Ok(out)
}

/// Stores messages and their `pushed` events, a trip per [`PUSH_ROWS`] messages.
async fn insert_messages(
    conn: &mut SqliteConnection,
    messages: &[MessageRecord],
    event: MessageEvent,
) -> StoreResult<Vec<Event>> {
    let mut out = Vec::with_capacity(messages.len());
    for group in messages.chunks(PUSH_ROWS) {
        let mut sql = String::with_capacity(400 * group.len());
        for _ in group {
            sql.push_str(
                "INSERT INTO messages (id, source, destination, status, kind, payload_type,
                    payload, tries, max_tries, created_at, updated_at, scheduled_at,
                    processing_at, processed_at, lease_until, due_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);",
            );
        }
        let events: Vec<NewEvent> = group.iter().map(|m| event("pushed", m)).collect();
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

/// Settles expired leases, then claims; runs inside the writer's transaction. Two
/// trips: one query reads every candidate, one writes the changes and their events.
///
/// An expired lease goes dead when out of tries, else back to pending, where it is a
/// candidate at its place by creation time. Events: `dead` or `requeued` for each
/// expired message, then `pulled` for each claimed one.
async fn claim(
    conn: &mut SqliteConnection,
    claim: &Claim,
    event: MessageEvent,
) -> StoreResult<Vec<MessageRecord>> {
    let now = ms(claim.now);
    let at = stored(claim.now);
    let max = i64::from(claim.max.max(1));
    let rows = sqlx::query(
        "SELECT * FROM (SELECT *, 0 AS what FROM messages
                        WHERE destination = ?1 AND status = 'processing' AND due_at <= ?2
                        ORDER BY due_at LIMIT ?4)
         UNION ALL
         SELECT * FROM (SELECT *, 1 AS what FROM messages
                        WHERE destination = ?1 AND status = 'pending'
                        ORDER BY due_at, seq LIMIT ?3)
         UNION ALL
         SELECT * FROM (SELECT *, 2 AS what FROM messages
                        WHERE destination = ?1 AND status = 'scheduled' AND due_at <= ?2
                        ORDER BY created_at, seq LIMIT ?3)",
    )
    .bind(&claim.destination)
    .bind(now)
    .bind(max)
    .bind(SETTLE_BATCH)
    .fetch_all(&mut *conn)
    .await?;
    // (seq, the record as it will be), in the order the changes are made.
    let mut settled: Vec<(i64, MessageRecord)> = Vec::new();
    let mut candidates: Vec<(i64, MessageRecord)> = Vec::new();
    for row in &rows {
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
            message.updated_at = Some(at);
            settled.push((seq, message.clone()));
            if dead {
                continue;
            }
        }
        candidates.push((seq, message));
    }
    candidates.sort_by(|(a_seq, a), (b_seq, b)| (a.created_at, a_seq).cmp(&(b.created_at, b_seq)));
    candidates.truncate(max as usize);
    let lease = claim.lease_until.map(stored);
    let claimed: Vec<(i64, MessageRecord)> = candidates
        .into_iter()
        .map(|(seq, mut m)| {
            m.status = MessageStatus::Processing;
            m.tries = m.tries.saturating_add(1);
            m.processing_at = Some(at);
            m.updated_at = Some(at);
            m.lease_until = lease;
            (seq, m)
        })
        .collect();
    if settled.is_empty() && claimed.is_empty() {
        return Ok(Vec::new());
    }
    let mut events = Vec::with_capacity(settled.len() + claimed.len());
    for (_, m) in &settled {
        let name = if m.status == MessageStatus::Dead {
            "dead"
        } else {
            "requeued"
        };
        events.push(event(name, m));
    }
    for (_, m) in &claimed {
        events.push(event("pulled", m));
    }
    // A requeued message that is claimed at once is written twice, as it was settled
    // and then claimed: the last write wins.
    let changes: Vec<&(i64, MessageRecord)> = settled.iter().chain(&claimed).collect();
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
    Ok(claimed.into_iter().map(|(_, m)| m).collect())
}

impl SqliteStore {
    pub(super) async fn q_insert(
        &self,
        messages: Vec<MessageRecord>,
        event: MessageEvent,
    ) -> StoreResult<Vec<Event>> {
        self.write(move |conn| {
            Box::pin(async move { insert_messages(conn, &messages, event).await })
        })
        .await
    }

    pub(super) async fn q_claim(
        &self,
        request: Claim,
        event: MessageEvent,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.write(move |conn| Box::pin(async move { claim(conn, &request, event).await }))
            .await
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
        let destination = destination.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let mut acked = Vec::with_capacity(ids.len());
                for id in &ids {
                    let row = sqlx::query(
                        "UPDATE messages SET status = 'processed', processed_at = ?3,
                            updated_at = ?3, lease_until = NULL, due_at = NULL
                         WHERE id = ?1 AND destination = ?2 AND status = 'processing'
                         RETURNING *",
                    )
                    .bind(id)
                    .bind(&destination)
                    .bind(ms(at))
                    .fetch_optional(&mut *conn)
                    .await?;
                    if let Some(row) = row {
                        let message = message_from_row(&row)?;
                        insert_event(conn, &event("acked", &message)).await?;
                        acked.push(message);
                    }
                }
                Ok(acked)
            })
        })
        .await
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
        let mut stats: Vec<QueueStats> = Vec::new();
        for row in &rows {
            let node: String = row.try_get("destination")?;
            if stats.last().is_none_or(|s| s.node != node) {
                stats.push(QueueStats {
                    node: node.clone(),
                    ..QueueStats::default()
                });
            }
            let Some(entry) = stats.last_mut() else {
                continue;
            };
            let n = row.try_get::<i64, _>("n")? as u64;
            let status: String = row.try_get("status")?;
            match MessageStatus::parse(&status) {
                Some(MessageStatus::Pending) => {
                    entry.pending = n;
                    entry.oldest_pending = time(row.try_get("oldest")?);
                }
                Some(MessageStatus::Scheduled) => entry.scheduled = n,
                Some(MessageStatus::Processing) => entry.processing = n,
                Some(MessageStatus::Processed) => entry.processed = n,
                Some(MessageStatus::Dead) => entry.dead = n,
                None => return Err(StoreError::Corrupt(format!("message status {status}"))),
            }
        }
        Ok(stats)
    }
}
