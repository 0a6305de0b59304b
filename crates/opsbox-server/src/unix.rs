//! The Unix-socket listener, served as the plain TCP ones are: the same HTTP settings
//! ([`crate::http_settings`]), the same [`OpeningDeadline`], and the same graceful stop.
//!
//! axum-server 0.7 accepts only TCP listeners, and `axum::serve` takes no HTTP
//! settings, so the accept loop is here: each connection goes through the acceptor
//! and hyper-util's `auto::Builder` as axum-server does it, and hyper-util's
//! [`GracefulShutdown`] tells the open connections to finish when the server stops.
//! What no library gives is that loop and the cut-off after the grace period.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum_server::accept::{Accept, DefaultAcceptor};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::opening::OpeningDeadline;

/// Serves `app` on `listener` until `stop` turns true; then stops accepting, removes
/// the socket file, asks every open connection to finish (HTTP/1: after its current
/// request; HTTP/2: GOAWAY), and drops those still open after `grace`.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    app: crate::App,
    builder: Builder<TokioExecutor>,
    opening_timeout: Option<Duration>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> io::Result<()> {
    let acceptor = OpeningDeadline::new(DefaultAcceptor::new(), opening_timeout);
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
            Ok((stream, _)) => stream,
            // Out of file descriptors, say: wait a little, as axum-server does.
            Err(e) => {
                tracing::debug!(error = %e, "unix socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = acceptor.accept(stream, app.clone());
        let watcher = graceful.watcher();
        let builder = builder.clone();
        connections.spawn(async move {
            let Ok((stream, app)) = accepted.await else {
                return;
            };
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app),
            );
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "unix socket connection ended");
            }
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    connections.shutdown().await;
    Ok(())
}
