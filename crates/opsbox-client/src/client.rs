//! The async [`Client`]: one method per native API call, a cache of the script index,
//! and live streams (job log, event watch) that resume by themselves after a dropped
//! connection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use opsbox_api::{
    CreatedToken, Event, EventPage, Job, JobList, JobOutput, JobSpec, JobState, LogEvent, NewToken,
    NewUser, ReloadReport, ResultList, RunRequest, RunResponse, Script, ScriptList, ScriptProblem,
    ServerInfo, Token, TokenList, User, UserList, WaitResponse,
};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result};
use crate::sse::{self, SseMessage};

/// How long one `wait` request asks the server to hold it; longer waits are several
/// requests, so no proxy or idle timeout cuts a wait off.
pub const WAIT_CHUNK: Duration = Duration::from_secs(30);

/// How many times in a row a live stream reconnects without receiving anything before
/// it gives up with [`ClientError::Stream`].
const MAX_RESUMES: u32 = 3;

/// An empty parameter list, for scripts that take none: `client.run("uptime", NO_PARAMS)`.
pub const NO_PARAMS: [(&str, &str); 0] = [];

/// Which jobs [`Client::jobs`] lists. Every field narrows the list; the default lists
/// the server's default number of newest jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub script: Option<String>,
    pub limit: Option<u32>,
}

impl JobFilter {
    pub fn state(mut self, state: JobState) -> Self {
        self.state = Some(state);
        self
    }

    pub fn script(mut self, script: impl Into<String>) -> Self {
        self.script = Some(script.into());
        self
    }

    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(state) = self.state {
            query.push(("state", state.as_str().to_string()));
        }
        if let Some(script) = &self.script {
            query.push(("script", script.clone()));
        }
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        query
    }
}

/// Credentials sent with every request.
#[derive(Clone)]
enum Auth {
    Basic { user: String, password: String },
    Bearer(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// Sets up a [`Client`]: server URL, credentials, TLS leniency.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    auth: Option<Auth>,
    accept_invalid_certs: bool,
    connect_timeout: Duration,
}

impl ClientBuilder {
    /// Sends `Authorization: Basic` with this user and password. Replaces a token.
    pub fn basic_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(Auth::Basic {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Sends `Authorization: Bearer <token>`. Replaces a user and password.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Some(Auth::Bearer(token.into()));
        self
    }

    /// Accepts any TLS certificate, e.g. a server's self-signed one. Anyone on the path
    /// can then read and change the traffic: for tests and first setup only.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.accept_invalid_certs = accept;
        self
    }

    /// How long to try to open a connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builds the client without talking to the server. Its script cache is empty
    /// until [`Client::scripts`] or [`Client::get_script`] fills it.
    pub fn build(self) -> Result<Client> {
        // `unix:PATH`, as the server's `--listen` spells a Unix socket: plain HTTP over
        // that socket, with requests addressed to `localhost`.
        let socket = self
            .url
            .strip_prefix("unix:")
            .map(|path| path.strip_prefix("//").unwrap_or(path));
        if socket.is_some_and(|path| !path.starts_with('/')) {
            return Err(ClientError::Config(format!(
                "invalid server URL '{}': a Unix socket is given by its absolute path, \
                 as unix:/run/opsbox.sock",
                self.url
            )));
        }
        let spelled = if socket.is_some() {
            "http://localhost"
        } else {
            &self.url
        };
        let url = reqwest::Url::parse(spelled)
            .map_err(|e| ClientError::Config(format!("invalid server URL '{}': {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(ClientError::Config(format!(
                "invalid server URL '{}': it must start with http://, https:// or unix:",
                self.url
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ClientError::Config(format!(
                "invalid server URL '{}': it must not have a query or fragment",
                self.url
            )));
        }
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("opsbox-client/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.connect_timeout)
            .danger_accept_invalid_certs(self.accept_invalid_certs);
        if let Some(path) = socket {
            http = http.unix_socket(std::path::Path::new(path));
        }
        let http = http
            .build()
            .map_err(|e| ClientError::Config(format!("cannot set up HTTP: {e}")))?;
        let base = url.as_str().trim_end_matches('/').to_string();
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                server: socket.map_or_else(|| base.clone(), |path| format!("unix:{path}")),
                base,
                auth: self.auth,
                scripts: RwLock::new(None),
            }),
        })
    }

    /// Builds the client and loads the script index, like PyMoJo's `Mojo()`: fails if
    /// the server cannot be reached or refuses the credentials.
    pub async fn connect(self) -> Result<Client> {
        let client = self.build()?;
        client.scripts().await?;
        Ok(client)
    }
}

