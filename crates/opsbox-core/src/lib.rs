//! opsbox core: the domain services. They know nothing of HTTP: every face (the native
//! API, the Jojo face, the CLI through the SDK...) calls the same functions here, so a
//! rule lives in one place.
//!
//! [`Core`] wires the services over one [`store::Store`]:
//! - [`scripts`]: the catalog of the scripts directory;
//! - [`jobs`]: runs, from queue to end, with output, results, kill, wait;
//! - [`events`]: the revisioned event log as a resumable watch stream;
//! - [`identities`]: users and tokens that every face authenticates against;
//! - [`rpc`]: the registry of functions that the RPC faces call;
//! - [`nodes`]: agents, the local node, the scheduler and fan-out jobs;
//! - [`backups`]: copies of the whole store while it runs;
//! - [`model`]: applications, units, machines and relations, with [`charms`] whose
//!   hooks run as jobs on the units' nodes.

pub mod backups;
pub mod charms;
pub mod error;
pub mod events;
pub mod identities;
pub mod jobs;
pub mod model;
pub mod names;
pub mod nodes;
pub mod output;
pub mod queues;
pub mod rpc;
pub mod scripts;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opsbox_api::ReloadReport;

pub use error::{CoreError, CoreResult};
use events::Events;
use identities::Identities;
use jobs::{Jobs, JobsConfig};
use model::{Model, ModelConfig};
use nodes::{Nodes, NodesConfig};
use queues::{Queues, QueuesConfig};
use scripts::Scripts;
use store::{NewEvent, SqliteStore, Store};

/// Where things are and how much is allowed.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Holds the database and the results of jobs.
    pub data_dir: PathBuf,
    pub scripts_dir: PathBuf,
    pub max_concurrent_runs: usize,
    pub max_output_bytes: u64,
    /// Events kept in the log; older ones are compacted away.
    pub event_retention: u64,
    pub kill_grace: Duration,
    /// Limits of the message queues.
    pub queues: QueuesConfig,
    /// Nodes, heartbeats and fan-out defaults.
    pub nodes: NodesConfig,
    /// Charms and the model.
    pub model: ModelConfig,
    /// The store, when not the embedded SQLite file of the data directory: a
    /// `postgres://` URL shared by several servers (see [`store::open`]).
    pub store: Option<String>,
}

