//! Nodes and fan-out jobs in the native API, and the agents' WebSocket:
//!
//! - `GET /v1/nodes`, `GET /v1/nodes/{id}`, `POST /v1/nodes/{id}/blacklist|whitelist`;
//! - `POST /v1/jobs` (a [`FanoutRequest`]) and `GET /v1/jobs/{name}/tasks`;
//! - `GET /v1/agent`: an `opsbox agent` connects here (WebSocket, one JSON
//!   [`AgentMessage`]/[`ServerMessage`] per text frame) with a token that may act as its
//!   node id: a node token naming it, or an operator or admin identity.
//!
//! Every rule lives in [`opsbox_core::nodes`]; this module only translates.

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::{SinkExt, StreamExt};
use opsbox_api::{
    AgentMessage, ErrorBody, FanoutRequest, Job, Node, NodeList, Role, ServerMessage, TaskList,
};
use opsbox_core::identities::Identity;
use utoipa::OpenApi;

use crate::auth::Caller;
use crate::error::{json_body, ApiResult};
use crate::AppState;

/// The routes, behind the native auth check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/blacklist", post(blacklist))
        .route("/v1/nodes/{id}/whitelist", post(whitelist))
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{name}/tasks", get(tasks))
        .route("/v1/agent", get(agent))
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_caller,
        ))
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = NodeList)))]
async fn list_nodes(State(state): State<AppState>) -> ApiResult<Json<NodeList>> {
    Ok(Json(NodeList {
        nodes: state.core.nodes.list().await?,
    }))
}

