//! The charms directory: one charm per sub-directory, with `metadata.yaml` (name,
//! summary, provides/requires/peers), an optional `config.yaml` (options with types and
//! defaults), an optional `revision` file and `hooks/`. Charm URLs (`cs:series/name-rev`,
//! `local:series/name`, or a bare name) resolve to the local charm of that name.
//!
//! The directory is read when asked, so a charm edited on disk is seen by the next
//! deploy without a reload step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use opsbox_api::model::{ActionSpec, Charm, CharmRelation, ConfigOption};
use serde::Deserialize;

use crate::error::{CoreError, CoreResult};

/// The charms of one directory.
#[derive(Debug, Clone)]
pub struct Charms {
    dir: PathBuf,
    uploads: PathBuf,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    summary: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    series: Vec<String>,
    #[serde(default)]
    provides: BTreeMap<String, RelationMeta>,
    #[serde(default)]
    requires: BTreeMap<String, RelationMeta>,
    #[serde(default)]
    peers: BTreeMap<String, RelationMeta>,
}

/// `interface: mysql` or the short form `db: mysql`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RelationMeta {
    Short(String),
    Long {
        interface: String,
        #[serde(default)]
        optional: bool,
        #[serde(default)]
        limit: Option<u32>,
        #[serde(default)]
        scope: Option<String>,
    },
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    options: BTreeMap<String, ConfigOption>,
}

/// A parsed charm URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharmUrl {
    pub schema: String,
    pub series: Option<String>,
    pub name: String,
    pub revision: Option<u32>,
}

impl CharmUrl {
    /// Parses `cs:series/name-rev`, `cs:name`, `local:series/name` or a bare `name`.
    pub fn parse(url: &str) -> CoreResult<CharmUrl> {
        let (schema, rest) = match url.split_once(':') {
            Some((schema, rest)) => (schema, rest),
            None => ("cs", url),
        };
        if schema != "cs" && schema != "local" {
            return Err(CoreError::Invalid(format!(
                "charm url has unsupported schema \"{schema}\""
            )));
        }
        let rest = rest.strip_prefix("~").map_or(rest, |user| {
            // `cs:~user/series/name`: the user part names a namespace we do not have.
            user.split_once('/').map_or(user, |(_, r)| r)
        });
        let (series, last) = match rest.rsplit_once('/') {
            Some((series, last)) => (Some(series.to_owned()), last),
            None => (None, rest),
        };
        // A trailing `-<digits>` is the revision; names may hold dashes themselves.
        let (name, revision) = match last.rsplit_once('-') {
            Some((name, rev)) if !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit()) => {
                (name, rev.parse().ok())
            }
            _ => (last, None),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(CoreError::Invalid(format!("invalid charm url \"{url}\"")));
        }
        Ok(CharmUrl {
            schema: schema.to_owned(),
            series: series.filter(|s| !s.is_empty()),
            name: name.to_owned(),
            revision,
        })
    }
}

