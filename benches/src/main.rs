//! `opsbox-bench`: runs one trivial script (`echo hello`) under concurrent load through
//! three paths, in one run on one machine, and prints runs/s, latency and ratios:
//!
//! - **opsbox**: `POST /v1/scripts/trivial/run` on a started `opsbox serve` (the request
//!   waits for the run's end and returns its output);
//! - **webhook**: adnanh/webhook executing the same script with its output in the response;
//! - **spawn**: N tasks spawning the script directly with `tokio::process::Command` and
//!   reading its output: the physical limit of the machine, no HTTP, no bookkeeping.
//!
//! A benchmark, not a test: it asserts nothing about timings. Every response is checked
//! (status and "hello" in the output); failures are counted and shown, never timed.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

/// Target ratios from the issue: at least webhook's throughput, at least 80% of raw spawns.
#[path = "children.rs"]
mod children;
#[path = "cpu.rs"]
mod cpu;
use children::{free_port, program_path, ChildGuard};
use cpu::CpuTimes;

const TARGET_VS_WEBHOOK: f64 = 1.0;
const TARGET_VS_SPAWN: f64 = 0.8;

#[derive(Parser, Debug)]
#[command(
    name = "opsbox-bench",
    about = "Trivial script runs/s: opsbox vs webhook vs a raw spawn loop"
)]
struct Args {
    /// Concurrent clients, one table row each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Measured seconds per system and row.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up seconds before each measurement (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The opsbox release binary.
    #[arg(long, default_value = "target/release/opsbox")]
    opsbox: PathBuf,
    /// The webhook binary (adnanh/webhook, Debian package `webhook`).
    #[arg(long, default_value = "webhook")]
    webhook: PathBuf,
    /// Which systems to run (default: all three).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "opsbox,webhook,spawn"
    )]
    systems: Vec<System>,
    /// Keep the temp dir (scripts, data, server logs) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    Opsbox,
    Webhook,
    Spawn,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Opsbox => "opsbox",
            System::Webhook => "webhook",
            System::Spawn => "spawn",
        }
    }
}

/// Waits until `url` answers any HTTP status, or the child dies, or 60 s pass.
async fn wait_ready(
    client: &reqwest::Client,
    guard: &mut ChildGuard,
    url: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        guard.check_alive()?;
        match client.get(url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(response) => bail!("{}: {url} answered {}", guard.name, response.status()),
            Err(error) => bail!("{}: {url} not reachable in 60 s: {error}", guard.name),
        }
    }
}

/// The outcome of one system at one concurrency.
#[derive(Debug, Default, Clone)]
struct Stats {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    /// Latencies of the successful runs, sorted.
    latencies: Vec<Duration>,
    /// CPU time of the serving process over the window: its own threads, and the
    /// children it reaped (the script runs).
    cpu: Option<CpuTimes>,
}

impl Stats {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// (own, children) CPU milliseconds per successful run.
    fn cpu_ms_per_run(&self) -> Option<(f64, f64)> {
        let cpu = self.cpu?;
        (self.ok > 0).then(|| {
            let n = self.ok as f64;
            (cpu.own * 1000.0 / n, cpu.children * 1000.0 / n)
        })
    }

    fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.latencies.len()) - 1;
        Some(self.latencies[index].as_secs_f64() * 1000.0)
    }
}

