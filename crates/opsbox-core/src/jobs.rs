//! Jobs: every run of a script, from submission to its end.
//!
//! A submitted job is written to the store (state `queued`) before its caller hears of
//! it; a synchronous run, whose caller hears of it only at its end, is written once it
//! has lasted 25 ms (`RECORD_AFTER`) or when it ends, so that a short run is one
//! commit. A job waits for its script's lock (scripts with `lock: true` run one at a
//! time) and then for a free run slot (a global limit), runs on the local node through
//! the agent runtime, and ends `succeeded`, `failed`, `killed` or `lost`. Output is
//! stored while it is produced, in small batches, so it can be followed live and
//! survives the job. Files the script writes into `$OPSBOX_RESULTS` are listed on the
//! job and served by the faces.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::Stream;
use opsbox_agent::{Exit, Interruption, OutputPiece, RunError, Runtime, TaskSpec};
use opsbox_api::{
    Job, JobOutput, JobSpec, JobState, LogChunk, LogEvent, OutputMode, ResultFile, Script,
    Stream as OutStream,
};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::error::{CoreError, CoreResult};
use crate::names::NameGen;
use crate::output::{split_lines, ReturnValueScanner};
use crate::scripts::{env_name, Scripts};
use crate::store::{
    EventsSince, JobFilter, JobRecord, JobWrite, LogChunkBytes, NewEvent, Store, StoreError,
};

/// The node name of the runtime embedded in the server.
pub const LOCAL_NODE: &str = "local";

/// What a filtered parameter's value shows as outside the process.
pub const FILTERED: &str = "FILTERED";

/// What a job has not written yet (a synchronous run's creation, a start) is written
/// once this has passed; a job that ends sooner writes it with its end, in one commit.
const RECORD_AFTER: Duration = Duration::from_millis(25);
/// Output is written to the store at least this often while a job runs.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// ...or as soon as this much is waiting.
const FLUSH_BYTES: usize = 256 * 1024;

/// Limits and places of the job service.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Where each job's results directory is made (`<dir>/<job name>/`).
    pub results_dir: PathBuf,
    /// Runs at once over all scripts; the rest wait in `queued`.
    pub max_concurrent_runs: usize,
    /// Output kept per job; the rest is dropped with a note on stderr.
    pub max_output_bytes: u64,
    /// Time between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
    /// The node the runs of this server run on: `local`, or with a shared store the
    /// server's own node id (`local-<server id>`), so job records say which server ran.
    pub node_id: String,
}

/// The [`crate::store::Signal`] topic of a kill for the server that runs the job.
const KILL_SIGNAL: &str = "job.kill";

/// What a kill signal carries.
#[derive(serde::Serialize, serde::Deserialize)]
struct KillAsk {
    name: String,
    by: Option<String>,
}

/// A job that runs (or waits to run) in this process.
struct Active {
    /// Set by kill; checked before the process starts.
    killed: AtomicBool,
    /// Who asked for the kill, for the job's reason.
    killed_by: Mutex<Option<String>>,
    /// Wakes a job that waits in the queue when it is killed.
    wake: Notify,
    /// The final record, once the job has ended.
    done: watch::Sender<Option<JobRecord>>,
    /// The whole output as lines, when it was small enough to keep in memory: a
    /// synchronous run answers from it instead of reading it back from the store.
    output: Mutex<Option<JobOutput>>,
}

/// What a job has not written to the store yet.
struct Unwritten {
    /// Whether the job's row exists.
    inserted: bool,
    /// Its events not written yet, oldest first.
    events: Vec<NewEvent>,
    /// When they are to be written at the latest, should the job not have ended.
    due: tokio::time::Instant,
}

impl Unwritten {
    /// A job whose row is in the store, with nothing pending.
    fn nothing() -> Self {
        Unwritten {
            inserted: true,
            events: Vec::new(),
            due: tokio::time::Instant::now(),
        }
    }

    /// A job not in the store yet: `created` is written within [`RECORD_AFTER`].
    fn created(created: NewEvent) -> Self {
        Unwritten {
            inserted: false,
            events: vec![created],
            due: tokio::time::Instant::now() + RECORD_AFTER,
        }
    }

    fn row(&self) -> JobWrite {
        if self.inserted {
            JobWrite::Update
        } else {
            JobWrite::Insert
        }
    }
}

/// Output a run keeps in memory for its synchronous caller, at most.
const MEMORY_OUTPUT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    scripts: Arc<Scripts>,
    runtime: Runtime,
    names: NameGen,
    config: JobsConfig,
    /// Free run slots.
    slots: Arc<Semaphore>,
    /// One mutex per locked script name.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    active: Mutex<HashMap<String, Arc<Active>>>,
    /// Empty results directories of ended jobs, kept for the next runs.
    spare: SpareDirs,
    /// Kills fan-out jobs, which the nodes service runs (set once by it).
    fanout_kill: std::sync::OnceLock<FanoutKill>,
}

