//! JSON-RPC 2.0 at `/rpc`: `POST` for single calls, batches and notifications, and a
//! WebSocket (`GET /rpc` with an upgrade) that also carries subscriptions to the watch
//! stream. Every call goes to the one registry ([`opsbox_core::rpc::Rpc::call`]).
//!
//! Why not jsonrpsee: its `RpcModule` holds a fixed set of `&'static str` method names
//! built before serving, while opsbox's registry changes at run time (a script reload
//! adds and removes functions, an embedding program registers more), and every name
//! must resolve through the same lookup, role check and binding as the py-jrpc face.
//! Its HTTP layer also has the gaps the wire reference (§11) lists: `{}` answered with
//! -32700, non-object bodies with HTTP 400, negative and fractional ids refused,
//! `text/plain` refused with 415, `null` as a notification's body. Covering all of that
//! in front of it would leave it only the envelope, which is this module.
//!
//! Rules (wire reference §11, §12): every answer is HTTP 200 with JSON, errors
//! included; a notification or an all-notification batch gets 200 with an empty body;
//! ids are echoed as given; any request Content-Type is accepted; batches are bounded
//! ([`crate::config::RpcConfig::max_batch`]) and run concurrently, answered in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::{SinkExt, StreamExt};
use opsbox_core::identities::Identity;
use opsbox_core::rpc::{Params, RpcError};
use opsbox_core::CoreError;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{authenticate, Refusal};
use crate::body::BodyError;
use crate::AppState;

/// Standard and opsbox error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The function ran and failed (jsonrpsee's "call execution failed").
    pub const CALL_FAILED: i64 = -32000;
    /// The caller's role is below the function's.
    pub const FORBIDDEN: i64 = -32001;
    /// No or wrong credentials.
    pub const UNAUTHENTICATED: i64 = -32002;
    /// A subscription's start revision was compacted away.
    pub const GONE: i64 = -32003;
    pub const TOO_MANY_SUBSCRIPTIONS: i64 = -32006;
    pub const BATCH_TOO_LARGE: i64 = -32010;
}

/// Subscribe to the watch stream: params `[since]` or `{"since": n}` (optional).
pub const SUBSCRIBE: &str = "watch_subscribe";
/// Cancel a subscription: params `[id]`; answers true or false.
pub const UNSUBSCRIBE: &str = "watch_unsubscribe";
/// The method name of subscription notifications.
pub const NOTIFICATION: &str = "watch";

pub fn routes(_state: AppState) -> Router<AppState> {
    Router::new().route("/rpc", any(rpc_endpoint))
}

/// One JSON-RPC response object, written with the members in the spec's order; `id`
/// is the request's id as it was written (raw JSON), so it is echoed exactly.
fn response(id: &str, outcome: Result<Value, (i64, String, Option<Value>)>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(r#"{"jsonrpc":"2.0","#);
    match outcome {
        Ok(result) => {
            out.push_str(r#""result":"#);
            out.push_str(&serde_json::to_string(&result).unwrap_or_else(|_| "null".into()));
        }
        Err((code, message, data)) => {
            let mut error = json!({"code": code, "message": message});
            if let Some(data) = data {
                error["data"] = data;
            }
            out.push_str(r#""error":"#);
            out.push_str(&error.to_string());
        }
    }
    out.push_str(r#","id":"#);
    out.push_str(id);
    out.push('}');
    out
}

/// The id of an answer to a request whose id could not be read.
const NULL_ID: &str = "null";

fn error(id: &str, code: i64, message: &str) -> String {
    response(id, Err((code, message.to_owned(), None)))
}

/// A body as it arrives: one member, or a batch of them.
enum Incoming<'a> {
    One(Member<'a>),
    Batch(Vec<Member<'a>>),
}

/// A request object, or something else where one was expected.
enum Member<'a> {
    Request(Envelope<'a>),
    NotObject,
}

/// The members of a request object that JSON-RPC reads, as raw JSON: a member of the
/// wrong type is answered as the spec says (with the id, when that is readable) rather
/// than failing the parse of the whole body, and nothing is copied until it is used.
/// Other members are ignored; a repeated member counts once, the last time (as a JSON
/// object parsed into a map would).
#[derive(Default)]
struct Envelope<'a> {
    id: Option<&'a RawValue>,
    jsonrpc: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    params: Option<&'a RawValue>,
}

/// Reads a body (`batch: true`) or a batch member (`false`, where an array is just
/// something that is not a request object).
struct Visit {
    batch: bool,
}

impl<'de> Visitor<'de> for Visit {
    type Value = Incoming<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON-RPC request or batch")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "id" => &mut envelope.id,
                "jsonrpc" => &mut envelope.jsonrpc,
                "method" => &mut envelope.method,
                "params" => &mut envelope.params,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(Incoming::One(Member::Request(envelope)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        if !self.batch {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Incoming::One(Member::NotObject));
        }
        let mut members = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(member) = seq.next_element()? {
            members.push(member);
        }
        Ok(Incoming::Batch(members))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Incoming::One(Member::NotObject))
    }
}

impl<'de> Deserialize<'de> for Incoming<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Visit { batch: true })
    }
}

