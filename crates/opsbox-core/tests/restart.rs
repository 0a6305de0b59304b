//! What a new `Core` does with jobs a previous server left queued or running.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use chrono::Utc;
use common::*;
use opsbox_api::JobState;
use opsbox_core::store::{JobRecord, NewEvent};
use opsbox_core::{Core, CoreError};

fn record(name: &str, state: JobState, pid: Option<u32>) -> JobRecord {
    let now = Utc::now();
    let running = state != JobState::Queued;
    JobRecord {
        name: name.into(),
        script: "long".into(),
        state,
        params: BTreeMap::new(),
        node: running.then(|| "local".into()),
        submitted_by: None,
        created_at: now,
        started_at: running.then_some(now),
        finished_at: state.is_terminal().then_some(now),
        exit_code: (state == JobState::Succeeded).then_some(0),
        signal: None,
        reason: None,
        return_values: BTreeMap::new(),
        results: Vec::new(),
        spec: serde_json::json!({}),
        pid,
        server: None,
    }
}

/// Starts `sleep 300 & ; wait` in its own process group, like the runtime does, with
/// `env`; returns the child and the pid of its background sleep.
fn orphan(t: &TestCore, tag: &str, env: &[(&str, &str)]) -> (std::process::Child, i32) {
    let pidfile = t.scratch().join(format!("{tag}.pid"));
    let script = write_script(
        &t.scratch(),
        &format!("{tag}.sh"),
        "",
        &format!(
            "sleep 300 &\necho $! > {}.tmp\nmv {0}.tmp {0}\nwait",
            pidfile.display()
        ),
    );
    let child = std::process::Command::new(script)
        .env_clear()
        .envs(env.iter().copied())
        .env("PATH", "/usr/bin:/bin")
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pidfile.exists() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (child, pid)
}

#[tokio::test]
async fn unfinished_jobs_are_lost_after_a_restart_and_their_processes_reaped() {
    let t = open(&[("long.sh", "", "sleep 300")]).await;
    let store = t.core.store.clone();

    // A crashed server's job whose processes still run, one whose recorded pid now
    // belongs to an unrelated process, a queued one and an ended one.
    let (mut ours, ours_bg) = orphan(&t, "ours", &[("OPSBOX_JOB", "long@1:1:1")]);
    let (mut foreign, foreign_bg) = orphan(&t, "foreign", &[("OPSBOX_JOB", "other@9:9:9")]);
    let jobs = [
        record("long@1:1:1", JobState::Running, Some(ours.id())),
        record("long@1:1:2", JobState::Running, Some(foreign.id())),
        record("long@1:1:3", JobState::Queued, None),
        record("long@1:1:4", JobState::Succeeded, None),
    ];
    for job in &jobs {
        store
            .insert_job(
                job,
                NewEvent::new("job.created", &job.name, serde_json::json!({})),
            )
            .await
            .unwrap();
    }
    let rev = store.current_revision().await.unwrap();
    drop(store);
    let config = t.core.config.as_ref().clone();
    drop(t.core);

    let core = Core::open(config).await.unwrap();
    for name in ["long@1:1:1", "long@1:1:2", "long@1:1:3"] {
        let job = core.jobs.get(name).await.unwrap();
        assert_eq!(job.state, JobState::Lost, "{name}");
        let reason = job.reason.unwrap();
        assert!(reason.contains("server stopped"), "{reason}");
        assert!(job.finished_at.is_some());
        // Lost is terminal: wait answers at once, clean works.
        let (done, _) = core.jobs.wait(name, Duration::ZERO).await.unwrap();
        assert!(done);
    }
    let ended = core.jobs.get("long@1:1:4").await.unwrap();
    assert_eq!(ended.state, JobState::Succeeded);
    assert_eq!(ended.reason, None);

    // One job.finished event per lost job, carrying the lost job.
    let page = core.events.page(rev, 100).await.unwrap();
    let mut finished: Vec<&str> = page
        .events
        .iter()
        .filter(|e| e.kind == "job.finished")
        .map(|e| {
            assert_eq!(e.data["state"], "lost", "{e:?}");
            e.subject.as_str()
        })
        .collect();
    finished.sort();
    assert_eq!(finished, ["long@1:1:1", "long@1:1:2", "long@1:1:3"]);

    // The crashed job's group is gone; the unrelated process is left alone.
    let status = ours.wait().unwrap();
    assert!(!status.success());
    until_dead(ours_bg).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        alive(foreign.id() as i32),
        "an unrelated process was killed"
    );
    assert!(alive(foreign_bg));
    nix_kill_group(foreign.id());
    let _ = foreign.wait();

    core.jobs.clean("long@1:1:1").await.unwrap();
    assert!(matches!(
        core.jobs.get("long@1:1:1").await,
        Err(CoreError::UnknownJob(_))
    ));
    // A second restart finds nothing more to mark.
    assert_eq!(core.jobs.recover().await.unwrap(), 0);
}

/// Kills a process group with the `kill` command (the tests use no unsafe and no nix).
fn nix_kill_group(pgid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_job_running_when_everything_is_dropped_is_lost_on_the_next_open() {
    let root = tempfile::tempdir().unwrap();
    write_script(
        &root.path().join("scripts"),
        "long.sh",
        "",
        "echo up\nexec sleep 300",
    );
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (name, pid) = first.block_on(async {
        let core = Core::open(config(root.path())).await.unwrap();
        let name = core
            .jobs
            .submit("long", params(&[]), Some("carol".into()))
            .await
            .unwrap()
            .job
            .name;
        until_lines(&core, &name, 1).await;
        let record = core.store.get_job(&name).await.unwrap().unwrap();
        assert_eq!(record.state, JobState::Running);
        (name, record.pid.expect("a running job records its pid"))
    });
    // No shutdown: the runtime and everything in it just goes away.
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let core = Core::open(config(root.path())).await.unwrap();
        let job = core.jobs.get(&name).await.unwrap();
        assert_eq!(job.state, JobState::Lost);
        assert!(job.reason.unwrap().contains("server stopped"));
        assert_eq!(job.submitted_by.as_deref(), Some("carol"));
        assert_eq!(core.jobs.output(&name).await.unwrap().stdout, ["up"]);
        let page = core.events.page(0, 100).await.unwrap();
        let kinds: Vec<&str> = page
            .events
            .iter()
            .filter(|e| e.subject == name)
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(kinds, ["job.created", "job.started", "job.finished"]);
        until_dead(pid as i32).await;
    });
}
