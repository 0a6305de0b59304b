//! The job service end to end: real scripts, real processes, a real SQLite store.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use opsbox_api::{JobState, LogEvent, OutputMode, ResultFile, Stream};
use opsbox_core::jobs::FILTERED;
use opsbox_core::store::JobFilter;
use opsbox_core::CoreError;

/// Long enough for any test; a hung job fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(15);

/// Runs a job to its end.
async fn run(
    t: &TestCore,
    script: &str,
    pairs: &[(&str, &str)],
) -> (opsbox_api::Job, opsbox_api::JobOutput) {
    tokio::time::timeout(LIMIT, t.core.jobs.run(script, params(pairs), None))
        .await
        .expect("the job did not end in time")
        .unwrap()
}

/// The echo script of the brief: it copies its params into result files, byte for byte.
const ECHO_BODY: &str = r#"printf '%s' "$TEXT" > "$OPSBOX_RESULTS/text"
printf '%s' "$SECRET" > "$OPSBOX_RESULTS/secret"
printf '%s\n' "$TEXT""#;

/// Starts a background `sleep`, prints its pid and its own, and waits.
const LONG_BODY: &str = r#"sleep 300 &
echo $!
echo $$
wait"#;

fn pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .take(2)
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn params_with_shell_metacharacters_arrive_verbatim_and_never_run() {
    let t = open(&[("echo.sh", ECHO_BLOCK, ECHO_BODY)]).await;
    let marker = t.scratch().join("marker");
    let m = marker.display().to_string();
    let values = [
        format!("$(touch {m})"),
        format!("; touch {m}"),
        format!("`touch {m}`"),
        format!("x' \"; touch {m}; echo \"' y"),
        format!("line one\nline two\n$(touch {m})\n"),
        "*".to_string(),
        format!("a=b | touch {m} && touch {m} || touch {m} > {m}"),
        "${HOME} $PATH \\n \\\\ %s %n".to_string(),
        "  leading and trailing spaces  ".to_string(),
        String::new(),
    ];
    let secret = format!("s3cr3t $(touch {m}) '\"");
    for value in &values {
        let (job, output) = run(&t, "echo", &[("text", value), ("secret", &secret)]).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        let dir = t.core.jobs.results_dir(&job.name);
        assert_eq!(
            std::fs::read_to_string(dir.join("text")).unwrap(),
            *value,
            "the env var must hold the value exactly"
        );
        assert_eq!(std::fs::read_to_string(dir.join("secret")).unwrap(), secret);
        assert!(!marker.exists(), "{value:?} was executed");
        // Shown params: the value as given, the filtered one hidden everywhere.
        assert_eq!(job.params["text"], *value);
        assert_eq!(job.params["secret"], FILTERED);
        let spec = t.core.jobs.spec(&job.name).await.unwrap();
        assert_eq!(spec.params["secret"], FILTERED);
        assert_eq!(spec.output, OutputMode::Combined);
        assert!(spec.lock);
        assert_eq!(spec.timeout_secs, Some(1));
        if value == "*" {
            // No glob: the scripts directory is the cwd, and it is not listed.
            assert_eq!(output.stdout, vec!["*"]);
        }
    }
    // The secret is nowhere in the event log.
    let page = t.core.events.page(0, 10_000).await.unwrap();
    assert!(!page.events.is_empty());
    for event in &page.events {
        assert!(
            !event.data.to_string().contains("s3cr3t"),
            "secret leaked into {event:?}"
        );
    }
}

