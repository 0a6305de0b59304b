//! The Juju face: juju-core 1.2x's API WebSocket, for jujuclient 0.54.0 and other
//! callers of that dialect (reference: `shared/protocols/juju.md`).
//!
//! Served on `/` (a GET with a WebSocket upgrade; other requests to `/` belong to the
//! Scirocco and py-jrpc faces), `/environment/{uuid}/api` and `/model/{uuid}/api`, on every listener;
//! the client speaks TLS 1.2 only, which the https:// listeners offer.
//!
//! One JSON object per text frame each way. Every request gets exactly one reply
//! (`RequestId` echoed, never checked: the client reuses ids), handled in its own task
//! so that a `Stop` gets through while a `Next` waits. Keys of requests are matched
//! case-insensitively, as Go's decoder did. Errors keep the connection open.
//!
//! This module translates only: names (`service` for application), shapes and status
//! words. Every rule lives in the model service of opsbox-core.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use opsbox_api::model::{
    AddUnitsRequest, Application, ConfigChange, DeployRequest, Endpoint, Life, Machine,
    ModelStatus, Relation, Unit, UnitStatus,
};
use opsbox_api::{NewUser, Role};
use opsbox_core::identities::{Credentials, Identity};
use opsbox_core::model::{Delta, ModelWatcher};
use opsbox_core::CoreError;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::AppState;

/// Requests of one connection handled at once (each `Next` holds one while it waits).
const MAX_IN_FLIGHT: usize = 64;

/// The juju version this face speaks for.
const AGENT_VERSION: &str = "1.25.0";

/// Facades and versions served, as Login advertises them.
const FACADES: &[(&str, u64)] = &[
    ("Action", 0),
    ("AllWatcher", 0),
    ("Annotations", 1),
    ("Backups", 0),
    ("Charms", 1),
    ("Client", 0),
    ("EnvironmentManager", 1),
    ("HighAvailability", 1),
    ("ImageManager", 1),
    ("KeyManager", 0),
    ("UserManager", 0),
];

/// Facades of juju 1.2x that opsbox does not serve: calls get `not implemented`.
const JUJU_FACADES: &[&str] = &[
    "Agent",
    "Deployer",
    "DiskManager",
    "FilesystemAttachmentsWatcher",
    "Firewaller",
    "ImageMetadata",
    "InstancePoller",
    "KeyUpdater",
    "Logger",
    "MachineManager",
    "Machiner",
    "MetricsManager",
    "Networker",
    "NotifyWatcher",
    "Pinger",
    "Provisioner",
    "Reboot",
    "RelationUnitsWatcher",
    "Resumer",
    "Rsyslog",
    "Service",
    "Spaces",
    "StatusHistory",
    "Storage",
    "StringsWatcher",
    "Subnets",
    "SystemManager",
    "Upgrader",
    "Uniter",
];

/// Client v0 methods of juju 1.2x that opsbox does not serve.
const JUJU_CLIENT_METHODS: &[&str] = &[
    "AbortCurrentUpgrade",
    "APIHostPorts",
    "DestroyEnvironment",
    "EnvironmentSet",
    "EnvironmentUnset",
    "EnvUserInfo",
    "FindTools",
    "InjectMachines",
    "MachineConfig",
    "ProvisioningScript",
    "RetryProvisioning",
    "Run",
    "RunOnAllMachines",
    "SetEnvironAgentVersion",
    "SetEnvironmentAgentVersion",
    "ShareEnvironment",
    "UnshareEnvironment",
    "AddMachinesV2",
];

/// Routes of the face besides `/` (which other faces share, see [`on_root`]): the API
/// WebSocket on its longer paths, and the HTTPS charm upload and download.
pub fn routes(_state: AppState) -> Router<AppState> {
    Router::new()
        .route("/environment/{uuid}/api", get(on_api))
        .route("/model/{uuid}/api", get(on_api))
        .route("/charms", get(download_charm).post(upload_charm))
        .route(
            "/environment/{uuid}/charms",
            get(download_charm).post(upload_charm),
        )
}

/// An error of the HTTPS side, in the shape the client raises `EnvError` with.
fn http_error(status: axum::http::StatusCode, e: JujuError) -> Response {
    let mut body = json!({ "Error": e.message });
    if let Some(code) = e.code {
        body["ErrorCode"] = json!(code);
    }
    (status, axum::Json(body)).into_response()
}

