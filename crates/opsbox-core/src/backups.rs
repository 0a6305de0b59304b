//! Backups: consistent copies of the whole store (jobs, queues, identities, the model
//! and the event log) taken while the server runs, kept as files under
//! `<data>/backups/` with their metadata beside them.
//!
//! A backup is restored by stopping the server and putting the `.db` file in place of
//! `<data>/opsbox.db` (see the README).

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use chrono::Utc;
use opsbox_api::Backup;
use sha1::{Digest, Sha1};

use crate::error::{CoreError, CoreResult};
use crate::store::{NewEvent, Store};

#[derive(Clone)]
pub struct Backups {
    store: Arc<dyn Store>,
    dir: PathBuf,
}

impl Backups {
    pub fn new(store: Arc<dyn Store>, dir: PathBuf) -> Self {
        Backups { store, dir }
    }

    /// Takes a backup now.
    pub async fn create(&self, notes: &str, model_uuid: &str) -> CoreResult<Backup> {
        let io = |action: String| move |source| CoreError::Io { action, source };
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        let started = Utc::now();
        let mut id = format!("{}.{model_uuid}", started.format("%Y%m%d-%H%M%S"));
        let mut n = 1;
        while self.dir.join(format!("{id}.db")).exists() {
            n += 1;
            id = format!("{}-{n}.{model_uuid}", started.format("%Y%m%d-%H%M%S"));
        }
        let path = self.dir.join(format!("{id}.db"));
        self.store.snapshot(&path).await?;
        let bytes = std::fs::read(&path).map_err(io(format!("read {}", path.display())))?;
        let backup = Backup {
            id: id.clone(),
            notes: notes.to_owned(),
            size: bytes.len() as u64,
            checksum: base64::engine::general_purpose::STANDARD.encode(Sha1::digest(&bytes)),
            started,
            finished: Utc::now(),
            hostname: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            model_uuid: model_uuid.to_owned(),
        };
        let meta = self.dir.join(format!("{id}.json"));
        let text = serde_json::to_vec_pretty(&backup).unwrap_or_default();
        std::fs::write(&meta, text).map_err(io(format!("write {}", meta.display())))?;
        self.store
            .append_event(NewEvent::new(
                "backup.created",
                &id,
                serde_json::to_value(&backup).unwrap_or_default(),
            ))
            .await?;
        Ok(backup)
    }

    /// Every backup, oldest first.
    pub fn list(&self) -> Vec<Backup> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut backups: Vec<Backup> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        backups.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        backups
    }

    pub fn get(&self, id: &str) -> CoreResult<Backup> {
        check_id(id)?;
        self.list()
            .into_iter()
            .find(|b| b.id == id)
            .ok_or_else(|| CoreError::NotFound(format!("backup \"{id}\"")))
    }

    /// The file of a backup.
    pub fn path(&self, id: &str) -> CoreResult<PathBuf> {
        self.get(id)?;
        Ok(self.dir.join(format!("{id}.db")))
    }

    pub async fn remove(&self, id: &str) -> CoreResult<()> {
        let backup = self.get(id)?;
        for ext in ["db", "json"] {
            let path = self.dir.join(format!("{id}.{ext}"));
            std::fs::remove_file(&path).map_err(|source| CoreError::Io {
                action: format!("remove {}", path.display()),
                source,
            })?;
        }
        self.store
            .append_event(NewEvent::new(
                "backup.removed",
                id,
                serde_json::to_value(&backup).unwrap_or_default(),
            ))
            .await?;
        Ok(())
    }
}

/// Ids name files: no separators, nothing hidden.
fn check_id(id: &str) -> CoreResult<()> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!("\"{id}\" is not a backup id")))
    }
}