#[tokio::test]
async fn the_environment_is_the_params_and_opsbox_variables_only() {
    let t = open(&[(
        "envs.sh",
        &block(&["param: my-param - dashed", "param: other"]),
        r#"printf '[%s][%s][%s][%s]\n' "$MY_PARAM" "$OTHER" "$OPSBOX_SCRIPT" "$OPSBOX_NODE"
printf '%s\n' "$OPSBOX_JOB" "$OPSBOX_RESULTS" "$(pwd)"
env | cut -d= -f1 | sort >&2"#,
    )])
    .await;
    let (job, out) = run(&t, "envs", &[("my-param", "v=1")]).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(
        out.stdout[0], "[v=1][][envs][local]",
        "undeclared params are empty"
    );
    assert_eq!(out.stdout[1], job.name);
    assert_eq!(
        out.stdout[2],
        t.core.jobs.results_dir(&job.name).display().to_string()
    );
    assert_eq!(
        std::path::Path::new(&out.stdout[3]).canonicalize().unwrap(),
        t.scripts_dir().canonicalize().unwrap(),
        "scripts run in the scripts directory"
    );
    let allowed = [
        "PATH",
        "LANG",
        "HOME",
        "MY_PARAM",
        "OTHER",
        "OPSBOX_JOB",
        "OPSBOX_SCRIPT",
        "OPSBOX_NODE",
        "OPSBOX_RESULTS",
        // Set by the shell itself.
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    for name in &out.stderr {
        assert!(
            allowed.contains(&name.as_str()),
            "{name} leaked into the environment"
        );
    }
}

#[tokio::test]
async fn bad_requests_give_the_right_errors_and_create_no_job() {
    let t = open(&[("echo.sh", ECHO_BLOCK, ECHO_BODY)]).await;
    let jobs = &t.core.jobs;

    let err = jobs.submit("echo", params(&[]), None).await.err().unwrap();
    assert!(
        matches!(&err, CoreError::Invalid(m) if m.contains("missing required param 'text'")),
        "{err:?}"
    );
    let err = jobs
        .submit("echo", params(&[("secret", "x")]), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, CoreError::Invalid(m) if m.contains("'text'")),
        "{err:?}"
    );

    let err = jobs
        .submit("echo", params(&[("text", "a"), ("bogus", "b")]), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, CoreError::Invalid(m) if m.contains("unknown param 'bogus'") && m.contains("text")),
        "{err:?}"
    );
    // Param names are exact: the env spelling is not a param name.
    let err = jobs
        .submit("echo", params(&[("TEXT", "a")]), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, CoreError::Invalid(_)), "{err:?}");

    let err = jobs
        .submit("echo", params(&[("text", "a\0b")]), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, CoreError::Invalid(m) if m.contains("NUL")),
        "{err:?}"
    );

    let err = jobs
        .submit("nope", params(&[("text", "a")]), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, CoreError::UnknownScript(s) if s == "nope"),
        "{err:?}"
    );
    let err = jobs.run("nope", params(&[]), None).await.unwrap_err();
    assert!(matches!(err, CoreError::UnknownScript(_)), "{err:?}");

    assert!(jobs.list(&JobFilter::default()).await.unwrap().is_empty());
    let page = t.core.events.page(0, 100).await.unwrap();
    assert!(
        page.events.iter().all(|e| !e.kind.starts_with("job.")),
        "{:?}",
        page.events
    );

    // Every call about a job that does not exist.
    let ghost = "echo@1:2:3";
    let is_unknown = |e: CoreError| matches!(&e, CoreError::UnknownJob(n) if n == ghost);
    assert!(is_unknown(jobs.get(ghost).await.unwrap_err()));
    assert!(is_unknown(jobs.spec(ghost).await.unwrap_err()));
    assert!(is_unknown(jobs.output(ghost).await.unwrap_err()));
    assert!(is_unknown(jobs.results(ghost).await.unwrap_err()));
    assert!(is_unknown(jobs.result_path(ghost, "x").await.unwrap_err()));
    assert!(is_unknown(jobs.kill(ghost, None).await.unwrap_err()));
    assert!(is_unknown(jobs.clean(ghost).await.unwrap_err()));
    assert!(is_unknown(
        jobs.wait(ghost, Duration::from_millis(10))
            .await
            .unwrap_err()
    ));
    assert!(is_unknown(jobs.follow(ghost, 0).await.err().unwrap()));
}

