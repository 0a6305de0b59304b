//! The model in the native API (`/v1/model/...`), behind the native auth check:
//!
//! - `GET /v1/model`: everything, with the revision to watch from (`/v1/events`, kinds
//!   `model.<application|unit|machine|relation|annotation>.<change|remove>`);
//! - `GET /v1/model/charms[/{name}]`;
//! - `POST /v1/model/applications` (deploy), `GET|DELETE /v1/model/applications/{app}`,
//!   `POST .../expose|unexpose`, `GET|PATCH .../config`, `GET|PUT .../constraints`,
//!   `POST .../units`;
//! - `DELETE /v1/model/units/{app}/{n}`, `POST /v1/model/units/{app}/{n}/resolved`;
//! - `POST /v1/model/relations`, `DELETE /v1/model/relations/{a}/{b}`;
//! - `GET /v1/model/jenv`: what a Juju client needs to connect by name.
//!
//! Every rule lives in [`opsbox_core::model`]; this module only translates.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use opsbox_api::model::{
    AddUnitsRequest, Application, ApplicationConfig, Charm, ConfigChange, DeployRequest,
    ModelStatus, RelateRequest, Relation, UnitNames,
};
use opsbox_api::{ErrorBody, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{json_body, ApiResult};
use crate::AppState;

/// `GET /v1/model/charms`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CharmList {
    pub charms: Vec<Charm>,
}

/// `GET /v1/model/jenv`: the model's identity and how to reach its Juju face.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JenvInfo {
    pub name: String,
    pub uuid: String,
    /// `host:port` of each https:// listener.
    pub state_servers: Vec<String>,
    /// The PEM certificate of those listeners, for the client to verify them against.
    pub ca_cert: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResolvedQuery {
    #[serde(default)]
    retry: bool,
}

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/model", get(status))
        .route("/v1/model/jenv", get(jenv))
        .route("/v1/model/charms", get(charms))
        .route("/v1/model/charms/{name}", get(charm))
        .route("/v1/model/applications", post(deploy))
        .route(
            "/v1/model/applications/{app}",
            get(application).delete(destroy),
        )
        .route("/v1/model/applications/{app}/expose", post(expose))
        .route("/v1/model/applications/{app}/unexpose", post(unexpose))
        .route(
            "/v1/model/applications/{app}/config",
            get(config).patch(set_config),
        )
        .route(
            "/v1/model/applications/{app}/constraints",
            get(constraints).put(set_constraints),
        )
        .route("/v1/model/applications/{app}/units", post(add_units))
        .route("/v1/model/units/{app}/{n}", delete(remove_unit))
        .route("/v1/model/units/{app}/{n}/resolved", post(resolved))
        .route("/v1/model/relations", post(relate))
        .route("/v1/model/relations/{a}/{b}", delete(unrelate))
        .layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_caller,
        ))
}

#[utoipa::path(get, path = "/v1/model", responses((status = 200, body = ModelStatus)))]
async fn status(State(state): State<AppState>) -> Json<ModelStatus> {
    Json(state.core.model.status().await)
}

#[utoipa::path(get, path = "/v1/model/jenv", responses((status = 200, body = JenvInfo)))]
async fn jenv(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Json<JenvInfo>> {
    let model = &state.core.model;
    // A wildcard listener is reached at the host the caller used to reach this one.
    let asked = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
            _ => h.to_owned(),
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let state_servers: Vec<String> = state
        .config
        .listen
        .iter()
        .filter_map(|l| l.strip_prefix("https://"))
        .map(|hostport| {
            let hostport = hostport.trim_end_matches('/');
            match hostport.rsplit_once(':') {
                Some(("0.0.0.0" | "[::]", port)) => format!("{asked}:{port}"),
                _ => hostport.to_owned(),
            }
        })
        .collect();
    let ca_cert = if state_servers.is_empty() {
        None
    } else {
        crate::tls::certificate_pem(&state.config)
    };
    Ok(Json(JenvInfo {
        name: model.name().to_owned(),
        uuid: model.uuid().to_owned(),
        state_servers,
        ca_cert,
    }))
}

#[utoipa::path(get, path = "/v1/model/charms", responses((status = 200, body = CharmList)))]
async fn charms(State(state): State<AppState>) -> Json<CharmList> {
    Json(CharmList {
        charms: state.core.model.charms().list(),
    })
}

#[utoipa::path(get, path = "/v1/model/charms/{name}",
    responses((status = 200, body = Charm), (status = 404, body = ErrorBody)))]
async fn charm(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Charm>> {
    Ok(Json(state.core.model.charms().resolve(&name)?))
}

#[utoipa::path(post, path = "/v1/model/applications", request_body = DeployRequest,
    responses((status = 201, body = Application), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn deploy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Application>)> {
    caller.require(Role::Operator)?;
    let request: DeployRequest = json_body(&body)?;
    let owner = caller.name().unwrap_or_else(|| "admin".into());
    let app = state.core.model.deploy(request, &owner).await?;
    Ok((StatusCode::CREATED, Json(app)))
}

#[utoipa::path(get, path = "/v1/model/applications/{app}",
    responses((status = 200, body = Application), (status = 404, body = ErrorBody)))]
