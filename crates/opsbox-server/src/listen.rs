//! The accept loop every listener runs (TCP, TLS over TCP, Unix socket): each
//! connection goes through its acceptor (TCP_NODELAY, the TLS handshake, the
//! [`OpeningDeadline`]) and hyper-util's `auto::Builder`, with the HTTP settings of
//! [`crate::http_settings`], in a task of its own wrapped in [`SelfWakes`]; hyper-util's
//! [`GracefulShutdown`] tells the open connections to finish when the server stops.
//!
//! The loop is here rather than axum-server's because its connection tasks are not
//! ours to wrap (and `axum::serve` takes no HTTP settings); the acceptors are still
//! axum-server's. What no library gives is that loop and the cut-off after the grace
//! period.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum_server::accept::Accept;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::opening::{Exchanges, OpeningDeadline};
use crate::self_wake::SelfWakes;

/// A socket that connections are accepted from.
pub(crate) trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// How a listener serves, besides its socket.
pub(crate) struct Serving {
    pub app: crate::App,
    pub builder: Builder<TokioExecutor>,
    pub stop: watch::Receiver<bool>,
    pub grace: Duration,
    /// A Unix socket's file, removed when the listener stops.
    pub socket_file: Option<PathBuf>,
}

/// Serves on `listener` until `serving.stop` turns true; then stops accepting, asks
/// every open connection to finish (HTTP/1: after its current request; HTTP/2:
/// GOAWAY), and drops those still open after the grace period.
pub(crate) async fn serve<L, A>(
    mut listener: L,
    acceptor: OpeningDeadline<A>,
    serving: Serving,
) -> io::Result<()>
where
    L: Listener,
    OpeningDeadline<A>: Accept<L::Stream, crate::App, Service = Exchanges<crate::App>>,
    <OpeningDeadline<A> as Accept<L::Stream, crate::App>>::Stream:
        AsyncRead + AsyncWrite + Unpin + Send + 'static,
    <OpeningDeadline<A> as Accept<L::Stream, crate::App>>::Future: Send + 'static,
{
    let Serving {
        app,
        builder,
        mut stop,
        grace,
        socket_file,
    } = serving;
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Owned here, so that what is still open after the grace period is dropped.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            // Finished connections leave the set as they end.
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            // A connection reset before it was taken: nothing to wait for.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            // Out of file descriptors, say: wait a little before trying again.
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = acceptor.accept(stream, app.clone());
        let watcher = graceful.watcher();
        let builder = builder.clone();
        connections.spawn(SelfWakes::new(async move {
            let Ok((stream, app)) = accepted.await else {
                return;
            };
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app),
            );
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended");
            }
        }));
    }
    drop(listener);
    if let Some(path) = socket_file {
        let _ = std::fs::remove_file(path);
    }
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    connections.shutdown().await;
    Ok(())
}
