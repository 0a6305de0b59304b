//! Several `opsbox serve` processes on one PostgreSQL database, seen as one system:
//! queues, jobs, agents and the watch across servers, and a server killed mid-load.
//!
//! Needs the PostgreSQL server of this machine kind on loopback: `OPSBOX_TEST_PG`
//! (default `postgres://postgres@127.0.0.1:5432/opsbox_test`, a database that must
//! exist; `test.sh` creates it). Each test works in a schema of its own. When the
//! database cannot be reached the tests fail with that message; they never skip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opsbox_api::{FanoutRequest, JobState, NewMessage, PullRequest};
use opsbox_client::Client;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The store URL of a fresh schema, or a loud failure when PostgreSQL is not there.
fn store_url(test: &str) -> String {
    let base = std::env::var("OPSBOX_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/opsbox_test".into());
    let host = base
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    assert!(
        std::net::TcpStream::connect_timeout(
            &host
                .parse()
                .unwrap_or_else(|_| "127.0.0.1:5432".parse().unwrap()),
            Duration::from_secs(3)
        )
        .is_ok(),
        "these tests need PostgreSQL at {base} (set OPSBOX_TEST_PG); it cannot be reached"
    );
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("{base}?schema=so_{test}_{stamp}")
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
        "ticks.sh",
        "#!/bin/sh\n# -- jojo --\n# description: ticks\n# param: n\n# -- jojo --\nfor i in $(seq 1 ${N:-3}); do echo tick $i; sleep 0.1; done\n",
    );
    write(
        "sleepy.sh",
        "#!/bin/sh\n# -- jojo --\n# description: sleeps\n# -- jojo --\necho $$ > \"$OPSBOX_RESULTS/../../../pid-$OPSBOX_JOB\"\nsleep 60\n",
    );
    write("count.sh", "#!/bin/sh\necho \"$INPUT on $OPSBOX_NODE\"\n");
    scripts
}

struct Server {
    proc: Proc,
    port: u16,
    client: Client,
}

async fn serve(dir: &Path, name: &str, store: &str) -> Server {
    serve_on(dir, name, Some(store)).await
}

