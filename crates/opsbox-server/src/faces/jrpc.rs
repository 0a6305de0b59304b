//! The py-jrpc face: what py-jrpc 2.1.1's `SimpleTCPClient` and the curl lines of its
//! README send, answered as py-jrpc answered, minus its crashes (wire reference
//! `protocols/jrpc.md`, decisions D1–D12 of §8).
//!
//! - `GET /{name}[;arg]`: the name and the one string argument are taken raw, without
//!   percent-decoding (G1, G2, D10); the query string is ignored.
//! - `POST /` with `{"name": params}`: an array is positional, an object by name, a
//!   truthy scalar one argument, a falsy one no argument (§2.3).
//! - `200 OK` with `{"name": result}` written as Python's `json.dumps` writes it, so the
//!   raw strings callers compare are the same (D4, D9). Errors: 405 unknown method,
//!   400 bad arguments or a body that is not a one-member object, 403 role too low,
//!   500 the function failed or the body is not JSON, 501 other HTTP methods; the
//!   message is both the reason phrase (`e.args[0].msg`) and a small JSON body.
//!   Never a dropped connection (D3).
//! - On the main listener `POST /` is shared with JSON-RPC (§10): a JSON array or an
//!   object with a `jsonrpc` member goes to [`super::jsonrpc`].
//! - Anonymous callers (the client cannot send credentials) are let in only while the
//!   server is open, or with the role of `rpc.jrpc_anonymous_role` (D1).

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, MethodRouter};
use axum::Router;
use opsbox_core::identities::Identity;
use opsbox_core::rpc::{Params, RpcError};
use serde_json::{json, Map, Value};

use super::{jsonrpc, pyjson};
use crate::auth::Refusal;
use crate::body::BodyError;
use crate::AppState;

/// Routes on the main listener: `POST /` (shared with JSON-RPC, §10) and `GET /{name}`.
/// Routes of other faces are static and win over `/{name}`.
pub fn routes(_state: AppState) -> Router<AppState> {
    let root: MethodRouter<AppState> = axum::routing::post(post_root);
    Router::new()
        .route("/", root)
        .route("/{name}", any(on_name))
}

/// The router of a dedicated jrpc listener (`--jrpc-listen`): every GET path is a jrpc
/// name, every POST a jrpc (or JSON-RPC) call, as on py-jrpc's own port.
pub fn dedicated(state: AppState) -> Router {
    let stall = crate::body_read_timeout(&state.config.limits);
    Router::new()
        .fallback(any(on_any))
        .layer(tower_http::map_request_body::MapRequestBodyLayer::new(
            move |b| crate::body::EndsWhenComplete::wrap(b, stall),
        ))
        .with_state(state)
}

async fn on_any(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match parts.method.clone() {
        Method::GET => get_call(&state, &parts.headers, parts.uri.path()).await,
        Method::POST => post_body(state, Request::from_parts(parts, body)).await,
        other => unsupported(&other),
    }
}

async fn on_name(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match parts.method.clone() {
        Method::GET => get_call(&state, &parts.headers, parts.uri.path()).await,
        other => unsupported(&other),
    }
}

async fn post_root(State(state): State<AppState>, request: Request) -> Response {
    post_body(state, request).await
}

fn unsupported(method: &Method) -> Response {
    failure(
        StatusCode::NOT_IMPLEMENTED,
        &format!("Unsupported method ('{method}')"),
    )
}

/// An error answer: the message as reason phrase and as `{"error": …}`.
fn failure(status: StatusCode, message: &str) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        pyjson::to_string(&json!({ "error": message })),
    )
        .into_response();
    // A reason phrase is one line of visible ASCII; longer ones are cut.
    let reason: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect();
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.into_bytes()) {
        response.extensions_mut().insert(reason);
    }
    response
}

fn success(name: &str, result: Value) -> Response {
    let mut body = Map::new();
    body.insert(name.to_owned(), result);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        pyjson::to_string(&Value::Object(body)),
    )
        .into_response()
}

/// The caller: credentials if sent, else the anonymous policy (D1).
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Identity, Response> {
    let anonymous = state.config.rpc.jrpc_anonymous_role;
    match crate::auth::authenticate_or_anonymous(&state.core, headers, anonymous).await {
        Ok(caller) => Ok(caller.0),
        Err(Refusal::Unauthenticated) => {
            let mut response = failure(StatusCode::UNAUTHORIZED, "Unauthorized");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"opsbox\""),
            );
            Err(response)
        }
        Err(Refusal::Internal(e)) => {
            Err(failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
        }
    }
}

