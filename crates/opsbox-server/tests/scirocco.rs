//! The Scirocco face over a real socket: both header dialects, exact header case on
//! the wire, payload encodings, scheduling, auth and the per-dialect edit rules.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{client, TestServer};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "DEFAULT_TOKEN";

async fn server() -> TestServer {
    TestServer::start_with(|c| c.scirocco.shared_token = Some(TOKEN.into())).await
}

/// A request as a client of the given dialect sends it (`v1`: Scirocco-From).
fn req(s: &TestServer, v1: bool, node: &str, method: Method, path: &str) -> RequestBuilder {
    let who = if v1 {
        "Scirocco-From"
    } else {
        "Scirocco-Node-Source"
    };
    // Client rule T7: every request carries a Content-Type, even with no body.
    let plain = !matches!(method, Method::POST | Method::PATCH);
    let request = client()
        .request(method, s.url(path))
        .header("Authorization", TOKEN)
        .header(who, node);
    if plain {
        request.header("Content-Type", "application/octet-stream")
    } else {
        request
    }
}

fn push(
    s: &TestServer,
    v1: bool,
    from: &str,
    to: &str,
    kind: &str,
    body: impl Into<reqwest::Body>,
) -> RequestBuilder {
    let dest = if v1 {
        "Scirocco-To"
    } else {
        "Scirocco-Node-Destination"
    };
    req(s, v1, from, Method::POST, "/messageQueue")
        .header(dest, to)
        .header("Content-Type", kind)
        .body(body)
}

fn h(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Posts a message over `stream` as scirocco-pyclient would, and checks the answer's
/// header names on the wire: the client matches them case-sensitively.
fn check_title_cased_headers(mut stream: impl Read + Write) {
    let body = "{\"type\": \"message\"}";
    write!(
        stream,
        "POST /messageQueue HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: identity\r\nContent-Length: {}\r\nScirocco-To: af123\r\nScirocco-From: af123\r\nAuthorization: {TOKEN}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 201 Created\r\n"), "{raw}");
    for name in [
        "Location: /messages/",
        "Scirocco-Id: ",
        "Scirocco-From: af123",
        "Scirocco-To: af123",
        "Scirocco-Status: pending",
        "Scirocco-Tries: 0",
        "Scirocco-Created-Time: ",
        "Scirocco-Data-Type: application/json",
        "Content-Type: application/json; charset=utf-8",
        "Content-Length: 19",
    ] {
        assert!(
            raw.contains(&format!("\r\n{name}")),
            "missing '{name}' in:\n{raw}"
        );
    }
    assert!(!raw.contains("Scirocco-Update-Time"), "{raw}");
    assert!(raw.ends_with("\r\n\r\n{\"type\": \"message\"}"), "{raw}");
}

#[tokio::test]
async fn response_header_names_are_title_cased_on_the_wire() {
    let s = server().await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        check_title_cased_headers(stream);
    })
    .await
    .unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn response_header_names_are_title_cased_on_the_unix_socket_too() {
    let s = TestServer::start_with(|c| {
        c.scirocco.shared_token = Some(TOKEN.into());
        c.listen
            .push(format!("unix:{}", c.data.join("opsbox.sock").display()));
    })
    .await;
    let socket = s.data.join("opsbox.sock");
    tokio::task::spawn_blocking(move || {
        let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        check_title_cased_headers(stream);
    })
    .await
    .unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn text_push_pull_ack_in_the_v2_dialect() {
    let s = server().await;
    let r = push(&s, false, "af123", "bf456", "text/plain", "hello world")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = h(&r, "scirocco-id").unwrap();
    assert_eq!(id.len(), 24);
    assert_eq!(h(&r, "location").unwrap(), format!("/messages/{id}"));
    assert_eq!(h(&r, "scirocco-node-source").as_deref(), Some("af123"));
    assert_eq!(h(&r, "scirocco-node-destination").as_deref(), Some("bf456"));
    assert_eq!(
        h(&r, "scirocco-payload-type").as_deref(),
        Some("text/plain")
    );
    assert_eq!(
        h(&r, "content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(h(&r, "scirocco-created-time")
        .unwrap()
        .ends_with("GMT+0000 (UTC)"));
    assert_eq!(r.text().await.unwrap(), "hello world");

    // Only the destination pulls it, once.
    let r = req(&s, false, "af123", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = req(&s, false, "bf456", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "scirocco-status").as_deref(), Some("processing"));
    assert_eq!(h(&r, "scirocco-tries").as_deref(), Some("1"));
    assert!(h(&r, "scirocco-processing-time").is_some());
    assert!(h(&r, "scirocco-update-time").is_some());
    assert_eq!(r.text().await.unwrap(), "hello world");
    let r = req(&s, false, "bf456", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.bytes().await.unwrap().is_empty());

    let ack = format!("/messageQueue/{id}/ack");
    let r = req(&s, false, "af123", Method::PATCH, &ack)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "Resource not found."})
    );
    let r = req(&s, false, "bf456", Method::PATCH, &ack)
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "scirocco-status").as_deref(), Some("processed"));
    assert!(h(&r, "scirocco-processed-time").is_some());
    let r = req(&s, false, "bf456", Method::PATCH, &ack)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    s.shutdown().await;
}

