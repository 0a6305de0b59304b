//! The scheduler on the server's own node, in process: fairness between jobs, progress,
//! failure limits and kill, against a real store. Agents over the network are tested in
//! `crates/opsbox/tests/agents.rs`.

mod common;

use common::{open_with, until_state};
use opsbox_api::{FanoutRequest, JobState, TaskState};

const BLOCK: &str = "# -- jojo --\n# description: sleep a little\n# -- jojo --\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_take_turns_so_a_small_job_is_not_starved_by_a_big_one() {
    let t = open_with(&[("nap.sh", BLOCK, "sleep 0.05\necho $INPUT")], |c| {
        c.nodes.local_slots = 1;
    })
    .await;
    let nodes = &t.core.nodes;
    let big = nodes
        .submit(
            FanoutRequest {
                map: "nap".into(),
                inputs: (0..30).map(|i| format!("big{i}")).collect(),
                ..FanoutRequest::default()
            },
            None,
        )
        .await
        .unwrap();
    let small = nodes
        .submit(
            FanoutRequest {
                map: "nap".into(),
                inputs: vec!["small0".into(), "small1".into()],
                ..FanoutRequest::default()
            },
            None,
        )
        .await
        .unwrap();
    let small_done = until_state(&t.core, &small.name, JobState::Succeeded).await;
    let big_done = until_state(&t.core, &big.name, JobState::Succeeded).await;
    // One slot, one task at a time: had the big job gone first, the small one would
    // have ended last.
    assert!(
        small_done.finished_at < big_done.finished_at,
        "small {:?} big {:?}",
        small_done.finished_at,
        big_done.finished_at
    );
    let tasks = nodes.tasks(&big.name).await.unwrap();
    let finished_after_small = tasks
        .iter()
        .filter(|t| t.finished_at > small_done.finished_at)
        .count();
    assert!(finished_after_small > 20, "{finished_after_small}");
    assert_eq!(big_done.progress[0].done, 30);
    assert_eq!(big_done.progress[0].total, 30);
    assert_eq!(big_done.inputs.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_clear_errors() {
    let t = open_with(&[("nap.sh", BLOCK, "true")], |_| {}).await;
    let nodes = &t.core.nodes;
    let refuse = |request: FanoutRequest| async move {
        nodes.submit(request, None).await.unwrap_err().to_string()
    };
    let unknown = refuse(FanoutRequest {
        map: "nosuch".into(),
        inputs: vec!["x".into()],
        ..FanoutRequest::default()
    })
    .await;
    assert!(unknown.contains("nosuch"), "{unknown}");
    let empty = refuse(FanoutRequest {
        map: "nap".into(),
        ..FanoutRequest::default()
    })
    .await;
    assert!(empty.contains("at least one input"), "{empty}");
    let node = refuse(FanoutRequest {
        map: "nap".into(),
        inputs: vec!["x".into()],
        node: Some("bad node!".into()),
        ..FanoutRequest::default()
    })
    .await;
    assert!(node.contains("invalid node id"), "{node}");
    assert!(nodes.get("nosuch").await.is_err());
    assert!(nodes.blacklist("nosuch").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_fails_past_its_failure_limit_and_its_other_tasks_are_killed() {
    let t = open_with(
        &[(
            "flaky.sh",
            BLOCK,
            "[ \"$INPUT\" = bad ] && exit 7\nsleep 30",
        )],
        |c| c.nodes.local_slots = 4,
    )
    .await;
    let job = t
        .core
        .nodes
        .submit(
            FanoutRequest {
                map: "flaky".into(),
                inputs: vec!["bad".into(), "slow".into()],
                max_failures: Some(2),
                ..FanoutRequest::default()
            },
            None,
        )
        .await
        .unwrap();
    let failed = until_state(&t.core, &job.name, JobState::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(
        reason.contains("exited with status 7") && reason.contains("max_failures 2"),
        "{reason}"
    );
    let tasks = common::eventually("the slow task killed", 10, || async {
        let tasks = t.core.nodes.tasks(&job.name).await.unwrap();
        tasks.iter().all(|t| t.state.is_terminal()).then_some(tasks)
    })
    .await;
    let bad = tasks
        .iter()
        .find(|t| t.input.as_deref() == Some("bad"))
        .unwrap();
    assert_eq!((bad.state, bad.attempts), (TaskState::Failed, 3));
    let slow = tasks
        .iter()
        .find(|t| t.input.as_deref() == Some("slow"))
        .unwrap();
    assert_eq!(slow.state, TaskState::Killed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_held_ahead_of_a_slot_never_run_beside_another() {
    // One slot and one task held ahead: the tasks must still run one at a time. Two at
    // once would find the lock directory taken and fail the job.
    let t = open_with(
        &[(
            "turn.sh",
            "# -- jojo --\n# description: take a turn\n# param: lock\n# -- jojo --\n",
            "mkdir \"$LOCK\" || exit 9\nsleep 0.01\nrmdir \"$LOCK\"",
        )],
        |c| {
            c.nodes.local_slots = 1;
            c.nodes.local_prefetch = Some(1);
        },
    )
    .await;
    let lock = t.scratch().join("lock");
    let job = t
        .core
        .nodes
        .submit(
            FanoutRequest {
                map: "turn".into(),
                inputs: (0..40).map(|i| i.to_string()).collect(),
                params: [("lock".to_owned(), lock.display().to_string())].into(),
                max_failures: Some(0),
                ..FanoutRequest::default()
            },
            None,
        )
        .await
        .unwrap();
    let done = until_state(&t.core, &job.name, JobState::Succeeded).await;
    assert_eq!(done.progress[0].done, 40);
    assert!(!lock.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_output_past_the_limit_is_dropped_with_a_note() {
    let t = open_with(
        &[("loud.sh", BLOCK, "head -c 1000 /dev/zero | tr '\\0' x")],
        |c| {
            c.max_output_bytes = 300;
            c.nodes.local_slots = 1;
        },
    )
    .await;
    let job = t
        .core
        .nodes
        .submit(
            FanoutRequest {
                map: "loud".into(),
                inputs: vec!["a".into(), "b".into()],
                ..FanoutRequest::default()
            },
            None,
        )
        .await
        .unwrap();
    until_state(&t.core, &job.name, JobState::Succeeded).await;
    let note = "[opsbox: output truncated after 300 bytes]";
    let log = t.core.jobs.output(&job.name).await.unwrap();
    let kept: usize = log.stdout.iter().map(String::len).sum();
    assert_eq!(kept, 300, "{log:?}");
    assert_eq!(
        log.stderr.iter().filter(|l| l.contains(note)).count(),
        1,
        "one note for the job's log: {log:?}"
    );
    let dir = t.core.jobs.results_dir(&job.name);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "out") {
            files += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with(&"x".repeat(300)), "{text}");
            assert!(text.ends_with(&format!("\n{note}\n")), "{text}");
            assert_eq!(text.len(), 300 + note.len() + 2);
        }
    }
    assert_eq!(files, 2, "each task keeps its own 300 bytes");
}
