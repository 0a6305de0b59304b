//! The `opsbox` client commands end to end: each test starts the real binary as a
//! server (`opsbox serve` on a free loopback port, with its own data and scripts
//! directories) and runs CLI commands against it as subprocesses, checking what they
//! print and their exit status.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_opsbox");

/// Scripts every test server has.
const SCRIPTS: &[(&str, &str)] = &[
    (
        "echo.sh",
        "#!/bin/sh
# -- jojo --
# description: echo text
# param: text - text to echo
# required: text
# tags: demo
# -- jojo --
echo \"$TEXT\"
",
    ),
    (
        "exit_with.sh",
        "#!/bin/sh
# -- jojo --
# description: print to both streams, then exit with CODE
# param: code - exit code
# -- jojo --
echo out
echo err >&2
exit \"${CODE:-0}\"
",
    ),
    (
        "slow.sh",
        "#!/bin/sh
# -- jojo --
# description: print COUNT ticks, PAUSE seconds apart
# param: count - how many ticks
# param: pause - seconds between ticks
# -- jojo --
n=\"${COUNT:-3}\"
i=1
while [ \"$i\" -le \"$n\" ]; do
    echo \"tick $i\"
    sleep \"${PAUSE:-0.2}\"
    i=$((i + 1))
done
echo finished >&2
",
    ),
    (
        "report.sh",
        "#!/bin/sh
# -- jojo --
# description: write a result file and a return value
# -- jojo --
printf 'line one\\nline two\\n' > \"$OPSBOX_RESULTS/report.txt\"
echo \"jojo_return_value answer=42\"
echo reported
",
    ),
];

/// A running `opsbox serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        for (name, text) in SCRIPTS {
            write_script(&scripts, name, text);
        }
        Self::start_in(dir)
    }

    /// Starts a server on `dir/data` with the scripts of `dir/scripts`.
    fn start_in(dir: tempfile::TempDir) -> Server {
        let port = free_port();
        let child = spawn_serve(dir.path(), port);
        let mut server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        server.wait_ready();
        server
    }

    /// Kills the server, as a crash would (its database keeps its write-ahead log).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same data and port.
    fn restart(&mut self) {
        self.kill();
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        self.child = spawn_serve(self.dir.path(), port);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let client = opsbox_client::blocking::Client::builder(&self.url)
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.info() {
                Ok(_) | Err(opsbox_client::ClientError::Unauthorized(_)) => return,
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!(
                            "opsbox serve exited ({status}) before answering:\n{}",
                            self.log()
                        );
                    }
                    if Instant::now() > deadline {
                        panic!("opsbox serve did not answer in 30 s ({e}):\n{}", self.log());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn scripts(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    /// A CLI command against this server, with no credentials from the environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = client_command(self.dir.path());
        command.arg("--server").arg(&self.url).args(args);
        command
    }

    fn cli(&self, args: &[&str]) -> Run {
        Run::of(
            self.command(args).stdin(Stdio::null()).output().unwrap(),
            args,
        )
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.cli(args).success().stdout
    }

    /// Submits a run with `--async`; the job name.
    fn submit(&self, args: &[&str]) -> String {
        let mut all = vec!["scripts", "run"];
        all.extend_from_slice(args);
        all.push("--async");
        let name = self.ok(&all).trim().to_string();
        assert!(name.contains('@'), "not a job name: {name:?}");
        name
    }
}

fn spawn_serve(dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.join("data"))
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .arg("--charms")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/charms"
        ))
        .env_remove("OPSBOX_CONFIG")
        .env_remove("OPSBOX_LISTEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start opsbox serve")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `opsbox` with a clean environment: no OPSBOX_* settings and no user config file.
fn client_command(home: &Path) -> Command {
    let mut command = Command::new(BIN);
    for name in [
        "OPSBOX_SERVER",
        "OPSBOX_USER",
        "OPSBOX_PASSWORD",
        "OPSBOX_TOKEN",
        "OPSBOX_CLIENT_CONFIG",
        "RUST_LOG",
    ] {
        command.env_remove(name);
    }
    command
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"));
    command
}

