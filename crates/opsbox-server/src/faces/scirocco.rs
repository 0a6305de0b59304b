//! The Scirocco face: scirocco-server's message queue API
//! (`shared/protocols/scirocco.md`), so scirocco-pyclient 1.0.0 and 2.1.3 work
//! unchanged, at the same time, on the same paths and queues.
//!
//! The dialect is chosen per request by the caller's identity header:
//! `Scirocco-Node-Source` is v2 (client 2.1.3), `Scirocco-From` is v1 (client 1.0.0).
//! A response uses the request's header names and list keys, and the dialect's own
//! rules for update and delete ([`EditRule`]). Everything else is shared, and every
//! rule of the queue itself lives in core ([`opsbox_core::queues`]).
//!
//! Auth (rule T3): `Authorization` holds a raw token: the configured shared token
//! (Scirocco's master token), or an opsbox API token, which may be bound to the node
//! ids it can act as. With neither a shared token nor any identity configured, the
//! server is open, like the rest of opsbox.
//!
//! Response header names must reach the client title-cased (`Scirocco-Node-Source`):
//! the HTTP/1 listeners are built with `title_case_headers` (see the crate root).

// Helpers fail with the finished answer; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use base64::Engine;
use chrono::{DateTime, NaiveDateTime, Utc};
use opsbox_api::{PayloadKind, Role};
use opsbox_core::identities::Credentials;
use opsbox_core::queues::{EditRule, Payload, PullOptions, Push, Schedule};
use opsbox_core::store::MessageRecord;
use opsbox_core::CoreError;
use serde_json::{json, Map, Value};

use crate::body::BodyError;
use crate::AppState;

/// Scirocco's routes (no fallback: unknown paths belong to the other faces).
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(banner))
        .route("/messageQueue", any(message_queue))
        .route("/messageQueue/{id}/ack", any(ack))
        .route("/messages", any(messages))
        .route("/messages/{id}", any(message))
        .route("/globalDataSpace", any(global_data_space))
        .layer(axum::middleware::from_fn_with_state(state, gate))
}

// ---------------------------------------------------------------------------------------
// Dialects
// ---------------------------------------------------------------------------------------

/// Which client generation a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// Client 1.0.0: `Scirocco-From`, `Scirocco-To`, `Scirocco-Data-Type`.
    V1,
    /// Client 2.1.3: `Scirocco-Node-Source`, `Scirocco-Node-Destination`,
    /// `Scirocco-Payload-Type`.
    V2,
}

impl Dialect {
    fn source(self) -> &'static str {
        match self {
            Dialect::V1 => "scirocco-from",
            Dialect::V2 => "scirocco-node-source",
        }
    }

    fn destination(self) -> &'static str {
        match self {
            Dialect::V1 => "scirocco-to",
            Dialect::V2 => "scirocco-node-destination",
        }
    }

    fn payload_type(self) -> &'static str {
        match self {
            Dialect::V1 => "scirocco-data-type",
            Dialect::V2 => "scirocco-payload-type",
        }
    }

    /// Field names in list items and validation errors.
    fn keys(self) -> [&'static str; 4] {
        match self {
            Dialect::V1 => ["from", "to", "data_type", "data"],
            Dialect::V2 => ["node_source", "node_destination", "payload_type", "payload"],
        }
    }

    fn edit_rule(self) -> EditRule {
        match self {
            Dialect::V1 => EditRule::EitherParty,
            Dialect::V2 => EditRule::SenderBeforeDelivery,
        }
    }
}

/// The caller as the gate resolved it.
#[derive(Debug, Clone)]
struct Caller {
    dialect: Dialect,
    /// The self-asserted node id; `None` for an anonymous request.
    node: Option<String>,
    /// May wipe every queue (`DELETE /globalDataSpace`).
    admin: bool,
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// A header that may carry any text (the user's payload type), read as Latin-1: both
/// clients send header values through Python's `http.client`, which encodes them as
/// Latin-1 (`café` arrives as `63 61 66 E9`), and Node, under the original, read them
/// the same way. Every byte is kept, so [`latin1_value`] gives the same bytes back.
fn header_latin1(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| {
            v.as_bytes()
                .iter()
                .map(|&b| char::from(b))
                .collect::<String>()
        })
        .filter(|v| !v.is_empty())
}

