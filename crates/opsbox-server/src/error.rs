//! The native API's error answer: every [`CoreError`] gets one status and an
//! [`ErrorBody`] with a stable code and a sentence.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use opsbox_api::ErrorBody;
use opsbox_core::CoreError;

/// An error of a native handler.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: code.to_owned(),
                message: message.into(),
                current_revision: None,
            },
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Credentials were sent and not accepted.
    pub fn bad_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "the credentials were not accepted: a wrong user or password, or an unknown or \
             revoked token",
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs credentials: HTTP Basic (user and password) or a Bearer token",
        )
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            CoreError::UnknownScript(_) | CoreError::UnknownJob(_) | CoreError::NotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            CoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            CoreError::JobActive { .. } | CoreError::Conflict(_) => {
                (StatusCode::CONFLICT, "conflict")
            }
            CoreError::Gone { current, .. } => {
                let mut error = ApiError::new(StatusCode::GONE, "gone", message);
                error.body.current_revision = Some(*current);
                return error;
            }
            CoreError::Unauthenticated => return ApiError::unauthorized(),
            CoreError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            CoreError::Io { .. } | CoreError::Store(_) => {
                tracing::error!(error = %e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, Json(self.body)).into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"opsbox\""),
            );
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON request body of the native API; an empty body is the type's default.
pub fn json_body_or_default<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    json_body(body)
}

/// Parses a JSON request body of the native API.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Answers that axum and tower-http write themselves on a native route (a query string
/// an extractor refuses, 405, 413 past the body limit) are plain text, but the native
/// API answers every error as an [`ErrorBody`]: this middleware, outside the body
/// limit, puts such an answer on a `/v1/` path into that form, with the text as its
/// message and the status's headers (`Allow`) kept.
pub async fn native_json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let native = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    if native {
        json_errors(response).await
    } else {
        response
    }
}

async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}
