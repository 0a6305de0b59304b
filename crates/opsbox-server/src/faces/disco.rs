//! The Disco master face (`/disco/...`): the E4 (0.5.x) wire format with the E1 shims of
//! the wire reference's §8, over the jobs and nodes services. Statuses map from job
//! states (`queued`/`running` → `active`, `succeeded` → `ready`, anything else →
//! `dead`); results are the result files of the job's last phase, as `http://` URLs
//! under `/disco/results/`, which every client generation fetches as they are. Disco's
//! clients send no credentials: `[disco] anonymous_role` says what such a request may
//! do once the server requires credentials (none, by default).
//!
//! Deviations, each because opsbox has no such thing: jobs are submitted the opsbox
//! way (a job pack or netstring submission is answered with an error naming it); the
//! event log (`rawevents`, `jobevents`) is written from the job's task records; `clean`
//! and `purge` both delete the job with its result files; `save_settings` and
//! `save_config_table` change only what opsbox has (slots of known nodes).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use opsbox_api::{Job, JobState, Role, Task, TaskState};
use opsbox_core::store::JobFilter;
use opsbox_core::CoreError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::body::BodyError;
use crate::AppState;

/// What `GET /disco/version` says: the client generation whose wire this face follows.
const VERSION: &str = "0.5.4";

/// Longest `get_results` long-poll, whatever the client asks.
const MAX_POLL: Duration = Duration::from_secs(300);

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/disco/version", get(version))
        .route("/disco/job/{*rest}", post(submit))
        .route("/disco/ctrl/nodeinfo", get(nodeinfo))
        .route("/disco/ctrl/joblist", get(joblist))
        .route("/disco/ctrl/jobinfo", get(jobinfo))
        .route("/disco/ctrl/get_results", get(results_v1).post(results))
        .route("/disco/ctrl/kill_job", post(kill))
        .route("/disco/ctrl/clean_job", post(clean))
        .route("/disco/ctrl/purge_job", post(clean))
        .route("/disco/ctrl/parameters", get(parameters))
        .route("/disco/ctrl/rawevents", get(rawevents))
        .route("/disco/ctrl/jobevents", get(jobevents))
        .route("/disco/ctrl/load_config_table", get(load_config))
        .route("/disco/ctrl/save_config_table", post(save_config))
        .route("/disco/ctrl/blacklist", post(blacklist))
        .route("/disco/ctrl/whitelist", post(whitelist))
        .route("/disco/ctrl/get_blacklist", get(get_blacklist))
        .route("/disco/ctrl/get_settings", get(get_settings))
        .route("/disco/ctrl/save_settings", post(save_settings))
        .route("/disco/ctrl/get_mapresults", get(get_mapresults))
        .route("/disco/ctrl/get_stageresults", get(get_stageresults))
        .route("/disco/ctrl/get_gc_blacklist", get(get_gc_blacklist))
        .route("/disco/ctrl/gc_blacklist", post(gc_list))
        .route("/disco/ctrl/gc_whitelist", post(gc_list))
        .route("/disco/results/{job}/{*path}", get(result_file))
        .layer(axum::middleware::from_fn_with_state(state, disco_caller))
}

/// Authenticates every Disco request. Disco's clients send no credentials, so the
/// `[disco] anonymous_role` policy decides what a request without any may do; a
/// refusal is a 401 with a JSON string body, as Disco's errors are.
async fn disco_caller(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let anonymous = state.config.disco.anonymous_role;
    match crate::auth::authenticate_or_anonymous(&state.core, request.headers(), anonymous).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(crate::auth::Refusal::Unauthenticated) => {
            let mut response = DiscoError(
                StatusCode::UNAUTHORIZED,
                "credentials required: send HTTP Basic or a Bearer token, or start the \
                 server with --disco-anonymous ROLE for clients that cannot"
                    .into(),
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"opsbox\""),
            );
            response
        }
        Err(crate::auth::Refusal::Internal(e)) => DiscoError::from(e).into_response(),
    }
}

/// A Disco error: status and a JSON string body, as the E3+ master answered.
struct DiscoError(StatusCode, String);

impl IntoResponse for DiscoError {
    fn into_response(self) -> Response {
        (self.0, Json(Value::String(self.1))).into_response()
    }
}

