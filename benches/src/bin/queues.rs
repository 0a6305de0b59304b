//! `queues`: durable push → pull → ack cycles per second, side by side in one run
//! (issue #5):
//!
//! - **opsbox**: `target/release/opsbox serve` as a child process, native queue API:
//!   `POST /v1/queues/{node}/messages` (push one message), `POST /v1/queues/{node}/pull`
//!   (`{"max":1}`), `POST /v1/queues/{node}/ack` (`{"ids":[id]}`). Each client is its own
//!   node and works on its own queue. SQLite, synchronous=FULL, group commit.
//! - **beanstalkd** (Debian package) as a child process with its binlog on and
//!   `-f 0` (fsync after every write): `put`, `reserve-with-timeout`, `delete`, each
//!   client on its own tube.
//! - **NATS JetStream**, the server already running on loopback (127.0.0.1:4222): one
//!   work-queue stream with file storage, each client publishes with ack to its own
//!   subject, fetches it from its own durable pull consumer (filtered on that subject)
//!   and double-acks it (the ack itself confirmed by the server).
//!
//! Then a second measurement: opsbox's cycle rate while another node's queue holds N
//! pending messages (`--backlog 1000,100000,1000000`), to see whether the rate stays flat as
//! the store grows.
//!
//! Every step's answer is checked (status, the same message back, ack confirmed);
//! failures are counted and shown, never timed. A benchmark, not a test: nothing asserts
//! on timings; the table marks each ratio against the targets.
//!
//! `cargo build --release -p opsbox -p opsbox-bench && target/release/queues`

#[path = "../queue_client.rs"]
mod queue_client;
use queue_client::QueueClient as Opsbox;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use clap::Parser;
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Targets from the issue, at 64 clients: ≥ 5× beanstalkd with fsync, ≥ 1× JetStream.
#[path = "../children.rs"]
mod children;
#[path = "../cpu.rs"]
mod cpu;
use children::{free_port, program_path, ChildGuard};

const TARGET_VS_BEANSTALKD: f64 = 5.0;
const TARGET_VS_JETSTREAM: f64 = 1.0;
const STREAM: &str = "OPSBOX_BENCH_QUEUES";
const SUBJECTS: &str = "opsbox-bench-queues";

#[derive(Parser, Debug)]
#[command(
    name = "queues",
    about = "Durable push→pull→ack cycles/s: opsbox vs beanstalkd (fsync) vs NATS JetStream"
)]
struct Args {
    /// Concurrent clients, one table row each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Measured seconds per system and row.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Warm-up seconds before each measurement (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Pending messages pre-loaded into another node's queue for the second
    /// measurement, one row each (cumulative: each size tops the queue up): 1k to 1M,
    /// as the issue asks (loading 1M takes ~12 s here). `--backlog 0` skips the
    /// measurement.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    backlog: Vec<usize>,
    /// Concurrent clients for the backlog rows.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    backlog_clients: Vec<usize>,
    /// The opsbox release binary.
    #[arg(long, default_value = "target/release/opsbox")]
    opsbox: PathBuf,
    /// The beanstalkd binary (Debian package `beanstalkd`).
    #[arg(long, default_value = "beanstalkd")]
    beanstalkd: PathBuf,
    /// The NATS server (JetStream enabled), host:port.
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats: String,
    /// Keep the temp dir (opsbox data, beanstalkd binlog, server logs) and print its path.
    #[arg(long)]
    keep: bool,
}

// ---------------------------------------------------------------------------------
// Child processes

/// The pid of a running process by its command name (for the NATS server, which this
/// bench does not start).
fn pid_of(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (name.trim() == comm).then_some(pid)
        })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------
// Measurement

