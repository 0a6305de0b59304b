//! RPC throughput, side by side: opsbox's JSON-RPC face (`POST /rpc`, WebSocket
//! `/rpc`) and py-jrpc face (`GET /ping`) against a minimal jsonrpsee 0.26 server that
//! exposes the same `ping`. Both servers run in this process on the same runtime, on
//! loopback; the load is generated here too, so figures are comparable with each
//! other, not absolute.
//!
//! - HTTP keep-alive, 1, 16 and 64 connections, each sending one call at a time;
//! - WebSocket, one connection, batches of 100 calls, one batch at a time.
//!
//! `cargo run --release -p opsbox-bench --bin rpc -- --secs 3`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use jsonrpsee::server::{RpcModule, Server as JsonrpseeServer};
use opsbox_server::{Server, ServerConfig};
use tokio_tungstenite::tungstenite::Message;

const CALL: &str = r#"{"jsonrpc":"2.0","method":"ping","id":1}"#;

#[derive(Clone, Copy)]
enum Request {
    Post,
    Get,
}

/// Calls per second over `connections` keep-alive connections for `secs`.
async fn http(url: &str, request: Request, connections: usize, secs: f64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .http1_only()
            .build()?;
        let (url, done) = (url.to_owned(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let sent = match request {
                    Request::Post => {
                        client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(CALL)
                            .send()
                            .await
                    }
                    Request::Get => client.get(&url).send().await,
                };
                let ok = match sent {
                    Ok(response) => response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    return Err(anyhow::anyhow!("a call to {url} failed"));
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);

    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        listen: vec!["127.0.0.1:0".into()],
        data: dir.path().join("data"),
        scripts: dir.path().join("scripts"),
        ..ServerConfig::default()
    };
    let opsbox = Server::builder().config(config).bind().await?;
    let opsbox_addr = opsbox.local_addrs()[0].to_string();
    tokio::spawn(opsbox.run(std::future::pending()));

    let jsonrpsee = JsonrpseeServer::builder().build("127.0.0.1:0").await?;
    let jsonrpsee_addr = jsonrpsee.local_addr()?;
    let mut module = RpcModule::new(());
    module.register_method("ping", |_, _, _| "pong")?;
    let _handle = jsonrpsee.start(module);

    let opsbox_rpc = format!("{opsbox_addr}/rpc");
    let jrpc_ping = format!("{opsbox_addr}/ping");
    let other = format!("http://{jsonrpsee_addr}");
    println!("RPC calls/s of `ping`, {secs} s per line, server and load on one machine");
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8}",
        "load", "opsbox /rpc", "opsbox jrpc", "jsonrpsee", "ratio"
    );
    for connections in [1, 16, 64] {
        let ours = http(&opsbox_rpc, Request::Post, connections, secs).await?;
        let jrpc = http(&jrpc_ping, Request::Get, connections, secs).await?;
        let theirs = http(&other, Request::Post, connections, secs).await?;
        println!(
            "{:<34} {ours:>12.0} {jrpc:>12.0} {theirs:>12.0} {:>8.2}",
            format!("HTTP keep-alive, {connections} conn"),
            ours / theirs
        );
    }
    let ours = ws_batches(&opsbox_rpc.replace("http://", "ws://"), 100, secs).await?;
    let theirs = ws_batches(&other.replace("http://", "ws://"), 100, secs).await?;
    println!(
        "{:<34} {ours:>12.0} {:>12} {theirs:>12.0} {:>8.2}",
        "WebSocket, batches of 100, 1 conn",
        "-",
        ours / theirs
    );
    println!("ratio = opsbox /rpc ÷ jsonrpsee (higher is better for opsbox)");
    Ok(())
}
