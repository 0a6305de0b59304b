//! Errors of the core services, in the caller's terms. Faces map each to their own
//! status codes and bodies.

use opsbox_api::JobState;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("no script named '{0}'")]
    UnknownScript(String),
    #[error("no job named '{0}'")]
    UnknownJob(String),
    /// The request itself is wrong (unknown or missing param, bad value...).
    #[error("{0}")]
    Invalid(String),
    #[error("job '{name}' is still {state}; kill it first")]
    JobActive { name: String, state: JobState },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    /// Events after `since` were compacted away.
    #[error("revision {since} is no longer kept; re-list from revision {current}")]
    Gone { since: u64, current: u64 },
    #[error("missing or invalid credentials")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("cannot {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => CoreError::Conflict(what),
            StoreError::NotFound(what) => CoreError::NotFound(what),
            other => CoreError::Store(other),
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;