impl<'de> Deserialize<'de> for Member<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(Visit { batch: false })? {
            Incoming::One(member) => Ok(member),
            Incoming::Batch(_) => Ok(Member::NotObject),
        }
    }
}

/// The JSON-RPC error of a registry error.
pub fn rpc_error(e: RpcError) -> (i64, String, Option<Value>) {
    match e {
        RpcError::MethodNotFound(_) => (code::METHOD_NOT_FOUND, "Method not found".into(), None),
        RpcError::InvalidParams(m) => (
            code::INVALID_PARAMS,
            "Invalid params".into(),
            Some(json!(m)),
        ),
        RpcError::Forbidden(m) => (code::FORBIDDEN, "Forbidden".into(), Some(json!(m))),
        RpcError::Failed { message, data } => (code::CALL_FAILED, message, data),
    }
}

/// Where a message arrived, for what only a WebSocket can do.
pub struct Context<'a> {
    pub state: &'a AppState,
    pub caller: &'a Identity,
    pub session: Option<&'a Session>,
}

/// Answers one body (a request or a batch); `None` when nothing is to be sent back.
pub async fn handle(ctx: &Context<'_>, body: &[u8]) -> Option<String> {
    let incoming: Incoming<'_> = match serde_json::from_slice(body) {
        Ok(incoming) => incoming,
        Err(_) => return Some(error(NULL_ID, code::PARSE_ERROR, "Parse error")),
    };
    match incoming {
        Incoming::Batch(members) if members.is_empty() => {
            Some(error(NULL_ID, code::INVALID_REQUEST, "Invalid Request"))
        }
        Incoming::Batch(members) => {
            let limit = ctx.state.config.rpc.max_batch;
            if members.len() > limit {
                return Some(response(
                    NULL_ID,
                    Err((
                        code::BATCH_TOO_LARGE,
                        "Batch request too large".into(),
                        Some(json!(format!("at most {limit} calls per batch"))),
                    )),
                ));
            }
            // At most `batch_concurrency` calls run at once; answers keep the order.
            let width = ctx.state.config.rpc.batch_concurrency.max(1);
            let mut members = members.into_iter();
            let mut running = futures::stream::FuturesOrdered::new();
            let mut answers = Vec::new();
            loop {
                while running.len() < width {
                    let Some(member) = members.next() else { break };
                    running.push_back(single(ctx, member));
                }
                match running.next().await {
                    Some(answer) => answers.extend(answer),
                    None => break,
                }
            }
            (!answers.is_empty()).then(|| format!("[{}]", answers.join(",")))
        }
        Incoming::One(member) => single(ctx, member).await,
    }
}

