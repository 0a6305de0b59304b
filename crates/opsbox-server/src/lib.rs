//! opsbox server: one router with every face, served on any number of listeners
//! (plain TCP, TLS, Unix socket).
//!
//! ```no_run
//! # async fn demo() -> Result<(), opsbox_server::ServerError> {
//! let mut config = opsbox_server::ServerConfig::default();
//! config.listen = vec!["127.0.0.1:0".into()];
//! let server = opsbox_server::Server::bind(config).await?;
//! println!("listening on {:?}", server.local_addrs());
//! server.run(async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```

pub mod auth;
pub mod body;
pub mod config;
pub mod embed;
pub mod error;
pub mod faces;
mod listen;
pub mod opening;
mod self_wake;
pub mod tls;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use opsbox_core::{Core, CoreConfig, CoreError};
use tower_http::map_request_body::MapRequestBodyLayer;
use tower_http::trace::TraceLayer;

pub use config::{JojoConfig, Limits, NodesSettings, SciroccoConfig, ServerConfig, TlsSource};
pub use embed::ServerBuilder;

/// What a program that embeds the server needs to register functions.
pub mod rpc {
    pub use opsbox_api::{Role, RpcType};
    pub use opsbox_core::rpc::{Call, Function, Params, RpcError};
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Behind one `Arc`: the state is cloned several times per request (each layer and
    /// extractor), and a `Core` is a dozen `Arc`s.
    pub core: Arc<Core>,
    pub config: Arc<ServerConfig>,
}

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid listen address '{address}': {reason}")]
    Address { address: String, reason: String },
    // The cause is the source, not in the text: callers print the chain.
    #[error("cannot listen on {address}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    /// A setting that would expose the server unsafely.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("listener failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The whole router: every face, with the request body limit and, when its events
/// would be recorded, request tracing.
///
/// The body limit is applied where a body is read, not in front of the routes, so
/// that each face refuses an over-limit body in its own error shape and after its own
/// auth check: extractors (`Bytes`) take the limit from `DefaultBodyLimit`, and the
/// faces with their own error shapes read with [`body::read`].
///
/// Layers cost on every request (a JSON-RPC call is ~15 µs of server CPU in all, and
/// each layer a few percent of it), so each covers only what needs it: `/rpc` never
/// goes through the root's WebSocket check; the trace layer is left out when its
/// events are filtered away anyway.
pub fn router(state: AppState) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let stall = body_read_timeout(&state.config.limits);
    let tracing = tracing_requests();
    let router = Router::new()
        .merge(faces::nodes::routes(state.clone()))
        .merge(faces::native::routes(state.clone()))
        .merge(faces::model::routes(state.clone()))
        .merge(faces::backups::routes(state.clone()))
        .merge(faces::jojo::routes(state.clone()))
        .merge(faces::disco::routes(state.clone()))
        .merge(faces::queues::routes(state.clone()))
        .merge(faces::scirocco::routes(state.clone()))
        .merge(faces::jrpc::routes(state.clone()))
        .merge(faces::juju::routes(state.clone()))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            faces::juju::on_root,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(error::native_json_errors))
        .merge(faces::jsonrpc::routes(state.clone()))
        .layer(MapRequestBodyLayer::new(move |b| {
            body::EndsWhenComplete::wrap(b, stall)
        }));
    let router = if tracing {
        router.layer(TraceLayer::new_for_http())
    } else {
        router
    };
    router.with_state(state)
}

/// What a listener serves: the router, with a shortcut for the path `/rpc`.
///
/// A JSON-RPC call is a few microseconds of server CPU, and finding its route among the
/// faces' hundred-odd (axum's route tree, the matched path put into the request's
/// extensions, the method router) was a fifth of its user-space instructions (28.6k →
/// 23.2k per call, `benches/instructions.sh`), with the cache misses of walking that
/// tree. The shortcut hands `/rpc` straight to its handler, with the same request
/// body wrapper as the router's; the route stays in the router too, which serves it when
/// the shortcut is off (request tracing on, which the router's layer does) and for
/// callers of [`router`].
#[derive(Clone)]
pub struct App {
    router: Router,
    rpc: Option<(AppState, Option<Duration>)>,
}

impl App {
    /// The main listeners' service.
    pub fn new(state: AppState) -> App {
        let stall = body_read_timeout(&state.config.limits);
        let router = router(state.clone());
        App {
            router,
            rpc: (!tracing_requests()).then_some((state, stall)),
        }
    }

