//! The script catalog: which executables of the scripts directory exist, with the
//! metadata of their Jojo block, and which files failed to load and why.
//!
//! The block grammar is Pyjojo's (see `shared/protocols/jojo.md` §6.3), with its parser
//! bugs fixed: a value may contain `:` (split on the first one only), a param may be
//! `my-param - its description` (split on the first ` - `, then on the first `-`), and
//! a bad line makes only its own file a problem, never the whole catalog. opsbox adds
//! two keys old servers ignore: `required: a, b` and `timeout: 30` (seconds; `30s`,
//! `5m`, `1h` also work).
//!
//! Names follow Pyjojo's rule (path relative to the directory, last extension dropped,
//! runs of characters outside `[A-Za-z0-9_]` replaced by `_`), computed on the path
//! rather than by string replacement, so a directory given with a trailing slash gives
//! the same names. A file with no extension keeps its whole name (`deploy` → `deploy`),
//! where Pyjojo gave the unreachable name `""`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use opsbox_api::{HttpMethod, OutputMode, Param, Script, ScriptProblem};

/// One consistent set of scripts, swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub scripts: BTreeMap<String, Arc<Script>>,
    pub problems: Vec<ScriptProblem>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<Arc<Script>> {
        self.scripts.get(name).cloned()
    }
}

/// The scripts directory and its current catalog.
#[derive(Debug)]
pub struct Scripts {
    dir: PathBuf,
    current: RwLock<Arc<Catalog>>,
}

impl Scripts {
    /// Scans `dir` once. A missing directory gives an empty catalog with a problem.
    pub fn open(dir: &Path) -> Self {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let catalog = scan(&dir);
        Scripts {
            dir,
            current: RwLock::new(Arc::new(catalog)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The catalog as it is now; later reloads do not change the one returned.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rescans the directory and swaps the new catalog in, in one step.
    pub fn reload(&self) -> Arc<Catalog> {
        let fresh = Arc::new(scan(&self.dir));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        fresh
    }
}

/// Files of the scripts directory that are documentation or sidecars, not scripts.
fn is_ignored(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with('.')
        || name.ends_with('~')
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "txt" | "toml" | "json" | "orig" | "swp")
        )
}

/// Builds a catalog from a directory, walked recursively without following links.
pub fn scan(dir: &Path) -> Catalog {
    let mut catalog = Catalog::default();
    if !dir.is_dir() {
        catalog.problems.push(ScriptProblem {
            file: dir.display().to_string(),
            message: "the scripts directory does not exist".into(),
        });
        return catalog;
    }
    let mut files = Vec::new();
    walk(dir, &mut files, &mut catalog.problems);
    files.sort();
    for path in files {
        if is_ignored(&path) {
            continue;
        }
        let file = path.display().to_string();
        let problem = |message: String| ScriptProblem {
            file: file.clone(),
            message,
        };
        let executable = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if !executable {
            catalog
                .problems
                .push(problem("not executable (chmod +x to serve it)".into()));
            continue;
        }
        let name = script_name(dir, &path);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                catalog.problems.push(problem(format!("cannot read: {e}")));
                continue;
            }
        };
        match parse_metadata(&name, &file, &text) {
            Ok(script) => {
                if let Some(previous) = catalog.scripts.get(&name) {
                    catalog.problems.push(problem(format!(
                        "its name '{name}' is taken by {}; this file is not served",
                        previous.filename
                    )));
                    continue;
                }
                catalog.scripts.insert(name, Arc::new(script));
            }
            Err(message) => catalog.problems.push(problem(message)),
        }
    }
    catalog
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<ScriptProblem>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(ScriptProblem {
                file: dir.display().to_string(),
                message: format!("cannot list: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            walk(&path, files, problems);
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            files.push(path);
        }
    }
}

