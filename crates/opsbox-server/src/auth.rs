//! Who is calling: turns the `Authorization` header into an [`Identity`] from the one
//! identity store. While no user or token exists, the server is open (it then listens
//! on loopback only, unless started with `--insecure`) and callers act as admin; once
//! one exists, every request must authenticate.
//!
//! Faces differ only in how they answer a refusal (the native API with a JSON body,
//! Jojo with an empty 401), so this module returns a [`Refusal`] and each face renders it.

use axum::http::HeaderMap;
use base64::Engine;
use opsbox_api::Role;
use opsbox_core::identities::{Credentials, Identity};
use opsbox_core::{Core, CoreError};

/// The caller of a request, as handlers see it.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl Caller {
    pub fn require(&self, role: Role) -> Result<(), CoreError> {
        self.0.require(role)
    }

    /// The name recorded on what the caller submits.
    pub fn name(&self) -> Option<String> {
        (self.0.name != ANONYMOUS).then(|| self.0.name.clone())
    }
}

/// Name of the caller while auth is off.
pub const ANONYMOUS: &str = "anonymous";

/// Why a request was not let in.
#[derive(Debug)]
pub enum Refusal {
    /// No credentials, wrong ones, or a malformed header: 401.
    Unauthenticated,
    /// The store failed: 500.
    Internal(CoreError),
}

/// Middleware of the native API: authenticates every request before its handler runs
/// and hands the [`Caller`] on; refusals are native JSON errors.
pub async fn require_caller(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match authenticate(&state.core, request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(Refusal::Unauthenticated) if credentials(request.headers()).is_some() => {
            crate::error::ApiError::bad_credentials().into_response()
        }
        Err(Refusal::Unauthenticated) => crate::error::ApiError::unauthorized().into_response(),
        Err(Refusal::Internal(e)) => crate::error::ApiError::from(e).into_response(),
    }
}

/// Authenticates a request; one that carries no credentials at all gets the
/// `anonymous` identity with `role` when a face's policy gives one (for clients that
/// cannot send credentials: py-jrpc's, Disco's). Wrong credentials are still refused.
pub async fn authenticate_or_anonymous(
    core: &Core,
    headers: &HeaderMap,
    anonymous: Option<Role>,
) -> Result<Caller, Refusal> {
    match authenticate(core, headers).await {
        Err(Refusal::Unauthenticated) => match anonymous {
            Some(role) if credentials(headers).is_none() => Ok(Caller(Identity {
                name: ANONYMOUS.into(),
                role,
                nodes: Vec::new(),
            })),
            _ => Err(Refusal::Unauthenticated),
        },
        other => other,
    }
}

/// Reads `Authorization: Basic …` or `Authorization: Bearer …`.
pub fn credentials(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    match scheme {
        s if s.eq_ignore_ascii_case("basic") => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            // The first colon separates: passwords may contain more (Pyjojo's bug).
            let (user, password) = text.split_once(':')?;
            Some(Credentials::Password {
                user: user.to_owned(),
                password: password.to_owned(),
            })
        }
        s if s.eq_ignore_ascii_case("bearer") => Some(Credentials::Token(rest.trim().to_owned())),
        _ => None,
    }
}

/// Authenticates a request's headers. While auth is off, any `Authorization` header is
/// ignored (as Pyjojo did), so clients configured with credentials still work.
pub async fn authenticate(core: &Core, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let required = core
        .identities
        .auth_required()
        .await
        .map_err(Refusal::Internal)?;
    if !required {
        return Ok(Caller(Identity {
            name: ANONYMOUS.into(),
            role: Role::Admin,
            nodes: Vec::new(),
        }));
    }
    let credentials = credentials(headers).ok_or(Refusal::Unauthenticated)?;
    match core.identities.authenticate(&credentials).await {
        Ok(identity) => Ok(Caller(identity)),
        Err(CoreError::Unauthenticated) => Err(Refusal::Unauthenticated),
        Err(e) => Err(Refusal::Internal(e)),
    }
}
