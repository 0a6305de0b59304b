//! The listeners over a real socket: what a client that misbehaves at the connection
//! level (trickled headers, a silent connection) gets, on TCP and on a Unix socket.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::TestServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A server that gives a request head one second.
async fn impatient() -> TestServer {
    TestServer::start_with(|c| c.limits.header_read_timeout_secs = 1).await
}

/// [`impatient`], also listening on a Unix socket in its data directory.
async fn impatient_with_socket() -> (TestServer, PathBuf) {
    let server = TestServer::start_with(|c| {
        c.limits.header_read_timeout_secs = 1;
        c.listen
            .push(format!("unix:{}", c.data.join("opsbox.sock").display()));
    })
    .await;
    let socket = server.data.join("opsbox.sock");
    (server, socket)
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection (or resets it), and says how long
/// that took; fails if it is still open after `patience`.
async fn closed_after(stream: &mut (impl AsyncRead + Unpin), patience: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open after {patience:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// The connection must be closed within 5 s (the 1 s timeout and some slack).
async fn closed_soon(stream: &mut (impl AsyncRead + Unpin)) {
    let waited = closed_after(stream, Duration::from_secs(10)).await;
    assert!(
        waited < Duration::from_secs(5),
        "closed only after {waited:?}"
    );
}

#[tokio::test]
async fn a_head_that_stops_half_way_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_head_trickled_a_byte_at_a_time_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    let start = Instant::now();
    // Slowloris: always something new, never the end of the head.
    let head = b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    for (i, byte) in head.iter().chain(std::iter::repeat(&b'a')).enumerate() {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        if i > 60 {
            panic!("the server still reads a head after {:?}", start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_says_nothing_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_prompt_request_is_answered() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.shutdown().await;
}

/// Requests with bodies pipelined on one connection, written in one go: hyper reads
/// several at once and goes round its loop for each, which wakes the connection task
/// from inside its own poll many times in a row (the second of each run of self-wakes
/// goes through the scheduler, see `self_wake.rs`): every one is answered, in order.
#[tokio::test]
async fn pipelined_posts_on_one_connection_are_all_answered_in_order() {
    let server = TestServer::start().await;
    let mut stream = connect(&server).await;
    let calls = 60;
    let mut requests = Vec::new();
    for id in 0..calls {
        let body = format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{id}}}"#);
        requests.extend_from_slice(
            format!(
                "POST /rpc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    stream.write_all(&requests).await.unwrap();
    let mut answers = String::new();
    let mut buf = [0u8; 8192];
    while answers.matches("HTTP/1.1 200").count() < calls
        || !answers.ends_with(&format!(r#""id":{}}}"#, calls - 1))
    {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("every pipelined call answered within 10 s")
            .unwrap();
        assert!(n > 0, "the connection closed after: {answers}");
        answers.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    let ids: Vec<usize> = answers
        .match_indices(r#""id":"#)
        .map(|(at, _)| {
            let rest = &answers[at + 5..];
            rest[..rest.find('}').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(ids, (0..calls).collect::<Vec<_>>());
    server.shutdown().await;
}

/// The timeout also ends a kept-alive connection that sends no next request: HTTP
/// clients' pools (urllib3, reqwest) see it closed and open a new one.
#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// The timeout is for request heads only: a request whose answer takes longer than it
/// (a synchronous Jojo run here) is answered.
#[tokio::test]
async fn a_slow_answer_is_not_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    let body = r#"{"secs": "2"}"#;
    let start = Instant::now();
    stream
        .write_all(
            format!(
                "POST /scripts/sleepy HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(start.elapsed() > Duration::from_millis(1500), "{answer}");
    server.shutdown().await;
}

/// Kept-alive requests each get the whole timeout: a client that sends a request
/// every 0.6 s on one connection (1 s timeout) is never cut off.
#[tokio::test]
async fn requests_in_time_keep_a_connection_open() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    let mut buf = [0u8; 4096];
    for _ in 0..5 {
        stream
            .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// A connection upgraded to a WebSocket is not HTTP any more: quiet for longer than
/// the head timeout, it stays open.
#[tokio::test]
async fn a_quiet_websocket_is_not_cut_off() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = impatient().await;
    let url = format!("{}/rpc", server.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer")
        .expect("the socket is open")
        .unwrap();
    assert!(answer.to_text().unwrap().contains("pong"), "{answer}");
    server.shutdown().await;
}

/// A body the server refuses is read to its end beside the answer: a client still
/// sending gets the answer, not a reset, and its connection stays usable. Through a
/// face that reads its own body (JSON-RPC), an extractor with `DefaultBodyLimit` (the
/// native API), and a route that never reads it (none there: 404).
#[tokio::test]
async fn a_refused_body_gets_its_answer_and_keeps_the_connection() {
    let server = TestServer::start().await;
    for (path, status) in [
        ("/rpc", "413"),
        ("/v1/queues/n/messages", "413"),
        ("/v1/nowhere", "404"),
    ] {
        let stream = connect(&server).await;
        let (mut reader, mut writer) = stream.into_split();
        let body = vec![b'x'; 3 * 1024 * 1024];
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sending = tokio::spawn(async move {
            writer.write_all(head.as_bytes()).await.unwrap();
            writer.write_all(&body).await.unwrap();
            writer
        });
        let mut buf = vec![0u8; 64 * 1024];
        let n = reader.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {answer}"
        );
        let mut writer = tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .unwrap_or_else(|_| panic!("{path}: the whole body was not taken"))
            .unwrap();
        // The rest of the first answer may still be on its way: read until the second.
        writer
            .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut seen = String::new();
        while !seen.contains("HTTP/1.1 200") {
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{path}: no second answer"))
                .unwrap();
            assert!(
                n > 0,
                "{path}: the connection was closed after the first answer"
            );
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_body_that_stops_coming_is_refused() {
    let server = TestServer::start_with(|c| c.limits.body_read_timeout_secs = 1).await;
    // Through a face that reads the body itself (Scirocco would too) and through an
    // extractor: both end with a 400, not a handler waiting for ever.
    for path in ["/scripts/echo", "/v1/queues/n/messages"] {
        let mut stream = connect(&server).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"te"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let start = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Err(_) => panic!("{path}: still waiting for the body after 10 s"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(start.elapsed() < Duration::from_secs(5), "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_head_that_stops_half_way_on_the_unix_socket_is_cut_off() {
    let (server, socket) = impatient_with_socket().await;
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_unix_socket_connection_that_says_nothing_is_cut_off() {
    let (server, socket) = impatient_with_socket().await;
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// A prompt request on the Unix socket is answered, with the header names title-cased
/// as on TCP, and the connection kept alive until the head timeout ends it.
#[tokio::test]
async fn a_prompt_request_on_the_unix_socket_is_answered_as_on_tcp() {
    let (server, socket) = impatient_with_socket().await;
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream
        .write_all(b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nContent-Type: "), "{answer}");
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// Stopping the server removes its socket file, also with a connection open.
#[tokio::test]
async fn the_unix_socket_file_is_removed_when_the_server_stops() {
    let (server, socket) = impatient_with_socket().await;
    let _idle = UnixStream::connect(&socket).await.unwrap();
    assert!(socket.exists());
    server.shutdown().await;
    assert!(!socket.exists());
}

/// What an HTTP/2 client with prior knowledge sends first: the preface and an empty
/// SETTINGS frame.
const H2_OPENING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// An HTTP/2 connection (prior knowledge) through hyper's client, which answers the
/// server's PINGs by itself; the task ends when the connection does.
async fn http2(
    server: &TestServer,
) -> (
    hyper::client::conn::http2::SendRequest<axum::body::Body>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let io = hyper_util::rt::TokioIo::new(connect(server).await);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

async fn http2_request(
    sender: &mut hyper::client::conn::http2::SendRequest<axum::body::Body>,
    method: &str,
    path: &str,
    body: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    sender.send_request(request).await.unwrap()
}

#[tokio::test]
async fn an_http2_connection_that_stops_after_its_preface_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    stream.write_all(H2_OPENING).await.unwrap();
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_http2_connection_cut_half_way_through_its_preface_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    stream.write_all(&H2_OPENING[..12]).await.unwrap();
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// A client that opens an HTTP/2 stream that stays open (an event stream) and then
/// stops reading and answering: the server's keep-alive PING goes unanswered, and the
/// connection is closed.
#[tokio::test]
async fn an_http2_client_gone_silent_during_a_stream_is_cut_off() {
    let server = impatient().await;
    let mut stream = connect(&server).await;
    // HEADERS, stream 1, END_STREAM | END_HEADERS: GET http://localhost/v1/events?follow=true
    // in HPACK (static-table :method GET and :scheme http, literal :path and :authority).
    let path = b"/v1/events?follow=true";
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(b"\x01\x09localhost");
    let mut opening = H2_OPENING.to_vec();
    opening.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
    opening.extend_from_slice(&block);
    stream.write_all(&opening).await.unwrap();
    // The answer's HEADERS frame (type 1) on stream 1 shows the stream is open.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(5).any(|w| w == [0x01, 0x04, 0, 0, 0]) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the event stream should answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    closed_soon(&mut stream).await;
    server.shutdown().await;
}

/// A live HTTP/2 client that keeps its connection with no request open (it answers
/// the server's PINGs) gets it closed after the head timeout, as an idle HTTP/1 one.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let server = impatient().await;
    let (mut sender, connection) = http2(&server).await;
    let response = http2_request(&mut sender, "GET", "/v1/info", "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle HTTP/2 connection is still open after 10 s")
        .unwrap()
        .ok();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        start.elapsed()
    );
    server.shutdown().await;
}

/// A request over HTTP/2 whose answer takes longer than the head timeout (a long poll
/// on an empty queue, 4 s) is answered, on a connection that stays usable.
#[tokio::test]
async fn a_slow_http2_answer_is_not_cut_off() {
    let server = impatient().await;
    let (mut sender, connection) = http2(&server).await;
    let start = Instant::now();
    let response = http2_request(&mut sender, "POST", "/v1/queues/n1/pull", r#"{"wait": 4}"#).await;
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["messages"], serde_json::json!([]), "{body}");
    assert!(start.elapsed() > Duration::from_millis(3500));
    let response = http2_request(&mut sender, "GET", "/v1/info", "").await;
    assert_eq!(response.status(), 200);
    assert!(!connection.is_finished());
    server.shutdown().await;
}

/// An HTTP/2 event stream quiet for longer than the head timeout is not cut: the
/// event that comes after the pause arrives.
#[tokio::test]
async fn a_quiet_http2_event_stream_is_not_cut_off() {
    use http_body::Body as _;
    let server = impatient().await;
    let (mut sender, _connection) = http2(&server).await;
    let response = http2_request(&mut sender, "GET", "/v1/events?follow=true", "").await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let run = common::client()
        .post(server.url("/v1/scripts/echo/run"))
        .json(&serde_json::json!({"params": {"text": "after the pause"}}))
        .send()
        .await
        .unwrap();
    assert!(run.status().is_success(), "{}", run.status());
    let mut text = String::new();
    while !text.contains("job.created") {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        let frame = tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("the event should arrive")
            .expect("the event stream ended")
            .unwrap();
        if let Some(data) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(data));
        }
    }
    server.shutdown().await;
}