/// The HTTPS side authenticates with Basic `user-<name>:<password>` (or a token as the
/// password); an open server takes anyone, as every face does.
async fn http_identity(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<Identity, Response> {
    use axum::http::StatusCode;
    use base64::Engine as _;
    let core = &state.core;
    let required = core
        .identities
        .auth_required()
        .await
        .map_err(|e| http_error(StatusCode::INTERNAL_SERVER_ERROR, e.into()))?;
    let refused = || {
        http_error(
            StatusCode::UNAUTHORIZED,
            JujuError::new(
                "invalid entity name or password",
                Some("unauthorized access"),
            ),
        )
    };
    let basic = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    match basic.as_deref().and_then(|b| b.split_once(':')) {
        Some((tag, password)) => log_in(core, tag, password).await.map_err(|e| {
            let status = if e.code == Some("unauthorized access") {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            http_error(status, e)
        }),
        None if required => Err(refused()),
        None => log_in(core, "user-admin", "")
            .await
            .map_err(|e| http_error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// Who `user-<name>` with `password` (a user's password or a token) is. With no users
/// or tokens the server is open to everyone on its (loopback) listeners, as every face is.
async fn log_in(
    core: &opsbox_core::Core,
    tag: &str,
    password: &str,
) -> Result<Identity, JujuError> {
    let user = user_of_tag(tag);
    if !core.identities.auth_required().await? {
        return Ok(Identity {
            name: user,
            role: Role::Admin,
            nodes: Vec::new(),
        });
    }
    let by_password = core
        .identities
        .authenticate(&Credentials::Password {
            user,
            password: password.to_owned(),
        })
        .await;
    match by_password {
        Ok(identity) => Ok(identity),
        Err(_) => core
            .identities
            .authenticate(&Credentials::Token(password.to_owned()))
            .await
            .map_err(|_| {
                JujuError::new(
                    "invalid entity name or password",
                    Some("unauthorized access"),
                )
            }),
    }
}

#[derive(Debug, serde::Deserialize)]
struct CharmsQuery {
    series: Option<String>,
    url: Option<String>,
}

/// `POST /charms?series=S` with a zip body: adds a local charm (`add_local_charm`).
async fn upload_charm(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<CharmsQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    use axum::http::StatusCode;
    let identity = match http_identity(&state, &headers).await {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    if let Err(e) = identity.require(Role::Operator) {
        return http_error(StatusCode::FORBIDDEN, e.into());
    }
    let Some(series) = query.series.filter(|s| !s.is_empty()) else {
        return http_error(
            StatusCode::BAD_REQUEST,
            JujuError::bad("expected series= in the query"),
        );
    };
    // Read here, after auth, with the charm limit and in the face's error shape (the
    // router's body limit is for API requests, and would answer in plain text).
    let body = match crate::body::read(body, state.config.limits.max_charm_bytes).await {
        Ok(body) => body,
        Err(e @ crate::body::BodyError::TooLarge { .. }) => {
            return http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                JujuError::bad(format!(
                    "charm archive too large: {e} (limits.max_charm_bytes)"
                )),
            )
        }
        Err(e) => return http_error(StatusCode::BAD_REQUEST, JujuError::bad(e.to_string())),
    };
    let charms = state.core.model.charms().clone();
    let added = tokio::task::spawn_blocking(move || charms.add_archive(&body, &series)).await;
    match added {
        Ok(Ok((_, url))) => {
            (StatusCode::OK, axum::Json(json!({ "CharmURL": url }))).into_response()
        }
        Ok(Err(e)) => http_error(StatusCode::BAD_REQUEST, e.into()),
        Err(e) => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            JujuError::new(e.to_string(), None),
        ),
    }
}

/// `GET /charms?url=U[&file=*]`: the charm as a zip (`download_charm`).
async fn download_charm(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<CharmsQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    use axum::http::StatusCode;
    if let Err(response) = http_identity(&state, &headers).await {
        return response;
    }
    let Some(url) = query.url else {
        return http_error(
            StatusCode::BAD_REQUEST,
            JujuError::bad("expected url= in the query"),
        );
    };
    let charms = state.core.model.charms().clone();
    let packed = tokio::task::spawn_blocking(move || charms.archive(&url)).await;
    match packed {
        Ok(Ok(bytes)) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/zip")],
            bytes,
        )
            .into_response(),
        Ok(Err(e @ CoreError::NotFound(_))) => http_error(StatusCode::NOT_FOUND, e.into()),
        Ok(Err(e)) => http_error(StatusCode::BAD_REQUEST, e.into()),
        Err(e) => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            JujuError::new(e.to_string(), None),
        ),
    }
}

async fn on_api(State(state): State<AppState>, request: Request) -> Response {
    upgrade(state, request).await
}

/// Middleware over the whole router: `GET /` with a WebSocket upgrade is the Juju API
/// (a plain `GET /` stays Scirocco's banner, `POST /` py-jrpc's).
pub async fn on_root(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path() == "/" && wants_websocket(&request) {
        return upgrade(state, request).await;
    }
    next.run(request).await
}

/// Whether a request asks for a WebSocket (the Juju API on `/`).
pub fn wants_websocket(request: &Request) -> bool {
    request
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Takes the WebSocket; authentication happens inside it, with `Admin.Login`.
pub async fn upgrade(state: AppState, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(ws) => ws
            .max_message_size(state.config.limits.max_body_bytes)
            // A frame is buffered whole before the message limit is checked.
            .max_frame_size(state.config.limits.max_body_bytes)
            .on_upgrade(move |socket| serve(socket, state)),
        Err(rejection) => rejection.into_response(),
    }
}

/// One API connection.
struct Conn {
    state: AppState,
    identity: Mutex<Option<Identity>>,
    watchers: Mutex<HashMap<String, WatcherSlot>>,
    next_watcher: AtomicU64,
}

/// A watcher of this connection: the watcher itself (one `Next` at a time) and the
/// signal that stops a waiting `Next`.
#[derive(Clone)]
struct WatcherSlot {
    watcher: Arc<tokio::sync::Mutex<ModelWatcher>>,
    stop: watch::Sender<bool>,
}

async fn serve(socket: WebSocket, state: AppState) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
    });
    let conn = Arc::new(Conn {
        state,
        identity: Mutex::new(None),
        watchers: Mutex::new(HashMap::new()),
        next_watcher: AtomicU64::new(1),
    });
    // Requests in progress per connection: a client that floods the socket waits for
    // its earlier answers instead of piling up tasks (juju's own client has one or two).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(Ok(message)) = stream.next().await {
        let text = match message {
            Message::Text(text) => text.to_string(),
            Message::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = conn.handle(&text).await;
            let _ = tx.send(reply.to_string());
            drop(permit);
        });
    }
    // The client went away (often without a close frame): stop its watchers.
    let slots: Vec<WatcherSlot> = conn
        .watchers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, slot)| slot)
        .collect();
    for slot in slots {
        let _ = slot.stop.send(true);
    }
    drop(tx);
    let _ = writer.await;
}

/// An error reply: Juju's message and, when it had one, its code.
#[derive(Debug)]
struct JujuError {
    message: String,
    code: Option<&'static str>,
}

impl JujuError {
    fn new(message: impl Into<String>, code: Option<&'static str>) -> Self {
        JujuError {
            message: message.into(),
            code,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(message, Some("bad request"))
    }

    fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(message, Some("not implemented"))
    }
}

/// Core errors in Juju's words: an application is a service here.
impl From<CoreError> for JujuError {
    fn from(e: CoreError) -> Self {
        let text = juju_words(&e.to_string());
        let code = match &e {
            CoreError::NotFound(_) | CoreError::UnknownJob(_) | CoreError::UnknownScript(_) => {
                Some("not found")
            }
            CoreError::Conflict(_) => Some("already exists"),
            // Juju sent most refusals of a request's content without a code, but a
            // client can only tell "your request is wrong" from "the server failed"
            // by one, as the native face does with 400 against 500.
            CoreError::Invalid(_) => Some("bad request"),
            CoreError::Unauthenticated | CoreError::Forbidden(_) => {
                return JujuError::new("permission denied", Some("unauthorized access"))
            }
            _ => None,
        };
        JujuError::new(text, code)
    }
}

fn juju_words(text: &str) -> String {
    text.replace("applications", "services")
        .replace("application", "service")
}

type Reply = Result<Value, JujuError>;

/// Case-insensitive access to a params object.
struct Params<'a>(&'a Map<String, Value>);

impl<'a> Params<'a> {
    /// The value of `key` (any case); `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<String, JujuError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(JujuError::bad(format!(
                "{key}: expected a string, got {other}"
            ))),
            None => Err(JujuError::bad(format!("{key} is required"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>, JujuError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    fn int(&self, key: &str) -> Result<Option<u64>, JujuError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| JujuError::bad(format!("{key}: expected a non-negative integer"))),
            Some(other) => Err(JujuError::bad(format!(
                "{key}: expected an integer, got {other}"
            ))),
        }
    }

    fn bool(&self, key: &str) -> bool {
        matches!(self.get(key), Some(Value::Bool(true)))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, JujuError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| JujuError::bad(format!("{key}: expected strings")))
                })
                .collect(),
            Some(other) => Err(JujuError::bad(format!(
                "{key}: expected a list, got {other}"
            ))),
        }
    }

    fn object(&self, key: &str) -> Result<Map<String, Value>, JujuError> {
        match self.get(key) {
            None => Ok(Map::new()),
            Some(Value::Object(map)) => Ok(map.clone()),
            Some(other) => Err(JujuError::bad(format!(
                "{key}: expected an object, got {other}"
            ))),
        }
    }

    /// A `{str: str}` object; other scalars are turned into text as Python's `str()`
    /// would have before sending.
    fn settings(&self, key: &str) -> Result<BTreeMap<String, String>, JujuError> {
        self.object(key)?
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s,
                    Value::Bool(true) => "true".into(),
                    Value::Bool(false) => "false".into(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(JujuError::bad(format!(
                            "{key}.{k}: expected a string, got {other}"
                        )))
                    }
                };
                Ok((k, text))
            })
            .collect()
    }

    /// A list of `{"Tag": ...}` objects.
    fn tags(&self, key: &str) -> Result<Vec<String>, JujuError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .filter_map(|item| {
                    item.as_object()
                        .and_then(|o| Params(o).get("Tag").and_then(Value::as_str))
                        .map(str::to_owned)
                })
                .collect()),
            Some(other) => Err(JujuError::bad(format!(
                "{key}: expected a list, got {other}"
            ))),
        }
    }
}

