//! The node side of the agent protocol: turns [`ServerMessage::Run`] and
//! [`ServerMessage::Kill`] into processes on this machine and reports their output and
//! end as [`AgentMessage`]s. The same code serves a remote `opsbox agent` (messages
//! over a WebSocket, see [`crate::client`]) and the server's own `local` node (messages
//! over in-process channels), so a task runs the same way wherever it lands.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

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

/// Runs the tasks a server sends.
#[derive(Debug, Clone)]
pub struct Executor {
    runtime: Runtime,
    /// Each task gets `<work>/<n>/` with its script, inputs and results, removed after.
    work: PathBuf,
    node_id: String,
}

impl Executor {
    pub fn new(runtime: Runtime, work: PathBuf, node_id: &str) -> Self {
        Executor {
            runtime,
            work,
            node_id: node_id.to_owned(),
        }
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
        let dir = match tempfile::Builder::new()
            .prefix("task-")
            .tempdir_in(&self.work)
        {
            Ok(dir) => dir,
            Err(e) => {
                // The work directory may not exist yet (first task) or was removed.
                if let Err(e2) = std::fs::create_dir_all(&self.work) {
                    return failed(format!("cannot create {}: {e2}", self.work.display()));
                }
                match tempfile::Builder::new()
                    .prefix("task-")
                    .tempdir_in(&self.work)
                {
                    Ok(dir) => dir,
                    Err(_) => return failed(format!("cannot create a task directory: {e}")),
                }
            }
        };
        let prepared = prepare_dir(dir.path(), script, program, &inputs);
        let (program_path, results, inputs_dir) = match prepared {
            Ok(paths) => paths,
            Err(reason) => return failed(reason),
        };
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.push(("OPSBOX_RESULTS".into(), results.display().to_string()));
        env.push(("OPSBOX_INPUTS_DIR".into(), inputs_dir.display().to_string()));
        env.push(("OPSBOX_NODE".into(), self.node_id.clone()));
        let spec = TaskSpec {
            id: key(job, task),
            program: program_path,
            args: Vec::new(),
            env,
            cwd: Some(dir.path().to_path_buf()),
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
        match outcome {
            Err(e) => failed(e.to_string()),
            Ok(exit) => {
                let (files, problem) = collect_results(&results);
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

/// Writes the script and the inputs; returns the script's path, the results directory
/// and the inputs directory.
fn prepare_dir(
    dir: &Path,
    script: &str,
    program: &str,
    inputs: &[FileData],
) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let bytes = b64()
        .decode(program)
        .map_err(|e| format!("the script of the task is not base64: {e}"))?;
    let name = Path::new(script)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "script".into());
    let bin = dir.join("bin");
    let results = dir.join("results");
    let inputs_dir = dir.join("inputs");
    for d in [&bin, &results, &inputs_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let path = bin.join(name);
    std::fs::write(&path, &bytes).map_err(|e| format!("cannot write the script: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make the script executable: {e}"))?;
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
    Ok((path, results, inputs_dir))
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
