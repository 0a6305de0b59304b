//! Backups: consistent copies of the whole store (jobs, queues, identities, the model
//! and the event log) taken while the server runs, kept as files under
//! `<data>/backups/` with their metadata beside them.
//!
//! A backup is restored into a data directory whose server is stopped with [`restore`]
//! (`opsbox backups restore FILE --data DIR`).

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

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The newest revision of the restored event log.
    pub revision: u64,
    /// Where the database it replaced was kept, if there was one.
    pub replaced: Option<PathBuf>,
}

/// Puts a backup file in place of the SQLite store of `data_dir`, whose server must be
/// stopped. Copying the file by hand is not enough: the old database's write-ahead log
/// (`opsbox.db-wal`) stays beside it, and SQLite would apply its frames to the restored
/// file and find it malformed. The backup is checked first (an SQLite file of opsbox's
/// schema that passes `quick_check`); the database it replaces is kept, with its log, as
/// `opsbox.db.before-restore`.
pub fn restore(backup: &std::path::Path, data_dir: &std::path::Path) -> CoreResult<Restored> {
    use rusqlite::{Connection, OpenFlags};
    let db = data_dir.join("opsbox.db");
    let fail = |what: String| CoreError::Invalid(what);
    let sql = |what: &str, path: &std::path::Path| {
        let what = format!("{what} {}", path.display());
        move |e: rusqlite::Error| fail(format!("{what}: {e}"))
    };
    let io = |action: String| move |source| CoreError::Io { action, source };

    let copy = Connection::open_with_flags(backup, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sql("cannot open the backup", backup))?;
    let check: String = copy
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(sql("not an SQLite database:", backup))?;
    if check != "ok" {
        return Err(fail(format!("{} is damaged: {check}", backup.display())));
    }
    let revision: i64 = copy
        .query_row("SELECT COALESCE(MAX(rev), 0) FROM events", [], |row| {
            row.get(0)
        })
        .map_err(sql("not an opsbox backup (no event log):", backup))?;
    drop(copy);

    if db.exists() {
        crate::store::sqlite::ensure_unused(&db).map_err(|e| fail(e.to_string()))?;
    }

    let staged = data_dir.join("opsbox.db.restoring");
    std::fs::copy(backup, &staged).map_err(io(format!(
        "copy {} to {}",
        backup.display(),
        staged.display()
    )))?;
    std::fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("sync {}", staged.display())))?;
    let mut replaced = None;
    if db.exists() {
        let kept = data_dir.join("opsbox.db.before-restore");
        // The log moves with its database, under the name SQLite looks for beside it.
        for (from, to) in [
            ("opsbox.db-wal", "opsbox.db.before-restore-wal"),
            ("opsbox.db", "opsbox.db.before-restore"),
        ] {
            let from = data_dir.join(from);
            if from.exists() {
                let to = data_dir.join(to);
                std::fs::rename(&from, &to).map_err(io(format!(
                    "rename {} to {}",
                    from.display(),
                    to.display()
                )))?;
            }
        }
        replaced = Some(kept);
    }
    let shm = data_dir.join("opsbox.db-shm");
    if shm.exists() {
        std::fs::remove_file(&shm).map_err(io(format!("remove {}", shm.display())))?;
    }
    std::fs::rename(&staged, &db).map_err(io(format!(
        "rename {} to {}",
        staged.display(),
        db.display()
    )))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("sync {}", data_dir.display())))?;
    Ok(Restored {
        revision: u64::try_from(revision).unwrap_or(0),
        replaced,
    })
}
