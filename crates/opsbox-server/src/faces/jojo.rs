//! The Jojo face: Pyjojo's HTTP API (`shared/protocols/jojo.md`), so PyMoJo, curl
//! commands and Rundeck option providers written for Pyjojo work unchanged.
//!
//! Both protocol eras are served: details by `OPTIONS /scripts/{name}` (era B) and by
//! `GET /scripts/{name}` for scripts not declared `get` (era A, decision D3); runs with
//! the script's declared method and, for old and freshly built PyMoJo clients, with
//! `POST` whatever the declared method (D2). Runs are ordinary opsbox jobs.
//!
//! Pyjojo's bugs are fixed rather than copied: auth is checked before anything else
//! (it leaked 400/500 to unauthenticated callers), a bad body is a 400 instead of a
//! 500, `lock` serialises runs instead of failing, combined output splits on lines,
//! return values work in combined mode, parameter values reach scripts raw (D1), and
//! every param carries `description` (null when none was declared, D4).

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Extension, Router};
use opsbox_api::{HttpMethod, JobState, OutputMode, Script};
use opsbox_core::CoreError;
use serde_json::{json, Value};

use crate::auth::{authenticate, Caller, Refusal};
use crate::body::BodyError;
use crate::faces::pyjson;
use crate::AppState;

/// Pyjojo's routes; a trailing `/` is optional on each (rule T2).
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/scripts", any(scripts))
        .route("/scripts/", any(scripts))
        .route("/script_names", any(script_names))
        .route("/script_names/", any(script_names))
        .route("/scripts/{name}", any(script))
        .route("/scripts/{name}/", any(script))
        .route("/reload", any(reload))
        .route("/reload/", any(reload))
        .layer(axum::middleware::from_fn_with_state(state, gate))
}

/// The body of a request, checked to be JSON once by [`gate`]; `None` when empty. Kept
/// as text so a run's params keep numbers exactly as sent (a `Value` would turn
/// `123000000000000000000000000000` into `1.23e29`).
#[derive(Debug, Clone)]
struct JojoBody(Option<Bytes>);

/// Auth first, then Pyjojo's request rules: a present `Content-Type` must start with
/// `application/json` (unless `force_json`), and a non-empty body must be JSON, on every
/// method (PyMoJo sends `Content-Type: application/json` and may send a body on GET).
async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let caller = match authenticate(&state.core, request.headers()).await {
        Ok(caller) => caller,
        Err(Refusal::Unauthenticated) => {
            let mut response = StatusCode::UNAUTHORIZED.into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=pyjojo"),
            );
            return response;
        }
        Err(Refusal::Internal(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                Value::String(e.to_string()),
            )
        }
    };
    if !state.config.jojo.force_json {
        if let Some(kind) = request.headers().get(header::CONTENT_TYPE) {
            if !kind.as_bytes().starts_with(b"application/json") {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!("Only JSON is accepted: send Content-Type: application/json (or start the server with --force-json)"),
                );
            }
        }
    }
    let (mut parts, body) = request.into_parts();
    let bytes = match crate::body::read(body, state.config.limits.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(e @ BodyError::TooLarge { .. }) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, json!(e.to_string()))
        }
        Err(e @ BodyError::Malformed(_)) => {
            return error(StatusCode::BAD_REQUEST, json!(e.to_string()))
        }
    };
    let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Ok(_) => Some(bytes),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!(format!("the body is not JSON: {e}")),
                )
            }
        }
    };
    parts.extensions.insert(caller);
    parts.extensions.insert(JojoBody(parsed));
    next.run(Request::from_parts(parts, Body::from(Bytes::new())))
        .await
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

/// `GET /scripts[?tags=|not_tags=|any_tags=]`: `{"scripts": {NAME: META}}`.
async fn scripts(State(state): State<AppState>, request: Request) -> Response {
    if request.method() != Method::GET {
        return method_not_allowed(request.method());
    }
    let filter = TagFilter::from_query(request.uri().query());
    let catalog = state.core.scripts.catalog();
    let map: serde_json::Map<String, Value> = catalog
        .scripts
        .values()
        .filter(|s| filter.keeps(s))
        .map(|s| (s.name.clone(), meta(s)))
        .collect();
    ok(json!({ "scripts": map }))
}

