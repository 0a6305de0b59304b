//! Queues: durable per-node message queues.
//!
//! A node pushes a message into another node's queue (or its own); the destination
//! pulls it (an atomic claim of its oldest deliverable message, which moves it to
//! `processing`) and acks it (`processed`, never delivered again). A message pushed
//! with a time is `scheduled` and deliverable from then on.
//!
//! Scirocco's behaviour is the default; beyond it, as options: a lease after which an
//! un-acked message is delivered again, a max-tries limit after which it goes `dead`
//! instead, batches of push/pull/ack, and pulls that wait for a message (long poll).
//!
//! Every change is written with its event (`queue.pushed`, `queue.pulled`,
//! `queue.requeued`, `queue.dead`, `queue.acked`, `queue.updated`, `queue.deleted`) in
//! the same group-committed transaction, so an answered push survives a crash.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use opsbox_api::{Message, MessageStatus, PayloadKind, QueueStats};
use rand::RngCore;
use serde_json::{json, Value};

use crate::error::{CoreError, CoreResult};
use crate::store::{Claim, MessageRecord, MessageSelector, NewEvent, Store};

/// Limits of the queue service.
#[derive(Debug, Clone)]
pub struct QueuesConfig {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// A scheduled time this far in the past is still accepted (clock skew).
    pub schedule_skew: Duration,
    /// Most messages in one push, pull or ack.
    pub max_batch: usize,
    /// How often a waiting pull looks again for scheduled messages that came due.
    pub poll_interval: Duration,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        QueuesConfig {
            max_payload_bytes: 1024 * 1024,
            schedule_skew: Duration::from_secs(10),
            max_batch: 1000,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// A payload and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub kind: PayloadKind,
    pub bytes: Vec<u8>,
}

impl Payload {
    /// JSON text, checked to be valid JSON and kept as sent.
    pub fn json(bytes: Vec<u8>) -> CoreResult<Payload> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| CoreError::Invalid(format!("the payload is not valid JSON: {e}")))?;
        Ok(Payload {
            kind: PayloadKind::Json,
            bytes,
        })
    }

    pub fn text(text: String) -> Payload {
        Payload {
            kind: PayloadKind::Text,
            bytes: text.into_bytes(),
        }
    }

    pub fn binary(bytes: Vec<u8>) -> Payload {
        Payload {
            kind: PayloadKind::Binary,
            bytes,
        }
    }

    /// The native API's form: a JSON value, a string (`text`), or base64 (`binary`).
    /// Without a kind, a string is text and anything else JSON.
    pub fn from_value(kind: Option<PayloadKind>, value: &Value) -> CoreResult<Payload> {
        let kind = kind.unwrap_or(if value.is_string() {
            PayloadKind::Text
        } else {
            PayloadKind::Json
        });
        match (kind, value) {
            (PayloadKind::Json, value) => Ok(Payload {
                kind,
                bytes: value.to_string().into_bytes(),
            }),
            (PayloadKind::Text, Value::String(text)) => Ok(Payload::text(text.clone())),
            (PayloadKind::Binary, Value::String(text)) => base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map(Payload::binary)
                .map_err(|e| CoreError::Invalid(format!("a binary payload is base64: {e}"))),
            (kind, _) => Err(CoreError::Invalid(format!(
                "a {} payload is a string",
                kind.as_str()
            ))),
        }
    }

    /// The payload as the native API shows it.
    pub fn to_value(kind: PayloadKind, bytes: &[u8]) -> Value {
        match kind {
            PayloadKind::Json => serde_json::from_slice(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
            PayloadKind::Text => Value::String(String::from_utf8_lossy(bytes).into_owned()),
            PayloadKind::Binary => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }

    /// The `payload_type` a sender who named none gets.
    pub fn default_type(kind: PayloadKind) -> &'static str {
        match kind {
            PayloadKind::Json => "application/json",
            PayloadKind::Text => "text/plain",
            PayloadKind::Binary => "application/octet-stream",
        }
    }
}

/// When a pushed message may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// At once (`pending`).
    #[default]
    Now,
    /// Not before this time (`scheduled`).
    At(DateTime<Utc>),
    /// At once, with this time recorded as its scheduled time (Scirocco's `pending`
    /// status sent with a time).
    NowNoting(DateTime<Utc>),
}

/// One message to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub source: String,
    pub destination: String,
    pub payload: Payload,
    /// Default: the kind's MIME type.
    pub payload_type: Option<String>,
    pub schedule: Schedule,
    pub max_tries: Option<u32>,
}