    /// A router served as it is, without the shortcut.
    pub fn plain(router: Router) -> App {
        App { router, rpc: None }
    }
}

impl<B> tower::Service<axum::http::Request<B>> for App
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        <Router as tower::Service<axum::http::Request<B>>>::Future,
        futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Router is always ready, and so is the shortcut.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        if let Some((state, stall)) = &self.rpc {
            if request.uri().path() == "/rpc" {
                let stall = *stall;
                let request =
                    request.map(|b| body::EndsWhenComplete::wrap(axum::body::Body::new(b), stall));
                let state = state.clone();
                return futures::future::Either::Right(Box::pin(async move {
                    Ok(faces::jsonrpc::endpoint(state, request).await)
                }));
            }
        }
        futures::future::Either::Left(tower::Service::call(&mut self.router, request))
    }
}

/// Whether request tracing's events would be recorded (then the router has its layer).
fn tracing_requests() -> bool {
    tracing::enabled!(target: "tower_http::trace::on_request", tracing::Level::DEBUG)
        || tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::DEBUG)
}

/// How long open requests get to finish once the server stops.
const GRACE: Duration = Duration::from_secs(5);

/// How every listener speaks HTTP:
/// - response header names title-cased (`Scirocco-Node-Source`): header names are
///   case-insensitive, but scirocco-pyclient matches them case-sensitively (HTTP/2 is
///   unaffected, its names are lowercase by definition);
/// - a request head must arrive within `limits.header_read_timeout_secs` of the
///   accept or of the previous exchange's end, else the connection is closed: without
///   a deadline hyper waits for a trickling client (slowloris) forever. That deadline
///   is [`opening::OpeningDeadline`]'s, for both HTTP versions; hyper's own
///   `header_read_timeout` is off, as it arms a timer per request;
/// - HTTP/2: a connection that receives nothing for that time is sent a PING, and
///   closed if the answer does not come within that time again: a client that stops
///   after the preface, or vanishes during a long request, does not hold it forever.
fn http_settings(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: &Limits,
) {
    let timeout = header_read_timeout(limits);
    builder
        .http1()
        .title_case_headers(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None);
    if let Some(timeout) = timeout {
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(timeout)
            .keep_alive_timeout(timeout);
    }
}

/// `limits.body_read_timeout_secs`, `None` for 0.
pub(crate) fn body_read_timeout(limits: &Limits) -> Option<Duration> {
    (limits.body_read_timeout_secs > 0).then(|| Duration::from_secs(limits.body_read_timeout_secs))
}

/// `limits.header_read_timeout_secs`, `None` for 0.
fn header_read_timeout(limits: &Limits) -> Option<Duration> {
    (limits.header_read_timeout_secs > 0)
        .then(|| Duration::from_secs(limits.header_read_timeout_secs))
}

/// Brings the users of an htpasswd file (role operator) in step with it: its users are
/// imported, and users it no longer lists are removed.
async fn import_htpasswd(core: &Core, path: &std::path::Path) -> Result<usize, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        ServerError::Core(CoreError::Io {
            action: format!("read the htpasswd file {}", path.display()),
            source,
        })
    })?;
    // The file's users are marked with its absolute path: removing a line removes only
    // users that came from this file, never ones made with opsbox.
    let source = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let source = format!("htpasswd:{}", source.display());
    let sync = core
        .identities
        .sync_htpasswd(&text, opsbox_api::Role::Operator, &source)
        .await?;
    tracing::info!(users = sync.users.len(), removed = ?sync.removed, file = %path.display(), "imported htpasswd users");
    Ok(sync.users.len())
}