/// `GET /script_names`: `{"script_names": [NAME, ...]}`.
async fn script_names(State(state): State<AppState>, request: Request) -> Response {
    if request.method() != Method::GET {
        return method_not_allowed(request.method());
    }
    let filter = TagFilter::from_query(request.uri().query());
    let catalog = state.core.scripts.catalog();
    let names: Vec<&str> = catalog
        .scripts
        .values()
        .filter(|s| filter.keeps(s))
        .map(|s| s.name.as_str())
        .collect();
    ok(json!({ "script_names": names }))
}

/// `POST /reload`: rescans the directory, `{"status": "ok"}`.
async fn reload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    method: Method,
) -> Response {
    if method != Method::POST {
        return method_not_allowed(&method);
    }
    if let Err(e) = caller.require(opsbox_api::Role::Operator) {
        return forbidden(e);
    }
    match state.core.reload().await {
        Ok(_) => ok(json!({"status": "ok"})),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, json!(e.to_string())),
    }
}

/// `/scripts/{name}`: details (OPTIONS, and GET on a script not declared `get`) or a run.
async fn script(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(JojoBody(body)): Extension<JojoBody>,
    Path(name): Path<String>,
    method: Method,
) -> Response {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return unrouted();
    }
    let wanted = match method {
        Method::OPTIONS => None,
        Method::GET => Some(HttpMethod::Get),
        Method::POST => Some(HttpMethod::Post),
        Method::PUT => Some(HttpMethod::Put),
        Method::DELETE => Some(HttpMethod::Delete),
        _ => return method_not_allowed(&method),
    };
    let Some(script) = state.core.scripts.catalog().get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            json!(format!("Script with name '{name}' not found")),
        );
    };
    let run = match wanted {
        None => false,
        // Era A asked for details with GET.
        Some(HttpMethod::Get) => script.http_method == HttpMethod::Get,
        // Every PyMoJo before a refresh sends POST, whatever the script declares.
        Some(HttpMethod::Post) => true,
        Some(m) if m == script.http_method => true,
        Some(_) => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                json!(format!(
                    "Wrong HTTP method for script '{name}'. Use '{}'",
                    script.http_method.as_str().to_ascii_uppercase()
                )),
            )
        }
    };
    if !run {
        return ok(json!({ "script": meta(&script) }));
    }
    if let Err(e) = caller.require(opsbox_api::Role::Operator) {
        return forbidden(e);
    }
    let params = match run_params(&script, body.as_deref()) {
        Ok(params) => params,
        Err(message) => return error(StatusCode::BAD_REQUEST, json!(message)),
    };
    let (job, output) = match state.core.jobs.run(&name, params, caller.name()).await {
        Ok(done) => done,
        Err(CoreError::UnknownScript(_)) => {
            return error(
                StatusCode::NOT_FOUND,
                json!(format!("Script with name '{name}' not found")),
            )
        }
        Err(e @ CoreError::Invalid(_)) => {
            return error(StatusCode::BAD_REQUEST, json!(e.to_string()))
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, json!(e.to_string())),
    };
    let retcode = match (job.exit_code, job.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => -signal,
        // It never ran (the file vanished, no shebang, killed while queued...): Pyjojo
        // answered 500 when the exec failed.
        (None, None) => {
            let reason = job
                .reason
                .unwrap_or_else(|| format!("job ended {}", job.state));
            let status = if job.state == JobState::Killed {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return error(status, json!(reason));
        }
    };
    let mut result = serde_json::Map::new();
    result.insert("retcode".into(), json!(retcode));
    result.insert("stdout".into(), json!(output.stdout));
    if script.output == OutputMode::Split {
        result.insert("stderr".into(), json!(output.stderr));
    }
    result.insert("return_values".into(), json!(job.return_values));
    ok(Value::Object(result))
}

// ---------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------

/// META: a script's metadata with exactly Pyjojo's keys.
fn meta(script: &Script) -> Value {
    let params: Vec<Value> = script
        .params
        .iter()
        .map(|p| json!({"name": p.name, "description": p.description}))
        .collect();
    json!({
        "name": script.name,
        "filename": script.filename,
        "description": script.description,
        "http_method": script.http_method.as_str(),
        "params": params,
        "filtered_params": script.filtered_params,
        "tags": script.tags,
        "output": match script.output { OutputMode::Split => "split", OutputMode::Combined => "combined" },
        "lock": script.lock,
    })
}

