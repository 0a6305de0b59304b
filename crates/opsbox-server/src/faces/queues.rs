//! The native queue API under `/v1/queues` and `/v1/messages`: push, pull (batches,
//! long poll, lease), ack, list, get, update, delete and per-queue stats.
//!
//! A caller acts as a node: the destination when it pulls or acks, the source
//! (`?from=`) when it pushes. Tokens bound to nodes may act only as those nodes.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use opsbox_api::{
    AckRequest, AckResponse, DeleteReport, Message, MessageList, MessageStatus, PullRequest,
    PushRequest, QueueStats, QueueStatsList, Role, UpdateMessage,
};
use opsbox_core::queues::{self, check_node, EditRule, Payload, PullOptions, Push, Schedule};
use opsbox_core::CoreError;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::{json_body, json_body_or_default, ApiError, ApiResult};
use crate::AppState;

/// The queue routes, behind the native auth check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{node}", get(queue_stats))
        .route(
            "/v1/queues/{node}/messages",
            get(list_messages).post(push).delete(purge),
        )
        .route("/v1/queues/{node}/pull", post(pull))
        .route("/v1/queues/{node}/ack", post(ack))
        .route(
            "/v1/messages/{id}",
            get(get_message)
                .patch(update_message)
                .delete(delete_message),
        )
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_caller,
        ))
}

/// Checks the caller's role and that it may act as `node`.
fn act_as(caller: &Caller, node: &str, role: Role) -> ApiResult<()> {
    caller.require(role)?;
    check_node(node)?;
    if !caller.0.may_act_as(node) {
        let nodes = &caller.0.nodes;
        return Err(CoreError::Forbidden(format!(
            "{} may act only as node {}, not {node}",
            caller.0.name,
            nodes.join(", ")
        ))
        .into());
    }
    Ok(())
}

/// Longest lease: a year. Longer ones are cut to it (they mean "never again" just as
/// well), which keeps every lease end a representable time.
const MAX_LEASE_SECS: u64 = 365 * 24 * 3600;

/// A number of seconds from a request, cut to `max`.
fn seconds(value: Option<f64>, what: &str, max: u64) -> ApiResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => {
            Ok(Some(Duration::from_secs_f64(s.min(max as f64))))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "{what} must be a number of seconds ≥ 0"
        ))),
    }
}

fn parse_statuses(list: Option<&str>) -> ApiResult<Vec<MessageStatus>> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    list.split(',')
        .filter(|w| !w.is_empty())
        .map(|word| {
            MessageStatus::parse(word).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "status '{word}' is not one of pending, scheduled, processing, processed, dead"
                ))
            })
        })
        .collect()
}

fn messages(records: &[opsbox_core::store::MessageRecord]) -> MessageList {
    MessageList {
        messages: records.iter().map(queues::to_message).collect(),
    }
}

#[utoipa::path(get, path = "/v1/queues", responses((status = 200, body = QueueStatsList)))]
async fn list_queues(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<QueueStatsList>> {
    caller.require(Role::Reader)?;
    let mut queues = state.core.queues.stats(None).await?;
    queues.retain(|q| caller.0.may_act_as(&q.node));
    Ok(Json(QueueStatsList { queues }))
}

#[utoipa::path(get, path = "/v1/queues/{node}",
    responses((status = 200, body = QueueStats), (status = 400, body = opsbox_api::ErrorBody)))]
async fn queue_stats(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
) -> ApiResult<Json<QueueStats>> {
    act_as(&caller, &node, Role::Reader)?;
    let stats = state.core.queues.stats(Some(&node)).await?;
    Ok(Json(stats.into_iter().next().unwrap_or(QueueStats {
        node,
        ..QueueStats::default()
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct PushQuery {
    /// The sending node (default: the destination itself).
    from: Option<String>,
}

#[utoipa::path(post, path = "/v1/queues/{node}/messages", params(PushQuery), request_body = PushRequest,
    responses((status = 201, body = MessageList), (status = 400, body = opsbox_api::ErrorBody)))]
async fn push(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
    Query(query): Query<PushQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<MessageList>)> {
    let source = query.from.unwrap_or_else(|| node.clone());
    act_as(&caller, &source, Role::Operator)?;
    check_node(&node)?;
    let request: PushRequest = json_body_or_default(&body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("no messages to push"));
    }
    let mut pushes = Vec::with_capacity(request.messages.len());
    for message in request.messages {
        pushes.push(Push {
            source: source.clone(),
            destination: node.clone(),
            payload: Payload::from_value(message.kind, &message.payload)?,
            payload_type: message.payload_type,
            schedule: message.scheduled_at.map_or(Schedule::Now, Schedule::At),
            max_tries: message.max_tries,
        });
    }
    let pushed = state.core.queues.push(pushes).await?;
    Ok((StatusCode::CREATED, Json(messages(&pushed))))
}

#[utoipa::path(post, path = "/v1/queues/{node}/pull",
    request_body(content = Option<PullRequest>, description = "optional: no body pulls one message without waiting"),
    responses((status = 200, body = MessageList, description = "empty when nothing was deliverable"),
              (status = 400, body = opsbox_api::ErrorBody)))]
