//! `queues-pg`: the queue benchmark on the PostgreSQL store with 1, 2 and 3 servers,
//! side by side with the practical limit of the same database (issue #8):
//!
//! - **opsbox ×N**: N `target/release/opsbox serve` processes on one PostgreSQL schema
//!   (`--store postgres://…?schema=…`), the clients spread over them round robin. Each
//!   client is its own node and runs push → pull → ack cycles on its own queue through
//!   the native API (HTTP/1.1 keep-alive), every answer checked. One cycle moves one
//!   message through the store: messages/s = cycles/s.
//! - **pgbench**: a bare claim-and-delete loop on the same database, `-c CLIENTS`:
//!   `DELETE … WHERE id = (SELECT id … ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)` on a
//!   pre-filled table, one message per transaction (synchronous_commit on, like opsbox).
//!
//! Targets: 2 servers ≥ 1.6× one server; one server ≥ 70% of the pgbench loop. A
//! benchmark, not a test: nothing asserts on timings; the table marks each target.
//!
//! Needs PostgreSQL (`--pg`, default the loopback server of this machine kind, database
//! `opsbox_bench`, created if missing) and `pgbench` and `psql` on the PATH.
//!
//! `cargo build --release -p opsbox -p opsbox-bench && target/release/queues-pg`

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use clap::Parser;

#[path = "../children.rs"]
mod children;
#[path = "../cpu.rs"]
mod cpu;
#[path = "../queue_client.rs"]
mod queue_client;
use children::{free_port, program_path, ChildGuard};
use queue_client::QueueClient as Client;

const TARGET_TWO_SERVERS: f64 = 1.6;
const TARGET_VS_PGBENCH: f64 = 0.7;

#[derive(Parser, Debug)]
#[command(
    name = "queues-pg",
    about = "Queue cycles/s on the PostgreSQL store with 1, 2, 3 servers vs a bare pgbench SKIP LOCKED loop"
)]
struct Args {
    /// Server counts, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    servers: Vec<usize>,
    /// Concurrent clients (spread over the servers), and pgbench's -c.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured seconds per row.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up seconds before each measurement (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The database (created if missing; the bench works in schemas of its own).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/opsbox_bench"
    )]
    pg: String,
    /// The opsbox release binary.
    #[arg(long, default_value = "target/release/opsbox")]
    opsbox: PathBuf,
    /// Keep the temp dir (server data and logs) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn drive(mut client: Client, measure_from: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < end {
        let started = Instant::now();
        let result = client.cycle().await;
        let ended = Instant::now();
        match result {
            Ok(()) if started >= measure_from && ended <= end => tally.ok += 1,
            Ok(()) => {}
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tally
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .arg(url)
        .args([
            "-qAtX",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "SET client_min_messages = warning",
            "-c",
            sql,
        ])
        .output()
        .context("running psql (apt-get install postgresql-client)")?;
    ensure!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Where the CPU went during a measurement.
#[derive(Default, Clone, Copy)]
struct Cpu {
    opsbox: f64,
    postgres: f64,
    bench: f64,
    machine: f64,
}

impl Cpu {
    fn now(servers: &[u32]) -> Self {
        Cpu {
            opsbox: cpu::of(servers),
            postgres: cpu::named("postgres"),
            bench: cpu::of(&[std::process::id()]),
            machine: cpu::machine_busy(),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            opsbox: self.opsbox - start.opsbox,
            postgres: self.postgres - start.postgres,
            bench: self.bench - start.bench,
            machine: self.machine - start.machine,
        }
    }
}

/// Messages/s of N servers on a fresh schema.
async fn opsbox_row(
    args: &Args,
    root: &std::path::Path,
    n: usize,
) -> anyhow::Result<(f64, Tally, Cpu)> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let store = format!("{}?schema=bench_{n}_{stamp}", args.pg);
    let scripts = root.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    let mut servers = Vec::new();
    let mut bases = Vec::new();
    for i in 0..n {
        let port = free_port()?;
        let mut command = Command::new(program_path(&args.opsbox)?);
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data")
            .arg(root.join(format!("data-{n}-{i}")))
            .arg("--scripts")
            .arg(&scripts)
            .args(["--store", &store, "--server-id", &format!("s{i}")])
            .args(["--local-slots", "0"]);
        let log = root.join(format!("opsbox-{n}-{i}.log"));
        servers.push(ChildGuard::start("opsbox", command, log)?);
        bases.push(format!("http://127.0.0.1:{port}"));
        // One at a time: the first creates the schema and runs the migrations.
        let probe = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            servers[i].check_alive()?;
            match probe.get(format!("{}/v1/info", bases[i])).send().await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => bail!("opsbox server {i} did not come up"),
            }
        }
    }
    let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let client = Client::new(&bases[c % n], &format!("bench-{c}"))?;
        tasks.push(tokio::spawn(drive(client, measure_from, end)));
    }
    let pids: Vec<u32> = servers.iter().map(ChildGuard::pid).collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let start = Cpu::now(&pids);
    tokio::time::sleep_until(end.into()).await;
    let cpu = Cpu::now(&pids).since(start);
    let mut total = Tally::default();
    for task in tasks {
        let t = task.await?;
        total.ok += t.ok;
        total.errors += t.errors;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
    }
    for server in &mut servers {
        server.check_alive()?;
    }
    drop(servers);
    psql(&args.pg, &format!("DROP SCHEMA bench_{n}_{stamp} CASCADE"))?;
    Ok((total.ok as f64 / args.duration, total, cpu))
}

