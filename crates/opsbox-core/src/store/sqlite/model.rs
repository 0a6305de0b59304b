//! The SQLite side of the model: documents keyed by kind and id, and the sequences that
//! number units, machines and relations.

use opsbox_api::Event;
use sqlx::{Connection, Row};

use super::{read_revision, SqliteStore};
use crate::store::{ModelData, ModelDoc, ModelWrite, StoreError, StoreResult};

impl SqliteStore {
    pub(super) async fn m_load(&self) -> StoreResult<ModelData> {
        let mut conn = self.read.acquire().await?;
        // One read transaction: the documents and the revision agree.
        let mut tx = conn.begin().await?;
        let rows = sqlx::query("SELECT kind, id, data FROM model ORDER BY kind, id")
            .fetch_all(&mut *tx)
            .await?;
        let mut data = ModelData::default();
        for row in rows {
            let kind: String = row.try_get(0)?;
            let id: String = row.try_get(1)?;
            let text: String = row.try_get(2)?;
            let value = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("model {kind} {id}: {e}")))?;
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
        data.revision = read_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(data)
    }

    pub(super) async fn m_write(&self, write: ModelWrite) -> StoreResult<Vec<Event>> {
        self.write(move |tx| {
            for doc in &write.put {
                tx.conn
                    .prepare_cached(
                        "INSERT INTO model (kind, id, data) VALUES (?, ?, ?)
                         ON CONFLICT (kind, id) DO UPDATE SET data = excluded.data",
                    )?
                    .execute((&doc.kind, &doc.id, super::json(&doc.data)))?;
            }
            for (kind, id) in &write.remove {
                tx.conn
                    .prepare_cached("DELETE FROM model WHERE kind = ? AND id = ?")?
                    .execute((kind, id))?;
            }
            for (name, next) in &write.sequences {
                tx.conn
                    .prepare_cached(
                        "INSERT INTO model_sequences (name, next) VALUES (?, ?)
                         ON CONFLICT (name) DO UPDATE SET next = excluded.next",
                    )?
                    .execute((name, *next as i64))?;
            }
            write
                .events
                .iter()
                .map(|e| tx.insert_event(e.clone()))
                .collect()
        })
        .await
    }
}