/// Splits a raw request path as py-jrpc did (G1, G2): the `;…` tail of the last
/// segment is the argument, the name is the first segment; nothing is decoded.
pub fn parse_get_path(path: &str) -> (String, Option<String>) {
    let (path, arg) = match path.rfind('/') {
        Some(slash) => match path[slash..].find(';') {
            Some(semi) => (&path[..slash + semi], Some(&path[slash + semi + 1..])),
            None => (path, None),
        },
        None => (path, None),
    };
    let name = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .next()
        .unwrap_or("");
    (
        name.to_owned(),
        arg.filter(|a| !a.is_empty()).map(str::to_owned),
    )
}

async fn get_call(state: &AppState, headers: &HeaderMap, path: &str) -> Response {
    let (name, arg) = parse_get_path(path);
    let caller = match caller(state, headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let params = match arg {
        Some(arg) => Params::Positional(vec![Value::String(arg)]),
        None => Params::None,
    };
    call(state, &caller, &name, params).await
}

/// py-jrpc's mapping of a member's value to arguments (§2.3).
pub fn params_of(value: Value) -> Params {
    match value {
        Value::Array(a) => Params::Positional(a),
        Value::Object(o) => Params::Named(o),
        Value::Null | Value::Bool(false) => Params::None,
        Value::String(s) if s.is_empty() => Params::None,
        Value::Number(n) if n.as_f64() == Some(0.0) => Params::None,
        scalar => Params::Positional(vec![scalar]),
    }
}

async fn call(state: &AppState, caller: &Identity, name: &str, params: Params) -> Response {
    match state.core.rpc.call(name, params, caller).await {
        Ok(result) => success(name, result),
        Err(e) => {
            let status = match &e {
                RpcError::MethodNotFound(_) => StatusCode::METHOD_NOT_ALLOWED,
                RpcError::InvalidParams(_) => StatusCode::BAD_REQUEST,
                RpcError::Forbidden(_) => StatusCode::FORBIDDEN,
                RpcError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            failure(status, &e.to_string())
        }
    }
}

/// `POST` on the root: JSON-RPC if the body says so, else a jrpc call (§10).
async fn post_body(state: AppState, request: Request) -> Response {
    let headers = request.headers().clone();
    // An HTTP/1 POST with no length and not chunked: py-jrpc answered 411 (§3.2), where
    // an empty body would be a parse error. (HTTP/2 frames its bodies itself.)
    if request.version() <= axum::http::Version::HTTP_11
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
    {
        return failure(StatusCode::LENGTH_REQUIRED, "Length Required");
    }
    let limit = state.config.limits.max_body_bytes;
    let body: Bytes = match crate::body::read(request.into_body(), limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { .. }) => {
            return failure(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
        }
        Err(e @ BodyError::Malformed(_)) => {
            return failure(StatusCode::BAD_REQUEST, &e.to_string())
        }
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let is_jsonrpc = match &value {
        Value::Array(_) => true,
        Value::Object(o) => o.contains_key("jsonrpc"),
        _ => false,
    };
    if is_jsonrpc {
        return match caller(&state, &headers).await {
            Ok(identity) => jsonrpc::answer_http(&state, &identity, &body).await,
            Err(response) => response,
        };
    }
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match value {
        Value::Object(members) if members.len() == 1 => {
            let Some((name, value)) = members.into_iter().next() else {
                unreachable!("one member")
            };
            call(&state, &caller, &name, params_of(value)).await
        }
        _ => failure(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object with one member: {\"method\": params}",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_paths_like_py_jrpc() {
        let p = |s: &str| parse_get_path(s);
        assert_eq!(p("/ping"), ("ping".into(), None));
        assert_eq!(p("/ping/"), ("ping".into(), None));
        assert_eq!(p("/ping/extra"), ("ping".into(), None));
        assert_eq!(p("/ping;"), ("ping".into(), None));
        assert_eq!(
            p("/method_help;ping"),
            ("method_help".into(), Some("ping".into()))
        );
        assert_eq!(
            p("/blah;hello%20world"),
            ("blah".into(), Some("hello%20world".into()))
        );
        assert_eq!(p("/m;a;b"), ("m".into(), Some("a;b".into())));
        assert_eq!(p("/blah;x/b"), ("blah;x".into(), None));
        assert_eq!(p("/ping/extra;y"), ("ping".into(), Some("y".into())));
        assert_eq!(p("/p%69ng"), ("p%69ng".into(), None));
        assert_eq!(p("/"), ("".into(), None));
    }

    #[test]
    fn scalar_mapping() {
        assert_eq!(params_of(json!("")), Params::None);
        assert_eq!(params_of(json!(0)), Params::None);
        assert_eq!(params_of(json!(0.0)), Params::None);
        assert_eq!(params_of(json!(false)), Params::None);
        assert_eq!(params_of(json!(null)), Params::None);
        assert_eq!(params_of(json!("x")), Params::Positional(vec![json!("x")]));
        assert_eq!(params_of(json!(5)), Params::Positional(vec![json!(5)]));
        assert_eq!(
            params_of(json!(true)),
            Params::Positional(vec![json!(true)])
        );
    }
}
