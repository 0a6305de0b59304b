//! The py-jrpc face over a real socket: raw bytes as py-jrpc's client and curl see
//! them (status line, reason phrase, `json.dumps` spacing), the §2–§3 mappings, the
//! shared root with JSON-RPC, auth policy and the dedicated listener.

mod common;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw HTTP/1.1 bytes and returns (status line, headers, body).
async fn raw(base: &str, request: &str) -> (String, String, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

async fn get(base: &str, path: &str) -> (String, String) {
    let (status, _, body) = raw(
        base,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (status, body)
}

async fn post(base: &str, path: &str, body: &str) -> (String, String) {
    let (status, _, body) = raw(
        base,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn get_calls_like_py_jrpc() {
    let server = TestServer::start().await;
    let b = &server.base;
    assert_eq!(
        get(b, "/ping").await,
        ("HTTP/1.1 200 OK".into(), r#"{"ping": "pong"}"#.into())
    );
    for path in ["/ping?x=1", "/ping;"] {
        assert_eq!(get(b, path).await.1, r#"{"ping": "pong"}"#, "{path}");
    }
    assert_eq!(
        get(b, "/method_help;ping").await.1,
        r#"{"method_help": ":return: response to ping"}"#
    );
    let (status, body) = get(b, "/method_help").await;
    assert_eq!(
        status,
        "HTTP/1.1 400 method_help() missing required argument 'method_name'"
    );
    assert!(body.contains("missing required argument"), "{body}");
    let (status, _) = get(b, "/method_help?ping").await;
    assert!(status.starts_with("HTTP/1.1 400 "), "{status}");
    assert_eq!(
        get(b, "/nope").await.0,
        "HTTP/1.1 405 method [nope] is not supported"
    );
    assert_eq!(
        get(b, "/p%69ng").await.0,
        "HTTP/1.1 405 method [p%69ng] is not supported"
    );
    // The argument stays raw: %20 is not decoded.
    assert_eq!(
        get(b, "/method_signature;a%20b").await.1,
        r#"{"method_signature": {"a%20b": "method/function not found"}}"#
    );
    let (_, body) = get(b, "/list_methods").await;
    assert!(
        body.starts_with(r#"{"list_methods": ["check_process", "cpuinfo", "#),
        "{body}"
    );
    assert!(
        body.contains(r#""echo", "#),
        "scripts are functions: {body}"
    );
    // Other faces' static routes still win over /{name}.
    let (status, _) = get(b, "/scripts").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (status, _) = get(b, "/v1/info").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (status, _, _) = raw(
        b,
        "PUT /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 501 Unsupported method ('PUT')");
    // A POST with no length and not chunked: 411, as py-jrpc answered (§3.2).
    let (status, _, _) = raw(b, "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 411 Length Required");
    let (status, _, body) = raw(
        b,
        "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"ping\": \"\"}\r\n0\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, r#"{"ping": "pong"}"#);
    server.shutdown().await;
}

#[tokio::test]
async fn post_calls_like_py_jrpc() {
    let server = TestServer::start().await;
    let b = &server.base;
    for body in [
        r#"{"ping": ""}"#,
        r#"{"ping": null}"#,
        r#"{"ping": 0}"#,
        r#"{"ping": false}"#,
        r#"{"ping": []}"#,
        r#"{"ping": {}}"#,
    ] {
        assert_eq!(
            post(b, "/", body).await,
            ("HTTP/1.1 200 OK".into(), r#"{"ping": "pong"}"#.into()),
            "{body}"
        );
    }
    let expected = r#"{"method_signature": {"check_process": ["process"]}}"#;
    for body in [
        r#"{"method_signature": "check_process"}"#,
        r#"{"method_signature": ["check_process"]}"#,
        r#"{"method_signature": {"method_name": "check_process"}}"#,
    ] {
        assert_eq!(post(b, "/", body).await.1, expected, "{body}");
    }
    let (status, body) = post(b, "/", r#"{"check_process": "no-such-process-\u00e9"}"#).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, r#"{"check_process": {"error": "", "output": []}}"#);
    // Errors: never a dropped connection.
    assert_eq!(
        post(b, "/", r#"{"nope": 1}"#).await.0,
        "HTTP/1.1 405 method [nope] is not supported"
    );
    assert_eq!(
        post(b, "/", r#"{"ping": [1]}"#).await.0,
        "HTTP/1.1 400 ping() takes at most 0 arguments (1 given)"
    );
    assert_eq!(
        post(b, "/", r#"{"method_help": {"x": 1}}"#).await.0,
        "HTTP/1.1 400 method_help() got an unexpected keyword argument 'x'"
    );
    assert!(post(b, "/", "{}").await.0.starts_with("HTTP/1.1 400 "));
    assert!(post(b, "/", r#"{"ping": "", "blah": "x"}"#)
        .await
        .0
        .starts_with("HTTP/1.1 400 "));
    assert!(post(b, "/", "17").await.0.starts_with("HTTP/1.1 400 "));
    assert!(post(b, "/", "not json")
        .await
        .0
        .starts_with("HTTP/1.1 500 "));
    assert!(post(b, "/", "").await.0.starts_with("HTTP/1.1 500 "));
    // A script runs as a job; its failure is a 500 with the reason.
    let (status, body) = post(b, "/", r#"{"echo": {"text": "h\u00e9llo"}}"#).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.starts_with(r#"{"echo": {"#) && body.contains(r#""stdout": "h\u00e9llo""#),
        "{body}"
    );
    let (status, _) = post(b, "/", r#"{"report": []}"#).await;
    assert!(
        status.starts_with("HTTP/1.1 500 script report failed"),
        "{status}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn root_post_shares_json_rpc() {
    let server = TestServer::start().await;
    let b = &server.base;
    assert_eq!(
        post(b, "/", r#"{"jsonrpc": "2.0", "method": "ping", "id": 1}"#)
            .await
            .1,
        r#"{"jsonrpc":"2.0","result":"pong","id":1}"#
    );
    assert_eq!(
        post(
            b,
            "/",
            r#"[{"jsonrpc": "2.0", "method": "ping", "id": "a"}]"#
        )
        .await
        .1,
        r#"[{"jsonrpc":"2.0","result":"pong","id":"a"}]"#
    );
    server.shutdown().await;
}

#[tokio::test]
async fn anonymous_callers_only_by_policy() {
    let closed = TestServer::start().await;
    closed.add_admin().await;
    assert!(get(&closed.base, "/ping")
        .await
        .0
        .starts_with("HTTP/1.1 401 "));
    let (status, _, _) = raw(
        &closed.base,
        "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic YWRtaW46cHc=\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    closed.shutdown().await;

    let open =
        TestServer::start_with(|c| c.rpc.jrpc_anonymous_role = Some(opsbox_api::Role::Reader))
            .await;
    open.add_admin().await;
    assert_eq!(get(&open.base, "/ping").await.1, r#"{"ping": "pong"}"#);
    // A reader may look but not run scripts nor read the environment.
    assert!(post(&open.base, "/", r#"{"echo": ["x"]}"#)
        .await
        .0
        .starts_with("HTTP/1.1 403 "));
    assert!(get(&open.base, "/get_env")
        .await
        .0
        .starts_with("HTTP/1.1 403 "));
    open.shutdown().await;
}

#[tokio::test]
async fn dedicated_listener_owns_every_path() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server =
        TestServer::start_with(|c| c.rpc.jrpc_listen = vec![format!("127.0.0.1:{port}")]).await;
    let jrpc = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&jrpc, "/ping/extra").await.1, r#"{"ping": "pong"}"#);
    assert_eq!(
        get(&jrpc, "/scripts").await.0,
        "HTTP/1.1 405 method [scripts] is not supported"
    );
    assert_eq!(
        get(&jrpc, "/").await.0,
        "HTTP/1.1 405 method [] is not supported"
    );
    assert_eq!(
        post(&jrpc, "/anything", r#"{"ping": ""}"#).await.1,
        r#"{"ping": "pong"}"#
    );
    assert!(get(&jrpc, "/ping/extra;y")
        .await
        .0
        .starts_with("HTTP/1.1 400 "));
    // The main listener still has the other faces.
    assert!(get(&server.base, "/scripts")
        .await
        .0
        .starts_with("HTTP/1.1 200"));
    server.shutdown().await;
}

/// A body over `max_body_bytes` gets py-jrpc's error form with 413 (D12), on the main
/// listener and on a dedicated one, declared or chunked.
#[tokio::test]
async fn bodies_over_the_limit_get_a_jrpc_413() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = TestServer::start_with(|c| {
        c.limits.max_body_bytes = 1024;
        c.rpc.jrpc_listen = vec![format!("127.0.0.1:{port}")];
    })
    .await;
    let big = format!(r#"{{"ping": ["{}"]}}"#, "x".repeat(4096));
    for base in [server.base.clone(), format!("http://127.0.0.1:{port}")] {
        assert_eq!(
            post(&base, "/", &big).await,
            (
                "HTTP/1.1 413 Request Entity Too Large".into(),
                r#"{"error": "Request Entity Too Large"}"#.into()
            ),
            "{base}"
        );
        let (status, headers, body) =
            common::raw_http(&base, &common::chunked_post("/", "", 4096)).await;
        assert_eq!(status, 413, "{base}");
        assert!(headers.contains("application/json"), "{headers}");
        assert_eq!(body, r#"{"error": "Request Entity Too Large"}"#, "{base}");
    }
    server.shutdown().await;
}

/// A chunked body that breaks its framing is a bad request: 400 in py-jrpc's error
/// form on `POST /`, and a JSON-RPC parse error with 400 on `/rpc`.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let server = TestServer::start().await;
    let (status, _, body) =
        common::raw_http(&server.base, &common::malformed_chunked_post("/", "")).await;
    assert_eq!(status, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{body}"
    );
    let (status, _, body) =
        common::raw_http(&server.base, &common::malformed_chunked_post("/rpc", "")).await;
    assert_eq!(status, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], -32700, "{body}");
    assert_eq!(body["id"], serde_json::Value::Null, "{body}");
    server.shutdown().await;
}
