//! `opsbox backups create | list | download | remove`: copies of the whole store, taken
//! while the server runs (admin).

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
    /// Save a backup's file (an SQLite database: stop the server and put it in place of
    /// <data>/opsbox.db to restore it).
    Download {
        id: String,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Delete a backup.
    Remove { id: String },
}

pub async fn run(ctx: &Ctx, command: BackupsCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        BackupsCommand::Create { notes } => {
            let backup = client.create_backup(&notes).await?;
            if ctx.json {
                output::json(&backup)?;
            } else {
                println!("created backup {} ({} bytes)", backup.id, backup.size);
            }
        }
        BackupsCommand::List => {
            let backups = client.backups().await?;
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
            let bytes = client.download_backup(&id).await?;
            let path = output.unwrap_or_else(|| PathBuf::from(format!("{id}.db")));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
        BackupsCommand::Remove { id } => {
            client.remove_backup(&id).await?;
            println!("removed backup {id}");
        }
    }
    Ok(0)
}
