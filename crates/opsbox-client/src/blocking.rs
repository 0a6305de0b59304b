//! A blocking client, for programs without an async runtime.
//!
//! [`Client`] wraps the async [`crate::Client`] and a current-thread tokio runtime it
//! owns, like `reqwest::blocking`. Live streams become iterators. Do not use it from
//! inside an async runtime (blocking there panics): use the async client instead.
//!
//! ```no_run
//! use opsbox_client::blocking::Client;
//!
//! # fn main() -> opsbox_client::Result<()> {
//! let client = Client::builder("http://127.0.0.1:3000")
//!     .basic_auth("alice", "secret")
//!     .connect()?;
//! let run = client.run("echo", [("text", "hello")])?;
//! println!("{:?}", run.output.unwrap_or_default().stdout);
//!
//! let job = client.run_async("countdown", opsbox_client::NO_PARAMS)?;
//! for event in client.follow_log(&job.name) {
//!     println!("{:?}", event?);
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use opsbox_api::{
    CreatedToken, Event, EventPage, Job, JobOutput, JobSpec, LogEvent, NewToken, NewUser,
    ReloadReport, ResultList, RunResponse, Script, ScriptList, ScriptProblem, ServerInfo, Token,
    User, WaitResponse,
};
use tokio::runtime::Runtime;

use crate::error::{ClientError, Result};
use crate::JobFilter;

/// Sets up a blocking [`Client`]; the same settings as [`crate::ClientBuilder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    inner: crate::ClientBuilder,
}

impl ClientBuilder {
    pub fn basic_auth(self, user: impl Into<String>, password: impl Into<String>) -> Self {
        ClientBuilder {
            inner: self.inner.basic_auth(user, password),
        }
    }

    pub fn token(self, token: impl Into<String>) -> Self {
        ClientBuilder {
            inner: self.inner.token(token),
        }
    }

    /// See [`crate::ClientBuilder::danger_accept_invalid_certs`].
    pub fn danger_accept_invalid_certs(self, accept: bool) -> Self {
        ClientBuilder {
            inner: self.inner.danger_accept_invalid_certs(accept),
        }
    }

    pub fn connect_timeout(self, timeout: Duration) -> Self {
        ClientBuilder {
            inner: self.inner.connect_timeout(timeout),
        }
    }

    /// Builds the client without talking to the server.
    pub fn build(self) -> Result<Client> {
        let runtime = new_runtime()?;
        let inner = {
            let _entered = runtime.enter();
            self.inner.build()?
        };
        Ok(Client {
            inner,
            runtime: Arc::new(runtime),
        })
    }

    /// Builds the client and loads the script index.
    pub fn connect(self) -> Result<Client> {
        let client = self.build()?;
        client.scripts()?;
        Ok(client)
    }
}

/// A blocking client of one opsbox server. Clones share the runtime, the connection
/// pool and the script cache.
#[derive(Debug, Clone)]
pub struct Client {
    inner: crate::Client,
    runtime: Arc<Runtime>,
}

