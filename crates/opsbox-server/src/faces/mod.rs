//! The faces: each turns one wire protocol into calls of the core services.
//! - [`native`]: opsbox's own `/v1` API;
//! - [`jojo`]: Pyjojo's script API, for PyMoJo and friends.

pub mod jojo;
pub mod native;
pub mod pyjson;
