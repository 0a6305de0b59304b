//! `opsbox agent`: one WebSocket to a server (`GET /v1/agent`), `Hello` with the node's
//! id, labels and slots, then tasks in and output, results and heartbeats out, through
//! an [`Executor`]. When the connection drops the agent reconnects with backoff, to the
//! next of its server URLs, and tells the server which tasks it still runs; what the
//! tasks reported meanwhile waits in memory and is sent after the reconnect.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use opsbox_api::{AgentMessage, ServerMessage};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::executor::Executor;

/// How an agent connects and what it offers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server base URLs (`http(s)://host:port`, or `unix:/path` for a server's Unix
    /// socket on the same machine), tried in turn.
    pub servers: Vec<String>,
    /// A node token (`obx_...`) or any token allowed to act as `node_id`.
    pub token: Option<String>,
    pub node_id: String,
    pub labels: Vec<String>,
    pub slots: u32,
    /// Tasks taken beyond `slots`, each started the moment a slot frees, so a slot
    /// does not idle while a task's end travels to the server and the next task comes
    /// back (the server sends tasks ahead only for jobs whose tasks are short). Usually
    /// equal to `slots`.
    pub prefetch: u32,
    /// Skip TLS certificate checks (self-signed servers).
    pub insecure: bool,
}

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no server URL given")]
    NoServer,
    #[error(
        "invalid server URL '{0}': use http://host:port, https://host:port or unix:/absolute/path"
    )]
    BadUrl(String),
    #[error("the server refused this agent: {0}")]
    Refused(String),
}

/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves; reconnects on its own.
pub async fn run(
    config: AgentConfig,
    executor: Executor,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if config.servers.is_empty() {
        return Err(AgentError::NoServer);
    }
    let urls: Vec<Target> = config
        .servers
        .iter()
        .map(|s| target(s))
        .collect::<Result<_, _>>()?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMessage>();
    // Messages taken from the queue but not yet written when a connection died.
    let mut unsent: Vec<AgentMessage> = Vec::new();
    tokio::pin!(shutdown);
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(200);
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let session = session(
            &config,
            url,
            &executor,
            &out_tx,
            &mut out_rx,
            &mut unsent,
            &mut shutdown,
        )
        .await;
        match session {
            Ok(Ended::Left) => return Ok(()),
            Ok(Ended::Closed) => backoff = Duration::from_millis(200),
            Err(SessionError::Refused(reason)) => return Err(AgentError::Refused(reason)),
            Err(SessionError::Lost(e)) => {
                tracing::warn!(server = %url, error = %e, "connection to the server lost; reconnecting");
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    executor.kill_all();
    Ok(())
}

enum SessionError {
    Refused(String),
    Lost(String),
}

/// How a session that did not fail ended.
enum Ended {
    /// The agent was asked to stop, and said goodbye.
    Left,
    /// The executor's queue closed.
    Closed,
}

/// Longest wait, when the agent stops, for the ends of the tasks it killed to go out.
const LEAVE_GRACE: Duration = Duration::from_secs(5);

/// Where a session connects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The WebSocket URL asked for (over a Unix socket, its host is a placeholder).
    url: String,
    /// A server's Unix socket, reached instead of the URL's host.
    socket: Option<std::path::PathBuf>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.socket {
            Some(path) => write!(f, "unix:{}", path.display()),
            None => f.write_str(&self.url),
        }
    }
}

/// `http(s)://host:port[/]` → `ws(s)://host:port/v1/agent`; `unix:/path` (or
/// `unix:///path`, as `--listen` and the CLI spell it) → that socket.
fn target(server: &str) -> Result<Target, AgentError> {
    if let Some(path) = server.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(AgentError::BadUrl(server.to_owned()));
        }
        return Ok(Target {
            url: "ws://localhost/v1/agent".into(),
            socket: Some(path.into()),
        });
    }
    Ok(Target {
        url: ws_url(server)?,
        socket: None,
    })
}

/// `http(s)://host:port[/]` → `ws(s)://host:port/v1/agent`.
fn ws_url(server: &str) -> Result<String, AgentError> {
    let base = server.trim_end_matches('/');
    let rest = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        return Err(AgentError::BadUrl(server.to_owned()));
    };
    Ok(format!("{rest}/v1/agent"))
}

fn lost(e: &dyn std::fmt::Display) -> SessionError {
    SessionError::Lost(e.to_string())
}

async fn session(
    config: &AgentConfig,
    target: &Target,
    executor: &Executor,
    out_tx: &mpsc::UnboundedSender<AgentMessage>,
    out_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
    unsent: &mut Vec<AgentMessage>,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Ended, SessionError> {
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| lost(&e))?;
    if let Some(token) = &config.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| lost(&e))?;
        request.headers_mut().insert("Authorization", value);
    }
    let left = || {
        executor.kill_all();
        Ok(Ended::Left)
    };
    if let Some(path) = &target.socket {
        let connecting = async {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| lost(&format!("{}: {e}", path.display())))?;
            tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(|e| handshake_failed(e, config))
        };
        let (socket, _) = tokio::select! {
            _ = &mut *shutdown => return left(),
            c = connecting => c?,
        };
        return drive(
            config, target, socket, executor, out_tx, out_rx, unsent, shutdown,
        )
        .await;
    }
    let connector = config.insecure.then(insecure_connector);
    // Nagle off: task output and ends are small messages that must not wait.
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector);
    let (socket, _) = tokio::select! {
        _ = &mut *shutdown => return left(),
        c = connecting => c.map_err(|e| handshake_failed(e, config))?,
    };
    drive(
        config, target, socket, executor, out_tx, out_rx, unsent, shutdown,
    )
    .await
}