/// When the clients run: warm-up until `measure_from`, counted until `end`.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// The outcome of one system at one concurrency.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
    /// Server CPU seconds over the measured window, when known.
    cpu: Option<f64>,
    /// This process's CPU seconds (the load: the clients) over the measured window.
    load_cpu: Option<f64>,
    seconds: f64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1].as_secs_f64() * 1000.0
    }

    /// CPU milliseconds per counted cycle of `seconds` (the server's `cpu` or the
    /// clients' `load_cpu`: with servers and clients on the same CPUs, what the load costs
    /// caps every system's rate too).
    fn ms_per_cycle(&self, seconds: Option<f64>) -> Option<f64> {
        seconds
            .filter(|_| self.ok > 0)
            .map(|c| c * 1000.0 / self.ok as f64)
    }
}

/// One client: runs `cycle` on `conn` until the window ends; counts the cycles that
/// start after the warm-up and end inside the window.
async fn drive<C, F>(mut conn: C, window: Window, mut cycle: F) -> Tally
where
    C: Send,
    F: for<'a> FnMut(&'a mut C) -> BoxFuture<'a, anyhow::Result<()>>,
{
    let mut tally = Tally::default();
    while Instant::now() < window.end {
        let started = Instant::now();
        let result = cycle(&mut conn).await;
        let ended = Instant::now();
        let counted = started >= window.measure_from && ended <= window.end;
        match result {
            Ok(()) if counted => {
                tally.ok += 1;
                tally.latencies.push(ended - started);
            }
            Ok(()) => {}
            Err(error) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(format!("{error:#}"));
                }
                // Don't spin on a dead server.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tally
}

/// Runs the clients' tasks (already spawned, all sharing `window`) and samples the
/// server's CPU time over the measured part of the window.
async fn measure(
    window: Window,
    server_pid: Option<u32>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
) -> anyhow::Result<Tally> {
    let sampler = tokio::spawn(async move {
        let own = |pid: Option<u32>| pid.and_then(|pid| cpu::CpuTimes::read(pid).map(|t| t.own));
        let load = Some(std::process::id());
        tokio::time::sleep_until(window.measure_from.into()).await;
        let before = (own(server_pid), own(load));
        tokio::time::sleep_until(window.end.into()).await;
        let after = (own(server_pid), own(load));
        (
            before.0.zip(after.0).map(|(b, a)| a - b),
            before.1.zip(after.1).map(|(b, a)| a - b),
        )
    });
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await?);
    }
    (total.cpu, total.load_cpu) = sampler.await?;
    total.seconds = (window.end - window.measure_from).as_secs_f64();
    total.latencies.sort();
    Ok(total)
}

fn window(args: &Args) -> Window {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    Window {
        measure_from,
        end: measure_from + Duration::from_secs_f64(args.duration),
    }
}

// ---------------------------------------------------------------------------------
// opsbox: native queue API over HTTP/1.1 keep-alive, one connection per client.

async fn opsbox_row(args: &Args, base: &str, pid: u32, clients: usize) -> anyhow::Result<Tally> {
    let window = window(args);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let conn = Opsbox::new(base, &format!("bench-{i}"))?;
        tasks.push(tokio::spawn(drive(conn, window, |c| Box::pin(c.cycle()))));
    }
    measure(window, Some(pid), tasks).await
}