async fn pull(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
    body: Bytes,
) -> ApiResult<Json<MessageList>> {
    act_as(&caller, &node, Role::Operator)?;
    let request: PullRequest = json_body_or_default(&body)?;
    let max_wait = state.config.limits.max_wait_secs;
    let options = PullOptions {
        max: request.max.unwrap_or(1),
        wait: seconds(request.wait, "wait", max_wait)?.unwrap_or_default(),
        lease: seconds(request.lease, "lease", MAX_LEASE_SECS)?.filter(|l| !l.is_zero()),
    };
    let pulled = state.core.queues.pull(&node, options).await?;
    Ok(Json(messages(&pulled)))
}

#[utoipa::path(post, path = "/v1/queues/{node}/ack", request_body = AckRequest,
    responses((status = 200, body = AckResponse), (status = 400, body = opsbox_api::ErrorBody)))]
async fn ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
    body: Bytes,
) -> ApiResult<Json<AckResponse>> {
    act_as(&caller, &node, Role::Operator)?;
    let request: AckRequest = json_body(&body)?;
    let (acked, missing) = state.core.queues.ack(&node, request.ids).await?;
    Ok(Json(AckResponse {
        acked: acked.iter().map(queues::to_message).collect(),
        missing,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ListQuery {
    /// Comma-separated statuses to keep.
    status: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/queues/{node}/messages", params(ListQuery),
    responses((status = 200, body = MessageList, description = "messages sent by or to the node, oldest first"),
              (status = 400, body = opsbox_api::ErrorBody)))]
async fn list_messages(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<MessageList>> {
    act_as(&caller, &node, Role::Reader)?;
    let statuses = parse_statuses(query.status.as_deref())?;
    let limit = Some(query.limit.unwrap_or(1000).clamp(1, 10_000));
    let listed = state.core.queues.list(Some(&node), statuses, limit).await?;
    Ok(Json(messages(&listed)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct PurgeQuery {
    /// Comma-separated statuses to delete (default: all).
    status: Option<String>,
}

#[utoipa::path(delete, path = "/v1/queues/{node}/messages", params(PurgeQuery),
    responses((status = 200, body = DeleteReport), (status = 400, body = opsbox_api::ErrorBody)))]
async fn purge(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(node): Path<String>,
    Query(query): Query<PurgeQuery>,
) -> ApiResult<Json<DeleteReport>> {
    act_as(&caller, &node, Role::Operator)?;
    let statuses = parse_statuses(query.status.as_deref())?;
    let deleted = state.core.queues.purge(&node, statuses).await?;
    Ok(Json(DeleteReport { deleted }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct AsQuery {
    /// The node acting (default: the message's sender).
    node: Option<String>,
}

/// The message, if the caller may see it.
async fn visible(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Message> {
    let record = state
        .core
        .queues
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no message {id}")))?;
    if !caller.0.may_act_as(&record.source) && !caller.0.may_act_as(&record.destination) {
        return Err(ApiError::not_found(format!("no message {id}")));
    }
    Ok(queues::to_message(&record))
}

#[utoipa::path(get, path = "/v1/messages/{id}", responses((status = 200, body = Message), (status = 404, body = opsbox_api::ErrorBody)))]
async fn get_message(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Message>> {
    caller.require(Role::Reader)?;
    Ok(Json(visible(&state, &caller, &id).await?))
}

#[utoipa::path(patch, path = "/v1/messages/{id}", params(AsQuery), request_body = UpdateMessage,
    responses((status = 200, body = Message), (status = 400, body = opsbox_api::ErrorBody),
              (status = 404, body = opsbox_api::ErrorBody),
              (status = 409, body = opsbox_api::ErrorBody, description = "delivered already, or not sent by the node")))]
async fn update_message(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<AsQuery>,
    body: Bytes,
) -> ApiResult<Json<Message>> {
    let current = visible(&state, &caller, &id).await?;
    let node = query.node.unwrap_or(current.source);
    act_as(&caller, &node, Role::Operator)?;
    let request: UpdateMessage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let payload = Payload::from_value(request.kind, &request.payload)?;
    let updated = state
        .core
        .queues
        .update_payload(&id, &node, EditRule::SenderBeforeDelivery, payload)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("message {id} was delivered already, or {node} did not send it"),
            )
        })?;
    Ok(Json(queues::to_message(&updated)))
}

#[utoipa::path(delete, path = "/v1/messages/{id}", params(AsQuery),
    responses((status = 200, body = DeleteReport), (status = 404, body = opsbox_api::ErrorBody),
              (status = 409, body = opsbox_api::ErrorBody, description = "delivered already, or not sent by the node")))]
async fn delete_message(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<AsQuery>,
) -> ApiResult<Json<DeleteReport>> {
    let current = visible(&state, &caller, &id).await?;
    let node = query.node.unwrap_or(current.source);
    act_as(&caller, &node, Role::Operator)?;
    let deleted = state
        .core
        .queues
        .delete_one(&id, &node, EditRule::SenderBeforeDelivery)
        .await?;
    if deleted == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("message {id} was delivered already, or {node} did not send it"),
        ));
    }
    Ok(Json(DeleteReport { deleted }))
}

/// The queue routes' part of the OpenAPI document at `/v1/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_queues,
    queue_stats,
    push,
    pull,
    ack,
    list_messages,
    purge,
    get_message,
    update_message,
    delete_message
))]
pub struct QueuesDoc;