#[tokio::test]
async fn split_output_return_values_and_exit_status() {
    let t = open(&[(
        "out.sh",
        "",
        r#"echo out1
echo err1 >&2
echo 'jojo_return_value answer = 42'
echo 'jojo_return_value eq=a=b'
echo 'jojo_return_value fromerr=1' >&2
echo '  jojo_return_value indented=1'
echo err2 >&2
printf 'last-no-newline'
exit 3"#,
    )])
    .await;
    let (job, out) = run(&t, "out", &[]).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.exit_code, Some(3));
    assert_eq!(job.signal, None);
    assert_eq!(job.reason.as_deref(), Some("exited with status 3"));
    assert_eq!(
        out.stdout,
        vec![
            "out1",
            "jojo_return_value answer = 42",
            "jojo_return_value eq=a=b",
            "  jojo_return_value indented=1",
            "last-no-newline"
        ]
    );
    assert_eq!(
        out.stderr,
        vec!["err1", "jojo_return_value fromerr=1", "err2"]
    );
    let expected: BTreeMap<String, String> = params(&[("answer", "42"), ("eq", "a=b")]);
    assert_eq!(
        job.return_values, expected,
        "stderr and indented lines are not values"
    );
    // The stored job says the same as the returned one.
    assert_eq!(t.core.jobs.get(&job.name).await.unwrap(), job);
}

#[tokio::test]
async fn combined_output_keeps_the_order_and_finds_values_on_stderr() {
    let t = open(&[(
        "comb.sh",
        &block(&["output: combined"]),
        "echo one; echo two >&2; echo three; echo four >&2; echo 'jojo_return_value k=v' >&2",
    )])
    .await;
    let (job, out) = run(&t, "comb", &[]).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.exit_code, Some(0));
    assert_eq!(job.reason, None);
    assert_eq!(
        out.stdout,
        vec!["one", "two", "three", "four", "jojo_return_value k=v"]
    );
    assert!(out.stderr.is_empty());
    assert_eq!(job.return_values, params(&[("k", "v")]));
}

#[tokio::test]
async fn a_successful_job_records_its_life() {
    let t = open(&[("ok.sh", "", "echo fine")]).await;
    let before = chrono::Utc::now();
    let submitted = t
        .core
        .jobs
        .submit("ok", params(&[]), Some("alice".into()))
        .await
        .unwrap();
    assert_eq!(submitted.job.state, JobState::Queued);
    assert!(submitted.job.name.starts_with("ok@"));
    let job = tokio::time::timeout(LIMIT, submitted.finished())
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.submitted_by.as_deref(), Some("alice"));
    assert_eq!(job.node.as_deref(), Some("local"));
    let (started, finished) = (job.started_at.unwrap(), job.finished_at.unwrap());
    assert!(before <= job.created_at && job.created_at <= started && started <= finished);
    assert!(!t.core.jobs.active().contains(&job.name));
    let spec = t.core.jobs.spec(&job.name).await.unwrap();
    assert_eq!(spec.submitted_by.as_deref(), Some("alice"));
    assert!(spec.filename.ends_with("ok.sh"));
}

#[tokio::test]
async fn a_short_waited_run_writes_its_whole_life_in_order() {
    let t = open(&[("ok.sh", "", "echo fine")]).await;
    let since = t.core.store.current_revision().await.unwrap();
    let (job, output) = run(&t, "ok", &[]).await;
    assert_eq!(output.stdout, vec!["fine"]);
    // Created, started and finished (a short run writes them at its end, together),
    // in that order, each carrying the job as it was then, and nothing else.
    let events = match t.core.store.events_since(since, 100).await.unwrap() {
        opsbox_core::store::EventsSince::Events(events) => events,
        other => panic!("nothing was compacted: {other:?}"),
    };
    let about: Vec<_> = events.iter().filter(|e| e.subject == job.name).collect();
    let kinds: Vec<&str> = about.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["job.created", "job.started", "job.finished"]);
    let states: Vec<&str> = about
        .iter()
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "running", "succeeded"]);
    assert!(about[0].rev < about[1].rev && about[1].rev < about[2].rev);
    // The stored job is the one the caller got.
    assert_eq!(t.core.jobs.get(&job.name).await.unwrap(), job);
}

