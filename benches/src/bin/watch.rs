//! `watch`: how fast a model change reaches 1,000 watchers, side by side in one run
//! (issue #7):
//!
//! - **opsbox**: `target/release/opsbox serve` as a child process, with one application
//!   `bench` deployed with no units (so no hook runs: the benchmark is about the watch
//!   stream, not about hooks; `--opsbox-change reload` makes catalog reloads the change
//!   instead, as before the model existed). W watchers each follow the
//!   native watch stream (`GET /v1/events?follow=true`, Server-Sent Events, one
//!   connection each). The writer changes the model: `PUT /v1/model/applications/bench/
//!   constraints` with `{"cpu-cores": SEQ}`; each change is one durable transaction
//!   (SQLite, synchronous=FULL) and one `model.application.change` event carrying the
//!   application, so a watcher reads SEQ off the event.
//! - **etcd** (Debian package `etcd-server`) as a child process with a fresh data dir
//!   (fsync on every write, its default). W watchers each hold a watch on one key through
//!   etcd's JSON gateway (`POST /v3/watch`, one HTTP/1.1 connection each, a stream of
//!   newline-separated JSON messages); the writer `POST /v3/kv/put`s SEQ as the value.
//!
//! Both sides are the same shape: JSON over HTTP/1.1, one connection per watcher, every
//! watcher sees every change, the writer waits for each write's acknowledgement (so a
//! write is durable before the next starts). For each target rate R the writer starts
//! change i at `i / R` seconds (or as soon as the previous one is acknowledged when it
//! falls behind); the latency of a delivery is the time from the start of the write
//! request to the moment a watcher has parsed the change. A row reports the achieved
//! write rate, the share of the W × changes deliveries that arrived, and p50/p99/max
//! latency. The highest rate at which a system keeps up (achieved ≥ 95% of the target,
//! every delivery made, p99 under 1 s) is its maximum sustained change rate.
//!
//! The watchers and the writer run in this process, on the same 2 CPUs as the server:
//! the same cost for both systems. A benchmark, not a test: nothing asserts on
//! timings; the table marks the p99 ratio against the target (opsbox's p99 below
//! etcd's at the same rate).
//!
//! `cargo build --release -p opsbox -p opsbox-bench && target/release/watch`

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

#[path = "../children.rs"]
mod children;
use children::{free_port, program_path, ChildGuard};

/// A system keeps up at a rate when it sustains this share of the target write rate...
const SUSTAINED_SHARE: f64 = 0.95;
/// ...delivers everything, and its p99 stays below this.
const SUSTAINED_P99: Duration = Duration::from_secs(1);
const ETCD_KEY: &str = "opsbox-bench/model";

