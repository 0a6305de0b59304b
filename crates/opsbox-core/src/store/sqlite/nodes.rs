//! The SQLite side of nodes and tasks: the statements behind the node and task methods
//! of [`Store`](crate::store::Store). Records are JSON documents; the scheduler queries
//! tasks by state through an index.

use opsbox_api::TaskState;
use sqlx::Row;

use super::{insert_output, write_job, SqliteStore, Tx};
use crate::store::{NodeRecord, StoreError, StoreResult, TaskRecord, TaskWrite};

fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn put_task(tx: &Tx, task: &TaskRecord) -> StoreResult<()> {
    tx.conn
        .prepare_cached(
            "INSERT INTO tasks (job, id, seq, state, node, data) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (job, id) DO UPDATE SET state = excluded.state, node = excluded.node,
                data = excluded.data",
        )?
        .execute((
            &task.task.job,
            &task.task.id,
            task.seq,
            task.task.state.as_str(),
            &task.task.node,
            to_json(task)?,
        ))?;
    Ok(())
}

impl SqliteStore {
    pub(super) async fn n_put_node(
        &self,
        node: &NodeRecord,
        event: Option<crate::store::NewEvent>,
    ) -> StoreResult<()> {
        let id = node.id.clone();
        let data = to_json(node)?;
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "INSERT INTO nodes (id, data) VALUES (?, ?)
                     ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                )?
                .execute((&id, &data))?;
            if let Some(event) = event {
                tx.note_event(event)?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn n_list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        let rows = sqlx::query("SELECT data FROM nodes ORDER BY id")
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| from_json("node", &row.try_get::<String, _>(0)?))
            .collect()
    }

    pub(super) async fn n_write_tasks(&self, write: TaskWrite) -> StoreResult<()> {
        self.write(move |tx| {
            if let Some(record) = &write.job {
                write_job(tx, record, write.insert_job, &write.output)?;
            } else if let (false, Some(task)) = (write.output.is_empty(), write.tasks.first()) {
                insert_output(tx, &task.task.job, &write.output)?;
            }
            for task in &write.tasks {
                put_task(tx, task)?;
            }
            // Nobody needs the events back: the group keeps the only copy.
            write.events.into_iter().try_for_each(|e| tx.note_event(e))
        })
        .await
    }

    pub(super) async fn n_job_tasks(&self, job: &str) -> StoreResult<Vec<TaskRecord>> {
        let rows = sqlx::query("SELECT data FROM tasks WHERE job = ? ORDER BY seq")
            .bind(job)
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| from_json("task", &row.try_get::<String, _>(0)?))
            .collect()
    }

    pub(super) async fn n_tasks_in(&self, states: &[TaskState]) -> StoreResult<Vec<TaskRecord>> {
        let mut all = Vec::new();
        for state in states {
            let rows = sqlx::query("SELECT data FROM tasks WHERE state = ? ORDER BY seq")
                .bind(state.as_str())
                .fetch_all(&self.read)
                .await?;
            for row in &rows {
                all.push(from_json::<TaskRecord>(
                    "task",
                    &row.try_get::<String, _>(0)?,
                )?);
            }
        }
        all.sort_by_key(|t| t.seq);
        Ok(all)
    }

    pub(super) async fn n_queued_tasks(&self, per_job: u32) -> StoreResult<Vec<TaskRecord>> {
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
             SELECT t.data FROM jobs JOIN tasks AS t ON t.rowid IN (
                SELECT rowid FROM tasks WHERE state = 'queued' AND job = jobs.job
                ORDER BY seq LIMIT ?)
             ORDER BY t.seq",
        )
        .bind(i64::from(per_job))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|row| from_json("task", &row.try_get::<String, _>(0)?))
            .collect()
    }

    pub(super) async fn n_get_task(&self, job: &str, id: &str) -> StoreResult<Option<TaskRecord>> {
        let row = sqlx::query("SELECT data FROM tasks WHERE job = ? AND id = ?")
            .bind(job)
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.map(|row| from_json("task", &row.try_get::<String, _>(0)?))
            .transpose()
    }

    pub(super) async fn n_delete_tasks(&self, job: &str) -> StoreResult<()> {
        let job = job.to_owned();
        self.write(move |tx| {
            tx.conn.execute("DELETE FROM tasks WHERE job = ?", [&job])?;
            Ok(())
        })
        .await
    }
}
