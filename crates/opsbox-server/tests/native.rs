//! The native API over a real socket against a real SQLite store: each test starts a
//! server on an ephemeral loopback port with its own data and scripts directories.

use std::collections::BTreeMap;
use std::time::Duration;

use opsbox_api::{
    CreatedToken, EventPage, Job, JobList, JobOutput, JobState, NewToken, Role, RunResponse,
    ScriptList, WaitResponse,
};
use opsbox_server::{Server, ServerConfig};

mod common;
use common::{alive, client, seg, write_script, TestServer};
use serde_json::json;

#[tokio::test]
async fn catalog_and_run_with_hostile_params() {
    let server = TestServer::start().await;
    let list: ScriptList = server.get_json("/v1/scripts").await;
    let names: Vec<&str> = list.scripts.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["echo", "report", "sleepy"]);

    let marker = server.data.join("pwned");
    let hostile = format!(
        "$(touch {m}) ; touch {m} `touch {m}` 'quoted' \"double\"\nnew line * $HOME",
        m = marker.display()
    );
    let response: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": hostile}})),
        )
        .await;
    assert_eq!(response.job.state, JobState::Succeeded);
    let output = response.output.unwrap();
    assert_eq!(
        output.stdout.join("\n"),
        hostile,
        "the value must arrive verbatim"
    );
    assert!(!marker.exists(), "a parameter value was executed");
    server.shutdown().await;
}

