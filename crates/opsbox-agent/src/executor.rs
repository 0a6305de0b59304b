//! The node side of the agent protocol: turns [`ServerMessage::Run`] and
//! [`ServerMessage::Kill`] into processes on this machine and reports their output and
//! end as [`AgentMessage`]s. The same code serves a remote `opsbox agent` (messages
//! over a WebSocket, see [`crate::client`]) and the server's own `local` node (messages
//! over in-process channels), so a task runs the same way wherever it lands.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use base64::Engine as _;
use opsbox_api::{AgentMessage, FileData, ServerMessage};
use tokio::sync::mpsc;

use crate::{Interruption, Runtime, TaskSpec};

/// Result files sent back per task, at most (bytes, all files together): results are
/// meant for small outputs; bigger data belongs somewhere the reduce can fetch it from.
pub const MAX_RESULT_BYTES: u64 = 64 * 1024 * 1024;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Task directories kept for reuse, at most.
const IDLE_DIRS: usize = 64;

/// Runs the tasks a server sends.
#[derive(Debug, Clone)]
pub struct Executor {
    runtime: Runtime,
    /// Each task gets a directory `<work>/task-*/` (its working directory, with
    /// `results/` and `inputs/`); scripts are kept once per content under
    /// `<work>/programs/`.
    work: PathBuf,
    node_id: String,
    /// Task directories a task left empty, for the next tasks. Creating and removing
    /// three directories per task was most of the agent's cost for short tasks (each
    /// directory is an inode and a block, and freeing a block can mean a discard).
    idle: Arc<Mutex<Vec<PathBuf>>>,
}

impl Executor {
    pub fn new(runtime: Runtime, work: PathBuf, node_id: &str) -> Self {
        Executor {
            runtime,
            work,
            node_id: node_id.to_owned(),
            idle: Arc::default(),
        }
    }

