//! The native queue API over a real socket: batches, long poll, lease, stats, edits
//! and node-bound tokens.

mod common;

use std::time::{Duration, Instant};

use common::{client, TestServer};
use opsbox_api::{AckResponse, DeleteReport, Message, MessageList, QueueStats, QueueStatsList};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn push(s: &TestServer, to: &str, from: &str, messages: Value) -> reqwest::Response {
    client()
        .post(s.url(&format!("/v1/queues/{to}/messages?from={from}")))
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .unwrap()
}

async fn pull(s: &TestServer, node: &str, body: Value) -> Vec<Message> {
    let r = client()
        .post(s.url(&format!("/v1/queues/{node}/pull")))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<MessageList>().await.unwrap().messages
}

#[tokio::test]
async fn batch_push_pull_ack_with_every_payload_kind() {
    let s = TestServer::start().await;
    let r = push(
        &s,
        "worker",
        "boss",
        json!([
            {"payload": {"task": 1}},
            {"payload": "plain text"},
            {"payload": "AAEC", "kind": "binary", "payload_type": ".bin"}
        ]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let pushed = r.json::<MessageList>().await.unwrap().messages;
    assert_eq!(pushed.len(), 3);
    assert_eq!(pushed[0].payload_type, "application/json");
    assert_eq!(pushed[1].payload_type, "text/plain");
    assert_eq!(pushed[2].payload, json!("AAEC"));

    let got = pull(&s, "worker", json!({"max": 2})).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload, json!({"task": 1}));
    assert_eq!(got[1].payload, json!("plain text"));
    assert_eq!(got[0].tries, 1);

    let stats: QueueStats = client()
        .get(s.url("/v1/queues/worker"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((stats.pending, stats.processing), (1, 2));

    let r = client()
        .post(s.url("/v1/queues/worker/ack"))
        .json(&json!({"ids": [got[0].id, got[1].id, "0123456789abcdef01234567"]}))
        .send()
        .await
        .unwrap();
    let acked: AckResponse = r.json().await.unwrap();
    assert_eq!(acked.acked.len(), 2);
    assert_eq!(acked.missing, ["0123456789abcdef01234567"]);

    let all: QueueStatsList = client()
        .get(s.url("/v1/queues"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.queues[0].processed, 2);
    let listed: MessageList = client()
        .get(s.url("/v1/queues/worker/messages?status=processed"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.messages.len(), 2);
    s.shutdown().await;
}

#[tokio::test]
async fn a_pull_waits_for_a_message_and_a_lease_delivers_again() {
    let s = TestServer::start().await;
    let started = Instant::now();
    assert!(pull(&s, "n1", json!({"wait": 0.3})).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));

    let waiting = {
        let url = s.url("/v1/queues/n1/pull");
        tokio::spawn(async move {
            client()
                .post(url)
                .json(&json!({"wait": 10, "lease": 0.3}))
                .send()
                .await
                .unwrap()
                .json::<MessageList>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    push(&s, "n1", "n2", json!([{"payload": "hi"}])).await;
    let got = waiting.await.unwrap().messages;
    assert_eq!(got.len(), 1);
    assert!(got[0].lease_until.is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = pull(&s, "n1", json!({})).await;
    assert_eq!(
        (again[0].id.clone(), again[0].tries),
        (got[0].id.clone(), 2)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn absurd_leases_are_cut_to_a_year_and_bad_ones_refused() {
    let s = TestServer::start().await;
    push(&s, "n1", "n2", json!([{"payload": "hi"}])).await;
    let got = pull(&s, "n1", json!({"lease": 1e308})).await;
    let until = got[0].lease_until.expect("leased");
    let year = chrono::Duration::days(366);
    assert!(until < chrono::Utc::now() + year, "{until}");
    let r = client()
        .post(s.url("/v1/queues/n1/pull"))
        .json(&json!({"lease": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    s.shutdown().await;
}

#[tokio::test]
async fn get_update_delete_by_id() {
    let s = TestServer::start().await;
    let pushed = push(
        &s,
        "b",
        "a",
        json!([{"payload": {"v": 1}}, {"payload": "two"}]),
    )
    .await
    .json::<MessageList>()
    .await
    .unwrap()
    .messages;
    let url = s.url(&format!("/v1/messages/{}", pushed[0].id));
    let got: Message = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got.payload, json!({"v": 1}));
    let r = client()
        .patch(&url)
        .json(&json!({"payload": {"v": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Message>().await.unwrap().payload, json!({"v": 2}));
    let r = client().delete(&url).send().await.unwrap();
    assert_eq!(r.json::<DeleteReport>().await.unwrap().deleted, 1);
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Once delivered, it can no longer be changed.
    pull(&s, "b", json!({})).await;
    let url = s.url(&format!("/v1/messages/{}", pushed[1].id));
    let r = client()
        .patch(&url)
        .json(&json!({"payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = client()
        .delete(s.url("/v1/queues/b/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<DeleteReport>().await.unwrap().deleted, 1);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_a_400() {
    let s = TestServer::start().await;
    assert_eq!(
        push(&s, "b", "a", json!([])).await.status(),
        StatusCode::BAD_REQUEST
    );
    let r = push(&s, "b", "a", json!([{"payload": "***", "kind": "binary"}])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(
        &s,
        "b",
        "a",
        json!([{"payload": 1, "scheduled_at": "2001-01-01T00:00:00Z"}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(&s, "b%20c", "a", json!([{"payload": 1}])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    s.shutdown().await;
}

#[tokio::test]
async fn node_tokens_act_only_as_their_nodes() {
    let s = TestServer::start().await;
    let created: Value = client()
        .post(s.url("/v1/tokens"))
        .json(&json!({"role": "operator", "nodes": ["n1"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap();
    let as_token = |path: &str| {
        client()
            .post(s.url(path))
            .bearer_auth(secret)
            .json(&json!({"messages": [{"payload": 1}]}))
    };
    let r = as_token("/v1/queues/n2/messages?from=n1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = as_token("/v1/queues/n1/messages?from=n2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = client()
        .post(s.url("/v1/queues/n2/pull"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = client()
        .post(s.url("/v1/queues/n2/pull"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    s.shutdown().await;
}

/// A pull of `max: 0` is refused (a pull claims what it returns, so it cannot ask for
/// none) and claims nothing.
#[tokio::test]
async fn a_pull_of_max_zero_is_refused_and_claims_nothing() {
    let s = TestServer::start().await;
    let r = push(&s, "n1", "boss", json!([{"payload": "only"}])).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client()
        .post(s.url("/v1/queues/n1/pull"))
        .json(&json!({"max": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_request", "{body}");
    let got = pull(&s, "n1", json!({})).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, json!("only"));
    assert_eq!(got[0].tries, 1);
    s.shutdown().await;
}