fn write_script(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a CLI command did.
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(output: Output, args: &[&str]) -> Run {
        Run {
            what: format!("opsbox {}", args.join(" ")),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn code(&self, expected: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(expected),
            "`{}` exited {:?}, expected {expected}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    fn success(self) -> Run {
        self.code(0);
        self
    }

    fn stdout_has(&self, text: &str) -> &Run {
        assert!(
            self.stdout.contains(text),
            "stdout of `{}` lacks {text:?}:\n{}\n--- stderr\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }

    fn stderr_has(&self, text: &str) -> &Run {
        assert!(
            self.stderr.contains(text),
            "stderr of `{}` lacks {text:?}:\n{}\n--- stdout\n{}",
            self.what,
            self.stderr,
            self.stdout
        );
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}):\n{}", self.what, self.stdout))
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn scripts_list_and_show() {
    let server = Server::start();
    server
        .cli(&["scripts", "list"])
        .code(0)
        .stdout_has("NAME")
        .stdout_has("echo")
        .stdout_has("text*")
        .stdout_has("echo text")
        .stdout_has("slow");

    server
        .cli(&["scripts", "show", "echo"])
        .code(0)
        .stdout_has("description:  echo text")
        .stdout_has("required")
        .stdout_has("text to echo")
        .stdout_has("tags:         demo");
    let shown = server.cli(&["scripts", "show", "slow", "--json"]).json();
    assert_eq!(shown["params"].as_array().unwrap().len(), 2);

    server
        .cli(&["scripts", "show", "nope"])
        .code(1)
        .stderr_has("error: no script named 'nope'");
    let listed = server.cli(&["--json", "scripts", "list"]).json();
    assert_eq!(listed["scripts"].as_array().unwrap().len(), SCRIPTS.len());
}

#[test]
fn run_prints_the_output_and_exits_with_the_scripts_code() {
    let server = Server::start();
    let run = server.cli(&["scripts", "run", "echo", "-p", "text=hello world"]);
    run.code(0);
    assert_eq!(run.stdout, "hello world\n");
    run.stderr_has("succeeded");

    server
        .cli(&["scripts", "run", "exit_with", "-p", "code=3"])
        .code(3)
        .stdout_has("out")
        .stderr_has("err")
        .stderr_has("failed");

    // Refusals of the server: exit 1 with its message.
    server
        .cli(&["scripts", "run", "echo"])
        .code(1)
        .stderr_has("text");
    server
        .cli(&["scripts", "run", "echo", "-p", "text=a", "-p", "bogus=1"])
        .code(1)
        .stderr_has("bogus");
    server
        .cli(&["scripts", "run", "missing"])
        .code(1)
        .stderr_has("no script named 'missing'");
    // A malformed parameter is a usage error.
    server
        .cli(&["scripts", "run", "echo", "-p", "text"])
        .code(2);

    let json = server
        .cli(&["scripts", "run", "exit_with", "-p", "code=5", "--json"])
        .code(5)
        .json();
    assert_eq!(json["job"]["state"], "failed");
    assert_eq!(json["output"]["stdout"][0], "out");
}

#[test]
fn async_run_then_the_jobs_commands() {
    let server = Server::start();
    let name = server.submit(&["slow", "-p", "count=2", "-p", "pause=0.1"]);

    server.cli(&["jobs", "wait", &name]).code(0);
    server
        .cli(&["jobs", "info", &name])
        .code(0)
        .stdout_has("state:")
        .stdout_has("succeeded")
        .stdout_has("count=2");
    server
        .cli(&["jobs", "spec", &name])
        .code(0)
        .stdout_has("script:")
        .stdout_has("slow")
        .stdout_has("slow.sh");
    let log = server.cli(&["jobs", "log", &name]);
    log.code(0);
    assert_eq!(log.stdout, "tick 1\ntick 2\n");
    log.stderr_has("finished");

    server
        .cli(&["jobs", "list", "--script", "slow"])
        .code(0)
        .stdout_has(&name)
        .stdout_has("succeeded");
    let listed = server
        .cli(&[
            "jobs",
            "list",
            "--state",
            "succeeded",
            "--limit",
            "1",
            "--json",
        ])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    server.cli(&["jobs", "list", "--state", "bogus"]).code(2);
    server
        .cli(&["jobs", "info", "slow@0:0:0"])
        .code(1)
        .stderr_has("no job named");
}

#[test]
fn follow_streams_the_output_live_and_exits_with_the_jobs_code() {
    let server = Server::start();
    let run = server.cli(&[
        "scripts",
        "run",
        "slow",
        "-p",
        "count=3",
        "-p",
        "pause=0.2",
        "--follow",
    ]);
    run.code(0);
    assert_eq!(run.stdout, "tick 1\ntick 2\ntick 3\n");
    run.stderr_has("finished").stderr_has("succeeded");

    server
        .cli(&["scripts", "run", "exit_with", "-p", "code=4", "--follow"])
        .code(4)
        .stdout_has("out")
        .stderr_has("err");

    // Lines really arrive while the job runs: the first tick is read long before the end.
    let mut child = server
        .command(&[
            "scripts", "run", "slow", "-p", "count=6", "-p", "pause=1", "--follow",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let lines = read_lines(child.stdout.take().unwrap());
    let first = lines.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first, "tick 1");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "output was not live: the first line came with the end"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // jobs log --follow of a finished job replays it and ends.
    let name = server.submit(&["exit_with", "-p", "code=0"]);
    server.cli(&["jobs", "wait", &name]).code(0);
    server
        .cli(&["jobs", "log", &name, "--follow"])
        .code(0)
        .stdout_has("out");
}

#[test]
fn wait_times_out_with_124_and_kill_and_clean() {
    let server = Server::start();
    let name = server.submit(&["slow", "-p", "count=100", "-p", "pause=1"]);

    let started = Instant::now();
    server
        .cli(&["jobs", "wait", &name, "--timeout", "0.5"])
        .code(124)
        .stderr_has("timed out");
    assert!(started.elapsed() < Duration::from_secs(10));

    server
        .cli(&["jobs", "clean", &name])
        .code(1)
        .stderr_has("still");

    server
        .cli(&["jobs", "kill", &name])
        .code(0)
        .stdout_has(&name);
    server
        .cli(&["jobs", "wait", &name])
        .code(1)
        .stderr_has("killed");
    let info = server.cli(&["jobs", "info", &name, "--json"]).json();
    assert_eq!(info["state"], "killed");

    server
        .cli(&["jobs", "clean", &name])
        .code(0)
        .stdout_has("cleaned");
    server
        .cli(&["jobs", "info", &name])
        .code(1)
        .stderr_has("no job named");
}

#[test]
fn results_are_listed_and_downloaded() {
    let server = Server::start();
    let run = server
        .cli(&["scripts", "run", "report", "--json"])
        .success()
        .json();
    let name = run["job"]["name"].as_str().unwrap().to_string();
    assert_eq!(run["job"]["return_values"]["answer"], "42");

    server
        .cli(&["jobs", "results", &name])
        .code(0)
        .stdout_has("report.txt")
        .stdout_has("18");

    let target = server.dir.path().join("downloaded.txt");
    server
        .cli(&[
            "jobs",
            "results",
            &name,
            "--download",
            "report.txt",
            "--output",
            target.to_str().unwrap(),
        ])
        .code(0);
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "line one\nline two\n"
    );
    let to_stdout = server.cli(&["jobs", "results", &name, "--download", "report.txt"]);
    to_stdout.code(0);
    assert_eq!(to_stdout.stdout, "line one\nline two\n");
    server
        .cli(&["jobs", "results", &name, "--download", "nope.txt"])
        .code(1);
}

#[test]
fn watch_prints_events_live_with_their_revisions() {
    let server = Server::start();
    server.ok(&["scripts", "run", "echo", "-p", "text=one"]);

    let mut child = server
        .command(&["watch", "--since", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = read_lines(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    // The past events first, then one that happens while watching.
    for _ in 0..3 {
        seen.push(lines.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    server.ok(&["scripts", "run", "echo", "-p", "text=two"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().filter(|l| l.contains("job.finished")).count() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("the second run was not watched; saw:\n{}", seen.join("\n")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    assert!(seen[0].trim_start().starts_with("1 "), "{}", seen[0]);
    assert!(seen[0].contains("job.created"), "{}", seen[0]);
    let revisions: Vec<u64> = seen
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions out of order: {revisions:?}"
    );

    // --json: one Event document per line.
    let mut child = server
        .command(&["watch", "--since", "1", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = read_lines(child.stdout.take().unwrap());
    let first: serde_json::Value =
        serde_json::from_str(&lines.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(first["rev"], 2);
}

#[test]
fn reload_picks_up_new_scripts() {
    let server = Server::start();
    server.cli(&["scripts", "show", "late"]).code(1);
    write_script(
        &server.scripts(),
        "late.sh",
        "#!/bin/sh\n# -- jojo --\n# description: added later\n# -- jojo --\necho late\n",
    );
    server
        .cli(&["reload"])
        .code(0)
        .stdout_has(&format!("reloaded: {} scripts", SCRIPTS.len() + 1));
    server
        .cli(&["scripts", "show", "late"])
        .code(0)
        .stdout_has("added later");
    let run = server.cli(&["scripts", "run", "late"]);
    run.code(0);
    assert_eq!(run.stdout, "late\n");
}

#[test]
fn info_shows_the_server() {
    let server = Server::start();
    server
        .cli(&["info"])
        .code(0)
        .stdout_has("version:")
        .stdout_has(env!("CARGO_PKG_VERSION"))
        .stdout_has("anonymous");
    let info = server.cli(&["info", "--json"]).json();
    assert_eq!(info["auth_required"], false);

    // Nothing listening: a clear error, exit 1.
    let run = Run::of(
        client_command(server.dir.path())
            .args([
                "info",
                "--server",
                &format!("http://127.0.0.1:{}", free_port()),
            ])
            .output()
            .unwrap(),
        &["info"],
    );
    run.code(1);
    run.stderr_has("error: cannot reach the server");
}

#[test]
fn users_and_tokens_on_a_data_dir_then_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    write_script(&dir.path().join("scripts"), SCRIPTS[0].0, SCRIPTS[0].1);
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_string();
    let offline = |args: &[&str], stdin: &str| -> Run {
        let mut child = client_command(dir.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        Run::of(child.wait_with_output().unwrap(), args)
    };

    offline(
        &[
            "users",
            "add",
            "alice",
            "--password-stdin",
            "--role",
            "admin",
            "--data",
            &data_arg,
        ],
        "wonderland\n",
    )
    .code(0)
    .stdout_has("added user alice");
    offline(&["users", "add", "bob", "--data", &data_arg], "pw\n").code(2);
    offline(&["users", "--data", &data_arg, "list"], "")
        .code(0)
        .stdout_has("alice")
        .stdout_has("admin");
    let created = offline(
        &[
            "tokens",
            "create",
            "--role",
            "reader",
            "--description",
            "ci",
            "--data",
            &data_arg,
        ],
        "",
    );
    created.code(0);
    let secret = created.stdout.trim().to_string();
    assert!(!secret.is_empty());
    let tokens = offline(&["tokens", "list", "--data", &data_arg, "--json"], "").json();
    let id = tokens[0]["id"].as_str().unwrap().to_string();
    assert!(secret.contains(&id), "secret {secret} is not of token {id}");
    assert_eq!(tokens[0]["description"], "ci");

    // The server on that data dir now requires credentials.
    let server = Server::start_in(dir);
    server.cli(&["info"]).code(1).stderr_has("--user");
    server
        .cli(&["info", "--user", "alice", "--password", "wonderland"])
        .code(0)
        .stdout_has("alice");
    // A wrong password is not the same as none; a user without one is caught at once.
    server
        .cli(&["info", "--user", "alice", "--password", "wrong"])
        .code(1)
        .stderr_has("not accepted");
    server
        .cli(&["info", "--user", "alice"])
        .code(1)
        .stderr_has("has no password");
    server
        .cli(&["info", "--token", &secret])
        .code(0)
        .stdout_has("required");
    // Credentials from the client config file.
    let config = server.dir.path().join("client.toml");
    std::fs::write(&config, "user = \"alice\"\npassword = \"wonderland\"\n").unwrap();
    server
        .cli(&["info", "--client-config", config.to_str().unwrap()])
        .code(0)
        .stdout_has("alice");
    // A reader may not run scripts; the server says why.
    server
        .cli(&["--token", &secret, "scripts", "run", "echo", "-p", "text=x"])
        .code(1);

    let admin = ["--user", "alice", "--password", "wonderland"];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(admin.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run_as_admin = |args: &[&str], stdin: &str| -> Run {
        let all = with(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut child = server
            .command(&all)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        Run::of(child.wait_with_output().unwrap(), &all)
    };
    run_as_admin(
        &[
            "users",
            "add",
            "carol",
            "--password-stdin",
            "--role",
            "reader",
        ],
        "c4rol\n",
    )
    .code(0);
    run_as_admin(&["users", "list"], "")
        .code(0)
        .stdout_has("carol")
        .stdout_has("reader");
    run_as_admin(&["users", "remove", "carol"], "").code(0);
    run_as_admin(&["tokens", "revoke", &id], "").code(0);
    server.cli(&["info", "--token", &secret]).code(1);
    let created = run_as_admin(
        &["tokens", "create", "--role", "operator", "--node", "n1"],
        "",
    );
    created.code(0);
    run_as_admin(&["tokens", "list"], "")
        .code(0)
        .stdout_has("operator")
        .stdout_has("n1");
}

/// Lines of a child's output, read on a thread so the test can time out.
fn read_lines(stdout: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

#[test]
fn model_and_backups_commands() {
    let mut server = Server::start();
    server
        .cli(&["model", "deploy", "cs:precise/mysql", "db"])
        .success()
        .stdout_has("deployed db (cs:precise/mysql) with 1 unit(s)");
    server
        .cli(&[
            "model",
            "deploy",
            "wordpress",
            "blog",
            "--config",
            "engine=apache",
        ])
        .success();
    server
        .cli(&["model", "add-relation", "blog", "db"])
        .success()
        .stdout_has("related blog:db db:db over mysql");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.cli(&["model", "status", "--json"]).success().json();
        let units = status["units"].as_array().unwrap().clone();
        if units.len() == 2 && units.iter().all(|u| u["status"] == "started") {
            break;
        }
        assert!(Instant::now() < deadline, "units never started: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
        .cli(&["model", "status"])
        .success()
        .stdout_has("blog/0  started")
        .stdout_has("blog:db db:db");
    server
        .cli(&["model", "config", "blog"])
        .success()
        .stdout_has("apache");
    server
        .cli(&["model", "config", "blog", "colour=red"])
        .code(1)
        .stderr_has("unknown option \"colour\"");
    server
        .cli(&["model", "remove-unit", "blog"])
        .code(1)
        .stderr_has("not a unit name");
    server
        .cli(&["model", "constraints", "blog", "cpu-cores=4"])
        .success()
        .stdout_has("cpu-cores=4");
    // No https listener: no jenv, and a message that says what to do.
    let home = server.dir.path().join("juju");
    server
        .cli(&["model", "jenv", "x", "--juju-home", home.to_str().unwrap()])
        .code(1)
        .stderr_has("https://");

    server
        .cli(&["backups", "create", "--notes", "before"])
        .success()
        .stdout_has("created backup");
    let list = server.cli(&["backups", "list", "--json"]).success().json();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let file = server.dir.path().join("copy.db");
    server
        .cli(&["backups", "download", &id, "-o", file.to_str().unwrap()])
        .success();
    assert!(std::fs::read(&file)
        .unwrap()
        .starts_with(b"SQLite format 3\0"));
    server.cli(&["backups", "remove", &id]).success();
    server.cli(&["backups", "remove", &id]).code(1);

    // Restore: refused while the server runs; after a crash (the old database keeps its
    // write-ahead log) the server starts on the restored store, without what came later.
    let data = server.dir.path().join("data");
    let restore = [
        "backups",
        "restore",
        file.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    server.cli(&restore).code(1).stderr_has("stop the server");
    server
        .cli(&["model", "deploy", "cs:precise/mysql", "later"])
        .success();
    server.kill();
    server
        .cli(&restore)
        .success()
        .stdout_has("restored")
        .stdout_has("opsbox.db.before-restore");
    server.restart();
    let status = server.cli(&["model", "status", "--json"]).success().json();
    let apps: Vec<&str> = status["applications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(
        apps.contains(&"blog") && !apps.contains(&"later"),
        "{status:#}"
    );
    let bad = server.dir.path().join("bad.db");
    std::fs::write(&bad, "not a database").unwrap();
    server.kill();
    server
        .cli(&[
            "backups",
            "restore",
            bad.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .code(1)
        .stderr_has("not");
}

/// A server on a non-loopback address with no users refuses to start, and says how to
/// go on; `serve --insecure` (or OPSBOX_INSECURE_LISTEN=1) lets it.
#[test]
fn serve_beyond_loopback_needs_a_user_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str], env: Option<&str>| {
        let port = free_port();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", &format!("0.0.0.0:{port}"), "--data"])
            .arg(dir.path().join("data"))
            .args(extra)
            .env_remove("OPSBOX_CONFIG")
            .env_remove("OPSBOX_LISTEN")
            .env_remove("OPSBOX_INSECURE_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(value) = env {
            command.env("OPSBOX_INSECURE_LISTEN", value);
        }
        let mut child = command.spawn().unwrap();
        // Started: it answers on loopback. Refused: it exits with its message.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                return (false, format!("{status}: {err}"));
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let _ = child.kill();
                let _ = child.wait();
                return (true, String::new());
            }
            assert!(Instant::now() < deadline, "neither started nor refused");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (started, message) = serve(&[], None);
    assert!(!started);
    assert!(message.contains("--insecure"), "{message}");
    assert!(serve(&["--insecure"], None).0);
    assert!(serve(&[], Some("1")).0);
    assert!(!serve(&[], Some("0")).0);
}

/// `opsbox serve` with relative directories (the defaults are `./data` and
/// `./examples/scripts`): result files and tasks on the server's own node work, though
/// scripts run in their own directory.
#[test]
fn relative_data_and_scripts_directories_work() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    write_script(
        &scripts,
        "keep.sh",
        "#!/bin/sh\n# -- jojo --\n# description: keeps a result\n# -- jojo --\necho kept > \"$OPSBOX_RESULTS/out.txt\"\necho \"in $INPUT\"\n",
    );
    let port = free_port();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--data",
            "data",
            "--scripts",
            "scripts",
            "--local-slots",
            "1",
        ])
        .env_remove("OPSBOX_CONFIG")
        .env_remove("OPSBOX_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "opsbox serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |args: &[&str]| {
        let mut command = client_command(dir.path());
        command.arg("--server").arg(&url).args(args);
        Run::of(command.stdin(Stdio::null()).output().unwrap(), args)
    };
    let name = cli(&["scripts", "run", "keep", "--async"])
        .success()
        .stdout
        .trim()
        .to_string();
    cli(&["jobs", "wait", &name]).success();
    cli(&["jobs", "results", &name])
        .success()
        .stdout_has("out.txt");
    cli(&["jobs", "submit", "--map", "keep", "--input", "a", "--wait"]).success();
    cli(&["scripts", "run", "keep", "--node", "local"])
        .success()
        .stdout_has("in");
    let _ = child.kill();
    let _ = child.wait();
}