/// A header value for stored text: ASCII as is, other text as Latin-1 bytes, which is
/// how the clients decode response headers (a character beyond Latin-1, stored
/// through another face, goes as UTF-8). `None` for what no header can hold (controls).
fn latin1_value(text: &str) -> Option<HeaderValue> {
    if text.is_ascii() {
        return HeaderValue::from_str(text).ok();
    }
    let latin1: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(c).ok()).collect();
    HeaderValue::from_bytes(&latin1.unwrap_or_else(|| text.as_bytes().to_vec())).ok()
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn message_error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "message": message }))
}

fn not_found() -> Response {
    message_error(StatusCode::NOT_FOUND, "Not Found")
}

fn resource_not_found() -> Response {
    message_error(StatusCode::NOT_FOUND, "Resource not found.")
}

fn forbidden() -> Response {
    message_error(StatusCode::FORBIDDEN, "Incorrect auth token.")
}

fn too_large() -> Response {
    message_error(StatusCode::PAYLOAD_TOO_LARGE, "request entity too large")
}

/// A validation failure of one field, shaped like mongoose's.
fn invalid(field: &str, kind: &str, message: String, value: Option<&str>) -> Response {
    let mut detail = json!({
        "message": message,
        "name": "ValidatorError",
        "kind": kind,
        "path": field,
    });
    if let Some(value) = value {
        detail["value"] = json!(value);
    }
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({
            "message": "Message validation failed",
            "errors": { field: detail },
        }),
    )
}

fn internal(error: CoreError) -> Response {
    tracing::error!(%error, "scirocco face");
    message_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
}

/// `Mon Nov 23 2026 19:43:15 GMT+0000 (UTC)`: JavaScript's `Date.toString()` in UTC.
fn header_date(at: DateTime<Utc>) -> String {
    at.format("%a %b %d %Y %H:%M:%S GMT+0000 (UTC)").to_string()
}