/// An async client of one opsbox server. Cheap to clone; clones share the connection
/// pool and the script cache.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// The server as shown to people: the base URL, or `unix:PATH`.
    server: String,
    /// Server URL without a trailing slash; API paths are appended to it, so a server
    /// mounted under a prefix behind a proxy works.
    base: String,
    auth: Option<Auth>,
    /// The script index as last fetched; `None` until first fetched.
    scripts: RwLock<Option<ScriptCache>>,
}

#[derive(Debug, Clone, Default)]
struct ScriptCache {
    scripts: BTreeMap<String, Script>,
    problems: Vec<ScriptProblem>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.server)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts setting up a client of the server at `url` (`http://127.0.0.1:3000`, or
    /// `unix:/run/opsbox.sock` for a server listening on a Unix socket).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            auth: None,
            accept_invalid_certs: false,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The server this client talks to: its URL, or `unix:PATH` for a Unix socket.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    // -----------------------------------------------------------------------------------
    // Server
    // -----------------------------------------------------------------------------------

    /// `GET /v1/info`: version, current revision, and who the server thinks you are.
    pub async fn info(&self) -> Result<ServerInfo> {
        self.json(self.request(Method::GET, "/v1/info")).await
    }

    // -----------------------------------------------------------------------------------
    // Scripts
    // -----------------------------------------------------------------------------------

    /// `GET /v1/scripts`: the whole catalog and its problems. Refreshes the cache.
    pub async fn scripts(&self) -> Result<ScriptList> {
        let list: ScriptList = self.json(self.request(Method::GET, "/v1/scripts")).await?;
        *self
            .inner
            .scripts
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(ScriptCache {
            scripts: list
                .scripts
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            problems: list.problems.clone(),
        });
        Ok(list)
    }

    /// The cached scripts, by name; empty before the index was first fetched.
    pub fn cached_scripts(&self) -> Vec<Script> {
        self.with_cache(|cache| cache.map(|c| c.scripts.values().cloned().collect()))
            .unwrap_or_default()
    }

    /// The problems of the cached index: files the server could not load.
    pub fn cached_problems(&self) -> Vec<ScriptProblem> {
        self.with_cache(|cache| cache.map(|c| c.problems.clone()))
            .unwrap_or_default()
    }

    /// One script by name, `None` if the server has none by that name.
    ///
    /// With `use_cache`, answers from the cached index (fetching it first if it never
    /// was). Without, asks `GET /v1/scripts/{name}` and refreshes that cache entry.
    pub async fn get_script(&self, name: &str, use_cache: bool) -> Result<Option<Script>> {
        if use_cache {
            if let Some(found) =
                self.with_cache(|cache| cache.map(|c| c.scripts.get(name).cloned()))
            {
                return Ok(found);
            }
            let list = self.scripts().await?;
            return Ok(list.scripts.into_iter().find(|s| s.name == name));
        }
        let path = format!("/v1/scripts/{}", encode_segment(name));
        let answer: Result<Script> = self.json(self.request(Method::GET, &path)).await;
        let mut cache = self
            .inner
            .scripts
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok(script) => {
                if let Some(cache) = cache.as_mut() {
                    cache.scripts.insert(script.name.clone(), script.clone());
                }
                Ok(Some(script))
            }
            Err(ClientError::NotFound(_)) => {
                if let Some(cache) = cache.as_mut() {
                    cache.scripts.remove(name);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/reload`: the server rescans its scripts directory; then the cached
    /// index is refreshed.
    pub async fn reload(&self) -> Result<ReloadReport> {
        let report: ReloadReport = self.json(self.request(Method::POST, "/v1/reload")).await?;
        self.scripts().await?;
        Ok(report)
    }

    /// Runs a script and waits for its end: the finished job and its output.
    ///
    /// A script that fails is not an error here: look at `job.state` and
    /// `job.exit_code`. Errors are refusals (unknown script, missing parameter) and
    /// transport failures.
    pub async fn run<I, K, V>(&self, script: &str, params: I) -> Result<RunResponse>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let request = self
            .request(Method::POST, &script_run_path(script))
            .json(&run_request(params));
        self.json(request).await
    }

    /// Submits a run and returns at once with the queued (or already running) job.
    pub async fn run_async<I, K, V>(&self, script: &str, params: I) -> Result<Job>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let request = self
            .request(Method::POST, &script_run_path(script))
            .query(&[("wait", "false")])
            .json(&run_request(params));
        let response: RunResponse = self.json(request).await?;
        Ok(response.job)
    }

    // -----------------------------------------------------------------------------------
    // Jobs
    // -----------------------------------------------------------------------------------

    /// `GET /v1/jobs`: jobs matching the filter, newest first.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let request = self.request(Method::GET, "/v1/jobs").query(&filter.query());
        let list: JobList = self.json(request).await?;
        Ok(list.jobs)
    }

    /// One job as it is now.
    pub async fn job(&self, name: &str) -> Result<Job> {
        self.json(self.request(Method::GET, &job_path(name, "")))
            .await
    }

    /// What was asked for when the job was submitted.
    pub async fn spec(&self, name: &str) -> Result<JobSpec> {
        self.json(self.request(Method::GET, &job_path(name, "/spec")))
            .await
    }

    /// The job's output so far, as lines.
    pub async fn log(&self, name: &str) -> Result<JobOutput> {
        self.json(self.request(Method::GET, &job_path(name, "/log")))
            .await
    }

    /// The job's output live, from its first chunk: [`LogEvent::Output`] items, then
    /// one [`LogEvent::End`] with the finished job, then the stream ends.
    ///
    /// A dropped connection is resumed after the last chunk received, so no chunk is
    /// seen twice or lost.
    pub fn follow_log(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<LogEvent>> + Send + Unpin + 'static {
        self.follow_log_since(name, 0)
    }

    /// Like [`follow_log`](Self::follow_log), starting after chunk number `since`.
    pub fn follow_log_since(
        &self,
        name: &str,
        since: u64,
    ) -> impl Stream<Item = Result<LogEvent>> + Send + Unpin + 'static {
        let client = self.clone();
        let path = job_path(name, "/log");
        Box::pin(async_stream::stream! {
            let mut since = since;
            let mut fruitless = 0;
            let mut connected = false;
            loop {
                let request = client
                    .request(Method::GET, &path)
                    .query(&[("follow", "true".to_string()), ("since", since.to_string())]);
                let broke = match client.open_sse(request).await {
                    Ok(mut messages) => loop {
                        connected = true;
                        match messages.next().await {
                            Some(Ok(message)) => match sse::decode_log_message(&message) {
                                Ok(Some(event)) => {
                                    fruitless = 0;
                                    let end = matches!(event, LogEvent::End(_));
                                    if let LogEvent::Output(chunk) = &event {
                                        since = chunk.seq;
                                    }
                                    yield Ok(event);
                                    if end {
                                        return;
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    yield Err(e);
                                    return;
                                }
                            },
                            Some(Err(broke)) => break broke,
                            None => break "the server closed the log stream before the job ended".to_string(),
                        }
                    },
                    // Never reached: say so, rather than that a stream broke off.
                    Err(e) if e.is_retryable() && connected => e.to_string(),
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                fruitless += 1;
                if fruitless > MAX_RESUMES {
                    yield Err(ClientError::Stream(broke));
                    return;
                }
                tracing::debug!(%broke, since, "log stream broke off; resuming");
                tokio::time::sleep(resume_delay(fruitless)).await;
            }
        })
    }

    /// Waits for the job to end, at most `timeout` (`None`: as long as it takes).
    ///
    /// The server holds each request up to [`WAIT_CHUNK`]; this loops until the job is
    /// done or the deadline passes, and returns the job as it is then: check
    /// [`WaitResponse::done`].
    pub async fn wait(&self, name: &str, timeout: Option<Duration>) -> Result<WaitResponse> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let chunk = match deadline {
                Some(deadline) => deadline
                    .saturating_duration_since(Instant::now())
                    .min(WAIT_CHUNK),
                None => WAIT_CHUNK,
            };
            let response = self.wait_once(name, chunk).await?;
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if response.done || expired {
                return Ok(response);
            }
        }
    }

    /// One long-poll: the server holds the request until the job ends or `timeout`
    /// passes (it caps `timeout` at its own limit, 60 s by default).
    pub async fn wait_once(&self, name: &str, timeout: Duration) -> Result<WaitResponse> {
        let request = self
            .request(Method::GET, &job_path(name, "/wait"))
            .query(&[("timeout", timeout.as_secs_f64().to_string())])
            // The server answers within `timeout`; a silent connection past that plus a
            // margin is a dead one.
            .timeout(timeout + Duration::from_secs(30));
        self.json(request).await
    }

    /// Kills a queued or running job (its whole process group); returns it as it is
    /// then. Killing a finished job is a no-op.
    pub async fn kill(&self, name: &str) -> Result<Job> {
        self.json(self.request(Method::POST, &job_path(name, "/kill")))
            .await
    }

    /// Deletes a finished job with its output and result files.
    /// [`ClientError::Conflict`] while it still runs.
    pub async fn clean(&self, name: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &job_path(name, "")))
            .await?;
        Ok(())
    }

    /// The result files the job wrote into `$OPSBOX_RESULTS`.
    pub async fn results(&self, name: &str) -> Result<ResultList> {
        self.json(self.request(Method::GET, &job_path(name, "/results")))
            .await
    }

    /// The bytes of one result file; `path` is as listed by [`results`](Self::results).
    pub async fn download_result(&self, name: &str, path: &str) -> Result<Bytes> {
        let path = format!("{}/{}", job_path(name, "/results"), encode_path(path));
        let response = self.send(self.request(Method::GET, &path)).await?;
        Ok(response.bytes().await?)
    }

    // -----------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------

    /// `GET /v1/events?since=REV`: the events after revision `since` (one page).
    /// [`ClientError::Gone`] when `since` was compacted away.
    pub async fn events(&self, since: u64) -> Result<EventPage> {
        let request = self
            .request(Method::GET, "/v1/events")
            .query(&[("since", since)]);
        self.json(request).await
    }

    /// Every event after revision `since` (`None`: from now on), live, without end.
    ///
    /// A dropped connection is resumed after the last revision received. If the
    /// revision to resume from was compacted away, the stream yields
    /// [`ClientError::Gone`] and ends: re-list, then watch from its `current_revision`.
    /// (Watching "from now", events that happen during a reconnection before the first
    /// event arrived are not replayed; pass a revision from [`info`](Self::info) to
    /// make that gap-free.)
    pub fn watch(
        &self,
        since: Option<u64>,
    ) -> impl Stream<Item = Result<Event>> + Send + Unpin + 'static {
        let client = self.clone();
        Box::pin(async_stream::stream! {
            let mut since = since;
            let mut fruitless = 0;
            let mut connected = false;
            loop {
                let mut query = vec![("follow", "true".to_string())];
                if let Some(since) = since {
                    query.push(("since", since.to_string()));
                }
                let request = client.request(Method::GET, "/v1/events").query(&query);
                let broke = match client.open_sse(request).await {
                    Ok(mut messages) => loop {
                        connected = true;
                        match messages.next().await {
                            Some(Ok(message)) => match sse::decode_watch_message(&message) {
                                Ok(Some(event)) => {
                                    fruitless = 0;
                                    since = Some(event.rev);
                                    yield Ok(event);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    yield Err(e);
                                    return;
                                }
                            },
                            Some(Err(broke)) => break broke,
                            None => break "the server closed the event stream".to_string(),
                        }
                    },
                    // Never reached: say so, rather than that a stream broke off.
                    Err(e) if e.is_retryable() && connected => e.to_string(),
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                fruitless += 1;
                if fruitless > MAX_RESUMES {
                    yield Err(ClientError::Stream(broke));
                    return;
                }
                tracing::debug!(%broke, ?since, "event stream broke off; resuming");
                tokio::time::sleep(resume_delay(fruitless)).await;
            }
        })
    }

    // -----------------------------------------------------------------------------------
    // Users and tokens (admin role)
    // -----------------------------------------------------------------------------------

    pub async fn users(&self) -> Result<Vec<User>> {
        let list: UserList = self.json(self.request(Method::GET, "/v1/users")).await?;
        Ok(list.users)
    }

    pub async fn add_user(&self, user: NewUser) -> Result<User> {
        self.json(self.request(Method::POST, "/v1/users").json(&user))
            .await
    }

    pub async fn remove_user(&self, name: &str) -> Result<()> {
        let path = format!("/v1/users/{}", encode_segment(name));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<Token>> {
        let list: TokenList = self.json(self.request(Method::GET, "/v1/tokens")).await?;
        Ok(list.tokens)
    }

    /// Creates an API token; the answer holds its secret, shown this once only.
    pub async fn create_token(&self, token: NewToken) -> Result<CreatedToken> {
        self.json(self.request(Method::POST, "/v1/tokens").json(&token))
            .await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let path = format!("/v1/tokens/{}", encode_segment(id));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Plumbing
    // -----------------------------------------------------------------------------------

    fn with_cache<T>(&self, f: impl FnOnce(Option<&ScriptCache>) -> Option<T>) -> Option<T> {
        let cache = self.inner.scripts.read().unwrap_or_else(|e| e.into_inner());
        f(cache.as_ref())
    }

    // -----------------------------------------------------------------------------------
    // RPC (JSON-RPC 2.0 at /rpc)
    // -----------------------------------------------------------------------------------

    /// Calls a registered function (built-in, host, script or embedded) with params
    /// by position (a JSON array), by name (an object), or none (`null`), and returns
    /// its raw JSON result. A script call waits for its job.
    pub async fn rpc_call_value(
        &self,
        name: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let mut request = serde_json::json!({"jsonrpc": "2.0", "method": name, "id": 1});
        match params {
            serde_json::Value::Null => {}
            p @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                request["params"] = p
            }
            scalar => request["params"] = serde_json::Value::Array(vec![scalar]),
        }
        let mut answer: serde_json::Value = self
            .json(self.request(Method::POST, "/rpc").json(&request))
            .await?;
        if let Some(error) = answer.get_mut("error") {
            return Err(ClientError::Rpc {
                code: error["code"].as_i64().unwrap_or(0),
                message: error["message"].as_str().unwrap_or("").to_owned(),
                data: error.get_mut("data").map(serde_json::Value::take),
            });
        }
        Ok(answer
            .get_mut("result")
            .map(serde_json::Value::take)
            .unwrap_or_default())
    }

    /// Typed call: `params` serialises to an array (a tuple or `Vec`), an object (a
    /// struct or map) or `()`; the result is read into `R`.
    ///
    /// ```no_run
    /// # async fn demo(client: opsbox_client::Client) -> opsbox_client::Result<()> {
    /// let sum: i64 = client.call("add", (1, 2)).await?;
    /// let help: String = client.call("method_help", ["ping"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<P: serde::Serialize, R: DeserializeOwned>(
        &self,
        name: &str,
        params: P,
    ) -> Result<R> {
        let params = serde_json::to_value(params).map_err(|source| ClientError::Decode {
            what: format!("the params of {name}"),
            source,
        })?;
        let result = self.rpc_call_value(name, params).await?;
        serde_json::from_value(result).map_err(|source| ClientError::Decode {
            what: format!("the result of {name}"),
            source,
        })
    }

    /// Every function the server serves, described (doc, params, role, source), from
    /// its OpenRPC document.
    pub async fn rpc_methods(&self) -> Result<Vec<opsbox_api::RpcMethod>> {
        let doc = self
            .rpc_call_value("rpc.discover", serde_json::Value::Null)
            .await?;
        let mut methods = Vec::new();
        for m in doc["methods"].as_array().cloned().unwrap_or_default() {
            methods.push(method_of_openrpc(&m));
        }
        Ok(methods)
    }

    /// One function, described; `None` when the server has no such function.
    pub async fn rpc_method(&self, name: &str) -> Result<Option<opsbox_api::RpcMethod>> {
        Ok(self
            .rpc_methods()
            .await?
            .into_iter()
            .find(|m| m.name == name))
    }

    /// A request to `path` (already percent-encoded) with the credentials.
    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_url(method, &format!("{}{path}", self.inner.base))
    }

    /// A request to any URL with this client's credentials and TLS settings: for the
    /// older APIs a server also speaks (`opsbox disco` uses it for `/disco/...`).
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        let request = self.inner.http.request(method, url);
        match &self.inner.auth {
            Some(Auth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; a non-success answer becomes the matching [`ClientError`].
    async fn send(&self, request: RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(ClientError::from_answer(status.as_u16(), &body))
    }

    /// Sends a request and decodes its JSON answer.
    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        let request = request.build()?;
        let what = format!("{} {}", request.method(), request.url().path());
        let response = self.inner.http.execute(request).await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            return Err(ClientError::from_answer(status.as_u16(), &body));
        }
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode { what, source })
    }

    /// Opens a Server-Sent Events stream. Errors of the stream itself (a broken
    /// connection) come as `Err(description)` items, to be resumed by the caller.
    async fn open_sse(
        &self,
        request: RequestBuilder,
    ) -> Result<impl Stream<Item = Result<SseMessage, String>> + Send + Unpin + 'static> {
        let response = self
            .send(request.header(reqwest::header::ACCEPT, "text/event-stream"))
            .await?;
        Ok(sse::messages(response.bytes_stream()))
    }
}

