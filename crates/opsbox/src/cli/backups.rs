//! `opsbox backups create | list | download | remove`: copies of the whole store, taken
//! while the server runs (admin); `restore`: one put back into a stopped server's data
//! directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::{output, Ctx};

#[derive(Subcommand, Debug)]
pub enum BackupsCommand {
    /// Take a backup now.
    Create {
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// Every backup, oldest first.
    List,
    /// Save a backup's file (an SQLite database; `backups restore` puts it back).
    Download {
        id: String,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Delete a backup.
    Remove { id: String },
    /// Put a backup file in place of the store of a data directory whose server is
    /// stopped (the store it replaces is kept as opsbox.db.before-restore). For a
    /// PostgreSQL store, `opsbox store migrate --from` the restored directory.
    Restore {
        /// The backup file (from `backups download`, or `<data>/backups/ID.db`).
        file: PathBuf,
        /// The server's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
}

pub async fn run(ctx: &Ctx, command: BackupsCommand) -> anyhow::Result<u8> {
    match command {
        BackupsCommand::Restore { file, data } => {
            let (from, into) = (file.clone(), data.clone());
            let restored =
                tokio::task::spawn_blocking(move || opsbox_core::backups::restore(&from, &into))
                    .await??;
            println!(
                "restored {} into {} (revision {})",
                file.display(),
                data.display(),
                restored.revision
            );
            if let Some(kept) = restored.replaced {
                println!("the store it replaced is kept as {}", kept.display());
            }
        }
        BackupsCommand::Create { notes } => {
            let backup = ctx.client()?.create_backup(&notes).await?;
            if ctx.json {
                output::json(&backup)?;
            } else {
                println!("created backup {} ({} bytes)", backup.id, backup.size);
            }
        }
        BackupsCommand::List => {
            let backups = ctx.client()?.backups().await?;
            if ctx.json {
                output::json(&backups)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = backups
                .iter()
                .map(|b| {
                    vec![
                        b.id.clone(),
                        b.started.to_rfc3339(),
                        b.size.to_string(),
                        b.notes.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["ID", "STARTED", "SIZE", "NOTES"], &rows)
            );
        }
        BackupsCommand::Download { id, output } => {
            let bytes = ctx.client()?.download_backup(&id).await?;
            let path = output.unwrap_or_else(|| PathBuf::from(format!("{id}.db")));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
        BackupsCommand::Remove { id } => {
            ctx.client()?.remove_backup(&id).await?;
            println!("removed backup {id}");
        }
    }
    Ok(0)
}