/// Answers one request object (or a batch member that is not one).
async fn single(ctx: &Context<'_>, member: Member<'_>) -> Option<String> {
    let Member::Request(request) = member else {
        return Some(error(NULL_ID, code::INVALID_REQUEST, "Invalid Request"));
    };
    let notification = request.id.is_none();
    let id = request.id.map_or(NULL_ID, RawValue::get);
    // An id is null, a string or a number.
    if !matches!(
        id.as_bytes().first(),
        Some(b'n' | b'"' | b'-' | b'0'..=b'9')
    ) {
        return Some(error(NULL_ID, code::INVALID_REQUEST, "Invalid Request"));
    }
    let text = |raw: Option<&RawValue>| {
        raw.and_then(|raw| serde_json::from_str::<Cow<'_, str>>(raw.get()).ok())
    };
    let valid_version = text(request.jsonrpc).is_some_and(|v| v == "2.0");
    let method = match text(request.method) {
        Some(method) if valid_version => method,
        _ => return Some(error(id, code::INVALID_REQUEST, "Invalid Request")),
    };
    let params = match request.params.map(RawValue::get) {
        None => Params::None,
        Some(raw) if raw.starts_with('[') => match serde_json::from_str(raw) {
            Ok(values) => Params::Positional(values),
            Err(_) => return Some(error(id, code::INVALID_REQUEST, "Invalid Request")),
        },
        Some(raw) if raw.starts_with('{') => match serde_json::from_str(raw) {
            Ok(members) => Params::Named(members),
            Err(_) => return Some(error(id, code::INVALID_REQUEST, "Invalid Request")),
        },
        Some(_) => return Some(error(id, code::INVALID_REQUEST, "Invalid Request")),
    };
    let outcome = match method.as_ref() {
        SUBSCRIBE | UNSUBSCRIBE => match ctx.session {
            None => Err((
                code::INTERNAL_ERROR,
                "Subscriptions need a WebSocket: connect to /rpc with an upgrade".into(),
                None,
            )),
            Some(session) if method == SUBSCRIBE => session.subscribe(ctx, params).await,
            Some(session) => session.unsubscribe(params),
        },
        _ => ctx
            .state
            .core
            .rpc
            .call(&method, params, ctx.caller)
            .await
            .map_err(rpc_error),
    };
    (!notification).then(|| response(id, outcome))
}

/// `/rpc`: POST a call; GET with an upgrade for the WebSocket; anything else 405.
async fn rpc_endpoint(State(state): State<AppState>, request: Request) -> Response {
    endpoint(state, request).await
}

/// What `/rpc` answers, for the route and for [`crate::App`]'s shortcut to it.
pub(crate) async fn endpoint(state: AppState, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if parts.method == axum::http::Method::GET && upgrade {
        let caller = match caller(&state, &parts.headers).await {
            Ok(caller) => caller,
            Err(response) => return response,
        };
        // A message (and so a frame) is held to the limit of an HTTP body: a longer
        // one is refused when its frame header says so, and the connection closed.
        let limit = state.config.limits.max_body_bytes;
        return match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
            Ok(ws) => ws
                .max_message_size(limit)
                .max_frame_size(limit)
                .on_upgrade(move |socket| serve_socket(socket, state, caller)),
            Err(rejection) => rejection.into_response(),
        };
    }
    if parts.method != axum::http::Method::POST {
        let mut response = (
            StatusCode::METHOD_NOT_ALLOWED,
            "JSON-RPC over HTTP is POST only (or GET with a WebSocket upgrade)\n",
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let caller = match caller(&state, &parts.headers).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let limit = state.config.limits.max_body_bytes;
    let body = match crate::body::read(body, limit).await {
        Ok(body) => body,
        Err(BodyError::TooLarge { .. }) => return too_big(limit),
        Err(e @ BodyError::Malformed(_)) => return unreadable(&e),
    };
    answer_http(&state, &caller, &body).await
}

/// 413 with a JSON-RPC error, as jsonrpsee answers it.
pub fn too_big(limit: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONTENT_TYPE, "application/json")],
        response(
            NULL_ID,
            Err((
                -32007,
                "Request is too big".into(),
                Some(json!(format!("Exceeded max limit of {limit}"))),
            )),
        ),
    )
        .into_response()
}

/// 400 with a parse error, for a body that could not be read at all (bad chunking):
/// like jsonrpsee's answer to a body it refuses before parsing.
fn unreadable(error: &BodyError) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        response(
            NULL_ID,
            Err((
                code::PARSE_ERROR,
                "Parse error".into(),
                Some(json!(error.to_string())),
            )),
        ),
    )
        .into_response()
}

/// Answers a POSTed body: 200 with the JSON, or 200 with an empty body.
pub async fn answer_http(state: &AppState, caller: &Identity, body: &Bytes) -> Response {
    let ctx = Context {
        state,
        caller,
        session: None,
    };
    render(handle(&ctx, body).await)
}

fn render(answer: Option<String>) -> Response {
    match answer {
        Some(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response(),
        None => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "",
        )
            .into_response(),
    }
}

/// The caller of a JSON-RPC request, or the 401 answer.
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Identity, Response> {
    match authenticate(&state.core, headers).await {
        Ok(caller) => Ok(caller.0),
        Err(Refusal::Unauthenticated) => Err((
            StatusCode::UNAUTHORIZED,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::WWW_AUTHENTICATE, "Basic realm=\"opsbox\""),
            ],
            error(
                NULL_ID,
                code::UNAUTHENTICATED,
                "Unauthenticated: send HTTP Basic or a Bearer token",
            ),
        )
            .into_response()),
        Err(Refusal::Internal(e)) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            error(NULL_ID, code::INTERNAL_ERROR, &e.to_string()),
        )
            .into_response()),
    }
}

/// One WebSocket connection: its outgoing queue and its subscriptions.
pub struct Session {
    out: mpsc::Sender<String>,
    subscriptions: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_id: AtomicU64,
    max: usize,
}

/// Subscription tasks of one frame, released once the frame's answer is queued, so
/// the answer with the subscription id always precedes the first notification.
#[derive(Default)]
struct Starts(Mutex<Vec<oneshot::Sender<()>>>);

