//! Rust SDK for the opsbox native API (`/v1`).
//!
//! [`Client`] is async (tokio, reqwest with rustls); [`blocking::Client`] wraps it for
//! programs without a runtime. Both speak only the native API, with the wire types of
//! [`opsbox_api`] (re-exported here as [`api`]).
//!
//! ```no_run
//! use futures::StreamExt;
//! use opsbox_client::{Client, JobFilter, api::{JobState, LogEvent}};
//!
//! # async fn demo() -> opsbox_client::Result<()> {
//! // Like PyMoJo's `Mojo(...)`: connect() loads and caches the script index.
//! let client = Client::builder("http://127.0.0.1:3000")
//!     .token("ops_1234.secret")
//!     .connect()
//!     .await?;
//! if let Some(script) = client.get_script("echo", true).await? {
//!     println!("{}: {:?}", script.name, script.description);
//! }
//!
//! // A synchronous run: the finished job and its output.
//! let run = client.run("echo", [("text", "hello")]).await?;
//! assert_eq!(run.job.state, JobState::Succeeded);
//!
//! // An asynchronous run, followed live.
//! let job = client.run_async("countdown", [("from", "3")]).await?;
//! let mut log = client.follow_log(&job.name);
//! while let Some(event) = log.next().await {
//!     match event? {
//!         LogEvent::Output(chunk) => print!("{}", chunk.data),
//!         LogEvent::End(job) => println!("ended: {}", job.state),
//!     }
//! }
//!
//! let running = client.jobs(&JobFilter::default().state(JobState::Running)).await?;
//! println!("{} jobs running", running.len());
//! # Ok(()) }
//! ```
//!
//! Errors are [`ClientError`]s: the server's refusals by kind (`NotFound`,
//! `BadRequest`, `Gone`…) carrying its message, and transport or decoding failures.
//! [`ClientConfig`] resolves the server and credentials from flags, environment and
//! `~/.config/opsbox/client.toml`, as the `opsbox` CLI does.

pub mod blocking;
mod client;
pub mod config;
mod error;
mod sse;

pub use client::{
    encode_path, encode_segment, Client, ClientBuilder, JobFilter, NO_PARAMS, WAIT_CHUNK,
};
pub use config::ClientConfig;
pub use error::{ClientError, Result};
pub use opsbox_api as api;
