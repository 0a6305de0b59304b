//! Nodes and fan-out jobs with real processes: `opsbox serve` and several `opsbox agent`s
//! on loopback, driven through the SDK. The server's own node takes no fan-out tasks
//! here (`--local-slots 0`), so every task crosses the agent protocol; units of the model
//! run their hooks on agents too.

mod serving;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opsbox_api::{FanoutRequest, JobState, Placement, TaskState};
use opsbox_client::Client;
use serving::{alive, free_port};

/// A child process killed when dropped (a server or an agent).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    server: Proc,
    client: Client,
}

fn scripts(dir: &Path) -> PathBuf {
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let write = |name: &str, body: &str| {
        let path = scripts.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    };
    write(
        "count.sh",
        "#!/bin/sh\nn=$(printf '%s\\n' \"$INPUT\" | wc -w)\necho \"$n on $OPSBOX_NODE\"\necho \"$n\" > \"$OPSBOX_RESULTS/n\"\n",
    );
    write(
        "sum.sh",
        "#!/bin/sh\nt=0\nfor f in \"$OPSBOX_INPUTS_DIR\"/map-*/n; do read -r n < \"$f\"; t=$((t + n)); done\necho \"$t\" > \"$OPSBOX_RESULTS/total\"\necho total $t\n",
    );
    // Input "SECONDS [DIR]": writes its pid into DIR (when given), then sleeps.
    write(
        "slow.sh",
        "#!/bin/sh\nset -- $INPUT\n[ -n \"$2\" ] && echo $$ > \"$2/$OPSBOX_NODE-$OPSBOX_TASK\"\nsleep \"$1\"\necho slept on $OPSBOX_NODE\n",
    );
    write(
        "fail.sh",
        "#!/bin/sh\necho failing on $OPSBOX_NODE >&2\nexit 3\n",
    );
    // Five numbered lines, a little apart, so a follower sees them come.
    write(
        "ticks.sh",
        "#!/bin/sh\nfor n in 0 1 2 3 4; do echo \"$INPUT:$n\"; sleep 0.1; done\n",
    );
    scripts
}

fn start_server(dir: &Path, port: u16) -> Proc {
    start_server_beating(dir, port, 2)
}

/// A server that waits `heartbeat` seconds before it gives up on a silent agent. It
/// also listens on `opsbox.sock` in `dir`.
fn start_server_beating(dir: &Path, port: u16, heartbeat: u32) -> Proc {
    let heartbeat = heartbeat.to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--listen")
        .arg(format!("unix:{}", dir.join("opsbox.sock").display()))
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .arg("--charms")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/charms"
        ))
        .args(["--local-slots", "0", "--heartbeat-timeout", &heartbeat])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