/// `2026-11-23T19:43:18.648Z`, as in list bodies.
fn iso_date(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The stored fields of a message that are not null, in the dialect's names:
/// `(header name, list key, header value, list value)`.
fn fields(m: &MessageRecord, dialect: Dialect) -> Vec<(&'static str, &'static str, String, Value)> {
    let [source, destination, payload_type, _] = dialect.keys();
    let mut out = vec![
        ("scirocco-id", "_id", m.id.clone(), json!(m.id)),
        (dialect.source(), source, m.source.clone(), json!(m.source)),
        (
            dialect.destination(),
            destination,
            m.destination.clone(),
            json!(m.destination),
        ),
        (
            "scirocco-status",
            "status",
            m.status.as_str().to_owned(),
            json!(m.status.as_str()),
        ),
        (
            "scirocco-tries",
            "tries",
            m.tries.to_string(),
            json!(m.tries),
        ),
        (
            "scirocco-created-time",
            "created_time",
            header_date(m.created_at),
            json!(iso_date(m.created_at)),
        ),
    ];
    let times = [
        ("scirocco-update-time", "update_time", m.updated_at),
        ("scirocco-scheduled-time", "scheduled_time", m.scheduled_at),
        (
            "scirocco-processing-time",
            "processing_time",
            m.processing_at,
        ),
        ("scirocco-processed-time", "processed_time", m.processed_at),
    ];
    for (name, key, at) in times {
        if let Some(at) = at {
            out.push((name, key, header_date(at), json!(iso_date(at))));
        }
    }
    out.push((
        dialect.payload_type(),
        payload_type,
        m.payload_type.clone(),
        json!(m.payload_type),
    ));
    out
}

/// A message as headers plus a body. `echo_raw`: the push answer, which echoes bytes
/// as they came; later reads give binary payloads as a JSON string of base64.
fn message_response(
    status: StatusCode,
    m: &MessageRecord,
    dialect: Dialect,
    echo_raw: bool,
) -> Response {
    let (content_type, body): (&'static str, Vec<u8>) = match m.kind {
        PayloadKind::Text => ("text/html; charset=utf-8", m.payload.clone()),
        PayloadKind::Json => ("application/json; charset=utf-8", m.payload.clone()),
        PayloadKind::Binary if echo_raw => ("application/octet-stream", m.payload.clone()),
        PayloadKind::Binary => (
            "application/json; charset=utf-8",
            Value::String(base64::engine::general_purpose::STANDARD.encode(&m.payload))
                .to_string()
                .into_bytes(),
        ),
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    if echo_raw {
        if let Ok(location) = HeaderValue::from_str(&format!("/messages/{}", m.id)) {
            headers.insert(header::LOCATION, location);
        }
    }
    for (name, _, value, _) in fields(m, dialect) {
        if let Some(value) = latin1_value(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A list item: the stored fields with the payload under the dialect's key.
fn list_item(m: &MessageRecord, dialect: Dialect) -> Value {
    let mut item = Map::new();
    for (_, key, _, value) in fields(m, dialect) {
        item.insert(key.to_owned(), value);
    }
    item.insert(
        dialect.keys()[3].to_owned(),
        Payload::to_value(m.kind, &m.payload),
    );
    Value::Object(item)
}

fn count(n: u64) -> Response {
    json_response(StatusCode::OK, &json!({ "n": n, "ok": 1 }))
}

// ---------------------------------------------------------------------------------------
// The gate: auth and dialect
// ---------------------------------------------------------------------------------------

/// Rule T3, then the dialect (rule V1.6): 403 before anything else.
async fn gate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let (dialect, node) = if let Some(node) = header_text(headers, "scirocco-node-source") {
        (Dialect::V2, Some(node.to_owned()))
    } else if let Some(node) = header_text(headers, "scirocco-from") {
        (Dialect::V1, Some(node.to_owned()))
    } else {
        (Dialect::V2, None)
    };
    let token = header_text(headers, "authorization").map(str::to_owned);
    let shared = state.config.scirocco.shared_token.as_deref();
    let mutating = request.method() != Method::GET
        || request.uri().path().eq_ignore_ascii_case("/messageQueue");
    let admin = match (&token, shared) {
        (Some(token), Some(shared)) if token == shared => true,
        _ => {
            let required = match state.core.identities.auth_required().await {
                Ok(required) => required || shared.is_some(),
                Err(e) => return internal(e),
            };
            if required {
                let Some(token) = token else {
                    return forbidden();
                };
                let identity = match state
                    .core
                    .identities
                    .authenticate(&Credentials::Token(token))
                    .await
                {
                    Ok(identity) => identity,
                    Err(CoreError::Unauthenticated) => return forbidden(),
                    Err(e) => return internal(e),
                };
                let role = if mutating {
                    Role::Operator
                } else {
                    Role::Reader
                };
                if identity.require(role).is_err() {
                    return forbidden();
                }
                if identity.is_node_bound() {
                    // A node token acts only as its own nodes, and never wipes.
                    if node.as_ref().is_some_and(|n| !identity.may_act_as(n)) {
                        return forbidden();
                    }
                    false
                } else {
                    identity.role.allows(Role::Operator)
                }
            } else {
                true
            }
        }
    };
    request.extensions_mut().insert(Caller {
        dialect,
        node,
        admin,
    });
    next.run(request).await
}

fn caller(request: &Request) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller {
            dialect: Dialect::V2,
            node: None,
            admin: false,
        })
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

async fn banner(request: Request) -> Response {
    let source = match caller(&request).dialect {
        Dialect::V1 => "https://github.com/eloylp/jsdds",
        Dialect::V2 => "https://github.com/eloylp/scirocco-server",
    };
    json_response(
        StatusCode::OK,
        &json!({ "name": "DDS endpoint.", "author": "eloylp", "source": source }),
    )
}

/// `POST /messageQueue` (push) and `GET /messageQueue` (pull).
async fn message_queue(State(state): State<AppState>, request: Request) -> Response {
    match *request.method() {
        Method::POST => push(state, request).await,
        Method::GET => pull(state, request).await,
        _ => not_found(),
    }
}

/// Reads the body, up to the limit of its kind (and the server's body limit).
async fn read_body(
    state: &AppState,
    request: Request,
    kind: PayloadKind,
) -> Result<(HeaderMap, Vec<u8>), Response> {
    let limits = &state.config.scirocco;
    let limit = 1024
        * match kind {
            PayloadKind::Json => limits.max_json_kib,
            PayloadKind::Text => limits.max_text_kib,
            PayloadKind::Binary => limits.max_raw_kib,
        };
    let limit = limit.min(state.config.limits.max_body_bytes);
    let (parts, body) = request.into_parts();
    match crate::body::read(body, limit).await {
        Ok(bytes) => Ok((parts.headers, bytes.to_vec())),
        Err(BodyError::TooLarge { .. }) => Err(too_large()),
        Err(e @ BodyError::Malformed(_)) => {
            Err(message_error(StatusCode::BAD_REQUEST, &e.to_string()))
        }
    }
}

/// A body as the payload of its kind; JSON must be an object or an array.
fn parse_payload(kind: PayloadKind, bytes: Vec<u8>) -> Result<Payload, Response> {
    match kind {
        // Express's body parser decoded JSON as UTF-8 with U+FFFD for invalid bytes, and
        // scirocco-pyclient sends a JSON-looking `str` encoded as Latin-1: such a body is
        // stored as that parser read it, not refused.
        PayloadKind::Json => match String::from_utf8(bytes) {
            Ok(text) => parse_json(text.into_bytes()),
            Err(e) => parse_json(
                String::from_utf8_lossy(e.as_bytes())
                    .into_owned()
                    .into_bytes(),
            ),
        },
        PayloadKind::Text => Ok(Payload::text(String::from_utf8_lossy(&bytes).into_owned())),
        PayloadKind::Binary => Ok(Payload::binary(bytes)),
    }
}

fn parse_json(bytes: Vec<u8>) -> Result<Payload, Response> {
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(_) | Value::Array(_)) => {
            Payload::json(bytes).map_err(|e| message_error(StatusCode::BAD_REQUEST, &e.to_string()))
        }
        Ok(_) => Err(message_error(
            StatusCode::BAD_REQUEST,
            "invalid json: only objects and arrays are accepted",
        )),
        Err(e) => Err(message_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid json: {e}"),
        )),
    }
}

