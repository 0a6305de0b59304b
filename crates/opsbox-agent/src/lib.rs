//! The node runtime: runs one task as a process in its own process group, streams its
//! output as it comes, and makes sure that when the task ends, for whatever reason
//! (exit, timeout, kill, server shutdown), no process of its group is left behind.
//!
//! The server embeds one [`Runtime`] as its "local" node; remote agents run the same
//! runtime, so a task behaves the same wherever it is placed.

pub mod client;
pub mod executor;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use opsbox_api::Stream;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, Notify};

/// What to run. Built by the job service from a script and its parameters.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Key under which the task can be killed (the job name).
    pub id: String,
    /// Executable, run directly (never through a shell).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The whole environment of the process: nothing is inherited from the server.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// After this, the process group gets SIGTERM, then SIGKILL after [`Runtime::grace`].
    pub timeout: Option<Duration>,
    /// Give stdout and stderr one pipe, so that the merged output keeps its real order.
    pub combined_output: bool,
}

/// A piece of output, in the order it was read from its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPiece {
    pub stream: Stream,
    pub data: Bytes,
}

/// Why a task ended other than by exiting on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// Its timeout passed.
    TimedOut(Duration),
    /// [`Runtime::kill`] (or shutdown) asked for it.
    Killed,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    pub interrupted: Option<Interruption>,
}

impl Exit {
    /// The Pyjojo-style return code: the exit status, or minus the signal number.
    pub fn retcode(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => -signal,
            (None, None) => -1,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0) && self.interrupted.is_none()
    }
}

/// Errors that prevent a task from starting at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the output pipe: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("a task with id {0} is already running")]
    Duplicate(String),
}

/// Runs tasks and keeps track of the running ones, so that they can be killed.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Running tasks by id: the kill switch of each.
    running: Mutex<HashMap<String, Arc<Notify>>>,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    grace: Duration,
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new(Duration::from_secs(2))
    }
}

impl Runtime {
    /// A runtime that waits `grace` after SIGTERM before it sends SIGKILL.
    pub fn new(grace: Duration) -> Self {
        Runtime {
            inner: Arc::new(Inner {
                running: Mutex::new(HashMap::new()),
                grace,
            }),
        }
    }

    pub fn grace(&self) -> Duration {
        self.inner.grace
    }

    /// Ids of the tasks running now.
    pub fn running(&self) -> Vec<String> {
        self.lock_running().keys().cloned().collect()
    }

    /// Asks a running task to stop. Returns false when no task has that id.
    pub fn kill(&self, id: &str) -> bool {
        match self.lock_running().get(id) {
            Some(switch) => {
                // notify_one stores a permit, so a kill that races the task's start
                // is not lost.
                switch.notify_one();
                true
            }
            None => false,
        }
    }

