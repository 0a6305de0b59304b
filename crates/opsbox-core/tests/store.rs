//! A store on its own: group commit, per-write failure, records, output. The same
//! tests run on SQLite and, with `OPSBOX_TEST_STORE`, on PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use opsbox_api::{JobState, ResultFile, Stream};
use opsbox_core::store::{
    EventsSince, JobFilter, JobRecord, JobWrite, LogChunkBytes, NewEvent, Store, StoreError,
    TaskRecord, TaskWrite,
};

/// The store of a directory (opened again, it is the same store).
async fn open(dir: &std::path::Path) -> Arc<dyn Store> {
    let spec =
        common::test_store(dir).unwrap_or_else(|| dir.join("opsbox.db").display().to_string());
    opsbox_core::store::open(&spec, "test-server")
        .await
        .unwrap()
}

async fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path()).await, dir)
}

fn ev(kind: &str, subject: &str) -> NewEvent {
    NewEvent::new(kind, subject, serde_json::json!({"subject": subject}))
}

fn job(name: &str, script: &str, state: JobState) -> JobRecord {
    JobRecord {
        name: name.into(),
        script: script.into(),
        state,
        params: BTreeMap::new(),
        node: None,
        submitted_by: None,
        created_at: Utc::now(),
        started_at: None,
        finished_at: None,
        exit_code: None,
        signal: None,
        reason: None,
        return_values: BTreeMap::new(),
        results: Vec::new(),
        spec: serde_json::json!({}),
        pid: None,
        server: None,
    }
}

