//! `opsbox serve`: resolves flags, environment and the config file into a server
//! configuration and runs the server until Ctrl-C or SIGTERM.
//! (Owned by the server work; the CLI only dispatches here.)

use std::path::PathBuf;

/// Flags of `opsbox serve`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on (repeatable): `127.0.0.1:3000`, `https://0.0.0.0:3443`.
    #[arg(long = "listen", env = "OPSBOX_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Data directory (store, results, certificates).
    #[arg(long = "data", env = "OPSBOX_DATA")]
    pub data: Option<PathBuf>,
    /// Scripts directory.
    #[arg(long = "scripts", env = "OPSBOX_SCRIPTS")]
    pub scripts: Option<PathBuf>,
    /// Charms directory.
    #[arg(long = "charms", env = "OPSBOX_CHARMS")]
    pub charms: Option<PathBuf>,
    /// TOML config file.
    #[arg(long = "config", env = "OPSBOX_CONFIG")]
    pub config: Option<PathBuf>,
}

pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("opsbox serve is not wired yet")
}