impl From<CoreError> for DiscoError {
    fn from(e: CoreError) -> Self {
        let status = match &e {
            CoreError::UnknownJob(_) | CoreError::UnknownScript(_) | CoreError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            CoreError::Forbidden(_) => StatusCode::FORBIDDEN,
            CoreError::Unauthenticated => StatusCode::UNAUTHORIZED,
            CoreError::Invalid(_) | CoreError::JobActive { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        DiscoError(status, e.to_string())
    }
}

type DiscoResult<T> = Result<T, DiscoError>;

/// A POST body, read against the server's body limit; a refusal is a Disco error
/// (`413 "Job packet too large"`, as the master answered an oversized job pack).
struct DiscoBody(Bytes);

impl FromRequest<AppState> for DiscoBody {
    type Rejection = DiscoError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, DiscoError> {
        match crate::body::read(request.into_body(), state.config.limits.max_body_bytes).await {
            Ok(body) => Ok(DiscoBody(body)),
            Err(BodyError::TooLarge { .. }) => Err(DiscoError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Job packet too large".into(),
            )),
            Err(e @ BodyError::Malformed(_)) => Err(bad(e.to_string())),
        }
    }
}

/// A query string; one that does not decode (`num=many`, a missing `stage`) is a
/// Disco error, `400` with a JSON string saying why, like a POST body that fails its
/// type check, not axum's plain-text rejection.
struct DiscoQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for DiscoQuery<T> {
    type Rejection = DiscoError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, DiscoError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(DiscoQuery(query)),
            Err(e) => Err(DiscoError(e.status(), e.body_text())),
        }
    }
}

/// Path parameters, refused as [`DiscoQuery`] refuses a query string.
struct DiscoPath<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for DiscoPath<T> {
    type Rejection = DiscoError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, DiscoError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(path)) => Ok(DiscoPath(path)),
            Err(e) => Err(DiscoError(e.status(), e.body_text())),
        }
    }
}

fn bad(message: impl Into<String>) -> DiscoError {
    DiscoError(StatusCode::BAD_REQUEST, message.into())
}

fn require(caller: &Caller, role: Role) -> DiscoResult<()> {
    caller
        .require(role)
        .map_err(|e| DiscoError(StatusCode::FORBIDDEN, e.to_string()))
}

/// A POST body that is a JSON string (a job or host name).
fn name_body(body: &[u8]) -> DiscoResult<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::String(name)) => Ok(name),
        _ => Err(bad("expected a JSON string")),
    }
}

#[derive(Deserialize)]
struct NameQuery {
    name: Option<String>,
    /// `v1`: the E1 shapes of nodeinfo and joblist (wire reference §8).
    format: Option<String>,
    num: Option<usize>,
    filter: Option<String>,
}

fn name_of(query: &NameQuery) -> DiscoResult<&str> {
    query
        .name
        .as_deref()
        .ok_or_else(|| bad("missing the name parameter"))
}

/// Disco's status word of a job.
fn status(state: JobState) -> &'static str {
    match state {
        JobState::Queued | JobState::Running => "active",
        JobState::Succeeded => "ready",
        JobState::Failed | JobState::Killed | JobState::Lost => "dead",
    }
}

fn disco_time(at: DateTime<Utc>) -> String {
    at.format("%Y/%m/%d %H:%M:%S").to_string()
}

/// `http://HOST/...` from the request's Host header.
fn base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// The result URLs of a finished job: the files of its last phase (reduce, else map).
fn result_urls(base: &str, job: &Job) -> Vec<String> {
    if job.state != JobState::Succeeded {
        return Vec::new();
    }
    if job.progress.is_empty() {
        // A plain run: all its files.
        return job
            .results
            .iter()
            .map(|f| result_url(base, &job.name, &f.path))
            .collect();
    }
    let phase = if job.reduce.is_some() {
        "reduce"
    } else {
        "map"
    };
    phase_urls(base, job, phase)
}

/// The result URLs of one phase of a fan-out job: the files its tasks wrote (under
/// `map-N/`), else the stdout of each of its tasks (`map-N.out`).
fn phase_urls(base: &str, job: &Job, phase: &str) -> Vec<String> {
    let prefix = format!("{phase}-");
    let of_phase = |p: &&str| p.starts_with(&prefix);
    let mut files: Vec<&str> = job
        .results
        .iter()
        .map(|f| f.path.as_str())
        .filter(of_phase)
        .filter(|p| p.contains('/'))
        .collect();
    if files.is_empty() {
        files = job
            .results
            .iter()
            .map(|f| f.path.as_str())
            .filter(of_phase)
            .filter(|p| p.ends_with(".out"))
            .collect();
    }
    files
        .into_iter()
        .map(|p| result_url(base, &job.name, p))
        .collect()
}