impl Conn {
    /// Answers one frame.
    async fn handle(&self, text: &str) -> Value {
        let request: Map<String, Value> = match serde_json::from_str(text) {
            Ok(Value::Object(map)) => map,
            _ => {
                return error_reply(
                    &Value::Null,
                    JujuError::bad("the request is not a JSON object"),
                )
            }
        };
        let envelope = Params(&request);
        let id = envelope.get("RequestId").cloned().unwrap_or(Value::Null);
        let empty = Map::new();
        let params = match envelope.get("Params") {
            Some(Value::Object(map)) => map,
            None => &empty,
            Some(_) => return error_reply(&id, JujuError::bad("Params must be an object")),
        };
        let facade = envelope.get("Type").and_then(Value::as_str).unwrap_or("");
        let method = envelope
            .get("Request")
            .and_then(Value::as_str)
            .unwrap_or("");
        let version = envelope.get("Version").and_then(Value::as_u64).unwrap_or(0);
        let watcher = envelope.get("Id").and_then(Value::as_str).unwrap_or("");
        let reply = self
            .dispatch(facade, version, method, watcher, Params(params))
            .await;
        match reply {
            Ok(response) => json!({ "RequestId": id, "Response": response }),
            Err(e) => error_reply(&id, e),
        }
    }

    async fn dispatch(
        &self,
        facade: &str,
        version: u64,
        method: &str,
        watcher: &str,
        params: Params<'_>,
    ) -> Reply {
        if facade == "Admin" {
            if version != 0 {
                return Err(JujuError::not_implemented(format!(
                    "no such request - method Admin({version}).{method} is not implemented"
                )));
            }
            return match method {
                "Login" => self.login(&params).await,
                _ => Err(JujuError::not_implemented(format!(
                    "no such request - method Admin.{method} is not implemented"
                ))),
            };
        }
        let Some(identity) = self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Err(JujuError::new(
                "not logged in: call Admin.Login first",
                Some("unauthorized access"),
            ));
        };
        let served = FACADES.iter().find(|(name, _)| *name == facade);
        match served {
            None if JUJU_FACADES.contains(&facade) => {
                return Err(JujuError::not_implemented(format!(
                    "facade \"{facade}\" is not served by opsbox"
                )))
            }
            None => {
                return Err(JujuError::new(
                    format!("unknown object type \"{facade}\""),
                    Some("not found"),
                ))
            }
            Some((_, v)) if *v != version => {
                return Err(JujuError::not_implemented(format!(
                    "unknown version ({version}) of interface \"{facade}\""
                )))
            }
            Some((name, _)) if !may_use(&identity, name) => {
                return Err(JujuError::from(CoreError::Forbidden(format!(
                    "the {name} facade is for admins"
                ))))
            }
            Some(_) => {}
        }
        let call = Call {
            core: &self.state.core,
            identity: &identity,
            params,
        };
        match facade {
            "Client" => match method {
                "WatchAll" => self.watch_all(),
                _ => call.client(method).await,
            },
            "AllWatcher" => match method {
                "Next" => self.next(watcher).await,
                "Stop" => self.stop(watcher),
                _ => Err(no_method(facade, version, method)),
            },
            "Charms" => call.charms(method).await,
            "UserManager" => call.users(method).await,
            "Annotations" => call.annotations(method).await,
            "KeyManager" => call.keys(method),
            "EnvironmentManager" => call.environments(method),
            "ImageManager" => match method {
                // opsbox keeps no machine images.
                "ListImages" => Ok(json!({ "result": [] })),
                _ => Err(no_method(facade, version, method)),
            },
            "Action" => call.actions(method).await,
            "Backups" => call.backups(method).await,
            _ => Err(JujuError::not_implemented(format!(
                "{facade}.{method} is not implemented by opsbox"
            ))),
        }
    }

    async fn login(&self, params: &Params<'_>) -> Reply {
        let core = &self.state.core;
        let tag = params
            .opt_str("AuthTag")?
            .unwrap_or_else(|| "user-admin".into());
        let password = params.opt_str("Password")?.unwrap_or_default();
        let identity = log_in(core, &tag, &password).await?;
        let facades: Vec<Value> = FACADES
            .iter()
            .filter(|(name, _)| may_use(&identity, name))
            .map(|(name, version)| json!({ "Name": name, "Versions": [version] }))
            .collect();
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity);
        let port = self
            .state
            .config
            .listen
            .first()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .unwrap_or(17070);
        Ok(json!({
            "Servers": [[{
                "Value": "127.0.0.1", "Type": "ipv4", "NetworkName": "",
                "Scope": "local-machine", "Port": port,
            }]],
            "EnvironTag": format!("environment-{}", core.model.uuid()),
            "LastConnection": null,
            "Facades": facades,
        }))
    }

    fn watch_all(&self) -> Reply {
        let id = self.next_watcher.fetch_add(1, Ordering::SeqCst).to_string();
        let (stop, _) = watch::channel(false);
        let slot = WatcherSlot {
            watcher: Arc::new(tokio::sync::Mutex::new(self.state.core.model.watcher())),
            stop,
        };
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), slot);
        Ok(json!({ "AllWatcherId": id }))
    }

    fn slot(&self, id: &str) -> Result<WatcherSlot, JujuError> {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| JujuError::new("unknown watcher id", Some("not found")))
    }

    /// Blocks until there are deltas, or the watcher is stopped.
    async fn next(&self, id: &str) -> Reply {
        let slot = self.slot(id)?;
        let mut stopped = slot.stop.subscribe();
        if *stopped.borrow_and_update() {
            return Err(JujuError::new("watcher was stopped", None));
        }
        let mut watcher = tokio::select! {
            w = slot.watcher.lock() => w,
            _ = stopped.changed() => return Err(JujuError::new("watcher was stopped", None)),
        };
        let deltas = tokio::select! {
            deltas = watcher.next() => deltas.map_err(JujuError::from)?,
            _ = stopped.changed() => return Err(JujuError::new("watcher was stopped", None)),
        };
        let core = &self.state.core;
        let uuid = core.model.uuid();
        let series = core.model.default_series();
        let deltas: Vec<Value> = deltas
            .iter()
            .filter_map(|d| juju_delta(d, uuid, series))
            .collect();
        Ok(json!({ "Deltas": deltas }))
    }

    fn stop(&self, id: &str) -> Reply {
        let slot = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .ok_or_else(|| JujuError::new("unknown watcher id", Some("not found")))?;
        let _ = slot.stop.send(true);
        Ok(json!({}))
    }
}

/// Whether `identity` may use a facade: Backups copy the whole store (every user's
/// secrets with it), so only admins see and use them.
fn may_use(identity: &Identity, facade: &str) -> bool {
    facade != "Backups" || identity.require(Role::Admin).is_ok()
}

fn error_reply(id: &Value, e: JujuError) -> Value {
    let mut reply = json!({ "RequestId": id, "Error": e.message, "Response": {} });
    if let Some(code) = e.code {
        reply["ErrorCode"] = json!(code);
    }
    reply
}

