//! Queues survive a crash: pushes and acks under load, SIGKILL of the server, a new
//! server on the same data directory. Every push answered 201 is there exactly once
//! with its payload; nothing acked is delivered again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod serving;
use serving::{free_port, serve};

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_pushes_and_acks_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (data, scripts) = (dir.path().join("data"), dir.path().join("scripts"));
    std::fs::create_dir_all(&scripts).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut first = serve(&data, &scripts, port).await;

    // id → payload of every push answered 201; ids answered 200 on ack.
    let pushed: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for producer in 0..16 {
        let (base, pushed) = (base.clone(), pushed.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0.. {
                let body = format!("p{producer}-{n}");
                let answer = http
                    .post(format!("{base}/messageQueue"))
                    .header("Authorization", "any")
                    .header("Scirocco-Node-Source", "aa")
                    .header("Scirocco-Node-Destination", "bb")
                    .header("Content-Type", "text/plain")
                    .body(body.clone())
                    .send()
                    .await;
                let Ok(answer) = answer else { return };
                if answer.status() == 201 {
                    let id = answer.headers()["scirocco-id"].to_str().unwrap().to_owned();
                    pushed.lock().unwrap().insert(id, body);
                }
            }
        }));
    }
    for _ in 0..4 {
        let (base, acked) = (base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let pulled = http
                    .get(format!("{base}/messageQueue"))
                    .header("Authorization", "any")
                    .header("Scirocco-Node-Source", "bb")
                    .header("Content-Type", "application/octet-stream")
                    .send()
                    .await;
                let Ok(pulled) = pulled else { return };
                if pulled.status() != 200 {
                    continue;
                }
                let id = pulled.headers()["scirocco-id"].to_str().unwrap().to_owned();
                let answer = http
                    .patch(format!("{base}/messageQueue/{id}/ack"))
                    .header("Authorization", "any")
                    .header("Scirocco-Node-Source", "bb")
                    .header("Content-Length", "0")
                    .send()
                    .await;
                let Ok(answer) = answer else { return };
                if answer.status() == 200 {
                    acked.lock().unwrap().insert(id);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let pushed = pushed.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    assert!(
        pushed.len() > 50,
        "too little load to mean anything: {}",
        pushed.len()
    );
    assert!(!acked.is_empty(), "nothing was acked before the kill");

    let _second = serve(&data, &scripts, port).await;
    let http = reqwest::Client::new();
    let listed: Value = http
        .get(format!("{base}/v1/queues/bb/messages?limit=10000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = listed["messages"].as_array().unwrap();
    let mut seen = HashSet::new();
    for m in listed {
        let id = m["id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "message {id} is stored twice");
        if acked.contains(&id) {
            assert_eq!(
                m["status"], "processed",
                "acked message {id} came back as {}",
                m["status"]
            );
        }
    }
    for (id, body) in &pushed {
        let stored = listed
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap_or_else(|| panic!("push {id} was answered 201 but is gone"));
        assert_eq!(stored["payload"], body.as_str());
    }

    // Drain the queue: nothing acked is delivered again.
    let mut delivered = 0;
    loop {
        let pulled: Value = http
            .post(format!("{base}/v1/queues/bb/pull"))
            .json(&serde_json::json!({"max": 1000}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages = pulled["messages"].as_array().unwrap();
        if messages.is_empty() {
            break;
        }
        for m in messages {
            let id = m["id"].as_str().unwrap();
            assert!(
                !acked.contains(id),
                "acked message {id} was delivered again"
            );
            delivered += 1;
        }
    }
    eprintln!(
        "{} pushes answered, {} acked before SIGKILL; {} delivered after restart",
        pushed.len(),
        acked.len(),
        delivered
    );
}
