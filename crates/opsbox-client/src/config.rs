//! Where a client finds its server and credentials: flags, then environment variables,
//! then a TOML file (`~/.config/opsbox/client.toml`), then the default server.
//!
//! Each source is read into a [`ClientConfig`] whose fields are all optional, and the
//! layers are merged with [`ClientConfig::or`], the first one that sets a field winning:
//!
//! ```no_run
//! use opsbox_client::ClientConfig;
//!
//! # fn main() -> opsbox_client::Result<()> {
//! let flags = ClientConfig { server: Some("https://ops.example:3443".into()), ..Default::default() };
//! let config = flags
//!     .or(ClientConfig::from_env())
//!     .or(ClientConfig::from_default_file()?);
//! let client = config.builder().build()?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::client::ClientBuilder;
use crate::error::{ClientError, Result};

/// The server a client talks to when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:3000";

/// Environment variables read by [`ClientConfig::from_env`].
pub const ENV_SERVER: &str = "OPSBOX_SERVER";
pub const ENV_USER: &str = "OPSBOX_USER";
pub const ENV_PASSWORD: &str = "OPSBOX_PASSWORD";
pub const ENV_TOKEN: &str = "OPSBOX_TOKEN";
/// Names the config file, instead of the default path.
pub const ENV_CONFIG: &str = "OPSBOX_CLIENT_CONFIG";

/// One layer of client settings. `None` means "this layer does not say".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:3000`.
    pub server: Option<String>,
    /// User for HTTP Basic auth (with `password`).
    pub user: Option<String>,
    pub password: Option<String>,
    /// API token, sent as `Authorization: Bearer`. Wins over user and password.
    pub token: Option<String>,
    /// Accept any TLS certificate (self-signed test servers).
    pub insecure: Option<bool>,
}

impl ClientConfig {
    /// Fills the fields this layer leaves unset from `lower`.
    ///
    /// Credentials are taken as a unit: a layer that names a user or a token keeps its
    /// own credentials, so a user given by a flag is never paired with a password or
    /// token from the file.
    pub fn or(self, lower: ClientConfig) -> ClientConfig {
        let has_credentials = self.user.is_some() || self.token.is_some();
        let (user, password, token) = if has_credentials {
            (self.user, self.password, self.token)
        } else {
            (lower.user, self.password.or(lower.password), lower.token)
        };
        ClientConfig {
            server: self.server.or(lower.server),
            user,
            password,
            token,
            insecure: self.insecure.or(lower.insecure),
        }
    }

    /// The layer given by `OPSBOX_SERVER`, `OPSBOX_USER`, `OPSBOX_PASSWORD`, `OPSBOX_TOKEN`.
    /// Empty variables count as unset.
    pub fn from_env() -> ClientConfig {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), with variables read through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ClientConfig {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        ClientConfig {
            server: get(ENV_SERVER),
            user: get(ENV_USER),
            password: get(ENV_PASSWORD),
            token: get(ENV_TOKEN),
            insecure: None,
        }
    }

    /// Parses a TOML config file's text (keys `server`, `user`, `password`, `token`,
    /// `insecure`; unknown keys are refused so a typo does not go unnoticed).
    pub fn from_toml(text: &str) -> Result<ClientConfig> {
        toml::from_str(text).map_err(|e| ClientConfig::bad(format!("invalid client config: {e}")))
    }

    /// Reads a config file. A file that does not exist is an error here.
    pub fn from_file(path: &Path) -> Result<ClientConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientConfig::bad(format!(
                "cannot read the client config {}: {e}",
                path.display()
            ))
        })?;
        Self::from_toml(&text).map_err(|e| ClientConfig::bad(format!("{}: {e}", path.display())))
    }

    /// Reads the file named by `OPSBOX_CLIENT_CONFIG`, or else the default file when it
    /// exists; an empty layer when there is none.
    pub fn from_default_file() -> Result<ClientConfig> {
        if let Some(path) = std::env::var_os(ENV_CONFIG).filter(|p| !p.is_empty()) {
            return Self::from_file(Path::new(&path));
        }
        match default_path() {
            Some(path) if path.exists() => Self::from_file(&path),
            _ => Ok(ClientConfig::default()),
        }
    }

    /// The server URL this configuration resolves to.
    pub fn server_url(&self) -> &str {
        self.server.as_deref().unwrap_or(DEFAULT_SERVER)
    }

    /// A client builder with these settings (default server when none is set).
    pub fn builder(&self) -> ClientBuilder {
        let mut builder = crate::Client::builder(self.server_url());
        if let Some(token) = &self.token {
            builder = builder.token(token);
        } else if let Some(user) = &self.user {
            builder = builder.basic_auth(user, self.password.as_deref().unwrap_or(""));
        }
        if self.insecure == Some(true) {
            builder = builder.danger_accept_invalid_certs(true);
        }
        builder
    }

    fn bad(message: String) -> ClientError {
        ClientError::Config(message)
    }
}

/// `$XDG_CONFIG_HOME/opsbox/client.toml`, or `~/.config/opsbox/client.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|home| home.join(".config")))?;
    Some(base.join("opsbox").join("client.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(server: Option<&str>, user: Option<&str>, token: Option<&str>) -> ClientConfig {
        ClientConfig {
            server: server.map(Into::into),
            user: user.map(Into::into),
            password: user.map(|u| format!("{u}-password")),
            token: token.map(Into::into),
            insecure: None,
        }
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let flags = layer(Some("http://flag:1"), None, None);
        let env = layer(Some("http://env:2"), Some("env-user"), None);
        let file = layer(Some("http://file:3"), Some("file-user"), Some("file-token"));
        let merged = flags.or(env).or(file);
        assert_eq!(merged.server_url(), "http://flag:1");
        assert_eq!(merged.user.as_deref(), Some("env-user"));
        assert_eq!(merged.password.as_deref(), Some("env-user-password"));
        assert_eq!(
            merged.token, None,
            "the env layer named its credentials; the file's token must not join them"
        );
    }

    #[test]
    fn the_file_fills_what_nobody_else_says() {
        let merged = ClientConfig::default()
            .or(ClientConfig::from_lookup(|_| None))
            .or(layer(None, None, Some("t0k")));
        assert_eq!(merged.server_url(), DEFAULT_SERVER);
        assert_eq!(merged.token.as_deref(), Some("t0k"));
    }

    #[test]
    fn a_password_alone_pairs_with_a_lower_user() {
        let flags = ClientConfig {
            password: Some("from-flag".into()),
            ..Default::default()
        };
        let merged = flags.or(layer(None, Some("alice"), None));
        assert_eq!(merged.user.as_deref(), Some("alice"));
        assert_eq!(merged.password.as_deref(), Some("from-flag"));
    }

    #[test]
    fn environment_layer_ignores_empty_variables() {
        let config = ClientConfig::from_lookup(|name| match name {
            ENV_SERVER => Some("http://h:9".into()),
            ENV_TOKEN => Some(String::new()),
            _ => None,
        });
        assert_eq!(config.server.as_deref(), Some("http://h:9"));
        assert_eq!(config.token, None);
    }

    #[test]
    fn config_file_keys_and_typos() {
        let config =
            ClientConfig::from_toml("server = \"https://x:1\"\ntoken = \"abc\"\ninsecure = true\n")
                .unwrap();
        assert_eq!(config.server.as_deref(), Some("https://x:1"));
        assert_eq!(config.insecure, Some(true));
        let error = ClientConfig::from_toml("sever = \"x\"\n").unwrap_err();
        assert!(error.to_string().contains("sever"), "{error}");
    }
}
