//! The SQLite side of the queues: the statements behind the queue methods of
//! [`Store`](crate::store::Store). Every change goes through the group-commit writer
//! with its events (the writer runs a group's pushes, claims and acks together, see
//! `writer::QueueOp`); reads use the read pool.
//!
//! Times are stored as milliseconds since the epoch. `due_at` says when the claim
//! query may take a message (see the migration), so one index over
//! `(destination, status, due_at)` serves every claim, however many messages wait.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use opsbox_api::{Event, MessageStatus, PayloadKind, QueueStats};
use rusqlite::types::Value;
use rusqlite::{params_from_iter, OptionalExtension};

use super::{column_names, conflict, Columns, Named, QueueAnswer, QueueWork, SqliteStore, Tx};
use crate::store::millis as time;
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

fn message_from_row(row: &impl Columns) -> StoreResult<MessageRecord> {
    let id: String = row.col("id")?;
    let status: String = row.col("status")?;
    let kind: String = row.col("kind")?;
    let created: i64 = row.col("created_at")?;
    Ok(MessageRecord {
        status: MessageStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: status {status}")))?,
        kind: PayloadKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: kind {kind}")))?,
        source: row.col("source")?,
        destination: row.col("destination")?,
        payload_type: row.col("payload_type")?,
        payload: row.col("payload")?,
        tries: row.col::<i64>("tries")?.try_into().unwrap_or(u32::MAX),
        max_tries: row
            .col::<Option<i64>>("max_tries")?
            .map(|n| n.try_into().unwrap_or(u32::MAX)),
        created_at: DateTime::from_timestamp_millis(created)
            .ok_or_else(|| StoreError::Corrupt(format!("message {id}: created_at")))?,
        updated_at: time(row.col("updated_at")?),
        scheduled_at: time(row.col("scheduled_at")?),
        processing_at: time(row.col("processing_at")?),
        processed_at: time(row.col("processed_at")?),
        lease_until: time(row.col("lease_until")?),
        id,
    })
}

/// ` WHERE …` for a selector (always at least ` WHERE 1`), with its parameters in order.
fn selector_sql(selector: &MessageSelector) -> (String, Vec<String>) {
    let mut sql = String::from(" WHERE 1");
    let mut values = Vec::new();
    if let Some(id) = &selector.id {
        sql.push_str(" AND id = ?");
        values.push(id.clone());
    }
    if let Some(source) = &selector.source {
        sql.push_str(" AND source = ?");
        values.push(source.clone());
    }
    if let Some(destination) = &selector.destination {
        sql.push_str(" AND destination = ?");
        values.push(destination.clone());
    }
    if let Some(party) = &selector.party {
        sql.push_str(" AND (source = ? OR destination = ?)");
        values.push(party.clone());
        values.push(party.clone());
    }
    if !selector.statuses.is_empty() {
        let marks = vec!["?"; selector.statuses.len()].join(", ");
        sql.push_str(&format!(" AND status IN ({marks})"));
        values.extend(selector.statuses.iter().map(|s| s.as_str().to_owned()));
    }
    (sql, values)
}

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