/// A result file's URL under this face (so that `[disco] anonymous_role` covers it).
fn result_url(base: &str, job: &str, path: &str) -> String {
    format!(
        "{base}/disco/results/{}/{}",
        opsbox_api::paths::encode_segment(job),
        opsbox_api::paths::encode_path(path)
    )
}

/// `GET /disco/results/{job}/{path}`: a result file, with `Range` support (Disco's
/// clients read large results in ranges).
async fn result_file(
    State(state): State<AppState>,
    DiscoPath((job, path)): DiscoPath<(String, String)>,
    request: axum::extract::Request,
) -> DiscoResult<Response> {
    let file = state.core.jobs.result_path(&job, &path).await?;
    use tower::ServiceExt;
    let served = tower_http::services::ServeFile::new(file)
        .oneshot(request)
        .await
        .map_err(|e| DiscoError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(served.map(axum::body::Body::new))
}

/// `get_stageresults?name=&stage=` (0.5): the result URLs of a finished stage, one
/// replica list each; 404 while the stage runs or when job or stage is unknown.
async fn get_stageresults(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<StageQuery>,
    headers: HeaderMap,
) -> DiscoResult<Json<Value>> {
    let job = known_job(&state, &query.name).await?;
    let urls = stage_urls(&base(&headers), &job, &query.stage)?;
    Ok(Json(Value::Array(
        urls.into_iter().map(|u| json!([u])).collect(),
    )))
}

/// `get_mapresults?name=` (0.3–0.4): the map stage's result URLs, flat.
async fn get_mapresults(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
    headers: HeaderMap,
) -> DiscoResult<Json<Value>> {
    let job = known_job(&state, name_of(&query)?).await?;
    Ok(Json(json!(stage_urls(&base(&headers), &job, "map")?)))
}

async fn known_job(state: &AppState, name: &str) -> DiscoResult<Job> {
    state.core.jobs.get(name).await.map_err(|e| match e {
        CoreError::UnknownJob(_) => DiscoError(StatusCode::NOT_FOUND, "unknown job".into()),
        e => e.into(),
    })
}

/// The results of a stage whose tasks have all succeeded.
fn stage_urls(base: &str, job: &Job, stage: &str) -> DiscoResult<Vec<String>> {
    let not_ready = || DiscoError(StatusCode::NOT_FOUND, format!("stage {stage} not ready"));
    if job.progress.is_empty() {
        // A plain run is one map task.
        return match (stage, job.state) {
            ("map", JobState::Succeeded) => Ok(result_urls(base, job)),
            ("map", _) => Err(not_ready()),
            _ => Err(DiscoError(
                StatusCode::NOT_FOUND,
                format!("unknown stage {stage}"),
            )),
        };
    }
    let progress = job
        .progress
        .iter()
        .find(|p| p.phase == stage)
        .ok_or_else(|| DiscoError(StatusCode::NOT_FOUND, format!("unknown stage {stage}")))?;
    if progress.total == 0 || progress.done < progress.total {
        return Err(not_ready());
    }
    Ok(phase_urls(base, job, stage))
}

#[derive(Deserialize)]
struct StageQuery {
    name: String,
    stage: String,
}

/// `get_gc_blacklist` (0.4.2+): the nodes DDFS's garbage collector must skip. opsbox
/// has no DDFS, hence no collector, and the list is always empty.
async fn get_gc_blacklist() -> Json<Value> {
    Json(json!([]))
}

/// `gc_blacklist` / `gc_whitelist`: refused, with why (nothing to exclude nodes from).
async fn gc_list() -> DiscoError {
    bad("opsbox has no DDFS and no garbage collector to exclude nodes from; use blacklist to keep tasks off a node")
}

async fn version() -> Json<&'static str> {
    Json(VERSION)
}