fn no_method(facade: &str, version: u64, method: &str) -> JujuError {
    let name = if version == 0 {
        format!("{facade}.{method}")
    } else {
        format!("{facade}({version}).{method}")
    };
    JujuError::new(
        format!("no such request - method {name} is not implemented"),
        Some("not found"),
    )
}

/// One call with the caller and its params.
struct Call<'a> {
    core: &'a opsbox_core::Core,
    identity: &'a Identity,
    params: Params<'a>,
}

impl Call<'_> {
    fn may_write(&self) -> Result<(), JujuError> {
        self.identity
            .require(Role::Operator)
            .map_err(JujuError::from)
    }

    async fn client(&self, method: &str) -> Reply {
        let model = &self.core.model;
        let p = &self.params;
        let writes = !matches!(
            method,
            "FullStatus"
                | "Status"
                | "EnvironmentInfo"
                | "EnvironmentGet"
                | "ServiceGet"
                | "GetServiceConstraints"
                | "GetEnvironmentConstraints"
                | "ServiceCharmRelations"
                | "CharmInfo"
                | "ResolveCharms"
                | "AgentVersion"
                | "PublicAddress"
                | "PrivateAddress"
                | "GetAnnotations"
                | "EnvironmentUUID"
        );
        if writes && !JUJU_CLIENT_METHODS.contains(&method) {
            self.may_write()?;
        }
        match method {
            "ServiceDeploy" => {
                let num_units = p.int("NumUnits")?.unwrap_or(1);
                let request = DeployRequest {
                    name: p.str("ServiceName")?,
                    charm: p.str("CharmURL")?,
                    num_units: u32::try_from(num_units)
                        .map_err(|_| JujuError::bad("NumUnits is too large"))?,
                    config: p.settings("Config")?,
                    constraints: constraints(p)?,
                    to: p.opt_str("ToMachineSpec")?,
                };
                model.deploy(request, &self.identity.name).await?;
                Ok(json!({}))
            }
            "ServiceDestroy" => {
                model.destroy_application(&p.str("ServiceName")?).await?;
                Ok(json!({}))
            }
            "ServiceExpose" => {
                model.expose(&p.str("ServiceName")?, true).await?;
                Ok(json!({}))
            }
            "ServiceUnexpose" => {
                model.expose(&p.str("ServiceName")?, false).await?;
                Ok(json!({}))
            }
            "ServiceSet" => {
                let change = ConfigChange {
                    set: p.settings("Options")?,
                    unset: Vec::new(),
                };
                model.set_config(&p.str("ServiceName")?, change).await?;
                Ok(json!({}))
            }
            "ServiceSetYAML" => Err(JujuError::not_implemented(
                "ServiceSetYAML is not implemented: use ServiceSet",
            )),
            "ServiceUnset" => {
                let change = ConfigChange {
                    set: BTreeMap::new(),
                    unset: p.strings("Options")?,
                };
                model.set_config(&p.str("ServiceName")?, change).await?;
                Ok(json!({}))
            }
            "ServiceGet" => {
                let config = model.config(&p.str("ServiceName")?).await?;
                let options: Map<String, Value> = config
                    .config
                    .iter()
                    .map(|(key, option)| {
                        let mut entry = json!({
                            "description": option.description,
                            "type": option.kind,
                        });
                        if let Some(value) = &option.value {
                            entry["value"] = value.clone();
                        }
                        if option.default {
                            entry["default"] = json!(true);
                        }
                        (key.clone(), entry)
                    })
                    .collect();
                Ok(json!({
                    "Service": config.application,
                    "Charm": config.charm,
                    "Config": options,
                    "Constraints": config.constraints,
                }))
            }
            "ServiceUpdate" => {
                let name = p.str("ServiceName")?;
                if let Some(url) = p.opt_str("CharmUrl")?.filter(|u| !u.is_empty()) {
                    model.set_charm(&name, &url).await?;
                }
                if let Some(min) = p.int("MinUnits")? {
                    let min =
                        u32::try_from(min).map_err(|_| JujuError::bad("MinUnits is too large"))?;
                    model.set_min_units(&name, min).await?;
                }
                let settings = p.settings("SettingsStrings")?;
                if !settings.is_empty() {
                    model
                        .set_config(
                            &name,
                            ConfigChange {
                                set: settings,
                                unset: Vec::new(),
                            },
                        )
                        .await?;
                }
                if p.get("Constraints").is_some() {
                    model.set_constraints(&name, constraints(p)?).await?;
                }
                Ok(json!({}))
            }
            "ServiceSetCharm" => {
                model
                    .set_charm(&p.str("ServiceName")?, &p.str("CharmUrl")?)
                    .await?;
                Ok(json!({}))
            }
            "SetServiceConstraints" => {
                model
                    .set_constraints(&p.str("ServiceName")?, constraints(p)?)
                    .await?;
                Ok(json!({}))
            }
            "GetServiceConstraints" => {
                let app = model.application(&p.str("ServiceName")?).await?;
                Ok(json!({ "Constraints": app.constraints }))
            }
            "ServiceCharmRelations" => {
                let names = model.charm_relations(&p.str("ServiceName")?).await?;
                Ok(json!({ "CharmRelations": names }))
            }
            "AddServiceUnits" => {
                let n = p.int("NumUnits")?.unwrap_or(1);
                let units = model
                    .add_units(
                        &p.str("ServiceName")?,
                        AddUnitsRequest {
                            num_units: u32::try_from(n)
                                .map_err(|_| JujuError::bad("NumUnits is too large"))?,
                            to: p.opt_str("ToMachineSpec")?,
                        },
                    )
                    .await?;
                Ok(json!({ "Units": units }))
            }
            "DestroyServiceUnits" => {
                model.destroy_units(&p.strings("UnitNames")?).await?;
                Ok(json!({}))
            }
            "Resolved" => {
                model.resolved(&p.str("UnitName")?, p.bool("Retry")).await?;
                Ok(json!({}))
            }
            "AddRelation" => {
                let relation = model.relate(&p.strings("Endpoints")?).await?;
                let endpoints: Map<String, Value> = relation
                    .endpoints
                    .iter()
                    .map(|e| (e.application.clone(), charm_relation(e)))
                    .collect();
                Ok(json!({ "Endpoints": endpoints }))
            }
            "DestroyRelation" => {
                model.destroy_relation(&p.strings("Endpoints")?).await?;
                Ok(json!({}))
            }
            "AddMachines" | "AddMachinesV2" => {
                let list = match p.get("MachineParams") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                let mut results = Vec::new();
                for item in list {
                    let map = item.as_object().cloned().unwrap_or_default();
                    let one = Params(&map);
                    let c = constraints(&one)?;
                    match model.add_machines(vec![c]).await {
                        Ok(ids) => results.push(json!({ "Machine": ids[0], "Error": null })),
                        Err(e) => results.push(json!({
                            "Machine": "",
                            "Error": { "Message": JujuError::from(e).message, "Code": "" },
                        })),
                    }
                }
                Ok(json!({ "Machines": results }))
            }
            "DestroyMachines" => {
                model
                    .destroy_machines(&p.strings("MachineNames")?, p.bool("Force"))
                    .await?;
                Ok(json!({}))
            }
            "AddCharm" => {
                self.core.model.charms().resolve(&p.str("URL")?)?;
                Ok(json!({}))
            }
            "ResolveCharms" => {
                let urls: Vec<Value> = p
                    .strings("References")?
                    .iter()
                    .map(|reference| match self.resolve(reference) {
                        Ok(url) => json!({ "URL": url }),
                        Err(e) => json!({ "Error": e.message }),
                    })
                    .collect();
                Ok(json!({ "URLs": urls }))
            }
            "CharmInfo" => self.charm_info(&p.str("CharmURL")?),
            "EnvironmentInfo" => Ok(json!({
                "DefaultSeries": model.default_series(),
                "Name": model.name(),
                "ProviderType": "opsbox",
                "UUID": model.uuid(),
                "ServerUUID": model.uuid(),
            })),
            "EnvironmentUUID" => Ok(json!({ "Result": model.uuid() })),
            "EnvironmentGet" => Ok(json!({ "Config": {
                "name": model.name(),
                "type": "opsbox",
                "uuid": model.uuid(),
                "default-series": model.default_series(),
                "agent-version": AGENT_VERSION,
            }})),
            "GetEnvironmentConstraints" => Ok(json!({ "Constraints": {} })),
            "SetEnvironmentConstraints" => Err(JujuError::not_implemented(
                "environment constraints are not kept by opsbox: set constraints per service",
            )),
            "AgentVersion" => Ok(json!({ "Version": AGENT_VERSION })),
            "FullStatus" | "Status" => {
                let status = model.status_matching(&p.strings("Patterns")?).await;
                let nodes = self.core.nodes.list().await.unwrap_or_default();
                let hosts: HashMap<String, String> = nodes
                    .into_iter()
                    .map(|n| (n.id.clone(), n.hostname.unwrap_or(n.id)))
                    .collect();
                Ok(full_status(&status, &hosts))
            }
            "PublicAddress" | "PrivateAddress" => {
                let target = p.str("Target")?;
                let status = model.status().await;
                let node = status
                    .units
                    .iter()
                    .find(|u| u.name == target)
                    .map(|u| u.node.clone())
                    .or_else(|| {
                        status
                            .machines
                            .iter()
                            .find(|m| m.id == target)
                            .map(|m| m.node.clone())
                    })
                    .ok_or_else(|| {
                        JujuError::new(
                            format!("unknown unit or machine \"{target}\""),
                            Some("not found"),
                        )
                    })?;
                let host = self
                    .core
                    .nodes
                    .get(&node)
                    .await
                    .ok()
                    .and_then(|n| n.hostname)
                    .unwrap_or(node);
                Ok(json!({ method: host }))
            }
            "GetAnnotations" => {
                let tag = p.str("Tag")?;
                Ok(json!({ "Annotations": model.annotations(&tag).await? }))
            }
            "SetAnnotations" => {
                model
                    .set_annotations(&p.str("Tag")?, p.settings("Pairs")?)
                    .await?;
                Ok(json!({}))
            }
            _ if JUJU_CLIENT_METHODS.contains(&method) => Err(JujuError::not_implemented(format!(
                "Client.{method} is not implemented by opsbox"
            ))),
            _ => Err(no_method("Client", 0, method)),
        }
    }

    /// The full URL a charm reference stands for: kept as given, with a series.
    fn resolve(&self, reference: &str) -> Result<String, JujuError> {
        let charm = self.core.model.charms().resolve(reference)?;
        let parsed = opsbox_core::charms::CharmUrl::parse(reference)?;
        let series = parsed
            .series
            .unwrap_or_else(|| self.core.model.default_series().to_owned());
        Ok(format!("{}:{series}/{}", parsed.schema, charm.name))
    }

    fn charm_info(&self, url: &str) -> Reply {
        let charm = self.core.model.charms().resolve(url)?;
        let relations = |map: &BTreeMap<String, opsbox_api::model::CharmRelation>, role: &str| {
            map.iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        json!({
                            "Name": name, "Role": role, "Interface": r.interface,
                            "Optional": r.optional, "Limit": r.limit, "Scope": r.scope,
                        }),
                    )
                })
                .collect::<Map<String, Value>>()
        };
        let options: Map<String, Value> = charm
            .config
            .iter()
            .map(|(name, o)| {
                (
                    name.clone(),
                    json!({ "Type": o.kind, "Description": o.description, "Default": o.default }),
                )
            })
            .collect();
        Ok(json!({
            "Revision": charm.revision,
            "URL": url,
            "Config": { "Options": options },
            "Meta": {
                "Name": charm.name,
                "Summary": charm.summary,
                "Description": charm.description,
                "Subordinate": false,
                "Provides": relations(&charm.provides, "provider"),
                "Requires": relations(&charm.requires, "requirer"),
                "Peers": relations(&charm.peers, "peer"),
                "Series": charm.series,
                "Categories": [],
                "Tags": [],
            },
            "Actions": action_specs(&charm),
        }))
    }

    async fn charms(&self, method: &str) -> Reply {
        match method {
            "List" => {
                let names = self.params.strings("Names")?;
                let series = self.core.model.default_series();
                let urls: Vec<String> = self
                    .core
                    .model
                    .charms()
                    .list()
                    .into_iter()
                    .filter(|c| names.is_empty() || names.contains(&c.name))
                    .map(|c| format!("local:{series}/{}-{}", c.name, c.revision))
                    .collect();
                Ok(json!({ "CharmURLs": urls }))
            }
            "CharmInfo" => self.charm_info(&self.params.str("CharmURL")?),
            _ => Err(no_method("Charms", 1, method)),
        }
    }

    async fn users(&self, method: &str) -> Reply {
        let identities = &self.core.identities;
        match method {
            "UserInfo" => {
                let wanted: Vec<String> = self
                    .params
                    .tags("Entities")?
                    .iter()
                    .map(|t| user_of_tag(t))
                    .collect();
                let users = identities.users().await?;
                let results: Vec<Value> = if wanted.is_empty() {
                    users
                        .iter()
                        .map(|u| json!({ "result": user_info(u) }))
                        .collect()
                } else {
                    wanted
                        .iter()
                        .map(|name| match users.iter().find(|u| &u.name == name) {
                            Some(u) => json!({ "result": user_info(u) }),
                            None => json!({ "error": {
                                "Message": format!("user \"{name}\" not found"),
                                "Code": "not found",
                            }}),
                        })
                        .collect()
                };
                Ok(json!({ "results": results }))
            }
            "AddUser" => {
                self.identity
                    .require(Role::Admin)
                    .map_err(JujuError::from)?;
                let mut results = Vec::new();
                let users = match self.params.get("Users") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                for user in users {
                    let map = user.as_object().cloned().unwrap_or_default();
                    let one = Params(&map);
                    let name = one.str("username")?;
                    let added = identities
                        .add_user(NewUser {
                            name: name.clone(),
                            password: one.str("password")?,
                            role: Role::Operator,
                        })
                        .await;
                    results.push(match added {
                        Ok(_) => json!({ "tag": format!("user-{name}@local") }),
                        Err(e) => json!({ "error": {
                            "Message": JujuError::from(e).message, "Code": "" } }),
                    });
                }
                Ok(json!({ "results": results }))
            }
            "SetPassword" => {
                let changes = match self.params.get("Changes") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                let mut results = Vec::new();
                for change in changes {
                    let map = change.as_object().cloned().unwrap_or_default();
                    let one = Params(&map);
                    let name = user_of_tag(&one.str("Tag")?);
                    if name != self.identity.name {
                        self.identity
                            .require(Role::Admin)
                            .map_err(JujuError::from)?;
                    }
                    let role = identities
                        .users()
                        .await?
                        .into_iter()
                        .find(|u| u.name == name)
                        .map(|u| u.role);
                    let outcome = match role {
                        Some(role) => identities
                            .set_user(NewUser {
                                name: name.clone(),
                                password: one.str("Password")?,
                                role,
                            })
                            .await
                            .map(|_| ()),
                        None => Err(CoreError::NotFound(format!("user \"{name}\""))),
                    };
                    results.push(match outcome {
                        Ok(()) => json!({ "Error": null }),
                        Err(e) => json!({ "Error": { "Message": e.to_string(), "Code": "" } }),
                    });
                }
                Ok(json!({ "Results": results }))
            }
            "EnableUser" | "DisableUser" => Err(JujuError::not_implemented(
                "opsbox users cannot be disabled: remove the user instead (opsbox users remove)",
            )),
            _ => Err(no_method("UserManager", 0, method)),
        }
    }

    async fn annotations(&self, method: &str) -> Reply {
        let model = &self.core.model;
        match method {
            "Get" => {
                let mut results = Vec::new();
                for tag in self.params.tags("Entities")? {
                    results.push(match model.annotations(&tag).await {
                        Ok(pairs) => {
                            json!({ "EntityTag": tag, "Annotations": pairs, "Error": {} })
                        }
                        Err(e) => {
                            let e = JujuError::from(e);
                            json!({ "EntityTag": tag, "Annotations": {},
                                "Error": { "Error": { "Message": e.message, "Code": e.code.unwrap_or("") } } })
                        }
                    });
                }
                Ok(json!({ "Results": results }))
            }
            "Set" => {
                self.may_write()?;
                let items = match self.params.get("Annotations") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                let mut errors = Vec::new();
                for item in items {
                    let map = item.as_object().cloned().unwrap_or_default();
                    let one = Params(&map);
                    let tag = one.str("EntityTag")?;
                    if let Err(e) = model
                        .set_annotations(&tag, one.settings("Annotations")?)
                        .await
                    {
                        let e = JujuError::from(e);
                        errors.push(json!({ "Message": e.message, "Code": e.code.unwrap_or("") }));
                    }
                }
                Ok(json!({ "Results": errors }))
            }
            _ => Err(no_method("Annotations", 1, method)),
        }
    }

    fn keys(&self, method: &str) -> Reply {
        match method {
            // opsbox authenticates with passwords and tokens and keeps no SSH keys.
            "ListKeys" => {
                let n = self.params.tags("Entities")?.len().max(1);
                Ok(json!({ "Results": vec![json!({ "Result": [], "Error": null }); n] }))
            }
            "AddKeys" | "DeleteKeys" | "ImportKeys" => Err(JujuError::not_implemented(
                "opsbox keeps no SSH keys: agents authenticate with node tokens",
            )),
            _ => Err(no_method("KeyManager", 0, method)),
        }
    }

    fn environments(&self, method: &str) -> Reply {
        let model = &self.core.model;
        match method {
            "ListEnvironments" => Ok(json!({ "Environments": [{
                "OwnerTag": format!("user-{}", self.identity.name),
                "Name": model.name(),
                "UUID": model.uuid(),
            }]})),
            "CreateEnvironment" => Err(JujuError::not_implemented(
                "an opsbox server holds one model; start another server for another",
            )),
            _ => Err(no_method("EnvironmentManager", 1, method)),
        }
    }

    /// Backups are copies of the whole store (`opsbox_core::backups`); only admins get
    /// here (see [`may_use`]).
    async fn backups(&self, method: &str) -> Reply {
        let backups = &self.core.backups;
        match method {
            "Create" => {
                let notes = self.params.opt_str("Notes")?.unwrap_or_default();
                let backup = backups.create(&notes, self.core.model.uuid()).await?;
                Ok(backup_fields(&backup))
            }
            "Info" => Ok(backup_fields(&backups.get(&self.params.str("ID")?)?)),
            "List" => {
                let list: Vec<Value> = backups.list().iter().map(backup_fields).collect();
                Ok(json!({ "List": list }))
            }
            "Remove" => {
                backups.remove(&self.params.str("ID")?).await?;
                Ok(json!({}))
            }
            "Restore" | "PrepareRestore" | "FinishRestore" => Err(JujuError::not_implemented(
                "restore by stopping opsbox and putting the backup file in place of <data>/opsbox.db",
            )),
            _ => Err(no_method("Backups", 0, method)),
        }
    }

    /// Actions are jobs: `Enqueue` runs a charm's action on a unit's node; its job's name
    /// is the action's tag.
    async fn actions(&self, method: &str) -> Reply {
        let model = &self.core.model;
        match method {
            "ServicesCharmActions" => {
                let mut results = Vec::new();
                for tag in self.params.tags("Entities")? {
                    let name = tag.strip_prefix("service-").unwrap_or(&tag).to_owned();
                    results.push(match model.charm_of(&name).await {
                        Ok(charm) => {
                            json!({ "servicetag": tag, "actions": action_specs(&charm) })
                        }
                        Err(e) => json!({ "servicetag": tag,
                            "error": { "Message": JujuError::from(e).message, "Code": "not found" } }),
                    });
                }
                Ok(json!({ "results": results }))
            }
            "Enqueue" => {
                self.may_write()?;
                let items = match self.params.get("Actions") {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                let mut results = Vec::new();
                for item in items {
                    let map = item.as_object().cloned().unwrap_or_default();
                    let one = Params(&map);
                    let receiver = one.str("Receiver")?;
                    let name = one.str("Name")?;
                    let params: BTreeMap<String, Value> =
                        one.object("Parameters")?.into_iter().collect();
                    let unit = unit_of_tag(&receiver);
                    let queued = model
                        .run_action(
                            &unit,
                            &name,
                            params.clone(),
                            Some(self.identity.name.clone()),
                        )
                        .await;
                    results.push(match queued {
                        Ok(job) => self.action_result(&job, &receiver, &name, &params).await,
                        Err(e) => json!({ "error": { "Message": JujuError::from(e).message, "Code": "" } }),
                    });
                }
                Ok(json!({ "results": results }))
            }
            "Actions" | "Cancel" => {
                if method == "Cancel" {
                    self.may_write()?;
                }
                let mut results = Vec::new();
                for tag in self.params.tags("Entities")? {
                    let found = match method {
                        "Cancel" => self.core.jobs.kill(&tag, Some(&self.identity.name)).await,
                        _ => self.core.jobs.get(&tag).await,
                    };
                    results.push(match found {
                        Ok(job) => match model.action_of(&job).await {
                            Some((unit, name)) => {
                                let receiver = format!("unit-{unit}");
                                self.action_result(&job, &receiver, &name, &BTreeMap::new())
                                    .await
                            }
                            None => json!({ "error": {
                                "Message": format!("action \"{tag}\" not found"), "Code": "not found" } }),
                        },
                        _ => json!({ "error": {
                            "Message": format!("action \"{tag}\" not found"), "Code": "not found" } }),
                    });
                }
                Ok(json!({ "results": results }))
            }
            "ListAll" | "ListPending" | "ListRunning" | "ListCompleted" => {
                let mut lists = Vec::new();
                for tag in self.params.tags("Entities")? {
                    let unit = unit_of_tag(&tag);
                    let jobs = match model.actions(&unit).await {
                        Ok(jobs) => jobs,
                        Err(e) => {
                            lists.push(json!({ "receiver": tag, "actions": [],
                                "error": { "Message": JujuError::from(e).message, "Code": "not found" } }));
                            continue;
                        }
                    };
                    let mut actions = Vec::new();
                    for job in jobs.iter().filter(|j| match method {
                        "ListPending" => j.state == opsbox_api::JobState::Queued,
                        "ListRunning" => j.state == opsbox_api::JobState::Running,
                        "ListCompleted" => j.state.is_terminal(),
                        _ => true,
                    }) {
                        let name = model
                            .action_of(job)
                            .await
                            .map(|(_, n)| n)
                            .unwrap_or_default();
                        actions.push(self.action_result(job, &tag, &name, &BTreeMap::new()).await);
                    }
                    lists.push(json!({ "receiver": tag, "actions": actions, "error": null }));
                }
                Ok(json!({ "actions": lists }))
            }
            "FindActionTagsByPrefix" => {
                let jobs = self.core.jobs.list(&Default::default()).await?;
                let mut matches = Map::new();
                for prefix in self.params.strings("Prefixes")? {
                    let tags: Vec<Value> = jobs
                        .iter()
                        .filter(|j| j.name.starts_with("action-"))
                        .filter(|j| {
                            j.name.starts_with(&prefix)
                                || j.name["action-".len()..].starts_with(&prefix)
                        })
                        .map(|j| json!({ "Tag": j.name }))
                        .collect();
                    matches.insert(prefix, Value::Array(tags));
                }
                Ok(json!({ "matches": matches }))
            }
            _ => Err(no_method("Action", 0, method)),
        }
    }

    /// Juju's ActionResult for an action's job.
    async fn action_result(
        &self,
        job: &opsbox_api::Job,
        receiver: &str,
        name: &str,
        params: &BTreeMap<String, Value>,
    ) -> Value {
        use opsbox_api::JobState;
        let status = match job.state {
            JobState::Queued => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "completed",
            JobState::Killed => "cancelled",
            JobState::Failed | JobState::Lost => "failed",
        };
        let output = if job.state.is_terminal() {
            self.core
                .model
                .action_output(&job.name)
                .await
                .unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| Value::String(t.to_rfc3339()))
                .unwrap_or(Value::Null)
        };
        json!({
            "action": { "tag": job.name, "receiver": receiver, "name": name, "parameters": params },
            "enqueued": job.created_at.to_rfc3339(),
            "started": time(job.started_at),
            "completed": time(job.finished_at),
            "status": status,
            "message": job.reason.clone().unwrap_or_default(),
            "output": output,
        })
    }
}