/// Tops the `backlog` node's queue up to `target` pending messages (batches of 1000,
/// four pushers); returns the seconds it took.
async fn preload(base: &str, have: usize, target: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let batches: Vec<usize> = (have..target)
        .step_by(1000)
        .map(|from| (target - from).min(1000))
        .collect();
    let batches = Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (batches, conn) = (batches.clone(), Opsbox::new(base, "backlog")?);
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(size) = batches.lock().expect("poisoned").pop() else {
                    return anyhow::Ok(());
                };
                let messages: Vec<Value> = (0..size)
                    .map(|i| json!({"payload": {"waiting": i}}))
                    .collect();
                let pushed = conn
                    .post(&conn.push, &json!({ "messages": messages }), 201)
                    .await?;
                ensure!(
                    pushed["messages"].as_array().map(Vec::len) == Some(size),
                    "a backlog push stored fewer messages than sent"
                );
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------
// beanstalkd: its text protocol, by hand. The Rust beanstalkd clients on crates.io
// (`beanstalkc`, `beanstalkd`, `tokio-beanstalkd`) are synchronous or unmaintained for
// years and on old tokio; the three commands used here are a few lines each.

struct Beanstalk {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
    body: Vec<u8>,
    n: u64,
}

impl Beanstalk {
    async fn connect(addr: &str, tube: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let mut conn = Beanstalk {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
            body: Vec::new(),
            n: 0,
        };
        conn.command(&format!("use {tube}\r\n"), "USING").await?;
        conn.command(&format!("watch {tube}\r\n"), "WATCHING")
            .await?;
        conn.command("ignore default\r\n", "WATCHING").await?;
        Ok(conn)
    }

    /// Sends `command`, reads one reply line, checks it starts with `expect`.
    async fn command(&mut self, command: &str, expect: &str) -> anyhow::Result<()> {
        self.writer.write_all(command.as_bytes()).await?;
        self.read_line(expect).await
    }

    async fn read_line(&mut self, expect: &str) -> anyhow::Result<()> {
        self.line.clear();
        let read = self.reader.read_line(&mut self.line).await?;
        ensure!(read > 0, "beanstalkd closed the connection");
        ensure!(
            self.line.starts_with(expect),
            "beanstalkd answered {:?}, expected {expect}",
            self.line.trim_end()
        );
        Ok(())
    }

    /// The second word of the last reply line (the job id).
    fn id(&self) -> anyhow::Result<u64> {
        self.line
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| anyhow!("no job id in {:?}", self.line.trim_end()))
    }

    async fn cycle(&mut self) -> anyhow::Result<()> {
        self.n += 1;
        let body = format!("{{\"n\":{}}}", self.n);
        let put = format!("put 0 0 60 {}\r\n{body}\r\n", body.len());
        self.command(&put, "INSERTED").await?;
        let id = self.id()?;
        self.command("reserve-with-timeout 5\r\n", "RESERVED")
            .await?;
        let reserved = self.id()?;
        let bytes: usize = self
            .line
            .split_whitespace()
            .nth(2)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| anyhow!("no size in {:?}", self.line.trim_end()))?;
        self.body.resize(bytes + 2, 0);
        self.reader.read_exact(&mut self.body).await?;
        ensure!(reserved == id, "put job {id}, reserved {reserved}");
        ensure!(
            &self.body[..bytes] == body.as_bytes(),
            "job {id}: other body"
        );
        self.command(&format!("delete {id}\r\n"), "DELETED").await?;
        Ok(())
    }
}

async fn beanstalkd_row(
    args: &Args,
    addr: &str,
    pid: u32,
    clients: usize,
) -> anyhow::Result<Tally> {
    let mut conns = Vec::new();
    for i in 0..clients {
        conns.push(Beanstalk::connect(addr, &format!("bench-{i}")).await?);
    }
    let window = window(args);
    let tasks = conns
        .into_iter()
        .map(|conn| tokio::spawn(drive(conn, window, |c| Box::pin(c.cycle()))))
        .collect();
    measure(window, Some(pid), tasks).await
}

// ---------------------------------------------------------------------------------
// NATS JetStream: async-nats, one connection and one durable pull consumer per client.

struct Nats {
    js: async_nats::jetstream::Context,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    subject: String,
    n: u64,
}