/// `app/N` as two path segments.
fn unit_path(unit: &str) -> Result<String> {
    match unit.split_once('/') {
        Some((app, n)) if !app.is_empty() && !n.is_empty() => {
            Ok(format!("{}/{}", encode_segment(app), encode_segment(n)))
        }
        _ => Err(ClientError::Invalid(format!(
            "{unit:?} is not a unit name: use APP/N, like blog/0"
        ))),
    }
}

fn run_request<I, K, V>(params: I) -> RunRequest
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    RunRequest {
        params: params
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        placement: Default::default(),
    }
}

fn resume_delay(attempt: u32) -> Duration {
    Duration::from_millis(250 * u64::from(attempt.min(8)))
}

pub use opsbox_api::paths::{encode_path, encode_segment};

fn job_path(name: &str, suffix: &str) -> String {
    format!("/v1/jobs/{}{suffix}", encode_segment(name))
}

fn script_run_path(name: &str) -> String {
    format!("/v1/scripts/{}/run", encode_segment(name))
}

// ---------------------------------------------------------------------------------------
// Nodes and fan-out jobs
// ---------------------------------------------------------------------------------------

impl Client {
    /// `GET /v1/nodes`: every node ever seen, connected or not.
    pub async fn nodes(&self) -> Result<Vec<opsbox_api::Node>> {
        let list: opsbox_api::NodeList = self.json(self.request(Method::GET, "/v1/nodes")).await?;
        Ok(list.nodes)
    }