#[derive(Parser, Debug)]
#[command(
    name = "watch",
    about = "Model-change delivery to many watchers: opsbox watch stream vs etcd watches"
)]
struct Args {
    /// Concurrent watchers.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Target changes per second, one table row each.
    #[arg(long, value_delimiter = ',', default_value = "10,50,200,500")]
    rates: Vec<u32>,
    /// Seconds the writer runs per row.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds to wait after the last write for deliveries still on their way.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// The opsbox release binary.
    #[arg(long, default_value = "target/release/opsbox")]
    opsbox: PathBuf,
    /// The etcd binary (Debian package `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Charms directory for opsbox (the application is deployed from its `wordpress`).
    #[arg(long, default_value = "examples/charms")]
    charms: PathBuf,
    /// What the opsbox writer changes: `model` (an application's constraints, one
    /// `model.application.change` event per change) or `reload` (`POST /v1/reload`, one
    /// `scripts.reloaded` event per change; watchers number those events in order).
    #[arg(long, default_value = "model")]
    opsbox_change: String,
    /// Run only some systems.
    #[arg(long, value_delimiter = ',', default_value = "opsbox,etcd")]
    systems: Vec<String>,
    /// Keep the temp dir (data, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

// ---------------------------------------------------------------------------------
// What is measured, the same for both systems

/// Write start times, in nanoseconds since `base`, indexed by change number (0 = not
/// started yet); shared by the writer and the watchers.
struct Clock {
    base: Instant,
    started: Vec<AtomicU64>,
}

impl Clock {
    fn new(changes: usize) -> Self {
        Clock {
            base: Instant::now(),
            started: (0..changes).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, seq: usize) {
        let ns = self.base.elapsed().as_nanos().max(1) as u64;
        self.started[seq].store(ns, Ordering::SeqCst);
    }

    /// Microseconds since change `seq` was started, if it is one of this row's.
    fn latency_us(&self, seq: u64) -> Option<u64> {
        let started = self.started.get(seq as usize)?.load(Ordering::SeqCst);
        (started > 0)
            .then(|| (self.base.elapsed().as_nanos() as u64).saturating_sub(started) / 1000)
    }
}

/// What one row measured.
struct Row {
    target: u32,
    achieved: f64,
    expected: usize,
    latencies: Vec<u64>,
    write_errors: usize,
    watch_errors: usize,
}

impl Row {
    fn delivered(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        self.latencies.len() as f64 / self.expected as f64
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        Some(Duration::from_micros(self.latencies[i]))
    }

    fn sustained(&self) -> bool {
        self.achieved >= self.target as f64 * SUSTAINED_SHARE
            && self.latencies.len() == self.expected
            && self.write_errors == 0
            && self.percentile(0.99).is_some_and(|p| p < SUSTAINED_P99)
    }
}

/// The two operations a system offers the benchmark.
trait System: Send + Sync + 'static {
    /// Opens one watch; resolves once the watch is established. Then each change number
    /// the watch reports is passed to `seen`, until the stream ends or `stop` is set.
    fn watch(
        self: Arc<Self>,
        seen: Box<dyn FnMut(u64) + Send>,
    ) -> futures::future::BoxFuture<
        'static,
        anyhow::Result<futures::future::BoxFuture<'static, anyhow::Result<()>>>,
    >;
    /// Makes change number `seq`, durably; resolves when acknowledged.
    fn write(self: Arc<Self>, seq: u64) -> futures::future::BoxFuture<'static, anyhow::Result<()>>;
}

/// One row: W watchers, then the writer at `rate` for `duration`, then the drain.
async fn measure<S: System>(system: Arc<S>, args: &Args, rate: u32) -> anyhow::Result<Row> {
    let changes = (rate as f64 * args.duration).ceil() as usize;
    let clock = Arc::new(Clock::new(changes));
    let watch_errors = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::with_capacity(args.watchers);
    let mut pumps = Vec::with_capacity(args.watchers);
    let mut opened = futures::stream::FuturesUnordered::new();
    for _ in 0..args.watchers {
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(changes)));
        let clock = clock.clone();
        let sink = latencies.clone();
        let seen = Box::new(move |seq: u64| {
            if let Some(us) = clock.latency_us(seq) {
                sink.lock().expect("latency sink").push(us);
            }
        });
        opened.push(system.clone().watch(seen));
        watchers.push(latencies);
        // Opening 1,000 connections at once overflows the listen backlog of either
        // server; 64 in flight is quick and kind.
        if opened.len() >= 64 {
            let pump = opened.next().await.expect("one in flight")?;
            pumps.push(spawn_watch(pump, watch_errors.clone()));
        }
    }
    while let Some(pump) = opened.next().await {
        pumps.push(spawn_watch(pump?, watch_errors.clone()));
    }
    // Watches are established; give the servers a moment to settle after the storm.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    let mut write_errors = 0;
    let mut done = 0;
    for seq in 0..changes {
        let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        clock.mark(seq);
        match system.clone().write(seq as u64).await {
            Ok(()) => done += 1,
            Err(e) => {
                if write_errors == 0 {
                    eprintln!("watch: a write failed: {e:#}");
                }
                write_errors += 1;
            }
        }
    }
    let achieved = done as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    // This row's watches end here, so they do not load the next row.
    for pump in &pumps {
        pump.abort();
    }

    let mut latencies = Vec::with_capacity(changes * args.watchers);
    for w in &watchers {
        latencies.extend(w.lock().expect("latency sink").iter().copied());
    }
    latencies.sort_unstable();
    Ok(Row {
        target: rate,
        achieved,
        expected: done * args.watchers,
        latencies,
        write_errors,
        watch_errors: watch_errors.load(Ordering::SeqCst),
    })
}

