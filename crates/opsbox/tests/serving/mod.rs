//! `opsbox serve` as a child process on a free loopback port, for the tests that kill
//! a server and start another on the same data directory.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `opsbox serve`; killed when dropped.
pub struct Serve(pub Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a server and waits until its API answers.
pub async fn serve(data: &Path, scripts: &Path, port: u16) -> Serve {
    let child = Command::new(env!("CARGO_BIN_EXE_opsbox"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data")
        .arg(data)
        .arg("--scripts")
        .arg(scripts)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{port}/v1/info"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "opsbox serve did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

/// True while the process exists and is not a zombie waiting for a reaper.
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