/// How [`Jobs::kill`] reaches a fan-out job: the nodes service's kill.
pub type FanoutKill = Arc<
    dyn Fn(String, Option<String>) -> futures::future::BoxFuture<'static, CoreResult<()>>
        + Send
        + Sync,
>;

/// Most empty results directories kept for reuse.
const SPARE_DIRS: usize = 256;

/// Empty results directories kept in `<results>/.spare/` and handed to new jobs by a
/// rename: making and removing a directory per job costs an inode allocation and free
/// each time (ext4 scans its bitmap past recently freed inodes), far more than a rename.
/// Job names always hold an `@`, so `.spare` never collides with a job's directory.
struct SpareDirs {
    dir: PathBuf,
    /// Names of the directories in `dir`, and the next name to give one.
    free: Mutex<(Vec<PathBuf>, u64)>,
}

impl SpareDirs {
    /// Finds the spares a previous server process left.
    fn new(results: &Path) -> Self {
        let dir = results.join(".spare");
        let mut free = Vec::new();
        let mut next = 0u64;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if let Some(n) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    next = next.max(n + 1);
                    free.push(entry.path());
                }
            }
        }
        SpareDirs {
            dir,
            free: Mutex::new((free, next)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<PathBuf>, u64)> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `target`, an empty directory: a spare renamed, or a new one.
    fn take(&self, target: &Path) -> std::io::Result<()> {
        let spare = self.lock().0.pop();
        if let Some(spare) = spare {
            if std::fs::rename(&spare, target).is_ok() {
                return Ok(());
            }
        }
        std::fs::create_dir_all(target)
    }

    /// Keeps `dir` for a later job if it is empty (else leaves it in place).
    fn give_back(&self, dir: &Path) {
        let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
        if !empty {
            return;
        }
        let name = {
            let mut free = self.lock();
            if free.0.len() >= SPARE_DIRS {
                None
            } else {
                free.1 += 1;
                Some(self.dir.join((free.1 - 1).to_string()))
            }
        };
        let Some(name) = name else {
            let _ = std::fs::remove_dir(dir);
            return;
        };
        let moved = std::fs::rename(dir, &name).or_else(|_| {
            std::fs::create_dir_all(&self.dir)?;
            std::fs::rename(dir, &name)
        });
        match moved {
            Ok(()) => self.lock().0.push(name),
            Err(_) => {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A submitted job: its record now, and a way to wait for its end.
pub struct Submitted {
    pub job: Job,
    done: watch::Receiver<Option<JobRecord>>,
    active: Arc<Active>,
}

impl Submitted {
    /// Waits until the job has ended; returns the job and, when it was small enough to
    /// keep, its output.
    async fn finished_with_output(self) -> (Job, Option<JobOutput>) {
        let active = self.active.clone();
        let job = self.finished().await;
        let output = active
            .output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        (job, output)
    }

    /// Waits until the job has ended and returns its final record.
    pub async fn finished(mut self) -> Job {
        loop {
            if let Some(record) = self.done.borrow_and_update().clone() {
                return to_job(&record);
            }
            if self.done.changed().await.is_err() {
                // The runner is gone without a word: only possible if it panicked.
                let mut job = self.job.clone();
                job.state = JobState::Lost;
                job.reason = Some("the job runner stopped unexpectedly".into());
                return job;
            }
        }
    }
}

impl Jobs {
    pub fn new(store: Arc<dyn Store>, scripts: Arc<Scripts>, config: JobsConfig) -> Self {
        let jobs = Jobs {
            inner: Arc::new(Inner {
                runtime: Runtime::new(config.kill_grace),
                slots: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
                store,
                scripts,
                names: NameGen::default(),
                spare: SpareDirs::new(&config.results_dir),
                config,
                locks: Mutex::new(HashMap::new()),
                active: Mutex::new(HashMap::new()),
                fanout_kill: std::sync::OnceLock::new(),
            }),
        };
        jobs.spawn_kill_listener();
        jobs
    }

    /// Kills asked for through another server sharing the store reach the one that
    /// runs the job's process (see [`Jobs::kill`]).
    fn spawn_kill_listener(&self) {
        let mut signals = self.inner.store.signals();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let signal = match signals.recv().await {
                    Ok(signal) => signal,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if signal.topic != KILL_SIGNAL {
                    continue;
                }
                let Some(inner) = weak.upgrade() else { return };
                let jobs = Jobs { inner };
                let Ok(ask) = serde_json::from_str::<KillAsk>(&signal.message) else {
                    continue;
                };
                let active = jobs.lock_active().get(&ask.name).cloned();
                if let Some(active) = active {
                    jobs.stop_active(&ask.name, &active, ask.by.as_deref());
                }
            }
        });
    }

    /// Tells a job running in this process to stop; it records its own end.
    fn stop_active(&self, name: &str, active: &Active, by: Option<&str>) {
        *active.killed_by.lock().unwrap_or_else(|e| e.into_inner()) = by.map(str::to_owned);
        active.killed.store(true, Ordering::SeqCst);
        active.wake.notify_one();
        self.inner.runtime.kill(name);
    }

    /// Marks jobs that were queued or running when the server last stopped as lost, and
    /// kills what is left of their processes (a crashed server could not).
    pub async fn recover(&self) -> CoreResult<usize> {
        let running = self
            .inner
            .store
            .list_jobs(&JobFilter {
                state: Some(JobState::Running),
                ..JobFilter::default()
            })
            .await?;
        // With a shared store, the other servers' runs are theirs to look after.
        let owner = self.inner.store.owner().map(str::to_owned);
        for job in running {
            if job.server.is_some() && job.server != owner {
                continue;
            }
            if let Some(pid) = job.pid {
                if opsbox_agent::reap_orphan(pid, &job.name) {
                    tracing::warn!(job = %job.name, pid, "killed the processes a previous run left behind");
                }
            }
        }
        let events = self
            .inner
            .store
            .mark_unfinished_lost(
                "the server stopped while the job was queued or running",
                Utc::now(),
                |record| event("job.finished", record),
            )
            .await?;
        Ok(events.len())
    }

    /// Checks params against the script: unknown names, missing required ones and
    /// values an environment cannot carry are refused.
    pub fn check_params(script: &Script, params: &BTreeMap<String, String>) -> CoreResult<()> {
        for name in params.keys() {
            if !script.params.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = script.params.iter().map(|p| p.name.as_str()).collect();
                return Err(CoreError::Invalid(if known.is_empty() {
                    format!(
                        "unknown param '{name}': script '{}' takes none",
                        script.name
                    )
                } else {
                    format!(
                        "unknown param '{name}': script '{}' takes {}",
                        script.name,
                        known.join(", ")
                    )
                }));
            }
        }
        for param in script.params.iter().filter(|p| p.required) {
            if !params.contains_key(&param.name) {
                return Err(CoreError::Invalid(format!(
                    "missing required param '{}' of script '{}'",
                    param.name, script.name
                )));
            }
        }
        if let Some((name, _)) = params.iter().find(|(_, v)| v.contains('\0')) {
            return Err(CoreError::Invalid(format!(
                "param '{name}' contains a NUL byte, which no environment variable can hold"
            )));
        }
        Ok(())
    }

    /// Validates and queues a run of `script` and returns at once, once the job is in
    /// the store.
    pub async fn submit(
        &self,
        script: &str,
        params: BTreeMap<String, String>,
        submitted_by: Option<String>,
    ) -> CoreResult<Submitted> {
        self.start(script, params, submitted_by, true).await
    }

    /// Validates and starts a run; the job is written before this returns when
    /// `write_now`, else within [`RECORD_AFTER`] or at its end.
    async fn start(
        &self,
        script: &str,
        params: BTreeMap<String, String>,
        submitted_by: Option<String>,
        write_now: bool,
    ) -> CoreResult<Submitted> {
        let script = self
            .inner
            .scripts
            .catalog()
            .get(script)
            .ok_or_else(|| CoreError::UnknownScript(script.to_owned()))?;
        Self::check_params(&script, &params)?;
        let name = self.inner.names.next(&script.name);
        let now = Utc::now();
        let shown: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| {
                let filtered = script.filtered_params.iter().any(|f| f == k);
                (
                    k.clone(),
                    if filtered { FILTERED.into() } else { v.clone() },
                )
            })
            .collect();
        let spec = JobSpec {
            name: name.clone(),
            script: script.name.clone(),
            filename: script.filename.clone(),
            params: shown.clone(),
            output: script.output,
            lock: script.lock,
            timeout_secs: script.timeout_secs,
            submitted_by: submitted_by.clone(),
            created_at: now,
        };
        let record = JobRecord {
            name: name.clone(),
            script: script.name.clone(),
            state: JobState::Queued,
            params: shown,
            node: None,
            submitted_by,
            created_at: now,
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            return_values: BTreeMap::new(),
            results: Vec::new(),
            spec: serde_json::to_value(&spec).unwrap_or_default(),
            pid: None,
            server: None,
        };
        let (done_tx, done) = watch::channel(None);
        let active = Arc::new(Active {
            killed: AtomicBool::new(false),
            killed_by: Mutex::new(None),
            wake: Notify::new(),
            done: done_tx,
            output: Mutex::new(None),
        });
        let created = event("job.created", &record);
        let unwritten = if write_now {
            self.inner.store.insert_job(&record, created).await?;
            Unwritten::nothing()
        } else {
            Unwritten::created(created)
        };
        self.lock_active().insert(name.clone(), active.clone());
        let job = to_job(&record);
        let inner = self.inner.clone();
        let submitted_active = active.clone();
        tokio::spawn(async move {
            let name = record.name.clone();
            let finished = inner.run(record, unwritten, script, params, &active).await;
            inner
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            active.done.send_replace(Some(finished));
        });
        Ok(Submitted {
            job,
            done,
            active: submitted_active,
        })
    }

    /// Runs `script` and waits for its end; returns the job and its output.
    pub async fn run(
        &self,
        script: &str,
        params: BTreeMap<String, String>,
        submitted_by: Option<String>,
    ) -> CoreResult<(Job, JobOutput)> {
        let (job, kept) = self
            .start(script, params, submitted_by, false)
            .await?
            .finished_with_output()
            .await;
        let output = match kept {
            Some(output) => output,
            None => self.output_lines(&job.name).await?,
        };
        Ok((job, output))
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Active>>> {
        self.inner.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn record(&self, name: &str) -> CoreResult<JobRecord> {
        self.inner
            .store
            .get_job(name)
            .await?
            .ok_or_else(|| CoreError::UnknownJob(name.to_owned()))
    }

    pub async fn get(&self, name: &str) -> CoreResult<Job> {
        Ok(to_job(&self.record(name).await?))
    }

    pub async fn spec(&self, name: &str) -> CoreResult<JobSpec> {
        let record = self.record(name).await?;
        serde_json::from_value(record.spec)
            .map_err(|e| CoreError::Store(StoreError::Corrupt(format!("spec of {name}: {e}"))))
    }

    pub async fn list(&self, filter: &JobFilter) -> CoreResult<Vec<Job>> {
        Ok(self
            .inner
            .store
            .list_jobs(filter)
            .await?
            .iter()
            .map(to_job)
            .collect())
    }

    /// Waits up to `timeout` for the job to end; returns whether it did, and the job.
    pub async fn wait(&self, name: &str, timeout: Duration) -> CoreResult<(bool, Job)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let active = self.lock_active().get(name).cloned();
        if let Some(active) = active {
            let mut done = active.done.subscribe();
            let ended = tokio::time::timeout_at(deadline, async {
                loop {
                    if done.borrow_and_update().is_some() {
                        return;
                    }
                    if done.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            let job = self.get(name).await?;
            return Ok((ended.is_ok() && job.state.is_terminal(), job));
        }
        // Not run here (a fan-out job, another server's run): follow the event log,
        // whose job events carry the job's state, and read the job again only once one
        // says it ended. Reading it at every commit cost a read per commit and waiter.
        let mut changes = self.inner.store.changes();
        changes.borrow_and_update();
        let mut rev = self.inner.store.current_revision().await?;
        let mut job = self.get(name).await?;
        loop {
            if job.state.is_terminal() {
                return Ok((true, job));
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the store is closing.
                Ok(Err(_)) | Err(_) => return Ok((false, self.get(name).await?)),
            }
            changes.borrow_and_update();
            if self.ended_since(name, &mut rev).await? {
                job = self.get(name).await?;
            }
        }
    }

    /// Reads the events after `rev`, moving it on: true when one about job `name` says
    /// it ended or was cleaned (or when some were compacted away unread).
    async fn ended_since(&self, name: &str, rev: &mut u64) -> CoreResult<bool> {
        const PAGE: u32 = 1000;
        let wanted = |e: &opsbox_api::Event| ends_job(e, name);
        loop {
            let before = *rev;
            let (found, last) = self
                .inner
                .store
                .events_since_matching(before, PAGE, &wanted)
                .await?;
            match found {
                EventsSince::Events(events) if !events.is_empty() => {
                    *rev = last;
                    return Ok(true);
                }
                EventsSince::Events(_) => *rev = last,
                EventsSince::Gone { current } => {
                    *rev = current;
                    return Ok(true);
                }
            }
            // A whole page looked at: there may be more.
            if last < before + u64::from(PAGE) {
                return Ok(false);
            }
        }
    }

    /// Stops a job: a queued one never starts, a running one gets SIGTERM, then SIGKILL,
    /// on its whole process group. Returns the job once it has ended. Killing a job that
    /// has already ended changes nothing.
    pub async fn kill(&self, name: &str, by: Option<&str>) -> CoreResult<Job> {
        let active = self.lock_active().get(name).cloned();
        let Some(active) = active else {
            let record = self.record(name).await?;
            if let (Some(kill), true) = (
                self.inner.fanout_kill.get(),
                record.spec.get("fanout").is_some(),
            ) {
                kill(name.to_owned(), by.map(str::to_owned)).await?;
            } else if !record.state.is_terminal() && self.inner.store.owner().is_some() {
                // Another server sharing the store runs it: ask it, and wait for the
                // end it records.
                let ask = KillAsk {
                    name: name.to_owned(),
                    by: by.map(str::to_owned),
                };
                let message = serde_json::to_string(&ask).unwrap_or_default();
                self.inner.store.signal(KILL_SIGNAL, &message).await?;
                let (_, job) = self
                    .wait(name, self.inner.config.kill_grace + Duration::from_secs(10))
                    .await?;
                return Ok(job);
            }
            return self.get(name).await;
        };
        self.stop_active(name, &active, by);
        let (_, job) = self
            .wait(name, self.inner.config.kill_grace + Duration::from_secs(10))
            .await?;
        Ok(job)
    }

    /// Deletes an ended job, its output and its result files.
    pub async fn clean(&self, name: &str) -> CoreResult<()> {
        let record = self.record(name).await?;
        if !record.state.is_terminal() {
            return Err(CoreError::JobActive {
                name: name.to_owned(),
                state: record.state,
            });
        }
        self.inner
            .store
            .delete_job(
                name,
                NewEvent::new("job.cleaned", name, serde_json::json!({"name": name})),
            )
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => CoreError::UnknownJob(name.to_owned()),
                e => e.into(),
            })?;
        let dir = self.results_dir(name);
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|source| CoreError::Io {
                    action: format!("remove {}", dir.display()),
                    source,
                })?;
        }
        Ok(())
    }

    /// The whole output as lines.
    pub async fn output(&self, name: &str) -> CoreResult<JobOutput> {
        self.record(name).await?;
        self.output_lines(name).await
    }

    /// The output of a job known to exist.
    async fn output_lines(&self, name: &str) -> CoreResult<JobOutput> {
        let (out, err) = self.inner.store.output_bytes(name).await?;
        Ok(JobOutput {
            stdout: split_lines(&String::from_utf8_lossy(&out)),
            stderr: split_lines(&String::from_utf8_lossy(&err)),
        })
    }

    /// Output chunks after `after`, as stored.
    pub async fn chunks(&self, name: &str, after: u64, limit: u32) -> CoreResult<Vec<LogChunk>> {
        self.record(name).await?;
        Ok(self.inner.store.output_since(name, after, limit).await?)
    }

    /// The output from chunk `after` on, then live until the job ends; the last item is
    /// [`LogEvent::End`] with the final job.
    pub async fn follow(
        &self,
        name: &str,
        after: u64,
    ) -> CoreResult<impl Stream<Item = CoreResult<LogEvent>> + Send + 'static> {
        self.record(name).await?;
        let store = self.inner.store.clone();
        let name = name.to_owned();
        let mut changes = store.changes();
        Ok(async_stream::stream! {
            let mut after = after;
            loop {
                changes.borrow_and_update();
                // Read the state first: output is always stored before the job's end, so
                // once the job is seen ended, one more read gets all of it.
                let job = match store.get_job(&name).await {
                    Ok(Some(job)) => job,
                    Ok(None) => {
                        yield Err(CoreError::UnknownJob(name.clone()));
                        return;
                    }
                    Err(e) => {
                        yield Err(e.into());
                        return;
                    }
                };
                loop {
                    match store.output_since(&name, after, 1000).await {
                        Ok(chunks) if chunks.is_empty() => break,
                        Ok(chunks) => {
                            for chunk in chunks {
                                after = chunk.seq;
                                yield Ok(LogEvent::Output(chunk));
                            }
                        }
                        Err(e) => {
                            yield Err(e.into());
                            return;
                        }
                    }
                }
                if job.state.is_terminal() {
                    yield Ok(LogEvent::End(Box::new(to_job(&job))));
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    pub fn results_dir(&self, name: &str) -> PathBuf {
        self.inner.config.results_dir.join(name)
    }

    /// The result files of a job: as recorded once it ended, as on disk while it runs.
    pub async fn results(&self, name: &str) -> CoreResult<Vec<ResultFile>> {
        let record = self.record(name).await?;
        if record.state.is_terminal() {
            return Ok(record.results);
        }
        Ok(list_results(&self.results_dir(name)))
    }

    /// The path on disk of one result file; only names the job lists are served, so no
    /// path can reach outside the job's results directory.
    pub async fn result_path(&self, name: &str, path: &str) -> CoreResult<PathBuf> {
        let listed = self.results(name).await?.iter().any(|f| f.path == path);
        if !listed {
            return Err(CoreError::NotFound(format!(
                "result file '{path}' of job '{name}'"
            )));
        }
        Ok(self.results_dir(name).join(path))
    }

    /// Stops every running job (server shutdown); returns once they have ended.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self.lock_active().keys().cloned().collect();
        // All at once: each waits out its own grace period, not the sum of them.
        futures::future::join_all(
            names
                .iter()
                .map(|name| self.kill(name, Some("server shutdown"))),
        )
        .await;
    }

    /// Names of the jobs that run or wait in this process.
    pub fn active(&self) -> Vec<String> {
        self.lock_active().keys().cloned().collect()
    }

    /// Lets [`Jobs::kill`] reach fan-out jobs (called once by the nodes service).
    pub(crate) fn set_fanout_kill(&self, kill: FanoutKill) {
        let _ = self.inner.fanout_kill.set(kill);
    }

    /// A new unique job name.
    pub(crate) fn new_name(&self, prefix: &str) -> String {
        self.inner.names.next(prefix)
    }

    /// The environment a run of `script` gets (see [`Inner::environment`]), for a task
    /// that runs on another node: the node adds its own `OPSBOX_RESULTS` and
    /// `OPSBOX_NODE`.
    pub(crate) fn task_environment(
        &self,
        job: &str,
        script: &Script,
        params: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = self
            .inner
            .environment(job, script, params, Path::new(""))
            .into_iter()
            .collect();
        env.remove("OPSBOX_RESULTS");
        env.remove("OPSBOX_NODE");
        env
    }
}

/// True for an event that says job `name` ended or was cleaned. Only `job.*` events
/// count: a fan-out job's `task.*` events have the job as subject too, and a task's
/// state `succeeded` is not the job's.
fn ends_job(event: &opsbox_api::Event, name: &str) -> bool {
    event.subject == name
        && (event.kind == "job.cleaned"
            || (event.kind.starts_with("job.")
                && event
                    .data
                    .get("state")
                    .and_then(|s| serde_json::from_value::<JobState>(s.clone()).ok())
                    .is_some_and(|s| s.is_terminal())))
}

/// The files under a results directory.
pub(crate) fn results_in(dir: &Path) -> Vec<ResultFile> {
    list_results(dir)
}

impl Inner {
    /// Takes a job from queued to its end; returns the final record.
    async fn run(
        &self,
        mut record: JobRecord,
        mut unwritten: Unwritten,
        script: Arc<Script>,
        params: BTreeMap<String, String>,
        active: &Active,
    ) -> JobRecord {
        // Queue: the script's lock first (so a waiting locked run holds no slot), then a
        // slot. A kill ends the wait.
        let _lock = if script.lock {
            let lock = self
                .locks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(script.name.clone())
                .or_default()
                .clone();
            let wait = async {
                tokio::select! {
                    guard = lock.lock_owned() => Some(guard),
                    _ = active.wake.notified() => None,
                }
            };
            self.meanwhile(&mut unwritten, &record, wait).await
        } else {
            None
        };
        let _slot = if active.killed.load(Ordering::SeqCst) {
            None
        } else {
            let wait = async {
                tokio::select! {
                    permit = self.slots.clone().acquire_owned() => permit.ok(),
                    _ = active.wake.notified() => None,
                }
            };
            self.meanwhile(&mut unwritten, &record, wait).await
        };

        let results_dir = self.config.results_dir.join(&record.name);
        let spec = TaskSpec {
            id: record.name.clone(),
            program: PathBuf::from(&script.filename),
            args: Vec::new(),
            env: self.environment(&record.name, &script, &params, &results_dir),
            cwd: Some(self.scripts.dir().to_path_buf()),
            timeout: script.timeout_secs.map(Duration::from_secs),
            combined_output: script.output == OutputMode::Combined,
        };
        // Registered before the flag check, so a kill racing the start is never lost.
        let prepared = self.runtime.prepare(spec);
        if active.killed.load(Ordering::SeqCst) {
            let by = active
                .killed_by
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let reason = Some(killed_reason(by, true));
            return self
                .end(record, unwritten, JobState::Killed, reason, Vec::new())
                .await;
        }
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let reason = Some(e.to_string());
                return self
                    .end(record, unwritten, JobState::Failed, reason, Vec::new())
                    .await;
            }
        };
        if let Err(e) = self.spare.take(&results_dir) {
            let reason = Some(format!("cannot create {}: {e}", results_dir.display()));
            return self
                .end(record, unwritten, JobState::Failed, reason, Vec::new())
                .await;
        }

        let (tx, rx) = mpsc::channel(64);
        let collector = tokio::spawn(collect_output(
            self.store.clone(),
            record.name.clone(),
            rx,
            self.config.max_output_bytes,
        ));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(prepared.run_reporting(tx, started_tx));
        // The start is recorded with the process id, so that a server that crashes can
        // kill the job's processes when it comes back. A short job's start is written
        // with its end, in one commit.
        let joined = match self.meanwhile(&mut unwritten, &record, started).await {
            Ok(pid) => {
                record.state = JobState::Running;
                record.started_at = Some(Utc::now());
                record.node = Some(self.config.node_id.clone());
                record.pid = Some(pid);
                unwritten.events.push(event("job.started", &record));
                unwritten.due = tokio::time::Instant::now() + RECORD_AFTER;
                self.meanwhile(&mut unwritten, &record, task).await
            }
            Err(_) => self.meanwhile(&mut unwritten, &record, task).await,
        };
        let outcome = joined.unwrap_or_else(|e| {
            Err(RunError::Spawn {
                program: script.filename.clone(),
                source: std::io::Error::other(format!("the task runner failed: {e}")),
            })
        });
        record.pid = None;
        let (return_values, last_output, kept) = collector.await.unwrap_or_default();
        if let Some((out, err)) = kept {
            *active.output.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobOutput {
                stdout: split_lines(&String::from_utf8_lossy(&out)),
                stderr: split_lines(&String::from_utf8_lossy(&err)),
            });
        }
        record.return_values = return_values;
        record.results = list_results(&results_dir);
        if record.results.is_empty() {
            // Most jobs write no results; an empty directory per job would only grow
            // the results directory.
            self.spare.give_back(&results_dir);
        }
        let by = active
            .killed_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (state, reason) = judge(&outcome, by);
        if let Ok(exit) = &outcome {
            record.exit_code = exit.code;
            record.signal = exit.signal;
        }
        self.end(record, unwritten, state, reason, last_output)
            .await
    }

    /// Records a job's end: its row, its last output and its events (with whatever it
    /// had not written yet), in one commit.
    async fn end(
        &self,
        mut record: JobRecord,
        mut unwritten: Unwritten,
        state: JobState,
        reason: Option<String>,
        last_output: Vec<LogChunkBytes>,
    ) -> JobRecord {
        record.state = state;
        record.reason = reason;
        record.finished_at = Some(Utc::now());
        unwritten.events.push(event("job.finished", &record));
        if let Err(e) = self
            .store
            .write_job(&record, unwritten.row(), last_output, unwritten.events)
            .await
        {
            tracing::error!(job = %record.name, error = %e, "cannot record the end");
        }
        record
    }

    /// Awaits `work`; should what the job has not written yet fall due meanwhile, it
    /// is written (the record as it stands, with its pending events) and the wait goes on.
    async fn meanwhile<F: std::future::Future>(
        &self,
        unwritten: &mut Unwritten,
        record: &JobRecord,
        work: F,
    ) -> F::Output {
        if unwritten.events.is_empty() {
            return work.await;
        }
        tokio::pin!(work);
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = tokio::time::sleep_until(unwritten.due) => {}
        }
        let events = std::mem::take(&mut unwritten.events);
        match self
            .store
            .write_job(record, unwritten.row(), Vec::new(), events.clone())
            .await
        {
            Ok(()) => unwritten.inserted = true,
            Err(e) => {
                // Kept for the job's end, which tries again.
                tracing::error!(job = %record.name, error = %e, "cannot record the job");
                unwritten.events = events;
            }
        }
        work.await
    }

    /// The whole environment of a run: a sane base, the params (every declared one, ""
    /// when not given, as Jojo did), then opsbox's own variables.
    fn environment(
        &self,
        job: &str,
        script: &Script,
        params: &BTreeMap<String, String>,
        results_dir: &Path,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        env.insert("LANG".into(), "C.UTF-8".into());
        env.insert(
            "HOME".into(),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        );
        for param in &script.params {
            let value = params.get(&param.name).cloned().unwrap_or_default();
            env.insert(env_name(&param.name), value);
        }
        env.insert("OPSBOX_JOB".into(), job.into());
        env.insert("OPSBOX_SCRIPT".into(), script.name.clone());
        env.insert("OPSBOX_NODE".into(), self.config.node_id.clone());
        env.insert("OPSBOX_RESULTS".into(), results_dir.display().to_string());
        env.into_iter().collect()
    }
}