    /// Stops every running task (server shutdown).
    pub fn kill_all(&self) {
        for switch in self.lock_running().values() {
            switch.notify_one();
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // critical section is one insert/remove/read), so a poisoned lock is still sound.
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a task to its end, sending its output to `output` as it comes.
    ///
    /// When this returns, the process and every process left in its group are gone.
    pub async fn run(
        &self,
        spec: TaskSpec,
        output: mpsc::Sender<OutputPiece>,
    ) -> Result<Exit, RunError> {
        self.prepare(spec)?.run(output).await
    }

    /// Registers a task under its id without starting it. From now on [`Runtime::kill`]
    /// reaches it: a kill before [`Prepared::run`] makes the run stop at once. Callers
    /// that must not lose a kill racing the start register first, then check their own
    /// flags, then run.
    pub fn prepare(&self, spec: TaskSpec) -> Result<Prepared, RunError> {
        Ok(self.reserve(&spec.id)?.prepare(spec))
    }

    /// Registers a task id before its spec exists (a task that waits for a free slot):
    /// it is listed by [`Runtime::running`] and [`Runtime::kill`] reaches it.
    pub fn reserve(&self, id: &str) -> Result<Reservation, RunError> {
        let switch = Arc::new(Notify::new());
        let mut running = self.lock_running();
        if running.contains_key(id) {
            return Err(RunError::Duplicate(id.to_owned()));
        }
        running.insert(id.to_owned(), switch.clone());
        Ok(Reservation {
            runtime: self.clone(),
            id: id.to_owned(),
            switch,
        })
    }

    async fn run_registered(
        &self,
        spec: &TaskSpec,
        output: mpsc::Sender<OutputPiece>,
        switch: &Notify,
        started: Option<oneshot::Sender<u32>>,
    ) -> Result<Exit, RunError> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            // Its own process group, so a timeout or kill reaches every descendant.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }

        let mut readers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let mut child = if spec.combined_output {
            let (reader, writer) = os_pipe::pipe().map_err(RunError::Pipe)?;
            let writer2 = writer.try_clone().map_err(RunError::Pipe)?;
            cmd.stdout(Stdio::from(writer)).stderr(Stdio::from(writer2));
            let child = spawn(&mut cmd, spec).await?;
            // Our copies of the write end must be closed, or the reader never sees EOF.
            drop(cmd);
            let receiver =
                tokio::net::unix::pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(reader))
                    .map_err(RunError::Pipe)?;
            readers.push(tokio::spawn(pump(receiver, Stream::Stdout, output)));
            child
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = spawn(&mut cmd, spec).await?;
            drop(cmd);
            if let Some(out) = child.stdout.take() {
                readers.push(tokio::spawn(pump(out, Stream::Stdout, output.clone())));
            }
            if let Some(err) = child.stderr.take() {
                readers.push(tokio::spawn(pump(err, Stream::Stderr, output)));
            }
            child
        };
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        if let (Some(started), Some(id)) = (started, child.id()) {
            let _ = started.send(id);
        }

        let timeout = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let (status, interrupted) = tokio::select! {
            status = child.wait() => (status, None),
            _ = timeout => {
                let t = spec.timeout.unwrap_or_default();
                (self.stop(&mut child, pgid).await, Some(Interruption::TimedOut(t)))
            }
            _ = switch.notified() => {
                (self.stop(&mut child, pgid).await, Some(Interruption::Killed))
            }
        };
        // The main process is gone; whatever it left running in its group goes too.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        // Readers end at EOF, which comes once every holder of the pipe is gone. A process
        // that left the group (setsid) could hold it open forever: bound the wait.
        for reader in readers {
            let abort = reader.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .is_err()
            {
                abort.abort();
            }
        }

        let status = status.map_err(|source| RunError::Spawn {
            program: spec.program.display().to_string(),
            source,
        })?;
        Ok(Exit {
            code: status.code(),
            signal: status.signal(),
            interrupted,
        })
    }

    /// SIGTERM to the group, then SIGKILL after the grace period; returns the exit status.
    async fn stop(
        &self,
        child: &mut tokio::process::Child,
        pgid: Option<Pid>,
    ) -> std::io::Result<std::process::ExitStatus> {
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGTERM);
        }
        match tokio::time::timeout(self.inner.grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                child.wait().await
            }
        }
    }
}

/// A task id registered with no process yet. Dropping it unregisters the id.
#[derive(Debug)]
pub struct Reservation {
    runtime: Runtime,
    id: String,
    switch: Arc<Notify>,
}

impl Reservation {
    /// Waits for `gate`, unless the task is killed first: then `None`, and nothing was
    /// started.
    pub async fn wait_for<T>(&self, gate: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.switch.notified() => None,
            value = gate => Some(value),
        }
    }

    /// The task's spec is known: ready to run. `spec.id` is replaced by the reserved id.
    pub fn prepare(self, mut spec: TaskSpec) -> Prepared {
        spec.id.clone_from(&self.id);
        Prepared {
            reservation: self,
            spec,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.runtime.lock_running().remove(&self.id);
    }
}

/// A registered task, ready to run. Dropping it unregisters the id.
#[derive(Debug)]
pub struct Prepared {
    reservation: Reservation,
    spec: TaskSpec,
}

impl Prepared {
    pub async fn run(self, output: mpsc::Sender<OutputPiece>) -> Result<Exit, RunError> {
        let r = &self.reservation;
        r.runtime
            .run_registered(&self.spec, output, &r.switch, None)
            .await
    }