/// Re-imports the htpasswd file whenever its modification time changes, so edits take
/// effect without a restart (Pyjojo re-read it on every request).
fn watch_htpasswd(core: Core, path: PathBuf) {
    tokio::spawn(async move {
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen = modified(&path);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = modified(&path);
            if now != seen {
                seen = now;
                if let Err(e) = import_htpasswd(&core, &path).await {
                    tracing::warn!(error = %e, "cannot re-import the htpasswd file");
                }
            }
        }
    });
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Http(SocketAddr),
    Https(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Http(a) => write!(f, "http://{a}"),
            ListenAddr::Https(a) => write!(f, "https://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Parses `host:port`, `http://host:port`, `https://host:port` or `unix:/path`.
pub fn parse_listen(address: &str) -> Result<Vec<ListenAddr>, ServerError> {
    let bad = |reason: &str| ServerError::Address {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some(path) = address.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("a unix socket needs a path: unix:/run/opsbox.sock"));
        }
        return Ok(vec![ListenAddr::Unix(PathBuf::from(path))]);
    }
    let (tls, rest) = if let Some(rest) = address.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = address.strip_prefix("http://") {
        (false, rest)
    } else {
        (false, address)
    };
    let rest = rest.trim_end_matches('/');
    let resolved: Vec<SocketAddr> = rest
        .to_socket_addrs()
        .map_err(|e| bad(&format!("expected host:port ({e})")))?
        .collect();
    let first = resolved
        .first()
        .ok_or_else(|| bad("the host resolves to nothing"))?;
    Ok(vec![if tls {
        ListenAddr::Https(*first)
    } else {
        ListenAddr::Http(*first)
    }])
}

enum Bound {
    /// `jrpc_only`: a dedicated py-jrpc listener (`rpc.jrpc_listen`).
    Tcp {
        listener: TcpListener,
        tls: bool,
        jrpc_only: bool,
    },
    Unix(tokio::net::UnixListener, PathBuf, bool),
}

