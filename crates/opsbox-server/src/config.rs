//! Server configuration: what the TOML config file holds, with the defaults a fresh
//! checkout needs (`opsbox serve` in the repository serves the example scripts on
//! 127.0.0.1:3000 with its data in `./data`). The binary layers env and flags on top.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How a TLS listener gets its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsSource {
    /// Generate one on first start and keep it in `<data>/tls/`.
    #[default]
    SelfSigned,
    /// PEM files.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listeners: `127.0.0.1:3000` or `http://…` (plain), `https://…` (TLS),
    /// `unix:/run/opsbox.sock` (a Unix socket).
    pub listen: Vec<String>,
    pub data: PathBuf,
    pub scripts: PathBuf,
    pub charms: PathBuf,
    /// Allow a non-loopback listener with no users or tokens configured.
    pub insecure: bool,
    /// Certificate for `https://` listeners.
    pub tls: TlsSource,
    /// An Apache htpasswd file whose users are imported (role operator) at start and
    /// again whenever the file changes, as Pyjojo re-read it.
    pub htpasswd: Option<PathBuf>,
    pub limits: Limits,
    pub jojo: JojoConfig,
    pub rpc: RpcConfig,
    pub scirocco: SciroccoConfig,
    pub disco: DiscoConfig,
    pub nodes: NodesSettings,
    /// The store: `None` for the SQLite file in `data`, or a `postgres://` URL that
    /// several servers share (README, "Scaling out").
    pub store: Option<String>,
    /// This server's name in the node list and in the records of the jobs it runs.
    /// Default: the host name, plus the first listen address when the store is shared
    /// (so that servers on one host differ).
    pub server_id: Option<String>,
}

/// Settings of nodes and fan-out jobs (`[nodes]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodesSettings {
    /// Seconds without a heartbeat after which an agent is disconnected and its tasks
    /// are retried elsewhere.
    pub heartbeat_timeout_secs: u64,
    /// Failed or lost task attempts a fan-out job survives unless it says otherwise.
    pub max_failures: u32,
    /// Labels of the server's own node (`local`).
    pub local_labels: Vec<String>,
    /// Fan-out tasks the local node runs at once; 0 leaves them all to agents.
    /// Default: the number of CPUs (at least 2).
    pub local_slots: Option<u32>,
    /// Fan-out tasks the local node takes beyond its slots, to start the moment one
    /// frees (as an agent's `--prefetch`). Default: as many as its slots.
    pub local_prefetch: Option<u32>,
}

impl Default for NodesSettings {
    fn default() -> Self {
        NodesSettings {
            heartbeat_timeout_secs: 15,
            max_failures: 3,
            local_labels: Vec::new(),
            local_slots: None,
            local_prefetch: None,
        }
    }
}

/// Settings of the Scirocco face (message queues for scirocco-pyclient).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SciroccoConfig {
    /// Scirocco's master token: accepted raw in `Authorization` for any node, as the
    /// original server did. Without it, only opsbox API tokens are (node tokens for
    /// their own nodes), and while no user or token exists the face is open.
    pub shared_token: Option<String>,
    /// Largest JSON body, in KiB (the original's `SCIROCCO_MAX_KB_SIZE_JSON`).
    pub max_json_kib: usize,
    /// Largest text body, in KiB.
    pub max_text_kib: usize,
    /// Largest binary body, in KiB.
    pub max_raw_kib: usize,
    /// Most messages `GET /messages` returns.
    pub max_list: u32,
}

impl Default for SciroccoConfig {
    fn default() -> Self {
        SciroccoConfig {
            shared_token: None,
            max_json_kib: 100,
            max_text_kib: 100,
            max_raw_kib: 1000,
            max_list: 100,
        }
    }
}

/// Settings of the RPC faces (JSON-RPC 2.0 at `/rpc`, py-jrpc at the root paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Extra listeners that serve only the py-jrpc face, where every `GET /{name}` and
    /// every `POST` is a jrpc call (py-jrpc's own port was 9999). Same address forms
    /// as `listen`, TLS included.
    pub jrpc_listen: Vec<String>,
    /// The role that callers without credentials get on the py-jrpc face once the
    /// server requires credentials (py-jrpc's client cannot send any). `None`, the
    /// default, refuses them with 401. While no user or token exists the server is
    /// loopback-only and open, so every caller may call everything.
    pub jrpc_anonymous_role: Option<opsbox_api::Role>,
    /// The most calls one JSON-RPC batch may hold (-32010 beyond).
    pub max_batch: usize,
    /// Calls of one batch run at once, answered in request order.
    pub batch_concurrency: usize,
    /// Subscriptions one WebSocket connection may hold.
    pub max_subscriptions: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            jrpc_listen: Vec::new(),
            jrpc_anonymous_role: None,
            max_batch: 100,
            batch_concurrency: 16,
            max_subscriptions: 1024,
        }
    }
}

/// Settings of the Disco face (`[disco]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoConfig {
    /// The role that callers without credentials get on the Disco face (`/disco/...`,
    /// result files included) once the server requires credentials: Disco's clients
    /// cannot send any. `None`, the default, refuses them with 401.
    pub anonymous_role: Option<opsbox_api::Role>,
}

/// Settings of the Jojo face.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct JojoConfig {
    /// Accept any `Content-Type` (Pyjojo's `--force-json`), for clients that cannot set it.
    pub force_json: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Script runs at once; more wait in `queued`.
    pub max_concurrent_runs: usize,
    /// Output kept per job.
    pub max_output_bytes: u64,
    /// Events kept in the log for watchers to resume from.
    pub event_retention: u64,
    /// Seconds between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace_secs: u64,
    /// Longest a wait request is held, in seconds.
    pub max_wait_secs: u64,
    /// Seconds a connection may go with no request open: a client has this long to send
    /// a whole request head, on a new connection or after its last answer, else it is
    /// cut off, so that trickled headers
    /// cannot hold connections open forever; HTTP/2 the same for its preface and
    /// between requests. An HTTP/2 connection that sends nothing for this long is also
    /// sent a PING, and closed if the answer takes this long again (a request being
    /// answered keeps its connection as long as the client answers PINGs). A connection
    /// upgraded to a WebSocket is not timed. 0: no limit.
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may go without new bytes before the request is refused
    /// (400): a body withheld after its head would hold a connection and its handler
    /// for ever. 0: no limit.
    pub body_read_timeout_secs: u64,
    /// Largest charm archive a Juju client may upload (`POST /charms`); charms are
    /// zips of hooks and files, often more than `max_body_bytes`.
    pub max_charm_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_concurrent_runs: 64,
            max_output_bytes: 64 * 1024 * 1024,
            event_retention: 100_000,
            kill_grace_secs: 5,
            max_wait_secs: 300,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 30,
            max_charm_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["127.0.0.1:3000".into()],
            data: PathBuf::from("data"),
            scripts: PathBuf::from("examples/scripts"),
            charms: PathBuf::from("examples/charms"),
            insecure: false,
            tls: TlsSource::default(),
            htpasswd: None,
            limits: Limits::default(),
            jojo: JojoConfig::default(),
            rpc: RpcConfig::default(),
            scirocco: SciroccoConfig::default(),
            disco: DiscoConfig::default(),
            nodes: NodesSettings::default(),
            store: None,
            server_id: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML config file; unknown keys are errors, so typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}