#[tokio::test]
async fn result_files_are_listed_and_only_listed_names_are_served() {
    let t = open(&[(
        "res.sh",
        "",
        r#"mkdir -p "$OPSBOX_RESULTS/sub"
printf 'hello' > "$OPSBOX_RESULTS/report.txt"
printf 'a,b\n1,2\n' > "$OPSBOX_RESULTS/sub/data.csv"
ln -s /etc/passwd "$OPSBOX_RESULTS/leak"
ln -s "$OPSBOX_RESULTS/../.." "$OPSBOX_RESULTS/up""#,
    )])
    .await;
    let (job, _) = run(&t, "res", &[]).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let expected = vec![
        ResultFile {
            path: "report.txt".into(),
            size: 5,
        },
        ResultFile {
            path: "sub/data.csv".into(),
            size: 8,
        },
    ];
    assert_eq!(job.results, expected, "symlinks are not results");
    assert_eq!(t.core.jobs.results(&job.name).await.unwrap(), expected);

    let path = t
        .core
        .jobs
        .result_path(&job.name, "report.txt")
        .await
        .unwrap();
    assert!(path.starts_with(t.core.jobs.results_dir(&job.name)));
    assert_eq!(std::fs::read_to_string(path).unwrap(), "hello");
    let path = t
        .core
        .jobs
        .result_path(&job.name, "sub/data.csv")
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), "a,b\n1,2\n");

    // The database file (a stand-in when the store is PostgreSQL) must stay out of reach.
    let db = t.data_dir().join("opsbox.db");
    if !db.exists() {
        std::fs::write(&db, "secret").unwrap();
    }
    for bad in [
        "../opsbox.db",
        "../../opsbox.db",
        "/etc/passwd",
        "leak",
        "up",
        "up/opsbox.db",
        "sub",
        "sub/../report.txt",
        "./report.txt",
        "",
        "missing.txt",
    ] {
        let err = t.core.jobs.result_path(&job.name, bad).await.unwrap_err();
        assert!(matches!(err, CoreError::NotFound(_)), "{bad:?}: {err:?}");
    }
}

#[tokio::test]
async fn results_of_a_running_job_are_read_from_disk() {
    let t = open(&[(
        "partial.sh",
        "",
        r#"printf 'x' > "$OPSBOX_RESULTS/early"
echo ready
sleep 300"#,
    )])
    .await;
    let submitted = t
        .core
        .jobs
        .submit("partial", params(&[]), None)
        .await
        .unwrap();
    let name = submitted.job.name.clone();
    until_lines(&t.core, &name, 1).await;
    let files = t.core.jobs.results(&name).await.unwrap();
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["early"]
    );
    assert!(t.core.jobs.result_path(&name, "early").await.is_ok());
    let job = t.core.jobs.kill(&name, None).await.unwrap();
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(
        job.results.len(),
        1,
        "results are recorded for a killed job too"
    );
}

