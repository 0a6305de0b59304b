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
    /// Tasks beyond the node's slots wait here for one to end (see [`Gate`]).
    gate: Gate,
}

impl Executor {
    pub fn new(runtime: Runtime, work: PathBuf, node_id: &str) -> Self {
        Executor {
            runtime,
            work,
            node_id: node_id.to_owned(),
            idle: Arc::default(),
            gate: Gate::default(),
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
                slots,
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
                            slots,
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
        slots: Option<u32>,
        out: &mpsc::UnboundedSender<AgentMessage>,
    ) -> AgentMessage {
        let ended = |reason: String, killed: bool| AgentMessage::Finished {
            job: job.to_owned(),
            task: task.to_owned(),
            exit_code: None,
            signal: None,
            reason: Some(reason),
            results: Vec::new(),
            killed,
        };
        let failed = |reason: String| ended(reason, false);
        // Registered before it waits for a slot: a kill reaches a waiting task, and a
        // reconnect reports it as this node's.
        let reservation = match self.runtime.reserve(&key(job, task)) {
            Ok(reservation) => reservation,
            Err(e) => return failed(e.to_string()),
        };
        let _permit = match slots {
            Some(slots) => match reservation.wait_for(self.gate.enter(slots)).await {
                Some(permit) => Some(permit),
                None => return ended("killed".into(), true),
            },
            None => None,
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
        env.push((crate::AGENT_PID_ENV.into(), std::process::id().to_string()));
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
        let outcome = reservation.prepare(spec).run(pieces_tx).await;
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

/// How many of the tasks a server sent run at once. A server may send a node more tasks
/// than it has slots (a prefetch, see the agent's `--prefetch`), so that a slot that
/// frees starts the next task at once instead of waiting for the end to reach the server
/// and a new task to come back; the extra ones wait here, in the order they came. The
/// slot count travels with each task (the server's view of the node, which an operator
/// can change), so the gate always follows the server.
#[derive(Debug, Clone, Default)]
struct Gate {
    state: Arc<Mutex<GateState>>,
}

#[derive(Debug, Default)]
struct GateState {
    active: u32,
    slots: u32,
    /// Tasks waiting for a slot; a waiter that was killed meanwhile is skipped (its
    /// receiver is gone, so the permit sent to it comes back and goes to the next).
    waiting: std::collections::VecDeque<tokio::sync::oneshot::Sender<Permit>>,
}

/// A task's slot; dropping it frees the slot for the next waiting task.
#[derive(Debug)]
struct Permit {
    gate: Gate,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Every critical section is a few counter updates and a queue push or pop.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot: at once while fewer than `slots` tasks run, else after others end.
    async fn enter(&self, slots: u32) -> Permit {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut state = self.lock();
            state.slots = slots.max(1);
            if state.active < state.slots && state.waiting.is_empty() {
                state.active += 1;
                return Permit { gate: self.clone() };
            }
            state.waiting.push_back(tx);
        }
        // More slots than before: the ones waiting may go now.
        self.hand_over();
        match rx.await {
            Ok(permit) => permit,
            // A sender is only dropped unsent with the gate itself, which `self` holds.
            Err(_) => {
                self.lock().active += 1;
                Permit { gate: self.clone() }
            }
        }
    }

    fn release(&self) {
        self.lock().active -= 1;
        self.hand_over();
    }

    /// Gives free slots to the tasks waiting longest.
    fn hand_over(&self) {
        loop {
            let next = {
                let mut state = self.lock();
                if state.active >= state.slots {
                    return;
                }
                let Some(next) = state.waiting.pop_front() else {
                    return;
                };
                state.active += 1;
                next
            };
            // The lock is not held here: a waiter that is gone hands the permit back
            // through its drop (release), which takes the lock again.
            let _ = next.send(Permit { gate: self.clone() });
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
        executor.handle(run_message(task, script, None), tx);
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

    fn run_message(task: &str, script: &str, slots: Option<u32>) -> ServerMessage {
        ServerMessage::Run {
            job: "job@1".into(),
            task: task.into(),
            script: "task.sh".into(),
            program: b64().encode(script),
            env: BTreeMap::new(),
            timeout_secs: Some(10),
            inputs: Vec::new(),
            slots,
        }
    }

    /// The next `Finished`, skipping output.
    async fn next_end(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> AgentMessage {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(AgentMessage::Output { .. })) => {}
                Ok(Some(end)) => return end,
                other => panic!("no end came: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn tasks_beyond_the_slots_wait_for_one_to_end_and_a_kill_reaches_them() {
        let work = tempfile::tempdir().unwrap();
        let executor = executor(work.path());
        let marks = tempfile::tempdir().unwrap();
        let marks = marks.path().display().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // One slot: the second task waits for the first, so it sees the first's mark.
        let first = format!(
            "#!/bin/sh
sleep 0.3
touch {marks}/first
"
        );
        let second = format!(
            "#!/bin/sh
test -e {marks}/first || exit 7
touch {marks}/second
"
        );
        executor.handle(run_message("map:0", &first, Some(1)), tx.clone());
        executor.handle(run_message("map:1", &second, Some(1)), tx.clone());
        let third = format!(
            "#!/bin/sh
touch {marks}/third
"
        );
        executor.handle(run_message("map:2", &third, Some(1)), tx.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut running = executor.running();
        running.sort();
        assert_eq!(
            running,
            ["job@1/map:0", "job@1/map:1", "job@1/map:2"],
            "waiting tasks are the node's too (a reconnect reports them)"
        );
        // A kill of a waiting task ends it without starting it.
        executor.handle(
            ServerMessage::Kill {
                job: "job@1".into(),
                task: "map:2".into(),
            },
            tx.clone(),
        );
        let mut ends = Vec::new();
        for _ in 0..3 {
            if let AgentMessage::Finished {
                task,
                exit_code,
                killed,
                ..
            } = next_end(&mut rx).await
            {
                ends.push((task, exit_code, killed));
            }
        }
        assert_eq!(
            ends,
            [
                ("map:2".to_owned(), None, true),
                ("map:0".to_owned(), Some(0), false),
                ("map:1".to_owned(), Some(0), false),
            ]
        );
        assert!(
            !Path::new(&format!("{marks}/third")).exists(),
            "never started"
        );
        assert!(executor.running().is_empty());

        // More slots (the server's count changed): both start at once.
        let slow = format!(
            "#!/bin/sh
sleep 0.3
touch {marks}/slow
"
        );
        let quick = format!(
            "#!/bin/sh
test -e {marks}/slow && exit 7
exit 0
"
        );
        executor.handle(run_message("map:3", &slow, Some(2)), tx.clone());
        executor.handle(run_message("map:4", &quick, Some(2)), tx.clone());
        let AgentMessage::Finished {
            task, exit_code, ..
        } = next_end(&mut rx).await
        else {
            unreachable!()
        };
        assert_eq!((task.as_str(), exit_code), ("map:4", Some(0)));
        next_end(&mut rx).await;
    }
}
