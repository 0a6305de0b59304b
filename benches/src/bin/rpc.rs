//! RPC throughput, side by side: opsbox's JSON-RPC face (`POST /rpc`, WebSocket
//! `/rpc`) and py-jrpc face (`GET /ping`) against a minimal jsonrpsee 0.26 server that
//! exposes the same `ping`. Each server is its own process (`opsbox serve`, the binary
//! users run, and this binary re-run with `--serve-jsonrpsee`), on loopback; the load
//! is generated in this process, on the same CPUs, so figures are comparable with each
//! other, not absolute. Each server's CPU per call comes from `/proc/PID/stat`, and so
//! does the load's (this process's).
//!
//! - HTTP keep-alive, 1, 16 and 64 connections (hyper client connections), each
//!   sending one call at a time;
//! - WebSocket, one connection, batches of 100 calls, one batch at a time.
//!
//! `cargo build --release -p opsbox -p opsbox-bench && target/release/rpc --secs 3`

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use jsonrpsee::server::{RpcModule, Server as JsonrpseeServer};
use tokio_tungstenite::tungstenite::Message;

#[path = "../children.rs"]
mod children;
#[path = "../cpu.rs"]
mod cpu;
use children::{free_port, program_path, ChildGuard};
use cpu::CpuTimes;

const CALL: &str = r#"{"jsonrpc":"2.0","method":"ping","id":1}"#;

#[derive(Clone, Copy)]
enum Request {
    Post,
    Get,
}

/// Calls per second over `connections` keep-alive connections for `secs`, each
/// connection sending one call at a time and checking every answer (200, and the
/// `pong` of the call's result).
///
/// Each connection is one of hyper's client connections, not reqwest's: reqwest's pool,
/// URL handling and request builder cost the load ~2× a server's CPU per call, so on
/// two CPUs shared with the server the rows measured mostly the load itself.
async fn http(url: &str, request: Request, connections: usize, secs: f64) -> anyhow::Result<f64> {
    let uri: hyper::Uri = url.parse()?;
    let authority = uri
        .authority()
        .context("the URL has no host:port")?
        .to_string();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let (uri, authority, done) = (uri.clone(), authority.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                sender.ready().await?;
                let builder = hyper::Request::builder()
                    .uri(uri.path())
                    .header(hyper::header::HOST, &authority);
                let call = match request {
                    Request::Post => builder
                        .method(hyper::Method::POST)
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from_static(CALL.as_bytes())))?,
                    Request::Get => builder.body(Full::new(Bytes::new()))?,
                };
                let response = sender.send_request(call).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                if status != hyper::StatusCode::OK || !body.windows(4).any(|w| w == b"pong") {
                    bail!("a call to {uri} answered {status}: {body:?}");
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Calls per second over one WebSocket, in batches of `size`.
async fn ws_batches(url: &str, size: usize, secs: f64) -> anyhow::Result<f64> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let batch: Vec<serde_json::Value> = (0..size)
        .map(|i| serde_json::json!({"jsonrpc": "2.0", "method": "ping", "id": i}))
        .collect();
    let text = serde_json::to_string(&batch)?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut calls = 0u64;
    while Instant::now() < deadline {
        ws.send(Message::Text(text.clone())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(answer))) => {
                    let answers: Vec<serde_json::Value> = serde_json::from_str(&answer)?;
                    anyhow::ensure!(answers.len() == size, "a batch answer lacks calls");
                    break;
                }
                Some(Ok(_)) => continue,
                other => anyhow::bail!("the WebSocket closed: {other:?}"),
            }
        }
        calls += size as u64;
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}

/// The peer: a minimal jsonrpsee server with `ping`, as its docs show one, until killed.
async fn serve_jsonrpsee(port: u16) -> anyhow::Result<()> {
    let server = JsonrpseeServer::builder()
        .build(format!("127.0.0.1:{port}"))
        .await?;
    let mut module = RpcModule::new(());
    module.register_method("ping", |_, _, _| "pong")?;
    server.start(module).stopped().await;
    Ok(())
}

/// Waits until `child` answers HTTP on `port` (any status).
async fn wait_ready(child: &mut ChildGuard, port: u16) -> anyhow::Result<()> {
    let probe = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        child.check_alive()?;
        match probe.get(format!("http://127.0.0.1:{port}/")).send().await {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => bail!("{} not ready in 60 s: {e}", child.name),
        }
    }
}

/// One system's share of a row, summed over its slices.
#[derive(Clone, Copy, Default)]
struct Cell {
    calls: f64,
    secs: f64,
    cpu: f64,
    /// This process's CPU over the same slices: the load generator's.
    load_cpu: f64,
}

impl Cell {
    fn rate(&self) -> f64 {
        self.calls / self.secs
    }

    fn cpu_us(&self) -> f64 {
        self.cpu * 1e6 / self.calls
    }

    fn load_cpu_us(&self) -> f64 {
        self.load_cpu * 1e6 / self.calls
    }

    /// Runs one slice of load (calls/s over `secs`) and reads `pid`'s CPU around it.
    async fn add(
        &mut self,
        pid: u32,
        secs: f64,
        load: impl std::future::Future<Output = anyhow::Result<f64>>,
    ) -> anyhow::Result<()> {
        let me = std::process::id();
        let before = CpuTimes::read(pid).context("the server's /proc entry")?;
        let before_load = CpuTimes::read(me).context("this process's /proc entry")?;
        let rate = load.await?;
        let spent = CpuTimes::read(pid)
            .context("the server's /proc entry")?
            .since(before);
        let spent_load = CpuTimes::read(me)
            .context("this process's /proc entry")?
            .since(before_load);
        self.calls += rate * secs;
        self.secs += secs;
        self.cpu += spent.own;
        self.load_cpu += spent_load.own;
        Ok(())
    }
}

