//! The faces: each turns one wire protocol into calls of the core services.
//! - [`native`]: opsbox's own `/v1` API.

pub mod native;