tokio::task_local! {
    static STARTS: Arc<Starts>;
}

impl Session {
    async fn subscribe(
        &self,
        ctx: &Context<'_>,
        params: Params,
    ) -> Result<Value, (i64, String, Option<Value>)> {
        let since = match params {
            Params::None => None,
            Params::Positional(v) if v.len() <= 1 => v.into_iter().next(),
            Params::Named(mut o) if o.keys().all(|k| k == "since") => o.remove("since"),
            _ => {
                return Err(invalid_params(
                    "watch_subscribe takes one optional param: since",
                ))
            }
        };
        let since = match since {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| invalid_params("since must be a revision (an integer ≥ 0)"))?,
            ),
        };
        if self.lock().len() >= self.max {
            return Err((
                code::TOO_MANY_SUBSCRIPTIONS,
                "Too many subscriptions on this connection".into(),
                None,
            ));
        }
        ctx.caller.require(opsbox_api::Role::Reader).map_err(|e| {
            (
                code::FORBIDDEN,
                "Forbidden".into(),
                Some(json!(e.to_string())),
            )
        })?;
        let stream = ctx
            .state
            .core
            .events
            .follow(since)
            .await
            .map_err(|e| match e {
                CoreError::Gone { current, .. } => (
                    code::GONE,
                    e.to_string(),
                    Some(json!({ "current_revision": current })),
                ),
                // A revision ahead of the log is the caller's mistake, not the server's.
                CoreError::Invalid(message) => invalid_params(&message),
                other => (code::INTERNAL_ERROR, other.to_string(), None),
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (go, ready) = oneshot::channel();
        let _ = STARTS.try_with(|starts| {
            starts.0.lock().unwrap_or_else(|e| e.into_inner()).push(go);
        });
        let out = self.out.clone();
        let task = tokio::spawn(async move {
            let _ = ready.await;
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let result = match item {
                    Ok(event) => serde_json::to_value(event).unwrap_or(Value::Null),
                    Err(e) => json!({ "error": e.to_string() }),
                };
                let message = json!({
                    "jsonrpc": "2.0",
                    "method": NOTIFICATION,
                    "params": {"subscription": id, "result": result},
                });
                if out.send(message.to_string()).await.is_err() {
                    return;
                }
            }
        });
        self.lock().insert(id, task.abort_handle());
        Ok(json!(id))
    }

    fn unsubscribe(&self, params: Params) -> Result<Value, (i64, String, Option<Value>)> {
        let id = match params {
            Params::Positional(v) if v.len() == 1 => v[0].as_u64(),
            Params::Named(o) if o.len() == 1 => o.get("subscription").and_then(Value::as_u64),
            _ => None,
        }
        .ok_or_else(|| invalid_params("watch_unsubscribe takes the subscription id"))?;
        Ok(json!(match self.lock().remove(&id) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, tokio::task::AbortHandle>> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn invalid_params(message: &str) -> (i64, String, Option<Value>) {
    (
        code::INVALID_PARAMS,
        "Invalid params".into(),
        Some(json!(message)),
    )
}

/// Serves one WebSocket: each text frame is a request or a batch, handled
/// concurrently; answers and notifications share one outgoing queue; a ping every 30 s
/// keeps idle connections alive through proxies.
async fn serve_socket(socket: WebSocket, state: AppState, caller: Identity) {
    let (mut sink, mut incoming) = socket.split();
    let (out, mut queue) = mpsc::channel::<String>(1024);
    let session = Arc::new(Session {
        out: out.clone(),
        subscriptions: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        max: state.config.rpc.max_subscriptions,
    });
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(Duration::from_secs(30));
        ping.tick().await;
        loop {
            tokio::select! {
                message = queue.recv() => {
                    let Some(text) = message else { break };
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let caller = Arc::new(caller);
    while let Some(Ok(message)) = incoming.next().await {
        let body: Bytes = match message {
            Message::Text(text) => Bytes::copy_from_slice(text.as_str().as_bytes()),
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        let (state, caller, session, out) =
            (state.clone(), caller.clone(), session.clone(), out.clone());
        tokio::spawn(async move {
            let starts = Arc::new(Starts::default());
            let answer = STARTS
                .scope(starts.clone(), async {
                    let ctx = Context {
                        state: &state,
                        caller: &caller,
                        session: Some(&session),
                    };
                    handle(&ctx, &body).await
                })
                .await;
            if let Some(answer) = answer {
                let _ = out.send(answer).await;
            }
            for go in starts.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                let _ = go.send(());
            }
        });
    }
    for (_, task) in session.lock().drain() {
        task.abort();
    }
    drop(out);
    writer.abort();
}