fn row(load: &str, ours: Cell, jrpc: Cell, theirs: Cell) {
    let show = |c: &Cell, f: f64| {
        if c.calls > 0.0 {
            format!("{f:.0}")
        } else {
            "-".to_owned()
        }
    };
    let cpu = |c: &Cell| {
        if c.calls > 0.0 {
            format!("{:.1}", c.cpu_us())
        } else {
            "-".to_owned()
        }
    };
    let load_cpu = |c: &Cell| {
        if c.calls > 0.0 {
            format!("{:.1}", c.load_cpu_us())
        } else {
            "-".to_owned()
        }
    };
    println!(
        "{load:<34} {:>12} {:>12} {:>12} {:>7.2}x {:>10} / {:<6} {:>8} / {}",
        show(&ours, ours.rate()),
        show(&jrpc, jrpc.rate()),
        show(&theirs, theirs.rate()),
        ours.rate() / theirs.rate(),
        cpu(&ours),
        cpu(&theirs),
        load_cpu(&ours),
        load_cpu(&theirs)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    if let Some(port) = flag("--serve-jsonrpsee") {
        return serve_jsonrpsee(port.parse()?).await;
    }
    let secs: f64 = flag("--secs")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    // Each line's seconds are split into this many slices, the systems taking turns,
    // so that both see the same phases of a machine whose speed drifts.
    let rounds: u32 = flag("--rounds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(6);
    let slice = secs / f64::from(rounds.max(1));
    let opsbox_bin =
        PathBuf::from(flag("--opsbox").unwrap_or_else(|| "target/release/opsbox".into()));
    // `--connections 1,16` and `--systems opsbox,jrpc,jsonrpsee` run part of the table
    // (to profile one server at one load); `ws` in `--connections` is the batch row.
    let connections: Vec<String> = flag("--connections")
        .unwrap_or_else(|| "1,16,64,ws".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let systems = flag("--systems").unwrap_or_else(|| "opsbox,jrpc,jsonrpsee".into());
    let runs = |system: &str| systems.split(',').any(|s| s == system);

    let dir = tempfile::Builder::new().prefix("opsbox-rpc-").tempdir()?;
    let opsbox_port = free_port()?;
    let mut command = Command::new(program_path(&opsbox_bin)?);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{opsbox_port}"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--scripts")
        .arg(dir.path().join("scripts"));
    std::fs::create_dir_all(dir.path().join("scripts"))?;
    let mut opsbox = ChildGuard::start("opsbox", command, dir.path().join("opsbox.log"))?;
    let peer_port = free_port()?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--serve-jsonrpsee").arg(peer_port.to_string());
    let mut peer = ChildGuard::start("jsonrpsee", command, dir.path().join("jsonrpsee.log"))?;
    wait_ready(&mut opsbox, opsbox_port).await?;
    wait_ready(&mut peer, peer_port).await?;
    let (opsbox_pid, peer_pid) = (opsbox.pid(), peer.pid());

    let opsbox_rpc = format!("http://127.0.0.1:{opsbox_port}/rpc");
    let jrpc_ping = format!("http://127.0.0.1:{opsbox_port}/ping");
    let other = format!("http://127.0.0.1:{peer_port}");
    println!(
        "RPC calls/s of `ping`, {secs} s per line; servers and load on the same {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("ratio = opsbox /rpc ÷ jsonrpsee (higher is better for opsbox)");
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8} {:>19} {:>19}",
        "load",
        "opsbox /rpc",
        "opsbox jrpc",
        "jsonrpsee",
        "ratio",
        "server µs/call o / j",
        "load µs/call o / j"
    );
    for connections in connections.iter().filter_map(|c| c.parse::<usize>().ok()) {
        let (mut ours, mut jrpc, mut theirs) = (Cell::default(), Cell::default(), Cell::default());
        for _ in 0..rounds {
            if runs("opsbox") {
                let load = http(&opsbox_rpc, Request::Post, connections, slice);
                ours.add(opsbox_pid, slice, load).await?;
            }
            if runs("jrpc") {
                let load = http(&jrpc_ping, Request::Get, connections, slice);
                jrpc.add(opsbox_pid, slice, load).await?;
            }
            if runs("jsonrpsee") {
                let load = http(&other, Request::Post, connections, slice);
                theirs.add(peer_pid, slice, load).await?;
            }
        }
        row(
            &format!("HTTP keep-alive, {connections} conn"),
            ours,
            jrpc,
            theirs,
        );
    }
    if connections.iter().any(|c| c == "ws") {
        let (mut ours, mut theirs) = (Cell::default(), Cell::default());
        let (ours_url, theirs_url) = (
            opsbox_rpc.replace("http://", "ws://"),
            other.replace("http://", "ws://"),
        );
        for _ in 0..rounds {
            if runs("opsbox") {
                let load = ws_batches(&ours_url, 100, slice);
                ours.add(opsbox_pid, slice, load).await?;
            }
            if runs("jsonrpsee") {
                let load = ws_batches(&theirs_url, 100, slice);
                theirs.add(peer_pid, slice, load).await?;
            }
        }
        row(
            "WebSocket, batches of 100, 1 conn",
            ours,
            Cell::default(),
            theirs,
        );
    }
    opsbox.check_alive()?;
    peer.check_alive()?;
    Ok(())
}