fn killed_reason(by: Option<String>, queued: bool) -> String {
    let when = if queued { " before it started" } else { "" };
    match by {
        Some(who) => format!("killed by {who}{when}"),
        None => format!("killed{when}"),
    }
}

/// The state and reason a run's outcome gives.
fn judge(
    outcome: &Result<Exit, RunError>,
    killed_by: Option<String>,
) -> (JobState, Option<String>) {
    match outcome {
        Err(e) => (JobState::Failed, Some(e.to_string())),
        Ok(exit) => match exit.interrupted {
            Some(Interruption::Killed) => (JobState::Killed, Some(killed_reason(killed_by, false))),
            Some(Interruption::TimedOut(t)) => (
                JobState::Failed,
                Some(format!("timed out after {}s", t.as_secs())),
            ),
            None => match (exit.code, exit.signal) {
                (Some(0), _) => (JobState::Succeeded, None),
                (Some(code), _) => (JobState::Failed, Some(format!("exited with status {code}"))),
                (None, Some(signal)) => {
                    (JobState::Failed, Some(format!("ended by signal {signal}")))
                }
                (None, None) => (JobState::Failed, Some("ended for an unknown reason".into())),
            },
        },
    }
}

/// Stores output as it arrives, in batches, and finds return values on the way.
/// Returns the values, the chunks not stored yet (they go in with the job's end), and
/// a copy of everything stored (stdout, stderr) unless it outgrew [`MEMORY_OUTPUT`].
async fn collect_output(
    store: Arc<dyn Store>,
    job: String,
    mut rx: mpsc::Receiver<OutputPiece>,
    max_bytes: u64,
) -> (BTreeMap<String, String>, Vec<LogChunkBytes>, Kept) {
    let mut scanner = ReturnValueScanner::default();
    let mut kept: Kept = Some((Vec::new(), Vec::new()));
    let mut pending: Vec<LogChunkBytes> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut seq = 0u64;
    let mut cap = crate::output::OutputCap::new(max_bytes);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let piece = match deadline {
            Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                Ok(piece) => piece,
                Err(_) => {
                    flush(&*store, &job, &mut pending, &mut pending_bytes).await;
                    deadline = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(piece) = piece else { break };
        if piece.stream == OutStream::Stdout {
            scanner.feed(&piece.data);
        }
        let (fits, note) = cap.take(piece.data.len());
        if fits > 0 {
            let data = &piece.data[..fits];
            seq += 1;
            pending_bytes += data.len();
            keep(&mut kept, piece.stream, data);
            pending.push(LogChunkBytes {
                seq,
                stream: piece.stream,
                data: data.to_vec(),
            });
        }
        if let Some(note) = note {
            // The limit is reached within this piece: say so right after what was kept.
            seq += 1;
            keep(&mut kept, OutStream::Stderr, note.as_bytes());
            pending.push(LogChunkBytes {
                seq,
                stream: OutStream::Stderr,
                data: note.into_bytes(),
            });
        }
        if pending_bytes >= FLUSH_BYTES {
            flush(&*store, &job, &mut pending, &mut pending_bytes).await;
            deadline = None;
        } else if deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + FLUSH_EVERY);
        }
    }
    (scanner.finish(), pending, kept)
}