impl Charms {
    /// The charms of `dir`; `uploads` holds charms added over the API (they win over
    /// charms of the same name in `dir`).
    pub fn new(dir: impl Into<PathBuf>, uploads: impl Into<PathBuf>) -> Self {
        // Absolute, because hooks are read from here wherever the job runs.
        let absolute = |dir: PathBuf| std::path::absolute(&dir).unwrap_or(dir);
        Charms {
            dir: absolute(dir.into()),
            uploads: absolute(uploads.into()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every readable charm, by name; broken ones are logged and left out.
    pub fn list(&self) -> Vec<Charm> {
        let mut charms: BTreeMap<String, Charm> = BTreeMap::new();
        for dir in self.list_dirs() {
            match self.read(&dir) {
                Ok(charm) => {
                    charms.entry(charm.name.clone()).or_insert(charm);
                }
                Err(error) => tracing::warn!(charm = %dir.display(), %error, "charm left out"),
            }
        }
        charms.into_values().collect()
    }

    /// The charm a URL names.
    pub fn resolve(&self, url: &str) -> CoreResult<Charm> {
        let parsed = CharmUrl::parse(url)?;
        self.get(&parsed.name)
            .map_err(|_| CoreError::NotFound(format!("charm \"{url}\"")))
    }

    /// The charm called `name` (its metadata name, or its directory's).
    pub fn get(&self, name: &str) -> CoreResult<Charm> {
        let dir = self
            .dir_of(name)
            .ok_or_else(|| CoreError::NotFound(format!("charm \"{name}\"")))?;
        self.read(&dir)
    }

    /// The directory of the charm called `name`: an upload first, then the charms
    /// directory (by directory name, then by metadata name).
    fn dir_of(&self, name: &str) -> Option<PathBuf> {
        for root in [&self.uploads, &self.dir] {
            let direct = root.join(name);
            if direct.join("metadata.yaml").is_file() {
                return Some(direct);
            }
        }
        self.list_dirs().into_iter().find(|dir| {
            std::fs::read_to_string(dir.join("metadata.yaml"))
                .ok()
                .and_then(|text| serde_yaml::from_str::<Metadata>(&text).ok())
                .is_some_and(|meta| meta.name == name)
        })
    }

    /// The file of a charm's hook, if the charm has it.
    pub fn hook_path(&self, charm: &str, hook: &str) -> Option<PathBuf> {
        let path = self.dir_of(charm)?.join("hooks").join(hook);
        path.is_file().then_some(path)
    }

    /// The executable of a charm's action, if the charm declares and has it.
    pub fn action_path(&self, charm: &str, action: &str) -> CoreResult<PathBuf> {
        let found = self.get(charm)?;
        if !found.actions.contains_key(action) {
            let known: Vec<&str> = found.actions.keys().map(String::as_str).collect();
            return Err(CoreError::Invalid(format!(
                "charm \"{charm}\" has no action \"{action}\"{}",
                if known.is_empty() {
                    String::from(" (it has none)")
                } else {
                    format!(" (it has {})", known.join(", "))
                }
            )));
        }
        self.dir_of(charm)
            .map(|dir| dir.join("actions").join(action))
            .filter(|path| path.is_file())
            .ok_or_else(|| {
                CoreError::Invalid(format!(
                    "charm \"{charm}\" declares action \"{action}\" but has no actions/{action}"
                ))
            })
    }

    /// Adds a charm from a zip archive (what `juju deploy` of a local charm uploads):
    /// unpacked into the uploads directory under its metadata name, replacing an
    /// earlier upload, with a revision above every earlier one. Returns the charm and
    /// its URL, `local:<series>/<name>-<revision>`.
    pub fn add_archive(&self, archive: &[u8], series: &str) -> CoreResult<(Charm, String)> {
        if series.is_empty()
            || !series
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(CoreError::Invalid(format!(
                "invalid series \"{series}\": expected a word like trusty"
            )));
        }
        let io = |action: String| move |source| CoreError::Io { action, source };
        std::fs::create_dir_all(&self.uploads)
            .map_err(io(format!("create {}", self.uploads.display())))?;
        let staging = self.uploads.join(format!(
            ".upload-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let unpacked = unpack(archive, &staging);
        let charm = unpacked.and_then(|()| self.read(&staging));
        let charm = match charm {
            Ok(charm) => charm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let name = charm.name.clone();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(CoreError::Invalid(format!(
                "invalid charm name \"{name}\" in metadata.yaml"
            )));
        }
        let previous = self.dir_of(&name).and_then(|d| self.read(&d).ok());
        let revision = previous
            .map(|p| p.revision + 1)
            .unwrap_or(0)
            .max(charm.revision);
        std::fs::write(staging.join("revision"), format!("{revision}\n"))
            .map_err(io(format!("write {}", staging.join("revision").display())))?;
        let target = self.uploads.join(&name);
        if target.exists() {
            let old = self.uploads.join(format!(".old-{name}-{revision}"));
            std::fs::rename(&target, &old).map_err(io(format!("replace {}", target.display())))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        std::fs::rename(&staging, &target).map_err(io(format!("move {}", target.display())))?;
        let charm = self.read(&target)?;
        Ok((charm, format!("local:{series}/{name}-{revision}")))
    }

    /// The charm a URL names, as a zip archive of its directory.
    pub fn archive(&self, url: &str) -> CoreResult<Vec<u8>> {
        use std::io::Write;
        let parsed = CharmUrl::parse(url)?;
        let dir = self
            .dir_of(&parsed.name)
            .ok_or_else(|| CoreError::NotFound(format!("charm \"{url}\"")))?;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let fail =
            |e: &dyn std::fmt::Display| CoreError::Invalid(format!("cannot pack {url}: {e}"));
        let mut stack = vec![dir.clone()];
        while let Some(current) = stack.pop() {
            let entries = std::fs::read_dir(&current).map_err(|e| fail(&e))?;
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                let Ok(relative) = path.strip_prefix(&dir) else {
                    continue;
                };
                let name = relative.to_string_lossy().into_owned();
                let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(&e))?;
                if meta.is_dir() {
                    stack.push(path.clone());
                } else if meta.is_file() {
                    use std::os::unix::fs::PermissionsExt;
                    let options = zip::write::SimpleFileOptions::default()
                        .unix_permissions(meta.permissions().mode() & 0o777);
                    zip.start_file(name, options).map_err(|e| fail(&e))?;
                    let data = std::fs::read(&path).map_err(|e| fail(&e))?;
                    zip.write_all(&data).map_err(|e| fail(&e))?;
                }
            }
        }
        Ok(zip.finish().map_err(|e| fail(&e))?.into_inner())
    }

    /// Charm directories: uploads first.
    fn list_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for root in [&self.uploads, &self.dir] {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.join("metadata.yaml").is_file()
                        && !p
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            found.sort();
            dirs.extend(found);
        }
        dirs
    }

    fn read(&self, dir: &Path) -> CoreResult<Charm> {
        let read = |file: &str| std::fs::read_to_string(dir.join(file));
        let text = read("metadata.yaml").map_err(|source| CoreError::Io {
            action: format!("read {}", dir.join("metadata.yaml").display()),
            source,
        })?;
        let meta: Metadata = serde_yaml::from_str(&text)
            .map_err(|e| CoreError::Invalid(format!("{}/metadata.yaml: {e}", dir.display())))?;
        let config: ConfigFile = match read("config.yaml") {
            Ok(text) => serde_yaml::from_str::<Option<ConfigFile>>(&text)
                .map_err(|e| CoreError::Invalid(format!("{}/config.yaml: {e}", dir.display())))?
                .unwrap_or_default(),
            Err(_) => ConfigFile::default(),
        };
        for (name, option) in &config.options {
            if !matches!(option.kind.as_str(), "string" | "int" | "float" | "boolean") {
                return Err(CoreError::Invalid(format!(
                    "{}/config.yaml: option {name} has unknown type {:?}",
                    dir.display(),
                    option.kind
                )));
            }
        }
        let revision = read("revision")
            .ok()
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(0);
        let mut hooks: Vec<String> = std::fs::read_dir(dir.join("hooks"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        hooks.sort();
        let relations = |map: BTreeMap<String, RelationMeta>| {
            map.into_iter()
                .map(|(name, meta)| {
                    let relation = match meta {
                        RelationMeta::Short(interface) => CharmRelation {
                            interface,
                            optional: false,
                            limit: 0,
                            scope: "global".into(),
                        },
                        RelationMeta::Long {
                            interface,
                            optional,
                            limit,
                            scope,
                        } => CharmRelation {
                            interface,
                            optional,
                            limit: limit.unwrap_or(0),
                            scope: scope.unwrap_or_else(|| "global".into()),
                        },
                    };
                    (name, relation)
                })
                .collect()
        };
        let actions: BTreeMap<String, ActionSpec> = match read("actions.yaml") {
            Ok(text) => serde_yaml::from_str::<Option<BTreeMap<String, ActionSpec>>>(&text)
                .map_err(|e| CoreError::Invalid(format!("{}/actions.yaml: {e}", dir.display())))?
                .unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(Charm {
            actions,
            name: meta.name,
            summary: meta.summary,
            description: meta.description,
            revision,
            series: meta.series,
            provides: relations(meta.provides),
            requires: relations(meta.requires),
            peers: relations(meta.peers),
            config: config.options,
            hooks,
        })
    }
}

/// Largest unpacked charm: a charm is metadata and small hooks.
const MAX_UNPACKED: u64 = 64 * 1024 * 1024;

/// Unpacks a zip archive into `dir`, refusing paths that leave it, symlinks and
/// archives that unpack to more than [`MAX_UNPACKED`]. Unix modes are kept (hooks must
/// stay executable).
fn unpack(archive: &[u8], dir: &Path) -> CoreResult<()> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| CoreError::Invalid(format!("bad charm archive: {why}"));
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(archive)).map_err(|e| bad(e.to_string()))?;
    let io = |action: String| move |source| CoreError::Io { action, source };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(bad(format!(
                "{:?} leaves the charm directory",
                entry.name()
            )));
        };
        let mode = entry.unix_mode();
        if mode.is_some_and(|m| m & 0o170000 == 0o120000) {
            return Err(bad(format!("{} is a symlink", relative.display())));
        }
        let path = dir.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(io(format!("create {}", path.display())))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        let mut data = Vec::new();
        (&mut entry)
            .take(MAX_UNPACKED + 1 - total)
            .read_to_end(&mut data)
            .map_err(|e| bad(e.to_string()))?;
        total += data.len() as u64;
        if total > MAX_UNPACKED {
            return Err(bad(format!(
                "it unpacks to more than {} MiB",
                MAX_UNPACKED >> 20
            )));
        }
        std::fs::write(&path, &data).map_err(io(format!("write {}", path.display())))?;
        let executable = mode.is_some_and(|m| m & 0o111 != 0)
            || relative.starts_with("hooks")
            || relative.starts_with("actions");
        let perm = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(perm))
            .map_err(io(format!("chmod {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_of(files: &[(&str, &str, u32)]) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, text, mode) in files {
            let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            zip.start_file(*name, options).unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn uploads_get_new_revisions_win_over_the_directory_and_pack_back() {
        let root = tempfile::tempdir().unwrap();
        let charms = Charms::new(root.path().join("charms"), root.path().join("uploads"));
        let archive = zip_of(&[
            ("metadata.yaml", "name: hello\nsummary: hi\n", 0o644),
            ("hooks/install", "#!/bin/sh\necho hi\n", 0o755),
        ]);
        let (charm, url) = charms.add_archive(&archive, "trusty").unwrap();
        assert_eq!(
            (charm.name.as_str(), url.as_str()),
            ("hello", "local:trusty/hello-0")
        );
        let (_, url) = charms.add_archive(&archive, "trusty").unwrap();
        assert_eq!(url, "local:trusty/hello-1");
        assert_eq!(charms.resolve("local:trusty/hello").unwrap().revision, 1);
        let hook = charms.hook_path("hello", "install").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(hook).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let packed = charms.archive("local:trusty/hello-1").unwrap();
        let names: Vec<String> = zip::ZipArchive::new(std::io::Cursor::new(packed))
            .unwrap()
            .file_names()
            .map(str::to_owned)
            .collect();
        assert!(names.contains(&"hooks/install".to_string()), "{names:?}");
    }

    #[test]
    fn bad_archives_are_refused_and_leave_nothing() {
        let root = tempfile::tempdir().unwrap();
        let charms = Charms::new(root.path().join("charms"), root.path().join("uploads"));
        let escaping = zip_of(&[
            ("metadata.yaml", "name: evil\n", 0o644),
            ("../outside", "x", 0o644),
        ]);
        let err = charms
            .add_archive(&escaping, "trusty")
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the charm directory"), "{err}");
        assert!(!root.path().join("outside").exists());
        let err = charms
            .add_archive(b"not a zip", "trusty")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad charm archive"), "{err}");
        let no_meta = zip_of(&[("hooks/install", "x", 0o755)]);
        assert!(charms.add_archive(&no_meta, "trusty").is_err());
        let ok = zip_of(&[("metadata.yaml", "name: fine\n", 0o644)]);
        assert!(charms.add_archive(&ok, "../etc").is_err());
        // Only dot-directories of failed uploads would be left, and they are removed.
        let left: Vec<_> = std::fs::read_dir(root.path().join("uploads"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn urls() {
        let url = CharmUrl::parse("cs:precise/wordpress").unwrap();
        assert_eq!(url.name, "wordpress");
        assert_eq!(url.series.as_deref(), Some("precise"));
        assert_eq!(url.revision, None);
        let url = CharmUrl::parse("cs:trusty/mysql-38").unwrap();
        assert_eq!((url.name.as_str(), url.revision), ("mysql", Some(38)));
        let url = CharmUrl::parse("local:trusty/my-charm").unwrap();
        assert_eq!(
            (url.schema.as_str(), url.name.as_str()),
            ("local", "my-charm")
        );
        assert_eq!(CharmUrl::parse("haproxy").unwrap().name, "haproxy");
        assert_eq!(
            CharmUrl::parse("cs:~someone/precise/haproxy-3")
                .unwrap()
                .name,
            "haproxy"
        );
        assert!(CharmUrl::parse("http:foo").is_err());
        assert!(CharmUrl::parse("cs:precise/").is_err());
    }
}
