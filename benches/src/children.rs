//! Servers the benchmarks start as child processes: logs to a file, killed on drop, and
//! a clear error with the log's tail when one dies early. Shared by every bench binary
//! (`#[path]`-included, as the crate has no library target).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

pub struct ChildGuard {
    pub name: &'static str,
    pub child: Child,
    log: PathBuf,
}

impl ChildGuard {
    pub fn start(name: &'static str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(ChildGuard { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited, with the tail of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program path that still works from another working directory: a path with a
/// directory part is made absolute; a bare name is left for the `PATH` lookup.
pub fn program_path(program: &Path) -> anyhow::Result<PathBuf> {
    if program.components().count() > 1 {
        std::fs::canonicalize(program).with_context(|| {
            format!(
                "{} not found (build it: cargo build --release -p opsbox)",
                program.display()
            )
        })
    } else {
        Ok(program.to_path_buf())
    }
}

/// A free loopback port (bound, read, released: the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
