//! Copies a whole store from one database to another: an SQLite data directory into
//! PostgreSQL (`opsbox store migrate`), and PostgreSQL into a new SQLite file (backups
//! of a PostgreSQL store are SQLite files, like those of the embedded store, so one
//! `opsbox.db` restores either way).
//!
//! Rows are copied table by table as they are, revisions and ids included, so a watcher
//! resumes from the same revision and job names, message ids and tokens stay valid.
//! Both schemas have the same tables; the column list below names their common columns
//! and the type each is read and written as.

use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};

use super::postgres::PgStore;
use super::{StoreError, StoreResult};

/// How a column is read and written.
#[derive(Clone, Copy)]
enum Kind {
    /// BIGINT in PostgreSQL.
    I64,
    /// INTEGER in PostgreSQL.
    I32,
    /// SMALLINT in PostgreSQL.
    I16,
    Text,
    Blob,
    /// Nanoseconds since the epoch in PostgreSQL, chrono's text in SQLite.
    Time,
}

use Kind::*;

/// Tables in copy order, with their columns and the key that orders their rows.
/// A table: its name, its columns and the key that orders its rows.
type Table = (&'static str, &'static [(&'static str, Kind)], &'static str);

const TABLES: &[Table] = &[
    (
        "events",
        &[
            ("rev", I64),
            ("at", Time),
            ("kind", Text),
            ("subject", Text),
            ("data", Text),
        ],
        "rev",
    ),
    (
        "jobs",
        &[
            ("id", I64),
            ("name", Text),
            ("script", Text),
            ("state", Text),
            ("params", Text),
            ("node", Text),
            ("submitted_by", Text),
            ("created_at", Time),
            ("started_at", Time),
            ("finished_at", Time),
            ("exit_code", I32),
            ("signal", I32),
            ("reason", Text),
            ("return_values", Text),
            ("results", Text),
            ("spec", Text),
            ("pid", I64),
        ],
        "id",
    ),
    (
        "job_output",
        &[("job", Text), ("seq", I64), ("stream", I16), ("data", Blob)],
        "job, seq",
    ),
    (
        "users",
        &[
            ("name", Text),
            ("password_hash", Text),
            ("role", Text),
            ("created_at", Time),
            ("source", Text),
        ],
        "name",
    ),
    (
        "tokens",
        &[
            ("id", Text),
            ("secret_hash", Text),
            ("role", Text),
            ("nodes", Text),
            ("description", Text),
            ("created_at", Time),
        ],
        "id",
    ),
    (
        "messages",
        &[
            ("seq", I64),
            ("id", Text),
            ("source", Text),
            ("destination", Text),
            ("status", Text),
            ("kind", Text),
            ("payload_type", Text),
            ("payload", Blob),
            ("tries", I32),
            ("max_tries", I32),
            ("created_at", I64),
            ("updated_at", I64),
            ("scheduled_at", I64),
            ("processing_at", I64),
            ("processed_at", I64),
            ("lease_until", I64),
            ("due_at", I64),
        ],
        "seq",
    ),
    ("nodes", &[("id", Text), ("data", Text)], "id"),
    (
        "tasks",
        &[
            ("job", Text),
            ("id", Text),
            ("seq", I64),
            ("state", Text),
            ("node", Text),
            ("data", Text),
        ],
        "job, id",
    ),
    (
        "model",
        &[("kind", Text), ("id", Text), ("data", Text)],
        "kind, id",
    ),
    ("model_sequences", &[("name", Text), ("next", I64)], "name"),
];

/// Rows written per INSERT.
const BATCH: usize = 200;

#[derive(Debug, Clone)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
    Time(Option<DateTime<Utc>>),
}

fn sqlite_value(row: &sqlx::sqlite::SqliteRow, name: &str, kind: Kind) -> StoreResult<Value> {
    Ok(match kind {
        I64 | I32 | I16 => Value::Int(row.try_get(name)?),
        Text => Value::Text(row.try_get(name)?),
        Blob => Value::Blob(row.try_get(name)?),
        Time => Value::Time(row.try_get(name)?),
    })
}

fn pg_value(row: &sqlx::postgres::PgRow, name: &str, kind: Kind) -> StoreResult<Value> {
    Ok(match kind {
        I64 => Value::Int(row.try_get(name)?),
        I32 => Value::Int(row.try_get::<Option<i32>, _>(name)?.map(i64::from)),
        I16 => Value::Int(row.try_get::<Option<i16>, _>(name)?.map(i64::from)),
        Text => Value::Text(row.try_get(name)?),
        Blob => Value::Blob(row.try_get(name)?),
        Time => Value::Time(
            row.try_get::<Option<i64>, _>(name)?
                .map(DateTime::from_timestamp_nanos),
        ),
    })
}

fn out_of_range(table: &str, column: &str) -> StoreError {
    StoreError::Corrupt(format!("{table}.{column}: a number out of range"))
}

fn push_pg(
    row: &mut sqlx::query_builder::Separated<'_, '_, Postgres, &'static str>,
    table: &str,
    (column, kind): (&str, Kind),
    value: Value,
) -> StoreResult<()> {
    match (kind, value) {
        (I32, Value::Int(v)) => {
            let v = v
                .map(i32::try_from)
                .transpose()
                .map_err(|_| out_of_range(table, column))?;
            row.push_bind(v);
        }
        (I16, Value::Int(v)) => {
            let v = v
                .map(i16::try_from)
                .transpose()
                .map_err(|_| out_of_range(table, column))?;
            row.push_bind(v);
        }
        (_, Value::Int(v)) => {
            row.push_bind(v);
        }
        (_, Value::Text(v)) => {
            row.push_bind(v);
        }
        (_, Value::Blob(v)) => {
            row.push_bind(v);
        }
        (_, Value::Time(v)) => {
            row.push_bind(v.map(|t| t.timestamp_nanos_opt().unwrap_or(i64::MAX)));
        }
    }
    Ok(())
}

fn push_sqlite(
    row: &mut sqlx::query_builder::Separated<'_, '_, Sqlite, &'static str>,
    value: Value,
) {
    match value {
        Value::Int(v) => row.push_bind(v),
        Value::Text(v) => row.push_bind(v),
        Value::Blob(v) => row.push_bind(v),
        Value::Time(v) => row.push_bind(v),
    };
}

fn select(table: &str, columns: &[(&str, Kind)], order: &str) -> String {
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "))
}

fn insert_head(table: &str, columns: &[(&str, Kind)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    format!("INSERT INTO {table} ({}) ", names.join(", "))
}

/// What a copy moved, per table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
    pub revision: u64,
}

/// Copies an SQLite store (the file of a data directory) into an empty PostgreSQL
/// store. Refuses a target that holds anything already.
pub async fn sqlite_to_postgres(source: &Path, target: &PgStore) -> StoreResult<CopyReport> {
    if !source.exists() {
        return Err(StoreError::Invalid(format!(
            "{} does not exist",
            source.display()
        )));
    }
    // Writes a running server makes after the copy's snapshot would not carry over.
    super::sqlite::ensure_unused(source)?;
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(source)
        .read_only(true);
    let from = SqlitePool::connect_with(options).await?;
    let pool: &PgPool = target.pool();
    let mut tx = pool.begin().await?;
    let used: i64 = sqlx::query_scalar(
        "SELECT (SELECT value FROM meta WHERE key = 'revision')
              + (SELECT COUNT(*) FROM jobs) + (SELECT COUNT(*) FROM messages)
              + (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM tokens)
              + (SELECT COUNT(*) FROM model)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if used != 0 {
        return Err(StoreError::Invalid(
            "the PostgreSQL store is not empty: migrate into a new database or schema".into(),
        ));
    }
    // One read transaction on the source: every table as of one moment.
    let mut read = from.acquire().await?;
    sqlx::query("BEGIN").execute(&mut *read).await?;
    let mut report = CopyReport::default();
    for (table, columns, order) in TABLES {
        let mut copied = 0u64;
        let sql = select(table, columns, order);
        let mut rows = sqlx::query(&sql).fetch(&mut *read);
        let mut batch: Vec<Vec<Value>> = Vec::with_capacity(BATCH);
        loop {
            let row = rows.try_next().await?;
            if let Some(row) = &row {
                let values = columns
                    .iter()
                    .map(|(name, kind)| sqlite_value(row, name, *kind))
                    .collect::<StoreResult<Vec<_>>>()?;
                batch.push(values);
            }
            if batch.len() == BATCH || (row.is_none() && !batch.is_empty()) {
                let mut builder: QueryBuilder<Postgres> =
                    QueryBuilder::new(insert_head(table, columns));
                let mut failed = None;
                builder.push_values(batch.drain(..), |mut out, values| {
                    for (column, value) in columns.iter().zip(values) {
                        if let Err(e) = push_pg(&mut out, table, *column, value) {
                            failed = Some(e);
                        }
                    }
                });
                if let Some(e) = failed {
                    return Err(e);
                }
                let done = builder.build().execute(&mut *tx).await?;
                copied += done.rows_affected();
            }
            if row.is_none() {
                break;
            }
        }
        drop(rows);
        report.tables.push((table.to_string(), copied));
    }
    let compacted: i64 =
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'compacted_through'")
            .fetch_one(&mut *read)
            .await?;
    let newest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(rev), 0) FROM events")
        .fetch_one(&mut *read)
        .await?;
    sqlx::query("COMMIT").execute(&mut *read).await?;
    let revision = newest.max(compacted);
    sqlx::query("UPDATE meta SET value = $1 WHERE key = 'revision'")
        .bind(revision)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE meta SET value = $1 WHERE key = 'compacted_through'")
        .bind(compacted)
        .execute(&mut *tx)
        .await?;
    // Explicit ids were inserted: the serial columns go on after them.
    for (table, column) in [("jobs", "id"), ("messages", "seq")] {
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                           GREATEST((SELECT MAX({column}) FROM {table}), 1))"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    report.revision = revision.max(0) as u64;
    Ok(report)
}

/// Writes a consistent copy of a PostgreSQL store into a new SQLite file at `path`.
pub async fn to_sqlite(source: &PgStore, path: &Path) -> StoreResult<()> {
    if path.exists() {
        return Err(StoreError::Conflict(path.display().to_string()));
    }
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true);
    let out = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&out).await?;
    let mut write = out.begin().await?;
    let mut tx = source.pool().begin().await?;
    // One snapshot of every table.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    for (table, columns, order) in TABLES {
        let sql = select(table, columns, order);
        let mut rows = sqlx::query(&sql).fetch(&mut *tx);
        let mut batch: Vec<Vec<Value>> = Vec::with_capacity(BATCH);
        loop {
            let row = rows.try_next().await?;
            if let Some(row) = &row {
                let values = columns
                    .iter()
                    .map(|(name, kind)| pg_value(row, name, *kind))
                    .collect::<StoreResult<Vec<_>>>()?;
                batch.push(values);
            }
            if batch.len() == BATCH || (row.is_none() && !batch.is_empty()) {
                let mut builder: QueryBuilder<Sqlite> =
                    QueryBuilder::new(insert_head(table, columns));
                builder.push_values(batch.drain(..), |mut out, values| {
                    for value in values {
                        push_sqlite(&mut out, value);
                    }
                });
                builder.build().execute(&mut *write).await?;
            }
            if row.is_none() {
                break;
            }
        }
    }
    let compacted: i64 =
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'compacted_through'")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    sqlx::query("UPDATE meta SET value = ? WHERE key = 'compacted_through'")
        .bind(compacted)
        .execute(&mut *write)
        .await?;
    write.commit().await?;
    out.close().await;
    Ok(())
}
