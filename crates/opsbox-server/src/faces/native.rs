//! The native API under `/v1`: JSON over HTTP, live streams over Server-Sent Events and
//! WebSocket, described by the OpenAPI document at `/v1/openapi.json`.
//!
//! Each handler parses its request, checks the caller's role, calls one core service
//! and renders the answer; no rule of the domain lives here.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::{Stream, StreamExt};
use opsbox_api::{
    CreatedToken, ErrorBody, Event, EventPage, Job, JobList, JobOutput, JobSpec, JobState,
    LogEvent, NewToken, NewUser, ReloadReport, ResultList, Role, RunRequest, RunResponse, Script,
    ScriptList, ServerInfo, TokenList, User, UserList, WaitResponse,
};
use opsbox_core::identities::LastAdmin;
use opsbox_core::store::JobFilter;
use opsbox_core::CoreError;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::auth::Caller;
use crate::error::{json_body, json_body_or_default, ApiError, ApiResult};
use crate::AppState;

/// The `/v1` routes, behind the native auth check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/scripts", get(list_scripts))
        .route("/v1/scripts/{name}", get(get_script))
        .route("/v1/scripts/{name}/run", post(run_script))
        .route("/v1/reload", post(reload))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{name}", get(get_job).delete(clean_job))
        .route("/v1/jobs/{name}/spec", get(job_spec))
        .route("/v1/jobs/{name}/log", get(job_log))
        .route("/v1/jobs/{name}/log/ws", get(job_log_ws))
        .route("/v1/jobs/{name}/wait", get(wait_job))
        .route("/v1/jobs/{name}/kill", post(kill_job))
        .route("/v1/jobs/{name}/results", get(list_results))
        .route("/v1/jobs/{name}/results/{*path}", get(get_result))
        .route("/v1/events", get(events))
        .route("/v1/events/ws", get(events_ws))
        .route("/v1/users", get(list_users).post(add_user))
        .route("/v1/users/{name}", axum::routing::delete(remove_user))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_caller,
        ))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {} (see /v1/openapi.json)",
        request.method(),
        request.uri().path()
    ))
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/info", responses((status = 200, body = ServerInfo)))]
async fn info(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<ServerInfo>> {
    let core = &state.core;
    Ok(Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        revision: core.events.current_revision().await?,
        nodes: vec![opsbox_core::jobs::LOCAL_NODE.into()],
        scripts: core.scripts.catalog().scripts.len(),
        auth_required: core.identities.auth_required().await?,
        you: caller.name(),
    }))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document().clone(),
    )
        .into_response()
}

/// The OpenAPI document of `/v1`, built once: each face's part, merged, then
/// [`common_answers`] and [`event_streams`] applied to every operation.
pub fn document() -> &'static Bytes {
    static DOCUMENT: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.merge(crate::faces::queues::QueuesDoc::openapi());
        doc.merge(crate::faces::nodes::NodesDoc::openapi());
        doc.merge(crate::faces::model::ModelDoc::openapi());
        doc.merge(crate::faces::backups::BackupsDoc::openapi());
        let mut doc = serde_json::to_value(doc).unwrap_or_default();
        common_answers(&mut doc);
        event_streams(&mut doc);
        unsigned_formats(&mut doc);
        Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
    })
}

/// What every operation may answer besides its own results, said once here rather
/// than on each handler: the auth check in front of all of `/v1` (401, 403), the
/// parsing of parameters and bodies (400), the body limit (413). Also the two ways
/// to give credentials.
fn common_answers(doc: &mut serde_json::Value) {
    use serde_json::json;
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    doc["components"]["securitySchemes"] = json!({
        "basic": {"type": "http", "scheme": "basic",
                  "description": "A user's name and password (opsbox users add)."},
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "An API token (opsbox tokens create)."}
    });
    doc["security"] = json!([{"basic": []}, {"bearer": []}]);
    if let Some(description) = doc["info"]["description"].as_str() {
        doc["info"]["description"] = json!(format!(
            "{description} A server with no users and no tokens (listening on loopback \
             only, unless started with --insecure) takes requests without credentials."
        ));
    }
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for operation in paths.values_mut().filter_map(|p| p.as_object_mut()) {
        for (_, operation) in operation.iter_mut() {
            let reads_input = operation.get("requestBody").is_some()
                || operation["parameters"]
                    .as_array()
                    .is_some_and(|p| !p.is_empty());
            let reads_body = operation.get("requestBody").is_some();
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(|r| r.as_object_mut())
            else {
                continue;
            };
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| error(description));
            };
            add(
                "401",
                "No credentials, or wrong ones, on a server with users or tokens.",
            );
            add("403", "The caller's role is too low for this operation.");
            if reads_input {
                add("400", "A parameter or the body is not valid.");
            }
            if reads_body {
                add("413", "The body is larger than limits.max_body_bytes.");
            }
        }
    }
}