/// Job packs and netstring submissions: opsbox runs scripts, not Disco workers.
async fn submit(DiscoBody(body): DiscoBody) -> Response {
    let message = "opsbox runs scripts from its scripts directory, not Disco job packs: submit \
                   with `opsbox jobs submit --map SCRIPT --input ... [--reduce SCRIPT]` or POST \
                   /v1/jobs {\"map\": ..., \"inputs\": [...], \"reduce\": ...}";
    if body.starts_with(&[0xd5, 0xc0]) {
        return Json(json!(["error", message])).into_response();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("ERROR: {message}"),
    )
        .into_response()
}

async fn nodeinfo(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
) -> DiscoResult<Json<Value>> {
    let nodes = state.core.nodes.list().await?;
    if query.format.as_deref() == Some("v1") {
        let available: Vec<Value> = nodes
            .iter()
            .map(|n| {
                json!({"node": n.id, "job_ok": n.tasks_ok, "data_error": 0,
                       "error": n.tasks_failed + n.tasks_lost, "max_workers": n.slots,
                       "blacklisted": n.blacklisted})
            })
            .collect();
        let active: Vec<Value> = nodes
            .iter()
            .flat_map(|n| {
                n.jobs
                    .iter()
                    .map(move |j| json!({"node": n.id, "jobname": j}))
            })
            .collect();
        return Ok(Json(json!({"available": available, "active": active})));
    }
    let mut info = serde_json::Map::new();
    for n in &nodes {
        let mut entry = json!({
            "job_ok": n.tasks_ok, "data_error": 0, "error": n.tasks_failed + n.tasks_lost,
            "max_workers": n.slots, "connected": n.connected, "blacklisted": n.blacklisted,
        });
        if !n.jobs.is_empty() {
            entry["tasks"] = json!(n.jobs);
        }
        info.insert(n.id.clone(), entry);
    }
    Ok(Json(Value::Object(info)))
}