impl Nats {
    async fn cycle(&mut self) -> anyhow::Result<()> {
        self.n += 1;
        let body = format!("{{\"n\":{}}}", self.n);
        let ack = self
            .js
            .publish(self.subject.clone(), body.clone().into())
            .await?
            .await?;
        ensure!(ack.stream == STREAM, "published into {}", ack.stream);
        let mut batch = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let message = batch
            .next()
            .await
            .ok_or_else(|| anyhow!("fetch returned no message"))?
            .map_err(|e| anyhow!("fetch: {e}"))?;
        ensure!(
            message.payload.as_ref() == body.as_bytes(),
            "fetched another message than published"
        );
        message
            .double_ack()
            .await
            .map_err(|e| anyhow!("double ack: {e}"))?;
        Ok(())
    }
}

/// (Re)creates the work-queue stream with file storage.
async fn nats_stream(url: &str) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(Config {
            name: STREAM.into(),
            subjects: vec![format!("{SUBJECTS}.>")],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating the JetStream stream: {e}"))?;
    Ok(stream)
}

async fn nats_row(
    args: &Args,
    stream: &async_nats::jetstream::stream::Stream,
    pid: Option<u32>,
    clients: usize,
) -> anyhow::Result<Tally> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let mut conns = Vec::new();
    for i in 0..clients {
        let subject = format!("{SUBJECTS}.c{i}");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("c{i}")),
                filter_subject: subject.clone(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating consumer c{i}: {e}"))?;
        let client = async_nats::connect(&args.nats).await?;
        conns.push(Nats {
            js: async_nats::jetstream::new(client),
            consumer,
            subject,
            n: 0,
        });
    }
    let window = window(args);
    let tasks = conns
        .into_iter()
        .map(|conn| tokio::spawn(drive(conn, window, |c| Box::pin(c.cycle()))))
        .collect();
    measure(window, pid, tasks).await
}

// ---------------------------------------------------------------------------------

fn ratio(ours: &Tally, theirs: &Tally, target: f64) -> String {
    if theirs.ok == 0 {
        return "-".into();
    }
    let r = ours.rate() / theirs.rate();
    let mark = if r >= target { "ok" } else { "BELOW" };
    format!("{r:.2}x {mark} {target}x")
}

/// CPU ms per cycle, "?" when unknown.
fn per_cycle(t: &Tally, seconds: Option<f64>) -> String {
    t.ms_per_cycle(seconds)
        .map_or_else(|| "?".into(), |c| format!("{c:.2}"))
}