    /// Like [`Prepared::run`], and sends the process id (which is also its process group
    /// id) to `started` as soon as the process exists.
    pub async fn run_reporting(
        self,
        output: mpsc::Sender<OutputPiece>,
        started: oneshot::Sender<u32>,
    ) -> Result<Exit, RunError> {
        let r = &self.reservation;
        r.runtime
            .run_registered(&self.spec, output, &r.switch, Some(started))
            .await
    }
}

/// Kills what is left of a task that a previous server process started and could not
/// stop (it was killed itself): the process group `pid`, but only if its leader still
/// carries `OPSBOX_JOB=<task_id>` in its environment, so a recycled pid is never hit.
/// Returns true when a group was killed.
pub fn reap_orphan(pid: u32, task_id: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("OPSBOX_JOB={task_id}");
    let ours = environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes());
    ours && killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
}

/// Set in every task's environment to the process id of the agent (or server) that
/// started it, so a later one can tell its predecessor's tasks from a live neighbour's.
pub const AGENT_PID_ENV: &str = "OPSBOX_AGENT_PID";

/// Kills the tasks of node `node_id` that an agent (or server) killed outright left
/// running: processes whose environment says `OPSBOX_NODE=<node_id>` and names, in
/// [`AGENT_PID_ENV`], a process that is gone or started after them (a new process
/// under a recycled pid). Tasks of a live agent of the same node id on this host (two
/// servers on one machine each have a node `local`) are left alone. Each is killed with
/// its process group. Returns how many processes were found.
pub fn reap_orphaned_tasks(node_id: &str) -> usize {
    use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};
    let mut system = System::new();
    system.refresh_processes_specifics(
        ProcessesToUpdate::All,
        true,
        ProcessRefreshKind::nothing().with_environ(UpdateKind::Always),
    );
    let node = format!("OPSBOX_NODE={node_id}");
    let agent_key = format!("{AGENT_PID_ENV}=");
    let me = std::process::id();
    let mut found = 0;
    for (pid, process) in system.processes() {
        let environ = process.environ();
        if !environ
            .iter()
            .any(|e| e.as_encoded_bytes() == node.as_bytes())
        {
            continue;
        }
        let Some(agent) = environ
            .iter()
            .find_map(|e| e.to_str()?.strip_prefix(&agent_key)?.parse::<u32>().ok())
        else {
            continue;
        };
        // Start times are in seconds: a task started in the second its agent did counts
        // as that agent's, so a live agent's task is never taken for an orphan.
        let orphaned = system
            .process(sysinfo::Pid::from_u32(agent))
            .is_none_or(|a| a.start_time() > process.start_time());
        if !orphaned || pid.as_u32() == me {
            continue;
        }
        found += 1;
        let target = Pid::from_raw(pid.as_u32() as i32);
        // The group first (a task leads its own); then the process itself, should it
        // have left the group.
        let _ = killpg(target, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(target, Signal::SIGKILL);
    }
    found
}

/// Starts the process. "Text file busy" (ETXTBSY) is retried for a moment: it means the
/// script is still open for writing somewhere, which is brief when a deploy tool has
/// just written it, or when another thread of this process forked while holding it
/// open (the child closes it at its own exec).
async fn spawn(cmd: &mut Command, spec: &TaskSpec) -> Result<tokio::process::Child, RunError> {
    const ETXTBSY: i32 = 26;
    let mut delay = Duration::from_millis(2);
    let mut waited = Duration::ZERO;
    loop {
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && waited < Duration::from_secs(1) => {
                tokio::time::sleep(delay).await;
                waited += delay;
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(RunError::Spawn {
                    program: spec.program.display().to_string(),
                    source,
                })
            }
        }
    }
}