fn is_hex(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses `Scirocco-Scheduled-Time`: ISO-8601 with or without a fraction and with `Z`,
/// an offset or no zone (UTC); all digits (epoch milliseconds); or JavaScript's
/// `Date.toString()` form.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis);
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S%.f",
    ] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Some(at.with_timezone(&Utc));
        }
    }
    // `Wed Nov 09 2016 23:00:00 GMT+0000 (UTC)`
    let js = text.split(" (").next().unwrap_or(text);
    DateTime::parse_from_str(js, "%a %b %d %Y %H:%M:%S GMT%z")
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

async fn push(state: AppState, request: Request) -> Response {
    let caller = caller(&request);
    let kind = match request.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()) {
        Some(b"application/json") => PayloadKind::Json,
        Some(b"text/plain") => PayloadKind::Text,
        Some(b"application/octet-stream") => PayloadKind::Binary,
        _ => {
            return message_error(
                StatusCode::BAD_REQUEST,
                "Please, specify a valid Content-Type values. Valid choices are .. text/plain, application/json, application/octet-stream",
            )
        }
    };
    let (headers, bytes) = match read_body(&state, request, kind).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let payload = match parse_payload(kind, bytes) {
        Ok(payload) => payload,
        Err(response) => return response,
    };
    let dialect = caller.dialect;
    let [source_key, destination_key, type_key, _] = dialect.keys();
    let mut nodes = Vec::new();
    for (key, value) in [
        (source_key, caller.node.as_deref()),
        (
            destination_key,
            header_text(&headers, dialect.destination()),
        ),
    ] {
        match value {
            None => return invalid(key, "required", format!("Path `{key}` is required."), None),
            Some(node) if !is_hex(node) => {
                return invalid(
                    key,
                    "regexp",
                    format!("Path `{key}` is invalid ({node})."),
                    Some(node),
                )
            }
            Some(node) => nodes.push(node.to_owned()),
        }
    }
    let payload_type = match header_latin1(&headers, dialect.payload_type()) {
        Some(t) if t.chars().count() > 30 => {
            return invalid(
                type_key,
                "maxlength",
                format!(
                    "Path `{type_key}` (`{t}`) is longer than the maximum allowed length (30)."
                ),
                Some(&t),
            )
        }
        Some(t) => t,
        None => Payload::default_type(kind).to_owned(),
    };
    let time = header_text(&headers, "scirocco-scheduled-time");
    let scheduled = match header_text(&headers, "scirocco-status") {
        None | Some("pending" | "processing" | "processed") => false,
        Some("scheduled") => true,
        Some(other) => {
            return invalid(
                "status",
                "enum",
                format!("`{other}` is not a valid enum value for path `status`."),
                Some(other),
            )
        }
    };
    let at = match time.map(|t| (t, parse_time(t))) {
        None => None,
        Some((_, Some(at))) => Some(at),
        Some((t, None)) => {
            return invalid(
                "scheduled_time",
                "Date",
                format!("Cast to Date failed for value \"{t}\" at path \"scheduled_time\""),
                Some(t),
            )
        }
    };
    let schedule = match (scheduled, at) {
        (true, None) => {
            return message_error(
                StatusCode::BAD_REQUEST,
                "An scheduled message requires the scheduled time header to be set.",
            )
        }
        (true, Some(at)) => {
            if let Err(e) = state.core.queues.check_schedule(at, Utc::now()) {
                return invalid("scheduled_time", "user defined", e.to_string(), time);
            }
            Schedule::At(at)
        }
        (false, Some(at)) => Schedule::NowNoting(at),
        (false, None) => Schedule::Now,
    };
    let [source, destination] = [nodes[0].clone(), nodes[1].clone()];
    let push = Push {
        source,
        destination,
        payload,
        payload_type: Some(payload_type),
        schedule,
        max_tries: None,
    };
    match state.core.queues.push(vec![push]).await {
        Ok(pushed) => match pushed.first() {
            Some(m) => message_response(StatusCode::CREATED, m, dialect, true),
            None => internal(CoreError::Invalid("nothing was stored".into())),
        },
        Err(CoreError::Invalid(message)) => message_error(StatusCode::BAD_REQUEST, &message),
        Err(e) => internal(e),
    }
}