/// Pyjojo's name rule, on the path relative to the directory.
pub fn script_name(dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(dir).unwrap_or(path);
    let text = relative.to_string_lossy();
    let stem = match text.rfind('.') {
        // Only an extension of the file name, not a dot in a directory name, and not a
        // leading dot.
        Some(dot) if dot > text.rfind('/').map_or(0, |s| s + 1) => &text[..dot],
        _ => &text[..],
    };
    let mut name = String::with_capacity(stem.len());
    let mut in_run = false;
    for c in stem.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
            in_run = false;
        } else if !in_run {
            name.push('_');
            in_run = true;
        }
    }
    name
}

/// Reads the Jojo block of a script's text.
pub fn parse_metadata(name: &str, filename: &str, text: &str) -> Result<Script, String> {
    let mut script = Script {
        name: name.to_owned(),
        filename: filename.to_owned(),
        description: None,
        http_method: HttpMethod::Post,
        params: Vec::new(),
        filtered_params: Vec::new(),
        tags: Vec::new(),
        output: OutputMode::Split,
        lock: false,
        timeout_secs: None,
    };
    let mut required: Vec<String> = Vec::new();
    let mut inside = false;
    let mut closed = false;
    for (number, line) in text.lines().enumerate() {
        if !line.starts_with('#') {
            continue;
        }
        let norm = line.trim_start_matches('#').trim();
        if norm.starts_with("-- jojo --") {
            if inside {
                closed = true;
                break;
            }
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = norm.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let at = |message: String| format!("line {}: {message}", number + 1);
        match key {
            "description" => script.description = Some(value.to_owned()),
            "param" => script.params.push(parse_param(value).map_err(at)?),
            "filtered_params" => script.filtered_params.extend(list(value)),
            "tags" => script.tags.extend(list(value)),
            "required" | "required_params" => required.extend(list(value)),
            "http_method" => {
                script.http_method = HttpMethod::parse(value).ok_or_else(|| {
                    at(format!(
                        "http_method '{value}' is not one of get, post, put, delete"
                    ))
                })?
            }
            "output" => {
                script.output = match value.to_ascii_lowercase().as_str() {
                    "split" => OutputMode::Split,
                    "combined" => OutputMode::Combined,
                    _ => return Err(at(format!("output '{value}' is not split or combined"))),
                }
            }
            // Pyjojo took only the exact text `True`; opsbox also takes the spellings
            // people write, but never turns an unknown word into `false` silently.
            "lock" => {
                script.lock = match value.to_ascii_lowercase().as_str() {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => return Err(at(format!("lock '{value}' is not true or false"))),
                }
            }
            "timeout" => script.timeout_secs = Some(parse_duration(value).map_err(at)?),
            _ => tracing::warn!(file = filename, key, "unknown metadata key ignored"),
        }
    }
    if inside && !closed {
        return Err("the -- jojo -- block has no end marker".into());
    }
    for name in &required {
        match script.params.iter_mut().find(|p| &p.name == name) {
            Some(param) => param.required = true,
            None => return Err(format!("required param '{name}' is not declared")),
        }
    }
    for name in &script.filtered_params {
        if let Some(param) = script.params.iter_mut().find(|p| &p.name == name) {
            param.filtered = true;
        }
    }
    let mut seen = std::collections::HashSet::new();
    for param in &script.params {
        if !seen.insert(env_name(&param.name)) {
            return Err(format!("param '{}' is declared twice", param.name));
        }
    }
    Ok(script)
}

fn list(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
}

fn parse_param(value: &str) -> Result<Param, String> {
    let (name, description) = match value.split_once(" - ") {
        Some((n, d)) => (n.trim(), Some(d.trim())),
        None => match value.split_once('-') {
            Some((n, d)) => (n.trim(), Some(d.trim())),
            None => (value.trim(), None),
        },
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(format!(
            "param name '{name}' must be letters, digits, '_' or '-'"
        ));
    }
    Ok(Param {
        name: name.to_owned(),
        description: description.map(str::to_owned),
        required: false,
        filtered: false,
    })
}

/// Seconds from `30`, `30s`, `5m`, `1h`.
pub fn parse_duration(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("timeout '{value}' is not a duration like 30, 30s, 5m or 1h"))?;
    let factor = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("timeout '{value}' has an unknown unit")),
    };
    if n == 0 {
        return Err("timeout must be more than zero".into());
    }
    // A deadline is a point in time: one past what a clock can hold would not be a
    // longer wait but an overflow. A year is more than any run should be given.
    const MAX_SECS: u64 = 366 * 24 * 3600;
    match n.checked_mul(factor) {
        Some(secs) if secs <= MAX_SECS => Ok(secs),
        _ => Err(format!(
            "timeout '{value}' is longer than the longest allowed, 366 days"
        )),
    }
}

