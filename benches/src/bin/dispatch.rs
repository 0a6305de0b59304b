//! `dispatch`: what the scheduler and the agent protocol cost per task (issue #6).
//!
//! - **opsbox**: `target/release/opsbox serve` with `--local-slots 0` (every task goes
//!   through an agent) and A `opsbox agent`s on loopback sharing C slots (C/A each).
//!   One fan-out job of N inputs of a trivial script (`#!/bin/sh` + `echo hello`) is
//!   submitted (`POST /v1/jobs`) and waited for (`GET /v1/jobs/{name}/wait`); the time
//!   is from the submit to the answer of the wait. Every task is recorded in SQLite,
//!   sent to an agent, run, its output streamed back and stored, and its end recorded.
//! - **spawn**: the same N runs of the same script spawned by this process with C at a
//!   time (tokio::process, output read): the limit of the machine.
//!
//! Overhead per task = C × (opsbox time − spawn time) / N: the extra time a task holds
//! a slot. Beside it, CPU per task (`/proc`) of the server, the agents, the tasks
//! themselves and the whole machine: steadier than wall time on a shared machine, and
//! it says where the time goes. Target (issue #6): under 1 ms. A benchmark, not a test: nothing asserts on
//! timings.
//!
//! `cargo build --release -p opsbox -p opsbox-bench && target/release/dispatch`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use serde_json::{json, Value};

#[path = "../children.rs"]
mod children;
#[path = "../cpu.rs"]
mod cpu;
use children::{free_port, program_path, ChildGuard};
use cpu::CpuTimes;

const TARGET_MS: f64 = 1.0;

#[derive(Parser, Debug)]
#[command(
    name = "dispatch",
    about = "Fan-out tasks/s through agents vs plain local spawns"
)]
struct Args {
    /// Tasks per job.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Agents, one table row each.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    agents: Vec<usize>,
    /// Slots in all, shared by the agents (and the concurrency of the spawn loop).
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Jobs per row; the best time counts (a warm-up of the same size runs first).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The opsbox release binary.
    #[arg(long, default_value = "target/release/opsbox")]
    opsbox: PathBuf,
    /// Keep the temp dir (scripts, data, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

fn script(dir: &Path) -> anyhow::Result<PathBuf> {
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    let path = scripts.join("trivial.sh");
    std::fs::write(&path, "#!/bin/sh\necho hello\n")?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

async fn spawn_loop(script: &Path, tasks: usize, concurrency: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let permit = semaphore.clone().acquire_owned().await?;
        let script = script.to_path_buf();
        handles.push(tokio::spawn(async move {
            let out = tokio::process::Command::new(&script).output().await;
            drop(permit);
            out
        }));
    }
    for h in handles {
        let out = h.await??;
        ensure!(
            out.status.success() && out.stdout == b"hello\n",
            "a spawn failed"
        );
    }
    Ok(start.elapsed())
}

struct Cluster {
    base: String,
    http: reqwest::Client,
    server: ChildGuard,
    agents: Vec<ChildGuard>,
}

/// CPU seconds spent during a measurement: by the server, by the agents (their own
/// threads), by the tasks (the agents' reaped children), by the whole machine.
#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    server: f64,
    agents: f64,
    tasks: f64,
    machine: f64,
}

impl Spent {
    fn now(server: u32, agents: &[u32]) -> Spent {
        let agent_times: Vec<CpuTimes> = agents
            .iter()
            .filter_map(|&pid| CpuTimes::read(pid))
            .collect();
        Spent {
            server: CpuTimes::read(server).map_or(0.0, |t| t.own),
            agents: agent_times.iter().map(|t| t.own).sum(),
            tasks: agent_times.iter().map(|t| t.children).sum(),
            machine: cpu::machine_busy(),
        }
    }

    fn since(self, before: Spent) -> Spent {
        Spent {
            server: self.server - before.server,
            agents: self.agents - before.agents,
            tasks: self.tasks - before.tasks,
            machine: self.machine - before.machine,
        }
    }

    /// "server / agents / tasks / machine" in milliseconds per task.
    fn per_task(&self, tasks: usize) -> String {
        let ms = |s: f64| s * 1000.0 / tasks as f64;
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2}",
            ms(self.server),
            ms(self.agents),
            ms(self.tasks),
            ms(self.machine)
        )
    }
}

