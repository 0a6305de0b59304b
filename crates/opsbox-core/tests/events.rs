//! The revisioned event log: pages, live follow, resume, compaction.

mod common;

use std::time::Duration;

use common::*;
use futures::{Stream, StreamExt};
use opsbox_api::{Event, JobState};
use opsbox_core::store::NewEvent;
use opsbox_core::{Core, CoreError, CoreResult};

const LIMIT: Duration = Duration::from_secs(10);

async fn next<S: Stream<Item = CoreResult<Event>> + Unpin>(stream: &mut S) -> Event {
    tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("follow stalled")
        .expect("follow ended")
        .unwrap()
}

async fn append(core: &Core, kind: &str) -> Event {
    core.store
        .append_event(NewEvent::new(
            kind,
            "test",
            serde_json::json!({"kind": kind}),
        ))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_run_is_followed_from_a_revision_exactly() {
    let t = open(&[("echo.sh", ECHO_BLOCK, r#"printf '%s\n' "$TEXT""#)]).await;
    let rev0 = t.core.events.current_revision().await.unwrap();
    let mut follow = Box::pin(t.core.events.follow(Some(rev0)).await.unwrap());

    let (job, _) = t
        .core
        .jobs
        .run(
            "echo",
            params(&[("text", "hi"), ("secret", "hunter2")]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);

    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(next(&mut follow).await);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["job.created", "job.started", "job.finished"]);
    assert!(events.iter().all(|e| e.subject == job.name));
    assert!(events[0].rev > rev0);
    for pair in events.windows(2) {
        assert!(
            pair[0].rev < pair[1].rev,
            "revisions must strictly increase"
        );
        assert!(pair[0].at <= pair[1].at);
    }
    assert_eq!(events[0].data["state"], "queued");
    assert_eq!(events[1].data["state"], "running");
    assert_eq!(events[2].data["state"], "succeeded");
    assert_eq!(events[2].data["params"]["secret"], "FILTERED");
    assert!(!serde_json::to_string(&events).unwrap().contains("hunter2"));

    // A page from the same revision gives the same events.
    let page = t.core.events.page(rev0, 100).await.unwrap();
    assert_eq!(page.events, events);
    assert_eq!(page.current_revision, events[2].rev);
    let one = t.core.events.page(rev0, 1).await.unwrap();
    assert_eq!(one.events, events[..1]);

    // Resuming from an event's revision gives exactly the ones after it.
    let mut resumed = Box::pin(t.core.events.follow(Some(events[0].rev)).await.unwrap());
    assert_eq!(next(&mut resumed).await, events[1]);
    assert_eq!(next(&mut resumed).await, events[2]);
    // ...and then waits for new ones.
    let later = append(&t.core, "test.later").await;
    assert_eq!(next(&mut resumed).await, later);
    assert_eq!(next(&mut follow).await, later);
}

#[tokio::test]
async fn follow_from_now_sees_only_new_events_in_order() {
    let t = open(&[]).await;
    append(&t.core, "test.old").await;
    let mut follow = Box::pin(t.core.events.follow(None).await.unwrap());
    let nothing = tokio::time::timeout(Duration::from_millis(100), follow.next()).await;
    assert!(nothing.is_err(), "an old event was replayed: {nothing:?}");

    // Many concurrent writers: the follower sees every event once, in revision order.
    let writers: Vec<_> = (0..50)
        .map(|i| {
            let core = t.core.clone();
            tokio::spawn(async move { append(&core, &format!("test.{i}")).await })
        })
        .collect();
    let mut written: Vec<Event> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    written.sort_by_key(|e| e.rev);
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.push(next(&mut follow).await);
    }
    assert_eq!(seen, written);
    let first = seen[0].rev;
    assert_eq!(
        seen.iter().map(|e| e.rev).collect::<Vec<_>>(),
        (first..first + 50).collect::<Vec<_>>(),
        "appends alone leave no gaps"
    );
}

#[tokio::test]
async fn compacted_revisions_are_gone_with_the_revision_to_relist_from() {
    let t = open(&[]).await;
    let rev0 = t.core.events.current_revision().await.unwrap();
    for i in 0..10 {
        append(&t.core, &format!("test.{i}")).await;
    }
    let current = t.core.events.current_revision().await.unwrap();
    assert_eq!(current, rev0 + 10);
    let present = t.core.events.page(0, 10_000).await.unwrap().events.len() as u64;

    let dropped = t.core.store.compact_events(3).await.unwrap();
    assert_eq!(dropped, present - 3);
    assert_eq!(t.core.events.current_revision().await.unwrap(), current);

    let gone = |r: CoreResult<_>| match r {
        Err(CoreError::Gone { current: c, .. }) => c,
        Err(e) => panic!("expected Gone, got {e:?}"),
        Ok(_) => panic!("expected Gone, got events"),
    };
    assert_eq!(
        gone(t.core.events.page(rev0, 100).await.map(|_| ())),
        current
    );
    assert_eq!(gone(t.core.events.page(0, 100).await.map(|_| ())), current);
    match t.core.events.page(current - 4, 100).await {
        Err(CoreError::Gone { since, current: c }) => {
            assert_eq!((since, c), (current - 4, current))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        gone(t.core.events.follow(Some(rev0)).await.map(|_| ())),
        current
    );
    // A revision never given out is refused, not waited for.
    assert!(matches!(
        t.core.events.page(current + 1, 100).await,
        Err(CoreError::Invalid(_))
    ));
    assert!(matches!(
        t.core.events.follow(Some(current + 1000)).await.map(|_| ()),
        Err(CoreError::Invalid(_))
    ));
    // The oldest revision still kept can be resumed from.
    let kept = t.core.events.page(current - 3, 100).await.unwrap();
    assert_eq!(
        kept.events.iter().map(|e| e.rev).collect::<Vec<_>>(),
        [current - 2, current - 1, current]
    );
    let mut follow = Box::pin(t.core.events.follow(Some(current - 3)).await.unwrap());
    for rev in current - 2..=current {
        assert_eq!(next(&mut follow).await.rev, rev);
    }
    // Compacting is idempotent and never goes back.
    assert_eq!(t.core.store.compact_events(3).await.unwrap(), 0);
    assert_eq!(t.core.store.compact_events(1_000).await.unwrap(), 0);
    assert!(t.core.events.page(current - 3, 100).await.is_ok());

    // Keep nothing: the revision survives, and new events continue after it.
    assert_eq!(t.core.store.compact_events(0).await.unwrap(), 3);
    assert_eq!(t.core.events.current_revision().await.unwrap(), current);
    assert!(t
        .core
        .events
        .page(current, 100)
        .await
        .unwrap()
        .events
        .is_empty());
    let new = append(&t.core, "test.after").await;
    assert_eq!(new.rev, current + 1, "revisions are never reused");
    assert_eq!(next(&mut follow).await, new);

    // All of it survives a restart.
    let config = t.core.config.as_ref().clone();
    drop(follow);
    drop(t.core);
    let core = Core::open(config).await.unwrap();
    assert_eq!(core.events.current_revision().await.unwrap(), current + 1);
    assert!(matches!(
        core.events.page(rev0, 100).await,
        Err(CoreError::Gone { .. })
    ));
    assert_eq!(core.events.page(current, 100).await.unwrap().events, [new]);
}

#[tokio::test]
async fn a_follower_that_falls_behind_compaction_gets_gone() {
    let t = open(&[]).await;
    let start = t.core.events.current_revision().await.unwrap();
    let mut follow = Box::pin(t.core.events.follow(Some(start)).await.unwrap());
    for i in 0..5 {
        append(&t.core, &format!("test.{i}")).await;
    }
    t.core.store.compact_events(1).await.unwrap();
    let item = tokio::time::timeout(LIMIT, follow.next())
        .await
        .unwrap()
        .expect("the stream must say why it stops");
    match item {
        Err(CoreError::Gone { since, current }) => {
            assert_eq!(since, start);
            assert_eq!(current, start + 5);
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    assert!(follow.next().await.is_none());
}

#[tokio::test]
async fn reload_is_an_event_with_the_new_catalog() {
    let t = open(&[("one.sh", "", "true")]).await;
    write_script(&t.scripts_dir(), "two.sh", "", "true");
    write_script(
        &t.scripts_dir(),
        "broken.sh",
        "# -- jojo --\n# param: a\n",
        "true",
    );
    std::fs::write(t.scripts_dir().join("plain.sh"), "#!/bin/sh\n").unwrap();
    assert!(t.core.scripts.catalog().get("two").is_none());

    let report = t.core.reload().await.unwrap();
    assert_eq!(report.scripts, 2);
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert_eq!(
        report.revision,
        t.core.events.current_revision().await.unwrap()
    );
    let page = t.core.events.page(report.revision - 1, 10).await.unwrap();
    assert_eq!(page.events.len(), 1);
    let event = &page.events[0];
    assert_eq!(event.kind, "scripts.reloaded");
    assert_eq!(event.rev, report.revision);
    assert_eq!(event.data["scripts"], serde_json::json!(["one", "two"]));
    assert_eq!(event.data["problems"].as_array().unwrap().len(), 2);

    assert!(t.core.scripts.catalog().get("two").is_some());
    let (job, _) = t.core.jobs.run("two", params(&[]), None).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);

    std::fs::remove_file(t.scripts_dir().join("one.sh")).unwrap();
    t.core.reload().await.unwrap();
    assert!(matches!(
        t.core.jobs.submit("one", params(&[]), None).await,
        Err(CoreError::UnknownScript(_))
    ));
}
