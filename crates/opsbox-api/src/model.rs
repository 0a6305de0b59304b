//! Wire types of the model: applications deployed from charms, their units on machines,
//! relations between them, and the charms themselves (`/v1/model`, `opsbox model`).
//!
//! The same records travel on the event log (`model.<kind>.change|remove`, whole
//! entity in `data`), so a watcher never has to ask for the rest of an entity.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether an entity is alive or on its way out (`destroy` of a unit with a stop hook
/// still to run, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Life {
    #[default]
    Alive,
    Dying,
    Dead,
}

/// Where a unit is in its life. `installing` and `stopping` are opsbox's finer words;
/// faces that know only Juju's words map them (see the Juju face).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnitStatus {
    #[default]
    Pending,
    Installing,
    Installed,
    Started,
    Stopping,
    Stopped,
    Error,
}

impl UnitStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Pending => "pending",
            UnitStatus::Installing => "installing",
            UnitStatus::Installed => "installed",
            UnitStatus::Started => "started",
            UnitStatus::Stopping => "stopping",
            UnitStatus::Stopped => "stopped",
            UnitStatus::Error => "error",
        }
    }
}

/// An application (Juju's "service"): a charm deployed under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Application {
    pub name: String,
    /// The charm URL as the user gave it (`cs:precise/wordpress`).
    pub charm_url: String,
    /// The charm's name from its metadata (the local charm the URL resolved to).
    pub charm: String,
    /// Options set explicitly; the charm's defaults fill the rest.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Constraints (`cpu-cores`, `mem`, `arch`, `tags`...), as given.
    #[serde(default)]
    pub constraints: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub exposed: bool,
    #[serde(default)]
    pub life: Life,
    #[serde(default)]
    pub min_units: u32,
    /// Who deployed it.
    #[serde(default)]
    pub owner: String,
    pub created_at: DateTime<Utc>,
}

/// One instance of an application, `app/N`, on a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Unit {
    /// `app/N`; N is never reused within the model.
    pub name: String,
    pub application: String,
    pub machine: String,
    /// The node the unit's hooks run on.
    pub node: String,
    pub charm_url: String,
    pub status: UnitStatus,
    /// Why, for `error` (`hook failed: "install"`), or what runs now.
    #[serde(default)]
    pub status_info: String,
    #[serde(default)]
    pub life: Life,
    /// Opened ports, like `80/tcp`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// The hook that failed, kept so that `resolved --retry` can run it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_hook: Option<String>,
    /// The job of the hook that ran last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hook_job: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The unit's node is gone (disconnected, or lost after its heartbeats stopped):
    /// nothing can be heard from the unit, whatever its `status` last was. Juju shows
    /// such a unit `down`, its agent `lost`. Worked out from the nodes when the model
    /// reports (status, watch), never stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_lost: bool,
}

/// A machine units live on; machine `0` is the server itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: String,
    /// The opsbox node behind it.
    pub node: String,
    /// `pending`, `started`, `stopped`, `error` or `down` (its node is gone, see
    /// `agent_lost`).
    pub status: String,
    pub series: String,
    #[serde(default)]
    pub life: Life,
    /// `JobManageEnviron` for machine 0, `JobHostUnits` for the others.
    pub jobs: Vec<String>,
    #[serde(default)]
    pub constraints: BTreeMap<String, serde_json::Value>,
    /// The machine's node is gone (disconnected, or lost after its heartbeats
    /// stopped); its `status` then reads `down`. Worked out from the nodes when the
    /// model reports (status, watch), never stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_lost: bool,
}

/// The role an endpoint plays in a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Provider,
    Requirer,
    Peer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::Requirer => "requirer",
            Role::Peer => "peer",
        }
    }
}

/// One side of a relation: an application's named relation of a charm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    pub application: String,
    /// The relation name in the charm (`db`, `website`).
    pub name: String,
    pub role: Role,
    pub interface: String,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub limit: u32,
    /// `global` or `container`.
    pub scope: String,
}

/// A relation between two applications (or a peer relation of one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Relation {
    /// Unique within the model, never reused.
    pub id: u64,
    /// `blog:db db:db`: requirer first, then provider, then peer.
    pub key: String,
    pub interface: String,
    pub scope: String,
    pub endpoints: Vec<Endpoint>,
    /// What each unit has set in the relation (`relation-set` lines of its hooks).
    #[serde(default)]
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub life: Life,
}

/// A relation a charm declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CharmRelation {
    pub interface: String,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub limit: u32,
    #[serde(default = "global")]
    pub scope: String,
}

fn global() -> String {
    "global".into()
}

/// A config option a charm declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigOption {
    /// `string`, `int`, `float` or `boolean`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

/// A charm of the charms directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Charm {
    pub name: String,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub description: String,
    /// Revision from the charm's `revision` file (0 without one).
    #[serde(default)]
    pub revision: u32,
    #[serde(default)]
    pub series: Vec<String>,
    #[serde(default)]
    pub provides: BTreeMap<String, CharmRelation>,
    #[serde(default)]
    pub requires: BTreeMap<String, CharmRelation>,
    #[serde(default)]
    pub peers: BTreeMap<String, CharmRelation>,
    #[serde(default)]
    pub config: BTreeMap<String, ConfigOption>,
    /// Hooks present in its `hooks/` directory.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Actions from `actions.yaml`, each an executable in `actions/`.
    #[serde(default)]
    pub actions: BTreeMap<String, ActionSpec>,
}

/// An action a charm offers (`actions.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionSpec {
    #[serde(default)]
    pub description: String,
    /// Its parameters, as JSON-schema properties (`{"file": {"type": "string"}}`).
    #[serde(default)]
    pub params: serde_json::Value,
}

/// Everything in the model at one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct ModelStatus {
    pub name: String,
    pub uuid: String,
    pub applications: Vec<Application>,
    pub units: Vec<Unit>,
    pub machines: Vec<Machine>,
    pub relations: Vec<Relation>,
    /// The event-log revision this status is as of: watch from here for what follows.
    pub revision: u64,
}

/// `POST /v1/model/applications`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeployRequest {
    pub name: String,
    /// `cs:series/name[-rev]`, `local:series/name` or a bare charm name.
    pub charm: String,
    #[serde(default = "one")]
    pub num_units: u32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub constraints: BTreeMap<String, serde_json::Value>,
    /// Put the units on this machine (`0`) instead of new ones.
    #[serde(default)]
    pub to: Option<String>,
}

fn one() -> u32 {
    1
}

/// `POST /v1/model/relations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RelateRequest {
    /// Two endpoints, each `app` or `app:relation`.
    pub endpoints: Vec<String>,
}

/// `POST /v1/model/applications/{app}/units`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AddUnitsRequest {
    #[serde(default = "one")]
    pub num_units: u32,
    #[serde(default)]
    pub to: Option<String>,
}

/// Names of units just added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnitNames {
    pub units: Vec<String>,
}

/// `PATCH /v1/model/applications/{app}/config`: values to set and keys to reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct ConfigChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// One option of an application's effective config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigValue {
    #[serde(rename = "type")]
    pub kind: String,
    pub description: String,
    /// Absent when the option has no default and is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// Whether the value is the charm's default.
    pub default: bool,
}

/// `GET /v1/model/applications/{app}/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApplicationConfig {
    pub application: String,
    pub charm: String,
    pub config: BTreeMap<String, ConfigValue>,
    pub constraints: BTreeMap<String, serde_json::Value>,
}