/// Why a WebSocket handshake failed: a refusal when the server said no to the token.
fn handshake_failed(
    e: tokio_tungstenite::tungstenite::Error,
    config: &AgentConfig,
) -> SessionError {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(response)
            if response.status().as_u16() == 401 || response.status().as_u16() == 403 =>
        {
            SessionError::Refused(format!(
                "{} (check --token: it must be a node token for '{}' or an operator token)",
                response.status(),
                config.node_id
            ))
        }
        e => lost(&e),
    }
}

/// One connected session: hello, then tasks in and reports out until it ends.
#[allow(clippy::too_many_arguments)]
async fn drive<S>(
    config: &AgentConfig,
    target: &Target,
    socket: tokio_tungstenite::WebSocketStream<S>,
    executor: &Executor,
    out_tx: &mpsc::UnboundedSender<AgentMessage>,
    out_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
    unsent: &mut Vec<AgentMessage>,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Ended, SessionError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let hello = AgentMessage::Hello {
        node_id: config.node_id.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
        hostname: hostname(),
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        running: executor.running(),
        instance: Some(instance().to_owned()),
        prefetch: config.prefetch,
    };
    send(&mut sink, &hello).await.map_err(|e| lost(&e))?;
    let heartbeat = match stream.next().await {
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
            Ok(ServerMessage::Welcome { heartbeat_secs, .. }) => {
                Duration::from_secs(heartbeat_secs.max(1))
            }
            Ok(ServerMessage::Refused { reason }) => return Err(SessionError::Refused(reason)),
            other => {
                return Err(SessionError::Lost(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        },
        other => {
            return Err(SessionError::Lost(format!(
                "expected Welcome, got {other:?}"
            )))
        }
    };
    tracing::info!(server = %target, node = %config.node_id, "connected");
    for message in unsent.drain(..) {
        send(&mut sink, &message).await.map_err(|e| lost(&e))?;
    }
    // Beats a third of the server's limit apart, so one late beat is not a lost node.
    let mut beat = tokio::time::interval(heartbeat / 3);
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Refused { reason }) => return Err(SessionError::Refused(reason)),
                    Ok(message) => executor.handle(message, out_tx.clone()),
                    Err(e) => tracing::warn!(error = %e, "ignored a message the agent does not understand"),
                },
                Some(Ok(Message::Close(_))) | None => return Err(SessionError::Lost("closed by the server".into())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(lost(&e)),
            },
            _ = &mut *shutdown => {
                leave(executor, &mut sink, out_rx).await;
                return Ok(Ended::Left);
            }
            outgoing = out_rx.recv() => {
                let Some(message) = outgoing else { return Ok(Ended::Closed) };
                // What is ready now (a task's last output and its end, say) goes out
                // in one write.
                let mut taken = vec![message];
                while let (true, Ok(message)) = (taken.len() < 64, out_rx.try_recv()) {
                    taken.push(message);
                }
                if let Err(e) = send_all(&mut sink, &taken).await {
                    unsent.extend(taken);
                    return Err(lost(&e));
                }
            }
            _ = beat.tick() => {
                send(&mut sink, &AgentMessage::Heartbeat).await.map_err(|e| lost(&e))?;
            }
        }
    }
}

/// Stops the agent's tasks, sends their ends (for up to [`LEAVE_GRACE`]), then a
/// goodbye, so the server retries them elsewhere at once rather than after the
/// heartbeat timeout.
async fn leave<S>(
    executor: &Executor,
    sink: &mut S,
    out_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
) where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    executor.kill_all();
    let deadline = tokio::time::Instant::now() + LEAVE_GRACE;
    while !executor.running().is_empty() || !out_rx.is_empty() {
        match tokio::time::timeout_at(deadline, out_rx.recv()).await {
            Ok(Some(message)) => {
                if send(sink, &message).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    if send(sink, &AgentMessage::Goodbye).await.is_ok() {
        let _ = sink.close().await;
    }
}

async fn send<S>(sink: &mut S, message: &AgentMessage) -> Result<(), String>
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
    sink.send(Message::Text(text))
        .await
        .map_err(|e| e.to_string())
}

/// Sends messages with one flush at the end.
async fn send_all<S>(sink: &mut S, messages: &[AgentMessage]) -> Result<(), String>
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    for message in messages {
        let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
        sink.feed(Message::Text(text))
            .await
            .map_err(|e| e.to_string())?;
    }
    sink.flush().await.map_err(|e| e.to_string())
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// A TLS connector that accepts any certificate: `--insecure`, for servers with the
/// self-signed certificate opsbox makes on first start.
fn insecure_connector() -> Connector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    Connector::Rustls(Arc::new(config))
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// This process's instance name for its hellos: its pid and start time, enough to tell
/// two agents that claim one node id apart.
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("{}-{started:x}", std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn server_urls_become_websocket_targets() {
        let tls = target("https://master:3000/").unwrap();
        assert_eq!(
            (tls.url.as_str(), tls.socket),
            ("wss://master:3000/v1/agent", None)
        );
        assert_eq!(target("http://m:3000").unwrap().url, "ws://m:3000/v1/agent");
        for spelled in ["unix:/run/opsbox.sock", "unix:///run/opsbox.sock"] {
            let unix = target(spelled).unwrap();
            assert_eq!(unix.socket.as_deref(), Some(Path::new("/run/opsbox.sock")));
            assert_eq!(unix.to_string(), "unix:/run/opsbox.sock");
        }
        for bad in ["unix:run/opsbox.sock", "unix:", "ftp://m", "m:3000"] {
            assert!(matches!(target(bad), Err(AgentError::BadUrl(_))), "{bad}");
        }
    }
}