fn backup_fields(b: &opsbox_api::Backup) -> Value {
    json!({
        "ID": b.id,
        "Checksum": b.checksum,
        "ChecksumFormat": "SHA-1, base64 encoded",
        "Size": b.size,
        "Stored": b.finished.to_rfc3339(),
        "Started": b.started.to_rfc3339(),
        "Finished": b.finished.to_rfc3339(),
        "Notes": b.notes,
        "Environment": b.model_uuid,
        "Machine": "0",
        "Hostname": b.hostname,
        "Version": b.version,
    })
}

/// `unit-blog-0` (or the client's `unit-blog/0`) → `blog/0`.
fn unit_of_tag(tag: &str) -> String {
    let name = tag.strip_prefix("unit-").unwrap_or(tag);
    if name.contains('/') {
        return name.to_owned();
    }
    match name.rsplit_once('-') {
        Some((app, n)) if n.bytes().all(|b| b.is_ascii_digit()) => format!("{app}/{n}"),
        _ => name.to_owned(),
    }
}

fn user_of_tag(tag: &str) -> String {
    let name = tag.strip_prefix("user-").unwrap_or(tag);
    name.strip_suffix("@local").unwrap_or(name).to_owned()
}

fn user_info(user: &opsbox_api::User) -> Value {
    json!({
        "username": user.name,
        "display-name": user.name,
        "created-by": "admin",
        "date-created": user.created_at.to_rfc3339(),
        "last-connection": null,
        "disabled": false,
    })
}