/// How to pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullOptions {
    /// Most messages to claim.
    pub max: u32,
    /// How long to wait for one when none is deliverable.
    pub wait: Duration,
    /// Deliver again after this long unless acked (default: never, as Scirocco).
    pub lease: Option<Duration>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            max: 1,
            wait: Duration::ZERO,
            lease: None,
        }
    }
}

/// Who may change or delete a message, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditRule {
    /// Only its sender, and only before it is delivered (`pending`/`scheduled`): the
    /// native API and Scirocco's v2 protocol.
    SenderBeforeDelivery,
    /// Its sender or its receiver, whatever its status: Scirocco's v1 protocol.
    EitherParty,
}

impl EditRule {
    fn selector(self, node: &str) -> MessageSelector {
        match self {
            EditRule::SenderBeforeDelivery => MessageSelector {
                source: Some(node.to_owned()),
                statuses: vec![MessageStatus::Pending, MessageStatus::Scheduled],
                ..MessageSelector::default()
            },
            EditRule::EitherParty => MessageSelector {
                party: Some(node.to_owned()),
                ..MessageSelector::default()
            },
        }
    }
}

/// Node ids: 1 to 128 letters, digits, `_ - . : @`.
pub fn check_node(node: &str) -> CoreResult<()> {
    let ok = !node.is_empty()
        && node.len() <= 128
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "node id '{node}' must be 1-128 of letters, digits, '_', '-', '.', ':', '@'"
        )))
    }
}

/// True when a message id is well-formed (24 hex digits; uppercase accepted).
pub fn is_message_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Message ids: shaped like a MongoDB ObjectId, as Scirocco's are: 4 bytes of seconds,
/// 5 random bytes of this process, a 3-byte counter.
#[derive(Debug)]
struct IdGen {
    process: [u8; 5],
    counter: AtomicU32,
}

impl IdGen {
    fn new() -> Self {
        let mut process = [0u8; 5];
        rand::thread_rng().fill_bytes(&mut process);
        IdGen {
            process,
            counter: AtomicU32::new(rand::thread_rng().next_u32()),
        }
    }

    fn next(&self, now: DateTime<Utc>) -> String {
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&(now.timestamp() as u32).to_be_bytes());
        id[4..9].copy_from_slice(&self.process);
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        id[9..].copy_from_slice(&count.to_be_bytes()[1..]);
        hex::encode(id)
    }
}

fn message_event(action: &'static str, m: &MessageRecord) -> NewEvent {
    NewEvent {
        kind: format!("queue.{action}"),
        subject: format!("queue/{}", m.destination),
        data: json!({
            "id": m.id,
            "source": m.source,
            "destination": m.destination,
            "status": m.status,
            "tries": m.tries,
        }),
    }
}

fn delete_event(ids: &[String], count: u64) -> NewEvent {
    NewEvent::new(
        "queue.deleted",
        "queues",
        json!({ "ids": ids, "count": count }),
    )
}

/// The native API's view of a stored message.
pub fn to_message(m: &MessageRecord) -> Message {
    Message {
        id: m.id.clone(),
        source: m.source.clone(),
        destination: m.destination.clone(),
        status: m.status,
        kind: m.kind,
        payload_type: m.payload_type.clone(),
        payload: Payload::to_value(m.kind, &m.payload),
        tries: m.tries,
        max_tries: m.max_tries,
        created_at: m.created_at,
        updated_at: m.updated_at,
        scheduled_at: m.scheduled_at,
        processing_at: m.processing_at,
        processed_at: m.processed_at,
        lease_until: m.lease_until,
    }
}

#[derive(Clone)]
pub struct Queues {
    store: Arc<dyn Store>,
    config: Arc<QueuesConfig>,
    ids: Arc<IdGen>,
}

impl Queues {
    pub fn new(store: Arc<dyn Store>, config: QueuesConfig) -> Self {
        Queues {
            store,
            config: Arc::new(config),
            ids: Arc::new(IdGen::new()),
        }
    }

    pub fn config(&self) -> &QueuesConfig {
        &self.config
    }

    /// Refuses a scheduled time in the past (beyond the allowed skew).
    pub fn check_schedule(&self, at: DateTime<Utc>, now: DateTime<Utc>) -> CoreResult<()> {
        let skew = chrono::Duration::from_std(self.config.schedule_skew).unwrap_or_default();
        if at < now - skew {
            return Err(CoreError::Invalid(format!(
                "the scheduled time {} is in the past",
                at.to_rfc3339()
            )));
        }
        Ok(())
    }