/// utoipa writes a `u32` as `format: int32` and a `u64` as `int64` (with `minimum: 0`),
/// which say the largest value is 2^31 − 1 or 2^63 − 1; the server takes up to 2^32 − 1
/// and 2^64 − 1. The unsigned formats of the OpenAPI format registry say what it takes.
fn unsigned_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let unsigned = map.get("minimum").and_then(|m| m.as_f64()) == Some(0.0);
            if unsigned {
                if let Some(format) = map.get_mut("format") {
                    match format.as_str() {
                        Some("int32") => *format = "uint32".into(),
                        Some("int64") => *format = "uint64".into(),
                        _ => {}
                    }
                }
            }
            map.values_mut().for_each(unsigned_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned_formats),
        _ => {}
    }
}

/// A `text/event-stream` answer is described as what a client reads from it: one
/// Server-Sent Events message per item, whose `data` holds the item as JSON (the
/// layout OpenAPI 3.2 gives event streams; checkers such as schemathesis read it so).
fn event_streams(doc: &mut serde_json::Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    let streams = paths
        .values_mut()
        .filter_map(|p| p.as_object_mut())
        .flat_map(|p| p.values_mut())
        .filter_map(|op| op.get_mut("responses")?.as_object_mut())
        .flat_map(|r| r.values_mut())
        .filter_map(|r| r.get_mut("content")?.get_mut("text/event-stream"));
    for stream in streams {
        let item = stream["schema"].take();
        stream["schema"] = serde_json::json!({
            "type": "object",
            "description": "One Server-Sent Events message.",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "id": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": item
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/scripts", responses((status = 200, body = ScriptList)))]
async fn list_scripts(State(state): State<AppState>) -> Json<ScriptList> {
    let catalog = state.core.scripts.catalog();
    Json(ScriptList {
        scripts: catalog.scripts.values().map(|s| (**s).clone()).collect(),
        problems: catalog.problems.clone(),
    })
}

#[utoipa::path(get, path = "/v1/scripts/{name}",
    responses((status = 200, body = Script), (status = 404, body = ErrorBody)))]
async fn get_script(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Script>> {
    let script = state
        .core
        .scripts
        .catalog()
        .get(&name)
        .ok_or(CoreError::UnknownScript(name))?;
    Ok(Json((*script).clone()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct RunQuery {
    /// `false` returns as soon as the job is queued (202); default: wait for its end.
    wait: Option<bool>,
}

#[utoipa::path(post, path = "/v1/scripts/{name}/run", params(RunQuery),
    request_body(content = Option<RunRequest>, description = "optional: no body runs with no params"),
    responses((status = 200, body = RunResponse), (status = 202, body = RunResponse),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn run_script(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<RunQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require(Role::Operator)?;
    let request: RunRequest = json_body_or_default(&body)?;
    if !request.placement.is_local() {
        return crate::faces::nodes::run_placed(
            &state,
            &caller,
            &name,
            request,
            query.wait != Some(false),
        )
        .await;
    }
    let jobs = &state.core.jobs;
    if query.wait == Some(false) {
        let submitted = jobs.submit(&name, request.params, caller.name()).await?;
        let response = RunResponse {
            job: submitted.job,
            output: None,
            others: Vec::new(),
        };
        return Ok((StatusCode::ACCEPTED, Json(response)).into_response());
    }
    let (job, output) = jobs.run(&name, request.params, caller.name()).await?;
    Ok(Json(RunResponse {
        job,
        output: Some(output),
        others: Vec::new(),
    })
    .into_response())
}

#[utoipa::path(post, path = "/v1/reload", responses((status = 200, body = ReloadReport)))]
async fn reload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<ReloadReport>> {
    caller.require(Role::Operator)?;
    Ok(Json(state.core.reload().await?))
}

// ---------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct JobsQuery {
    /// queued, running, succeeded, failed, killed or lost.
    state: Option<String>,
    script: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/jobs", params(JobsQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody)))]
async fn list_jobs(
    State(state): State<AppState>,
    Query(query): Query<JobsQuery>,
) -> ApiResult<Json<JobList>> {
    let job_state = match &query.state {
        Some(word) => Some(JobState::parse(word).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state '{word}' is not one of queued, running, succeeded, failed, killed, lost"
            ))
        })?),
        None => None,
    };
    let filter = JobFilter {
        state: job_state,
        script: query.script,
        limit: query.limit,
    };
    Ok(Json(JobList {
        jobs: state.core.jobs.list(&filter).await?,
    }))
}

#[utoipa::path(get, path = "/v1/jobs/{name}", responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn get_job(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.core.jobs.get(&name).await?))
}

#[utoipa::path(get, path = "/v1/jobs/{name}/spec", responses((status = 200, body = JobSpec), (status = 404, body = ErrorBody)))]
async fn job_spec(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<JobSpec>> {
    Ok(Json(state.core.jobs.spec(&name).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct LogQuery {
    /// Stream the output live as Server-Sent Events until the job ends.
    follow: Option<bool>,
    /// With `follow`: start after this chunk sequence number.
    since: Option<u64>,
}

#[utoipa::path(get, path = "/v1/jobs/{name}/log", params(LogQuery),
    responses((status = 200, description = "the output so far as JSON; with follow=true a \
                text/event-stream whose events (`output`, then `end`, or `error`) carry a LogEvent \
                (an ErrorBody for `error`) as JSON data",
               content((JobOutput = "application/json"), (LogEvent = "text/event-stream"))),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn job_log(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
) -> ApiResult<Response> {
    if query.follow == Some(true) {
        let stream = state
            .core
            .jobs
            .follow(&name, query.since.unwrap_or(0))
            .await?;
        let events = stream.map(|item| {
            Ok::<_, Infallible>(match item {
                Ok(event @ LogEvent::Output(_)) => sse_json("output", &event),
                Ok(event @ LogEvent::End(_)) => sse_json("end", &event),
                Err(e) => sse_json("error", &ApiError::from(e).body),
            })
        });
        return Ok(sse(events));
    }
    Ok(Json(state.core.jobs.output(&name).await?).into_response())
}

/// A follow socket only sends: what its client says is read and dropped, so it need
/// not be let grow past the request body limit (tungstenite's default is 64 MiB).
fn quiet_client(upgrade: WebSocketUpgrade, state: &AppState) -> WebSocketUpgrade {
    let limit = state.config.limits.max_body_bytes;
    upgrade.max_message_size(limit).max_frame_size(limit)
}

async fn job_log_ws(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let stream = state
        .core
        .jobs
        .follow(&name, query.since.unwrap_or(0))
        .await?;
    Ok(quiet_client(upgrade, &state).on_upgrade(move |socket| pump_ws(socket, stream)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct WaitQuery {
    /// Seconds to hold the request at most (default 30, capped by the server's limit).
    timeout: Option<f64>,
}

#[utoipa::path(get, path = "/v1/jobs/{name}/wait", params(WaitQuery),
    responses((status = 200, body = WaitResponse), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn wait_job(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<WaitQuery>,
) -> ApiResult<Json<WaitResponse>> {
    let max = state.config.limits.max_wait_secs as f64;
    let seconds = query.timeout.unwrap_or(30.0);
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(ApiError::bad_request(
            "timeout must be a number of seconds ≥ 0",
        ));
    }
    let timeout = Duration::from_secs_f64(seconds.min(max));
    let (done, job) = state.core.jobs.wait(&name, timeout).await?;
    Ok(Json(WaitResponse { done, job }))
}

#[utoipa::path(post, path = "/v1/jobs/{name}/kill", responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn kill_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<Job>> {
    caller.require(Role::Operator)?;
    let by = caller
        .name()
        .unwrap_or_else(|| "an anonymous caller".into());
    Ok(Json(state.core.jobs.kill(&name, Some(&by)).await?))
}

#[utoipa::path(delete, path = "/v1/jobs/{name}",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn clean_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Operator)?;
    state.core.jobs.clean(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/jobs/{name}/results",
    responses((status = 200, body = ResultList), (status = 404, body = ErrorBody)))]
async fn list_results(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ResultList>> {
    let files = state.core.jobs.results(&name).await?;
    Ok(Json(ResultList { job: name, files }))
}

#[utoipa::path(get, path = "/v1/jobs/{name}/results/{path}",
    responses((status = 200, description = "the file's bytes"), (status = 404, body = ErrorBody)))]
async fn get_result(
    State(state): State<AppState>,
    Path((name, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let file_path = state.core.jobs.result_path(&name, &path).await?;
    let file = tokio::fs::File::open(&file_path)
        .await
        .map_err(|e| ApiError::not_found(format!("result file '{path}': {e}")))?;
    let length = file.metadata().await.map(|m| m.len()).ok();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct EventsQuery {
    /// Events after this revision. Without `follow`, default 0; with it, default now.
    since: Option<u64>,
    /// Stream as Server-Sent Events, live.
    follow: Option<bool>,
    /// Page size without `follow` (default 1000, at most 10000; 0 gives no events,
    /// only the current revision).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses((status = 200, description = "a page of events as JSON; with follow=true a \
                text/event-stream whose `event` events carry an Event as JSON data (with its \
                revision as the SSE id), or an `error` event an ErrorBody",
               content((EventPage = "application/json"), (Event = "text/event-stream"))),
              (status = 400, body = ErrorBody, description = "a revision ahead of the event log, or a bad query"),
              (status = 410, body = ErrorBody, description = "revision compacted away; re-list from current_revision")))]
async fn events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> ApiResult<Response> {
    if query.follow == Some(true) {
        let stream = state.core.events.follow(query.since).await?;
        let events = stream.map(|item| {
            Ok::<_, Infallible>(match item {
                Ok(event) => sse_json("event", &event).id(event.rev.to_string()),
                Err(e) => sse_json("error", &ApiError::from(e).body),
            })
        });
        return Ok(sse(events));
    }
    let page = state
        .core
        .events
        .page(query.since.unwrap_or(0), query.limit.unwrap_or(1000))
        .await?;
    Ok(Json(page).into_response())
}

async fn events_ws(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let stream = state.core.events.follow(query.since).await?;
    Ok(quiet_client(upgrade, &state).on_upgrade(move |socket| pump_ws(socket, stream)))
}

// ---------------------------------------------------------------------------------------
// Users and tokens (admin)
// ---------------------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/users", responses((status = 200, body = UserList)))]
async fn list_users(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<UserList>> {
    caller.require(Role::Admin)?;
    Ok(Json(UserList {
        users: state.core.identities.users().await?,
    }))
}

#[utoipa::path(post, path = "/v1/users", request_body = NewUser,
    responses((status = 201, body = User), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn add_user(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<User>)> {
    caller.require(Role::Admin)?;
    let user: NewUser = json_body(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(state.core.identities.add_user(user).await?),
    ))
}

#[utoipa::path(delete, path = "/v1/users/{name}", responses((status = 204), (status = 404, body = ErrorBody)))]
async fn remove_user(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    state
        .core
        .identities
        .remove_user(&name, LastAdmin::Keep)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = TokenList)))]
async fn list_tokens(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<TokenList>> {
    caller.require(Role::Admin)?;
    Ok(Json(TokenList {
        tokens: state.core.identities.tokens().await?,
    }))
}

#[utoipa::path(post, path = "/v1/tokens", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody)))]
async fn create_token(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    caller.require(Role::Admin)?;
    let token: NewToken = json_body(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(state.core.identities.create_token(token).await?),
    ))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
async fn revoke_token(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    state
        .core
        .identities
        .revoke_token(&id, LastAdmin::Keep)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn sse_json<T: serde::Serialize>(kind: &str, value: &T) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(value).unwrap_or_default())
}

fn sse<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Sends each item of a stream as a JSON text frame; an error is sent as an
/// [`ErrorBody`] frame, then the socket is closed.
async fn pump_ws<T, S>(mut socket: WebSocket, stream: S)
where
    T: serde::Serialize,
    S: Stream<Item = Result<T, CoreError>> + Send + 'static,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            item = stream.next() => {
                let Some(item) = item else { break };
                let (text, last) = match item {
                    Ok(value) => (serde_json::to_string(&value).unwrap_or_default(), false),
                    Err(e) => (serde_json::to_string(&ApiError::from(e).body).unwrap_or_default(), true),
                };
                if socket.send(Message::Text(text.into())).await.is_err() || last {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "opsbox native API",
        description = "Scripts, jobs, events and identities of an opsbox server."
    ),
    paths(
        info,
        list_scripts,
        get_script,
        run_script,
        reload,
        list_jobs,
        get_job,
        job_spec,
        job_log,
        wait_job,
        kill_job,
        clean_job,
        list_results,
        get_result,
        events,
        list_users,
        add_user,
        remove_user,
        list_tokens,
        create_token,
        revoke_token
    ),
    components(schemas(ErrorBody, Event, LogEvent))
)]
pub struct ApiDoc;
