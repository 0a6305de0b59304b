//! `opsbox serve`: resolves the config file, environment and flags (flags win, then
//! env, then the file, then defaults) into a server configuration, and runs the server
//! until Ctrl-C or SIGTERM, then stops every running job.

use std::path::PathBuf;

use anyhow::Context;
use opsbox_server::{Server, ServerConfig, TlsSource};

/// Flags of `opsbox serve`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on, repeatable: `127.0.0.1:3000`, `https://0.0.0.0:3443`,
    /// `unix:/run/opsbox.sock` [default: 127.0.0.1:3000]
    #[arg(long = "listen", env = "OPSBOX_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Data directory: database, job results, TLS certificate [default: ./data]
    #[arg(long = "data", env = "OPSBOX_DATA")]
    pub data: Option<PathBuf>,
    /// Store shared by several servers: `postgres://USER@HOST/DB[?schema=NAME]`
    /// [default: the SQLite file in the data directory]
    #[arg(long = "store", env = "OPSBOX_STORE")]
    pub store: Option<String>,
    /// This server's name in the node list and its job records [default: the host
    /// name, plus the first --listen address with a shared --store]
    #[arg(long = "server-id", env = "OPSBOX_SERVER_ID")]
    pub server_id: Option<String>,
    /// Scripts directory [default: ./examples/scripts]
    #[arg(long = "scripts", env = "OPSBOX_SCRIPTS")]
    pub scripts: Option<PathBuf>,
    /// Charms directory [default: ./examples/charms]
    #[arg(long = "charms", env = "OPSBOX_CHARMS")]
    pub charms: Option<PathBuf>,
    /// TOML config file (see the README for its keys).
    #[arg(long = "config", env = "OPSBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Certificate for https:// listeners: `self-signed` (generated once, kept in the
    /// data dir) or `CERT.pem:KEY.pem`.
    #[arg(long = "tls", env = "OPSBOX_TLS")]
    pub tls: Option<String>,
    /// Allow listening beyond loopback with no users or tokens configured (the same as
    /// the global `--insecure` given to `serve`).
    // Its own id: sharing the global flag's would hide that one from `serve`. The
    // environment variable takes 1/0, yes/no, true/false.
    #[arg(
        id = "insecure_listen",
        long = "insecure-listen",
        env = "OPSBOX_INSECURE_LISTEN",
        hide = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
    /// Apache htpasswd file: its users can log in (role operator); edits are picked up
    /// while running.
    #[arg(long = "htpasswd", env = "OPSBOX_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,
    /// Jojo face: accept request bodies whatever their Content-Type (Pyjojo's flag).
    #[arg(long = "force-json", env = "OPSBOX_FORCE_JSON")]
    pub force_json: bool,
    /// Script runs at once; more wait queued.
    #[arg(long = "max-runs", env = "OPSBOX_MAX_RUNS")]
    pub max_runs: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long = "max-body", env = "OPSBOX_MAX_BODY")]
    pub max_body: Option<usize>,
    /// Extra listeners for the py-jrpc face alone (py-jrpc's examples used port 9999),
    /// repeatable: there every `GET /{name}` and every POST is a jrpc call. Same forms
    /// as --listen, https:// included.
    #[arg(
        long = "jrpc-listen",
        env = "OPSBOX_JRPC_LISTEN",
        value_delimiter = ','
    )]
    pub jrpc_listen: Vec<String>,
    /// Role (reader, operator, admin) of py-jrpc callers that send no credentials,
    /// once users or tokens exist: py-jrpc's client cannot send any. Without it they
    /// get 401. While no user or token exists the server listens on loopback only and
    /// every caller may call everything.
    #[arg(
        long = "jrpc-anonymous",
        env = "OPSBOX_JRPC_ANONYMOUS",
        value_name = "ROLE"
    )]
    pub jrpc_anonymous: Option<String>,
    /// Role (reader, operator, admin) of Disco clients (`/disco/...`) that send no
    /// credentials, once users or tokens exist: Disco's clients cannot send any. Without
    /// it they get 401.
    #[arg(
        long = "disco-anonymous",
        env = "OPSBOX_DISCO_ANONYMOUS",
        value_name = "ROLE"
    )]
    pub disco_anonymous: Option<String>,
    /// Seconds without a heartbeat after which an agent's tasks are retried elsewhere.
    #[arg(
        long = "heartbeat-timeout",
        env = "OPSBOX_HEARTBEAT_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub heartbeat_timeout: Option<u64>,
    /// Labels of the server's own node, `local` (comma-separated).
    #[arg(
        long = "local-labels",
        env = "OPSBOX_LOCAL_LABELS",
        value_delimiter = ','
    )]
    pub local_labels: Vec<String>,
    /// Fan-out tasks the server's own node runs at once (0: leave them to agents).
    #[arg(long = "local-slots", env = "OPSBOX_LOCAL_SLOTS", value_name = "N")]
    pub local_slots: Option<u32>,
}