async fn application(
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<Application>> {
    Ok(Json(state.core.model.application(&app).await?))
}

#[utoipa::path(delete, path = "/v1/model/applications/{app}",
    responses((status = 202), (status = 404, body = ErrorBody)))]
async fn destroy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Operator)?;
    state.core.model.destroy_application(&app).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn set_exposed(
    state: &AppState,
    caller: &Caller,
    app: &str,
    on: bool,
) -> ApiResult<Json<Application>> {
    caller.require(Role::Operator)?;
    state.core.model.expose(app, on).await?;
    Ok(Json(state.core.model.application(app).await?))
}

#[utoipa::path(post, path = "/v1/model/applications/{app}/expose",
    responses((status = 200, body = Application), (status = 404, body = ErrorBody)))]
async fn expose(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> ApiResult<Json<Application>> {
    set_exposed(&state, &caller, &app, true).await
}

#[utoipa::path(post, path = "/v1/model/applications/{app}/unexpose",
    responses((status = 200, body = Application), (status = 404, body = ErrorBody)))]
async fn unexpose(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> ApiResult<Json<Application>> {
    set_exposed(&state, &caller, &app, false).await
}

#[utoipa::path(get, path = "/v1/model/applications/{app}/config",
    responses((status = 200, body = ApplicationConfig), (status = 404, body = ErrorBody)))]
async fn config(
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<ApplicationConfig>> {
    Ok(Json(state.core.model.config(&app).await?))
}

#[utoipa::path(patch, path = "/v1/model/applications/{app}/config", request_body = ConfigChange,
    responses((status = 200, body = ApplicationConfig), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn set_config(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ApplicationConfig>> {
    caller.require(Role::Operator)?;
    let change: ConfigChange = json_body(&body)?;
    state.core.model.set_config(&app, change).await?;
    Ok(Json(state.core.model.config(&app).await?))
}

#[utoipa::path(get, path = "/v1/model/applications/{app}/constraints",
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
async fn constraints(
    State(state): State<AppState>,
    Path(app): Path<String>,
) -> ApiResult<Json<BTreeMap<String, Value>>> {
    Ok(Json(state.core.model.application(&app).await?.constraints))
}

#[utoipa::path(put, path = "/v1/model/applications/{app}/constraints", request_body = Object,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn set_constraints(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> ApiResult<Json<BTreeMap<String, Value>>> {
    caller.require(Role::Operator)?;
    let constraints: BTreeMap<String, Value> = json_body(&body)?;
    state.core.model.set_constraints(&app, constraints).await?;
    Ok(Json(state.core.model.application(&app).await?.constraints))
}

#[utoipa::path(post, path = "/v1/model/applications/{app}/units",
    request_body(content = Option<AddUnitsRequest>, description = "optional: no body adds one unit"),
    responses((status = 201, body = UnitNames), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
async fn add_units(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<UnitNames>)> {
    caller.require(Role::Operator)?;
    let request: AddUnitsRequest = if body.is_empty() {
        AddUnitsRequest {
            num_units: 1,
            to: None,
        }
    } else {
        json_body(&body)?
    };
    let units = state.core.model.add_units(&app, request).await?;
    Ok((StatusCode::CREATED, Json(UnitNames { units })))
}

#[utoipa::path(delete, path = "/v1/model/units/{app}/{n}",
    responses((status = 202), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn remove_unit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((app, n)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Operator)?;
    let name = format!("{app}/{n}");
    if state.core.model.unit(&name).await.is_err() {
        return Err(opsbox_core::CoreError::NotFound(format!("unit \"{name}\"")).into());
    }
    state.core.model.destroy_units(&[name]).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v1/model/units/{app}/{n}/resolved",
    responses((status = 202), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn resolved(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((app, n)): Path<(String, String)>,
    Query(query): Query<ResolvedQuery>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Operator)?;
    state
        .core
        .model
        .resolved(&format!("{app}/{n}"), query.retry)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v1/model/relations", request_body = RelateRequest,
    responses((status = 201, body = Relation), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn relate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Relation>)> {
    caller.require(Role::Operator)?;
    let request: RelateRequest = json_body(&body)?;
    let relation = state.core.model.relate(&request.endpoints).await?;
    Ok((StatusCode::CREATED, Json(relation)))
}

#[utoipa::path(delete, path = "/v1/model/relations/{a}/{b}",
    responses((status = 202), (status = 404, body = ErrorBody)))]
async fn unrelate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((a, b)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require(Role::Operator)?;
    state.core.model.destroy_relation(&[a, b]).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        status,
        jenv,
        charms,
        charm,
        deploy,
        application,
        destroy,
        expose,
        unexpose,
        config,
        set_config,
        constraints,
        set_constraints,
        add_units,
        remove_unit,
        resolved,
        relate,
        unrelate
    ),
    components(schemas(
        ModelStatus,
        Application,
        ApplicationConfig,
        Charm,
        CharmList,
        DeployRequest,
        ConfigChange,
        AddUnitsRequest,
        UnitNames,
        RelateRequest,
        Relation,
        JenvInfo
    ))
)]
pub struct ModelDoc;