#[tokio::test]
async fn a_timed_out_job_fails_and_leaves_no_process_behind() {
    let t = open(&[("slow.sh", &block(&["timeout: 1"]), LONG_BODY)]).await;
    let started = Instant::now();
    let (job, out) = run(&t, "slow", &[]).await;
    let took = started.elapsed();
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let reason = job.reason.clone().unwrap();
    assert!(reason.contains("timed out"), "{reason}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let pids = pids(&out.stdout);
    assert_eq!(pids.len(), 2, "{out:?}");
    for pid in pids {
        until_dead(pid).await;
    }
}

#[tokio::test]
async fn kill_stops_a_running_job_and_its_whole_process_group() {
    let t = open(&[("long.sh", "", LONG_BODY)]).await;
    let submitted = t.core.jobs.submit("long", params(&[]), None).await.unwrap();
    let name = submitted.job.name.clone();
    let lines = until_lines(&t.core, &name, 2).await;
    let running = t.core.jobs.get(&name).await.unwrap();
    assert_eq!(running.state, JobState::Running);
    assert!(t.core.jobs.active().contains(&name));
    let pids = pids(&lines);
    for pid in &pids {
        assert!(alive(*pid));
    }

    let job = t.core.jobs.kill(&name, Some("alice")).await.unwrap();
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(job.reason.as_deref(), Some("killed by alice"));
    assert_eq!(job.signal, Some(15));
    assert!(job.finished_at.is_some());
    for pid in pids {
        until_dead(pid).await;
    }
    assert_eq!(submitted.finished().await, job);
    assert!(!t.core.jobs.active().contains(&name));

    // Killing an ended job changes nothing.
    let again = t.core.jobs.kill(&name, Some("bob")).await.unwrap();
    assert_eq!(again, job);
}

#[tokio::test]
async fn kill_escalates_to_sigkill_after_the_grace() {
    // The whole group ignores SIGTERM.
    let t = open(&[("stubborn.sh", "", &format!("trap '' TERM\n{LONG_BODY}"))]).await;
    let name = t
        .core
        .jobs
        .submit("stubborn", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    let lines = until_lines(&t.core, &name, 2).await;
    let started = Instant::now();
    let job = t.core.jobs.kill(&name, None).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(job.reason.as_deref(), Some("killed"));
    assert_eq!(job.signal, Some(9));
    for pid in pids(&lines) {
        until_dead(pid).await;
    }
}

#[tokio::test]
async fn a_killed_queued_job_never_starts() {
    let t = open_with(
        &[
            ("long.sh", "", LONG_BODY),
            ("touch.sh", &block(&["param: marker"]), r#"touch "$MARKER""#),
        ],
        |c| c.max_concurrent_runs = 1,
    )
    .await;
    let jobs = &t.core.jobs;
    let first = jobs
        .submit("long", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    until_state(&t.core, &first, JobState::Running).await;

    let marker = t.scratch().join("queued");
    let m = marker.display().to_string();
    let queued = jobs
        .submit("touch", params(&[("marker", &m)]), None)
        .await
        .unwrap();
    let second = queued.job.name.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jobs.get(&second).await.unwrap().state, JobState::Queued);
    let (done, _) = jobs.wait(&second, Duration::from_millis(50)).await.unwrap();
    assert!(!done);
    // A queued job is active too: clean refuses it.
    let err = jobs.clean(&second).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::JobActive {
                state: JobState::Queued,
                ..
            }
        ),
        "{err:?}"
    );

    let job = jobs.kill(&second, Some("bob")).await.unwrap();
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(
        job.reason.as_deref(),
        Some("killed by bob before it started")
    );
    assert_eq!(job.started_at, None);
    assert_eq!(job.node, None);
    assert!(jobs.output(&second).await.unwrap().stdout.is_empty());
    assert!(!marker.exists());

    // The running one is untouched; once it ends, the slot serves the next job.
    assert_eq!(jobs.get(&first).await.unwrap().state, JobState::Running);
    assert_eq!(
        jobs.kill(&first, None).await.unwrap().state,
        JobState::Killed
    );
    let after = t.scratch().join("after");
    let (job, _) = run(&t, "touch", &[("marker", &after.display().to_string())]).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert!(after.exists());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!marker.exists(), "the killed queued job started after all");
}

#[tokio::test]
async fn a_job_killed_while_waiting_for_its_lock_never_starts() {
    let t = open(&[(
        "locked.sh",
        &block(&["lock: true", "param: marker"]),
        &format!("touch \"$MARKER\"\n{LONG_BODY}"),
    )])
    .await;
    let jobs = &t.core.jobs;
    let m1 = t.scratch().join("one").display().to_string();
    let m2 = t.scratch().join("two");
    let first = jobs
        .submit("locked", params(&[("marker", &m1)]), None)
        .await
        .unwrap()
        .job
        .name;
    until_lines(&t.core, &first, 2).await;
    let second = jobs
        .submit(
            "locked",
            params(&[("marker", &m2.display().to_string())]),
            None,
        )
        .await
        .unwrap()
        .job
        .name;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(jobs.get(&second).await.unwrap().state, JobState::Queued);
    let job = jobs.kill(&second, None).await.unwrap();
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(job.reason.as_deref(), Some("killed before it started"));
    assert_eq!(
        jobs.kill(&first, None).await.unwrap().state,
        JobState::Killed
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!m2.exists());
}

/// A script that records `start end` (nanoseconds) of its run into `$LOG`.
const INTERVAL_BODY: &str = r#"s=$(date +%s%N)
sleep 0.4
e=$(date +%s%N)
echo "$s $e" >> "$LOG""#;

fn intervals(path: &std::path::Path) -> Vec<(u128, u128)> {
    let mut all: Vec<(u128, u128)> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (s, e) = l.split_once(' ').unwrap();
            (s.parse().unwrap(), e.parse().unwrap())
        })
        .collect();
    all.sort();
    all
}