    pub async fn node(&self, id: &str) -> Result<opsbox_api::Node> {
        let path = format!("/v1/nodes/{}", encode_segment(id));
        self.json(self.request(Method::GET, &path)).await
    }

    /// Stops (`true`) or resumes (`false`) giving the node new tasks.
    pub async fn blacklist(&self, id: &str, on: bool) -> Result<opsbox_api::Node> {
        let verb = if on { "blacklist" } else { "whitelist" };
        let path = format!("/v1/nodes/{}/{verb}", encode_segment(id));
        self.json(self.request(Method::POST, &path)).await
    }

    // -- backups ---------------------------------------------------------------------

    /// Takes a backup of the whole store now (admin).
    pub async fn create_backup(&self, notes: &str) -> Result<opsbox_api::Backup> {
        let body = serde_json::json!({ "notes": notes });
        self.json(self.request(Method::POST, "/v1/backups").json(&body))
            .await
    }

    /// Every backup, oldest first (admin).
    pub async fn backups(&self) -> Result<Vec<opsbox_api::Backup>> {
        #[derive(serde::Deserialize)]
        struct List {
            backups: Vec<opsbox_api::Backup>,
        }
        let list: List = self.json(self.request(Method::GET, "/v1/backups")).await?;
        Ok(list.backups)
    }