async fn pull(state: AppState, request: Request) -> Response {
    let caller = caller(&request);
    let Some(node) = caller.node else {
        return StatusCode::NO_CONTENT.into_response();
    };
    match state.core.queues.pull(&node, PullOptions::default()).await {
        Ok(pulled) => match pulled.first() {
            Some(m) => message_response(StatusCode::OK, m, caller.dialect, false),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        // A node id the store would never hold has nothing waiting.
        Err(CoreError::Invalid(_)) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => internal(e),
    }
}

/// `PATCH /messageQueue/{id}/ack`.
async fn ack(State(state): State<AppState>, Path(id): Path<String>, request: Request) -> Response {
    if request.method() != Method::PATCH || !is_hex(&id) {
        return not_found();
    }
    let caller = caller(&request);
    let Some(node) = caller.node else {
        return resource_not_found();
    };
    match state.core.queues.ack(&node, vec![id]).await {
        Ok((acked, _)) => match acked.first() {
            Some(m) => message_response(StatusCode::OK, m, caller.dialect, false),
            None => resource_not_found(),
        },
        Err(CoreError::Invalid(_)) => resource_not_found(),
        Err(e) => internal(e),
    }
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    limit: Option<String>,
}

/// `GET /messages` (list) and `DELETE /messages` (delete mine).
async fn messages(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
    request: Request,
) -> Response {
    let caller = caller(&request);
    let max = state.config.scirocco.max_list;
    match *request.method() {
        Method::GET => {
            let Some(node) = caller.node else {
                return StatusCode::NO_CONTENT.into_response();
            };
            let limit = query
                .limit
                .and_then(|l| l.parse::<u32>().ok())
                .filter(|l| (1..=max).contains(l))
                .unwrap_or(max);
            match state
                .core
                .queues
                .list(Some(&node), Vec::new(), Some(limit))
                .await
            {
                Ok(list) if list.is_empty() => StatusCode::NO_CONTENT.into_response(),
                Ok(list) => json_response(
                    StatusCode::OK,
                    &Value::Array(list.iter().map(|m| list_item(m, caller.dialect)).collect()),
                ),
                Err(e) => internal(e),
            }
        }
        Method::DELETE => {
            let Some(node) = caller.node else {
                return count(0);
            };
            match state
                .core
                .queues
                .delete_all(&node, caller.dialect.edit_rule())
                .await
            {
                Ok(n) => count(n),
                Err(e) => internal(e),
            }
        }
        _ => not_found(),
    }
}

/// `GET`, `PATCH` and `DELETE /messages/{id}`.
async fn message(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    if !is_hex(&id) {
        return not_found();
    }
    let caller = caller(&request);
    let queues = &state.core.queues;
    match request.method().clone() {
        Method::GET => {
            let Some(node) = caller.node else {
                return resource_not_found();
            };
            match queues.get_for(&id, &node).await {
                Ok(Some(m)) => message_response(StatusCode::OK, &m, caller.dialect, false),
                Ok(None) => resource_not_found(),
                Err(e) => internal(e),
            }
        }
        Method::PATCH => {
            let kind = match request
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes())
            {
                Some(t) if t.starts_with(b"application/json") => PayloadKind::Json,
                Some(t) if t.starts_with(b"text/plain") => PayloadKind::Text,
                _ => PayloadKind::Binary,
            };
            let (_, bytes) = match read_body(&state, request, kind).await {
                Ok(read) => read,
                Err(response) => return response,
            };
            let payload = match parse_payload(kind, bytes) {
                Ok(payload) => payload,
                Err(response) => return response,
            };
            let Some(node) = caller.node else {
                return resource_not_found();
            };
            match queues
                .update_payload(&id, &node, caller.dialect.edit_rule(), payload)
                .await
            {
                Ok(Some(m)) => message_response(StatusCode::OK, &m, caller.dialect, false),
                Ok(None) => resource_not_found(),
                Err(CoreError::Invalid(message)) => {
                    message_error(StatusCode::BAD_REQUEST, &message)
                }
                Err(e) => internal(e),
            }
        }
        Method::DELETE => {
            let Some(node) = caller.node else {
                return count(0);
            };
            match queues
                .delete_one(&id, &node, caller.dialect.edit_rule())
                .await
            {
                Ok(n) => count(n),
                Err(e) => internal(e),
            }
        }
        _ => not_found(),
    }
}