#[utoipa::path(get, path = "/v1/nodes/{id}",
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
async fn get_node(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    Ok(Json(state.core.nodes.get(&id).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{id}/blacklist",
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
async fn blacklist(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    caller.require(Role::Operator)?;
    Ok(Json(state.core.nodes.blacklist(&id).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{id}/whitelist",
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
async fn whitelist(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    caller.require(Role::Operator)?;
    Ok(Json(state.core.nodes.whitelist(&id).await?))
}

#[utoipa::path(post, path = "/v1/jobs", request_body = FanoutRequest,
    responses((status = 201, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Job>)> {
    caller.require(Role::Operator)?;
    let request: FanoutRequest = json_body(&body)?;
    let job = state.core.nodes.submit(request, caller.name()).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

#[utoipa::path(get, path = "/v1/jobs/{name}/tasks",
    responses((status = 200, body = TaskList), (status = 404, body = ErrorBody)))]
async fn tasks(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<TaskList>> {
    Ok(Json(TaskList {
        tasks: state.core.nodes.tasks(&name).await?,
    }))
}

async fn agent(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // tungstenite zeroes up to `read_buffer_size` bytes of its buffer before each read
    // (128 KiB by default): an agent's messages are mostly a few hundred bytes, and the
    // zeroing was a visible part of the server's time per task. Bigger messages are
    // still read whole, in chunks of this size.
    upgrade
        .read_buffer_size(16 * 1024)
        .on_upgrade(move |socket| serve_agent(socket, state, caller.0))
}

/// One agent's connection: `Hello`, then messages both ways until either side ends.
/// Queues a message on the socket without flushing it; false when the socket failed.
async fn feed<S>(sink: &mut S, message: &ServerMessage) -> bool
where
    S: futures::Sink<Message> + Unpin,
{
    let text = serde_json::to_string(message).unwrap_or_default();
    sink.feed(Message::Text(text.into())).await.is_ok()
}

async fn serve_agent(socket: WebSocket, state: AppState, caller: Identity) {
    let (mut sink, mut stream) = socket.split();
    let refuse = |reason: String| {
        Message::Text(
            serde_json::to_string(&ServerMessage::Refused { reason })
                .unwrap_or_default()
                .into(),
        )
    };
    let hello = match stream.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<AgentMessage>(&text),
        _ => return,
    };
    let hello = match hello {
        Ok(hello @ AgentMessage::Hello { .. }) => hello,
        Ok(_) | Err(_) => {
            let _ = sink
                .send(refuse("the first message must be a hello".into()))
                .await;
            return;
        }
    };
    let AgentMessage::Hello { node_id, .. } = &hello else {
        return;
    };
    // A node token acts only as its nodes; any other identity needs operator.
    let allowed = if caller.is_node_bound() {
        caller.may_act_as(node_id)
    } else {
        caller.require(Role::Operator).is_ok()
    };
    if !allowed {
        let _ = sink
            .send(refuse(format!(
                "this token may not act as node '{node_id}': use a node token for it (opsbox tokens create --node {node_id}) or an operator token"
            )))
            .await;
        return;
    }
    let nodes = state.core.nodes.clone();
    let mut connection = match nodes.connect(hello).await {
        Ok(connection) => connection,
        Err(e) => {
            let _ = sink.send(refuse(e.to_string())).await;
            return;
        }
    };
    let welcome = ServerMessage::Welcome {
        node_id: connection.node_id.clone(),
        heartbeat_secs: connection.heartbeat_secs,
    };
    if sink
        .send(Message::Text(
            serde_json::to_string(&welcome).unwrap_or_default().into(),
        ))
        .await
        .is_err()
    {
        let _ = nodes
            .disconnect(&connection.node_id, connection.session)
            .await;
        return;
    }
    loop {
        tokio::select! {
            outgoing = connection.messages.recv() => {
                // None: the server dropped this connection (a newer one, or no heartbeat).
                let Some(message) = outgoing else { break };
                // The messages a round queued for this node go out in one write.
                let mut written = feed(&mut sink, &message).await;
                let mut fed = 1;
                while written && fed < 64 {
                    let Ok(message) = connection.messages.try_recv() else { break };
                    written = feed(&mut sink, &message).await;
                    fed += 1;
                }
                if !written || sink.flush().await.is_err() {
                    break;
                }
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<AgentMessage>(&text) {
                    Ok(message) => {
                        if let Err(e) = nodes.message(&connection.node_id, connection.session, message).await {
                            tracing::warn!(node = %connection.node_id, error = %e, "agent message failed");
                        }
                    }
                    Err(e) => tracing::warn!(node = %connection.node_id, error = %e, "ignored a malformed agent message"),
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = nodes
        .disconnect(&connection.node_id, connection.session)
        .await;
    let _ = sink.close().await;
}

/// Answers for a run with a placement (`POST /v1/scripts/{name}/run` with `node`,
/// `labels` or `all`): the jobs, waited for unless `wait=false`.
pub async fn run_placed(
    state: &AppState,
    caller: &Caller,
    name: &str,
    request: opsbox_api::RunRequest,
    wait: bool,
) -> ApiResult<Response> {
    let nodes = &state.core.nodes;
    let placement = request.placement.clone();
    let mut jobs = nodes
        .run_on(name, request.params, &placement, caller.name())
        .await?;
    if !wait {
        let first = jobs.remove(0);
        return Ok((
            StatusCode::ACCEPTED,
            Json(opsbox_api::RunResponse {
                job: first,
                output: None,
                others: jobs,
            }),
        )
            .into_response());
    }
    let mut done = Vec::with_capacity(jobs.len());
    for job in &jobs {
        // As long as it takes, like a local run: the client chose to wait.
        let (_, job) = state
            .core
            .jobs
            .wait(&job.name, std::time::Duration::from_secs(365 * 24 * 3600))
            .await?;
        done.push(job);
    }
    let first = done.remove(0);
    let output = state.core.jobs.output(&first.name).await?;
    Ok(Json(opsbox_api::RunResponse {
        job: first,
        output: Some(output),
        others: done,
    })
    .into_response())
}

#[derive(OpenApi)]
#[openapi(
    paths(list_nodes, get_node, blacklist, whitelist, submit, tasks),
    components(schemas(Node, NodeList, TaskList, FanoutRequest))
)]
pub struct NodesDoc;
