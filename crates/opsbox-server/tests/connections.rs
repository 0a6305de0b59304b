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