/// `DELETE /globalDataSpace`: every message of every node (v2 servers only).
async fn global_data_space(State(state): State<AppState>, request: Request) -> Response {
    let caller = caller(&request);
    if request.method() != Method::DELETE || caller.dialect == Dialect::V1 {
        return not_found();
    }
    if !caller.admin {
        return forbidden();
    }
    match state.core.queues.wipe().await {
        Ok(n) => count(n),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_times_in_every_form_the_reference_lists() {
        let at = |s: &str| parse_time(s).map(|t| t.timestamp_millis());
        let base = DateTime::parse_from_rfc3339("2026-11-23T19:43:18Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(at("2026-11-23T19:43:18"), Some(base));
        assert_eq!(at("2026-11-23T19:43:18.087838"), Some(base + 87));
        assert_eq!(at("2026-11-23T19:43:18+00:00"), Some(base));
        assert_eq!(at("2026-11-23T20:43:18+01:00"), Some(base));
        assert_eq!(at("2026-11-23T19:43:18.5Z"), Some(base + 500));
        assert_eq!(at(&base.to_string()), Some(base));
        assert_eq!(at("Mon Nov 23 2026 19:43:18 GMT+0000 (UTC)"), Some(base));
        assert_eq!(at("tomorrow"), None);
    }

    #[test]
    fn dates_render_like_javascript() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T19:43:15.648Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(header_date(at), "Mon Nov 23 2026 19:43:15 GMT+0000 (UTC)");
        assert_eq!(iso_date(at), "2026-11-23T19:43:15.648Z");
    }
}