/// Runs `op` from `concurrency` tasks in a loop from now until `end`. A run counts when
/// it started at or after `measure_from` (the end of the warm-up) and ended by `end`.
/// With `pid`, that process's CPU time over the window is measured too.
async fn run_load<F, Fut>(
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
    pid: Option<u32>,
    op: F,
) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let duration = end.saturating_duration_since(measure_from);
    let sampler = pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = CpuTimes::read(pid)?;
            tokio::time::sleep_until(end.into()).await;
            Some(CpuTimes::read(pid)?.since(before))
        })
    });
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = Arc::clone(&op);
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = op().await;
                let finished = Instant::now();
                if began < measure_from || finished > end {
                    continue;
                }
                match result {
                    Ok(()) => {
                        stats.ok += 1;
                        stats.latencies.push(finished - began);
                    }
                    Err(error) => {
                        stats.errors += 1;
                        if stats.first_error.is_none() {
                            stats.first_error = Some(format!("{error:#}"));
                        }
                        // An immediate failure (refused connection) must not spin the CPU
                        // that the other systems' numbers depend on.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            stats
        }));
    }
    let mut total = Stats {
        seconds: duration.as_secs_f64(),
        ..Stats::default()
    };
    for task in tasks {
        match task.await {
            Ok(stats) => {
                total.ok += stats.ok;
                total.errors += stats.errors;
                if total.first_error.is_none() {
                    total.first_error = stats.first_error;
                }
                total.latencies.extend(stats.latencies);
            }
            Err(error) => {
                total.errors += 1;
                total.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    total.latencies.sort_unstable();
    if let Some(sampler) = sampler {
        total.cpu = sampler.await.ok().flatten();
    }
    total
}

/// One opsbox run: 200, state succeeded, stdout has "hello".
async fn opsbox_once(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"params":{}}"#)
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    if status != reqwest::StatusCode::OK {
        bail!(
            "opsbox answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&body).context("opsbox: not JSON")?;
    let state = value.pointer("/job/state").and_then(|s| s.as_str());
    if state != Some("succeeded") {
        bail!("opsbox job state {state:?}: {value}");
    }
    let hello = value
        .pointer("/output/stdout")
        .and_then(|s| s.as_array())
        .is_some_and(|lines| lines.iter().any(|l| l.as_str() == Some("hello")));
    if !hello {
        bail!("opsbox output has no 'hello': {value}");
    }
    Ok(())
}

/// One webhook run: 200 and the command's output ("hello") in the body.
async fn webhook_once(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let response = client.post(url).body("{}").send().await?;
    let status = response.status();
    let body = response.text().await?;
    if status != reqwest::StatusCode::OK {
        bail!("webhook answered {status}: {body}");
    }
    if !body.contains("hello") {
        bail!("webhook output has no 'hello': {body:?}");
    }
    Ok(())
}

/// One raw run: spawn the script, read its output, check it.
async fn spawn_once(script: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(script)
        .stdin(Stdio::null())
        .output()
        .await?;
    if !output.status.success() {
        bail!("script exited {}", output.status);
    }
    if !String::from_utf8_lossy(&output.stdout).contains("hello") {
        bail!("script output has no 'hello'");
    }
    Ok(())
}

/// A keep-alive HTTP client sized for `concurrency` connections.
fn http_client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()?)
}

struct Setup {
    // Guards before the temp dir: fields drop in order, so the servers are killed
    // before their files are removed.
    opsbox: Option<ChildGuard>,
    webhook: Option<ChildGuard>,
    opsbox_url: String,
    webhook_url: String,
    script: PathBuf,
    dir: Option<tempfile::TempDir>,
}

async fn setup(args: &Args) -> anyhow::Result<Setup> {
    let dir = tempfile::Builder::new().prefix("opsbox-bench-").tempdir()?;
    let root = dir.path().to_path_buf();
    let scripts = root.join("scripts");
    let data = root.join("data");
    std::fs::create_dir_all(&scripts)?;
    std::fs::create_dir_all(&data)?;
    let script = scripts.join("trivial");
    std::fs::write(&script, "#!/bin/sh\necho hello\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    let probe = http_client(1)?;

    let mut opsbox_url = String::new();
    let opsbox = if args.systems.contains(&System::Opsbox) {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(program_path(&args.opsbox)?);
        command
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data")
            .arg(&data)
            .arg("--scripts")
            .arg(&scripts)
            .current_dir(&root);
        let mut guard = ChildGuard::start("opsbox", command, root.join("opsbox.log"))?;
        wait_ready(&probe, &mut guard, &format!("http://{addr}/v1/info")).await?;
        opsbox_url = format!("http://{addr}/v1/scripts/trivial/run");
        Some(guard)
    } else {
        None
    };

    let mut webhook_url = String::new();
    let webhook = if args.systems.contains(&System::Webhook) {
        let port = free_port()?;
        let hooks = serde_json::json!([{
            "id": "trivial",
            "execute-command": script,
            "command-working-directory": root,
            "include-command-output-in-response": true,
            "include-command-output-in-response-on-error": true,
        }]);
        let hooks_file = root.join("hooks.json");
        std::fs::write(&hooks_file, serde_json::to_vec_pretty(&hooks)?)?;
        let mut command = Command::new(program_path(&args.webhook)?);
        command
            .arg("-hooks")
            .arg(&hooks_file)
            .arg("-port")
            .arg(port.to_string())
            .arg("-ip")
            .arg("127.0.0.1")
            .current_dir(&root);
        let mut guard = ChildGuard::start("webhook", command, root.join("webhook.log"))?;
        // webhook answers `GET /` with 200 "OK" once it listens.
        wait_ready(&probe, &mut guard, &format!("http://127.0.0.1:{port}/")).await?;
        webhook_url = format!("http://127.0.0.1:{port}/hooks/trivial");
        Some(guard)
    } else {
        None
    };

    Ok(Setup {
        opsbox,
        webhook,
        opsbox_url,
        webhook_url,
        script,
        dir: Some(dir),
    })
}

async fn measure(args: &Args, setup: &Setup, system: System, concurrency: usize) -> Stats {
    let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    match system {
        System::Opsbox | System::Webhook => {
            let client = match http_client(concurrency) {
                Ok(client) => client,
                Err(error) => {
                    return Stats {
                        errors: 1,
                        first_error: Some(error.to_string()),
                        ..Stats::default()
                    }
                }
            };
            let url: Arc<str> = if system == System::Opsbox {
                setup.opsbox_url.as_str().into()
            } else {
                setup.webhook_url.as_str().into()
            };
            let pid = if system == System::Opsbox {
                setup.opsbox.as_ref().map(|g| g.child.id())
            } else {
                setup.webhook.as_ref().map(|g| g.child.id())
            };
            run_load(concurrency, measure_from, end, pid, move || {
                let client = client.clone();
                let url = Arc::clone(&url);
                async move {
                    if system == System::Opsbox {
                        opsbox_once(&client, &url).await
                    } else {
                        webhook_once(&client, &url).await
                    }
                }
            })
            .await
        }
        System::Spawn => {
            let script: Arc<Path> = setup.script.as_path().into();
            // The "server" of the spawn loop is this process itself.
            let pid = Some(std::process::id());
            run_load(concurrency, measure_from, end, pid, move || {
                let script = Arc::clone(&script);
                async move { spawn_once(&script).await }
            })
            .await
        }
    }
}

fn fmt_rate(stats: Option<&Stats>) -> String {
    match stats {
        Some(s) => format!("{:.0}", s.rate()),
        None => "-".into(),
    }
}

fn fmt_latency(stats: Option<&Stats>) -> String {
    match stats.and_then(|s| Some((s.percentile_ms(50.0)?, s.percentile_ms(99.0)?))) {
        Some((p50, p99)) => format!("{p50:.1} / {p99:.1}"),
        None => "-".into(),
    }
}

fn fmt_cpu(stats: Option<&Stats>) -> String {
    match stats.and_then(Stats::cpu_ms_per_run) {
        Some((own, children)) => format!("{own:.2} + {children:.2}"),
        None => "-".into(),
    }
}

fn ratio(a: Option<&Stats>, b: Option<&Stats>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.rate() > 0.0).then(|| a.rate() / b.rate())
}

struct Row {
    concurrency: usize,
    opsbox: Option<Stats>,
    webhook: Option<Stats>,
    spawn: Option<Stats>,
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| clients | opsbox runs/s | webhook runs/s | spawn runs/s | opsbox p50 / p99 ms | webhook p50 / p99 ms | spawn p50 / p99 ms | opsbox/webhook | opsbox/spawn | errors o/w/s |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for row in rows {
        let vswebhook = ratio(row.opsbox.as_ref(), row.webhook.as_ref());
        let vs_spawn = ratio(row.opsbox.as_ref(), row.spawn.as_ref());
        let mark = |r: Option<f64>, target: f64| match r {
            Some(r) if r >= target => format!("{r:.2}x ok"),
            Some(r) => format!("{r:.2}x BELOW {target:.1}x"),
            None => "-".into(),
        };
        let errors = |s: &Option<Stats>| s.as_ref().map_or("-".into(), |s| s.errors.to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{} |",
            row.concurrency,
            fmt_rate(row.opsbox.as_ref()),
            fmt_rate(row.webhook.as_ref()),
            fmt_rate(row.spawn.as_ref()),
            fmt_latency(row.opsbox.as_ref()),
            fmt_latency(row.webhook.as_ref()),
            fmt_latency(row.spawn.as_ref()),
            mark(vswebhook, TARGET_VS_WEBHOOK),
            mark(vs_spawn, TARGET_VS_SPAWN),
            errors(&row.opsbox),
            errors(&row.webhook),
            errors(&row.spawn),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "CPU ms per run, server's own threads + the script processes it reaped (spawn: this bench process):"
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| clients | opsbox | webhook | spawn |");
    let _ = writeln!(out, "|--:|--:|--:|--:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.concurrency,
            fmt_cpu(row.opsbox.as_ref()),
            fmt_cpu(row.webhook.as_ref()),
            fmt_cpu(row.spawn.as_ref()),
        );
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency takes a list of positive numbers, e.g. 1,16,64");
    }
    if args.duration <= 0.0 || args.warmup < 0.0 {
        bail!("--duration must be positive and --warmup not negative");
    }
    let mut setup = setup(&args).await?;
    if args.keep {
        if let Some(dir) = setup.dir.take() {
            eprintln!("keeping {}", dir.keep().display());
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "opsbox-bench: {cpus} CPUs, {}s per measurement after {}s warm-up, systems {:?}",
        args.duration,
        args.warmup,
        args.systems.iter().map(|s| s.name()).collect::<Vec<_>>()
    );

    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        let mut row = Row {
            concurrency,
            opsbox: None,
            webhook: None,
            spawn: None,
        };
        for &system in &args.systems {
            let stats = measure(&args, &setup, system, concurrency).await;
            eprintln!(
                "  {:>3} clients  {:<8} {:>7.0} runs/s  p50/p99 {:>12} ms  cpu/run {:>12} ms  errors {}{}",
                concurrency,
                system.name(),
                stats.rate(),
                fmt_latency(Some(&stats)),
                fmt_cpu(Some(&stats)),
                stats.errors,
                stats
                    .first_error
                    .as_deref()
                    .map(|e| format!(" (first: {})", e.chars().take(300).collect::<String>()))
                    .unwrap_or_default(),
            );
            match system {
                System::Opsbox => row.opsbox = Some(stats),
                System::Webhook => row.webhook = Some(stats),
                System::Spawn => row.spawn = Some(stats),
            }
        }
        rows.push(row);
    }

    println!();
    println!("{}", table(&rows));
    println!(
        "targets: opsbox >= {TARGET_VS_WEBHOOK:.1}x webhook, opsbox >= {TARGET_VS_SPAWN:.1}x spawn (raw fork+exec, the physical limit)"
    );
    drop(setup);
    Ok(())
}