#[tokio::test]
async fn binary_push_echoes_raw_bytes_and_later_reads_give_base64() {
    let s = server().await;
    let pdf = b"%PDF-1.4\n\xe4\xfc\xf6\xdf\n".to_vec();
    let dest_v1 = push(
        &s,
        true,
        "af123",
        "af123",
        "application/octet-stream",
        pdf.clone(),
    )
    .header("Scirocco-Data-Type", ".bin");
    let r = dest_v1.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        h(&r, "content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(h(&r, "scirocco-data-type").as_deref(), Some(".bin"));
    assert_eq!(r.bytes().await.unwrap().to_vec(), pdf);
    let r = req(&s, true, "af123", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h(&r, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(h(&r, "scirocco-from").as_deref(), Some("af123"));
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode(&pdf);
    assert_eq!(r.json::<Value>().await.unwrap(), json!(expected));
    s.shutdown().await;
}

#[tokio::test]
async fn a_latin1_json_body_is_read_as_expresss_parser_read_it() {
    // scirocco-pyclient encodes a JSON-looking str as Latin-1: "hé" arrives as 68 E9.
    let s = server().await;
    let r = push(
        &s,
        false,
        "af1",
        "af1",
        "application/json",
        b"{\"a\":\"h\xe9\"}".to_vec(),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = req(&s, false, "af1", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"a": "h\u{fffd}"}));
    s.shutdown().await;
}

#[tokio::test]
async fn one_store_two_dialects_each_with_its_own_names() {
    let s = server().await;
    let r = push(
        &s,
        true,
        "af123",
        "bf456",
        "application/json",
        r#"{"type": "message"}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), r#"{"type": "message"}"#);
    // A v2 consumer pulls what a v1 producer pushed, with v2 names.
    let r = req(&s, false, "bf456", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "scirocco-node-source").as_deref(), Some("af123"));
    assert_eq!(
        h(&r, "scirocco-payload-type").as_deref(),
        Some("application/json")
    );
    assert!(h(&r, "scirocco-from").is_none());
    let v1: Value = req(&s, true, "af123", Method::GET, "/messages")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let v2: Value = req(&s, false, "af123", Method::GET, "/messages")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v1[0]["from"], "af123");
    assert_eq!(v1[0]["to"], "bf456");
    assert_eq!(v1[0]["data_type"], "application/json");
    assert_eq!(v1[0]["data"], json!({"type": "message"}));
    assert_eq!(v1[0]["tries"], 1);
    assert!(v1[0]["created_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v2[0]["node_source"], "af123");
    assert_eq!(v2[0]["payload"], json!({"type": "message"}));
    assert_eq!(v2[0]["status"], "processing");
    assert!(v2[0].get("from").is_none() && v2[0].get("processed_time").is_none());
    // Nothing for a node with no messages: 204.
    let r = req(&s, false, "cc", Method::GET, "/messages")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    s.shutdown().await;
}

#[tokio::test]
async fn scheduled_messages_wait_and_bad_times_are_refused() {
    let s = server().await;
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(1500)).naive_utc();
    let r = push(&s, false, "af1", "bf2", "text/plain", "later")
        .header("Scirocco-Status", "scheduled")
        .header(
            "Scirocco-Scheduled-Time",
            at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(h(&r, "scirocco-status").as_deref(), Some("scheduled"));
    assert!(h(&r, "scirocco-scheduled-time").is_some());
    let r = req(&s, false, "bf2", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let r = req(&s, false, "bf2", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h(&r, "scirocco-status").as_deref(), Some("processing"));
    assert!(h(&r, "scirocco-scheduled-time").is_some());

    let past = (chrono::Utc::now() - chrono::Duration::minutes(19)).naive_utc();
    let r = push(&s, false, "af1", "bf2", "text/plain", "past")
        .header("Scirocco-Status", "scheduled")
        .header(
            "Scirocco-Scheduled-Time",
            past.format("%Y-%m-%dT%H:%M:%S").to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["errors"]["scheduled_time"].is_object());
    let r = push(&s, false, "af1", "bf2", "text/plain", "x")
        .header("Scirocco-Status", "scheduled")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "An scheduled message requires the scheduled time header to be set."
    );
    let r = push(&s, false, "af1", "bf2", "text/plain", "x")
        .header("Scirocco-Status", "sleeping")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_the_reference_status_codes() {
    let s = server().await;
    let r = push(&s, false, "af1", "bf2", "text/plain; charset=utf-8", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(&s, false, "af1", "bf2", "application/json", "123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(&s, false, "af1", "bf2", "application/json", "{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(&s, false, "af1", "zz", "text/plain", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["errors"]["node_destination"].is_object());
    let r = req(&s, true, "af1", Method::POST, "/messageQueue")
        .header("Content-Type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errors"]["to"]["kind"],
        "required"
    );
    let r = push(&s, false, "af1", "bf2", "text/plain", "x")
        .header("Scirocco-Payload-Type", "a".repeat(31))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = push(
        &s,
        false,
        "af1",
        "bf2",
        "application/octet-stream",
        vec![7u8; 1_050_000],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = push(
        &s,
        false,
        "af1",
        "bf2",
        "text/plain",
        "a".repeat(101 * 1024),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "request entity too large"
    );
    let r = req(&s, false, "af1", Method::GET, "/messages/xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "Not Found"})
    );
    let r = req(
        &s,
        false,
        "af1",
        Method::GET,
        "/messages/0123456789abcdef01234567",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "Resource not found."})
    );
    let r = req(&s, false, "af1", Method::PUT, "/messageQueue")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The banner.
    let r = req(&s, false, "af1", Method::GET, "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "DDS endpoint.");
    s.shutdown().await;
}

#[tokio::test]
async fn auth_takes_the_shared_token_or_an_opsbox_token_bound_to_its_nodes() {
    let s = server().await;
    for token in [None, Some("nope"), Some("Bearer DEFAULT_TOKEN")] {
        let mut r = client()
            .get(s.url("/messageQueue"))
            .header("Scirocco-Node-Source", "af1");
        if let Some(token) = token {
            r = r.header("Authorization", token);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{token:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"message": "Incorrect auth token."})
        );
    }
    let r = client().get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // An opsbox node token, made through the native API while no identity exists yet.
    let created: Value = client()
        .post(s.url("/v1/tokens"))
        .json(&json!({"role": "operator", "nodes": ["af1"], "description": "node af1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap().to_owned();
    let as_node = |node: &str| {
        client()
            .post(s.url("/messageQueue"))
            .header("Authorization", &secret)
            .header("Scirocco-Node-Source", node)
            .header("Scirocco-Node-Destination", "bf2")
            .header("Content-Type", "text/plain")
            .body("hi")
    };
    assert_eq!(
        as_node("af1").send().await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(
        as_node("af2").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // A node token may not wipe every queue; the shared token may.
    let wipe = |token: &str| {
        client()
            .delete(s.url("/globalDataSpace"))
            .header("Authorization", token)
            .header("Content-Type", "application/octet-stream")
    };
    assert_eq!(
        wipe(&secret).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let r = wipe(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 1, "ok": 1}));
    s.shutdown().await;
}

#[tokio::test]
async fn an_open_server_takes_any_token() {
    let s = TestServer::start().await;
    let r = push(&s, true, "af123", "af123", "text/plain", "m")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    s.shutdown().await;
}

#[tokio::test]
async fn update_and_delete_follow_each_dialects_rules() {
    let s = server().await;
    let id_of = |r: &reqwest::Response| h(r, "scirocco-id").unwrap();
    let r = push(&s, false, "aa", "bb", "application/json", r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    let one = id_of(&r);
    let path = format!("/messages/{one}");
    // v2: only the sender, only before delivery. The type stays, the kind follows.
    let r = req(&s, false, "bb", Method::PATCH, &path)
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = req(&s, false, "aa", Method::PATCH, &path)
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h(&r, "scirocco-payload-type").as_deref(),
        Some("application/json")
    );
    assert!(h(&r, "scirocco-update-time").is_some());
    assert_eq!(r.json::<Value>().await.unwrap(), json!("AQID"));
    let r = req(&s, false, "bb", Method::GET, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = req(&s, false, "cc", Method::GET, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    req(&s, false, "bb", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    let r = req(&s, false, "aa", Method::DELETE, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 0, "ok": 1}));
    // v1: sender or receiver, any status.
    let r = req(&s, true, "bb", Method::PATCH, &path)
        .header("Content-Type", "text/plain")
        .body("by the receiver")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "by the receiver");
    let r = req(&s, true, "bb", Method::DELETE, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 1, "ok": 1}));

    // delete all: v2 removes only undelivered sent messages, v1 everything to or from.
    for body in ["1", "2"] {
        push(&s, false, "aa", "bb", "text/plain", body)
            .send()
            .await
            .unwrap();
    }
    push(&s, false, "bb", "aa", "text/plain", "incoming")
        .send()
        .await
        .unwrap();
    req(&s, false, "bb", Method::GET, "/messageQueue")
        .send()
        .await
        .unwrap();
    let r = req(&s, false, "aa", Method::DELETE, "/messages")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 1, "ok": 1}));
    let r = req(&s, true, "aa", Method::DELETE, "/messages")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"n": 2, "ok": 1}));
    let r = req(&s, true, "aa", Method::DELETE, "/globalDataSpace")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "v1 servers have no globalDataSpace"
    );
    s.shutdown().await;
}

