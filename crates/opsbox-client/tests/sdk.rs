//! The SDK against a real server in this process (`opsbox_server::Server` on a free
//! loopback port, its own runtime on a thread): every call, the script cache, the
//! streams, the error kinds, and the blocking wrapper.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use opsbox_client::api::{JobState, LogEvent, NewToken, NewUser, Role, Stream};
use opsbox_client::{Client, ClientError, JobFilter, NO_PARAMS};

const ECHO: &str = "#!/bin/sh
# -- jojo --
# description: echo text
# param: text - text to echo
# required: text
# -- jojo --
echo \"$TEXT\"
";

const SLOW: &str = "#!/bin/sh
# -- jojo --
# description: tick COUNT times, PAUSE seconds apart
# param: count - ticks
# param: pause - seconds between ticks
# -- jojo --
i=1
while [ \"$i\" -le \"${COUNT:-3}\" ]; do
    echo \"tick $i\"
    sleep \"${PAUSE:-0.1}\"
    i=$((i + 1))
done
echo done >&2
";

const REPORT: &str = "#!/bin/sh
# -- jojo --
# description: a result file in a folder
# -- jojo --
mkdir -p \"$OPSBOX_RESULTS/out dir\"
printf 'a,b\\n1,2\\n' > \"$OPSBOX_RESULTS/out dir/table 1.csv\"
echo \"jojo_return_value rows=1\"
";

/// A server on its own runtime thread, stopped when dropped.
struct TestServer {
    url: String,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start() -> TestServer {
        Self::start_with(|_| async {})
    }

    /// Starts a server after `prepare` ran on its (empty) data directory.
    fn start_with<F, Fut>(prepare: F) -> TestServer
    where
        F: FnOnce(std::path::PathBuf) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        for (name, text) in [("echo.sh", ECHO), ("slow.sh", SLOW), ("report.sh", REPORT)] {
            write_script(&scripts, name, text);
        }
        let socket = dir.path().join("opsbox.sock");
        let config = opsbox_server::ServerConfig {
            listen: vec!["127.0.0.1:0".into(), format!("unix:{}", socket.display())],
            data: dir.path().join("data"),
            scripts,
            charms: dir.path().join("charms"),
            ..Default::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, url) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                prepare(config.data.clone()).await;
                let server = opsbox_server::Server::bind(config).await.unwrap();
                ready.send(server.local_addrs()[0].to_string()).unwrap();
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let url = url.recv_timeout(Duration::from_secs(30)).unwrap();
        TestServer {
            url,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::builder(&self.url).build().unwrap()
    }

    /// The server's Unix socket, as a client spells it.
    fn unix_url(&self) -> String {
        format!("unix:{}", self.dir.path().join("opsbox.sock").display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_script(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn connect_caches_the_index_and_get_script_refreshes_one_entry() {
    let server = TestServer::start();
    let client = Client::builder(&server.url).connect().await.unwrap();
    let names: Vec<String> = client
        .cached_scripts()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["echo", "report", "slow"]);
    let echo = client.get_script("echo", true).await.unwrap().unwrap();
    assert!(echo.params[0].required);

    // Another client makes the server reload with a new script: the cache is stale...
    write_script(&server.dir.path().join("scripts"), "late.sh", ECHO);
    server.client().reload().await.unwrap();
    assert_eq!(client.get_script("late", true).await.unwrap(), None);
    // ...until asked without it, which refreshes that entry.
    assert!(client.get_script("late", false).await.unwrap().is_some());
    assert!(client.get_script("late", true).await.unwrap().is_some());

    std::fs::remove_file(server.dir.path().join("scripts/late.sh")).unwrap();
    server.client().reload().await.unwrap();
    assert_eq!(client.get_script("late", false).await.unwrap(), None);
    assert_eq!(client.get_script("late", true).await.unwrap(), None);

    // reload() refreshes the whole cache.
    write_script(&server.dir.path().join("scripts"), "later.sh", ECHO);
    let report = client.reload().await.unwrap();
    assert_eq!(report.scripts, 4);
    assert!(client.cached_scripts().iter().any(|s| s.name == "later"));
}

#[tokio::test]
async fn runs_and_the_errors_callers_match_on() {
    let server = TestServer::start();
    let client = server.client();

    let run = client.run("echo", [("text", "hi there")]).await.unwrap();
    assert_eq!(run.job.state, JobState::Succeeded);
    assert_eq!(run.output.unwrap().stdout, ["hi there"]);

    let error = client.run("nope", NO_PARAMS).await.unwrap_err();
    assert!(error.is_not_found(), "{error:?}");
    assert_eq!(error.to_string(), "no script named 'nope'");
    assert!(matches!(
        client.run("echo", NO_PARAMS).await,
        Err(ClientError::BadRequest(_))
    ));
    assert!(matches!(
        client.job("echo@0:0:0").await,
        Err(ClientError::NotFound(_))
    ));

    let job = client
        .run_async("slow", [("count", "50"), ("pause", "1")])
        .await
        .unwrap();
    assert!(!job.state.is_terminal());
    let error = client.clean(&job.name).await.unwrap_err();
    assert!(matches!(error, ClientError::Conflict(_)), "{error:?}");
    assert_eq!(error.status(), Some(409));
    client.kill(&job.name).await.unwrap();
    let waited = client.wait(&job.name, None).await.unwrap();
    assert!(waited.done);
    assert_eq!(waited.job.state, JobState::Killed);
    client.clean(&job.name).await.unwrap();

    let refused = Client::builder("http://127.0.0.1:1").build().unwrap();
    let error = refused.info().await.unwrap_err();
    assert!(matches!(error, ClientError::Transport(_)), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn follow_log_streams_chunks_then_the_end() {
    let server = TestServer::start();
    let client = server.client();
    let job = client
        .run_async("slow", [("count", "3"), ("pause", "0.2")])
        .await
        .unwrap();
    let events: Vec<LogEvent> = client
        .follow_log(&job.name)
        .map(|e| e.unwrap())
        .collect()
        .await;
    let stdout: String = events
        .iter()
        .filter_map(|e| match e {
            LogEvent::Output(chunk) if chunk.stream == Stream::Stdout => Some(chunk.data.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout, "tick 1\ntick 2\ntick 3\n");
    match events.last().unwrap() {
        LogEvent::End(job) => assert_eq!(job.state, JobState::Succeeded),
        other => panic!("the last event is not the end: {other:?}"),
    }
    // Resuming after chunk N replays only what follows.
    let first_seq = match &events[0] {
        LogEvent::Output(chunk) => chunk.seq,
        other => panic!("{other:?}"),
    };
    let rest: Vec<LogEvent> = client
        .follow_log_since(&job.name, first_seq)
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(rest.len(), events.len() - 1);

    let log = client.log(&job.name).await.unwrap();
    assert_eq!(log.stdout, ["tick 1", "tick 2", "tick 3"]);
    assert_eq!(log.stderr, ["done"]);
    assert_eq!(client.spec(&job.name).await.unwrap().script, "slow");

    let error = client
        .follow_log("slow@0:0:0")
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_not_found(), "{error:?}");
}

#[tokio::test]
async fn wait_honours_its_own_deadline() {
    let server = TestServer::start();
    let client = server.client();
    let job = client
        .run_async("slow", [("count", "30"), ("pause", "1")])
        .await
        .unwrap();
    let started = Instant::now();
    let waited = client
        .wait(&job.name, Some(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(!waited.done);
    assert!(started.elapsed() < Duration::from_secs(5));
    let running = client
        .jobs(&JobFilter::default().state(JobState::Running))
        .await
        .unwrap();
    assert!(running.iter().any(|j| j.name == job.name));
    client.kill(&job.name).await.unwrap();
}

#[tokio::test]
async fn a_server_on_a_unix_socket_is_reached_with_a_unix_url() {
    let server = TestServer::start();
    let client = Client::builder(server.unix_url()).connect().await.unwrap();
    assert_eq!(client.server(), server.unix_url());
    let run = client.run("report", NO_PARAMS).await.unwrap();
    assert_eq!(run.job.state, JobState::Succeeded);
    let path = &client.results(&run.job.name).await.unwrap().files[0].path;
    let bytes = client.download_result(&run.job.name, path).await.unwrap();
    assert_eq!(&bytes[..], b"a,b\n1,2\n");
    // The same job, seen over TCP: one server.
    let over_tcp = server.client().job(&run.job.name).await.unwrap();
    assert_eq!(over_tcp, run.job);
    let missing = Client::builder(format!(
        "unix:{}",
        server.dir.path().join("nobody.sock").display()
    ))
    .connect()
    .await
    .unwrap_err();
    assert!(!missing.is_not_found(), "{missing:?}");
}

#[tokio::test]
async fn results_with_awkward_paths_download() {
    let server = TestServer::start();
    let client = server.client();
    let run = client.run("report", NO_PARAMS).await.unwrap();
    assert_eq!(run.job.return_values["rows"], "1");
    let results = client.results(&run.job.name).await.unwrap();
    assert_eq!(results.files.len(), 1);
    let path = &results.files[0].path;
    assert_eq!(path, "out dir/table 1.csv");
    let bytes = client.download_result(&run.job.name, path).await.unwrap();
    assert_eq!(&bytes[..], b"a,b\n1,2\n");
    assert!(client
        .download_result(&run.job.name, "missing.csv")
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn events_page_and_watch() {
    let server = TestServer::start();
    let client = server.client();
    client.run("echo", [("text", "one")]).await.unwrap();
    let page = client.events(0).await.unwrap();
    assert!(page.events.len() >= 3);
    assert_eq!(page.current_revision, page.events.last().unwrap().rev);

    let mut watch = std::pin::pin!(client.watch(Some(0)));
    let mut revisions = Vec::new();
    for _ in 0..page.events.len() {
        revisions.push(watch.next().await.unwrap().unwrap().rev);
    }
    assert_eq!(
        revisions,
        page.events.iter().map(|e| e.rev).collect::<Vec<_>>()
    );
    // Live: an event that happens after the replay.
    client.run("echo", [("text", "two")]).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(next.rev > page.current_revision);
    assert_eq!(next.kind, "job.created");
}

#[tokio::test]
async fn credentials_roles_users_and_tokens() {
    let server = TestServer::start_with(|data| async move {
        let store = opsbox_core::Core::open_store(&data).await.unwrap();
        opsbox_core::identities::Identities::new(store)
            .add_user(NewUser {
                name: "alice".into(),
                password: "wonderland".into(),
                role: Role::Admin,
            })
            .await
            .unwrap();
    });
    let anonymous = server.client();
    assert!(matches!(
        anonymous.info().await,
        Err(ClientError::Unauthorized(_))
    ));
    let wrong = Client::builder(&server.url)
        .basic_auth("alice", "nope")
        .build()
        .unwrap();
    assert!(matches!(
        wrong.info().await,
        Err(ClientError::Unauthorized(_))
    ));

    let admin = Client::builder(&server.url)
        .basic_auth("alice", "wonderland")
        .connect()
        .await
        .unwrap();
    assert_eq!(admin.info().await.unwrap().you.as_deref(), Some("alice"));

    let created = admin
        .create_token(NewToken {
            role: Role::Reader,
            nodes: vec![],
            description: Some("dashboard".into()),
        })
        .await
        .unwrap();
    let reader = Client::builder(&server.url)
        .token(&created.secret)
        .build()
        .unwrap();
    reader.info().await.unwrap();
    let error = reader.run("echo", [("text", "x")]).await.unwrap_err();
    assert!(matches!(error, ClientError::Forbidden(_)), "{error:?}");
    assert!(admin
        .tokens()
        .await
        .unwrap()
        .iter()
        .any(|t| t.id == created.token.id));
    admin.revoke_token(&created.token.id).await.unwrap();
    assert!(matches!(
        reader.info().await,
        Err(ClientError::Unauthorized(_))
    ));

    admin
        .add_user(NewUser {
            name: "bob".into(),
            password: "builder".into(),
            role: Role::Operator,
        })
        .await
        .unwrap();
    let error = admin
        .add_user(NewUser {
            name: "bob".into(),
            password: "again".into(),
            role: Role::Operator,
        })
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Conflict(_)), "{error:?}");
    let users = admin.users().await.unwrap();
    assert_eq!(users.len(), 2);
    admin.remove_user("bob").await.unwrap();
    assert!(admin.remove_user("bob").await.unwrap_err().is_not_found());
}

#[test]
fn the_blocking_client_outside_any_runtime() {
    let server = TestServer::start();
    let client = opsbox_client::blocking::Client::builder(&server.url)
        .connect()
        .unwrap();
    assert_eq!(client.cached_scripts().len(), 3);
    let run = client.run("echo", [("text", "blocking")]).unwrap();
    assert_eq!(run.output.unwrap().stdout, ["blocking"]);

    let job = client
        .run_async("slow", [("count", "2"), ("pause", "0.1")])
        .unwrap();
    let events: Vec<LogEvent> = client.follow_log(&job.name).map(|e| e.unwrap()).collect();
    assert!(matches!(events.last(), Some(LogEvent::End(_))));
    let waited = client
        .wait(&job.name, Some(Duration::from_secs(10)))
        .unwrap();
    assert!(waited.done);

    let first = client.watch(Some(0)).next().unwrap().unwrap();
    assert_eq!(first.rev, 1);
    assert!(client.job("x@1:2:3").unwrap_err().is_not_found());
}