async fn up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{port}/v1/info"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "opsbox serve did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        scripts(dir.path());
        std::fs::create_dir_all(dir.path().join("pids")).unwrap();
        let port = free_port();
        let server = start_server(dir.path(), port);
        up(port).await;
        let client = Client::builder(format!("http://127.0.0.1:{port}"))
            .build()
            .unwrap();
        Cluster {
            dir,
            port,
            server,
            client,
        }
    }

    fn pids(&self) -> PathBuf {
        self.dir.path().join("pids")
    }

    /// Starts an agent and waits until the server lists it connected.
    async fn agent(&self, id: &str, labels: &str, slots: u32) -> Proc {
        let server = format!("http://127.0.0.1:{}", self.port);
        self.agent_of(&server, id, labels, slots).await
    }

    /// Starts an agent of `server` and waits until the server lists it connected.
    async fn agent_of(&self, server: &str, id: &str, labels: &str, slots: u32) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .args(["agent", "--server", server])
            .args(["--node-id", id, "--slots", &slots.to_string()])
            .args(["--labels", labels])
            .arg("--work-dir")
            .arg(self.dir.path().join(format!("work-{id}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Proc(child);
        self.until_connected(id, true).await;
        agent
    }

    async fn until_connected(&self, id: &str, connected: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(node) = self.client.node(id).await {
                if node.connected == connected {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} never became connected={connected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn submit(
        &self,
        map: &str,
        inputs: Vec<String>,
        reduce: Option<&str>,
        labels: &[&str],
    ) -> String {
        let job = self
            .client
            .submit(&FanoutRequest {
                map: map.into(),
                inputs,
                reduce: reduce.map(str::to_owned),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                ..FanoutRequest::default()
            })
            .await
            .unwrap();
        job.name
    }

    async fn finished(&self, job: &str) -> opsbox_api::Job {
        let response = self
            .client
            .wait(job, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(response.done, "{job} did not end: {:?}", response.job);
        response.job
    }

    /// Waits until a task of `job` runs on `node`.
    async fn until_running_on(&self, job: &str, node: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let tasks = self.client.tasks(job).await.unwrap();
            if tasks
                .iter()
                .any(|t| t.state == TaskState::Running && t.node.as_deref() == Some(node))
            {
                return;
            }
            assert!(Instant::now() < deadline, "no task of {job} ran on {node}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_100_inputs_with_a_reduce_runs_only_on_labelled_nodes() {
    let cluster = Cluster::start().await;
    let _a = cluster.agent("batch-1", "linux,batch", 4).await;
    let _b = cluster.agent("batch-2", "linux,batch", 4).await;
    let _c = cluster.agent("web-1", "linux,web", 4).await;
    // Input i has i+1 words: 100 inputs, 5050 words.
    let inputs: Vec<String> = (0..100).map(|i| vec!["w"; i + 1].join(" ")).collect();
    let job = cluster
        .submit("count", inputs, Some("sum"), &["batch"])
        .await;
    let done = cluster.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.progress[0].done, 100);
    assert_eq!(done.progress[1].done, 1);
    let tasks = cluster.client.tasks(&job).await.unwrap();
    assert_eq!(tasks.len(), 101);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for task in &tasks {
        assert_eq!(task.state, TaskState::Succeeded);
        *per_node.entry(task.node.clone().unwrap()).or_default() += 1;
    }
    assert!(!per_node.contains_key("web-1"), "{per_node:?}");
    assert!(
        per_node.get("batch-1").copied().unwrap_or(0) > 10,
        "{per_node:?}"
    );
    assert!(
        per_node.get("batch-2").copied().unwrap_or(0) > 10,
        "{per_node:?}"
    );
    let total = cluster
        .client
        .download_result(&job, "reduce-0/total")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&total).trim(), "5050");
    // Each map task's stdout is its own result file and part of the job's log.
    let out = cluster
        .client
        .download_result(&job, "map-9.out")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("10 on batch-"));
    let log = cluster.client.log(&job).await.unwrap();
    assert!(
        log.stdout.iter().any(|l| l == "total 5050"),
        "{:?}",
        log.stdout
    );
    let nodes = cluster.client.nodes().await.unwrap();
    let web = nodes.iter().find(|n| n.id == "web-1").unwrap();
    assert_eq!(web.tasks_ok, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_the_servers_machine_connects_through_its_unix_socket() {
    let cluster = Cluster::start().await;
    let socket = cluster.dir.path().join("opsbox.sock");
    let _local = cluster
        .agent_of(&format!("unix:{}", socket.display()), "sock-1", "sock", 2)
        .await;
    let inputs: Vec<String> = (0..4).map(|i| vec!["w"; i + 1].join(" ")).collect();
    let job = cluster
        .submit("count", inputs, Some("sum"), &["sock"])
        .await;
    let done = cluster.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let tasks = cluster.client.tasks(&job).await.unwrap();
    assert!(
        tasks.iter().all(|t| t.node.as_deref() == Some("sock-1")),
        "{tasks:?}"
    );
    let total = cluster
        .client
        .download_result(&job, "reduce-0/total")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&total).trim(), "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_an_agent_killed_mid_task_is_retried_elsewhere() {
    let cluster = Cluster::start().await;
    let mut doomed = cluster.agent("doomed", "linux", 1).await;
    let job = cluster.submit("slow", vec!["2".into()], None, &[]).await;
    cluster.until_running_on(&job, "doomed").await;
    let _b = cluster.agent("survivor", "linux", 1).await;
    doomed.kill9();
    let done = cluster.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let task = &cluster.client.tasks(&job).await.unwrap()[0];
    assert_eq!(task.node.as_deref(), Some("survivor"));
    assert_eq!(task.attempts, 2);
    let doomed = cluster.client.node("doomed").await.unwrap();
    assert!(!doomed.connected);
    assert_eq!(doomed.tasks_lost, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_held_ahead_on_a_lost_node_is_not_a_failed_attempt() {
    let cluster = Cluster::start().await;
    let mut doomed = cluster.agent("holder", "linux", 1).await;
    // Quick tasks first, so the job's tasks count as short and the node (one slot,
    // prefetch 1) takes the next one ahead while a long one runs.
    let mut inputs: Vec<String> = vec!["0".into(); 6];
    inputs.extend(["5".into(), "5".into()]);
    let job = cluster
        .client
        .submit(&FanoutRequest {
            map: "slow".into(),
            inputs,
            max_failures: Some(1),
            ..FanoutRequest::default()
        })
        .await
        .unwrap()
        .name;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = cluster.client.tasks(&job).await.unwrap();
        let on_node = tasks
            .iter()
            .filter(|t| {
                t.input.as_deref() == Some("5")
                    && t.state == TaskState::Running
                    && t.node.as_deref() == Some("holder")
            })
            .count();
        if on_node == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never held a task ahead: {tasks:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill9();
    cluster.until_connected("holder", false).await;
    // Both come back queued: one lost attempt (the running task), within max_failures 1;
    // the held one never ran. Counting both would have failed the job.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = cluster.client.job(&job).await.unwrap();
        assert_ne!(job.state, JobState::Failed, "{job:?}");
        let tasks = cluster.client.tasks(&job.name).await.unwrap();
        let requeued = tasks
            .iter()
            .filter(|t| t.input.as_deref() == Some("5") && t.state == TaskState::Queued)
            .count();
        if requeued == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not requeued: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.client.kill(&job).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_again_kills_the_tasks_its_killed_run_left() {
    let cluster = Cluster::start().await;
    let mut first = cluster.agent("phoenix", "linux", 1).await;
    let input = format!("300 {}", cluster.pids().display());
    let job = cluster.submit("slow", vec![input], None, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid: i32 = loop {
        let pid = std::fs::read_dir(cluster.pids())
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .find_map(|t| t.trim().parse().ok());
        if let Some(pid) = pid {
            break pid;
        }
        assert!(Instant::now() < deadline, "the task did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.kill9();
    assert!(alive(pid), "a task outlives its agent's SIGKILL");
    cluster.until_connected("phoenix", false).await;
    let _second = cluster.agent("phoenix", "linux", 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the restarted agent left its predecessor's task running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.client.kill(&job).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_fail_the_job_and_a_blacklisted_node_gets_nothing() {
    let cluster = Cluster::start().await;
    let _a = cluster.agent("n1", "linux", 2).await;
    let _b = cluster.agent("n2", "linux", 2).await;
    let job = cluster
        .client
        .submit(&FanoutRequest {
            map: "fail".into(),
            inputs: vec!["x".into()],
            max_failures: Some(1),
            ..FanoutRequest::default()
        })
        .await
        .unwrap();
    let done = cluster.finished(&job.name).await;
    assert_eq!(done.state, JobState::Failed);
    let reason = done.reason.unwrap();
    assert!(
        reason.contains("exited with status 3") && reason.contains("max_failures 1"),
        "{reason}"
    );
    let task = &cluster.client.tasks(&job.name).await.unwrap()[0];
    // The retry went to the other node.
    assert_eq!(task.attempts, 2);

    cluster.client.blacklist("n1", true).await.unwrap();
    let inputs: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let job = cluster.submit("count", inputs, None, &[]).await;
    assert_eq!(cluster.finished(&job).await.state, JobState::Succeeded);
    let tasks = cluster.client.tasks(&job).await.unwrap();
    assert!(
        tasks.iter().all(|t| t.node.as_deref() == Some("n2")),
        "{tasks:?}"
    );
    assert!(cluster.client.node("n1").await.unwrap().blacklisted);
    cluster.client.blacklist("n1", false).await.unwrap();
    assert!(!cluster.client.node("n1").await.unwrap().blacklisted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_fan_out_job_stops_its_remote_processes() {
    let cluster = Cluster::start().await;
    let _a = cluster.agent("k1", "linux", 2).await;
    let input = format!("60 {}", cluster.pids().display());
    let job = cluster
        .submit("slow", vec![input.clone(), input.clone(), input], None, &[])
        .await;
    cluster.until_running_on(&job, "k1").await;
    // Wait for both running tasks to have written their pids.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids: Vec<i32> = loop {
        let pids: Vec<i32> = std::fs::read_dir(cluster.pids())
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| t.trim().parse().ok())
            .collect();
        if pids.len() == 2 {
            break pids;
        }
        assert!(Instant::now() < deadline, "tasks did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = cluster.client.kill(&job).await.unwrap();
    assert_eq!(killed.state, JobState::Killed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "task processes outlived the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each task ends killed (the queued one never started).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = cluster.client.tasks(&job).await.unwrap();
        if tasks.iter().all(|t| t.state == TaskState::Killed) {
            assert_eq!(tasks.iter().filter(|t| t.attempts == 0).count(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "tasks not all killed: {tasks:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_a_server_restart_and_runs_on_chosen_nodes() {
    let mut cluster = Cluster::start().await;
    let _a = cluster.agent("r1", "linux,db", 2).await;
    let _b = cluster.agent("r2", "linux", 2).await;
    let job = cluster
        .submit(
            "slow",
            vec!["2".into(), "2".into(), "2".into(), "2".into(), "2".into()],
            None,
            &[],
        )
        .await;
    cluster.until_running_on(&job, "r1").await;
    cluster.server.kill9();
    cluster.server = start_server(cluster.dir.path(), cluster.port);
    up(cluster.port).await;
    // The agents come back on their own and carry on.
    cluster.until_connected("r1", true).await;
    cluster.until_connected("r2", true).await;
    let done = cluster.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.progress[0].done, 5);

    // A single run on a chosen node, on labels, and on all nodes.
    let params: BTreeMap<String, String> = BTreeMap::new();
    let on_db = cluster
        .client
        .run_placed(
            "count",
            params.clone(),
            Placement {
                labels: vec!["db".into()],
                ..Placement::default()
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(on_db.job.node.as_deref(), Some("r1"));
    assert_eq!(on_db.output.unwrap().stdout, vec!["0 on r1"]);
    // A failing run on a node ends as a local run would: its exit code is the job's.
    let failed = cluster
        .client
        .run_placed(
            "fail",
            params.clone(),
            Placement {
                node: Some("r2".into()),
                ..Placement::default()
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(failed.job.state, JobState::Failed);
    assert_eq!(failed.job.exit_code, Some(3), "{:?}", failed.job);
    assert_eq!(
        failed.job.reason.as_deref(),
        Some("exited with status 3 on r2")
    );
    let everywhere = cluster
        .client
        .run_placed(
            "count",
            params,
            Placement {
                all: true,
                ..Placement::default()
            },
            true,
        )
        .await
        .unwrap();
    let mut nodes: Vec<String> = std::iter::once(&everywhere.job)
        .chain(&everywhere.others)
        .map(|j| j.node.clone().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["r1", "r2"]);
}

/// `opsbox disco MASTER METHOD [ARG]`, the discoapi command line, against the face.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disco_command_line_waits_lists_and_kills() {
    let cluster = Cluster::start().await;
    let _a = cluster.agent("d1", "linux", 2).await;
    let job = cluster
        .submit("count", vec!["a b".into(), "c".into()], Some("sum"), &[])
        .await;
    let master = format!("disco://127.0.0.1:{}", cluster.port);
    let disco = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .arg("disco")
            .arg(&master)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = disco(&["wait", &job, "--timeout", "60"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("/reduce-0/total") && out.contains("/disco/results/"),
        "{out}"
    );
    let (code, out, _) = disco(&["jobinfo", &job]);
    assert_eq!(code, 0);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["active"], "ready");
    assert_eq!(info["mapi"], serde_json::json!([0, 0, 2, 0]));
    let (_, out, _) = disco(&["nodeinfo"]);
    assert!(out.contains("\"d1\""), "{out}");
    let (_, out, _) = disco(&["jobspec", &job]);
    assert!(out.contains("\"prefix\": \"count\""), "{out}");
    let (code, out, _) = disco(&["kill", "nosuch@1"]);
    assert_eq!((code, out.trim()), (0, "\"\""));
    let (code, _, err) = disco(&["wait", "nosuch@1"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown job"), "{err}");
}

/// The README's commands: an agent over TLS (self-signed, `--insecure`) with a node
/// token, `opsbox nodes list`, `opsbox jobs submit --wait`, `opsbox jobs tasks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connects_over_tls_with_a_node_token_and_the_cli_drives_it() {
    let dir = tempfile::tempdir().unwrap();
    scripts(dir.path());
    let port = free_port();
    let server = format!("https://127.0.0.1:{port}");
    let opsbox = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .args(args)
            .args(["--server", &server, "--insecure"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An admin token first (offline, on the data dir), then a node token through it.
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["tokens", "create", "--role", "admin", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .args(["serve", "--listen", &server, "--tls", "self-signed"])
            .arg("--data")
            .arg(&data)
            .arg("--scripts")
            .arg(dir.path().join("scripts"))
            .args(["--local-slots", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while opsbox(&["info", "--token", &admin]).0 != 0 {
        assert!(Instant::now() < deadline, "the TLS server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, node_token, err) = opsbox(&[
        "tokens", "create", "--role", "reader", "--node", "tls-1", "--token", &admin,
    ]);
    assert_eq!(code, 0, "{err}");
    let node_token = node_token.trim().to_owned();

    // A node token may act only as its own node.
    let mut wrong = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args([
            "agent",
            "--server",
            &server,
            "--insecure",
            "--token",
            &node_token,
        ])
        .args(["--node-id", "someone-else"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wrong.wait().unwrap();
    assert!(
        !status.success(),
        "an agent with another node's token must stop"
    );

    let _agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .args([
                "agent",
                "--server",
                &server,
                "--insecure",
                "--token",
                &node_token,
            ])
            .args(["--node-id", "tls-1", "--slots", "2", "--labels", "linux"])
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = opsbox(&["nodes", "list", "--token", &admin]);
        if out
            .lines()
            .any(|l| l.starts_with("tls-1") && l.contains(" connected"))
        {
            assert!(out.contains("linux"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not connect over TLS: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _, err) = opsbox(&[
        "jobs", "submit", "--map", "count", "--input", "a b", "--input", "c", "--reduce", "sum",
        "--wait", "--token", &admin,
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = opsbox(&["jobs", "list", "--json", "--limit", "1", "--token", &admin]);
    let jobs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let name = jobs[0]["name"].as_str().unwrap().to_owned();
    let (code, out, _) = opsbox(&["jobs", "tasks", &name, "--token", &admin]);
    assert_eq!(code, 0);
    assert!(out.contains("reduce:0  succeeded  tls-1"), "{out}");
    let (_, out, _) = opsbox(&[
        "jobs",
        "results",
        &name,
        "--download",
        "reduce-0/total",
        "--token",
        &admin,
    ]);
    assert_eq!(out.trim(), "3");
}

/// The log of a fan-out job follows live: every line of every task arrives once, each
/// task's lines in order, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_log_follows_live_without_losing_lines() {
    use futures::StreamExt;
    let cluster = Cluster::start().await;
    let _a = cluster.agent("f1", "linux", 2).await;
    let _b = cluster.agent("f2", "linux", 2).await;
    let inputs: Vec<String> = (0..4).map(|i| i.to_string()).collect();
    let job = cluster.submit("ticks", inputs, None, &[]).await;
    let mut events = cluster.client.follow_log(&job);
    let mut lines: Vec<String> = Vec::new();
    let mut ended = false;
    while let Some(event) = events.next().await {
        match event.unwrap() {
            opsbox_api::LogEvent::Output(chunk) => {
                lines.extend(chunk.data.lines().map(str::to_owned));
            }
            opsbox_api::LogEvent::End(job) => {
                assert_eq!(job.state, JobState::Succeeded);
                ended = true;
                break;
            }
        }
    }
    assert!(ended);
    assert_eq!(lines.len(), 4 * 5, "{lines:?}");
    for task in 0..4 {
        let mine: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("{task}:")))
            .collect();
        let expected: Vec<String> = (0..5).map(|n| format!("{task}:{n}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_run_their_hooks_on_the_nodes_their_constraints_pick() {
    let c = Cluster::start().await;
    let _web = c.agent("web1", "linux,web", 2).await;
    let _db = c.agent("db1", "linux,db", 2).await;
    let deploy = |name: &str, charm: &str, tag: &str| opsbox_api::model::DeployRequest {
        name: name.into(),
        charm: charm.into(),
        num_units: 1,
        config: BTreeMap::new(),
        constraints: [("tags".to_string(), serde_json::json!(tag))].into(),
        to: None,
    };
    c.client
        .deploy(&deploy("db", "cs:precise/mysql", "db"))
        .await
        .unwrap();
    c.client
        .deploy(&deploy("blog", "cs:precise/wordpress", "web"))
        .await
        .unwrap();
    c.client.relate("blog", "db").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let wp_config = loop {
        let jobs = c
            .client
            .jobs(&opsbox_client::JobFilter {
                script: Some("hook-blog-0-db-relation-changed".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut found = None;
        for job in jobs.iter().filter(|j| j.state == JobState::Succeeded) {
            // The hook ran on the blog unit's node, with what db/0 set on db1.
            assert_eq!(job.node.as_deref(), Some("web1"), "{job:?}");
            if let Ok(bytes) = c
                .client
                .download_result(&job.name, "map-0/wp-config.php")
                .await
            {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if text.contains("DB_NAME") {
                    found = Some(text);
                }
            }
        }
        if let Some(text) = found {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "wordpress never got its database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        wp_config.contains("define('DB_NAME', 'blog');"),
        "{wp_config}"
    );
    let status = c.client.model().await.unwrap();
    let node_of = |unit: &str| {
        status
            .units
            .iter()
            .find(|u| u.name == unit)
            .map(|u| u.node.clone())
    };
    assert_eq!(node_of("db/0").as_deref(), Some("db1"));
    assert_eq!(node_of("blog/0").as_deref(), Some("web1"));
    // No connected node has the label: a clear refusal, nothing deployed.
    let refused = c
        .client
        .deploy(&deploy("lb", "haproxy", "gpu"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("no connected node has the labels gpu"),
        "{refused}"
    );
}

/// A second agent under a node id whose agent is alive is refused, and says why; the
/// first one keeps its node. A run asking for labels no node has is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_under_a_taken_node_id_is_refused() {
    let cluster = Cluster::start().await;
    let _first = cluster.agent("a1", "web", 1).await;
    let second = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args([
            "agent",
            "--server",
            &format!("http://127.0.0.1:{}", cluster.port),
        ])
        .args(["--node-id", "a1", "--slots", "3"])
        .arg("--work-dir")
        .arg(cluster.dir.path().join("work-a1-bis"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is taken"), "{err}");
    let node = cluster.client.node("a1").await.unwrap();
    assert!(node.connected);
    assert_eq!((node.labels, node.slots), (vec!["web".to_string()], 1));

    let refused = cluster
        .client
        .run_placed(
            "count",
            BTreeMap::new(),
            Placement {
                labels: vec!["nosuch".into()],
                ..Placement::default()
            },
            true,
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("nosuch"), "{refused}");
}

/// An agent stopped with SIGTERM kills its tasks and says goodbye: they are retried
/// elsewhere at once, not after the heartbeat timeout (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_hands_its_tasks_back_at_once() {
    let mut cluster = Cluster::start().await;
    cluster.server.kill9();
    cluster.server = start_server_beating(cluster.dir.path(), cluster.port, 60);
    up(cluster.port).await;
    let leaving = cluster.agent("leaving", "linux", 1).await;
    let job = cluster.submit("slow", vec!["30".into()], None, &[]).await;
    cluster.until_running_on(&job, "leaving").await;
    let _b = cluster.agent("staying", "linux", 1).await;
    let pid = leaving.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Within until_running_on's 30 s, half the heartbeat timeout: only a goodbye does it.
    cluster.until_running_on(&job, "staying").await;
    let task = &cluster.client.tasks(&job).await.unwrap()[0];
    let reason = task.reason.clone().unwrap_or_default();
    assert!(reason.contains("on leaving"), "{reason}");
    assert!(!reason.contains("stopped responding"), "{reason}");
    cluster.until_connected("leaving", false).await;
    drop(leaving);
}