async fn cluster(args: &Args, dir: &Path, agents: usize) -> anyhow::Result<Cluster> {
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let opsbox = program_path(&args.opsbox)?;
    let data = dir.join(format!("data-{agents}"));
    let mut serve = Command::new(&opsbox);
    serve
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data")
        .arg(&data)
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .args(["--local-slots", "0"])
        .env("RUST_LOG", "warn");
    let mut server = ChildGuard::start(
        "opsbox serve",
        serve,
        dir.join(format!("serve-{agents}.log")),
    )?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/v1/info")).send().await.is_err() {
        server.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "opsbox serve did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slots = (args.slots / agents).max(1);
    let mut guards = Vec::new();
    for i in 0..agents {
        let mut agent = Command::new(&opsbox);
        agent
            .args(["agent", "--server", &base])
            .args([
                "--node-id",
                &format!("bench-{i}"),
                "--slots",
                &slots.to_string(),
            ])
            .arg("--work-dir")
            .arg(dir.join(format!("work-{agents}-{i}")))
            .env("RUST_LOG", "warn");
        guards.push(ChildGuard::start(
            "opsbox agent",
            agent,
            dir.join(format!("agent-{agents}-{i}.log")),
        )?);
    }
    // Until every agent is connected.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes: Value = http
            .get(format!("{base}/v1/nodes"))
            .send()
            .await?
            .json()
            .await?;
        let connected = nodes["nodes"].as_array().map_or(0, |n| {
            n.iter()
                .filter(|n| n["connected"] == true && n["id"] != "local")
                .count()
        });
        if connected == agents {
            break;
        }
        for g in &mut guards {
            g.check_alive()?;
        }
        ensure!(
            Instant::now() < deadline,
            "the agents did not connect within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Cluster {
        base,
        http,
        server,
        agents: guards,
    })
}

async fn fan_out(cluster: &Cluster, tasks: usize) -> anyhow::Result<Duration> {
    let inputs: Vec<String> = (0..tasks).map(|i| i.to_string()).collect();
    let start = Instant::now();
    let job: Value = cluster
        .http
        .post(format!("{}/v1/jobs", cluster.base))
        .json(&json!({"map": "trivial", "inputs": inputs}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let name = job["name"].as_str().context("no job name")?.to_owned();
    loop {
        let answer: Value = cluster
            .http
            .get(format!(
                "{}/v1/jobs/{}/wait?timeout=60",
                cluster.base,
                encode(&name)
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if answer["done"] == true {
            let state = answer["job"]["state"].as_str().unwrap_or("?");
            if state != "succeeded" {
                bail!("job {name} ended {state}: {}", answer["job"]["reason"]);
            }
            return Ok(start.elapsed());
        }
    }
}

fn encode(name: &str) -> String {
    name.replace('@', "%40").replace(':', "%3A")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.tasks > 0 && args.slots > 0 && args.rounds > 0,
        "tasks, slots and rounds must be positive"
    );
    let dir = tempfile::tempdir()?;
    let dir_path = if args.keep {
        let kept = dir.keep();
        eprintln!("dispatch: keeping {}", kept.display());
        kept
    } else {
        dir.path().to_path_buf()
    };
    let script = script(&dir_path)?;
    spawn_loop(&script, args.tasks, args.slots).await?;
    let mut spawn_best = Duration::MAX;
    let mut spawn_cpu = Spent::default();
    for _ in 0..args.rounds {
        let before = Spent::now(std::process::id(), &[std::process::id()]);
        let took = spawn_loop(&script, args.tasks, args.slots).await?;
        if took < spawn_best {
            spawn_best = took;
            spawn_cpu = Spent::now(std::process::id(), &[std::process::id()]).since(before);
        }
    }
    println!(
        "\n{} tasks of a trivial script, {} slots in all, best of {} rounds\n",
        args.tasks, args.slots, args.rounds
    );
    // The spawn loop's processes are this process's children; its own CPU is the
    // loop's (the "agents" column of its row).
    println!(
        "spawn loop: CPU ms per spawn, loop / spawned processes / machine: {:.2} / {:.2} / {:.2}\n",
        spawn_cpu.agents * 1000.0 / args.tasks as f64,
        spawn_cpu.tasks * 1000.0 / args.tasks as f64,
        spawn_cpu.machine * 1000.0 / args.tasks as f64,
    );
    println!("| agents | opsbox s | tasks/s | spawn s | spawns/s | ratio | overhead ms/task | CPU ms/task: server / agents / tasks / machine |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|");
    for &agents in &args.agents {
        eprintln!("dispatch: {agents} agent(s)");
        let cluster = cluster(&args, &dir_path, agents).await?;
        fan_out(&cluster, args.tasks).await?;
        let mut best = Duration::MAX;
        let mut spent = Spent::default();
        let agent_pids: Vec<u32> = cluster.agents.iter().map(|a| a.pid()).collect();
        for _ in 0..args.rounds {
            let before = Spent::now(cluster.server.pid(), &agent_pids);
            let took = fan_out(&cluster, args.tasks).await?;
            if took < best {
                best = took;
                spent = Spent::now(cluster.server.pid(), &agent_pids).since(before);
            }
        }
        let n = args.tasks as f64;
        let overhead =
            args.slots as f64 * (best.as_secs_f64() - spawn_best.as_secs_f64()) * 1000.0 / n;
        println!(
            "| {agents} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2}x | {overhead:.2} {} | {} |",
            best.as_secs_f64(),
            n / best.as_secs_f64(),
            spawn_best.as_secs_f64(),
            n / spawn_best.as_secs_f64(),
            spawn_best.as_secs_f64() / best.as_secs_f64(),
            if overhead < TARGET_MS {
                "ok"
            } else {
                "ABOVE 1 ms"
            },
            spent.per_task(args.tasks),
        );
    }
    Ok(())
}