/// A server whose listeners are bound, ready to run.
pub struct Server {
    state: AppState,
    bound: Vec<Bound>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Server {
    /// Opens the core, checks the configuration is safe, and binds every listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let mut addresses = Vec::new();
        for address in &config.listen {
            addresses.extend(parse_listen(address)?);
        }
        if addresses.is_empty() {
            return Err(ServerError::Refused("no listen address given".into()));
        }
        // Listeners from here on serve only the py-jrpc face.
        let main_listeners = addresses.len();
        for address in &config.rpc.jrpc_listen {
            addresses.extend(parse_listen(address)?);
        }
        let mut core_config = CoreConfig {
            max_concurrent_runs: config.limits.max_concurrent_runs,
            max_output_bytes: config.limits.max_output_bytes,
            event_retention: config.limits.event_retention,
            kill_grace: Duration::from_secs(config.limits.kill_grace_secs),
            ..CoreConfig::new(config.data.clone(), config.scripts.clone())
        };
        core_config.model.charms_dir =
            std::path::absolute(&config.charms).unwrap_or_else(|_| config.charms.clone());
        let nodes = &config.nodes;
        core_config.nodes.heartbeat_timeout =
            Duration::from_secs(nodes.heartbeat_timeout_secs.max(1));
        core_config.nodes.max_failures = nodes.max_failures;
        core_config.nodes.local_labels = nodes.local_labels.clone();
        if let Some(slots) = nodes.local_slots {
            core_config.nodes.local_slots = slots;
        }
        core_config.nodes.local_prefetch = nodes.local_prefetch;
        core_config.store = config.store.clone();
        match (&config.server_id, &config.store) {
            (Some(id), _) => core_config.nodes.server_id = id.clone(),
            (None, Some(_)) => {
                let first = config.listen.first().cloned().unwrap_or_default();
                core_config.nodes.server_id = format!("{}/{first}", core_config.nodes.server_id);
            }
            (None, None) => {}
        }
        if config.store.is_some() {
            // Servers sharing a store each have their own node: `local-<server id>`,
            // in node id characters.
            let id: String = core_config
                .nodes
                .server_id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .take(58)
                .collect();
            core_config.nodes.local_id = format!("local-{id}");
        }
        let core = Core::open(core_config).await?;
        if let Some(path) = &config.htpasswd {
            import_htpasswd(&core, path).await?;
            watch_htpasswd(core.clone(), path.clone());
        }

        let exposed: Vec<String> = addresses
            .iter()
            .filter_map(|a| match a {
                ListenAddr::Http(s) | ListenAddr::Https(s) if !s.ip().is_loopback() => {
                    Some(a.to_string())
                }
                _ => None,
            })
            .collect();
        if !exposed.is_empty() && !config.insecure && !core.identities.auth_required().await? {
            return Err(ServerError::Refused(format!(
                "refusing to listen on {} with no users or tokens configured: anyone who can \
                 reach it could run scripts. Add a user first (opsbox users add NAME \
                 --password-stdin --data {}), or pass --insecure if this network is trusted.",
                exposed.join(", "),
                config.data.display()
            )));
        }

        let needs_tls = addresses.iter().any(|a| matches!(a, ListenAddr::Https(_)));
        let tls = if needs_tls {
            Some(tls::server_config(&config.tls, &config.data)?)
        } else {
            None
        };

        let mut bound = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            let jrpc_only = i >= main_listeners;
            let bind_error = |source| ServerError::Bind {
                address: address.to_string(),
                source,
            };
            match address {
                ListenAddr::Http(a) | ListenAddr::Https(a) => {
                    let listener = TcpListener::bind(a).map_err(bind_error)?;
                    listener.set_nonblocking(true).map_err(bind_error)?;
                    bound.push(Bound::Tcp {
                        listener,
                        tls: matches!(address, ListenAddr::Https(_)),
                        jrpc_only,
                    });
                }
                ListenAddr::Unix(path) => {
                    // A socket file left by a previous run would make bind fail.
                    if path.exists() {
                        std::fs::remove_file(path).map_err(bind_error)?;
                    }
                    let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
                    bound.push(Bound::Unix(listener, path.clone(), jrpc_only));
                }
            }
        }
        Ok(Server {
            state: AppState {
                core: Arc::new(core),
                config: Arc::new(config),
            },
            bound,
            tls,
        })
    }

    /// The addresses actually bound (with the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.bound
            .iter()
            .filter_map(|b| match b {
                Bound::Tcp { listener, tls, .. } => listener.local_addr().ok().map(|a| {
                    if *tls {
                        ListenAddr::Https(a)
                    } else {
                        ListenAddr::Http(a)
                    }
                }),
                Bound::Unix(_, path, _) => Some(ListenAddr::Unix(path.clone())),
            })
            .collect()
    }

    pub fn core(&self) -> &Core {
        &self.state.core
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open requests
    /// finish for a few seconds, and kills every running job.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let main_app = App::new(self.state.clone());
        let jrpc_app = App::plain(faces::jrpc::dedicated(self.state.clone()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let opening_timeout = header_read_timeout(&self.state.config.limits);
        for bound in self.bound {
            let jrpc_only = match &bound {
                Bound::Tcp { jrpc_only, .. } | Bound::Unix(_, _, jrpc_only) => *jrpc_only,
            };
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            http_settings(&mut builder, &self.state.config.limits);
            let mut serving = listen::Serving {
                app: if jrpc_only {
                    jrpc_app.clone()
                } else {
                    main_app.clone()
                },
                builder,
                stop: stop_rx.clone(),
                grace: GRACE,
                socket_file: None,
            };
            // TCP_NODELAY: small writes (WebSocket frames to agents and watchers,
            // streamed answers) go out at once, not after the peer's delayed ACK.
            let no_delay = axum_server::accept::NoDelayAcceptor::new();
            match bound {
                Bound::Tcp { listener, tls, .. } => {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).map_err(ServerError::Serve)?;
                    if tls {
                        let config = axum_server::tls_rustls::RustlsConfig::from_config(
                            self.tls
                                .clone()
                                .ok_or_else(|| ServerError::Tls("no TLS configuration".into()))?,
                        );
                        let acceptor = opening::OpeningDeadline::new(
                            axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(no_delay),
                            opening_timeout,
                        );
                        tasks.spawn(listen::serve(listener, acceptor, serving));
                    } else {
                        let acceptor = opening::OpeningDeadline::new(no_delay, opening_timeout);
                        tasks.spawn(listen::serve(listener, acceptor, serving));
                    }
                }
                Bound::Unix(listener, path, _) => {
                    serving.socket_file = Some(path);
                    let acceptor = opening::OpeningDeadline::new(
                        axum_server::accept::DefaultAcceptor::new(),
                        opening_timeout,
                    );
                    tasks.spawn(listen::serve(listener, acceptor, serving));
                }
            }
        }
        let core = self.state.core.clone();
        tokio::select! {
            _ = shutdown => {}
            Some(result) = tasks.join_next() => {
                // A listener stopped on its own: that is an error worth stopping for.
                core.shutdown().await;
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(ServerError::Serve(e)),
                    Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
                };
            }
        }
        tracing::info!("shutting down: stopping running jobs");
        let _ = stop_tx.send(true);
        core.shutdown().await;
        let _ = tokio::time::timeout(GRACE + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    }
}