async fn joblist(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
) -> DiscoResult<Json<Value>> {
    let jobs = state.core.jobs.list(&JobFilter::default()).await?;
    let v1 = query.format.as_deref() == Some("v1");
    let rows: Vec<Value> = jobs
        .iter()
        .map(|j| {
            let word = match (v1, status(j.state)) {
                (true, "active") => "job_active",
                (true, "ready") => "job_ready",
                (true, _) => "job_died",
                (false, s) => s,
            };
            json!([j.created_at.timestamp(), word, j.name])
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

/// `[waiting, running, done, failed]` of a phase, and its pipeline row.
fn counters(job: &Job, phase: &str) -> (Value, Value) {
    match job.progress.iter().find(|p| p.phase == phase) {
        Some(p) => {
            let waiting = p.total.saturating_sub(p.done + p.running);
            (
                json!([waiting, p.running, p.done, p.failed]),
                json!([phase, p.queued, waiting, p.running, p.done, p.failed]),
            )
        }
        None if phase == "map" && job.progress.is_empty() => {
            // A plain run: one map task.
            let (running, done, failed) = match job.state {
                JobState::Running => (1, 0, 0),
                JobState::Succeeded => (0, 1, 0),
                JobState::Queued => (0, 0, 0),
                _ => (0, 0, 1),
            };
            let waiting = 1 - (running + done);
            let queued = u32::from(job.state == JobState::Queued);
            (
                json!([waiting, running, done, failed]),
                json!([phase, queued, waiting, running, done, failed]),
            )
        }
        None => (json!([0, 0, 0, 0]), json!([phase, 0, 0, 0, 0, 0])),
    }
}

async fn jobinfo(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
    headers: HeaderMap,
) -> DiscoResult<Json<Value>> {
    let name = name_of(&query)?;
    let job = state.core.jobs.get(name).await.map_err(|e| match e {
        CoreError::UnknownJob(_) => DiscoError(StatusCode::NOT_FOUND, "unknown job".into()),
        e => e.into(),
    })?;
    let tasks = state.core.nodes.tasks(name).await?;
    let hosts: Vec<&str> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .filter_map(|t| t.node.as_deref())
        .chain(
            (job.progress.is_empty() && job.state == JobState::Running)
                .then_some(job.node.as_deref().unwrap_or(opsbox_api::LOCAL_NODE)),
        )
        .collect();
    let (mapi, map_row) = counters(&job, "map");
    let (redi, reduce_row) = counters(&job, "reduce");
    let inputs: Vec<&String> = job.inputs.iter().take(100).collect();
    let results = result_urls(&base(&headers), &job);
    Ok(Json(json!({
        "timestamp": disco_time(job.started_at.unwrap_or(job.created_at)),
        "active": status(job.state),
        "mapi": mapi,
        "redi": redi,
        "reduce": job.reduce.is_some(),
        "pipeline": if job.reduce.is_some() { json!([map_row, reduce_row]) } else { json!([map_row]) },
        "results": results,
        "inputs": inputs,
        "nodes": hosts,
        "hosts": hosts,
        "worker": job.script,
        "owner": job.submitted_by.clone().unwrap_or_else(|| "opsbox".into()),
    })))
}

/// `[status, results]` of one job; `"unknown job"` when there is none.
async fn status_of(
    state: &AppState,
    name: &str,
    base: &str,
    replicas: bool,
) -> DiscoResult<(bool, Value)> {
    match state.core.jobs.get(name).await {
        Ok(job) => {
            let urls = result_urls(base, &job);
            let results: Vec<Value> = urls
                .into_iter()
                .map(|u| if replicas { json!([u]) } else { json!(u) })
                .collect();
            Ok((
                !job.state.is_terminal(),
                json!([status(job.state), results]),
            ))
        }
        Err(CoreError::UnknownJob(_)) => Ok((false, json!(["unknown job", []]))),
        Err(e) => Err(e.into()),
    }
}

/// E1: `GET get_results?name=` → `[status, results]`, no long-poll.
async fn results_v1(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
    headers: HeaderMap,
) -> DiscoResult<Json<Value>> {
    let (_, answer) = status_of(&state, name_of(&query)?, &base(&headers), false).await?;
    Ok(Json(answer))
}

/// `POST get_results [timeout_ms, [names]]`: answers at once unless some job is
/// active; then when any of the active ones ends, or at the timeout.
async fn results(
    State(state): State<AppState>,
    headers: HeaderMap,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<Value>> {
    let (timeout_ms, names): (u64, Vec<String>) =
        serde_json::from_slice(&body).map_err(|_| bad("expected [timeout_ms, [job names]]"))?;
    let base = base(&headers);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms).min(MAX_POLL);
    let mut changes = state.core.store.changes();
    let mut first = true;
    let mut active_at_start: Vec<String> = Vec::new();
    loop {
        changes.borrow_and_update();
        let mut answers = Vec::with_capacity(names.len());
        let mut active = Vec::new();
        for name in &names {
            let (is_active, answer) = status_of(&state, name, &base, true).await?;
            if is_active {
                active.push(name.clone());
            }
            answers.push(json!([name, answer]));
        }
        if first {
            active_at_start = active.clone();
            first = false;
        }
        let one_ended = active_at_start.iter().any(|n| !active.contains(n));
        if active.is_empty() || one_ended {
            return Ok(Json(Value::Array(answers)));
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Ok(Json(Value::Array(answers)));
        }
    }
}

async fn kill(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<&'static str>> {
    require(&caller, Role::Operator)?;
    let name = name_body(&body)?;
    // Disco answers "" even for unknown jobs.
    match state.core.jobs.kill(&name, caller.name().as_deref()).await {
        Ok(_) | Err(CoreError::UnknownJob(_)) => Ok(Json("")),
        Err(e) => Err(e.into()),
    }
}

/// `clean_job` and `purge_job`: kill, then forget the job (with its result files).
async fn clean(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<&'static str>> {
    require(&caller, Role::Operator)?;
    let name = name_body(&body)?;
    match state.core.jobs.kill(&name, caller.name().as_deref()).await {
        Ok(_) => {}
        Err(CoreError::UnknownJob(_)) => return Ok(Json("")),
        Err(e) => return Err(e.into()),
    }
    match state.core.jobs.clean(&name).await {
        Ok(()) | Err(CoreError::UnknownJob(_)) => Ok(Json("")),
        Err(e) => Err(e.into()),
    }
}

/// A version 1 job pack (wire reference §5.2, Addendum 3) describing the job, since
/// opsbox jobs are not submitted as packs: the 0.5.4 client decodes its job dict.
async fn parameters(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
) -> DiscoResult<Response> {
    let job = state.core.jobs.get(name_of(&query)?).await?;
    let prefix = job.name.split('@').next().unwrap_or(&job.name).to_owned();
    let inputs: Vec<String> = if job.inputs.is_empty() {
        vec![format!("raw://{}", job.script)]
    } else {
        job.inputs.clone()
    };
    let dict = json!({
        "prefix": prefix,
        "owner": job.submitted_by.clone().unwrap_or_else(|| "opsbox".into()),
        "worker": job.script,
        "scheduler": {},
        "save_results": false,
        "save_info": "ddfs",
        "input": inputs,
        "map?": true,
        "reduce?": job.reduce.is_some(),
        "reduce_shuffle?": false,
        "nr_reduces": 1,
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        job_pack(&dict),
    )
        .into_response())
}

/// Header (magic, version 1, four offsets, zero padding to 128), the job dict, empty
/// env vars, an empty ZIP as the job home, no job data.
fn job_pack(dict: &Value) -> Vec<u8> {
    let dict = dict.to_string().into_bytes();
    let envs = b"{}".to_vec();
    // End-of-central-directory record of an archive with no entries.
    let mut zip = b"PK\x05\x06".to_vec();
    zip.extend_from_slice(&[0u8; 18]);
    let dict_at = 128u32;
    let envs_at = dict_at + dict.len() as u32;
    let home_at = envs_at + envs.len() as u32;
    let data_at = home_at + zip.len() as u32;
    let mut pack = Vec::with_capacity(data_at as usize);
    for word in [0xd5c0_0001u32, dict_at, envs_at, home_at, data_at] {
        pack.extend_from_slice(&word.to_be_bytes());
    }
    pack.resize(128, 0);
    pack.extend_from_slice(&dict);
    pack.extend_from_slice(&envs);
    pack.extend_from_slice(&zip);
    pack
}

/// The job's event log, oldest first: `[time, host, message]`, written from the job
/// and its task records.
async fn events_of(state: &AppState, name: &str) -> DiscoResult<Vec<(DateTime<Utc>, Value)>> {
    let job = state.core.jobs.get(name).await?;
    let tasks: Vec<Task> = state.core.nodes.tasks(name).await?;
    let master = "master";
    let mut events = vec![(
        job.created_at,
        json!([disco_time(job.created_at), master, "New job initialized!"]),
    )];
    if let Some(at) = job.started_at {
        events.push((at, json!([disco_time(at), master, "Starting job"])));
    }
    for t in &tasks {
        let node = t.node.clone().unwrap_or_else(|| master.into());
        if let Some(at) = t.started_at {
            events.push((
                at,
                json!([
                    disco_time(at),
                    master,
                    format!("{} assigned to {node}", t.id)
                ]),
            ));
        }
        if let (Some(at), true) = (t.finished_at, t.state.is_terminal()) {
            let message = match t.state {
                TaskState::Succeeded => format!("{} done on {node}", t.id),
                _ => format!(
                    "WARN: {} {} on {node}: {}",
                    t.id,
                    t.state.as_str(),
                    t.reason.clone().unwrap_or_default()
                ),
            };
            events.push((at, json!([disco_time(at), node, message])));
        }
    }
    if let Some(at) = job.finished_at {
        let ran = at - job.started_at.unwrap_or(job.created_at);
        let message = match job.state {
            JobState::Succeeded => format!(
                "READY: Job finished in {}:{:02}:{:02}.{:03}",
                ran.num_hours(),
                ran.num_minutes() % 60,
                ran.num_seconds() % 60,
                ran.num_milliseconds() % 1000
            ),
            JobState::Killed => "WARN: Job killed".into(),
            _ => format!(
                "ERROR: {}",
                job.reason.clone().unwrap_or_else(|| "job failed".into())
            ),
        };
        events.push((at, json!([disco_time(at), master, message])));
    }
    events.sort_by_key(|(at, _)| *at);
    Ok(events)
}

/// One JSON array per line (wire reference §6), served as the master served the log
/// file: a satisfiable `Range: bytes=N-` or `bytes=N-M` gets 206 with exactly those
/// bytes; a range starting at or past the end gets 200 with the whole log, never 416,
/// as the 0.5.4 client needs (Addendum 1); any other `Range` is ignored (200).
async fn rawevents(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
    headers: HeaderMap,
) -> DiscoResult<Response> {
    let events = events_of(&state, name_of(&query)?).await?;
    let mut body = Vec::new();
    for (_, line) in &events {
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    let total = body.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| byte_range(r, total));
    let text = "text/plain".to_owned();
    let accept = (header::ACCEPT_RANGES, "bytes".to_owned());
    match range {
        Some((first, last)) => Ok((
            StatusCode::PARTIAL_CONTENT,
            [
                (header::CONTENT_TYPE, text),
                (
                    header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{total}"),
                ),
                accept,
            ],
            body[first..=last].to_vec(),
        )
            .into_response()),
        None => Ok(([(header::CONTENT_TYPE, text), accept], body).into_response()),
    }
}

/// The first and last byte (inclusive) of a single `bytes=` range of a `total`-byte
/// body: `N-`, `N-M` (M cut to the end) or the suffix `-K`. `None` for what is served
/// whole: no or several ranges, a malformed one, or one starting at or past the end.
fn byte_range(header: &str, total: usize) -> Option<(usize, usize)> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') || total == 0 {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let suffix: usize = last.parse().ok()?;
        return (suffix > 0).then(|| (total - suffix.min(total), total - 1));
    }
    let first: usize = first.parse().ok()?;
    let last = match last {
        "" => total - 1,
        last => last.parse::<usize>().ok()?.min(total - 1),
    };
    (first < total && first <= last).then_some((first, last))
}

/// Newest first, at most `num` (≤ 1000, default 10), only lines containing `filter`.
async fn jobevents(
    State(state): State<AppState>,
    DiscoQuery(query): DiscoQuery<NameQuery>,
) -> DiscoResult<Json<Value>> {
    let events = events_of(&state, name_of(&query)?).await?;
    let num = query.num.unwrap_or(10).min(1000);
    let filter = query.filter.clone().unwrap_or_default().to_lowercase();
    let lines: Vec<Value> = events
        .into_iter()
        .rev()
        .map(|(_, line)| line)
        .filter(|line| filter.is_empty() || line.to_string().to_lowercase().contains(&filter))
        .take(num)
        .collect();
    Ok(Json(Value::Array(lines)))
}

async fn load_config(State(state): State<AppState>) -> DiscoResult<Json<Value>> {
    let nodes = state.core.nodes.list().await?;
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| json!([n.id, n.slots.to_string()]))
        .collect();
    Ok(Json(Value::Array(rows)))
}

