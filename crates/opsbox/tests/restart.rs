//! A server killed with SIGKILL mid-job, then started again on the same data directory:
//! the job is marked lost with a reason, the event says so, and the job's processes,
//! which the dead server could not stop, are killed by the new one. The same holds for
//! the tasks of a fan-out job on the server's own node.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

mod serving;
use serving::{alive, free_port, serve};

#[tokio::test]
async fn a_crash_marks_running_jobs_lost_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let (data, scripts) = (dir.path().join("data"), dir.path().join("scripts"));
    std::fs::create_dir_all(&scripts).unwrap();
    let script = scripts.join("long.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nsleep 300 &\necho $! > \"$OPSBOX_RESULTS/child.pid\"\necho $$ > \"$OPSBOX_RESULTS/main.pid\"\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let mut first = serve(&data, &scripts, port).await;
    let run: serde_json::Value = http
        .post(format!("{base}/v1/scripts/long/run?wait=false"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let name = run["job"]["name"].as_str().unwrap().to_owned();
    let (main_pid, child_pid) = started_pids(&data.join("results").join(&name)).await;

    // SIGKILL: the server gets no chance to stop its job.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(
        alive(main_pid) && alive(child_pid),
        "the job's processes outlive a crash"
    );

    let _second = serve(&data, &scripts, port).await;
    let job: serde_json::Value = http
        .get(format!(
            "{base}/v1/jobs/{}",
            name.replace('@', "%40").replace(':', "%3A")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "lost");
    assert_eq!(
        job["reason"],
        "the server stopped while the job was queued or running"
    );
    until_gone(&[main_pid, child_pid], "processes of the lost job").await;
    let events: serde_json::Value = http
        .get(format!("{base}/v1/events?since=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "job.finished");
    assert_eq!(last["subject"], name.as_str());
    assert_eq!(last["data"]["state"], "lost");
}

#[tokio::test]
async fn a_crash_leaves_no_task_of_the_local_node_running() {
    let dir = tempfile::tempdir().unwrap();
    let (data, scripts, marks) = (
        dir.path().join("data"),
        dir.path().join("scripts"),
        dir.path().join("marks"),
    );
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::create_dir_all(&marks).unwrap();
    let script = scripts.join("long.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep 300 &\necho $! > {m}/child.pid\necho $$ > {m}/main.pid\nwait\n",
            m = marks.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let mut first = serve(&data, &scripts, port).await;
    let submitted = http
        .post(format!("{base}/v1/jobs"))
        .json(&serde_json::json!({"map": "long", "inputs": ["one"]}))
        .send()
        .await
        .unwrap();
    assert!(submitted.status().is_success(), "{submitted:?}");
    let (main_pid, child_pid) = started_pids(&marks).await;

    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(
        alive(main_pid) && alive(child_pid),
        "the task's processes outlive a crash"
    );
    let _second = serve(&data, &scripts, port).await;
    until_gone(&[main_pid, child_pid], "processes of the local node's task").await;
}

/// Waits until a task has written `main.pid` and `child.pid` into `dir`, then reads them.
async fn started_pids(dir: &std::path::Path) -> (i32, i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("child.pid").exists() || !dir.join("main.pid").exists() {
        assert!(Instant::now() < deadline, "the task did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = |file: &str| -> i32 {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (pid("main.pid"), pid("child.pid"))
}

/// Waits until none of `pids` is alive; `what` names them in the failure.
async fn until_gone(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "{what} survived the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