/// Stores messages, then their `pushed` events.
fn insert_messages(
    tx: &mut Tx,
    messages: &[&MessageRecord],
    kinds: &[MessageEvent],
) -> StoreResult<Vec<Event>> {
    {
        let mut insert = tx.conn.prepare_cached(
            "INSERT INTO messages (id, source, destination, status, kind, payload_type,
                payload, tries, max_tries, created_at, updated_at, scheduled_at,
                processing_at, processed_at, lease_until, due_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?;
        for m in messages {
            insert
                .execute((
                    &m.id,
                    &m.source,
                    &m.destination,
                    m.status.as_str(),
                    m.kind.as_str(),
                    &m.payload_type,
                    &m.payload,
                    i64::from(m.tries),
                    m.max_tries.map(i64::from),
                    ms(m.created_at),
                    m.updated_at.map(ms),
                    m.scheduled_at.map(ms),
                    m.processing_at.map(ms),
                    m.processed_at.map(ms),
                    m.lease_until.map(ms),
                    due_at(m),
                ))
                .map_err(|e| conflict(e, || "message id".into()))?;
        }
    }
    messages
        .iter()
        .zip(kinds)
        .map(|(m, event)| tx.insert_event(event("pushed", m)))
        .collect()
}

/// Stores the messages of each push given, with their events, in one go. A push naming
/// an id that is taken (stored already, by an earlier push of the group, or twice in
/// itself) fails alone, found before anything is written: the writer is the only one
/// writing, so what is checked here still holds at the insert, and the group needs no
/// savepoint (see `QueueOp::own_savepoint`). The outer error is the database's; the
/// inner ones are each push's.
pub(super) fn push(
    tx: &mut Tx,
    pushes: &[(Vec<MessageRecord>, MessageEvent)],
) -> StoreResult<Vec<StoreResult<Vec<Event>>>> {
    let mut claimed: HashSet<&str> = HashSet::new();
    let mut fits = Vec::with_capacity(pushes.len());
    {
        let mut stored = tx
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE id = ?")?;
        for (messages, _) in pushes {
            let mut ids: HashSet<&str> = HashSet::with_capacity(messages.len());
            let mut free = true;
            for m in messages {
                if !ids.insert(&m.id)
                    || claimed.contains(m.id.as_str())
                    || stored.exists([&m.id])?
                {
                    free = false;
                    break;
                }
            }
            if free {
                claimed.extend(ids);
            }
            fits.push(free);
        }
    }
    let (all, kinds): (Vec<&MessageRecord>, Vec<MessageEvent>) = pushes
        .iter()
        .zip(&fits)
        .filter(|(_, free)| **free)
        .flat_map(|((m, event), _)| m.iter().map(move |m| (m, *event)))
        .unzip();
    let mut events = insert_messages(tx, &all, &kinds)?;
    let mut results = Vec::with_capacity(pushes.len());
    for ((messages, _), free) in pushes.iter().zip(fits) {
        if free {
            let rest = events.split_off(messages.len().min(events.len()));
            results.push(Ok(std::mem::replace(&mut events, rest)));
        } else {
            results.push(Err(StoreError::Conflict("message id".into())));
        }
    }
    Ok(results)
}

/// Settles expired leases, then claims, for each claim given in turn (a claim on a
/// queue sees what the claims before it took); runs inside the writer's transaction and
/// answers each claim's messages in order.
///
/// An expired lease goes dead when out of tries, else back to pending, where it is a
/// candidate at its place by creation time. A claim's events: `dead` or `requeued` for
/// each expired message, then `pulled` for each claimed one.
pub(super) fn claim(
    tx: &mut Tx,
    claims: &[(Claim, MessageEvent)],
) -> StoreResult<Vec<Vec<MessageRecord>>> {
    claims
        .iter()
        .map(|(claim, event)| claim_one(tx, claim, *event))
        .collect()
}

fn claim_one(tx: &mut Tx, claim: &Claim, event: MessageEvent) -> StoreResult<Vec<MessageRecord>> {
    let max = i64::from(claim.max.max(1));
    let now = ms(claim.now);
    // Expired leases (what = 0), then the oldest pending and due scheduled messages: the
    // candidates are sorted by creation below, so each part reads only as many as a
    // claim could take.
    let mut rows = candidates_of(
        tx,
        "SELECT * FROM (SELECT *, 0 AS what FROM messages
                        WHERE destination = ?1 AND status = 'processing' AND due_at <= ?2
                        ORDER BY due_at LIMIT ?3)
         UNION ALL
         SELECT * FROM (SELECT *, 1 AS what FROM messages
                        WHERE destination = ?1 AND status = 'pending'
                        ORDER BY due_at, seq LIMIT ?4)",
        (&claim.destination, now, SETTLE_BATCH, max),
    )?;
    // The due scheduled messages in creation order: the index gives them by due time,
    // so SQLite sorts them in a temporary B-tree, which it opens (a page cache, a
    // file handle) whether or not any row comes: ~15k instructions per claim, a twentieth
    // of a queue cycle. A probe of the index first skips that when none is due, the
    // usual case.
    let due: bool = tx
        .conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages
                            WHERE destination = ?1 AND status = 'scheduled' AND due_at <= ?2)",
        )?
        .query_row((&claim.destination, now), |row| row.get(0))?;
    if due {
        rows.extend(candidates_of(
            tx,
            "SELECT *, 2 AS what FROM messages
             WHERE destination = ?1 AND status = 'scheduled' AND due_at <= ?2
             ORDER BY created_at, seq LIMIT ?3",
            (&claim.destination, now, max),
        )?);
    }
    // (seq, the record as it will be), in the order the changes are made.
    let mut settled: Vec<(i64, MessageRecord)> = Vec::new();
    let mut candidates: Vec<(i64, MessageRecord)> = Vec::new();
    for (expired, seq, mut message) in rows {
        if expired {
            let dead = message.max_tries.is_some_and(|max| message.tries >= max);
            message.status = if dead {
                MessageStatus::Dead
            } else {
                MessageStatus::Pending
            };
            message.lease_until = None;
            message.updated_at = Some(stored(claim.now));
            settled.push((seq, message.clone()));
            if dead {
                continue;
            }
        }
        candidates.push((seq, message));
    }
    candidates.sort_by(|(a_seq, a), (b_seq, b)| (a.created_at, a_seq).cmp(&(b.created_at, b_seq)));
    candidates.truncate(claim.max.max(1) as usize);
    let at = stored(claim.now);
    let lease = claim.lease_until.map(stored);
    let mut events: Vec<NewEvent> = settled
        .iter()
        .map(|(_, m)| {
            let name = if m.status == MessageStatus::Dead {
                "dead"
            } else {
                "requeued"
            };
            event(name, m)
        })
        .collect();
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
    {
        let mut update = tx.conn.prepare_cached(
            "UPDATE messages SET status = ?, tries = ?, updated_at = ?, processing_at = ?,
                lease_until = ?, due_at = ? WHERE seq = ?",
        )?;
        // A requeued message that is claimed at once is written twice, as it was settled
        // and then claimed: the last write wins.
        for (seq, m) in settled.iter().chain(&claimed) {
            update.execute((
                m.status.as_str(),
                i64::from(m.tries),
                m.updated_at.map(ms),
                m.processing_at.map(ms),
                m.lease_until.map(ms),
                due_at(m),
                seq,
            ))?;
        }
    }
    for e in events {
        tx.note_event(e)?;
    }
    Ok(claimed.into_iter().map(|(_, m)| m).collect())
}