/// The environment variable a parameter becomes: upper-cased, `-` as `_`.
pub fn env_name(param: &str) -> String {
    param.to_ascii_uppercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Script, String> {
        parse_metadata("t", "/x/t.sh", text)
    }

    #[test]
    fn full_block() {
        let s = parse(
            "#!/bin/sh\n# -- jojo --\n# description: rotate: at 10:00\n\
             # param: service - unit to rotate\n# param: keep_days\n\
             # param: my-param - with a dash - and another\n\
             # filtered_params: service\n# tags: ops, nightly\n# http_method: PUT\n\
             # output: combined\n# lock: True\n# timeout: 5m\n# required: service\n\
             # -- jojo --\n# see http://x:1\n",
        )
        .unwrap();
        assert_eq!(s.description.as_deref(), Some("rotate: at 10:00"));
        assert_eq!(s.params.len(), 3);
        assert_eq!(s.params[0].name, "service");
        assert!(s.params[0].required && s.params[0].filtered);
        assert_eq!(s.params[1].description, None);
        assert_eq!(s.params[2].name, "my-param");
        assert_eq!(
            s.params[2].description.as_deref(),
            Some("with a dash - and another")
        );
        assert_eq!(s.tags, vec!["ops", "nightly"]);
        assert_eq!(s.http_method, HttpMethod::Put);
        assert_eq!(s.output, OutputMode::Combined);
        assert!(s.lock);
        assert_eq!(s.timeout_secs, Some(300));
    }

    #[test]
    fn no_block_gives_defaults_and_unclosed_block_is_a_problem() {
        let s = parse("#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(s.http_method, HttpMethod::Post);
        assert!(s.params.is_empty());
        assert!(parse("#!/bin/sh\n# -- jojo --\n# param: a\n").is_err());
        assert!(parse("# -- jojo --\n# required: nope\n# -- jojo --\n").is_err());
        assert!(parse("# -- jojo --\n# lock: maybe\n# -- jojo --\n").is_err());
    }

    #[test]
    fn names_follow_pyjojo_without_its_bugs() {
        let dir = Path::new("/srv/x");
        assert_eq!(script_name(dir, Path::new("/srv/x/echo.sh")), "echo");
        assert_eq!(
            script_name(dir, Path::new("/srv/x/sub/inner.py")),
            "sub_inner"
        );
        assert_eq!(
            script_name(dir, Path::new("/srv/x/weird name.v2.sh")),
            "weird_name_v2"
        );
        assert_eq!(
            script_name(Path::new("/srv/x/"), Path::new("/srv/x/echo.sh")),
            "echo"
        );
        assert_eq!(script_name(dir, Path::new("/srv/x/deploy")), "deploy");
        assert_eq!(script_name(dir, Path::new("/srv/x/v1.d/run")), "v1_d_run");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), 30);
        assert_eq!(parse_duration("30s").unwrap(), 30);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0").is_err());
        assert_eq!(parse_duration("8784h").unwrap(), 366 * 24 * 3600);
        let long = parse_duration("8785h").unwrap_err();
        assert!(long.contains("366 days"), "{long}");
        assert!(
            parse_duration("18446744073709551615h").is_err(),
            "no overflow"
        );
        assert!(parse_duration("99999999999999999999999").is_err());
    }
}