impl CoreConfig {
    pub fn new(data_dir: PathBuf, scripts_dir: PathBuf) -> Self {
        // Absolute: scripts run in their own directory, so a relative `./data` in
        // `$OPSBOX_RESULTS` or a task's program path would point elsewhere.
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        let scripts_dir = std::path::absolute(&scripts_dir).unwrap_or(scripts_dir);
        CoreConfig {
            nodes: NodesConfig::new(&data_dir),
            model: ModelConfig::new(
                scripts_dir.with_file_name("charms"),
                data_dir.join("charms"),
            ),
            data_dir,
            scripts_dir,
            max_concurrent_runs: 64,
            max_output_bytes: 64 * 1024 * 1024,
            event_retention: 100_000,
            kill_grace: Duration::from_secs(5),
            queues: QueuesConfig::default(),
            store: None,
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("opsbox.db")
    }
}

/// All core services, cheap to clone.
#[derive(Clone)]
pub struct Core {
    pub store: Arc<dyn Store>,
    pub scripts: Arc<Scripts>,
    pub jobs: Jobs,
    pub events: Events,
    pub identities: Identities,
    pub queues: Queues,
    /// Functions callable over py-jrpc, JSON-RPC, the CLI and the SDK.
    pub rpc: rpc::Rpc,
    /// Agents, the scheduler and fan-out jobs.
    pub nodes: Nodes,
    /// Applications, units, relations and the hooks of their charms.
    pub model: Model,
    /// Copies of the whole store.
    pub backups: backups::Backups,
    pub config: Arc<CoreConfig>,
}

impl Core {
    /// Opens the store (the SQLite file of the data directory unless `config.store`
    /// names another), creating the data directory if needed, scans the scripts, and
    /// marks jobs this server left unfinished in a previous run as lost.
    pub async fn open(config: CoreConfig) -> CoreResult<Core> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| CoreError::Io {
            action: format!("create the data directory {}", config.data_dir.display()),
            source,
        })?;
        let store: Arc<dyn Store> = match &config.store {
            Some(spec) => store::open(spec, &config.nodes.server_id).await?,
            None => Arc::new(SqliteStore::open(&config.database_path()).await?),
        };
        Self::with_store(config, store).await
    }

    /// Opens only the store of a data directory, for identity management offline.
    pub async fn open_store(data_dir: &std::path::Path) -> CoreResult<Arc<dyn Store>> {
        std::fs::create_dir_all(data_dir).map_err(|source| CoreError::Io {
            action: format!("create the data directory {}", data_dir.display()),
            source,
        })?;
        Ok(Arc::new(
            SqliteStore::open(&data_dir.join("opsbox.db")).await?,
        ))
    }

    pub async fn with_store(config: CoreConfig, store: Arc<dyn Store>) -> CoreResult<Core> {
        let scripts = Arc::new(Scripts::open(&config.scripts_dir));
        let jobs = Jobs::new(
            store.clone(),
            scripts.clone(),
            JobsConfig {
                results_dir: config.data_dir.join("results"),
                max_concurrent_runs: config.max_concurrent_runs,
                max_output_bytes: config.max_output_bytes,
                kill_grace: config.kill_grace,
                node_id: config.nodes.local_id.clone(),
            },
        );
        let lost = jobs.recover().await?;
        if lost > 0 {
            tracing::warn!(
                lost,
                "jobs left unfinished by the previous run are marked lost"
            );
        }
        let rpc = rpc::Rpc::new(scripts.clone(), jobs.clone());
        let mut nodes_config = config.nodes.clone();
        nodes_config.max_output_bytes = config.max_output_bytes;
        let nodes = Nodes::start(
            store.clone(),
            scripts.clone(),
            jobs.clone(),
            nodes_config,
            config.data_dir.join("results"),
            config.kill_grace,
        )
        .await?;
        let model = Model::open(
            store.clone(),
            nodes.clone(),
            jobs.clone(),
            config.model.clone(),
        )
        .await?;
        let core = Core {
            backups: backups::Backups::new(store.clone(), config.data_dir.join("backups")),
            rpc,
            model,
            nodes,
            events: Events::new(store.clone()),
            identities: Identities::new(store.clone()),
            queues: Queues::new(store.clone(), config.queues.clone()),
            store,
            scripts,
            jobs,
            config: Arc::new(config),
        };
        core.spawn_compaction();
        Ok(core)
    }

    /// Rescans the scripts directory and records the reload on the event log.
    pub async fn reload(&self) -> CoreResult<ReloadReport> {
        let catalog = self.scripts.reload();
        let event = self
            .store
            .append_event(NewEvent::new(
                "scripts.reloaded",
                "scripts",
                serde_json::json!({
                    "scripts": catalog.scripts.keys().collect::<Vec<_>>(),
                    "problems": catalog.problems,
                }),
            ))
            .await?;
        Ok(ReloadReport {
            scripts: catalog.scripts.len(),
            problems: catalog.problems.clone(),
            revision: event.rev,
        })
    }

    /// Drops old events every minute, keeping `event_retention`.
    fn spawn_compaction(&self) {
        let store = Arc::downgrade(&self.store);
        let keep = self.config.event_retention;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                if let Err(e) = store.compact_events(keep).await {
                    tracing::warn!(error = %e, "event compaction failed");
                }
            }
        });
    }

    /// Stops every running job; call before the process exits.
    pub async fn shutdown(&self) {
        // First, so that hooks killed by the stop are not taken for failed ones.
        self.model.shutdown();
        // Both at once: each waits out its own grace period.
        tokio::join!(
            self.nodes.shutdown(self.config.kill_grace),
            self.jobs.shutdown()
        );
    }
}