/// Constraints as sent, `null` meaning not given; the model checks them and keeps them
/// as Juju reports them (`mem: "4G"` becomes `4096`), so answers and deltas carry that.
fn constraints(p: &Params<'_>) -> Result<BTreeMap<String, Value>, JujuError> {
    Ok(p.object("Constraints")?
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .collect())
}

fn life(life: Life) -> &'static str {
    match life {
        Life::Alive => "alive",
        Life::Dying => "dying",
        Life::Dead => "dead",
    }
}

/// FullStatus's `Life`: empty while alive.
fn status_life(l: Life) -> &'static str {
    match l {
        Life::Alive => "",
        other => life(other),
    }
}

/// The legacy agent-state word of juju 1.2x for a unit (see the reference's
/// addendum): `down` when its node is gone, whatever it last did.
fn unit_state(unit: &Unit) -> &'static str {
    if unit.agent_lost {
        return "down";
    }
    match unit.status {
        UnitStatus::Pending | UnitStatus::Installing => "pending",
        UnitStatus::Installed => "installed",
        UnitStatus::Started => "started",
        UnitStatus::Stopping | UnitStatus::Stopped => "stopped",
        UnitStatus::Error => "error",
    }
}

fn machine_state(status: &str) -> &str {
    match status {
        "pending" | "started" | "stopped" | "error" | "down" => status,
        _ => "pending",
    }
}

