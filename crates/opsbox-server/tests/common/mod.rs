//! A server on an ephemeral loopback port with its own data and scripts directories,
//! shared by the integration tests of every face.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opsbox_server::{ListenAddr, Server, ServerConfig};

pub struct TestServer {
    pub base: String,
    _dir: tempfile::TempDir,
    pub scripts: PathBuf,
    pub data: PathBuf,
    /// The server's core, for what no route does (compaction now, say).
    pub core: opsbox_core::Core,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&scripts).unwrap();
        write_script(
            &scripts,
            "echo.sh",
            "# param: text - what to echo\n# required: text",
            "printf '%s' \"$TEXT\"",
        );
        write_script(
            &scripts,
            "sleepy.sh",
            "# param: secs\n# timeout: 2",
            "sleep 300 &\necho $! > \"$OPSBOX_RESULTS/child.pid\"\necho started\nsleep \"${SECS:-300}\"",
        );
        write_script(
            &scripts,
            "report.sh",
            "# description: values and files",
            "echo 'jojo_return_value answer=42'\nmkdir -p \"$OPSBOX_RESULTS/sub\"\necho hello > \"$OPSBOX_RESULTS/sub/a.txt\"\necho oops >&2\nexit 3",
        );
        let mut config = ServerConfig {
            listen: vec!["127.0.0.1:0".into()],
            data: data.clone(),
            scripts: scripts.clone(),
            ..ServerConfig::default()
        };
        config.limits.kill_grace_secs = 1;
        adjust(&mut config);
        let server = Server::bind(config).await.unwrap();
        let addr = server
            .local_addrs()
            .into_iter()
            .find_map(|a| match a {
                ListenAddr::Http(a) => Some(format!("http://{a}")),
                ListenAddr::Https(a) => Some(format!("https://{a}")),
                ListenAddr::Unix(_) => None,
            })
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let core = server.core().clone();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            base: addr,
            _dir: dir,
            scripts,
            data,
            core,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// GETs a path and decodes its JSON answer (any status).
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs to a path, with a JSON body when given, and decodes its JSON answer.
    pub async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> T {
        let mut request = client().post(self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap().json().await.unwrap()
    }

    /// Adds user `admin` (password `pw`): from then on the server requires credentials.
    pub async fn add_admin(&self) {
        let response = client()
            .post(self.url("/v1/users"))
            .json(&serde_json::json!({"name": "admin", "password": "pw", "role": "admin"}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

pub fn write_script(dir: &Path, file: &str, meta: &str, body: &str) {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!("#!/bin/sh\n# -- jojo --\n{meta}\n# -- jojo --\n{body}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Percent-encodes a job name for a path segment (names hold `@` and `:`).
pub fn seg(name: &str) -> String {
    name.replace('@', "%40").replace(':', "%3A")
}

pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Sends raw HTTP/1.1 bytes (the request should say `Connection: close`) and returns
/// (status code, headers, body) of the answer, with the headers as text.
pub async fn raw_http(base: &str, request: &[u8]) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    // The server may close with part of the request unread: keep what came before.
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (code, headers.to_owned(), body.to_owned())
}

/// A `POST` with a chunked body of `size` bytes of `x` in 512-byte chunks, and the
/// given extra header lines (each ending `\r\n`).
pub fn chunked_post(path: &str, headers: &str, size: usize) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{headers}\r\n"
    )
    .into_bytes();
    let mut left = size;
    while left > 0 {
        let n = left.min(512);
        request.extend_from_slice(format!("{n:x}\r\n{}\r\n", "x".repeat(n)).as_bytes());
        left -= n;
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

/// A `POST` whose chunked body breaks off with a chunk size that is not hex, after the
/// given extra header lines (each ending `\r\n`).
pub fn malformed_chunked_post(path: &str, headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{headers}\r\n2\r\n{{}}\r\nzz\r\n"
    )
    .into_bytes()
}