fn spawn_watch(
    pump: futures::future::BoxFuture<'static, anyhow::Result<()>>,
    errors: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = pump.await {
            if errors.fetch_add(1, Ordering::SeqCst) == 0 {
                eprintln!("watch: a watcher failed: {e:#}");
            }
        }
    })
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?)
}

/// Polls `url` until it answers 2xx, or fails with the server's log after `limit`.
async fn wait_ready(
    guard: &mut ChildGuard,
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        guard.check_alive()?;
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{} did not answer {url} within 30 s",
            guard.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------
// opsbox

struct Opsbox {
    base: String,
    client: reqwest::Client,
    /// Changes the model (true) or reloads the catalog (false).
    model: bool,
}

async fn start_opsbox(
    args: &Args,
    dir: &std::path::Path,
) -> anyhow::Result<(ChildGuard, Arc<Opsbox>)> {
    let port = free_port()?;
    let mut command = Command::new(program_path(&args.opsbox)?);
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data")
        .arg(dir.join("opsbox-data"))
        .arg("--scripts")
        .arg(&scripts)
        .env("RUST_LOG", "warn");
    if args.opsbox_change == "model" {
        command
            .arg("--charms")
            .arg(std::fs::canonicalize(&args.charms).with_context(|| {
                format!(
                    "charms directory {} not found (run from the repository root)",
                    args.charms.display()
                )
            })?);
    }
    let mut guard = ChildGuard::start("opsbox", command, dir.join("opsbox.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let client = http_client()?;
    wait_ready(&mut guard, &client, &format!("{base}/v1/info")).await?;
    let model = match args.opsbox_change.as_str() {
        "model" => true,
        "reload" => false,
        other => bail!("--opsbox-change takes model or reload, not '{other}'"),
    };
    if !model {
        return Ok((
            guard,
            Arc::new(Opsbox {
                base,
                client,
                model,
            }),
        ));
    }
    let deployed = client
        .post(format!("{base}/v1/model/applications"))
        .json(&json!({"name": "bench", "charm": "cs:precise/wordpress", "num_units": 0}))
        .send()
        .await?;
    let status = deployed.status();
    ensure!(
        status.is_success(),
        "opsbox: deploying the bench application answered {status}: {}",
        deployed.text().await.unwrap_or_default()
    );
    Ok((
        guard,
        Arc::new(Opsbox {
            base,
            client,
            model,
        }),
    ))
}

impl System for Opsbox {
    fn watch(
        self: Arc<Self>,
        mut seen: Box<dyn FnMut(u64) + Send>,
    ) -> futures::future::BoxFuture<
        'static,
        anyhow::Result<futures::future::BoxFuture<'static, anyhow::Result<()>>>,
    > {
        Box::pin(async move {
            let response = self
                .client
                .get(format!("{}/v1/events?follow=true", self.base))
                .send()
                .await?
                .error_for_status()?;
            let pump: futures::future::BoxFuture<'static, anyhow::Result<()>> =
                Box::pin(async move {
                    let mut events = eventsource_stream::EventStream::new(response.bytes_stream());
                    // Reloads carry no number: the n-th one this watcher sees is change n
                    // (it started watching before the first).
                    let mut reloads = 0u64;
                    let model = self.model;
                    while let Some(event) = events.next().await {
                        let event = event.context("reading the event stream")?;
                        if event.event != "event" {
                            continue;
                        }
                        let value: Value = serde_json::from_str(&event.data)?;
                        if !model && value["kind"] == "scripts.reloaded" {
                            seen(reloads);
                            reloads += 1;
                            continue;
                        }
                        if value["kind"] == "model.application.change"
                            && value["subject"] == "bench"
                        {
                            if let Some(seq) = value["data"]["constraints"]["cpu-cores"].as_u64() {
                                seen(seq);
                            }
                        }
                    }
                    Ok(())
                });
            Ok(pump)
        })
    }

    fn write(self: Arc<Self>, seq: u64) -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let request = if self.model {
                self.client
                    .put(format!(
                        "{}/v1/model/applications/bench/constraints",
                        self.base
                    ))
                    .json(&json!({"cpu-cores": seq}))
            } else {
                self.client.post(format!("{}/v1/reload", self.base))
            };
            let r = request.send().await?;
            let status = r.status();
            if !status.is_success() {
                bail!(
                    "opsbox answered {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------
// etcd

struct Etcd {
    base: String,
    client: reqwest::Client,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

async fn start_etcd(args: &Args, dir: &std::path::Path) -> anyhow::Result<(ChildGuard, Arc<Etcd>)> {
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let base = format!("http://127.0.0.1:{client_port}");
    let mut command = Command::new(program_path(&args.etcd)?);
    command
        .arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(dir.join("etcd-data"))
        .arg("--listen-client-urls")
        .arg(&base)
        .arg("--advertise-client-urls")
        .arg(&base)
        .arg("--listen-peer-urls")
        .arg(format!("http://127.0.0.1:{peer_port}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://127.0.0.1:{peer_port}"))
        .arg("--initial-cluster")
        .arg(format!("bench=http://127.0.0.1:{peer_port}"))
        .arg("--log-level")
        .arg("warn");
    let mut guard = ChildGuard::start("etcd", command, dir.join("etcd.log"))?;
    let client = http_client()?;
    wait_ready(&mut guard, &client, &format!("{base}/health")).await?;
    Ok((guard, Arc::new(Etcd { base, client })))
}

impl System for Etcd {
    fn watch(
        self: Arc<Self>,
        mut seen: Box<dyn FnMut(u64) + Send>,
    ) -> futures::future::BoxFuture<
        'static,
        anyhow::Result<futures::future::BoxFuture<'static, anyhow::Result<()>>>,
    > {
        Box::pin(async move {
            let response = self
                .client
                .post(format!("{}/v3/watch", self.base))
                .json(&json!({"create_request": {"key": b64(ETCD_KEY.as_bytes())}}))
                .send()
                .await?
                .error_for_status()?;
            let mut body = response.bytes_stream();
            // The gateway's first message confirms the watch ("created": true).
            let mut buffer = Vec::new();
            let mut created = false;
            while !created {
                let chunk = body
                    .next()
                    .await
                    .context("etcd closed the watch before confirming it")??;
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let value: Value = serde_json::from_slice(&line)?;
                    created |= value["result"]["created"] == true;
                }
            }
            let pump: futures::future::BoxFuture<'static, anyhow::Result<()>> =
                Box::pin(async move {
                    loop {
                        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buffer.drain(..=end).collect();
                            let value: Value = serde_json::from_slice(&line)?;
                            for event in value["result"]["events"].as_array().into_iter().flatten()
                            {
                                let raw = event["kv"]["value"].as_str().unwrap_or_default();
                                let text = base64::engine::general_purpose::STANDARD.decode(raw)?;
                                if let Some(seq) =
                                    std::str::from_utf8(&text).ok().and_then(|t| t.parse().ok())
                                {
                                    seen(seq);
                                }
                            }
                        }
                        match body.next().await {
                            Some(chunk) => buffer.extend_from_slice(&chunk?),
                            None => return Ok(()),
                        }
                    }
                });
            Ok(pump)
        })
    }

    fn write(self: Arc<Self>, seq: u64) -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let r = self
                .client
                .post(format!("{}/v3/kv/put", self.base))
                .json(&json!({"key": b64(ETCD_KEY.as_bytes()), "value": b64(seq.to_string().as_bytes())}))
                .send()
                .await?;
            let status = r.status();
            if !status.is_success() {
                bail!(
                    "etcd answered {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------
// Report

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn line(system: &str, row: &Row) -> String {
    format!(
        "| {system} | {} | {:.0} | {:.2}% | {} / {} / {} | {}/{} | {} |",
        row.target,
        row.achieved,
        row.delivered() * 100.0,
        ms(row.percentile(0.5)),
        ms(row.percentile(0.99)),
        ms(row.latencies.last().map(|us| Duration::from_micros(*us))),
        row.write_errors,
        row.watch_errors,
        if row.sustained() { "yes" } else { "no" },
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        !args.rates.is_empty() && args.rates.iter().all(|r| *r > 0),
        "--rates needs positive rates"
    );
    let dir = tempfile::tempdir()?;
    let dir_path = if args.keep {
        let kept = dir.keep();
        eprintln!("watch: keeping {}", kept.display());
        kept
    } else {
        dir.path().to_path_buf()
    };

    let want = |name: &str| args.systems.iter().any(|s| s == name);
    let mut results: Vec<(String, Vec<Row>)> = Vec::new();
    if want("opsbox") {
        let (mut guard, system) = start_opsbox(&args, &dir_path).await?;
        let mut rows = Vec::new();
        for &rate in &args.rates {
            eprintln!(
                "watch: opsbox, {} watchers, {rate} changes/s",
                args.watchers
            );
            rows.push(measure(system.clone(), &args, rate).await?);
            guard.check_alive()?;
        }
        results.push(("opsbox".into(), rows));
    }
    if want("etcd") {
        let (mut guard, system) = start_etcd(&args, &dir_path).await?;
        let mut rows = Vec::new();
        for &rate in &args.rates {
            eprintln!("watch: etcd, {} watchers, {rate} changes/s", args.watchers);
            rows.push(measure(system.clone(), &args, rate).await?);
            guard.check_alive()?;
        }
        results.push(("etcd".into(), rows));
    }

    println!(
        "\n{} watchers, {} s of writes per row, {} s drain\n",
        args.watchers, args.duration, args.drain
    );
    println!("| system | target/s | achieved/s | delivered | p50 / p99 / max ms | errors w/w | sustained |");
    println!("|---|--:|--:|--:|--:|--:|:-:|");
    for (name, rows) in &results {
        for row in rows {
            println!("{}", line(name, row));
        }
    }
    for (name, rows) in &results {
        let max = rows
            .iter()
            .filter(|r| r.sustained())
            .map(|r| r.target)
            .max();
        println!(
            "\n{name}: maximum sustained change rate {}",
            max.map(|m| format!("{m}/s"))
                .unwrap_or_else(|| "below the lowest rate tried".into())
        );
    }
    if let [(_, ours), (_, theirs)] = results.as_slice() {
        println!("\np99 ratio opsbox/etcd per rate (target: below 1.0):");
        for (a, b) in ours.iter().zip(theirs) {
            match (a.percentile(0.99), b.percentile(0.99)) {
                (Some(x), Some(y)) if !y.is_zero() => {
                    let r = x.as_secs_f64() / y.as_secs_f64();
                    println!(
                        "  {}/s: {r:.2}x {}",
                        a.target,
                        if r < 1.0 { "ok" } else { "ABOVE 1.0x" }
                    );
                }
                _ => println!("  {}/s: -", a.target),
            }
        }
    }
    Ok(())
}
