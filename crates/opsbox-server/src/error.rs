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