    pub async fn remove_backup(&self, id: &str) -> Result<()> {
        let path = format!("/v1/backups/{}", encode_segment(id));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// The backup's file (an SQLite database).
    pub async fn download_backup(&self, id: &str) -> Result<Bytes> {
        let path = format!("/v1/backups/{}/file", encode_segment(id));
        Ok(self
            .send(self.request(Method::GET, &path))
            .await?
            .bytes()
            .await?)
    }

    // -- model -----------------------------------------------------------------------

    /// The whole model, with the revision to watch from.
    pub async fn model(&self) -> Result<opsbox_api::model::ModelStatus> {
        self.json(self.request(Method::GET, "/v1/model")).await
    }

    /// The charms the server can deploy.
    pub async fn charms(&self) -> Result<Vec<opsbox_api::model::Charm>> {
        #[derive(serde::Deserialize)]
        struct List {
            charms: Vec<opsbox_api::model::Charm>,
        }
        let list: List = self
            .json(self.request(Method::GET, "/v1/model/charms"))
            .await?;
        Ok(list.charms)
    }

    /// Deploys a charm as an application.
    pub async fn deploy(
        &self,
        request: &opsbox_api::model::DeployRequest,
    ) -> Result<opsbox_api::model::Application> {
        self.json(
            self.request(Method::POST, "/v1/model/applications")
                .json(request),
        )
        .await
    }

    /// Destroys an application: its units stop and go, then it does.
    pub async fn destroy_application(&self, app: &str) -> Result<()> {
        let path = format!("/v1/model/applications/{}", encode_segment(app));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// Exposes (`true`) or unexposes an application.
    pub async fn expose(&self, app: &str, on: bool) -> Result<opsbox_api::model::Application> {
        let verb = if on { "expose" } else { "unexpose" };
        let path = format!("/v1/model/applications/{}/{verb}", encode_segment(app));
        self.json(self.request(Method::POST, &path)).await
    }

    /// An application's effective config.
    pub async fn app_config(&self, app: &str) -> Result<opsbox_api::model::ApplicationConfig> {
        let path = format!("/v1/model/applications/{}/config", encode_segment(app));
        self.json(self.request(Method::GET, &path)).await
    }

    /// Sets and resets config options; returns the effective config.
    pub async fn set_app_config(
        &self,
        app: &str,
        change: &opsbox_api::model::ConfigChange,
    ) -> Result<opsbox_api::model::ApplicationConfig> {
        let path = format!("/v1/model/applications/{}/config", encode_segment(app));
        self.json(self.request(Method::PATCH, &path).json(change))
            .await
    }

    /// Replaces an application's constraints.
    pub async fn set_constraints(
        &self,
        app: &str,
        constraints: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        let path = format!("/v1/model/applications/{}/constraints", encode_segment(app));
        self.json(self.request(Method::PUT, &path).json(constraints))
            .await
    }

    /// Adds units; returns their names.
    pub async fn add_units(&self, app: &str, n: u32, to: Option<String>) -> Result<Vec<String>> {
        let path = format!("/v1/model/applications/{}/units", encode_segment(app));
        let request = opsbox_api::model::AddUnitsRequest { num_units: n, to };
        let names: opsbox_api::model::UnitNames = self
            .json(self.request(Method::POST, &path).json(&request))
            .await?;
        Ok(names.units)
    }

    /// Destroys a unit (`app/N`).
    pub async fn remove_unit(&self, unit: &str) -> Result<()> {
        let path = format!("/v1/model/units/{}", unit_path(unit)?);
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// Takes a unit out of `error`, running the failed hook again with `retry`.
    pub async fn resolved(&self, unit: &str, retry: bool) -> Result<()> {
        let path = format!(
            "/v1/model/units/{}/resolved?retry={retry}",
            unit_path(unit)?
        );
        self.send(self.request(Method::POST, &path)).await?;
        Ok(())
    }

    /// Relates two endpoints (`app` or `app:relation`).
    pub async fn relate(&self, a: &str, b: &str) -> Result<opsbox_api::model::Relation> {
        let request = opsbox_api::model::RelateRequest {
            endpoints: vec![a.to_owned(), b.to_owned()],
        };
        self.json(
            self.request(Method::POST, "/v1/model/relations")
                .json(&request),
        )
        .await
    }

    /// Removes the relation between two endpoints.
    pub async fn unrelate(&self, a: &str, b: &str) -> Result<()> {
        let path = format!(
            "/v1/model/relations/{}/{}",
            encode_segment(a),
            encode_segment(b)
        );
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// The model's name, uuid, https endpoints and certificate (for a Juju jenv file).
    pub async fn jenv(&self) -> Result<serde_json::Value> {
        self.json(self.request(Method::GET, "/v1/model/jenv")).await
    }

    /// `POST /v1/jobs`: queues a fan-out job and returns it at once.
    pub async fn submit(&self, request: &opsbox_api::FanoutRequest) -> Result<Job> {
        self.json(self.request(Method::POST, "/v1/jobs").json(request))
            .await
    }

    /// The tasks of a fan-out job.
    pub async fn tasks(&self, name: &str) -> Result<Vec<opsbox_api::Task>> {
        let list: opsbox_api::TaskList = self
            .json(self.request(Method::GET, &job_path(name, "/tasks")))
            .await?;
        Ok(list.tasks)
    }

    /// Runs a script where `placement` says; waits for the end unless `wait` is false.
    pub async fn run_placed(
        &self,
        script: &str,
        params: std::collections::BTreeMap<String, String>,
        placement: opsbox_api::Placement,
        wait: bool,
    ) -> Result<RunResponse> {
        let mut request = self
            .request(Method::POST, &script_run_path(script))
            .json(&RunRequest { params, placement });
        if !wait {
            request = request.query(&[("wait", "false")]);
        }
        self.json(request).await
    }
}

// ---------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------

impl Client {
    /// Pushes messages into `to`'s queue, sent by node `from`; returns them as stored.
    pub async fn push(
        &self,
        to: &str,
        from: &str,
        messages: Vec<opsbox_api::NewMessage>,
    ) -> Result<Vec<opsbox_api::Message>> {
        let path = format!("/v1/queues/{}/messages", encode_segment(to));
        let list: opsbox_api::MessageList = self
            .json(
                self.request(Method::POST, &path)
                    .query(&[("from", from)])
                    .json(&opsbox_api::PushRequest { messages }),
            )
            .await?;
        Ok(list.messages)
    }

    /// Claims up to `request.max` (default 1) of `node`'s oldest deliverable messages,
    /// waiting up to `request.wait` seconds for one; empty when there was none.
    pub async fn pull(
        &self,
        node: &str,
        request: opsbox_api::PullRequest,
    ) -> Result<Vec<opsbox_api::Message>> {
        let path = format!("/v1/queues/{}/pull", encode_segment(node));
        let list: opsbox_api::MessageList = self
            .json(self.request(Method::POST, &path).json(&request))
            .await?;
        Ok(list.messages)
    }

    /// Acks messages `node` pulled: they are never delivered again.
    pub async fn ack(&self, node: &str, ids: Vec<String>) -> Result<opsbox_api::AckResponse> {
        let path = format!("/v1/queues/{}/ack", encode_segment(node));
        self.json(
            self.request(Method::POST, &path)
                .json(&opsbox_api::AckRequest { ids }),
        )
        .await
    }

    pub async fn message(&self, id: &str) -> Result<opsbox_api::Message> {
        let path = format!("/v1/messages/{}", encode_segment(id));
        self.json(self.request(Method::GET, &path)).await
    }

    /// Messages sent by or to `node`, oldest first; `statuses` comma-separated.
    pub async fn queue_messages(
        &self,
        node: &str,
        statuses: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<opsbox_api::Message>> {
        let path = format!("/v1/queues/{}/messages", encode_segment(node));
        let mut query = Vec::new();
        if let Some(statuses) = statuses {
            query.push(("status", statuses.to_owned()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let list: opsbox_api::MessageList = self
            .json(self.request(Method::GET, &path).query(&query))
            .await?;
        Ok(list.messages)
    }

    /// Replaces the payload of a message not yet delivered, as its sender (`node`, or
    /// by default the message's own sender).
    pub async fn update_message(
        &self,
        id: &str,
        node: Option<&str>,
        update: opsbox_api::UpdateMessage,
    ) -> Result<opsbox_api::Message> {
        let path = format!("/v1/messages/{}", encode_segment(id));
        let query: Vec<(&str, &str)> = node.map(|n| ("node", n)).into_iter().collect();
        self.json(
            self.request(Method::PATCH, &path)
                .query(&query)
                .json(&update),
        )
        .await
    }

    /// Deletes a message not yet delivered, as its sender.
    pub async fn delete_message(&self, id: &str, node: Option<&str>) -> Result<u64> {
        let path = format!("/v1/messages/{}", encode_segment(id));
        let query: Vec<(&str, &str)> = node.map(|n| ("node", n)).into_iter().collect();
        let report: opsbox_api::DeleteReport = self
            .json(self.request(Method::DELETE, &path).query(&query))
            .await?;
        Ok(report.deleted)
    }

    /// Deletes the messages of `node`'s queue (with one of `statuses`, or all).
    pub async fn purge_queue(&self, node: &str, statuses: Option<&str>) -> Result<u64> {
        let path = format!("/v1/queues/{}/messages", encode_segment(node));
        let query: Vec<(&str, &str)> = statuses.map(|s| ("status", s)).into_iter().collect();
        let report: opsbox_api::DeleteReport = self
            .json(self.request(Method::DELETE, &path).query(&query))
            .await?;
        Ok(report.deleted)
    }

    /// Counts of every queue that holds a message.
    pub async fn queues(&self) -> Result<Vec<opsbox_api::QueueStats>> {
        let list: opsbox_api::QueueStatsList =
            self.json(self.request(Method::GET, "/v1/queues")).await?;
        Ok(list.queues)
    }

    pub async fn queue_stats(&self, node: &str) -> Result<opsbox_api::QueueStats> {
        let path = format!("/v1/queues/{}", encode_segment(node));
        self.json(self.request(Method::GET, &path)).await
    }
}

/// Reads one method of an opsbox OpenRPC document back into its description.
fn method_of_openrpc(m: &serde_json::Value) -> opsbox_api::RpcMethod {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    opsbox_api::RpcMethod {
        name: text(&m["name"]),
        doc: text(&m["description"]),
        params: m["params"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| opsbox_api::RpcParam {
                        name: text(&p["name"]),
                        kind: serde_json::from_value(p["schema"]["type"].clone())
                            .unwrap_or_default(),
                        required: p["required"].as_bool().unwrap_or(false),
                        default: p["schema"].get("default").cloned(),
                        description: p["description"].as_str().map(str::to_owned),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        role: serde_json::from_value(m["x-opsbox-role"].clone())
            .unwrap_or(opsbox_api::Role::Operator),
        source: serde_json::from_value(m["x-opsbox-source"].clone())
            .unwrap_or(opsbox_api::RpcSource::Registered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_percent_encoded_in_paths() {
        let name = "echo@5f3a:1b:2c";
        assert_eq!(job_path(name, "/log"), "/v1/jobs/echo%405f3a%3A1b%3A2c/log");
        assert_eq!(encode_segment("a/b c?#%"), "a%2Fb%20c%3F%23%25");
        assert_eq!(encode_segment("plain-name_1.2~"), "plain-name_1.2~");
        assert_eq!(encode_path("dir/my file.csv"), "dir/my%20file.csv");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn server_url_is_checked_and_trimmed() {
        let client = Client::builder("http://127.0.0.1:3000/").build().unwrap();
        assert_eq!(client.server(), "http://127.0.0.1:3000");
        let prefixed = Client::builder("https://proxy.example/opsbox/")
            .build()
            .unwrap();
        assert_eq!(prefixed.server(), "https://proxy.example/opsbox");
        let local = Client::builder("unix:/run/opsbox.sock").build().unwrap();
        assert_eq!(local.server(), "unix:/run/opsbox.sock");
        let slashes = Client::builder("unix:///run/opsbox.sock").build().unwrap();
        assert_eq!(slashes.server(), "unix:/run/opsbox.sock");
        for bad in [
            "127.0.0.1:3000",
            "ftp://x",
            "not a url",
            "http://h/?q=1",
            "unix:relative.sock",
        ] {
            let error = Client::builder(bad).build().unwrap_err();
            assert!(matches!(error, ClientError::Config(_)), "{bad}: {error:?}");
        }
    }

    #[test]
    fn job_filter_becomes_a_query() {
        let filter = JobFilter::default()
            .state(JobState::Running)
            .script("deploy")
            .limit(5);
        assert_eq!(
            filter.query(),
            vec![
                ("state", "running".to_string()),
                ("script", "deploy".to_string()),
                ("limit", "5".to_string())
            ]
        );
        assert!(JobFilter::default().query().is_empty());
    }

    #[test]
    fn credentials_do_not_show_in_debug() {
        let client = Client::builder("http://h:1")
            .basic_auth("alice", "s3cret")
            .build()
            .unwrap();
        let shown = format!("{client:?}");
        assert!(
            shown.contains("alice") && !shown.contains("s3cret"),
            "{shown}"
        );
        let client = Client::builder("http://h:1")
            .token("tok.abc")
            .build()
            .unwrap();
        assert!(!format!("{client:?}").contains("tok.abc"));
    }
}