async fn all_events(store: &dyn Store) -> Vec<opsbox_api::Event> {
    match store.events_since(0, 100_000).await.unwrap() {
        EventsSince::Events(events) => events,
        EventsSince::Gone { .. } => panic!("nothing was compacted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_all_commit_with_distinct_revisions() {
    let (store, _dir) = store().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append_event(ev("test.append", &i.to_string())).await })
        })
        .collect();
    let events: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let mut revs: Vec<u64> = events.iter().map(|e| e.rev).collect();
    revs.sort();
    assert_eq!(
        revs,
        (1..=200).collect::<Vec<_>>(),
        "distinct, gapless revisions"
    );
    assert_eq!(store.current_revision().await.unwrap(), 200);
    assert_eq!(*store.changes().borrow(), 200);

    // What each caller was told is what the log holds.
    let mut stored = all_events(&*store).await;
    assert_eq!(stored.len(), 200);
    let mut told = events.clone();
    told.sort_by_key(|e| e.rev);
    stored.sort_by_key(|e| e.rev);
    for (a, b) in told.iter().zip(&stored) {
        assert_eq!(
            (a.rev, &a.kind, &a.subject, &a.data),
            (b.rev, &b.kind, &b.subject, &b.data)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_in_a_concurrent_batch_fails_only_that_write() {
    let (store, _dir) = store().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                // The same name, several times: exactly one may win.
                0 => {
                    let j = job("dup@1", "s", JobState::Queued);
                    store
                        .insert_job(&j, ev("job.created", "dup@1"))
                        .await
                        .map(|_| ())
                }
                1 => {
                    let name = format!("job@{i}");
                    let j = job(&name, "s", JobState::Queued);
                    store
                        .insert_job(&j, ev("job.created", &name))
                        .await
                        .map(|_| ())
                }
                _ => store
                    .append_event(ev("test.append", &i.to_string()))
                    .await
                    .map(|_| ()),
            }
        }));
    }
    let results: Vec<(usize, Result<(), StoreError>)> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .enumerate()
        .collect();
    let mut dup_ok = 0;
    for (i, result) in &results {
        match (i % 4, result) {
            (0, Ok(())) => dup_ok += 1,
            (0, Err(StoreError::Conflict(what))) => assert!(what.contains("dup@1"), "{what}"),
            (_, Ok(())) => {}
            (_, Err(e)) => panic!("write {i} failed: {e}"),
        }
    }
    assert_eq!(dup_ok, 1, "exactly one insert of the same name wins");
    // Failed writes left nothing behind: 1 + 10 jobs, and one event per success.
    assert_eq!(
        store.list_jobs(&JobFilter::default()).await.unwrap().len(),
        11
    );
    let events = all_events(&*store).await;
    assert_eq!(events.len(), 1 + 10 + 20);
    assert_eq!(
        events.iter().filter(|e| e.subject == "dup@1").count(),
        1,
        "the losing insert's event was rolled back with it"
    );
    for i in (1..40).step_by(4) {
        assert!(store.get_job(&format!("job@{i}")).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn job_records_round_trip_and_missing_ones_are_not_found() {
    let (store, _dir) = store().await;
    let created = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap()
        // Stores keep times to the microsecond (PostgreSQL's precision).
        + chrono::Duration::nanoseconds(123_456_000);
    let mut record = JobRecord {
        name: "full@1:2:3".into(),
        script: "full".into(),
        state: JobState::Running,
        params: [("a".to_string(), "1 'two' $(3)\n".to_string())].into(),
        node: Some("local".into()),
        submitted_by: Some("alice".into()),
        created_at: created,
        started_at: Some(created + chrono::Duration::milliseconds(5)),
        finished_at: None,
        exit_code: None,
        signal: None,
        reason: None,
        return_values: [("k".to_string(), "v=w".to_string())].into(),
        results: vec![ResultFile {
            path: "sub/x.csv".into(),
            size: 42,
        }],
        spec: serde_json::json!({"lock": true, "timeout_secs": 5}),
        pid: Some(4_000_000),
        // What the store gives back: its owner when servers share it.
        server: store.owner().map(str::to_owned),
    };
    let event = store
        .insert_job(&record, ev("job.created", &record.name))
        .await
        .unwrap();
    assert_eq!(event.kind, "job.created");
    assert_eq!(
        store.get_job(&record.name).await.unwrap().as_ref(),
        Some(&record)
    );

    record.state = JobState::Failed;
    record.finished_at = Some(created + chrono::Duration::seconds(1));
    record.exit_code = Some(2);
    record.signal = Some(9);
    record.reason = Some("because".into());
    record.pid = None;
    let updated = store
        .update_job(&record, ev("job.finished", &record.name))
        .await
        .unwrap();
    assert!(updated.rev > event.rev);
    assert_eq!(
        store.get_job(&record.name).await.unwrap().as_ref(),
        Some(&record)
    );

    assert!(matches!(
        store.insert_job(&record, ev("job.created", "again")).await,
        Err(StoreError::Conflict(_))
    ));
    let ghost = job("ghost@1", "s", JobState::Running);
    assert!(matches!(
        store.update_job(&ghost, ev("job.started", "ghost@1")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .delete_job("ghost@1", ev("job.cleaned", "ghost@1"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_job("ghost@1").await.unwrap(), None);
    // Failed writes added no event.
    assert_eq!(store.current_revision().await.unwrap(), updated.rev);
}

#[tokio::test]
async fn list_jobs_filters_newest_first() {
    let (store, _dir) = store().await;
    let specs = [
        ("a@1", "a", JobState::Succeeded),
        ("b@1", "b", JobState::Failed),
        ("a@2", "a", JobState::Running),
        ("a@3", "a", JobState::Succeeded),
    ];
    for (name, script, state) in specs {
        store
            .insert_job(&job(name, script, state), ev("job.created", name))
            .await
            .unwrap();
    }
    let names = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.name).collect::<Vec<_>>();
    let all = store.list_jobs(&JobFilter::default()).await.unwrap();
    assert_eq!(names(all), ["a@3", "a@2", "b@1", "a@1"]);
    let filter = JobFilter {
        state: Some(JobState::Succeeded),
        script: Some("a".into()),
        limit: None,
    };
    assert_eq!(
        names(store.list_jobs(&filter).await.unwrap()),
        ["a@3", "a@1"]
    );
    let filter = JobFilter {
        limit: Some(2),
        ..JobFilter::default()
    };
    assert_eq!(
        names(store.list_jobs(&filter).await.unwrap()),
        ["a@3", "a@2"]
    );
    let filter = JobFilter {
        script: Some("zzz".into()),
        ..JobFilter::default()
    };
    assert!(store.list_jobs(&filter).await.unwrap().is_empty());
}

#[tokio::test]
async fn output_is_stored_in_order_per_stream_and_deleted_with_its_job() {
    let (store, _dir) = store().await;
    let name = "out@1";
    store
        .insert_job(
            &job(name, "out", JobState::Running),
            ev("job.created", name),
        )
        .await
        .unwrap();
    let chunk = |seq, stream, data: &[u8]| LogChunkBytes {
        seq,
        stream,
        data: data.to_vec(),
    };
    // append_output adds no event, but followers of the log must still wake up.
    let mut changes = store.changes();
    changes.borrow_and_update();
    store
        .append_output(
            name,
            vec![
                chunk(1, Stream::Stdout, b"one\n"),
                chunk(2, Stream::Stderr, b"err\n"),
            ],
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("append_output must bump changes()")
        .unwrap();
    store
        .append_output(
            name,
            vec![
                chunk(3, Stream::Stdout, b"t\xffo\n"),
                chunk(4, Stream::Stdout, b"three"),
            ],
        )
        .await
        .unwrap();
    store.append_output(name, vec![]).await.unwrap();
    // A sequence number used twice is refused.
    assert!(store
        .append_output(name, vec![chunk(4, Stream::Stdout, b"again")])
        .await
        .is_err());

    let first = store.output_since(name, 0, 2).await.unwrap();
    assert_eq!(first.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(first[1].stream, Stream::Stderr);
    assert_eq!(first[1].data, "err\n");
    let rest = store.output_since(name, 2, 100).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(rest[0].data, "t\u{fffd}o\n", "chunks are text, lossily");
    let (out, err) = store.output_bytes(name).await.unwrap();
    assert_eq!(out, b"one\nt\xffo\nthree", "raw bytes stay raw");
    assert_eq!(err, b"err\n");

    store
        .delete_job(name, ev("job.cleaned", name))
        .await
        .unwrap();
    assert!(store.output_since(name, 0, 100).await.unwrap().is_empty());
    assert_eq!(store.output_bytes(name).await.unwrap(), (vec![], vec![]));
}

/// A filtered read copies only what it keeps and says how far it looked.
#[tokio::test]
async fn events_since_matching_keeps_what_is_wanted_and_tells_how_far_it_looked() {
    let (store, _dir) = store().await;
    let start = store.current_revision().await.unwrap();
    let mut revs = Vec::new();
    for i in 0..10 {
        let subject = if i % 2 == 0 { "a" } else { "b" };
        revs.push(store.append_event(ev("test.x", subject)).await.unwrap().rev);
    }
    let wanted = |e: &opsbox_api::Event| e.subject == "a";
    let (found, last) = store
        .events_since_matching(start, 4, &wanted)
        .await
        .unwrap();
    let EventsSince::Events(events) = found else {
        panic!("nothing was compacted")
    };
    assert_eq!(
        events.iter().map(|e| e.rev).collect::<Vec<_>>(),
        [revs[0], revs[2]]
    );
    assert_eq!(last, revs[3], "four events looked at");
    let (found, last) = store
        .events_since_matching(revs[3], 100, &wanted)
        .await
        .unwrap();
    assert_eq!(last, revs[9]);
    assert!(matches!(found, EventsSince::Events(e) if e.len() == 3));
    let (found, last) = store
        .events_since_matching(revs[9], 100, &wanted)
        .await
        .unwrap();
    assert_eq!((found, last), (EventsSince::Events(Vec::new()), revs[9]));
}

/// Reads of a job follow its writes (the SQLite store answers unended jobs from memory).
#[tokio::test]
async fn a_job_read_back_is_its_last_committed_write() {
    let (store, _dir) = store().await;
    let name = "cached@1";
    let read = |store: Arc<dyn Store>| async move { store.get_job(name).await.unwrap() };
    let mut record = job(name, "x", JobState::Queued);
    record.server = store.owner().map(str::to_owned);
    store
        .insert_job(&record, ev("job.created", name))
        .await
        .unwrap();
    assert_eq!(read(store.clone()).await.as_ref(), Some(&record));

    record.state = JobState::Running;
    record.pid = Some(7);
    store
        .write_tasks(TaskWrite {
            job: Some(record.clone()),
            insert_job: false,
            tasks: Vec::new(),
            events: vec![ev("job.progress", name)],
            output: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(read(store.clone()).await.as_ref(), Some(&record));

    // A refused insert of the same name changes nothing.
    let other = job(name, "other", JobState::Queued);
    assert!(matches!(
        store.insert_job(&other, ev("job.created", name)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(read(store.clone()).await.as_ref(), Some(&record));

    // Deleted while it runs.
    store
        .delete_job(name, ev("job.cleaned", name))
        .await
        .unwrap();
    assert_eq!(read(store.clone()).await, None);
    assert!(matches!(
        store.update_job(&record, ev("job.started", name)).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(read(store.clone()).await, None);

    // The name again, for a new job, which then ends.
    let mut again = job(name, "again", JobState::Running);
    again.server = store.owner().map(str::to_owned);
    store
        .insert_job(&again, ev("job.created", name))
        .await
        .unwrap();
    assert_eq!(read(store.clone()).await.as_ref(), Some(&again));
    again.state = JobState::Succeeded;
    store
        .write_job(
            &again,
            JobWrite::Update,
            Vec::new(),
            vec![ev("job.finished", name)],
        )
        .await
        .unwrap();
    assert_eq!(read(store.clone()).await.as_ref(), Some(&again));
}

fn lost_event(job: &JobRecord) -> NewEvent {
    NewEvent::new(
        "test.lost",
        &job.name,
        serde_json::json!({"state": job.state.as_str(), "reason": job.reason}),
    )
}

#[tokio::test]
async fn unfinished_jobs_are_marked_lost_in_one_write() {
    let (store, _dir) = store().await;
    for (name, state) in [
        ("q@1", JobState::Queued),
        ("r@1", JobState::Running),
        ("s@1", JobState::Succeeded),
        ("k@1", JobState::Killed),
    ] {
        store
            .insert_job(&job(name, "x", state), ev("job.created", name))
            .await
            .unwrap();
    }
    let at = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
    let events = store
        .mark_unfinished_lost("gone away", at, lost_event)
        .await
        .unwrap();
    let mut subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    subjects.sort();
    assert_eq!(subjects, ["q@1", "r@1"]);
    for event in &events {
        assert_eq!(event.kind, "test.lost");
        assert_eq!(event.data["state"], "lost");
        assert_eq!(event.data["reason"], "gone away");
    }
    for name in ["q@1", "r@1"] {
        let job = store.get_job(name).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Lost);
        assert_eq!(job.reason.as_deref(), Some("gone away"));
        assert_eq!(job.finished_at, Some(at));
    }
    assert_eq!(
        store.get_job("s@1").await.unwrap().unwrap().state,
        JobState::Succeeded
    );
    assert_eq!(
        store.get_job("k@1").await.unwrap().unwrap().state,
        JobState::Killed
    );
    assert!(store
        .mark_unfinished_lost("again", at, lost_event)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn everything_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rev = {
        let store = open(dir.path()).await;
        store
            .insert_job(
                &job("keep@1", "keep", JobState::Succeeded),
                ev("job.created", "keep@1"),
            )
            .await
            .unwrap();
        store.append_event(ev("test.x", "x")).await.unwrap().rev
    };
    let store = open(dir.path()).await;
    assert_eq!(store.current_revision().await.unwrap(), rev);
    assert_eq!(*store.changes().borrow(), rev);
    assert!(store.get_job("keep@1").await.unwrap().is_some());
    assert_eq!(
        store.append_event(ev("test.y", "y")).await.unwrap().rev,
        rev + 1
    );
}

#[tokio::test]
async fn huge_keep_and_since_values_are_not_wrapped_around() {
    let (store, _dir) = store().await;
    for i in 0..5 {
        store
            .append_event(ev("test.x", &i.to_string()))
            .await
            .unwrap();
    }
    // "Keep everything" spelled as a huge retention drops nothing.
    for keep in [u64::MAX, 1 << 63, i64::MAX as u64] {
        assert_eq!(store.compact_events(keep).await.unwrap(), 0, "keep {keep}");
    }
    assert_eq!(all_events(&*store).await.len(), 5);
    assert_eq!(store.current_revision().await.unwrap(), 5);
    let next = store.append_event(ev("test.y", "y")).await.unwrap();
    assert_eq!(next.rev, 6);
    match store.events_since(5, 10).await.unwrap() {
        EventsSince::Events(events) => assert_eq!(events.len(), 1),
        EventsSince::Gone { .. } => panic!("nothing was compacted"),
    }
    // A revision beyond the newest has no events after it yet: not gone.
    for since in [7, 1 << 40, 1 << 63, u64::MAX] {
        match store.events_since(since, 10).await.unwrap() {
            EventsSince::Events(events) => assert!(events.is_empty(), "since {since}"),
            EventsSince::Gone { .. } => panic!("since {since} is not compacted, it is ahead"),
        }
    }
}

/// Watchers read recent events from the writer's in-memory tail; a second store opened
/// on the same file has an empty tail and reads the database. Both must tell the same
/// story, including writes rolled back inside a group and compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_tail_and_the_database_agree() {
    let (store, dir) = store().await;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 3 == 0 {
                    // Conflicting inserts: all but one are rolled back in their group.
                    let _ = store
                        .insert_job(
                            &job("same@1", "s", JobState::Queued),
                            ev("job.created", "same@1"),
                        )
                        .await;
                } else {
                    store
                        .append_event(ev("test.append", &i.to_string()))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
    let from_tail = all_events(&*store).await;
    let other = open(dir.path()).await;
    let from_disk = all_events(&*other).await;
    assert_eq!(from_tail, from_disk);
    assert_eq!(from_tail.len(), 201);
    // An event another process writes is found by the gap it leaves at the next write.
    other.append_event(ev("test.other", "x")).await.unwrap();
    store.append_event(ev("test.own", "y")).await.unwrap();
    let kinds: Vec<String> = all_events(&*store)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds[kinds.len() - 2..], ["test.other", "test.own"]);
    let from_tail = all_events(&*store).await;
    let from_disk = all_events(&*other).await;
    assert_eq!(from_tail, from_disk);
    // A page from the middle, too.
    let middle = from_tail[99].rev;
    let (EventsSince::Events(a), EventsSince::Events(b)) = (
        store.events_since(middle, 10).await.unwrap(),
        other.events_since(middle, 10).await.unwrap(),
    ) else {
        panic!("nothing was compacted yet");
    };
    assert_eq!(a, b);
    assert_eq!(a.len(), 10);

    // After compaction the tail answers "gone" for what the database dropped.
    assert_eq!(store.compact_events(50).await.unwrap(), 153);
    assert!(matches!(
        store.events_since(0, 10).await.unwrap(),
        EventsSince::Gone { .. }
    ));
    let newest = from_tail.last().unwrap().rev;
    let EventsSince::Events(kept) = store.events_since(newest - 50, 100).await.unwrap() else {
        panic!("the newest 50 are kept");
    };
    assert_eq!(kept.len(), 50);
}

fn task(job: &str, index: u32, seq: i64, state: opsbox_api::TaskState) -> TaskRecord {
    let mut task = opsbox_api::Task::queued(job, "map", index, Some(format!("input {index}")));
    task.state = state;
    TaskRecord {
        task,
        seq,
        excluded: Vec::new(),
    }
}

#[tokio::test]
async fn queued_tasks_answers_the_first_queued_of_each_job_in_submission_order() {
    use opsbox_api::TaskState::{Queued, Running, Succeeded};
    let (store, _dir) = store().await;
    // Three jobs, submitted b (seq 100…), a (200…), c (300…): names do not order them.
    let mut tasks = Vec::new();
    for i in 0..10 {
        // b: its first three are done or running, so its first queued is map:3.
        let state = match i {
            0 | 1 => Succeeded,
            2 => Running,
            _ => Queued,
        };
        tasks.push(task("b@1", i, 100 + i64::from(i), state));
        tasks.push(task("a@2", i, 200 + i64::from(i), Queued));
    }
    tasks.push(task("c@3", 0, 300, Succeeded));
    for job in ["a@2", "b@1", "c@3"] {
        store
            .write_tasks(TaskWrite {
                job: Some(self::job(job, "s", JobState::Running)),
                insert_job: true,
                tasks: tasks
                    .iter()
                    .filter(|t| t.task.job == job)
                    .cloned()
                    .collect(),
                events: Vec::new(),
                output: Vec::new(),
            })
            .await
            .unwrap();
    }
    let ids = |tasks: Vec<TaskRecord>| -> Vec<String> {
        tasks
            .into_iter()
            .map(|t| format!("{} {}", t.task.job, t.task.id))
            .collect()
    };
    assert_eq!(
        ids(store.queued_tasks(2).await.unwrap()),
        ["b@1 map:3", "b@1 map:4", "a@2 map:0", "a@2 map:1"]
    );
    assert_eq!(
        ids(store.queued_tasks(1).await.unwrap()),
        ["b@1 map:3", "a@2 map:0"]
    );
    assert_eq!(store.queued_tasks(100).await.unwrap().len(), 7 + 10);
}
