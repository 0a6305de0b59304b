//! Embedding: a Rust program runs its own opsbox with functions of its own, as
//! py-jrpc's `register_function` let a Python program do. Registered functions are
//! served by every face (py-jrpc's `POST /` and `GET /{name}`, JSON-RPC over HTTP and
//! WebSocket, the CLI's `opsbox rpc call`) and described by `list_methods`,
//! `method_help`, `method_signature` and `rpc.discover`.
//!
//! ```no_run
//! use opsbox_server::rpc::{Function, RpcError, RpcType};
//! # async fn demo() -> Result<(), opsbox_server::ServerError> {
//! let server = opsbox_server::Server::builder()
//!     .listen("127.0.0.1:9999")
//!     .register(
//!         "add",
//!         Function::new(|(a, b): (i64, i64)| async move { Ok::<_, RpcError>(a + b) })
//!             .doc(":param a: a number\n:param b: another (default 2)\n:return: a + b")
//!             .param("a", RpcType::Integer)
//!             .param_default("b", RpcType::Integer, 2),
//!     )
//!     .bind()
//!     .await?;
//! server.run(async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```

use opsbox_core::rpc::{Function, Registered};

use crate::{Server, ServerConfig, ServerError};

/// A server being put together: its configuration and the functions it adds.
#[derive(Debug, Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    /// Replaced by the first `listen` call rather than appended to the default.
    listen_set: bool,
    functions: Vec<(String, Function)>,
}

impl Server {
    /// Starts a server description with the default configuration.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

impl ServerBuilder {
    /// The whole configuration (listeners, directories, limits, RPC settings).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self.listen_set = true;
        self
    }

    /// Adds a listener (`127.0.0.1:9999`, `https://…`, `unix:/path`); the first call
    /// replaces the default `127.0.0.1:3000`.
    pub fn listen(mut self, address: &str) -> Self {
        if !self.listen_set {
            self.config.listen.clear();
            self.listen_set = true;
        }
        self.config.listen.push(address.to_owned());
        self
    }

    /// Adds a function under `name`. Built-in names (`ping`, `list_methods`…) are kept:
    /// [`ServerBuilder::bind`] refuses a name already taken rather than ignore it.
    pub fn register(mut self, name: &str, function: Function) -> Self {
        self.functions.push((name.to_owned(), function));
        self
    }

    /// Opens the core, registers the functions and binds every listener.
    pub async fn bind(self) -> Result<Server, ServerError> {
        let server = Server::bind(self.config).await?;
        for (name, function) in self.functions {
            if server.core().rpc.register(&name, function) == Registered::Ignored {
                return Err(ServerError::Refused(format!(
                    "cannot register the function '{name}': the name is taken"
                )));
            }
        }
        Ok(server)
    }
}