impl Client {
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            inner: crate::Client::builder(url),
        }
    }

    /// Wraps an async client, with a runtime of its own.
    pub fn from_async(client: crate::Client) -> Result<Client> {
        Ok(Client {
            inner: client,
            runtime: Arc::new(new_runtime()?),
        })
    }

    /// The async client inside.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    pub fn server(&self) -> &str {
        self.inner.server()
    }

    fn block<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn info(&self) -> Result<ServerInfo> {
        self.block(self.inner.info())
    }

    pub fn scripts(&self) -> Result<ScriptList> {
        self.block(self.inner.scripts())
    }

    pub fn cached_scripts(&self) -> Vec<Script> {
        self.inner.cached_scripts()
    }

    pub fn cached_problems(&self) -> Vec<ScriptProblem> {
        self.inner.cached_problems()
    }

    /// See [`crate::Client::get_script`].
    pub fn get_script(&self, name: &str, use_cache: bool) -> Result<Option<Script>> {
        self.block(self.inner.get_script(name, use_cache))
    }

    pub fn reload(&self) -> Result<ReloadReport> {
        self.block(self.inner.reload())
    }

    /// See [`crate::Client::run`].
    pub fn run<I, K, V>(&self, script: &str, params: I) -> Result<RunResponse>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.block(self.inner.run(script, params))
    }

    pub fn run_async<I, K, V>(&self, script: &str, params: I) -> Result<Job>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.block(self.inner.run_async(script, params))
    }

    pub fn jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        self.block(self.inner.jobs(filter))
    }

    pub fn job(&self, name: &str) -> Result<Job> {
        self.block(self.inner.job(name))
    }

    pub fn spec(&self, name: &str) -> Result<JobSpec> {
        self.block(self.inner.spec(name))
    }

    pub fn log(&self, name: &str) -> Result<JobOutput> {
        self.block(self.inner.log(name))
    }

    /// The job's output live; see [`crate::Client::follow_log`].
    pub fn follow_log(&self, name: &str) -> Iter<LogEvent> {
        self.iter(self.inner.follow_log(name).boxed())
    }

    /// See [`crate::Client::wait`].
    pub fn wait(&self, name: &str, timeout: Option<Duration>) -> Result<WaitResponse> {
        self.block(self.inner.wait(name, timeout))
    }

    pub fn kill(&self, name: &str) -> Result<Job> {
        self.block(self.inner.kill(name))
    }

    pub fn clean(&self, name: &str) -> Result<()> {
        self.block(self.inner.clean(name))
    }

    pub fn results(&self, name: &str) -> Result<ResultList> {
        self.block(self.inner.results(name))
    }

    pub fn download_result(&self, name: &str, path: &str) -> Result<Bytes> {
        self.block(self.inner.download_result(name, path))
    }

    pub fn events(&self, since: u64) -> Result<EventPage> {
        self.block(self.inner.events(since))
    }

    /// Events live, without end; see [`crate::Client::watch`].
    pub fn watch(&self, since: Option<u64>) -> Iter<Event> {
        self.iter(self.inner.watch(since).boxed())
    }

    pub fn users(&self) -> Result<Vec<User>> {
        self.block(self.inner.users())
    }

    pub fn add_user(&self, user: NewUser) -> Result<User> {
        self.block(self.inner.add_user(user))
    }

    pub fn remove_user(&self, name: &str) -> Result<()> {
        self.block(self.inner.remove_user(name))
    }

    pub fn tokens(&self) -> Result<Vec<Token>> {
        self.block(self.inner.tokens())
    }

    pub fn create_token(&self, token: NewToken) -> Result<CreatedToken> {
        self.block(self.inner.create_token(token))
    }

    /// See [`crate::Client::rpc_call_value`].
    pub fn rpc_call_value(
        &self,
        name: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.block(self.inner.rpc_call_value(name, params))
    }

    /// See [`crate::Client::call`].
    pub fn call<P: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        params: P,
    ) -> Result<R> {
        self.block(self.inner.call(name, params))
    }

    /// See [`crate::Client::rpc_methods`].
    pub fn rpc_methods(&self) -> Result<Vec<opsbox_api::RpcMethod>> {
        self.block(self.inner.rpc_methods())
    }

    pub fn revoke_token(&self, id: &str) -> Result<()> {
        self.block(self.inner.revoke_token(id))
    }

    // -- queues ------------------------------------------------------------------------

    pub fn push(
        &self,
        to: &str,
        from: &str,
        messages: Vec<opsbox_api::NewMessage>,
    ) -> Result<Vec<opsbox_api::Message>> {
        self.block(self.inner.push(to, from, messages))
    }

    pub fn pull(
        &self,
        node: &str,
        request: opsbox_api::PullRequest,
    ) -> Result<Vec<opsbox_api::Message>> {
        self.block(self.inner.pull(node, request))
    }

    pub fn ack(&self, node: &str, ids: Vec<String>) -> Result<opsbox_api::AckResponse> {
        self.block(self.inner.ack(node, ids))
    }

    pub fn message(&self, id: &str) -> Result<opsbox_api::Message> {
        self.block(self.inner.message(id))
    }

    pub fn queue_messages(
        &self,
        node: &str,
        statuses: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<opsbox_api::Message>> {
        self.block(self.inner.queue_messages(node, statuses, limit))
    }

    pub fn update_message(
        &self,
        id: &str,
        node: Option<&str>,
        update: opsbox_api::UpdateMessage,
    ) -> Result<opsbox_api::Message> {
        self.block(self.inner.update_message(id, node, update))
    }

    pub fn delete_message(&self, id: &str, node: Option<&str>) -> Result<u64> {
        self.block(self.inner.delete_message(id, node))
    }

    pub fn purge_queue(&self, node: &str, statuses: Option<&str>) -> Result<u64> {
        self.block(self.inner.purge_queue(node, statuses))
    }

    pub fn queues(&self) -> Result<Vec<opsbox_api::QueueStats>> {
        self.block(self.inner.queues())
    }

    pub fn queue_stats(&self, node: &str) -> Result<opsbox_api::QueueStats> {
        self.block(self.inner.queue_stats(node))
    }

    fn iter<T>(&self, stream: BoxStream<'static, Result<T>>) -> Iter<T> {
        Iter {
            runtime: self.runtime.clone(),
            stream,
        }
    }
}

/// A live stream as a blocking iterator: each `next` waits for the next item.
pub struct Iter<T> {
    runtime: Arc<Runtime>,
    stream: BoxStream<'static, Result<T>>,
}

impl<T> Iterator for Iter<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.stream.next())
    }
}

impl<T> std::fmt::Debug for Iter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

fn new_runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Config(format!("cannot start the client's runtime: {e}")))
}
