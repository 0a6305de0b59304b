//! `opsbox store migrate`: moves a whole store between databases, offline, with no
//! server running on either side: an SQLite data directory into PostgreSQL when one
//! machine is not enough, or PostgreSQL back into an SQLite file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use opsbox_core::store::{copy, PgStore};

#[derive(clap::Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy every record (events and revisions, jobs and their output, users, tokens,
    /// messages, nodes, tasks, the model) into a new, empty store. Stop the servers
    /// first. Result files stay in the data directory: copy `results/` along.
    Migrate {
        /// `sqlite:PATH` (a data directory or its opsbox.db) or `postgres://…`.
        #[arg(long)]
        from: String,
        /// `postgres://…` (an empty database or `?schema=`), or `sqlite:PATH` for a new
        /// file.
        #[arg(long)]
        to: String,
    },
}

fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

/// The SQLite file a spec names: `sqlite:` is optional; a directory means its opsbox.db.
fn sqlite_path(spec: &str) -> PathBuf {
    let path = spec
        .strip_prefix("sqlite://")
        .or_else(|| spec.strip_prefix("sqlite:"))
        .unwrap_or(spec);
    let path = Path::new(path);
    if path.is_dir() {
        path.join("opsbox.db")
    } else {
        path.to_owned()
    }
}

pub async fn run(command: StoreCommand, json: bool) -> anyhow::Result<u8> {
    let StoreCommand::Migrate { from, to } = command;
    match (is_postgres(&from), is_postgres(&to)) {
        (false, true) => {
            let source = sqlite_path(&from);
            let target = PgStore::open(&to, "opsbox-store-migrate")
                .await
                .context("cannot open the PostgreSQL store")?;
            let report = copy::sqlite_to_postgres(&source, &target)
                .await
                .with_context(|| format!("cannot migrate {}", source.display()))?;
            if json {
                let tables: serde_json::Map<String, serde_json::Value> = report
                    .tables
                    .iter()
                    .map(|(t, n)| (t.clone(), (*n).into()))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"revision": report.revision, "rows": tables})
                );
            } else {
                for (table, rows) in &report.tables {
                    println!("{table:<16} {rows:>10} rows");
                }
                println!("revision {}: watchers resume where they were", report.revision);
            }
            Ok(0)
        }
        (true, false) => {
            let target = sqlite_path(&to);
            let source = PgStore::open_existing(&from, "opsbox-store-migrate")
                .await
                .context("cannot open the PostgreSQL store")?;
            copy::to_sqlite(&source, &target)
                .await
                .with_context(|| format!("cannot write {}", target.display()))?;
            println!("wrote {}", target.display());
            Ok(0)
        }
        _ => anyhow::bail!(
            "migrate goes from SQLite to PostgreSQL or back: give one sqlite:PATH and one postgres:// URL"
        ),
    }
}