/// Runs a claim's candidate query: (expired, seq, message) for each row, `what` 0 being
/// an expired lease.
fn candidates_of(
    tx: &mut Tx,
    sql: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Vec<(bool, i64, MessageRecord)>> {
    let mut select = tx.conn.prepare_cached(sql)?;
    let names = column_names(&select);
    let rows = select
        .query_and_then(params, |row| {
            let row = Named { row, names: &names };
            Ok::<_, StoreError>((
                row.col::<i64>("what")? == 0,
                row.col("seq")?,
                message_from_row(&row)?,
            ))
        })?
        .collect::<StoreResult<_>>()?;
    Ok(rows)
}

/// One ack: ids of messages in `destination`'s queue.
pub(super) struct Ack {
    pub(super) destination: String,
    pub(super) ids: Vec<String>,
    pub(super) at: DateTime<Utc>,
    pub(super) event: MessageEvent,
}

/// Marks processed the messages named that are being processed, for each ack given in
/// turn, with their events; answers each ack's messages in the order it named them. A
/// message named twice is acked by the first ack only.
pub(super) fn ack(tx: &mut Tx, acks: &[Ack]) -> StoreResult<Vec<Vec<MessageRecord>>> {
    let mut answers = Vec::with_capacity(acks.len());
    for a in acks {
        let acked = {
            // Read, then written by `seq`, as a claim does: `UPDATE … RETURNING` would
            // cost SQLite an ephemeral table per ack.
            let mut select = tx.conn.prepare_cached(
                "SELECT * FROM messages
                 WHERE id = ?1 AND destination = ?2 AND status = 'processing'",
            )?;
            let mut update = tx.conn.prepare_cached(
                "UPDATE messages SET status = 'processed', processed_at = ?1,
                    updated_at = ?1, lease_until = NULL, due_at = NULL
                 WHERE seq = ?2",
            )?;
            let names = column_names(&select);
            let at = stored(a.at);
            let mut acked = Vec::with_capacity(a.ids.len());
            for id in &a.ids {
                let found = select
                    .query_row((id, &a.destination), |row| {
                        let row = Named { row, names: &names };
                        Ok(row
                            .col::<i64>("seq")
                            .and_then(|seq| Ok((seq, message_from_row(&row)?))))
                    })
                    .optional()?;
                let Some(found) = found else { continue };
                let (seq, mut message) = found?;
                update.execute((ms(at), seq))?;
                message.status = MessageStatus::Processed;
                message.processed_at = Some(at);
                message.updated_at = Some(at);
                message.lease_until = None;
                acked.push(message);
            }
            acked
        };
        for message in &acked {
            tx.note_event((a.event)("acked", message))?;
        }
        answers.push(acked);
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
        self.write(move |tx| {
            let (filter, values) = selector_sql(&selector);
            let sql = format!(
                "UPDATE messages SET kind = ?, payload = ?, updated_at = ?{filter} RETURNING *"
            );
            let mut params = vec![
                Value::Text(kind.as_str().to_owned()),
                Value::Blob(payload),
                Value::Integer(ms(at)),
            ];
            params.extend(values.into_iter().map(Value::Text));
            let updated = tx
                .conn
                .prepare(&sql)?
                .query_and_then(params_from_iter(params), |row| message_from_row(row))?
                .collect::<StoreResult<Vec<_>>>()?;
            for message in &updated {
                tx.note_event(event("updated", message))?;
            }
            Ok(updated)
        })
        .await
    }

    pub(super) async fn q_delete(
        &self,
        selector: MessageSelector,
        event: DeleteEvent,
    ) -> StoreResult<u64> {
        self.write(move |tx| {
            let (filter, values) = selector_sql(&selector);
            let mut ids = Vec::new();
            let mut count = 0u64;
            {
                let mut delete = tx
                    .conn
                    .prepare(&format!("DELETE FROM messages{filter} RETURNING id"))?;
                let mut rows = delete.query(params_from_iter(values))?;
                while let Some(row) = rows.next()? {
                    count += 1;
                    if ids.len() < EVENT_IDS {
                        ids.push(row.get::<_, String>("id")?);
                    }
                }
            }
            if count > 0 {
                tx.note_event(event(&ids, count))?;
            }
            Ok(count)
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
        let (filter, values) = selector_sql(selector);
        let sql = format!("SELECT * FROM messages{filter} ORDER BY created_at, seq LIMIT ?");
        let mut query = sqlx::query(&sql);
        for value in values {
            query = query.bind(value);
        }
        let rows = query
            .bind(selector.limit.map(i64::from).unwrap_or(-1))
            .fetch_all(&self.read)
            .await?;
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
            .map(StatusCount::from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        fold_queue_stats(counts)
    }
}
