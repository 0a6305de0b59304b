//! Backups in the native API, admin only: `GET|POST /v1/backups`,
//! `GET|DELETE /v1/backups/{id}`, `GET /v1/backups/{id}/file` (the copy of the store).
//! The rules live in [`opsbox_core::backups`].

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Json, Router};
use opsbox_api::{Backup, ErrorBody, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_body_or_default, ApiError, ApiResult};
use crate::AppState;

/// `POST /v1/backups`.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct NewBackup {
    #[serde(default)]
    pub notes: String,
}

/// `GET /v1/backups`: oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackupList {
    pub backups: Vec<Backup>,
}

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/backups", get(list).post(create))
        .route("/v1/backups/{id}", get(info).delete(remove))
        .route("/v1/backups/{id}/file", get(file))
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_caller,
        ))
}

#[utoipa::path(get, path = "/v1/backups", responses((status = 200, body = BackupList)))]
async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<BackupList>> {
    caller.require(Role::Admin)?;
    Ok(Json(BackupList {
        backups: state.core.backups.list(),
    }))
}

#[utoipa::path(post, path = "/v1/backups",
    request_body(content = Option<NewBackup>, description = "optional: no body takes a backup without notes"),
    responses((status = 201, body = Backup), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    caller.require(Role::Admin)?;
    let request: NewBackup = json_body_or_default(&body)?;
    let backup = state
        .core
        .backups
        .create(&request.notes, state.core.model.uuid())
        .await?;
    Ok((StatusCode::CREATED, Json(backup)))
}

#[utoipa::path(get, path = "/v1/backups/{id}",
    responses((status = 200, body = Backup), (status = 404, body = ErrorBody)))]
async fn info(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Backup>> {
    caller.require(Role::Admin)?;
    Ok(Json(state.core.backups.get(&id)?))
}

#[utoipa::path(delete, path = "/v1/backups/{id}",
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Admin)?;
    state.core.backups.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/backups/{id}/file",
    responses((status = 200, description = "the SQLite file"), (status = 404, body = ErrorBody)))]
async fn file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(Role::Admin)?;
    let path = state.core.backups.path(&id)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("backup file {id}: {e}")))?;
    let length = file.metadata().await.map(|m| m.len()).ok();
    let mut response = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(file)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/vnd.sqlite3"),
    );
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, create, info, remove, file),
    components(schemas(Backup, BackupList, NewBackup))
)]
pub struct BackupsDoc;