fn errors(name: &str, t: &Tally) {
    if let Some(error) = &t.first_error {
        eprintln!("  {name}: {} errors, first: {error}", t.errors);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("opsbox-queues-")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    println!("load average at start: {}", load_average());

    // opsbox
    let opsbox_port = free_port()?;
    let data = root.join("data");
    let scripts = data.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    let mut command = Command::new(program_path(&args.opsbox)?);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{opsbox_port}"))
        .arg("--data")
        .arg(&data)
        .arg("--scripts")
        .arg(&scripts);
    let mut opsbox = ChildGuard::start("opsbox", command, root.join("opsbox.log"))?;
    let base = format!("http://127.0.0.1:{opsbox_port}");
    let probe = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        opsbox.check_alive()?;
        match probe.get(format!("{base}/v1/info")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => bail!("opsbox not ready in 60 s: {other:?}"),
        }
    }

    // beanstalkd, binlog on, fsync after every write
    let beanstalkd_port = free_port()?;
    let binlog = root.join("binlog");
    std::fs::create_dir_all(&binlog)?;
    let mut command = Command::new(program_path(&args.beanstalkd)?);
    command
        .arg("-l")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(beanstalkd_port.to_string())
        .arg("-b")
        .arg(&binlog)
        .arg("-f")
        .arg("0");
    let mut beanstalkd = ChildGuard::start("beanstalkd", command, root.join("beanstalkd.log"))
        .context("is beanstalkd installed? (apt-get install -y beanstalkd)")?;
    let beanstalkd_addr = format!("127.0.0.1:{beanstalkd_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&beanstalkd_addr).await.is_err() {
        beanstalkd.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "beanstalkd not listening in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // NATS JetStream, already running
    let stream = nats_stream(&args.nats).await.context(
        "NATS with JetStream must run on loopback (start-stop-daemon --start --oknodo \
         --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js \
         -sd /var/lib/nats-server)",
    )?;
    let nats_pid = pid_of("nats-server");

    println!(
        "durable push→pull→ack cycles/s, {} s per cell after {} s warm-up; servers and clients \
         on the same {} CPUs",
        args.duration,
        args.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let mut table = String::new();
    writeln!(
        table,
        "| clients | opsbox c/s | beanstalkd c/s | JetStream c/s | opsbox/beanstalkd | \
         opsbox/JetStream | p50 / p99 ms o · b · j | server CPU ms/cycle o · b · j | \
         clients' CPU ms/cycle o · b · j | errors o/b/j |"
    )?;
    writeln!(table, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")?;
    print!("{table}");
    for &clients in &args.concurrency {
        let o = opsbox_row(&args, &base, opsbox.pid(), clients).await?;
        opsbox.check_alive()?;
        let b = beanstalkd_row(&args, &beanstalkd_addr, beanstalkd.pid(), clients).await?;
        beanstalkd.check_alive()?;
        let j = nats_row(&args, &stream, nats_pid, clients).await?;
        let row = format!(
            "| {clients} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1}/{:.1} · {:.1}/{:.1} · {:.1}/{:.1} | {} · {} · {} | {} · {} · {} | {}/{}/{} |",
            o.rate(),
            b.rate(),
            j.rate(),
            ratio(&o, &b, TARGET_VS_BEANSTALKD),
            ratio(&o, &j, TARGET_VS_JETSTREAM),
            o.percentile_ms(0.5),
            o.percentile_ms(0.99),
            b.percentile_ms(0.5),
            b.percentile_ms(0.99),
            j.percentile_ms(0.5),
            j.percentile_ms(0.99),
            per_cycle(&o, o.cpu),
            per_cycle(&b, b.cpu),
            per_cycle(&j, j.cpu),
            per_cycle(&o, o.load_cpu),
            per_cycle(&b, b.load_cpu),
            per_cycle(&j, j.load_cpu),
            o.errors,
            b.errors,
            j.errors,
        );
        println!("{row}");
        errors("opsbox", &o);
        errors("beanstalkd", &b);
        errors("JetStream", &j);
    }
    println!(
        "targets (issue #5, at 64 clients): opsbox ≥ {TARGET_VS_BEANSTALKD}× beanstalkd with \
         fsync, ≥ {TARGET_VS_JETSTREAM}× JetStream durable work queue"
    );

    if args.backlog.iter().any(|&n| n > 0) {
        println!();
        println!(
            "opsbox cycles/s with N pending messages waiting in another node's queue \
             (node `backlog`, never pulled)"
        );
        println!();
        let mut header = String::from("| waiting | load s |");
        let mut rule = String::from("|--:|--:|");
        for clients in &args.backlog_clients {
            write!(header, " {clients} clients c/s | p99 ms |")?;
            rule.push_str("--:|--:|");
        }
        println!("{header}\n{rule}");
        let mut have = 0;
        for &target in args.backlog.iter().filter(|&&n| n > 0) {
            let load = preload(&base, have, target.max(have)).await?;
            have = have.max(target);
            let mut row = format!("| {have} | {load:.1} |");
            for &clients in &args.backlog_clients {
                let o = opsbox_row(&args, &base, opsbox.pid(), clients).await?;
                write!(row, " {:.0} | {:.1} |", o.rate(), o.percentile_ms(0.99))?;
                errors("opsbox", &o);
            }
            println!("{row}");
        }
    }
    opsbox.check_alive()?;
    let _ = async_nats::jetstream::new(async_nats::connect(&args.nats).await?)
        .delete_stream(STREAM)
        .await;
    println!();
    println!("load average at end: {}", load_average());
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}
