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
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        // Absolute, because hooks are read from here wherever the job runs.
        let dir: PathBuf = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Charms { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every readable charm, by name; broken ones are logged and left out.
    pub fn list(&self) -> Vec<Charm> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut charms: Vec<Charm> = entries
            .flatten()
            .filter(|e| e.path().join("metadata.yaml").is_file())
            .filter_map(|e| match self.read(&e.path()) {
                Ok(charm) => Some(charm),
                Err(error) => {
                    tracing::warn!(charm = %e.path().display(), %error, "charm left out");
                    None
                }
            })
            .collect();
        charms.sort_by(|a, b| a.name.cmp(&b.name));
        charms
    }

    /// The charm a URL names.
    pub fn resolve(&self, url: &str) -> CoreResult<Charm> {
        let parsed = CharmUrl::parse(url)?;
        self.get(&parsed.name)
            .map_err(|_| CoreError::NotFound(format!("charm \"{url}\"")))
    }

    /// The charm called `name` (its directory name or its metadata name).
    pub fn get(&self, name: &str) -> CoreResult<Charm> {
        let dir = self.dir.join(name);
        if dir.join("metadata.yaml").is_file() {
            return self.read(&dir);
        }
        self.list()
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| CoreError::NotFound(format!("charm \"{name}\"")))
    }

    /// The file of a charm's hook, if the charm has it.
    pub fn hook_path(&self, charm: &str, hook: &str) -> Option<PathBuf> {
        let direct = self.dir.join(charm).join("hooks").join(hook);
        if direct.is_file() {
            return Some(direct);
        }
        // The directory may be named otherwise than the charm.
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries.flatten().find_map(|e| {
            let meta = std::fs::read_to_string(e.path().join("metadata.yaml")).ok()?;
            let meta: Metadata = serde_yaml::from_str(&meta).ok()?;
            let path = e.path().join("hooks").join(hook);
            (meta.name == charm && path.is_file()).then_some(path)
        })
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
        self.list_dirs()
            .into_iter()
            .map(|dir| dir.join("actions").join(action))
            .find(|path| {
                path.is_file()
                    && path
                        .parent()
                        .and_then(Path::parent)
                        .and_then(|d| self.read(d).ok())
                        .is_some_and(|c| c.name == charm)
            })
            .ok_or_else(|| {
                CoreError::Invalid(format!(
                    "charm \"{charm}\" declares action \"{action}\" but has no actions/{action}"
                ))
            })
    }

    fn list_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("metadata.yaml").is_file())
                    .collect()
            })
            .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

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