/// A server on `store`, or on the SQLite store of its data directory with `None`.
async fn serve_on(dir: &Path, name: &str, store: Option<&str>) -> Server {
    let port = free_port();
    let data = dir.join(format!("data-{name}"));
    let child = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data")
        .arg(&data)
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .args(store.map(|s| ["--store", s]).into_iter().flatten())
        .args(["--server-id", name])
        .args(["--local-slots", "0", "--heartbeat-timeout", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{port}/v1/info"))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "opsbox serve {name} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = Client::builder(format!("http://127.0.0.1:{port}"))
        .build()
        .unwrap();
    Server { proc, port, client }
}

fn text(body: &str) -> NewMessage {
    NewMessage {
        payload: serde_json::Value::String(body.into()),
        ..NewMessage::default()
    }
}

async fn all_events(client: &Client) -> Vec<opsbox_api::Event> {
    let mut events = Vec::new();
    let mut since = 0;
    loop {
        let page = client.events(since).await.unwrap();
        let Some(last) = page.events.last() else {
            return events;
        };
        since = last.rev;
        events.extend(page.events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_servers_are_one_system() {
    let dir = tempfile::tempdir().unwrap();
    scripts(dir.path());
    let store = store_url("one");
    let a = serve(dir.path(), "a", &store).await;
    let b = serve(dir.path(), "b", &store).await;
    let c = serve(dir.path(), "c", &store).await;

    // A message pushed through A is pulled and acked through B, and seen done on C.
    let pushed = a
        .client
        .push("worker", "web", vec![text("hello"), text("world")])
        .await
        .unwrap();
    let pulled = b
        .client
        .pull(
            "worker",
            PullRequest {
                max: Some(10),
                ..PullRequest::default()
            },
        )
        .await
        .unwrap();
    let ids: Vec<String> = pulled.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, pushed.iter().map(|m| m.id.clone()).collect::<Vec<_>>());
    b.client.ack("worker", ids.clone()).await.unwrap();
    for id in &ids {
        let message = c.client.message(id).await.unwrap();
        assert_eq!(message.status, opsbox_api::MessageStatus::Processed);
    }

    // A long-poll on C wakes when A pushes: C hears A's commit.
    let poll = {
        let client = c.client.clone();
        tokio::spawn(async move {
            client
                .pull(
                    "late",
                    PullRequest {
                        wait: Some(20.0),
                        ..PullRequest::default()
                    },
                )
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    a.client
        .push("late", "web", vec![text("wake")])
        .await
        .unwrap();
    let woke = poll.await.unwrap();
    assert_eq!(woke.len(), 1, "the long-poll on C missed A's push");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A job run through A is waited on and followed through B.
    let job = a.client.run_async("ticks", [("n", "3")]).await.unwrap();
    let waited = b
        .client
        .wait(&job.name, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(waited.done);
    assert_eq!(waited.job.state, JobState::Succeeded);
    // Its record says which server ran it.
    assert_eq!(waited.job.node.as_deref(), Some("local-a"));
    let output = c.client.log(&job.name).await.unwrap();
    assert_eq!(output.stdout, ["tick 1", "tick 2", "tick 3"]);

    // A job running on A is killed through B: A stops its process.
    let sleepy = a
        .client
        .run_async("sleepy", Vec::<(String, String)>::new())
        .await
        .unwrap();
    let pid_file = dir.path().join(format!("pid-{}", sleepy.name));
    // The shell creates the file before it writes the pid: wait for the number.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid: i32 = loop {
        let written = std::fs::read_to_string(&pid_file).unwrap_or_default();
        if let Ok(pid) = written.trim().parse() {
            break pid;
        }
        assert!(Instant::now() < deadline, "sleepy never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = b.client.kill(&sleepy.name).await.unwrap();
    assert_eq!(killed.state, JobState::Killed, "{killed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the killed job's process lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An agent connected to C runs a fan-out job submitted on A; the node list of
    // every server says it is connected to C.
    let agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_opsbox"))
            .args(["agent", "--server", &format!("http://127.0.0.1:{}", c.port)])
            .args(["--node-id", "edge1", "--slots", "2"])
            .arg("--work-dir")
            .arg(dir.path().join("work-edge1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(node) = a.client.node("edge1").await {
            if node.connected {
                assert_eq!(node.server.as_deref(), Some("c"));
                break;
            }
        }
        assert!(Instant::now() < deadline, "edge1 never showed up on A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fanout = a
        .client
        .submit(&FanoutRequest {
            map: "count".into(),
            inputs: (0..6).map(|i| i.to_string()).collect(),
            ..FanoutRequest::default()
        })
        .await
        .unwrap();
    let done = b
        .client
        .wait(&fanout.name, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(done.done);
    assert_eq!(done.job.state, JobState::Succeeded, "{:?}", done.job);
    let tasks = a.client.tasks(&fanout.name).await.unwrap();
    assert!(tasks.iter().all(|t| t.node.as_deref() == Some("edge1")));
    // Its output reached the log though the job's results directory is on A.
    let mut lines = b.client.log(&fanout.name).await.unwrap().stdout;
    lines.sort();
    let expected: Vec<String> = (0..6).map(|i| format!("{i} on edge1")).collect();
    assert_eq!(lines, expected);
    // A run on every node, asked of A, reaches edge1 through C.
    let everywhere = a
        .client
        .run_placed(
            "count",
            BTreeMap::new(),
            opsbox_api::Placement {
                all: true,
                ..opsbox_api::Placement::default()
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(everywhere.job.node.as_deref(), Some("edge1"));
    assert!(everywhere.others.is_empty(), "{:?}", everywhere.others);
    // While a task runs on edge1 (connected to C), A's node list shows it running.
    let slow = a
        .client
        .run_placed(
            "sleepy",
            BTreeMap::new(),
            opsbox_api::Placement {
                node: Some("edge1".into()),
                ..opsbox_api::Placement::default()
            },
            false,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let edge1 = a.client.node("edge1").await.unwrap();
        if edge1.jobs.contains(&slow.job.name) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never saw edge1 run {}",
            slow.job.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.client.kill(&slow.job.name).await.unwrap();
    // A second agent claiming edge1 through A is refused: edge1 is alive on C.
    let second = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["agent", "--server", &format!("http://127.0.0.1:{}", a.port)])
        .args(["--node-id", "edge1", "--slots", "1", "--labels", "imposter"])
        .arg("--work-dir")
        .arg(dir.path().join("work-edge1-bis"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is taken"), "{err}");
    let edge1 = b.client.node("edge1").await.unwrap();
    assert_eq!(
        (edge1.server.as_deref(), edge1.labels.len()),
        (Some("c"), 0)
    );
    drop(agent);

    // Every server tells the same history: the same events, in one revision order
    // without gaps, whichever server wrote them.
    let (ea, eb, ec) = (
        all_events(&a.client).await,
        all_events(&b.client).await,
        all_events(&c.client).await,
    );
    assert!(ea.len() > 20);
    // Read one after the other while the agent's disconnection may still be committing:
    // the later reads may hold more, and what the first holds they hold alike.
    let last = ea.last().map_or(0, |e| e.rev);
    let upto = |events: Vec<opsbox_api::Event>| -> Vec<opsbox_api::Event> {
        events.into_iter().filter(|e| e.rev <= last).collect()
    };
    assert_eq!(ea, upto(eb));
    assert_eq!(ea, upto(ec));
    for pair in ea.windows(2) {
        assert_eq!(pair[1].rev, pair[0].rev + 1, "a gap in the revisions");
        assert!(pair[0].at <= pair[1].at);
    }
    drop((a, b, c));
}

/// One of two servers is SIGKILLed under load: every push answered 201 (by either) is
/// stored once, every acked message is processed, and no message was handed to two
/// pullers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_killed_mid_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    scripts(dir.path());
    let store = store_url("kill");
    let mut a = serve(dir.path(), "a", &store).await;
    let b = serve(dir.path(), "b", &store).await;
    let bases = [
        format!("http://127.0.0.1:{}", a.port),
        format!("http://127.0.0.1:{}", b.port),
    ];

    let pushed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let delivered: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for producer in 0..8 {
        let base = bases[producer % 2].clone();
        let pushed = pushed.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::builder(base).build().unwrap();
            for n in 0.. {
                match client
                    .push("q", "p", vec![text(&format!("{producer}-{n}"))])
                    .await
                {
                    Ok(stored) => {
                        pushed
                            .lock()
                            .unwrap()
                            .extend(stored.into_iter().map(|m| m.id));
                    }
                    Err(_) if n > 0 => return,
                    Err(e) => panic!("the first push failed: {e}"),
                }
                if n > 400 {
                    return;
                }
            }
        }));
    }
    for consumer in 0..4 {
        let base = bases[consumer % 2].clone();
        let (delivered, acked) = (delivered.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::builder(base).build().unwrap();
            let mut idle = 0;
            loop {
                let request = PullRequest {
                    max: Some(8),
                    ..PullRequest::default()
                };
                let Ok(messages) = client.pull("q", request).await else {
                    return;
                };
                if messages.is_empty() {
                    idle += 1;
                    if idle > 50 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                idle = 0;
                let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
                {
                    let mut seen = delivered.lock().unwrap();
                    for id in &ids {
                        *seen.entry(id.clone()).or_default() += 1;
                    }
                }
                if client.ack("q", ids.clone()).await.is_ok() {
                    acked.lock().unwrap().extend(ids);
                } else {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.proc.0.kill().unwrap(); // SIGKILL
    a.proc.0.wait().unwrap();
    for task in tasks {
        task.await.unwrap();
    }

    let pushed = pushed.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let delivered = delivered.lock().unwrap().clone();
    assert!(pushed.len() > 100, "too little load: {}", pushed.len());
    assert!(!acked.is_empty(), "nothing was acked");
    for (id, times) in &delivered {
        assert_eq!(*times, 1, "message {id} was delivered {times} times");
    }
    // B, still up, has every acknowledged push, once, and every ack.
    let http = reqwest::Client::new();
    let listed: serde_json::Value = http
        .get(format!("{}/v1/queues/q/messages?limit=100000", bases[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = listed["messages"].as_array().unwrap();
    let mut stored = HashMap::new();
    for m in listed {
        let id = m["id"].as_str().unwrap().to_owned();
        assert!(
            stored.insert(id.clone(), m["status"].clone()).is_none(),
            "message {id} is stored twice"
        );
    }
    for id in &pushed {
        assert!(
            stored.contains_key(id),
            "push {id} was answered but is gone"
        );
    }
    for id in &acked {
        assert_eq!(
            stored[id], "processed",
            "acked message {id} is not processed"
        );
    }
    drop(b);
}

/// `opsbox store migrate` (README, "Scaling out"): an SQLite data directory copied into
/// PostgreSQL and served from there, with its users, jobs and their output, waiting
/// messages and event revisions as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sqlite_data_dir_moves_to_postgres_with_store_migrate() {
    let dir = tempfile::tempdir().unwrap();
    scripts(dir.path());
    let old = serve_on(dir.path(), "old", None).await;
    let run = old.client.run("ticks", [("n", "2")]).await.unwrap();
    assert_eq!(run.job.state, JobState::Succeeded);
    let pushed = old
        .client
        .push("worker", "web", vec![text("kept")])
        .await
        .unwrap();
    old.client
        .add_user(opsbox_api::NewUser {
            name: "bob".into(),
            password: "pw".into(),
            role: opsbox_api::Role::Operator,
        })
        .await
        .unwrap();
    let authed = |port: u16| {
        Client::builder(format!("http://127.0.0.1:{port}"))
            .basic_auth("bob", "pw")
            .build()
            .unwrap()
    };
    let revision = authed(old.port).events(0).await.unwrap().current_revision;
    let store = store_url("migrate");
    // Not while the old server has the store open: its later writes would not carry.
    let live = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["store", "migrate", "--from"])
        .arg(dir.path().join("data-old"))
        .args(["--to", &store])
        .output()
        .unwrap();
    assert!(!live.status.success());
    assert!(
        String::from_utf8_lossy(&live.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    drop(old);

    let out = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["store", "migrate", "--from"])
        .arg(dir.path().join("data-old"))
        .args(["--to", &store])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "store migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let new = serve_on(dir.path(), "new", Some(&store)).await;
    let client = authed(new.port);
    let job = client.job(&run.job.name).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let log = client.log(&run.job.name).await.unwrap();
    assert_eq!(log.stdout, ["tick 1", "tick 2"]);
    let pulled = client.pull("worker", PullRequest::default()).await.unwrap();
    assert_eq!(pulled.len(), 1);
    assert_eq!(pulled[0].id, pushed[0].id);
    let page = client.events(revision).await.unwrap();
    assert!(
        page.current_revision > revision,
        "{}",
        page.current_revision
    );
    assert!(page.events.iter().all(|e| e.rev > revision));
    // Without credentials: refused, as on the old server.
    assert!(new.client.jobs(&Default::default()).await.is_err());

    // Back the other way, from a schema that is not there: refused, nothing created.
    let typo = format!("{}x", store);
    let out = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["store", "migrate", "--from", &typo, "--to"])
        .arg(format!("sqlite:{}", dir.path().join("back.db").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no opsbox store"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("back.db").exists());
}