/// A body over the server's `max_body_bytes` (below the face's own 100 KiB) is refused
/// as Scirocco refuses one (§8), whether its length is declared or it is chunked.
#[tokio::test]
async fn bodies_over_the_server_limit_get_scirocco_413() {
    let s = TestServer::start_with(|c| {
        c.scirocco.shared_token = Some(TOKEN.into());
        c.limits.max_body_bytes = 1024;
    })
    .await;
    let big = format!("{{\"a\": \"{}\"}}", "x".repeat(4096));
    let r = push(&s, false, "aa", "bb", "application/json", big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        h(&r, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "request entity too large"})
    );
    let headers = format!(
        "Authorization: {TOKEN}\r\nScirocco-Node-Source: aa\r\nScirocco-Node-Destination: bb\r\nContent-Type: text/plain\r\n"
    );
    let (status, _, body) = common::raw_http(
        &s.base,
        &common::chunked_post("/messageQueue", &headers, 4096),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"message": "request entity too large"})
    );
    let small = push(&s, false, "aa", "bb", "text/plain", "x".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), StatusCode::CREATED);
}

/// A chunked body that breaks its framing is a bad request (400 in §8's form), not an
/// over-limit one.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let s = server().await;
    let headers = format!(
        "Authorization: {TOKEN}\r\nScirocco-Node-Source: aa\r\nScirocco-Node-Destination: bb\r\nContent-Type: application/json\r\n"
    );
    let (status, headers, body) = common::raw_http(
        &s.base,
        &common::malformed_chunked_post("/messageQueue", &headers),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(headers.contains("application/json"), "{headers}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{body}"
    );
}