    /// Stores messages (all or none) and returns them as stored, once durable.
    pub async fn push(&self, pushes: Vec<Push>) -> CoreResult<Vec<MessageRecord>> {
        if pushes.is_empty() {
            return Ok(Vec::new());
        }
        if pushes.len() > self.config.max_batch {
            return Err(CoreError::Invalid(format!(
                "{} messages in one push; at most {}",
                pushes.len(),
                self.config.max_batch
            )));
        }
        let now = Utc::now();
        let mut records = Vec::with_capacity(pushes.len());
        for push in pushes {
            check_node(&push.source)?;
            check_node(&push.destination)?;
            if push.payload.bytes.len() > self.config.max_payload_bytes {
                return Err(CoreError::Invalid(format!(
                    "the payload has {} bytes; at most {} are accepted",
                    push.payload.bytes.len(),
                    self.config.max_payload_bytes
                )));
            }
            let payload_type = push
                .payload_type
                .unwrap_or_else(|| Payload::default_type(push.payload.kind).to_owned());
            if payload_type.is_empty() || payload_type.len() > 255 {
                return Err(CoreError::Invalid(
                    "the payload type must be 1-255 characters".into(),
                ));
            }
            if push.max_tries == Some(0) {
                return Err(CoreError::Invalid("max_tries must be at least 1".into()));
            }
            let (status, scheduled_at) = match push.schedule {
                Schedule::Now => (MessageStatus::Pending, None),
                Schedule::At(at) => {
                    self.check_schedule(at, now)?;
                    (MessageStatus::Scheduled, Some(at))
                }
                Schedule::NowNoting(at) => (MessageStatus::Pending, Some(at)),
            };
            records.push(MessageRecord {
                id: self.ids.next(now),
                source: push.source,
                destination: push.destination,
                status,
                kind: push.payload.kind,
                payload_type,
                payload: push.payload.bytes,
                tries: 0,
                max_tries: push.max_tries,
                created_at: now,
                updated_at: None,
                scheduled_at,
                processing_at: None,
                processed_at: None,
                lease_until: None,
            });
        }
        self.store
            .insert_messages(records.clone(), message_event)
            .await?;
        Ok(records)
    }