fn ports(unit: &Unit) -> Vec<Value> {
    unit.ports
        .iter()
        .filter_map(|p| {
            let (number, protocol) = p.split_once('/').unwrap_or((p, "tcp"));
            number
                .parse::<u16>()
                .ok()
                .map(|n| json!({ "Protocol": protocol, "Number": n }))
        })
        .collect()
}

fn charm_relation(e: &Endpoint) -> Value {
    json!({
        "Name": e.name, "Role": e.role.as_str(), "Interface": e.interface,
        "Optional": e.optional, "Limit": e.limit, "Scope": e.scope,
    })
}

fn machine_fields(m: &Machine, uuid: &str) -> Value {
    json!({
        "Id": m.id,
        "InstanceId": if m.status == "pending" { String::new() } else { m.node.clone() },
        "Status": machine_state(&m.status),
        "StatusInfo": "",
        "StatusData": {},
        "Life": life(m.life),
        "Series": m.series,
        "SupportedContainers": null,
        "SupportedContainersKnown": false,
        "Jobs": m.jobs,
        "Addresses": [],
        "HasVote": m.id == "0",
        "WantsVote": m.id == "0",
        "EnvUUID": uuid,
    })
}

fn application_fields(a: &Application, uuid: &str) -> Value {
    json!({
        "Name": a.name,
        "Exposed": a.exposed,
        "CharmURL": a.charm_url,
        "OwnerTag": format!("user-{}", a.owner),
        "Life": life(a.life),
        "MinUnits": a.min_units,
        "Constraints": a.constraints,
        "Config": a.config,
        "Subordinate": false,
        "EnvUUID": uuid,
    })
}