#[tokio::test]
async fn clear_errors_for_bad_runs() {
    let server = TestServer::start().await;
    let http = client();
    let cases = [
        (
            "/v1/scripts/nope/run",
            json!({}),
            404,
            "no script named 'nope'",
        ),
        (
            "/v1/scripts/echo/run",
            json!({}),
            400,
            "missing required param 'text'",
        ),
        (
            "/v1/scripts/echo/run",
            json!({"params": {"text": "x", "color": "red"}}),
            400,
            "unknown param 'color'",
        ),
        (
            "/v1/scripts/echo/run",
            json!({"params": {"text": 5}}),
            400,
            "invalid JSON body",
        ),
    ];
    for (path, body, status, message) in cases {
        let response = http
            .post(server.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(
            error["message"].as_str().unwrap().contains(message),
            "{path}: {error}"
        );
    }
    let response = http
        .post(server.url("/v1/scripts/echo/run"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let response = http
        .get(server.url("/v1/jobs/none@1:2:3"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let response = http
        .get(server.url("/v1/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let response = http
        .get(server.url("/v1/jobs?state=sleeping"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    server.shutdown().await;
}

#[tokio::test]
async fn failed_job_keeps_output_values_and_results() {
    let server = TestServer::start().await;
    let http = client();
    let response: RunResponse = server.post_json("/v1/scripts/report/run", None).await;
    let job = response.job;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.exit_code, Some(3));
    assert_eq!(job.reason.as_deref(), Some("exited with status 3"));
    assert_eq!(
        job.return_values.get("answer").map(String::as_str),
        Some("42")
    );
    assert_eq!(response.output.unwrap().stderr, vec!["oops"]);
    assert_eq!(job.results.len(), 1);
    assert_eq!(job.results[0].path, "sub/a.txt");

    let name = seg(&job.name);
    let file = http
        .get(server.url(&format!("/v1/jobs/{name}/results/sub/a.txt")))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status().as_u16(), 200);
    assert_eq!(file.text().await.unwrap(), "hello\n");
    let escape = http
        .get(server.url(&format!(
            "/v1/jobs/{name}/results/..%2F..%2Fdata%2Fopsbox.db"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(escape.status().as_u16(), 404);

    let log: JobOutput = server.get_json(&format!("/v1/jobs/{name}/log")).await;
    assert_eq!(log.stdout, vec!["jojo_return_value answer=42"]);
    let spec: serde_json::Value = server.get_json(&format!("/v1/jobs/{name}/spec")).await;
    assert_eq!(spec["script"], "report");

    // Clean removes it.
    let cleaned = http
        .delete(server.url(&format!("/v1/jobs/{name}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cleaned.status().as_u16(), 204);
    let gone = http
        .get(server.url(&format!("/v1/jobs/{name}")))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn timeout_and_kill_leave_no_process_behind() {
    let server = TestServer::start().await;
    // Timeout: the script's `timeout: 2` ends it, background child included.
    let response: RunResponse = server.post_json("/v1/scripts/sleepy/run", None).await;
    assert_eq!(response.job.state, JobState::Failed);
    assert_eq!(response.job.reason.as_deref(), Some("timed out after 2s"));
    let pid_file = server
        .data
        .join("results")
        .join(&response.job.name)
        .join("child.pid");
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "background child {pid} outlived the timeout");

    // Kill mid-run, with wait timing out first.
    let started: RunResponse = server
        .post_json("/v1/scripts/sleepy/run?wait=false", None)
        .await;
    let name = seg(&started.job.name);
    let waited: WaitResponse = server
        .get_json(&format!("/v1/jobs/{name}/wait?timeout=0.3"))
        .await;
    assert!(!waited.done);
    let killed: Job = server
        .post_json(&format!("/v1/jobs/{name}/kill"), None)
        .await;
    assert_eq!(killed.state, JobState::Killed);
    assert_eq!(
        killed.reason.as_deref(),
        Some("killed by an anonymous caller")
    );
    let pid_file = server
        .data
        .join("results")
        .join(&started.job.name)
        .join("child.pid");
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "background child {pid} outlived the kill");
    let waited: WaitResponse = server
        .get_json(&format!("/v1/jobs/{name}/wait?timeout=5"))
        .await;
    assert!(waited.done);
    let running: JobList = server.get_json("/v1/jobs?state=running").await;
    assert!(running.jobs.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn follow_log_over_sse() {
    let server = TestServer::start().await;
    write_script(
        &server.scripts,
        "ticks.sh",
        "",
        "for i in 1 2 3; do echo tick $i; sleep 0.2; done",
    );
    let http = client();
    let reload: serde_json::Value = server.post_json("/v1/reload", None).await;
    assert_eq!(reload["scripts"], 4);
    let started: RunResponse = server
        .post_json("/v1/scripts/ticks/run?wait=false", None)
        .await;
    let name = seg(&started.job.name);
    let body = http
        .get(server.url(&format!("/v1/jobs/{name}/log?follow=true")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = data
        .iter()
        .filter(|e| e["type"] == "output")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(text, "tick 1\ntick 2\ntick 3\n");
    let last = data.last().unwrap();
    assert_eq!(last["type"], "end");
    assert_eq!(last["state"], "succeeded");
    server.shutdown().await;
}

#[tokio::test]
async fn watch_resumes_from_a_revision_and_compacted_is_gone() {
    let server = TestServer::start().await;
    let http = client();
    let first: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": "one"}})),
        )
        .await;
    let page: EventPage = server.get_json("/v1/events?since=0").await;
    let mark = page.current_revision;
    assert!(page
        .events
        .iter()
        .any(|e| e.subject == first.job.name && e.kind == "job.finished"));

    // Start following from `mark` before more happens, over SSE.
    let follow = http
        .get(server.url(&format!("/v1/events?since={mark}&follow=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status().as_u16(), 200);
    let second: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": "two"}})),
        )
        .await;
    let mut stream = follow.bytes_stream();
    let mut text = String::new();
    use futures::StreamExt;
    let mut seen: Vec<(u64, String, String)> = Vec::new();
    while seen.len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("events should arrive")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let message: String = text.drain(..end + 2).collect();
            if let Some(data) = message.lines().find_map(|l| l.strip_prefix("data: ")) {
                let event: opsbox_api::Event = serde_json::from_str(data).unwrap();
                seen.push((event.rev, event.kind, event.subject));
            }
        }
    }
    assert_eq!(
        seen[0].0,
        mark + 1,
        "resume must start right after the revision"
    );
    assert!(seen.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    let kinds: Vec<&str> = seen.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(kinds, vec!["job.created", "job.started", "job.finished"]);
    assert!(seen.iter().all(|s| s.2 == second.job.name));

    // Compaction: revision 0 is gone now, with the revision to re-list from.
    server_compact(&server, 1).await;
    let gone = http
        .get(server.url("/v1/events?since=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 410);
    let body: serde_json::Value = gone.json().await.unwrap();
    assert_eq!(body["error"], "gone");
    assert!(body["current_revision"].as_u64().unwrap() >= mark + 3);
    server.shutdown().await;
}

/// Compacts the server's event log, as its periodic compaction does.
async fn server_compact(server: &TestServer, keep: u64) {
    server.core.store.compact_events(keep).await.unwrap();
}

#[tokio::test]
async fn every_route_needs_credentials_once_auth_is_configured() {
    let server = TestServer::start().await;
    let http = client();
    // Open server: create an admin token, which turns auth on.
    let created: CreatedToken = http
        .post(server.url("/v1/tokens"))
        .json(&NewToken {
            role: Role::Admin,
            nodes: vec![],
            description: Some("test".into()),
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let routes: &[(&str, &str)] = &[
        ("GET", "/v1/info"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/scripts"),
        ("GET", "/v1/scripts/echo"),
        ("POST", "/v1/scripts/echo/run"),
        ("POST", "/v1/reload"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x@1:2:3"),
        ("DELETE", "/v1/jobs/x@1:2:3"),
        ("GET", "/v1/jobs/x@1:2:3/spec"),
        ("GET", "/v1/jobs/x@1:2:3/log"),
        ("GET", "/v1/jobs/x@1:2:3/log/ws"),
        ("GET", "/v1/jobs/x@1:2:3/wait"),
        ("POST", "/v1/jobs/x@1:2:3/kill"),
        ("GET", "/v1/jobs/x@1:2:3/results"),
        ("GET", "/v1/jobs/x@1:2:3/results/a.txt"),
        ("GET", "/v1/events"),
        ("GET", "/v1/events/ws"),
        ("GET", "/v1/users"),
        ("POST", "/v1/users"),
        ("DELETE", "/v1/users/bob"),
        ("GET", "/v1/tokens"),
        ("POST", "/v1/tokens"),
        ("DELETE", "/v1/tokens/abc"),
        ("GET", "/v1/no-such-route"),
    ];
    for (method, path) in routes {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let anonymous = http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            anonymous.status().as_u16(),
            401,
            "{method} {path} without credentials"
        );
        assert!(anonymous.headers().contains_key("www-authenticate"));
        let wrong = http
            .request(method.clone(), server.url(path))
            .bearer_auth("obx_nope_nope")
            .send()
            .await
            .unwrap();
        assert_eq!(
            wrong.status().as_u16(),
            401,
            "{method} {path} with a wrong token"
        );
        let basic = http
            .request(method.clone(), server.url(path))
            .basic_auth("nobody", Some("x"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            basic.status().as_u16(),
            401,
            "{method} {path} with a wrong password"
        );
    }
    // The token works, and roles are enforced.
    let info = http
        .get(server.url("/v1/info"))
        .bearer_auth(&created.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(info.status().as_u16(), 200);
    let user = http
        .post(server.url("/v1/users"))
        .bearer_auth(&created.secret)
        .json(&json!({"name": "reader", "password": "pa:ss word", "role": "reader"}))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status().as_u16(), 201);
    let read = http
        .get(server.url("/v1/scripts"))
        .basic_auth("reader", Some("pa:ss word"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    let run = http
        .post(server.url("/v1/scripts/echo/run"))
        .basic_auth("reader", Some("pa:ss word"))
        .json(&json!({"params": {"text": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status().as_u16(), 403);
    let info: serde_json::Value = http
        .get(server.url("/v1/info"))
        .basic_auth("reader", Some("pa:ss word"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["you"], "reader");
    assert_eq!(info["auth_required"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn tls_listener_with_a_self_signed_certificate() {
    let server = TestServer::start_with(|c| c.listen = vec!["https://127.0.0.1:0".into()]).await;
    assert!(server.base.starts_with("https://"));
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let info = http.get(server.url("/v1/info")).send().await.unwrap();
    assert_eq!(info.status().as_u16(), 200);
    assert!(server.data.join("tls/cert.pem").exists());
    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let pinned = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .min_tls_version(version)
            .max_tls_version(version)
            .build()
            .unwrap();
        let info = pinned.get(server.url("/v1/info")).send().await.unwrap();
        assert_eq!(info.status().as_u16(), 200, "{version:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn non_loopback_without_credentials_is_refused_and_bodies_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: vec!["0.0.0.0:0".into()],
        data: dir.path().join("data"),
        scripts: dir.path().join("scripts"),
        ..ServerConfig::default()
    };
    let refused = Server::bind(config.clone())
        .await
        .err()
        .expect("must refuse");
    assert!(refused.to_string().contains("--insecure"), "{refused}");

    let server = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let big = json!({"params": {"text": "x".repeat(4096)}});
    let response = client()
        .post(server.url("/v1/scripts/echo/run"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large", "{body}");
    server.shutdown().await;
}

/// Errors that axum writes itself (a bad query string, a wrong method) come in the
/// API's JSON form too.
#[tokio::test]
async fn every_error_answer_is_json() {
    let server = TestServer::start().await;
    for (method, path, status, code) in [
        ("GET", "/v1/events?since=abc", 400, "bad_request"),
        ("GET", "/v1/jobs?limit=x", 400, "bad_request"),
        ("GET", "/v1/jobs/x@1/wait?timeout=abc", 400, "bad_request"),
        ("PUT", "/v1/scripts/echo/run", 405, "method_not_allowed"),
        ("GET", "/v1/info", 200, ""),
        ("GET", "/v1/nosuch", 404, "not_found"),
    ] {
        let response = client()
            .request(method.parse().unwrap(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        if status == 200 {
            continue;
        }
        if status == 405 {
            assert!(response.headers().contains_key("allow"), "{path}");
        }
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{method} {path}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn openapi_document_lists_the_routes() {
    let server = TestServer::start().await;
    let doc: serde_json::Value = server.get_json("/v1/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/queues/{node}/pull",
        "/v1/messages/{id}",
        "/v1/scripts",
        "/v1/scripts/{name}/run",
        "/v1/jobs/{name}/wait",
        "/v1/events",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    let _: BTreeMap<String, serde_json::Value> =
        serde_json::from_value(doc["components"]["schemas"].clone()).unwrap();
    server.shutdown().await;
}

/// QA: the OpenAPI document declares what the handlers answer. Each case below is
/// provoked on the running server first, so the document is checked against real
/// answers: the 400s and 404s (and 409s) they return, `text/event-stream` for the
/// follow endpoints, and an optional body where an empty one is taken.
#[tokio::test]
async fn openapi_document_declares_what_the_handlers_answer() {
    let server = TestServer::start().await;
    let doc: serde_json::Value = server.get_json("/v1/openapi.json").await;
    let http = client();
    let operation = |method: &str, path: &str| -> serde_json::Value {
        let op = doc["paths"][path][method.to_lowercase()].clone();
        assert!(op.is_object(), "{method} {path} missing from the document");
        op
    };

    // A job that exists, and a message that is already delivered.
    let run: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": "x"}})),
        )
        .await;
    let job = seg(&run.job.name);
    let pushed: serde_json::Value = server
        .post_json(
            "/v1/queues/n1/messages",
            Some(json!({"messages": [{"payload": "hi"}]})),
        )
        .await;
    let id = pushed["messages"][0]["id"].as_str().unwrap().to_owned();
    let pull = http
        .post(server.url("/v1/queues/n1/pull"))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status().as_u16(), 200, "a pull with no body is taken");

    // Over the default body limit (1 MiB).
    let big = format!(r#"{{"x": "{}"}}"#, "x".repeat(2 << 20));
    let cases: Vec<(&str, &str, String, Option<&str>, u16)> = vec![
        // 400: a query string, a body or a value the handler refuses.
        ("GET", "/v1/jobs", "/v1/jobs?state=nope".into(), None, 400),
        (
            "POST",
            "/v1/scripts/{name}/run",
            "/v1/scripts/echo/run".into(),
            Some("{"),
            400,
        ),
        (
            "GET",
            "/v1/jobs/{name}/log",
            format!("/v1/jobs/{job}/log?follow=maybe"),
            None,
            400,
        ),
        (
            "GET",
            "/v1/jobs/{name}/wait",
            format!("/v1/jobs/{job}/wait?timeout=-1"),
            None,
            400,
        ),
        (
            "GET",
            "/v1/events",
            "/v1/events?since=999999999".into(),
            None,
            400,
        ),
        ("POST", "/v1/users", "/v1/users".into(), Some("{"), 400),
        ("POST", "/v1/tokens", "/v1/tokens".into(), Some("{"), 400),
        ("POST", "/v1/jobs", "/v1/jobs".into(), Some("{"), 400),
        (
            "GET",
            "/v1/queues/{node}",
            "/v1/queues/a%20b".into(),
            None,
            400,
        ),
        (
            "POST",
            "/v1/queues/{node}/messages",
            "/v1/queues/n1/messages".into(),
            Some("{"),
            400,
        ),
        (
            "POST",
            "/v1/queues/{node}/pull",
            "/v1/queues/n1/pull".into(),
            Some(r#"{"wait": -1}"#),
            400,
        ),
        (
            "POST",
            "/v1/queues/{node}/ack",
            "/v1/queues/n1/ack".into(),
            Some("{"),
            400,
        ),
        // The ids to ack are required: no body is not an ack of nothing.
        (
            "POST",
            "/v1/queues/{node}/ack",
            "/v1/queues/n1/ack".into(),
            None,
            400,
        ),
        (
            "GET",
            "/v1/queues/{node}/messages",
            "/v1/queues/n1/messages?status=nope".into(),
            None,
            400,
        ),
        (
            "DELETE",
            "/v1/queues/{node}/messages",
            "/v1/queues/n1/messages?status=nope".into(),
            None,
            400,
        ),
        (
            "PATCH",
            "/v1/messages/{id}",
            format!("/v1/messages/{id}"),
            Some("{"),
            400,
        ),
        // 404: what the path names does not exist.
        (
            "GET",
            "/v1/jobs/{name}/log",
            "/v1/jobs/nope@1/log".into(),
            None,
            404,
        ),
        (
            "GET",
            "/v1/jobs/{name}/wait",
            "/v1/jobs/nope@1/wait".into(),
            None,
            404,
        ),
        (
            "GET",
            "/v1/jobs/{name}/results",
            "/v1/jobs/nope@1/results".into(),
            None,
            404,
        ),
        (
            "GET",
            "/v1/jobs/{name}/tasks",
            "/v1/jobs/nope@1/tasks".into(),
            None,
            404,
        ),
        (
            "POST",
            "/v1/scripts/{name}/run",
            "/v1/scripts/nope/run".into(),
            None,
            404,
        ),
        (
            "GET",
            "/v1/messages/{id}",
            "/v1/messages/00000000000000000000abcd".into(),
            None,
            404,
        ),
        (
            "PATCH",
            "/v1/model/applications/{app}/config",
            "/v1/model/applications/nope/config".into(),
            Some("{}"),
            404,
        ),
        (
            "PUT",
            "/v1/model/applications/{app}/constraints",
            "/v1/model/applications/nope/constraints".into(),
            Some("{}"),
            404,
        ),
        (
            "POST",
            "/v1/model/applications/{app}/units",
            "/v1/model/applications/nope/units".into(),
            Some("{}"),
            404,
        ),
        (
            "DELETE",
            "/v1/model/units/{app}/{n}",
            "/v1/model/units/nope/0".into(),
            None,
            404,
        ),
        ("POST", "/v1/backups", "/v1/backups".into(), Some("{"), 400),
        (
            "GET",
            "/v1/backups/{id}",
            "/v1/backups/%20x".into(),
            None,
            400,
        ),
        (
            "GET",
            "/v1/backups/{id}/file",
            "/v1/backups/%20x/file".into(),
            None,
            400,
        ),
        (
            "GET",
            "/v1/model/charms/{name}",
            "/v1/model/charms/zz:bar".into(),
            None,
            400,
        ),
        (
            "POST",
            "/v1/model/relations",
            "/v1/model/relations".into(),
            Some(r#"{"endpoints": ["nope", "nada"]}"#),
            404,
        ),
        // 413: a body over the limit.
        (
            "POST",
            "/v1/queues/{node}/messages",
            "/v1/queues/n1/messages".into(),
            Some(big.as_str()),
            413,
        ),
        // 409: the message was delivered already.
        (
            "PATCH",
            "/v1/messages/{id}",
            format!("/v1/messages/{id}"),
            Some(r#"{"payload": "x"}"#),
            409,
        ),
        (
            "DELETE",
            "/v1/messages/{id}",
            format!("/v1/messages/{id}"),
            None,
            409,
        ),
    ];
    let mut wrong = Vec::new();
    for (method, path, url, body, status) in cases {
        let mut request = http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            server.url(&url),
        );
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let answer = request.send().await.unwrap();
        let answered = answer.status().as_u16();
        if answered != status {
            wrong.push(format!("{method} {url} answers {answered}, not {status}"));
            continue;
        }
        let declared = &operation(method, path)["responses"][status.to_string()];
        let schema = &declared["content"]["application/json"]["schema"]["$ref"];
        if !declared.is_object() {
            wrong.push(format!("{method} {path} answers {status}, undeclared"));
        } else if *schema != "#/components/schemas/ErrorBody" {
            wrong.push(format!(
                "{method} {path} {status} is an ErrorBody, not {schema}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Every operation declares the auth check's answers, and every one that reads a
    // body the body limit's.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut statuses = vec!["401", "403"];
            if op.get("requestBody").is_some() {
                statuses.extend(["400", "413"]);
            }
            for status in statuses {
                assert_eq!(
                    op["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Nothing is left null by the additions (a checker reads `content: null` as a map).
    fn nulls(value: &serde_json::Value, at: &str, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Null => found.push(at.to_owned()),
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    nulls(value, &format!("{at}/{key}"), found);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, value) in items.iter().enumerate() {
                    nulls(value, &format!("{at}/{i}"), found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    nulls(&doc, "", &mut found);
    assert!(found.is_empty(), "null members: {found:#?}");
    // A u32 parameter takes values past 2^31 − 1: its format says so.
    let limit = operation("GET", "/v1/jobs")["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .cloned()
        .unwrap();
    assert_eq!(limit["schema"]["format"], "uint32", "{limit}");

    // The follow endpoints stream text/event-stream, and say so.
    for (path, url) in [
        ("/v1/events", "/v1/events?follow=true".to_owned()),
        (
            "/v1/jobs/{name}/log",
            format!("/v1/jobs/{job}/log?follow=true"),
        ),
    ] {
        let answer = http.get(server.url(&url)).send().await.unwrap();
        assert_eq!(
            answer.headers()[reqwest::header::CONTENT_TYPE],
            "text/event-stream",
            "{url}"
        );
        drop(answer);
        let content = &operation("GET", path)["responses"]["200"]["content"];
        assert!(
            content["text/event-stream"].is_object(),
            "{path} must declare text/event-stream: {content}"
        );
        // Each message's `data` is the item as JSON.
        let data = &content["text/event-stream"]["schema"]["properties"]["data"];
        assert_eq!(data["contentMediaType"], "application/json", "{path}");
        assert!(data["contentSchema"]["$ref"].is_string(), "{path}: {data}");
        assert!(
            content["application/json"].is_object(),
            "{path} still answers JSON without follow: {content}"
        );
    }

    // Bodies the handlers take empty are optional.
    for path in [
        "/v1/queues/{node}/pull",
        "/v1/scripts/{name}/run",
        "/v1/backups",
        "/v1/model/applications/{app}/units",
    ] {
        let body = &operation("POST", path)["requestBody"];
        assert!(body.is_object(), "{path} documents its body");
        assert_ne!(body["required"], true, "{path}: the body is optional");
    }
    assert_eq!(
        operation("POST", "/v1/queues/{node}/messages")["requestBody"]["required"],
        true
    );
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_streams_for_events_and_logs() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let server = TestServer::start().await;
    write_script(
        &server.scripts,
        "ticks.sh",
        "",
        "for i in 1 2; do echo tick $i; sleep 0.2; done",
    );
    let http = client();
    http.post(server.url("/v1/reload")).send().await.unwrap();
    let ws_base = server.base.replacen("http://", "ws://", 1);

    let (mut events, _) =
        tokio_tungstenite::connect_async(format!("{ws_base}/v1/events/ws?since=0"))
            .await
            .unwrap();
    let started: RunResponse = server
        .post_json("/v1/scripts/ticks/run?wait=false", None)
        .await;
    let (mut log, _) = tokio_tungstenite::connect_async(format!(
        "{ws_base}/v1/jobs/{}/log/ws",
        seg(&started.job.name)
    ))
    .await
    .unwrap();
    let mut text = String::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), log.next())
            .await
            .expect("log frames should arrive")
            .unwrap()
            .unwrap();
        let Message::Text(frame) = frame else {
            continue;
        };
        let event: opsbox_api::LogEvent = serde_json::from_str(&frame).unwrap();
        match event {
            opsbox_api::LogEvent::Output(chunk) => text.push_str(&chunk.data),
            opsbox_api::LogEvent::End(job) => {
                assert_eq!(job.state, JobState::Succeeded);
                break;
            }
        }
    }
    assert_eq!(text, "tick 1\ntick 2\n");

    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let frame = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("events should arrive")
            .unwrap()
            .unwrap();
        if let Message::Text(frame) = frame {
            let event: opsbox_api::Event = serde_json::from_str(&frame).unwrap();
            kinds.push(event.kind);
        }
    }
    assert_eq!(
        kinds,
        vec![
            "scripts.reloaded",
            "job.created",
            "job.started",
            "job.finished"
        ]
    );
    server.shutdown().await;
}

/// Chunked bodies: one over `max_body_bytes` is a 413, one that breaks its framing a
/// 400, both in the API's error form.
#[tokio::test]
async fn chunked_bodies_over_the_limit_or_malformed() {
    let server = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let json = "Content-Type: application/json\r\n";
    for (request, status, code) in [
        (
            common::chunked_post("/v1/scripts/echo/run", json, 4096),
            413,
            "payload_too_large",
        ),
        (
            common::malformed_chunked_post("/v1/scripts/echo/run", json),
            400,
            "bad_request",
        ),
    ] {
        let (got, _, body) = common::raw_http(&server.base, &request).await;
        assert_eq!(got, status, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], code, "{body}");
    }
    server.shutdown().await;
}

/// A log `since` past i64::MAX is after every chunk: it once wrapped to a negative in
/// the SQLite store and replayed them all.
#[tokio::test]
async fn a_log_since_past_every_chunk_follows_only_the_end() {
    let server = TestServer::start().await;
    let run: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": "once"}})),
        )
        .await;
    let name = seg(&run.job.name);
    for since in ["0", "9223372036854775808", "18446744073709551615"] {
        let body = client()
            .get(server.url(&format!("/v1/jobs/{name}/log?follow=true&since={since}")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let kinds: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap()["type"].to_string())
            .collect();
        let expected = if since == "0" {
            vec![r#""output""#, r#""end""#]
        } else {
            vec![r#""end""#]
        };
        assert_eq!(kinds, expected, "since={since}: {body}");
    }
    server.shutdown().await;
}

/// `limit=0` pages no events, only the current revision (it once gave one).
#[tokio::test]
async fn events_with_limit_zero_give_only_the_revision() {
    let server = TestServer::start().await;
    let _: RunResponse = server
        .post_json(
            "/v1/scripts/echo/run",
            Some(json!({"params": {"text": "x"}})),
        )
        .await;
    let none: EventPage = server.get_json("/v1/events?since=0&limit=0").await;
    assert!(none.events.is_empty(), "{:?}", none.events);
    assert!(none.current_revision > 0);
    let one: EventPage = server.get_json("/v1/events?since=0&limit=1").await;
    assert_eq!(one.events.len(), 1);
    server.shutdown().await;
}