/// Sets the slots of the nodes listed; nodes join opsbox by connecting, so an unknown
/// node is an error rather than an entry.
async fn save_config(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<&'static str>> {
    require(&caller, Role::Operator)?;
    let rows: Vec<(String, String)> =
        serde_json::from_slice(&body).map_err(|_| bad("invalid config"))?;
    let mut seen = BTreeMap::new();
    for (node, slots) in &rows {
        let slots: u32 = slots.trim().parse().map_err(|_| bad("invalid config"))?;
        if seen.insert(node.clone(), slots).is_some() {
            return Err(bad("duplicate nodes"));
        }
    }
    for (node, slots) in seen {
        state
            .core
            .nodes
            .set_slots(&node, slots)
            .await
            .map_err(|e| match e {
                CoreError::NotFound(_) => bad(format!(
                    "unknown node {node}: nodes join by connecting (opsbox agent --node-id {node})"
                )),
                e => e.into(),
            })?;
    }
    Ok(Json("table saved!"))
}

async fn blacklist(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<&'static str>> {
    require(&caller, Role::Operator)?;
    // Hosts opsbox does not know are ignored, as Disco did with hosts not configured.
    match state.core.nodes.blacklist(&name_body(&body)?).await {
        Ok(_) | Err(CoreError::NotFound(_)) => Ok(Json("")),
        Err(e) => Err(e.into()),
    }
}

async fn whitelist(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    DiscoBody(body): DiscoBody,
) -> DiscoResult<Json<&'static str>> {
    require(&caller, Role::Operator)?;
    match state.core.nodes.whitelist(&name_body(&body)?).await {
        Ok(_) | Err(CoreError::NotFound(_)) => Ok(Json("")),
        Err(e) => Err(e.into()),
    }
}

async fn get_blacklist(State(state): State<AppState>) -> Json<Vec<String>> {
    Json(state.core.nodes.blacklisted())
}

async fn get_settings(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "max_failure_rate": state.core.config.nodes.max_failures,
        "accept_new_jobs": 1,
    }))
}

/// opsbox's failure limit is per job (`--max-failures`) with its default in the server
/// config; it is not changed over the wire.
async fn save_settings() -> DiscoError {
    bad("opsbox takes max_failures per job (opsbox jobs submit --max-failures N) with its default in the server config ([nodes] max_failures)")
}