/// Transactions/s of pgbench's claim-and-delete loop, each deleting one message.
/// Also answers the machine's busy CPU µs per message over the run (pgbench's
/// connections, and their backends' CPU counters, end with it: only the machine-wide
/// count covers them).
fn pgbench_row(args: &Args, root: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    let rows = 2_000_000;
    psql(
        &args.pg,
        &format!(
            "DROP TABLE IF EXISTS opsbox_bench_q;
             CREATE TABLE opsbox_bench_q (id BIGSERIAL PRIMARY KEY, payload TEXT NOT NULL);
             INSERT INTO opsbox_bench_q (payload)
                SELECT '{{\"n\":' || g || '}}' FROM generate_series(1, {rows}) g;"
        ),
    )?;
    psql(&args.pg, "VACUUM ANALYZE opsbox_bench_q")?;
    let script = root.join("claim.sql");
    std::fs::write(
        &script,
        "DELETE FROM opsbox_bench_q WHERE id = (SELECT id FROM opsbox_bench_q ORDER BY id \
         LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING payload;\n",
    )?;
    let total = (args.warmup + args.duration).ceil();
    let cpu_before = cpu::machine_busy();
    let out = Command::new("pgbench")
        .arg("-n")
        .args(["-c", &args.clients.to_string(), "-j", "2"])
        .args(["-T", &format!("{}", total as u64)])
        .arg("-f")
        .arg(&script)
        .arg(&args.pg)
        .output()
        .context("running pgbench (apt-get install postgresql-contrib)")?;
    let cpu = cpu::machine_busy() - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no tps in pgbench's output:\n{text}"))?;
    let left: u64 = psql(&args.pg, "SELECT COUNT(*) FROM opsbox_bench_q")?.parse()?;
    ensure!(left > 0, "pgbench emptied the table: pre-fill more rows");
    psql(&args.pg, "DROP TABLE opsbox_bench_q")?;
    Ok((tps, cpu * 1e6 / (tps * total).max(1.0)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("opsbox-queues-pg-")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    let (admin, db) = args
        .pg
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("--pg needs a database: postgres://USER@HOST/DB"))?;
    let exists = psql(
        &format!("{admin}/postgres"),
        &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"),
    )?;
    if exists.is_empty() {
        psql(
            &format!("{admin}/postgres"),
            &format!("CREATE DATABASE {db}"),
        )?;
    }
    println!(
        "{} clients, {:.0}s measured after {:.0}s warm-up; load average {}",
        args.clients,
        args.duration,
        args.warmup,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let (pgbench, pgbench_cpu) = pgbench_row(&args, &root)?;
    println!(
        "pgbench SKIP LOCKED claim-and-delete: {pgbench:.0} messages/s, machine CPU {pgbench_cpu:.0} µs/message"
    );
    let mut rows = Vec::new();
    for &n in &args.servers {
        let (rate, tally, cpu) = opsbox_row(&args, &root, n).await?;
        rows.push((n, rate, tally, cpu));
    }
    let one = rows.iter().find(|r| r.0 == 1).map(|r| r.1);
    println!();
    println!(
        "| servers | messages/s | vs 1 server | vs pgbench | CPU µs/message: opsbox / postgres / clients / machine | errors |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, rate, tally, cpu) in &rows {
        let scale = one.map(|o| rate / o);
        let scale_text = match (n, scale) {
            (2, Some(s)) => format!(
                "{s:.2}× {}",
                if s >= TARGET_TWO_SERVERS {
                    "(target ≥1.6× met)"
                } else {
                    "(target ≥1.6× NOT met)"
                }
            ),
            (_, Some(s)) => format!("{s:.2}×"),
            _ => "-".into(),
        };
        let vs = rate / pgbench;
        let vs_text = if *n == 1 {
            format!(
                "{vs:.2}× {}",
                if vs >= TARGET_VS_PGBENCH {
                    "(target ≥0.7× met)"
                } else {
                    "(target ≥0.7× NOT met)"
                }
            )
        } else {
            format!("{vs:.2}×")
        };
        let per = |seconds: f64| seconds * 1e6 / (rate * args.duration).max(1.0);
        println!(
            "| {n} | {rate:.0} | {scale_text} | {vs_text} | {:.0} / {:.0} / {:.0} / {:.0} | {} |",
            per(cpu.opsbox),
            per(cpu.postgres),
            per(cpu.bench),
            per(cpu.machine),
            tally.errors
        );
        if let Some(e) = &tally.first_error {
            println!("  first error: {e}");
        }
    }
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}
