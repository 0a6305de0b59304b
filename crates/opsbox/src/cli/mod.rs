//! The command line: flags parsed by clap ([`Cli`]), resolved into a [`Ctx`] (which
//! server, which credentials, JSON or human output), then one module per command group
//! does the work through the SDK.

mod backups;
mod disco;
mod identity;
mod jobs;
mod model;
mod nodes;
mod output;
mod queue;
mod rpc;
mod scripts;
mod server;
mod store;
mod watch;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use opsbox_client::{Client, ClientConfig, ClientError};

use crate::serve::ServeArgs;

/// Exit status for an error of the CLI or a refusal of the server.
pub const EXIT_ERROR: u8 = 1;

/// Exit status of a command line that is wrong, as clap's own refusals.
pub const EXIT_USAGE: u8 = 2;

/// A command line that parses but does not make sense (exits with [`EXIT_USAGE`]).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit status for an error.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_ERROR
    }
}
/// Exit status of `opsbox jobs wait` when `--timeout` passed first (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    success
  N    `scripts run`, `jobs wait`, `jobs log --follow`: the script's own exit code;
       1 when it ended without one (killed, timed out, lost)
  124  `jobs wait --timeout S`: the job was still running when S seconds passed
  1    any other error (server unreachable, refused, not found...)
  2    invalid command line

Connection settings: flags win over the environment (OPSBOX_SERVER, OPSBOX_USER,
OPSBOX_PASSWORD, OPSBOX_TOKEN), which wins over the client config file
(--client-config, OPSBOX_CLIENT_CONFIG, or ~/.config/opsbox/client.toml; keys server,
user, password, token, insecure).";

/// opsbox: run operations on machines remotely.
#[derive(Parser, Debug)]
#[command(name = "opsbox", version, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every client command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Server URL, or unix:PATH for its Unix socket [env: OPSBOX_SERVER] [default:
    /// http://127.0.0.1:3000]
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// User for HTTP Basic auth [env: OPSBOX_USER]
    #[arg(long, global = true, value_name = "NAME")]
    user: Option<String>,
    /// Password for --user [env: OPSBOX_PASSWORD]
    #[arg(long, global = true, value_name = "PASSWORD")]
    password: Option<String>,
    /// API token, sent as a Bearer token [env: OPSBOX_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Client config file [env: OPSBOX_CLIENT_CONFIG] [default: ~/.config/opsbox/client.toml]
    #[arg(long = "client-config", global = true, value_name = "FILE")]
    client_config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Client commands: accept any TLS certificate (a self-signed test server).
    /// `serve`: allow listening beyond loopback with no users or tokens configured.
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Run tasks for a server on this machine (connects to --server, several
    /// comma-separated URLs allowed, with --token).
    Agent(crate::agent::AgentArgs),
    /// Nodes: list, info, blacklist, whitelist.
    #[command(subcommand)]
    Nodes(nodes::NodesCommand),
    /// The discoapi command line: `opsbox disco disco://HOST:PORT METHOD [ARG]`
    /// (nodeinfo, joblist, jobinfo, results, jobspec, wait, kill, clean, purge, events...).
    Disco(disco::DiscoArgs),
    /// List, show and run scripts.
    #[command(subcommand)]
    Scripts(scripts::ScriptsCommand),
    /// List and manage jobs: info, spec, log, wait, kill, clean, results.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Print every event live, one per line with its revision.
    Watch(watch::WatchArgs),
    /// The model: deploy charms, relate, expose, config, constraints, units, status,
    /// watch; write a jenv file for Juju clients.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Copies of the whole store, taken while the server runs (admin).
    #[command(subcommand)]
    Backups(backups::BackupsCommand),
    /// The store itself, offline: migrate between SQLite and PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Make the server rescan its scripts directory.
    Reload,
    /// Show the server's version, revision and who you are to it.
    Info,
    /// Manage users (admin).
    Users(identity::UsersArgs),
    /// Manage API tokens (admin).
    Tokens(identity::TokensArgs),
    /// Message queues: push, pull, ack, get, list, delete, stats (act as --node).
    Queue(queue::QueueArgs),
    /// Call the server's functions (built-ins, host introspection, scripts, embedded
    /// ones) over JSON-RPC; list them; read their help.
    #[command(subcommand)]
    Rpc(rpc::RpcCommand),
}

impl Cli {
    /// True for `opsbox serve`, which logs more than the client commands.
    pub fn is_serve(&self) -> bool {
        matches!(self.command, Command::Serve(_) | Command::Agent(_))
    }

    /// The agent runs on one thread: its work is relaying messages and waiting for
    /// children, and handing that between worker threads cost more than it saved
    /// (~30% less agent CPU per task in the dispatch benchmark, benches/README).
    pub fn is_agent(&self) -> bool {
        matches!(self.command, Command::Agent(_))
    }
}