#[tokio::test]
async fn lock_serialises_runs_and_unlocked_scripts_overlap() {
    let t = open(&[
        (
            "locked.sh",
            &block(&["lock: true", "param: log"]),
            INTERVAL_BODY,
        ),
        ("free.sh", &block(&["param: log"]), INTERVAL_BODY),
    ])
    .await;
    let locked_log = t.scratch().join("locked.log");
    let free_log = t.scratch().join("free.log");
    let mut waits = Vec::new();
    for (script, log, n) in [("locked", &locked_log, 3), ("free", &free_log, 3)] {
        for _ in 0..n {
            let submitted = t
                .core
                .jobs
                .submit(script, params(&[("log", &log.display().to_string())]), None)
                .await
                .unwrap();
            waits.push(submitted.finished());
        }
    }
    let jobs = tokio::time::timeout(LIMIT, futures::future::join_all(waits))
        .await
        .unwrap();
    assert!(
        jobs.iter().all(|j| j.state == JobState::Succeeded),
        "{jobs:?}"
    );

    let locked = intervals(&locked_log);
    assert_eq!(locked.len(), 3);
    for pair in locked.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "locked runs overlap: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    let free = intervals(&free_log);
    assert_eq!(free.len(), 3);
    let latest_start = free.iter().map(|i| i.0).max().unwrap();
    let earliest_end = free.iter().map(|i| i.1).min().unwrap();
    assert!(
        latest_start < earliest_end,
        "unlocked runs did not overlap: {free:?}"
    );
}

#[tokio::test]
async fn the_global_limit_caps_concurrent_runs() {
    let t = open_with(
        &[("free.sh", &block(&["param: log"]), INTERVAL_BODY)],
        |c| c.max_concurrent_runs = 2,
    )
    .await;
    let log = t.scratch().join("free.log").display().to_string();
    let mut waits = Vec::new();
    for _ in 0..4 {
        let s = t
            .core
            .jobs
            .submit("free", params(&[("log", &log)]), None)
            .await
            .unwrap();
        waits.push(s.finished());
    }
    let jobs = tokio::time::timeout(LIMIT, futures::future::join_all(waits))
        .await
        .unwrap();
    assert!(jobs.iter().all(|j| j.state == JobState::Succeeded));
    let runs = intervals(std::path::Path::new(&log));
    assert_eq!(runs.len(), 4);
    // At the start of each run, at most one other run is in progress.
    for (i, run) in runs.iter().enumerate() {
        let in_progress = runs
            .iter()
            .enumerate()
            .filter(|(j, other)| *j != i && other.0 <= run.0 && run.0 < other.1)
            .count();
        assert!(in_progress <= 1, "more than 2 runs at once: {runs:?}");
    }
    // And the limit is not a lock: two did run at once.
    assert!(runs[1].0 < runs[0].1, "{runs:?}");
}

