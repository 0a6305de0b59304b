//! The faces: each turns one wire protocol into calls of the core services.
//! - [`native`]: opsbox's own `/v1` API;
//! - [`nodes`]: nodes, fan-out jobs and the agents' WebSocket (`/v1/nodes`, `/v1/agent`);
//! - [`queues`]: the native message queue API (`/v1/queues`, `/v1/messages`);
//! - [`scirocco`]: scirocco-server's queue API, both client generations;
//! - [`disco`]: the Disco master's `/disco/...` API, for discoapi-style callers;
//! - [`jojo`]: Pyjojo's script API, for PyMoJo and friends;
//! - [`jsonrpc`]: JSON-RPC 2.0 over HTTP and WebSocket at `/rpc`;
//! - [`jrpc`]: py-jrpc's `POST /` and `GET /{name}`, for SimpleTCPClient and curl;
//! - [`model`]: the model in the native API (`/v1/model`);
//! - [`backups`]: copies of the whole store (`/v1/backups`);
//! - [`juju`]: Juju's API WebSocket (`GET /` with an upgrade), for jujuclient.

pub mod backups;
pub mod disco;
pub mod jojo;
pub mod jrpc;
pub mod jsonrpc;
pub mod juju;
pub mod model;
pub mod native;
pub mod nodes;
pub mod pyjson;
pub mod queues;
pub mod scirocco;