/// The configuration these flags give, over the config file's.
pub fn resolve(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            ServerConfig::from_toml(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => ServerConfig::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(store) = &args.store {
        config.store = Some(store.clone());
    }
    if let Some(id) = &args.server_id {
        config.server_id = Some(id.clone());
    }
    if let Some(scripts) = &args.scripts {
        config.scripts = scripts.clone();
    }
    if let Some(charms) = &args.charms {
        config.charms = charms.clone();
    }
    if let Some(tls) = &args.tls {
        config.tls = parse_tls(tls)?;
    }
    if args.insecure {
        config.insecure = true;
    }
    if let Some(htpasswd) = &args.htpasswd {
        config.htpasswd = Some(htpasswd.clone());
    }
    if args.force_json {
        config.jojo.force_json = true;
    }
    if let Some(n) = args.max_runs {
        anyhow::ensure!(n > 0, "--max-runs must be at least 1");
        config.limits.max_concurrent_runs = n;
    }
    if let Some(n) = args.max_body {
        config.limits.max_body_bytes = n;
    }
    if !args.jrpc_listen.is_empty() {
        config.rpc.jrpc_listen = args.jrpc_listen.clone();
    }
    if let Some(role) = &args.jrpc_anonymous {
        config.rpc.jrpc_anonymous_role =
            Some(opsbox_api::Role::parse(role).with_context(|| {
                format!("--jrpc-anonymous takes reader, operator or admin, not '{role}'")
            })?);
    }
    if let Some(role) = &args.disco_anonymous {
        config.disco.anonymous_role = Some(opsbox_api::Role::parse(role).with_context(|| {
            format!("--disco-anonymous takes reader, operator or admin, not '{role}'")
        })?);
    }
    if let Some(secs) = args.heartbeat_timeout {
        anyhow::ensure!(secs > 0, "--heartbeat-timeout must be at least 1 second");
        config.nodes.heartbeat_timeout_secs = secs;
    }
    if !args.local_labels.is_empty() {
        config.nodes.local_labels = args.local_labels.clone();
    }
    if let Some(slots) = args.local_slots {
        config.nodes.local_slots = Some(slots);
    }
    Ok(config)
}

fn parse_tls(value: &str) -> anyhow::Result<TlsSource> {
    if value == "self-signed" {
        return Ok(TlsSource::SelfSigned);
    }
    match value.split_once(':') {
        Some((cert, key)) if !cert.is_empty() && !key.is_empty() => Ok(TlsSource::Files {
            cert: cert.into(),
            key: key.into(),
        }),
        _ => anyhow::bail!("--tls takes `self-signed` or `CERT.pem:KEY.pem`, not '{value}'"),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(&args)?;
    if !config.scripts.is_dir() {
        tracing::warn!(dir = %config.scripts.display(), "the scripts directory does not exist; no scripts are served");
    }
    let server = Server::bind(config.clone()).await?;
    let catalog = server.core().scripts.catalog();
    for problem in &catalog.problems {
        tracing::warn!(file = %problem.file, "{}", problem.message);
    }
    for address in server.local_addrs() {
        eprintln!(
            "opsbox {} listening on {address}",
            env!("CARGO_PKG_VERSION")
        );
    }
    eprintln!(
        "data in {}, {} scripts from {}",
        config.data.display(),
        catalog.scripts.len(),
        config.scripts.display()
    );
    if config.store.is_some() {
        // The URL may hold a password: only say which kind of store it is.
        eprintln!("store: PostgreSQL, shared with every server pointed at it");
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("opsbox.toml");
        std::fs::write(
            &file,
            "listen = [\"127.0.0.1:4000\"]\ndata = \"/var/lib/opsbox\"\n[limits]\nmax_concurrent_runs = 3\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            data: Some("/tmp/d".into()),
            ..Default::default()
        };
        let config = resolve(&args).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:4000"]);
        assert_eq!(config.data, PathBuf::from("/tmp/d"));
        assert_eq!(config.limits.max_concurrent_runs, 3);
        std::fs::write(&file, "lsten = []\n").unwrap();
        assert!(
            resolve(&args).is_err(),
            "a typo in the config file must be an error"
        );
    }

    #[test]
    fn tls_flag() {
        assert_eq!(parse_tls("self-signed").unwrap(), TlsSource::SelfSigned);
        assert!(matches!(
            parse_tls("a.pem:b.pem").unwrap(),
            TlsSource::Files { .. }
        ));
        assert!(parse_tls("nope").is_err());
    }
}