#[tokio::test]
async fn wait_reports_whether_the_job_ended_in_time() {
    let t = open(&[("nap.sh", "", "sleep 0.8")]).await;
    let name = t
        .core
        .jobs
        .submit("nap", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    let started = Instant::now();
    let (done, job) = t
        .core
        .jobs
        .wait(&name, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(!done);
    assert!(!job.state.is_terminal(), "{job:?}");
    assert!(started.elapsed() < Duration::from_millis(700));

    let (done, job) = t.core.jobs.wait(&name, LIMIT).await.unwrap();
    assert!(done);
    assert_eq!(job.state, JobState::Succeeded);
    // Once ended (and no longer active here), wait answers from the store at once.
    let started = Instant::now();
    let (done, again) = t.core.jobs.wait(&name, Duration::ZERO).await.unwrap();
    assert!(done);
    assert_eq!(again, job);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn follow_streams_output_live_then_ends_with_the_final_job() {
    let t = open(&[(
        "drip.sh",
        "",
        "echo a; sleep 0.3; echo b >&2; sleep 0.3; echo c",
    )])
    .await;
    let jobs = &t.core.jobs;
    let name = jobs
        .submit("drip", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    let mut stream = Box::pin(jobs.follow(&name, 0).await.unwrap());
    let mut chunks = Vec::new();
    let mut seen_live = false;
    let end = loop {
        let item = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("follow stalled")
            .expect("the stream ended without End")
            .unwrap();
        match item {
            LogEvent::Output(chunk) => {
                if chunks.is_empty() {
                    seen_live = !jobs.get(&name).await.unwrap().state.is_terminal();
                }
                chunks.push(chunk);
            }
            LogEvent::End(job) => break job,
        }
    };
    assert!(stream.next().await.is_none(), "nothing after End");
    assert!(seen_live, "the first chunk came only after the job ended");
    assert_eq!(end.name, name);
    assert_eq!(end.state, JobState::Succeeded);
    assert_eq!(*end, jobs.get(&name).await.unwrap());

    let text = |stream: Stream, chunks: &[opsbox_api::LogChunk]| -> String {
        chunks
            .iter()
            .filter(|c| c.stream == stream)
            .map(|c| c.data.as_str())
            .collect()
    };
    assert_eq!(text(Stream::Stdout, &chunks), "a\nc\n");
    assert_eq!(text(Stream::Stderr, &chunks), "b\n");
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=chunks.len() as u64).collect::<Vec<_>>());

    // After the end: the same chunks, then End; resuming skips what was seen.
    let replay: Vec<LogEvent> = jobs
        .follow(&name, 0)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(replay.len(), chunks.len() + 1);
    assert!(matches!(replay.last(), Some(LogEvent::End(_))));
    let resumed: Vec<LogEvent> = jobs
        .follow(&name, 1)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(resumed.len(), chunks.len());
    assert!(matches!(&resumed[0], LogEvent::Output(c) if c.seq == 2) || chunks.len() == 1);
    let last = chunks.last().unwrap().seq;
    let tail: Vec<LogEvent> = jobs
        .follow(&name, last)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(tail.len(), 1);
    assert_eq!(jobs.chunks(&name, 0, 1000).await.unwrap(), chunks);
}

#[tokio::test]
async fn clean_refuses_an_active_job_and_removes_an_ended_one() {
    let t = open(&[
        ("long.sh", "", LONG_BODY),
        (
            "res.sh",
            "",
            r#"echo out; echo err >&2; printf 'r' > "$OPSBOX_RESULTS/r.txt""#,
        ),
    ])
    .await;
    let jobs = &t.core.jobs;
    let long = jobs
        .submit("long", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    until_lines(&t.core, &long, 2).await;
    let err = jobs.clean(&long).await.unwrap_err();
    assert!(
        matches!(&err, CoreError::JobActive { name, state: JobState::Running } if *name == long),
        "{err:?}"
    );
    assert_eq!(jobs.get(&long).await.unwrap().state, JobState::Running);
    jobs.kill(&long, None).await.unwrap();
    jobs.clean(&long).await.unwrap();

    let (job, out) = run(&t, "res", &[]).await;
    assert_eq!(out.stdout, vec!["out"]);
    let dir = jobs.results_dir(&job.name);
    assert!(dir.join("r.txt").exists());
    let rev = t.core.events.current_revision().await.unwrap();
    jobs.clean(&job.name).await.unwrap();
    assert!(!dir.exists(), "the results directory is removed");
    assert!(matches!(
        jobs.get(&job.name).await,
        Err(CoreError::UnknownJob(_))
    ));
    assert!(matches!(
        jobs.output(&job.name).await,
        Err(CoreError::UnknownJob(_))
    ));
    assert_eq!(
        t.core.store.output_bytes(&job.name).await.unwrap(),
        (vec![], vec![]),
        "the output is removed"
    );
    let page = t.core.events.page(rev, 10).await.unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].kind, "job.cleaned");
    assert_eq!(page.events[0].subject, job.name);
    assert!(matches!(
        jobs.clean(&job.name).await,
        Err(CoreError::UnknownJob(_))
    ));
    assert!(jobs.list(&JobFilter::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn list_filters_by_state_and_script_newest_first() {
    let t = open(&[("ok.sh", "", "true"), ("bad.sh", "", "exit 1")]).await;
    let mut names = Vec::new();
    for script in ["ok", "bad", "ok"] {
        names.push(run(&t, script, &[]).await.0.name);
    }
    let all = t.core.jobs.list(&JobFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|j| j.name.clone()).collect::<Vec<_>>(),
        names.iter().rev().cloned().collect::<Vec<_>>()
    );
    let ok = t
        .core
        .jobs
        .list(&JobFilter {
            script: Some("ok".into()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ok.len(), 2);
    let failed = t
        .core
        .jobs
        .list(&JobFilter {
            state: Some(JobState::Failed),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].name, names[1]);
    let newest = t
        .core
        .jobs
        .list(&JobFilter {
            limit: Some(1),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].name, names[2]);
}

#[tokio::test]
async fn a_script_that_cannot_start_fails_the_job() {
    let t = open(&[("gone.sh", "", "true")]).await;
    std::fs::remove_file(t.scripts_dir().join("gone.sh")).unwrap();
    let (job, _) = run(&t, "gone", &[]).await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap();
    assert!(reason.contains("cannot start"), "{reason}");
}

#[tokio::test]
async fn output_beyond_the_limit_is_dropped_with_a_note() {
    let t = open_with(
        &[(
            "loud.sh",
            "",
            "head -c 1000 /dev/zero | tr '\\0' x\necho\necho 'jojo_return_value after=yes'",
        )],
        |c| c.max_output_bytes = 64,
    )
    .await;
    let (job, out) = run(&t, "loud", &[]).await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(out.stdout.concat(), "x".repeat(64));
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("output truncated after 64 bytes")),
        "{out:?}"
    );
    assert_eq!(job.return_values, params(&[("after", "yes")]));
}

#[tokio::test]
async fn shutdown_stops_running_jobs() {
    let t = open(&[("long.sh", "", LONG_BODY)]).await;
    let name = t
        .core
        .jobs
        .submit("long", params(&[]), None)
        .await
        .unwrap()
        .job
        .name;
    let lines = until_lines(&t.core, &name, 2).await;
    tokio::time::timeout(LIMIT, t.core.shutdown())
        .await
        .unwrap();
    let job = t.core.jobs.get(&name).await.unwrap();
    assert_eq!(job.state, JobState::Killed);
    assert_eq!(job.reason.as_deref(), Some("killed by server shutdown"));
    for pid in pids(&lines) {
        until_dead(pid).await;
    }
    assert!(t.core.jobs.active().is_empty());
}

#[tokio::test]
async fn a_kill_racing_the_start_is_never_lost() {
    let t = open(&[("long.sh", "", LONG_BODY)]).await;
    // Kill at different points of the start: before the runner runs, while it spawns,
    // just after the process exists.
    for delay_ms in [0, 0, 1, 2, 5, 10, 20, 30, 50] {
        let submitted = t.core.jobs.submit("long", params(&[]), None).await.unwrap();
        let name = submitted.job.name.clone();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let job = tokio::time::timeout(Duration::from_secs(5), t.core.jobs.kill(&name, None))
            .await
            .expect("kill hung")
            .unwrap();
        assert_eq!(job.state, JobState::Killed, "after {delay_ms} ms: {job:?}");
        let finished = tokio::time::timeout(Duration::from_secs(5), submitted.finished())
            .await
            .unwrap();
        assert_eq!(finished.state, JobState::Killed);
        for pid in pids(&t.core.jobs.output(&name).await.unwrap().stdout) {
            until_dead(pid).await;
        }
    }
    assert!(t.core.jobs.active().is_empty());
}

#[tokio::test]
async fn waited_runs_show_running_and_queued_while_they_last() {
    let t = open_with(
        &[("ok.sh", "", "echo fine"), ("nap.sh", "", "sleep 1")],
        |c| c.max_concurrent_runs = 1,
    )
    .await;
    // A run that lasts is recorded running while it runs; one that has to wait for a
    // slot is recorded queued while it waits.
    let first_in = |state: JobState| {
        let jobs = t.core.jobs.clone();
        async move {
            let filter = JobFilter {
                state: Some(state),
                ..JobFilter::default()
            };
            jobs.list(&filter).await.unwrap().into_iter().next()
        }
    };
    let (first, second) = (t.core.jobs.clone(), t.core.jobs.clone());
    let long = tokio::spawn(async move { first.run("nap", params(&[]), None).await });
    let running = eventually("the long run recorded running", 10, || {
        first_in(JobState::Running)
    })
    .await;
    let waiting = tokio::spawn(async move { second.run("ok", params(&[]), None).await });
    let queued = eventually("the waiting run recorded queued", 10, || {
        first_in(JobState::Queued)
    })
    .await;
    assert!(queued.name.starts_with("ok@"));
    let (long, _) = tokio::time::timeout(LIMIT, long)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (waited, _) = tokio::time::timeout(LIMIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((long.name, long.state), (running.name, JobState::Succeeded));
    assert_eq!(
        (waited.name, waited.state),
        (queued.name, JobState::Succeeded)
    );
}