/// What every client command needs: how to reach the server, and how to print.
pub struct Ctx {
    config: ClientConfig,
    /// `--json`: print JSON documents (one per line for live streams).
    json: bool,
}

impl Ctx {
    fn new(global: &GlobalArgs) -> anyhow::Result<Ctx> {
        let flags = ClientConfig {
            server: global.server.clone(),
            user: global.user.clone(),
            password: global.password.clone(),
            token: global.token.clone(),
            insecure: global.insecure.then_some(true),
        };
        let file = match &global.client_config {
            Some(path) => ClientConfig::from_file(path)?,
            None => ClientConfig::from_default_file()?,
        };
        Ok(Ctx {
            config: flags.or(ClientConfig::from_env()).or(file),
            json: global.json,
        })
    }

    /// The resolved client settings (flags, then env, then the config file).
    fn client_config(&self) -> &ClientConfig {
        &self.config
    }

    /// An SDK client for the configured server (no request made yet).
    fn client(&self) -> anyhow::Result<Client> {
        if let (Some(user), None, None) =
            (&self.config.user, &self.config.password, &self.config.token)
        {
            anyhow::bail!(
                "user '{user}' has no password: give --password, set OPSBOX_PASSWORD, or put \
                 password in the client config"
            );
        }
        self.config
            .builder()
            .build()
            .with_context(|| format!("cannot set up a client of {}", self.config.server_url()))
    }
}

/// Runs the parsed command; the `Ok` value is the exit status.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let command = match cli.command {
        Command::Serve(mut args) => {
            args.insecure |= cli.global.insecure;
            crate::serve::run(args).await?;
            return Ok(0);
        }
        Command::Store(command) => return store::run(command, cli.global.json).await,
        Command::Agent(args) => {
            let g = cli.global;
            crate::agent::run(args, g.server, g.token, g.insecure).await?;
            return Ok(0);
        }
        command => command,
    };
    let ctx = Ctx::new(&cli.global)?;
    match command {
        Command::Serve(_) | Command::Agent(_) | Command::Store(_) => Ok(0),
        Command::Nodes(command) => nodes::run(&ctx, command).await,
        Command::Disco(args) => disco::run(&ctx, args).await,
        Command::Scripts(command) => scripts::run(&ctx, command).await,
        Command::Jobs(command) => jobs::run(&ctx, command).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Model(command) => model::run(&ctx, command).await,
        Command::Backups(command) => backups::run(&ctx, command).await,
        Command::Reload => server::reload(&ctx).await,
        Command::Info => server::info(&ctx).await,
        Command::Users(args) => identity::users(&ctx, args).await,
        Command::Tokens(args) => identity::tokens(&ctx, args).await,
        Command::Queue(args) => queue::run(&ctx, args).await,
        Command::Rpc(command) => rpc::run(&ctx, command).await,
    }
}

/// One line for an error: the server's own sentence for its refusals, the cause chain
/// for the rest, and a hint where one helps.
pub fn describe_error(error: &anyhow::Error) -> String {
    // The cause chain, each cause once: many errors already say their source's text
    // (a store failure quotes the driver's), which `{:#}` would print again.
    let mut text = String::new();
    for cause in error.chain() {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Unauthorized(body)) if body.error == "bad_credentials" => {
            format!("{text} (check --user and --password, or --token)")
        }
        Some(ClientError::Unauthorized(_)) => format!(
            "{text} (give --user and --password, or --token; or set OPSBOX_USER/OPSBOX_PASSWORD or OPSBOX_TOKEN)"
        ),
        Some(ClientError::Forbidden(_)) => format!("{text} (your role does not allow this)"),
        _ => text,
    }
}

/// True when the error is stdout's reader having gone away.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "opsbox",
            "jobs",
            "list",
            "--json",
            "--server",
            "http://h:1",
            "--limit",
            "3",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.server.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn flags_beat_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.toml");
        std::fs::write(&file, "server = \"http://file:1\"\ntoken = \"from-file\"\n").unwrap();
        let cli = Cli::try_parse_from([
            "opsbox",
            "info",
            "--client-config",
            file.to_str().unwrap(),
            "--server",
            "http://flag:2",
        ])
        .unwrap();
        let ctx = Ctx::new(&cli.global).unwrap();
        assert_eq!(ctx.config.server_url(), "http://flag:2");
        // Unless the environment of the test run names credentials, the file's token
        // fills in.
        if std::env::var_os("OPSBOX_USER").is_none() && std::env::var_os("OPSBOX_TOKEN").is_none() {
            assert_eq!(ctx.config.token.as_deref(), Some("from-file"));
        }
    }

    #[test]
    fn a_missing_explicit_config_file_is_an_error() {
        let cli = Cli::try_parse_from(["opsbox", "info", "--client-config", "/nonexistent/c.toml"])
            .unwrap();
        assert!(Ctx::new(&cli.global).is_err());
    }
}
