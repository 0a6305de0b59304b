//! What can go wrong when talking to an opsbox server, told so that a caller can decide
//! what to do next: fix the request (`BadRequest`), log in (`Unauthorized`), re-list
//! from a newer revision (`Gone`), retry later (`Transport`), or give up.

use opsbox_api::ErrorBody;

/// The result of every SDK call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An error from the SDK.
///
/// Answers the server refused carry its [`ErrorBody`]; the `Display` of those variants is
/// the server's own sentence (`no script named 'x'`), so it can be shown to people as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// 400: the request was malformed: a missing required or unknown parameter, a bad
    /// filter value. Retrying the same request fails the same way.
    #[error("{}", .0.message)]
    BadRequest(ErrorBody),
    /// 401: no credentials, or wrong ones.
    #[error("{}", .0.message)]
    Unauthorized(ErrorBody),
    /// 403: the credentials are valid but their role does not allow this.
    #[error("{}", .0.message)]
    Forbidden(ErrorBody),
    /// 404: no such script, job, result file, user or token.
    #[error("{}", .0.message)]
    NotFound(ErrorBody),
    /// 409: the thing is in a state that forbids this (cleaning a running job, adding a
    /// user that exists).
    #[error("{}", .0.message)]
    Conflict(ErrorBody),
    /// 410: the revision asked for was compacted out of the event log. Re-list the
    /// state, then watch again from `current_revision`.
    #[error("{message}")]
    Gone {
        current_revision: u64,
        message: String,
    },
    /// Any other refusal of the server (413, 5xx…), with its status and body.
    #[error("server answered {status}: {}", .body.message)]
    Http { status: u16, body: ErrorBody },
    /// The request did not get an answer: connection refused, TLS failure, reset.
    /// Usually worth retrying.
    /// Its `source()` chain says why (connection refused, certificate invalid).
    #[error("cannot reach the server")]
    Transport(#[source] reqwest::Error),
    /// The server answered something that is not the expected JSON.
    #[error("unexpected answer to {what}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A live stream (log follow, watch) broke off and could not be resumed.
    #[error("the stream broke off: {0}")]
    Stream(String),
    /// The client was set up wrongly: a bad server URL, an unreadable config file.
    #[error("{0}")]
    Config(String),
    /// An argument refused before anything was sent (a malformed unit name, say).
    #[error("{0}")]
    Invalid(String),
    /// An RPC call answered with a JSON-RPC error: -32601 no such function, -32602 bad
    /// params (`data` says which), -32001 role too low, -32000 the function failed
    /// (for a script, `data` is its job: state, exit code, output).
    #[error("{message}{}", .data.as_ref().and_then(|d| d.as_str()).map(|d| format!(": {d}")).unwrap_or_default())]
    Rpc {
        code: i64,
        message: String,
        data: Option<serde_json::Value>,
    },
}

impl ClientError {
    /// Builds the error for a non-success answer from its status and body. A body that is
    /// not an [`ErrorBody`] (a proxy's HTML page) is kept as the message.
    pub fn from_answer(status: u16, body: &[u8]) -> ClientError {
        let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body).trim().to_string();
            ErrorBody {
                error: default_code(status).to_string(),
                message: if text.is_empty() {
                    format!("HTTP {status}")
                } else {
                    text
                },
                current_revision: None,
            }
        });
        ClientError::from_body(status, body)
    }

    /// Sorts an [`ErrorBody`] by its status into the variant a caller matches on.
    pub fn from_body(status: u16, body: ErrorBody) -> ClientError {
        match status {
            400 => ClientError::BadRequest(body),
            401 => ClientError::Unauthorized(body),
            403 => ClientError::Forbidden(body),
            404 => ClientError::NotFound(body),
            409 => ClientError::Conflict(body),
            410 => ClientError::Gone {
                current_revision: body.current_revision.unwrap_or(0),
                message: body.message,
            },
            _ => ClientError::Http { status, body },
        }
    }

    /// An error sent inside a stream (an SSE `error` message), sorted by its code.
    pub(crate) fn from_stream_body(body: ErrorBody) -> ClientError {
        let status = match body.error.as_str() {
            "bad_request" => 400,
            "unauthorized" => 401,
            "forbidden" => 403,
            "not_found" => 404,
            "conflict" => 409,
            "gone" => 410,
            _ => 500,
        };
        ClientError::from_body(status, body)
    }

    /// The HTTP status of a refusal; `None` when there was no answer at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::BadRequest(_) => Some(400),
            ClientError::Unauthorized(_) => Some(401),
            ClientError::Forbidden(_) => Some(403),
            ClientError::NotFound(_) => Some(404),
            ClientError::Conflict(_) => Some(409),
            ClientError::Gone { .. } => Some(410),
            ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's machine-readable error code (`not_found`, `gone`…), if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::BadRequest(b)
            | ClientError::Unauthorized(b)
            | ClientError::Forbidden(b)
            | ClientError::NotFound(b)
            | ClientError::Conflict(b)
            | ClientError::Http { body: b, .. } => Some(&b.error),
            ClientError::Gone { .. } => Some("gone"),
            _ => None,
        }
    }

    /// True for a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound(_))
    }

    /// True when the same call may succeed if tried again later (no answer, or a 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Stream(_) => true,
            ClientError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(error: reqwest::Error) -> Self {
        ClientError::Transport(error)
    }
}

fn default_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        410 => "gone",
        413 => "payload_too_large",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_bodies_are_sorted_by_status() {
        let body = br#"{"error":"not_found","message":"no script named 'x'"}"#;
        let error = ClientError::from_answer(404, body);
        assert!(error.is_not_found());
        assert_eq!(error.to_string(), "no script named 'x'");

        let gone =
            br#"{"error":"gone","message":"revision 3 was compacted","current_revision":42}"#;
        match ClientError::from_answer(410, gone) {
            ClientError::Gone {
                current_revision, ..
            } => assert_eq!(current_revision, 42),
            other => panic!("expected Gone, got {other:?}"),
        }
    }

    #[test]
    fn a_body_that_is_not_json_becomes_the_message() {
        let error = ClientError::from_answer(502, b"<html>Bad Gateway</html>");
        assert_eq!(error.status(), Some(502));
        assert_eq!(error.code(), Some("internal"));
        assert!(error.is_retryable());
        assert!(error.to_string().contains("Bad Gateway"));
        let empty = ClientError::from_answer(401, b"");
        assert!(matches!(empty, ClientError::Unauthorized(_)));
        assert_eq!(empty.to_string(), "HTTP 401");
    }

    #[test]
    fn stream_errors_are_sorted_by_code() {
        let body = ErrorBody {
            error: "gone".into(),
            message: "compacted".into(),
            current_revision: Some(7),
        };
        assert!(matches!(
            ClientError::from_stream_body(body),
            ClientError::Gone {
                current_revision: 7,
                ..
            }
        ));
    }
}