/// The declared params of a run body. Undeclared keys are ignored, as Pyjojo did;
/// numbers and booleans become their JSON text exactly as sent and null the empty
/// string, where Pyjojo answered 500; arrays and objects cannot be an environment value.
fn run_params(script: &Script, body: Option<&[u8]>) -> Result<BTreeMap<String, String>, String> {
    let Some(body) = body else {
        return Ok(BTreeMap::new());
    };
    let object: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_slice(body)
            .map_err(|_| "the body must be a JSON object of parameters".to_owned())?;
    let mut params = BTreeMap::new();
    for param in &script.params {
        let Some(raw) = object.get(&param.name) else {
            continue;
        };
        let raw = raw.get();
        let text = match raw.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(raw).map_err(|e| e.to_string())?,
            Some(b'n') => String::new(),
            Some(kind @ (b'[' | b'{')) => {
                return Err(format!(
                    "param '{}' must be a string, not {}",
                    param.name,
                    if *kind == b'[' {
                        "an array"
                    } else {
                        "an object"
                    }
                ))
            }
            // A number, `true` or `false`: its text.
            _ => raw.to_owned(),
        };
        params.insert(param.name.clone(), text);
    }
    Ok(params)
}

/// Pyjojo's tag filters: the first of `tags`, `not_tags`, `any_tags` present (in that
/// priority), its first occurrence, split on `,` without trimming.
#[derive(Debug, PartialEq)]
enum TagFilter {
    None,
    All(Vec<String>),
    NoneOf(Vec<String>),
    Any(Vec<String>),
}

impl TagFilter {
    fn from_query(query: Option<&str>) -> Self {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        let first = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        };
        if let Some(tags) = first("tags") {
            TagFilter::All(tags)
        } else if let Some(tags) = first("not_tags") {
            TagFilter::NoneOf(tags)
        } else if let Some(tags) = first("any_tags") {
            TagFilter::Any(tags)
        } else {
            TagFilter::None
        }
    }

    fn keeps(&self, script: &Script) -> bool {
        let has = |tag: &String| script.tags.contains(tag);
        match self {
            TagFilter::None => true,
            TagFilter::All(tags) => tags.iter().all(has),
            TagFilter::NoneOf(tags) => !tags.iter().any(has),
            TagFilter::Any(tags) => tags.iter().any(has),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = (status, pyjson::to_string(value)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

fn ok(value: Value) -> Response {
    json_response(StatusCode::OK, &value)
}

/// `{"error": {"code", "type", "message"}}`.
fn error(status: StatusCode, message: Value) -> Response {
    let body = json!({"error": {
        "code": status.as_u16(),
        "type": status.canonical_reason().unwrap_or(""),
        "message": message,
    }});
    json_response(status, &body)
}

/// A method the route does not support: 405 with a null message (HEAD: no body).
fn method_not_allowed(method: &Method) -> Response {
    if method == Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    error(StatusCode::METHOD_NOT_ALLOWED, Value::Null)
}

fn forbidden(e: CoreError) -> Response {
    error(StatusCode::FORBIDDEN, json!(e.to_string()))
}

/// A path no route matches, as tornado answered it.
fn unrouted() -> Response {
    let mut response = (
        StatusCode::NOT_FOUND,
        "<html><title>404: Not Found</title><body>404: Not Found</body></html>",
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=UTF-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(tags: &[&str]) -> Script {
        Script {
            name: "s".into(),
            filename: "/x/s.sh".into(),
            description: None,
            http_method: HttpMethod::Post,
            params: vec![],
            filtered_params: vec![],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            output: OutputMode::Split,
            lock: false,
            timeout_secs: None,
        }
    }

    #[test]
    fn tag_filters_follow_pyjojo() {
        let ab = script(&["a", "b"]);
        assert!(TagFilter::from_query(Some("tags=a,b")).keeps(&ab));
        assert!(
            !TagFilter::from_query(Some("tags=a,%20b")).keeps(&ab),
            "no trimming"
        );
        assert!(!TagFilter::from_query(Some("tags=")).keeps(&ab));
        assert!(TagFilter::from_query(Some("not_tags=")).keeps(&ab));
        assert!(!TagFilter::from_query(Some("any_tags=")).keeps(&ab));
        assert!(TagFilter::from_query(Some("any_tags=c,b")).keeps(&ab));
        assert!(!TagFilter::from_query(Some("not_tags=c,b")).keeps(&ab));
        // Priority: tags over not_tags over any_tags, whatever the order in the query.
        assert_eq!(
            TagFilter::from_query(Some("any_tags=x&tags=y&tags=z")),
            TagFilter::All(vec!["y".into()])
        );
    }
}