/// Copies a stream into the output channel until EOF.
async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    output: mpsc::Sender<OutputPiece>,
) {
    // Read into spare capacity and hand out what was filled: no zeroing and no copy
    // per read (most tasks print a few bytes; the buffer is reused until it is full).
    const CHUNK: usize = 16 * 1024;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let piece = OutputPiece {
                    stream,
                    data: buf.split().freeze(),
                };
                if output.send(piece).await.is_err() {
                    // Nobody listens any more; keep draining so the process never blocks
                    // on a full pipe.
                    continue;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("t.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn spec(program: PathBuf) -> TaskSpec {
        TaskSpec {
            id: "t".into(),
            program,
            args: vec![],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            timeout: None,
            combined_output: false,
        }
    }

    async fn collect(rt: &Runtime, spec: TaskSpec) -> (Exit, Vec<OutputPiece>) {
        let (tx, mut rx) = mpsc::channel(16);
        let collector = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(p) = rx.recv().await {
                all.push(p);
            }
            all
        });
        let exit = rt.run(spec, tx).await.unwrap();
        (exit, collector.await.unwrap())
    }

    fn text(pieces: &[OutputPiece], stream: Stream) -> String {
        pieces
            .iter()
            .filter(|p| p.stream == stream)
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn captures_both_streams_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::default();
        let (exit, out) = collect(
            &rt,
            spec(script(dir.path(), "echo out; echo err >&2; exit 3")),
        )
        .await;
        assert_eq!(exit.code, Some(3));
        assert_eq!(text(&out, Stream::Stdout), "out\n");
        assert_eq!(text(&out, Stream::Stderr), "err\n");
    }

    #[tokio::test]
    async fn combined_output_keeps_order_in_one_stream() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::default();
        let mut s = spec(script(dir.path(), "echo one; echo two >&2; echo three"));
        s.combined_output = true;
        let (exit, out) = collect(&rt, s).await;
        assert!(exit.success());
        assert_eq!(text(&out, Stream::Stdout), "one\ntwo\nthree\n");
        assert_eq!(text(&out, Stream::Stderr), "");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        let rt = Runtime::new(Duration::from_millis(200));
        let body = format!("sleep 300 & echo $! > {}; wait", marker.display());
        let mut s = spec(script(dir.path(), &body));
        s.timeout = Some(Duration::from_millis(300));
        let (exit, _) = collect(&rt, s).await;
        assert_eq!(
            exit.interrupted,
            Some(Interruption::TimedOut(Duration::from_millis(300)))
        );
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL is sent; on a loaded machine the kernel may take a moment to finish
        // the process off.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "background child {pid} survived the timeout");
    }

    /// True while the process exists and is not a zombie waiting for a reaper (in a
    /// container, PID 1 may never reap orphans).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn kill_stops_a_running_task() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(Duration::from_millis(200));
        let s = spec(script(dir.path(), "sleep 300"));
        let rt2 = rt.clone();
        let killer = tokio::spawn(async move {
            while !rt2.kill("t") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let (exit, _) = collect(&rt, s).await;
        killer.await.unwrap();
        assert_eq!(exit.interrupted, Some(Interruption::Killed));
        assert_eq!(exit.signal, Some(15));
        assert_eq!(exit.retcode(), -15);
        assert!(rt.running().is_empty());
    }

    #[tokio::test]
    async fn environment_is_exactly_what_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::default();
        let mut s = spec(script(dir.path(), "echo \"[$TEXT]\"; echo \"[$HOME]\""));
        s.env.push(("TEXT".into(), "$(id); `id` 'q'\nx".into()));
        let (_, out) = collect(&rt, s).await;
        assert_eq!(text(&out, Stream::Stdout), "[$(id); `id` 'q'\nx]\n[]\n");
    }

    #[tokio::test]
    async fn orphans_are_reaped_only_when_they_are_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "sleep 300");
        let mut child = std::process::Command::new(&path)
            .env("OPSBOX_JOB", "job@1")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until the child has exec'd, /proc shows the environment it was forked with.
        let environ = format!("/proc/{pid}/environ");
        for _ in 0..500 {
            let seen = std::fs::read(&environ).unwrap_or_default();
            if seen.split(|b| *b == 0).any(|e| e == b"OPSBOX_JOB=job@1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            !reap_orphan(pid, "job@2"),
            "another job's name must not match"
        );
        assert!(alive(pid as i32));
        assert!(reap_orphan(pid, "job@1"));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert!(!reap_orphan(pid, "job@1"), "nothing left to reap");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let rt = Runtime::default();
        let (tx, _rx) = mpsc::channel(1);
        let err = rt.run(spec("/nonexistent/x".into()), tx).await.unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }), "{err}");
    }
}
