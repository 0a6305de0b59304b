//! Shared set-up of the core integration tests: a real SQLite store in a temp dir, a
//! temp scripts dir with `#!/bin/sh` scripts, and small limits so every test is fast.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsbox_api::{Job, JobState};
use opsbox_core::{Core, CoreConfig};
use tempfile::TempDir;

/// The metadata block of the brief's `echo` script.
pub const ECHO_BLOCK: &str = "\
# -- jojo --
# description: echo
# param: text - what to echo
# required: text
# filtered_params: secret
# param: secret
# timeout: 1
# lock: true
# output: combined
# -- jojo --
";

/// A core over a temp data dir and a temp scripts dir; both live as long as this.
pub struct TestCore {
    pub core: Core,
    pub root: TempDir,
}

impl TestCore {
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn scripts_dir(&self) -> PathBuf {
        self.root.path().join("scripts")
    }

    /// A scratch directory for files the scripts write (markers, pid files...).
    pub fn scratch(&self) -> PathBuf {
        let dir = self.root.path().join("scratch");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

/// The config the tests use: a short kill grace, and the store of [`test_store`].
pub fn config(root: &Path) -> CoreConfig {
    let mut config = CoreConfig::new(root.join("data"), root.join("scripts"));
    config.kill_grace = Duration::from_millis(200);
    config.store = test_store(root);
    config
}

/// See [`opsbox_core::store::test_store`].
pub fn test_store(root: &Path) -> Option<String> {
    opsbox_core::store::test_store(root)
}

/// Writes `<dir>/<file>` as an executable `#!/bin/sh` script: `block` (a Jojo metadata
/// block) then `body`.
pub fn write_script(dir: &Path, file: &str, block: &str, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, format!("#!/bin/sh\n{block}{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A block with the given `key: value` lines.
pub fn block(lines: &[&str]) -> String {
    let mut text = String::from("# -- jojo --\n");
    for line in lines {
        text.push_str("# ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("# -- jojo --\n");
    text
}

/// Opens a core with `scripts` (file name, block, body) written first; `tune` may change
/// the config.
pub async fn open_with(
    scripts: &[(&str, &str, &str)],
    tune: impl FnOnce(&mut CoreConfig),
) -> TestCore {
    let root = tempfile::tempdir().unwrap();
    let scripts_dir = root.path().join("scripts");
    std::fs::create_dir_all(&scripts_dir).unwrap();
    for (file, block, body) in scripts {
        write_script(&scripts_dir, file, block, body);
    }
    let mut config = config(root.path());
    tune(&mut config);
    let core = Core::open(config).await.unwrap();
    TestCore { core, root }
}

pub async fn open(scripts: &[(&str, &str, &str)]) -> TestCore {
    open_with(scripts, |_| {}).await
}

pub fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls `check` every 10 ms until it gives `Some`, failing after `secs` seconds.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the job is in `state`.
pub async fn until_state(core: &Core, name: &str, state: JobState) -> Job {
    eventually(&format!("{name} to be {state}"), 10, || async {
        let job = core.jobs.get(name).await.unwrap();
        (job.state == state).then_some(job)
    })
    .await
}

/// Waits until the job's stored stdout has at least `n` lines, and returns them.
pub async fn until_lines(core: &Core, name: &str, n: usize) -> Vec<String> {
    eventually(&format!("{n} lines of output from {name}"), 10, || async {
        let out = core.jobs.output(name).await.unwrap();
        (out.stdout.len() >= n).then_some(out.stdout)
    })
    .await
}

/// True while the process exists and is not a zombie (in a container, PID 1 may never
/// reap orphans).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

/// Waits (briefly) for a process to be gone: a SIGKILLed process may take a moment.
pub async fn until_dead(pid: i32) {
    eventually(&format!("process {pid} to be gone"), 5, || async {
        (!alive(pid)).then_some(())
    })
    .await
}