    /// An empty task directory with empty `results/` and `inputs/`: a reused one, or
    /// a new one.
    fn task_dir(&self) -> Result<PathBuf, String> {
        if let Some(dir) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(dir);
        }
        let create = || {
            tempfile::Builder::new()
                .prefix("task-")
                .tempdir_in(&self.work)
                .map(|dir| dir.keep())
        };
        let dir = match create() {
            Ok(dir) => dir,
            Err(e) => {
                // The work directory may not exist yet (first task) or was removed.
                std::fs::create_dir_all(&self.work)
                    .map_err(|e2| format!("cannot create {}: {e2}", self.work.display()))?;
                create().map_err(|_| format!("cannot create a task directory: {e}"))?
            }
        };
        for sub in ["results", "inputs"] {
            if let Err(e) = std::fs::create_dir(dir.join(sub)) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("cannot create {}: {e}", dir.join(sub).display()));
            }
        }
        Ok(dir)
    }

    /// After a task: its directory is kept for the next task when the task left
    /// nothing in it (the usual case), and removed otherwise.
    fn release(&self, dir: PathBuf) {
        let empty = |d: &Path| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none());
        let only_subdirs = std::fs::read_dir(&dir).is_ok_and(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name() == "results" || e.file_name() == "inputs")
        });
        if only_subdirs && empty(&dir.join("results")) && empty(&dir.join("inputs")) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_DIRS {
                idle.push(dir);
                return;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The script's file, written once per content: tasks of one job (and every run of
    /// one script) share it. Its name is the script's own, so `$0` reads as before.
    fn program(&self, script: &str, program: &str) -> Result<PathBuf, String> {
        let bytes = b64()
            .decode(program)
            .map_err(|e| format!("the script of the task is not base64: {e}"))?;
        let name = Path::new(script)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "script".into());
        let digest = Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update([0])
            .chain_update(&bytes)
            .finalize();
        let dir = self.work.join("programs").join(hex::encode(digest));
        let path = dir.join(&name);
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // Written aside and renamed, so a task never runs a half-written script (two
        // tasks may write the same one at once: either rename wins, same bytes).
        let mut file = tempfile::Builder::new()
            .prefix(".new-")
            .tempfile_in(&dir)
            .map_err(|e| format!("cannot write the script: {e}"))?;
        file.write_all(&bytes)
            .map_err(|e| format!("cannot write the script: {e}"))?;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot make the script executable: {e}"))?;
        file.persist(&path)
            .map_err(|e| format!("cannot write the script: {e}"))?;
        Ok(path)
    }

    /// Task keys (`job/task`) running now, for `Hello` after a reconnect.
    pub fn running(&self) -> Vec<String> {
        self.runtime.running()
    }

    /// Stops every task (the agent is shutting down).
    pub fn kill_all(&self) {
        self.runtime.kill_all();
    }

    /// Acts on one server message; a `Run` starts in the background and reports to
    /// `out` until its `Finished`.
    pub fn handle(&self, message: ServerMessage, out: mpsc::UnboundedSender<AgentMessage>) {
        match message {
            ServerMessage::Run {
                job,
                task,
                script,
                program,
                env,
                timeout_secs,
                inputs,
            } => {
                let this = self.clone();
                tokio::spawn(async move {
                    let finished = this
                        .run(
                            &job,
                            &task,
                            &script,
                            &program,
                            env,
                            timeout_secs,
                            inputs,
                            &out,
                        )
                        .await;
                    let _ = out.send(finished);
                });
            }
            ServerMessage::Kill { job, task } => {
                self.runtime.kill(&key(&job, &task));
            }
            ServerMessage::Welcome { .. } | ServerMessage::Refused { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        job: &str,
        task: &str,
        script: &str,
        program: &str,
        env: BTreeMap<String, String>,
        timeout_secs: Option<u64>,
        inputs: Vec<FileData>,
        out: &mpsc::UnboundedSender<AgentMessage>,
    ) -> AgentMessage {
        let failed = |reason: String| AgentMessage::Finished {
            job: job.to_owned(),
            task: task.to_owned(),
            exit_code: None,
            signal: None,
            reason: Some(reason),
            results: Vec::new(),
            killed: false,
        };
        let program_path = match self.program(script, program) {
            Ok(path) => path,
            Err(reason) => return failed(reason),
        };
        let dir = match self.task_dir() {
            Ok(dir) => dir,
            Err(reason) => return failed(reason),
        };
        let (results, inputs_dir) = (dir.join("results"), dir.join("inputs"));
        if let Err(reason) = write_inputs(&inputs_dir, &inputs) {
            let _ = std::fs::remove_dir_all(&dir);
            return failed(reason);
        }
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.push(("OPSBOX_RESULTS".into(), results.display().to_string()));
        env.push(("OPSBOX_INPUTS_DIR".into(), inputs_dir.display().to_string()));
        env.push(("OPSBOX_NODE".into(), self.node_id.clone()));
        let spec = TaskSpec {
            id: key(job, task),
            program: program_path,
            args: Vec::new(),
            env,
            cwd: Some(dir.clone()),
            timeout: timeout_secs.map(Duration::from_secs),
            combined_output: false,
        };
        let (pieces_tx, mut pieces) = mpsc::channel::<crate::OutputPiece>(64);
        let forward = {
            let out = out.clone();
            let (job, task) = (job.to_owned(), task.to_owned());
            tokio::spawn(async move {
                while let Some(piece) = pieces.recv().await {
                    let _ = out.send(AgentMessage::Output {
                        job: job.clone(),
                        task: task.clone(),
                        stream: piece.stream,
                        data: b64().encode(&piece.data),
                    });
                }
            })
        };
        let outcome = self.runtime.run(spec, pieces_tx).await;
        // Every piece is forwarded before the end is reported.
        let _ = forward.await;
        let collected = outcome.as_ref().is_ok().then(|| collect_results(&results));
        self.release(dir);
        match outcome {
            Err(e) => failed(e.to_string()),
            Ok(exit) => {
                let (files, problem) = collected.unwrap_or_default();
                let (reason, killed) = match exit.interrupted {
                    Some(Interruption::Killed) => (Some("killed".to_owned()), true),
                    Some(Interruption::TimedOut(t)) => {
                        (Some(format!("timed out after {}s", t.as_secs())), false)
                    }
                    None => (problem, false),
                };
                AgentMessage::Finished {
                    job: job.to_owned(),
                    task: task.to_owned(),
                    exit_code: exit.code,
                    signal: exit.signal,
                    reason,
                    results: files,
                    killed,
                }
            }
        }
    }
}

/// The runtime key of a task.
pub fn key(job: &str, task: &str) -> String {
    format!("{job}/{task}")
}

/// Writes a task's input files (the reduce task's) into its `inputs/`.
fn write_inputs(inputs_dir: &Path, inputs: &[FileData]) -> Result<(), String> {
    for file in inputs {
        let relative = safe_relative(&file.path)
            .ok_or_else(|| format!("refused input path '{}'", file.path))?;
        let data = b64()
            .decode(&file.data)
            .map_err(|e| format!("input '{}' is not base64: {e}", file.path))?;
        let target = inputs_dir.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&target, data)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    Ok(())
}

/// A path that stays inside the directory it is joined to (no `..`, not absolute).
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

/// The files under `results`, base64, up to [`MAX_RESULT_BYTES`]; the second value
/// says what was left out, if anything.
fn collect_results(results: &Path) -> (Vec<FileData>, Option<String>) {
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut skipped = Vec::new();
    let mut stack = vec![results.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let relative = path
                .strip_prefix(results)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if total + size > MAX_RESULT_BYTES {
                skipped.push(relative);
                continue;
            }
            match std::fs::read(&path) {
                Ok(data) => {
                    total += size;
                    files.push(FileData {
                        path: relative,
                        data: b64().encode(data),
                    });
                }
                Err(_) => skipped.push(relative),
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let problem = (!skipped.is_empty()).then(|| {
        format!(
            "result files over the {} MiB limit were not sent: {}",
            MAX_RESULT_BYTES / (1024 * 1024),
            skipped.join(", ")
        )
    });
    (files, problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script as a task; answers its stdout and its `Finished`.
    async fn run(executor: &Executor, task: &str, script: &str) -> (String, AgentMessage) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        executor.handle(
            ServerMessage::Run {
                job: "job@1".into(),
                task: task.into(),
                script: "task.sh".into(),
                program: b64().encode(script),
                env: BTreeMap::new(),
                timeout_secs: Some(10),
                inputs: Vec::new(),
            },
            tx,
        );
        let mut stdout = Vec::new();
        loop {
            match rx.recv().await.expect("the task reports its end") {
                AgentMessage::Output { data, .. } => stdout.extend(b64().decode(data).unwrap()),
                finished => return (String::from_utf8(stdout).unwrap(), finished),
            }
        }
    }

    fn executor(work: &Path) -> Executor {
        Executor::new(
            Runtime::new(Duration::from_secs(1)),
            work.to_path_buf(),
            "n1",
        )
    }

    #[tokio::test]
    async fn a_task_directory_is_reused_only_when_its_task_left_it_empty() {
        let work = tempfile::tempdir().unwrap();
        let executor = executor(work.path());
        let (first, _) = run(&executor, "map:0", "#!/bin/sh\npwd\n").await;
        let (second, _) = run(&executor, "map:1", "#!/bin/sh\npwd\n").await;
        assert_eq!(first, second, "an empty directory is used again");

        // A result file: sent with the end, and the directory is not used again.
        let (third, finished) = run(
            &executor,
            "map:2",
            "#!/bin/sh\npwd\necho 42 > \"$OPSBOX_RESULTS/answer\"\n",
        )
        .await;
        assert_eq!(third, first);
        let AgentMessage::Finished {
            results, exit_code, ..
        } = finished
        else {
            panic!("not an end: {finished:?}")
        };
        assert_eq!(exit_code, Some(0));
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].path, "answer");
        assert_eq!(b64().decode(&results[0].data).unwrap(), b"42\n");
        assert!(
            !Path::new(third.trim()).exists(),
            "a used directory is removed"
        );

        // Something left in the working directory: not used again either.
        let (fourth, _) = run(&executor, "map:3", "#!/bin/sh\npwd\ntouch junk\n").await;
        assert_ne!(fourth, first);
        let (fifth, _) = run(&executor, "map:4", "#!/bin/sh\npwd\n").await;
        assert_ne!(fifth, fourth);
        assert!(!Path::new(fourth.trim()).exists());
    }

    #[tokio::test]
    async fn a_script_is_written_once_per_content() {
        let work = tempfile::tempdir().unwrap();
        let executor = executor(work.path());
        let programs = || {
            std::fs::read_dir(work.path().join("programs"))
                .unwrap()
                .count()
        };
        let (out, _) = run(&executor, "map:0", "#!/bin/sh\necho \"$0\"\n").await;
        assert!(
            out.trim().ends_with("/task.sh"),
            "$0 keeps the script's name: {out}"
        );
        run(&executor, "map:1", "#!/bin/sh\necho \"$0\"\n").await;
        assert_eq!(programs(), 1);
        let (out, _) = run(&executor, "map:2", "#!/bin/sh\necho other\n").await;
        assert_eq!(out, "other\n");
        assert_eq!(programs(), 2);
    }
}