fn unit_fields(u: &Unit, uuid: &str, series: &str) -> Value {
    json!({
        "Name": u.name,
        "Service": u.application,
        "Series": series,
        "CharmURL": u.charm_url,
        "PublicAddress": "",
        "PrivateAddress": "",
        "MachineId": u.machine,
        "Ports": ports(u),
        "Status": unit_state(u),
        "StatusInfo": u.status_info,
        "StatusData": {},
        "Subordinate": false,
        "EnvUUID": uuid,
    })
}

fn relation_fields(r: &Relation, uuid: &str) -> Value {
    let endpoints: Vec<Value> = r
        .endpoints
        .iter()
        .map(|e| json!({ "ServiceName": e.application, "Relation": charm_relation(e) }))
        .collect();
    json!({ "Key": r.key, "Id": r.id, "Endpoints": endpoints, "EnvUUID": uuid })
}

/// A model delta as `[kind, "change"|"remove", fields]`.
fn juju_delta(delta: &Delta, uuid: &str, series: &str) -> Option<Value> {
    let action = if delta.removed { "remove" } else { "change" };
    let (kind, fields) = match delta.kind.as_str() {
        "application" => (
            "service",
            match serde_json::from_value::<Application>(delta.data.clone()) {
                Ok(a) => application_fields(&a, uuid),
                Err(_) => json!({ "Name": delta.id() }),
            },
        ),
        "unit" => (
            "unit",
            match serde_json::from_value::<Unit>(delta.data.clone()) {
                Ok(u) => unit_fields(&u, uuid, series),
                Err(_) => json!({ "Name": delta.id() }),
            },
        ),
        "machine" => (
            "machine",
            match serde_json::from_value::<Machine>(delta.data.clone()) {
                Ok(m) => machine_fields(&m, uuid),
                Err(_) => json!({ "Id": delta.id() }),
            },
        ),
        "relation" => (
            "relation",
            match serde_json::from_value::<Relation>(delta.data.clone()) {
                Ok(r) => relation_fields(&r, uuid),
                Err(_) => json!({ "Key": delta.id() }),
            },
        ),
        "annotation" => (
            "annotation",
            json!({
                "Tag": delta.id(),
                "Annotations": delta.data.get("annotations").cloned().unwrap_or(json!({})),
                "EnvUUID": uuid,
            }),
        ),
        _ => return None,
    };
    Some(json!([kind, action, fields]))
}

/// `Client.FullStatus` in juju 1.2x's shape, of a status the model has already cut
/// down to the patterns asked for (`Model::status_matching`).
fn full_status(status: &ModelStatus, hosts: &HashMap<String, String>) -> Value {
    let host = |node: &str| hosts.get(node).cloned().unwrap_or_else(|| node.to_owned());
    let machines: Map<String, Value> = status
        .machines
        .iter()
        .map(|m| {
            let state = machine_state(&m.status);
            (
                m.id.clone(),
                json!({
                    "Id": m.id, "AgentState": state, "AgentStateInfo": "",
                    "AgentVersion": AGENT_VERSION, "Life": status_life(m.life), "Err": null,
                    "DNSName": host(&m.node), "InstanceId": m.node,
                    "InstanceState": if state == "started" { "running" } else { state },
                    "Series": m.series, "Containers": {}, "Hardware": "",
                    "Jobs": m.jobs, "HasVote": m.id == "0", "WantsVote": m.id == "0",
                    "Agent": { "Status": state, "Info": "", "Data": {},
                               "Version": AGENT_VERSION, "Life": status_life(m.life), "Err": null },
                }),
            )
        })
        .collect();
    let mut services = Map::new();
    for app in &status.applications {
        let mut relations: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &status.relations {
            let Some(local) = r.endpoints.iter().find(|e| e.application == app.name) else {
                continue;
            };
            let remotes = relations.entry(local.name.clone()).or_default();
            for e in r.endpoints.iter().filter(|e| e.application != app.name) {
                remotes.push(e.application.clone());
            }
            if r.endpoints.len() == 1 {
                remotes.push(app.name.clone());
            }
        }
        let units: Map<String, Value> = status
            .units
            .iter()
            .filter(|u| u.application == app.name)
            .map(|u| {
                let state = unit_state(u);
                let err =
                    (u.status == UnitStatus::Error).then(|| json!({ "Message": u.status_info }));
                let (info, workload, agent) = if u.agent_lost {
                    // Juju's words for a unit whose agent is gone; the state it was
                    // last known in stays readable in brackets, as juju 1.2x did.
                    let lost =
                        format!("agent is lost, sorry! See 'juju status-history {}'", u.name);
                    let known = UnitStatus::as_str(u.status);
                    (
                        format!("({known})"),
                        json!({ "Status": "unknown", "Info": lost }),
                        json!({ "Status": "lost", "Info": lost }),
                    )
                } else {
                    (
                        u.status_info.clone(),
                        json!({ "Status": if state == "started" { "active" } else { "maintenance" },
                                "Info": u.status_info }),
                        json!({ "Status": if state == "error" { "failed" } else { "idle" } }),
                    )
                };
                (
                    u.name.clone(),
                    json!({
                        "AgentState": state, "AgentStateInfo": info,
                        "AgentVersion": AGENT_VERSION, "Life": status_life(u.life), "Err": err,
                        "Machine": u.machine, "OpenedPorts": u.ports,
                        "PublicAddress": host(&u.node), "Charm": "", "Subordinates": {},
                        "Workload": workload,
                        "UnitAgent": agent,
                    }),
                )
            })
            .collect();
        services.insert(
            app.name.clone(),
            json!({
                "Charm": app.charm_url, "Exposed": app.exposed, "Life": status_life(app.life),
                "Relations": relations, "CanUpgradeTo": "", "SubordinateTo": [],
                "Networks": { "Enabled": [], "Disabled": [] }, "Err": null, "Units": units,
            }),
        );
    }
    let relations: Vec<Value> = status
        .relations
        .iter()
        .map(|r| {
            let endpoints: Vec<Value> = r
                .endpoints
                .iter()
                .map(|e| {
                    json!({ "ServiceName": e.application, "Name": e.name,
                                 "Role": e.role.as_str(), "Subordinate": false })
                })
                .collect();
            json!({ "Id": r.id, "Key": r.key, "Interface": r.interface, "Scope": r.scope,
                    "Endpoints": endpoints })
        })
        .collect();
    json!({
        "EnvironmentName": status.name,
        "Machines": machines,
        "Services": services,
        "Networks": {},
        "Relations": relations,
    })
}

/// A charm's actions as Juju's `Actions` value (`CharmInfo`, `ServicesCharmActions`):
/// each with its description and its params as a JSON schema object.
fn action_specs(charm: &opsbox_api::model::Charm) -> Value {
    let specs: Map<String, Value> = charm
        .actions
        .iter()
        .map(|(name, spec)| {
            (
                name.clone(),
                json!({
                    "Description": spec.description,
                    "Params": {
                        "title": name, "type": "object",
                        "description": spec.description,
                        "properties": spec.params,
                    },
                }),
            )
        })
        .collect();
    json!({ "ActionSpecs": specs })
}