/// The output a run keeps for its synchronous caller: (stdout, stderr).
type Kept = Option<(Vec<u8>, Vec<u8>)>;

fn keep(kept: &mut Kept, stream: OutStream, data: &[u8]) {
    if let Some((out, err)) = kept {
        if out.len() + err.len() + data.len() > MEMORY_OUTPUT {
            *kept = None;
        } else if stream == OutStream::Stderr {
            err.extend_from_slice(data);
        } else {
            out.extend_from_slice(data);
        }
    }
}

async fn flush(store: &dyn Store, job: &str, pending: &mut Vec<LogChunkBytes>, bytes: &mut usize) {
    if pending.is_empty() {
        return;
    }
    let chunks = std::mem::take(pending);
    *bytes = 0;
    if let Err(e) = store.append_output(job, chunks).await {
        tracing::error!(job, error = %e, "cannot store output");
    }
}

/// Files under a results directory, sorted, with `/`-separated relative paths.
fn list_results(dir: &Path) -> Vec<ResultFile> {
    let mut files = Vec::new();
    walk_results(dir, dir, &mut files);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// The result files of one task of a fan-out job: `<prefix>.out`, `<prefix>.err` and
/// everything under `<prefix>/`. Only those are looked at: listing the whole job's
/// directory at each task's end cost time in proportion to the tasks done so far.
pub(crate) fn task_results(dir: &Path, prefix: &str) -> Vec<ResultFile> {
    let mut files = Vec::new();
    walk_results(dir, &dir.join(prefix), &mut files);
    for suffix in ["out", "err"] {
        let name = format!("{prefix}.{suffix}");
        if let Ok(meta) = std::fs::metadata(dir.join(&name)) {
            if meta.is_file() {
                files.push(ResultFile {
                    path: name,
                    size: meta.len(),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// Adds the files under `dir` to `out`, named by their path relative to `base`.
fn walk_results(base: &Path, dir: &Path, out: &mut Vec<ResultFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk_results(base, &path, out);
        } else if kind.is_file() {
            let relative = path.strip_prefix(base).unwrap_or(&path);
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(ResultFile {
                path: parts.join("/"),
                size: entry.metadata().map(|m| m.len()).unwrap_or(0),
            });
        }
    }
}

/// The event of a job change: its kind and the whole job.
fn event(kind: &str, record: &JobRecord) -> NewEvent {
    NewEvent::new(
        kind,
        &record.name,
        serde_json::to_value(to_job(record)).unwrap_or_default(),
    )
}

pub fn to_job(record: &JobRecord) -> Job {
    let mut job = Job {
        name: record.name.clone(),
        script: record.script.clone(),
        state: record.state,
        params: record.params.clone(),
        node: record.node.clone(),
        submitted_by: record.submitted_by.clone(),
        created_at: record.created_at,
        started_at: record.started_at,
        finished_at: record.finished_at,
        exit_code: record.exit_code,
        signal: record.signal,
        reason: record.reason.clone(),
        return_values: record.return_values.clone(),
        results: record.results.clone(),
        inputs: Vec::new(),
        reduce: None,
        progress: Vec::new(),
        max_failures: None,
    };
    if let Some(fanout) = record.spec.get("fanout") {
        crate::nodes::describe(&mut job, fanout);
    }
    job
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, subject: &str, state: &str) -> opsbox_api::Event {
        opsbox_api::Event {
            rev: 1,
            at: Utc::now(),
            kind: kind.into(),
            subject: subject.into(),
            data: serde_json::json!({ "state": state }),
        }
    }

    #[test]
    fn only_the_jobs_own_events_say_it_ended() {
        assert!(ends_job(&event("job.finished", "j", "succeeded"), "j"));
        assert!(ends_job(&event("job.cleaned", "j", "running"), "j"));
        assert!(!ends_job(&event("job.finished", "other", "failed"), "j"));
        assert!(!ends_job(&event("job.progress", "j", "running"), "j"));
        // A fan-out job's task events name the job, with the task's state.
        assert!(!ends_job(&event("task.succeeded", "j", "succeeded"), "j"));
        assert!(!ends_job(&event("task.failed", "j", "failed"), "j"));
    }
}