    /// Claims up to `options.max` (at least 1, at most the batch limit) of `node`'s
    /// oldest deliverable messages, waiting up to `options.wait` for one. Empty when
    /// there is none.
    pub async fn pull(&self, node: &str, options: PullOptions) -> CoreResult<Vec<MessageRecord>> {
        check_node(node)?;
        if options.max == 0 {
            return Err(CoreError::Invalid(
                "max must be at least 1: a pull claims the messages it returns".into(),
            ));
        }
        let max = options.max.min(self.config.max_batch as u32);
        let deadline = tokio::time::Instant::now() + options.wait;
        let mut changes = self.store.changes();
        // The first try claims at once: a pull usually finds a message. Wake-ups come
        // from any commit, mostly for other queues, so they look before they write.
        let mut first = true;
        loop {
            changes.borrow_and_update();
            let now = Utc::now();
            if std::mem::take(&mut first) || self.store.has_deliverable(node, now).await? {
                let lease_until = options
                    .lease
                    .and_then(|l| chrono::Duration::from_std(l).ok())
                    .map(|l| now + l);
                let claimed = self
                    .store
                    .claim_messages(
                        Claim {
                            destination: node.to_owned(),
                            now,
                            max,
                            lease_until,
                        },
                        message_event,
                    )
                    .await?;
                if !claimed.is_empty() {
                    return Ok(claimed);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            // Woken by any commit; scheduled messages and leases come due by the clock.
            let _ =
                tokio::time::timeout(left.min(self.config.poll_interval), changes.changed()).await;
        }
    }

    /// Acks messages of `node`'s queue that are `processing`; returns those acked and
    /// the ids that were not.
    pub async fn ack(
        &self,
        node: &str,
        ids: Vec<String>,
    ) -> CoreResult<(Vec<MessageRecord>, Vec<String>)> {
        check_node(node)?;
        if ids.len() > self.config.max_batch {
            return Err(CoreError::Invalid(format!(
                "{} ids in one ack; at most {}",
                ids.len(),
                self.config.max_batch
            )));
        }
        let ids: Vec<String> = ids.into_iter().map(|id| id.to_ascii_lowercase()).collect();
        let acked = self
            .store
            .ack_messages(node, ids.clone(), Utc::now(), message_event)
            .await?;
        let missing = ids
            .into_iter()
            .filter(|id| !acked.iter().any(|m| &m.id == id))
            .collect();
        Ok((acked, missing))
    }

    /// Any message by id (admin view).
    pub async fn get(&self, id: &str) -> CoreResult<Option<MessageRecord>> {
        Ok(self.store.get_message(&id.to_ascii_lowercase()).await?)
    }

    /// A message its sender or receiver `node` may see.
    pub async fn get_for(&self, id: &str, node: &str) -> CoreResult<Option<MessageRecord>> {
        Ok(self
            .get(id)
            .await?
            .filter(|m| m.source == node || m.destination == node))
    }

    /// Messages sent by or to `node` (every node's when `None`), oldest first.
    pub async fn list(
        &self,
        node: Option<&str>,
        statuses: Vec<MessageStatus>,
        limit: Option<u32>,
    ) -> CoreResult<Vec<MessageRecord>> {
        Ok(self
            .store
            .list_messages(&MessageSelector {
                party: node.map(str::to_owned),
                statuses,
                limit,
                ..MessageSelector::default()
            })
            .await?)
    }

    /// Replaces the payload of message `id` as `node` under `rule`; `None` when the
    /// rule does not let `node` change it (or there is no such message). The payload
    /// type stays as it was.
    pub async fn update_payload(
        &self,
        id: &str,
        node: &str,
        rule: EditRule,
        payload: Payload,
    ) -> CoreResult<Option<MessageRecord>> {
        if payload.bytes.len() > self.config.max_payload_bytes {
            return Err(CoreError::Invalid(format!(
                "the payload has {} bytes; at most {} are accepted",
                payload.bytes.len(),
                self.config.max_payload_bytes
            )));
        }
        let selector = MessageSelector {
            id: Some(id.to_ascii_lowercase()),
            ..rule.selector(node)
        };
        let updated = self
            .store
            .update_message_payload(
                selector,
                payload.kind,
                payload.bytes,
                Utc::now(),
                message_event,
            )
            .await?;
        Ok(updated.into_iter().next())
    }

    /// Deletes message `id` if `rule` lets `node` do it; returns 0 or 1.
    pub async fn delete_one(&self, id: &str, node: &str, rule: EditRule) -> CoreResult<u64> {
        let selector = MessageSelector {
            id: Some(id.to_ascii_lowercase()),
            ..rule.selector(node)
        };
        Ok(self.store.delete_messages(selector, delete_event).await?)
    }

    /// Deletes every message `rule` lets `node` delete: under
    /// [`EditRule::SenderBeforeDelivery`] what it sent that is still undelivered; under
    /// [`EditRule::EitherParty`] everything to or from it.
    pub async fn delete_all(&self, node: &str, rule: EditRule) -> CoreResult<u64> {
        Ok(self
            .store
            .delete_messages(rule.selector(node), delete_event)
            .await?)
    }

    /// Deletes the messages of `node`'s queue with one of `statuses` (any when empty).
    pub async fn purge(&self, node: &str, statuses: Vec<MessageStatus>) -> CoreResult<u64> {
        let selector = MessageSelector {
            destination: Some(node.to_owned()),
            statuses,
            ..MessageSelector::default()
        };
        Ok(self.store.delete_messages(selector, delete_event).await?)
    }

    /// Deletes every message of every node (Scirocco's `DELETE /globalDataSpace`).
    pub async fn wipe(&self) -> CoreResult<u64> {
        Ok(self
            .store
            .delete_messages(MessageSelector::default(), delete_event)
            .await?)
    }

    /// Counts per queue (only `node`'s when given).
    pub async fn stats(&self, node: Option<&str>) -> CoreResult<Vec<QueueStats>> {
        Ok(self.store.queue_stats(node).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// SQLite, or PostgreSQL with `OPSBOX_TEST_STORE` (see [`crate::store::test_store`]).
    async fn queues() -> (Queues, Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::store::test_store(dir.path())
            .unwrap_or_else(|| dir.path().join("q.db").display().to_string());
        let store = crate::store::open(&spec, "test-server").await.unwrap();
        (
            Queues::new(store.clone(), QueuesConfig::default()),
            store,
            dir,
        )
    }

    fn text(from: &str, to: &str, body: &str) -> Push {
        Push {
            source: from.into(),
            destination: to.into(),
            payload: Payload::text(body.into()),
            payload_type: None,
            schedule: Schedule::Now,
            max_tries: None,
        }
    }

    fn bodies(messages: &[MessageRecord]) -> Vec<String> {
        messages
            .iter()
            .map(|m| String::from_utf8(m.payload.clone()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn push_pull_ack_delivers_oldest_first_and_never_again() {
        let (q, _, _dir) = queues().await;
        let pushed = q
            .push(vec![text("af1", "bf2", "one"), text("af1", "bf2", "two")])
            .await
            .unwrap();
        assert_eq!(pushed[0].status, MessageStatus::Pending);
        assert_eq!(pushed[0].payload_type, "text/plain");
        assert!(is_message_id(&pushed[0].id), "{}", pushed[0].id);
        assert!(q
            .pull("af1", PullOptions::default())
            .await
            .unwrap()
            .is_empty());

        let first = q.pull("bf2", PullOptions::default()).await.unwrap();
        assert_eq!(bodies(&first), ["one"]);
        assert_eq!(first[0].status, MessageStatus::Processing);
        assert_eq!(first[0].tries, 1);
        assert!(first[0].processing_at.is_some());
        let second = q.pull("bf2", PullOptions::default()).await.unwrap();
        assert_eq!(bodies(&second), ["two"]);
        assert!(q
            .pull("bf2", PullOptions::default())
            .await
            .unwrap()
            .is_empty());

        // Only the destination acks, once.
        let (acked, missing) = q.ack("af1", vec![first[0].id.clone()]).await.unwrap();
        assert!(acked.is_empty());
        assert_eq!(missing, [first[0].id.clone()]);
        let (acked, _) = q.ack("bf2", vec![first[0].id.clone()]).await.unwrap();
        assert_eq!(acked[0].status, MessageStatus::Processed);
        assert!(acked[0].processed_at.is_some());
        let (acked, missing) = q.ack("bf2", vec![first[0].id.clone()]).await.unwrap();
        assert!(acked.is_empty() && missing.len() == 1);
        assert!(q
            .pull("bf2", PullOptions::default())
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn batch_pull_takes_at_most_max_in_order() {
        let (q, _, _dir) = queues().await;
        let pushes = (0..5).map(|i| text("a", "b", &i.to_string())).collect();
        q.push(pushes).await.unwrap();
        let got = q
            .pull(
                "b",
                PullOptions {
                    max: 3,
                    ..PullOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(bodies(&got), ["0", "1", "2"]);
        let ids = got.iter().map(|m| m.id.clone()).collect();
        let (acked, missing) = q.ack("b", ids).await.unwrap();
        assert_eq!((acked.len(), missing.len()), (3, 0));
    }

    /// A scheduled message that has come due takes its place by creation among the
    /// pending ones (the claim reads the two kinds with different statements).
    #[tokio::test]
    async fn due_scheduled_messages_are_taken_in_creation_order_with_pending_ones() {
        let (q, _, _dir) = queues().await;
        let soon = Utc::now() + chrono::Duration::milliseconds(300);
        let mut first = text("a", "b", "scheduled first");
        first.schedule = Schedule::At(soon);
        q.push(vec![first]).await.unwrap();
        q.push(vec![text("a", "b", "pending second")])
            .await
            .unwrap();
        let mut third = text("a", "b", "scheduled third");
        third.schedule = Schedule::At(soon);
        q.push(vec![third]).await.unwrap();
        tokio::time::sleep_until(
            tokio::time::Instant::now() + (soon - Utc::now()).to_std().unwrap_or_default(),
        )
        .await;
        let got = q
            .pull(
                "b",
                PullOptions {
                    max: 2,
                    ..PullOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(bodies(&got), ["scheduled first", "pending second"]);
        let rest = q.pull("b", PullOptions::default()).await.unwrap();
        assert_eq!(bodies(&rest), ["scheduled third"]);
    }

    #[tokio::test]
    async fn scheduled_messages_wait_for_their_time_and_past_times_are_refused() {
        let (q, _, _dir) = queues().await;
        let soon = Utc::now() + chrono::Duration::milliseconds(600);
        let mut later = text("a", "b", "later");
        later.schedule = Schedule::At(soon);
        q.push(vec![later, text("a", "b", "now")]).await.unwrap();
        assert_eq!(
            bodies(&q.pull("b", PullOptions::default()).await.unwrap()),
            ["now"]
        );
        assert!(q
            .pull("b", PullOptions::default())
            .await
            .unwrap()
            .is_empty());
        let got = q
            .pull(
                "b",
                PullOptions {
                    wait: Duration::from_secs(5),
                    ..PullOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(bodies(&got), ["later"]);
        assert!(Utc::now() >= soon);
        assert_eq!(
            got[0].scheduled_at.map(|t| t.timestamp_millis()),
            Some(soon.timestamp_millis())
        );

        let mut past = text("a", "b", "past");
        past.schedule = Schedule::At(Utc::now() - chrono::Duration::minutes(19));
        assert!(matches!(
            q.push(vec![past]).await,
            Err(CoreError::Invalid(_))
        ));
        // A pending message with a time noted is deliverable at once.
        let mut noted = text("a", "b", "noted");
        noted.schedule = Schedule::NowNoting(Utc::now() + chrono::Duration::hours(1));
        q.push(vec![noted]).await.unwrap();
        assert_eq!(
            bodies(&q.pull("b", PullOptions::default()).await.unwrap()),
            ["noted"]
        );
    }

    #[tokio::test]
    async fn concurrent_pulls_never_share_a_message() {
        let (q, _, _dir) = queues().await;
        let pushes: Vec<Push> = (0..200).map(|i| text("a", "b", &i.to_string())).collect();
        q.push(pushes).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let m = q.pull("b", PullOptions::default()).await.unwrap();
                    if m.is_empty() {
                        return got;
                    }
                    got.extend(m.into_iter().map(|m| m.id));
                }
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!((count, all.len()), (200, 200));
    }

    #[tokio::test]
    async fn a_lease_redelivers_and_max_tries_dead_letters() {
        let (q, _, _dir) = queues().await;
        let mut push = text("a", "b", "flaky");
        push.max_tries = Some(2);
        q.push(vec![push]).await.unwrap();
        let leased = PullOptions {
            lease: Some(Duration::from_millis(200)),
            ..PullOptions::default()
        };
        let first = q.pull("b", leased).await.unwrap();
        assert_eq!(first[0].tries, 1);
        assert!(first[0].lease_until.is_some());
        assert!(q.pull("b", leased).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = q.pull("b", leased).await.unwrap();
        assert_eq!(
            (again[0].id.clone(), again[0].tries),
            (first[0].id.clone(), 2)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(q.pull("b", leased).await.unwrap().is_empty());
        let dead = q.get(&first[0].id).await.unwrap().unwrap();
        assert_eq!(dead.status, MessageStatus::Dead);
        let stats = q.stats(Some("b")).await.unwrap();
        assert_eq!(stats[0].dead, 1);
        // Acking after the lease ran out and it was settled is refused.
        assert_eq!(
            q.ack("b", vec![first[0].id.clone()]).await.unwrap().1.len(),
            1
        );
    }

    #[tokio::test]
    async fn expired_leases_are_settled_with_their_events_before_the_claim() {
        let (q, store, _dir) = queues().await;
        let mut once = text("a", "b", "once");
        once.max_tries = Some(1);
        q.push(vec![once, text("a", "b", "two"), text("a", "b", "three")])
            .await
            .unwrap();
        let leased = PullOptions {
            max: 3,
            lease: Some(Duration::from_millis(100)),
            ..PullOptions::default()
        };
        let ids: Vec<String> = q
            .pull("b", leased)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids.len(), 3);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let from = store.current_revision().await.unwrap();
        let one = PullOptions {
            max: 1,
            ..PullOptions::default()
        };
        let again = q.pull("b", one).await.unwrap();
        assert_eq!((again[0].id.as_str(), again[0].tries), (ids[1].as_str(), 2));
        let crate::store::EventsSince::Events(events) =
            store.events_since(from, 100).await.unwrap()
        else {
            panic!("compacted")
        };
        let seen: Vec<(&str, &str, u64)> = events
            .iter()
            .map(|e| {
                (
                    e.kind.as_str(),
                    e.data["id"].as_str().unwrap(),
                    e.data["tries"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("queue.dead", ids[0].as_str(), 1),
                ("queue.requeued", ids[1].as_str(), 1),
                ("queue.requeued", ids[2].as_str(), 1),
                ("queue.pulled", ids[1].as_str(), 2),
            ]
        );
        let status = |id: &str| {
            let q = q.clone();
            let id = id.to_owned();
            async move { q.get(&id).await.unwrap().unwrap().status }
        };
        assert_eq!(status(&ids[0]).await, MessageStatus::Dead);
        assert_eq!(status(&ids[1]).await, MessageStatus::Processing);
        assert_eq!(status(&ids[2]).await, MessageStatus::Pending);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pulls_on_many_queues_each_get_their_own_oldest() {
        let (q, _, _dir) = queues().await;
        for n in 0..8 {
            let pushes = (0..5).map(|i| text("a", &format!("q{n}"), &format!("{n}.{i}")));
            q.push(pushes.collect()).await.unwrap();
        }
        let two = PullOptions {
            max: 2,
            ..PullOptions::default()
        };
        let tasks: Vec<_> = (0..24)
            .map(|k| {
                let q = q.clone();
                let node = format!("q{}", k % 8);
                tokio::spawn(async move { (node.clone(), q.pull(&node, two).await.unwrap()) })
            })
            .collect();
        let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, pulled) in futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
        {
            assert!(pulled.len() <= 2);
            assert!(pulled.iter().all(|m| m.destination == node));
            let bodies = bodies(&pulled);
            let mut sorted = bodies.clone();
            sorted.sort();
            assert_eq!(bodies, sorted, "a pull's messages come oldest first");
            got.entry(node).or_default().extend(bodies);
        }
        for n in 0..8 {
            let mut bodies = got.remove(&format!("q{n}")).unwrap();
            bodies.sort();
            let want: Vec<String> = (0..5).map(|i| format!("{n}.{i}")).collect();
            assert_eq!(bodies, want, "queue q{n}: every message once");
        }
    }

    #[tokio::test]
    async fn a_push_naming_an_id_twice_fails_and_stores_nothing() {
        let (q, store, _dir) = queues().await;
        let template = q.push(vec![text("a", "b", "t")]).await.unwrap().remove(0);
        let with_id = |id: &str| MessageRecord {
            id: id.into(),
            ..template.clone()
        };
        let id = "0123456789abcdef01234567";
        let twice = store
            .insert_messages(vec![with_id(id), with_id(id)], message_event)
            .await;
        assert!(
            matches!(twice, Err(crate::store::StoreError::Conflict(_))),
            "{twice:?}"
        );
        let once = store
            .insert_messages(vec![with_id(id)], message_event)
            .await;
        assert!(
            once.is_ok(),
            "the failed push left nothing behind: {once:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pushes_and_acks_fail_and_win_alone() {
        let (q, store, _dir) = queues().await;
        // Pushes at once, two of them of a message id taken already: those two fail.
        let seed = q.push(vec![text("a", "b", "seed")]).await.unwrap();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let q = q.clone();
                let store = store.clone();
                let seed = seed.clone();
                tokio::spawn(async move {
                    if i < 2 {
                        return store
                            .insert_messages(seed, message_event)
                            .await
                            .map(|_| Vec::new())
                            .map_err(CoreError::from);
                    }
                    let mut pushes = vec![text("a", "b", &format!("m{i}"))];
                    if i % 3 == 0 {
                        pushes.push(text("a", "b", &format!("m{i}+")));
                    }
                    q.push(pushes).await
                })
            })
            .collect();
        let results: Vec<_> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        for result in &results[..2] {
            assert!(matches!(result, Err(CoreError::Conflict(_))), "{result:?}");
        }
        assert!(results[2..].iter().all(|r| r.is_ok()));
        let pushed: usize = 1 + results.iter().flatten().map(Vec::len).sum::<usize>();
        let all = PullOptions {
            max: 100,
            ..PullOptions::default()
        };
        let pulled = q.pull("b", all).await.unwrap();
        assert_eq!(pulled.len(), pushed);
        // Each message acked twice at once (plus an unknown id): each is acked once.
        let from = store.current_revision().await.unwrap();
        let tasks: Vec<_> = pulled
            .iter()
            .chain(&pulled)
            .map(|m| {
                let q = q.clone();
                let ids = vec![m.id.clone(), "ffffffffffffffffffffffffffffffff".to_owned()];
                tokio::spawn(async move { q.ack("b", ids).await.unwrap().0 })
            })
            .collect();
        let mut acked: Vec<String> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .flat_map(|r| r.unwrap())
            .map(|m| m.id)
            .collect();
        acked.sort();
        let mut want: Vec<String> = pulled.iter().map(|m| m.id.clone()).collect();
        want.sort();
        assert_eq!(acked, want, "every message acked exactly once");
        let crate::store::EventsSince::Events(events) =
            store.events_since(from, 1000).await.unwrap()
        else {
            panic!("compacted")
        };
        assert_eq!(events.len(), pushed);
        assert!(events.iter().all(|e| e.kind == "queue.acked"));
    }

    #[tokio::test]
    async fn a_waiting_pull_gets_a_message_pushed_meanwhile() {
        let (q, _, _dir) = queues().await;
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                q.pull(
                    "b",
                    PullOptions {
                        wait: Duration::from_secs(10),
                        ..PullOptions::default()
                    },
                )
                .await
                .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        q.push(vec![text("a", "b", "hi")]).await.unwrap();
        let got = waiter.await.unwrap();
        assert_eq!(bodies(&got), ["hi"]);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn edit_rules_of_both_protocols() {
        let (q, _, _dir) = queues().await;
        let pushed = q
            .push(vec![
                text("a", "b", "x"),
                text("a", "b", "y"),
                text("b", "a", "z"),
            ])
            .await
            .unwrap();
        let (x, y) = (&pushed[0].id, &pushed[1].id);
        let rule = EditRule::SenderBeforeDelivery;
        // The receiver may not change it under the sender rule, the sender may.
        assert!(q
            .update_payload(x, "b", rule, Payload::text("no".into()))
            .await
            .unwrap()
            .is_none());
        let json = Payload::json(br#"{"k":1}"#.to_vec()).unwrap();
        let updated = q.update_payload(x, "a", rule, json).await.unwrap().unwrap();
        assert_eq!(
            (updated.kind, updated.payload_type.as_str()),
            (PayloadKind::Json, "text/plain")
        );
        assert!(updated.updated_at.is_some());
        // Once delivered, only the either-party rule may change or delete it.
        q.pull("b", PullOptions::default()).await.unwrap();
        assert_eq!(q.delete_one(x, "a", rule).await.unwrap(), 0);
        let changed = q
            .update_payload(x, "b", EditRule::EitherParty, Payload::binary(vec![0, 1]))
            .await
            .unwrap();
        assert_eq!(changed.unwrap().kind, PayloadKind::Binary);
        // delete_all: the sender rule removes only a's undelivered sent messages.
        assert_eq!(q.delete_all("a", rule).await.unwrap(), 1);
        assert!(q.get(y).await.unwrap().is_none());
        assert_eq!(q.list(Some("a"), vec![], None).await.unwrap().len(), 2);
        assert_eq!(q.delete_all("a", EditRule::EitherParty).await.unwrap(), 2);
        q.push(vec![text("c", "d", "w")]).await.unwrap();
        assert_eq!(q.wipe().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn every_change_is_an_event() {
        let (q, store, _dir) = queues().await;
        let from = store.current_revision().await.unwrap();
        let m = q.push(vec![text("a", "b", "x")]).await.unwrap();
        q.pull("b", PullOptions::default()).await.unwrap();
        q.ack("b", vec![m[0].id.clone()]).await.unwrap();
        q.delete_one(&m[0].id, "b", EditRule::EitherParty)
            .await
            .unwrap();
        let crate::store::EventsSince::Events(events) =
            store.events_since(from, 100).await.unwrap()
        else {
            panic!("compacted")
        };
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "queue.pushed",
                "queue.pulled",
                "queue.acked",
                "queue.deleted"
            ]
        );
        assert_eq!(events[0].subject, "queue/b");
        assert_eq!(events[0].data["id"], m[0].id);
    }

    #[tokio::test]
    async fn invalid_input_is_refused() {
        let (q, _, _dir) = queues().await;
        assert!(q.push(vec![text("a b", "b", "x")]).await.is_err());
        assert!(Payload::json(b"{nope".to_vec()).is_err());
        assert!(Payload::from_value(Some(PayloadKind::Binary), &json!("***")).is_err());
        let bin = Payload::from_value(Some(PayloadKind::Binary), &json!("AAEC")).unwrap();
        assert_eq!(bin.bytes, [0, 1, 2]);
        assert_eq!(
            Payload::to_value(PayloadKind::Binary, &[0, 1, 2]),
            json!("AAEC")
        );
        let mut big = text("a", "b", "");
        big.payload = Payload::binary(vec![0; 2 * 1024 * 1024]);
        assert!(q.push(vec![big]).await.is_err());
    }
}