/// QA: a payload type that is not ASCII comes back as it was sent. Both clients send
/// header values Latin-1 encoded (Python's http.client), as the original's Node read
/// and wrote them; it used to be dropped for the default (`text/plain`). The non-ASCII
/// text payload that goes with it keeps its kind: text, served as text.
#[tokio::test]
async fn a_non_ascii_payload_type_comes_back_as_sent() {
    let s = server().await;
    for v1 in [false, true] {
        // Each dialect with its own pair of nodes.
        let (type_header, type_key, from, to) = if v1 {
            ("Scirocco-Data-Type", "data_type", "af3", "bf4")
        } else {
            ("Scirocco-Payload-Type", "payload_type", "af1", "bf2")
        };
        let latin1 = reqwest::header::HeaderValue::from_bytes(b"caf\xe9/cr\xe8me").unwrap();
        let r = push(&s, v1, from, to, "text/plain", "h\u{e9}llo w\u{f6}rld")
            .header(type_header, latin1.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "v1: {v1}");
        assert_eq!(
            r.headers().get(type_header),
            Some(&latin1),
            "push, v1: {v1}"
        );
        assert_eq!(
            h(&r, "content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(r.text().await.unwrap(), "h\u{e9}llo w\u{f6}rld");

        let r = req(&s, v1, to, Method::GET, "/messageQueue")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers().get(type_header),
            Some(&latin1),
            "pull, v1: {v1}"
        );
        assert_eq!(
            h(&r, "content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(r.text().await.unwrap(), "h\u{e9}llo w\u{f6}rld");

        let list: Value = req(&s, v1, to, Method::GET, "/messages")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list[0][type_key], "caf\u{e9}/cr\u{e8}me", "{list}");
    }
    s.shutdown().await;
}
