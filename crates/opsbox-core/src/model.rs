//! The model: applications deployed from charms, their units on machines, relations
//! between applications, and the hooks that make units real on their nodes.
//!
//! [`Model`] owns the rules (names, config against the charm's schema, constraints,
//! relation endpoints, unit numbers never reused) and the life of units: each unit has
//! a *uniter*, a task that runs the unit's hooks one at a time as jobs on the unit's
//! node (install, config-changed, start, relation hooks, stop) and moves its status
//! along. Every change is one store transaction with its `model.<kind>.<change|remove>`
//! events, which carry the whole entity; [`ModelWatcher`] turns them into the
//! snapshot-then-changes stream that Juju's AllWatcher serves.
//!
//! The model is kept in memory behind one lock and written through to the store, so
//! reads are cheap and every change is checked against a consistent whole. (With
//! several servers on one database, the model must be re-read under a database lock
//! instead: see the scale-out notes.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use chrono::Utc;
use opsbox_api::model::{
    AddUnitsRequest, Application, ApplicationConfig, Charm, CharmRelation, ConfigChange,
    ConfigValue, DeployRequest, Endpoint, Life, Machine, ModelStatus, Relation, Role, Unit,
    UnitStatus,
};
use opsbox_api::{Job, JobState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::charms::Charms;
use crate::error::{CoreError, CoreResult};
use crate::jobs::Jobs;
use crate::nodes::{Nodes, Program};
use crate::store::{EventsSince, ModelDoc, ModelWrite, NewEvent, Store};

/// Constraint keys Juju knows; the numeric ones are unsigned integers, sizes in
/// megabytes.
const CONSTRAINTS: &[&str] = &[
    "arch",
    "container",
    "cpu-cores",
    "cpu-power",
    "mem",
    "root-disk",
    "tags",
    "instance-type",
    "networks",
    "spaces",
    "virt-type",
];
const COUNT_CONSTRAINTS: &[&str] = &["cpu-cores", "cpu-power"];
/// Given as comma-separated text or a list of strings.
const LIST_CONSTRAINTS: &[&str] = &["tags", "networks", "spaces"];
/// The architectures and container types Juju knows.
const ARCHES: &[&str] = &["amd64", "arm64", "armhf", "i386", "ppc64el", "s390x"];
const CONTAINERS: &[&str] = &["kvm", "lxc", "lxd", "none"];
/// Given as `4G`, `1.5T`... and kept in megabytes, as Juju does.
const SIZE_CONSTRAINTS: &[&str] = &["mem", "root-disk"];

/// Units one request may add: each is a machine, a uniter and a few jobs.
pub const MAX_UNITS_PER_REQUEST: u32 = 1000;

/// Settings of the model service.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub charms_dir: PathBuf,
    /// Charms added over the API (Juju's `POST /charms`), in the data directory.
    pub uploads_dir: PathBuf,
    /// The model's name (Juju's environment name).
    pub name: String,
    /// Series of machines and of charm URLs that name none.
    pub default_series: String,
    /// A hook running longer is killed and the unit goes to `error`.
    pub hook_timeout: Duration,
}

impl ModelConfig {
    pub fn new(charms_dir: PathBuf, uploads_dir: PathBuf) -> Self {
        ModelConfig {
            charms_dir,
            uploads_dir,
            name: "opsbox".into(),
            default_series: "trusty".into(),
            hook_timeout: Duration::from_secs(300),
        }
    }
}

/// The model service; cheap to clone.
#[derive(Clone)]
pub struct Model {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    nodes: Nodes,
    jobs: Jobs,
    charms: Charms,
    config: ModelConfig,
    uuid: String,
    state: tokio::sync::Mutex<State>,
    /// The wake-up of each running uniter.
    uniters: StdMutex<HashMap<String, Arc<Notify>>>,
    /// Set by [`Model::shutdown`]: hooks cut short by the server stopping stay queued.
    stopping: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Default)]
struct State {
    apps: BTreeMap<String, Application>,
    units: BTreeMap<String, Unit>,
    machines: BTreeMap<String, Machine>,
    relations: BTreeMap<u64, Relation>,
    /// Each unit's hooks still to run, the next first. Stored (kind `hooks`, no
    /// events), so that a restart loses none; a hook leaves the queue once it ran.
    hooks: BTreeMap<String, VecDeque<Hook>>,
    /// Annotations by entity tag (`service-blog`, `unit-blog-0`, `machine-1`...).
    annotations: BTreeMap<String, BTreeMap<String, String>>,
    sequences: BTreeMap<String, u64>,
    /// The event-log revision of the last model change.
    revision: u64,
}

/// The hooks a uniter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum HookKind {
    Install,
    ConfigChanged,
    Start,
    Stop,
    Joined,
    Changed,
    Departed,
    Broken,
    /// The application moved to another revision of its charm.
    UpgradeCharm,
    /// Not a hook: the unit's end, once its stop hook ran.
    Remove,
}

impl HookKind {
    /// Whether the hook belongs to a unit's way out once it is destroyed: its departed
    /// and broken hooks, its stop hook and its removal.
    fn is_way_out(self) -> bool {
        matches!(
            self,
            HookKind::Departed | HookKind::Broken | HookKind::Stop | HookKind::Remove
        )
    }

    fn word(self) -> &'static str {
        match self {
            HookKind::Install => "install",
            HookKind::ConfigChanged => "config-changed",
            HookKind::Start => "start",
            HookKind::Stop => "stop",
            HookKind::Joined => "relation-joined",
            HookKind::Changed => "relation-changed",
            HookKind::Departed => "relation-departed",
            HookKind::Broken => "relation-broken",
            HookKind::UpgradeCharm => "upgrade-charm",
            HookKind::Remove => "remove",
        }
    }
}

/// The relation a relation hook is about, captured when it was queued (a departed or
/// broken hook runs after the relation is gone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RelationContext {
    id: u64,
    /// The unit's own endpoint name.
    name: String,
    remote_app: String,
    remote_unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Hook {
    kind: HookKind,
    relation: Option<RelationContext>,
}

impl Hook {
    fn plain(kind: HookKind) -> Self {
        Hook {
            kind,
            relation: None,
        }
    }

    /// The hook's file name: `db-relation-joined` for relation hooks.
    fn file(&self) -> String {
        match &self.relation {
            Some(r) => format!("{}-{}", r.name, self.kind.word()),
            None => self.kind.word().to_owned(),
        }
    }
}

/// What running one hook came to.
enum Outcome {
    Done,
    Failed,
    /// The server is stopping: the hook stays queued and the uniter ends.
    Interrupted,
    /// The unit is gone: the uniter ends.
    Gone,
}

/// A change being prepared: a copy of the state with the change applied, and what to
/// write and which hooks to queue once it is committed.
struct Change {
    state: State,
    write: ModelWrite,
    /// Units whose hook queue changed: stored and their uniters woken on commit.
    queues: BTreeSet<String>,
}

impl Change {
    fn new(state: &State) -> Self {
        Change {
            state: state.clone(),
            write: ModelWrite::default(),
            queues: BTreeSet::new(),
        }
    }

    fn record<T: Serialize>(&mut self, kind: &str, id: &str, value: &T) {
        let data = serde_json::to_value(value).unwrap_or_default();
        self.write.put.push(ModelDoc {
            kind: kind.into(),
            id: id.into(),
            data: data.clone(),
        });
        self.write
            .events
            .push(NewEvent::new(&format!("model.{kind}.change"), id, data));
    }

    fn forget<T: Serialize>(&mut self, kind: &str, id: &str, last: &T) {
        self.write.remove.push((kind.into(), id.into()));
        self.write.events.push(NewEvent::new(
            &format!("model.{kind}.remove"),
            id,
            serde_json::to_value(last).unwrap_or_default(),
        ));
    }

    fn put_app(&mut self, app: Application) {
        self.record("application", &app.name, &app);
        self.state.apps.insert(app.name.clone(), app);
    }

    fn put_unit(&mut self, unit: Unit) {
        self.record("unit", &unit.name, &unit);
        self.state.units.insert(unit.name.clone(), unit);
    }

    fn put_machine(&mut self, machine: Machine) {
        self.record("machine", &machine.id, &machine);
        self.state.machines.insert(machine.id.clone(), machine);
    }

    fn put_relation(&mut self, relation: Relation) {
        self.record("relation", &relation.id.to_string(), &relation);
        self.state.relations.insert(relation.id, relation);
    }

    // A removed entity is dead: its last record says so, as Juju's remove deltas do.

    fn remove_app(&mut self, name: &str) {
        if let Some(mut app) = self.state.apps.remove(name) {
            app.life = Life::Dead;
            self.forget("application", name, &app);
            self.forget_annotations(&format!("service-{name}"));
        }
    }

    fn remove_unit(&mut self, name: &str) {
        if let Some(mut unit) = self.state.units.remove(name) {
            unit.life = Life::Dead;
            self.forget("unit", name, &unit);
            self.forget_annotations(&unit_tag(name));
        }
    }

    fn remove_machine(&mut self, id: &str) {
        if let Some(mut machine) = self.state.machines.remove(id) {
            machine.life = Life::Dead;
            self.forget("machine", id, &machine);
            self.forget_annotations(&format!("machine-{id}"));
        }
    }

    /// Annotations go with their entity (a new one of the same name starts bare).
    fn forget_annotations(&mut self, tag: &str) {
        if let Some(pairs) = self.state.annotations.remove(tag) {
            self.forget(
                "annotation",
                tag,
                &serde_json::json!({ "tag": tag, "annotations": pairs }),
            );
        }
    }

    fn remove_relation(&mut self, id: u64) {
        if let Some(mut relation) = self.state.relations.remove(&id) {
            relation.life = Life::Dead;
            self.forget("relation", &id.to_string(), &relation);
        }
    }

    /// The next number of a sequence; numbers are never given out twice.
    fn next(&mut self, sequence: &str, first: u64) -> u64 {
        let next = self
            .state
            .sequences
            .entry(sequence.to_owned())
            .or_insert(first);
        let n = *next;
        *next += 1;
        self.write.sequences.insert(sequence.to_owned(), *next);
        n
    }

    fn hook(&mut self, unit: &str, hook: Hook) {
        self.state
            .hooks
            .entry(unit.to_owned())
            .or_default()
            .push_back(hook);
        self.queues.insert(unit.to_owned());
    }

    fn is_empty(&self) -> bool {
        self.write.put.is_empty()
            && self.write.remove.is_empty()
            && self.write.sequences.is_empty()
            && self.queues.is_empty()
    }
}

impl Model {
    /// Loads the model from the store, adds machine 0 (the server) if missing and
    /// restarts the uniters of units that were busy when the server stopped.
    pub async fn open(
        store: Arc<dyn Store>,
        nodes: Nodes,
        jobs: Jobs,
        config: ModelConfig,
    ) -> CoreResult<Model> {
        let data = store.load_model().await?;
        let mut state = State {
            revision: data.revision,
            sequences: data.sequences,
            ..State::default()
        };
        let mut uuid = None;
        for doc in data.docs {
            let corrupt = |e: serde_json::Error| {
                CoreError::Store(crate::store::StoreError::Corrupt(format!(
                    "model {} {}: {e}",
                    doc.kind, doc.id
                )))
            };
            match doc.kind.as_str() {
                "application" => {
                    let app: Application =
                        serde_json::from_value(doc.data.clone()).map_err(corrupt)?;
                    state.apps.insert(app.name.clone(), app);
                }
                "unit" => {
                    let unit: Unit = serde_json::from_value(doc.data.clone()).map_err(corrupt)?;
                    state.units.insert(unit.name.clone(), unit);
                }
                "machine" => {
                    let machine: Machine =
                        serde_json::from_value(doc.data.clone()).map_err(corrupt)?;
                    state.machines.insert(machine.id.clone(), machine);
                }
                "relation" => {
                    let relation: Relation =
                        serde_json::from_value(doc.data.clone()).map_err(corrupt)?;
                    state.relations.insert(relation.id, relation);
                }
                "annotation" => {
                    let pairs = serde_json::from_value(
                        doc.data.get("annotations").cloned().unwrap_or_default(),
                    )
                    .map_err(corrupt)?;
                    state.annotations.insert(doc.id.clone(), pairs);
                }
                "hooks" => {
                    let queue: VecDeque<Hook> =
                        serde_json::from_value(doc.data.clone()).map_err(corrupt)?;
                    state.hooks.insert(doc.id.clone(), queue);
                }
                "info" => {
                    uuid = doc
                        .data
                        .get("uuid")
                        .and_then(Value::as_str)
                        .map(String::from)
                }
                _ => {}
            }
        }
        let mut write = ModelWrite::default();
        let uuid = match uuid {
            Some(uuid) => uuid,
            None => {
                let uuid = new_uuid();
                write.put.push(ModelDoc {
                    kind: "info".into(),
                    id: "model".into(),
                    data: serde_json::json!({ "uuid": uuid }),
                });
                uuid
            }
        };
        let model = Model {
            inner: Arc::new(Inner {
                store,
                nodes,
                jobs,
                charms: Charms::new(&config.charms_dir, &config.uploads_dir),
                config,
                uuid,
                state: tokio::sync::Mutex::new(State::default()),
                uniters: StdMutex::new(HashMap::new()),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let mut change = Change {
            state,
            write,
            queues: BTreeSet::new(),
        };
        if !change.state.machines.contains_key("0") {
            // Machine 0 is part of a new model, like its uuid: stored, but not a change
            // on the event log (watchers see it in their first snapshot).
            let machine = Machine {
                id: "0".into(),
                node: model.inner.nodes.local_id().into(),
                status: "started".into(),
                series: model.inner.config.default_series.clone(),
                life: Life::Alive,
                jobs: vec!["JobManageEnviron".into()],
                constraints: BTreeMap::new(),
                agent_lost: false,
            };
            change.write.put.push(ModelDoc {
                kind: "machine".into(),
                id: "0".into(),
                data: serde_json::to_value(&machine).unwrap_or_default(),
            });
            change.state.machines.insert("0".into(), machine);
        }
        {
            let mut state = model.inner.state.lock().await;
            // The loaded model is the state even when there is nothing to write.
            *state = change.state.clone();
            model.commit(&mut state, change).await?;
            // Hooks queued when the server stopped run now; the one that was running
            // runs again (hooks run at least once, as Juju's do).
            for unit in state.hooks.keys() {
                model.wake(unit);
            }
        }
        Ok(model)
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn uuid(&self) -> &str {
        &self.inner.uuid
    }

    pub fn default_series(&self) -> &str {
        &self.inner.config.default_series
    }

    pub fn charms(&self) -> &Charms {
        &self.inner.charms
    }

    /// Writes a change and applies it: the state, then the hooks it queued.
    async fn commit(&self, state: &mut State, mut change: Change) -> CoreResult<()> {
        if change.is_empty() {
            return Ok(());
        }
        let queues = std::mem::take(&mut change.queues);
        let mut write = std::mem::take(&mut change.write);
        for unit in &queues {
            match change.state.hooks.get(unit).filter(|q| !q.is_empty()) {
                Some(queue) => write.put.push(ModelDoc {
                    kind: "hooks".into(),
                    id: unit.clone(),
                    data: serde_json::to_value(queue).unwrap_or_default(),
                }),
                None => {
                    change.state.hooks.remove(unit);
                    write.remove.push(("hooks".into(), unit.clone()));
                }
            }
        }
        if !(write.put.is_empty() && write.remove.is_empty() && write.sequences.is_empty()) {
            let events = self.inner.store.write_model(write).await?;
            if let Some(last) = events.last() {
                change.state.revision = last.rev;
            }
        }
        *state = change.state;
        for unit in &queues {
            if state.hooks.contains_key(unit) {
                self.wake(unit);
            }
        }
        Ok(())
    }

    /// Call before the server stops its jobs: a hook killed by the stop is not the
    /// hook's failure, so it stays first in its queue and runs again after the restart.
    pub fn shutdown(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tells a unit's uniter that there is work, starting it if needed.
    fn wake(&self, unit: &str) {
        let mut uniters = self.inner.uniters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = uniters.get(unit) {
            notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        uniters.insert(unit.to_owned(), notify.clone());
        tokio::spawn(self.clone().uniter(unit.to_owned(), notify));
    }

    // -----------------------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------------------

    /// Everything in the model now; units and machines whose node is gone are
    /// `agent_lost` (a machine's status then reads `down`).
    pub async fn status(&self) -> ModelStatus {
        let lost = self.lost_nodes().await;
        let state = self.inner.state.lock().await;
        let mut units = sorted_units(state.units.values().cloned().collect());
        for unit in &mut units {
            unit.agent_lost = lost.contains(&unit.node);
        }
        let mut machines = sorted_machines(state.machines.values().cloned().collect());
        for machine in &mut machines {
            mark_lost(machine, &lost);
        }
        ModelStatus {
            name: self.inner.config.name.clone(),
            uuid: self.inner.uuid.clone(),
            applications: state.apps.values().cloned().collect(),
            units,
            machines,
            relations: state.relations.values().cloned().collect(),
            revision: state.revision,
        }
    }

    /// The part of the model that `patterns` name, as Juju's `status PATTERN...` shows
    /// it (everything when there are none). A pattern names an application (`blog`),
    /// a unit (`blog/0`) or a machine (`1`), and may hold `*` and `?` wildcards
    /// (`blog/*`). Kept: the units named, all units of the applications named and of
    /// the machines named; the applications of those units and those named; the
    /// machines those units are on and those named; the relations of the applications
    /// kept.
    pub async fn status_matching(&self, patterns: &[String]) -> ModelStatus {
        let status = self.status().await;
        if patterns.is_empty() {
            return status;
        }
        filter_status(status, patterns)
    }

    /// The nodes of the model's machines that are gone: not connected (to this server
    /// or, with a shared store, another), or forgotten. The server's own node never is.
    async fn lost_nodes(&self) -> HashSet<String> {
        let connected: HashSet<String> = match self.inner.nodes.list().await {
            Ok(nodes) => nodes
                .into_iter()
                .filter(|n| n.connected)
                .map(|n| n.id)
                .collect(),
            Err(e) => {
                // Better no news than every unit reported down on a store hiccup.
                tracing::warn!(error = %e, "cannot list the nodes: units shown as last known");
                return HashSet::new();
            }
        };
        let local = self.inner.nodes.local_id();
        let state = self.inner.state.lock().await;
        state
            .machines
            .values()
            .map(|m| &m.node)
            .filter(|node| node.as_str() != local && !connected.contains(*node))
            .cloned()
            .collect()
    }

    pub async fn application(&self, name: &str) -> CoreResult<Application> {
        let state = self.inner.state.lock().await;
        app_of(&state, name).cloned()
    }

    pub async fn unit(&self, name: &str) -> CoreResult<Unit> {
        let state = self.inner.state.lock().await;
        state
            .units
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("unit \"{name}\"")))
    }

    /// The charm an application was deployed from.
    pub async fn charm_of(&self, application: &str) -> CoreResult<Charm> {
        let charm = self.application(application).await?.charm;
        self.inner.charms.get(&charm)
    }

    /// An application's effective config (defaults filled in) and constraints.
    pub async fn config(&self, application: &str) -> CoreResult<ApplicationConfig> {
        let app = self.application(application).await?;
        let charm = self.inner.charms.get(&app.charm)?;
        let config = charm
            .config
            .iter()
            .map(|(key, option)| {
                let set = app
                    .config
                    .get(key)
                    .and_then(|raw| typed(&option.kind, raw).ok());
                let value = set.clone().or_else(|| option.default.clone());
                (
                    key.clone(),
                    ConfigValue {
                        kind: option.kind.clone(),
                        description: option.description.clone(),
                        default: set.is_none() && value.is_some(),
                        value,
                    },
                )
            })
            .collect();
        Ok(ApplicationConfig {
            application: app.name,
            charm: charm.name,
            config,
            constraints: app.constraints,
        })
    }

    // -----------------------------------------------------------------------------------
    // Applications
    // -----------------------------------------------------------------------------------

    /// Deploys a charm under a name, with `num_units` units on new machines.
    pub async fn deploy(&self, request: DeployRequest, owner: &str) -> CoreResult<Application> {
        check_app_name(&request.name)?;
        check_unit_count(request.num_units)?;
        let charm = self.inner.charms.resolve(&request.charm)?;
        let config = check_config(&charm, &request.config, &BTreeMap::new())?;
        let constraints = normal_constraints(request.constraints.clone())?;
        let mut state = self.inner.state.lock().await;
        if state.apps.contains_key(&request.name) {
            return Err(CoreError::Conflict(format!(
                "cannot add application \"{}\": application",
                request.name
            )));
        }
        let app = Application {
            name: request.name.clone(),
            charm_url: request.charm.clone(),
            charm: charm.name.clone(),
            config,
            constraints,
            exposed: false,
            life: Life::Alive,
            min_units: 0,
            owner: owner.to_owned(),
            created_at: Utc::now(),
        };
        let mut change = Change::new(&state);
        change.put_app(app.clone());
        // Peer relations come with the application, before its units join them.
        for (name, relation) in &charm.peers {
            let endpoint = endpoint(&app.name, name, Role::Peer, relation);
            let id = change.next("relation", 0);
            change.put_relation(Relation {
                id,
                key: format!("{}:{}", app.name, name),
                interface: relation.interface.clone(),
                scope: relation.scope.clone(),
                endpoints: vec![endpoint],
                settings: BTreeMap::new(),
                life: Life::Alive,
            });
        }
        for _ in 0..request.num_units {
            self.add_unit(&mut change, &app, request.to.as_deref())
                .await?;
        }
        self.commit(&mut state, change).await?;
        Ok(app)
    }

    /// Adds units to an application; returns their names.
    pub async fn add_units(
        &self,
        application: &str,
        request: AddUnitsRequest,
    ) -> CoreResult<Vec<String>> {
        if request.num_units == 0 {
            return Err(CoreError::Invalid("must add at least one unit".into()));
        }
        check_unit_count(request.num_units)?;
        let mut state = self.inner.state.lock().await;
        let app = alive_app(&state, application)?.clone();
        let mut change = Change::new(&state);
        let mut names = Vec::new();
        for _ in 0..request.num_units {
            names.push(
                self.add_unit(&mut change, &app, request.to.as_deref())
                    .await?,
            );
        }
        self.commit(&mut state, change).await?;
        Ok(names)
    }

    /// A new unit of `app` on machine `to` or a new machine, with its hooks queued.
    async fn add_unit(
        &self,
        change: &mut Change,
        app: &Application,
        to: Option<&str>,
    ) -> CoreResult<String> {
        let machine = match to.filter(|t| !t.is_empty()) {
            Some(id) => {
                let machine = change
                    .state
                    .machines
                    .get(id)
                    .filter(|m| m.life == Life::Alive)
                    .ok_or_else(|| CoreError::NotFound(format!("machine {id}")))?;
                machine.clone()
            }
            None => self.new_machine(change, &app.constraints).await?,
        };
        let number = change.next(&format!("unit:{}", app.name), 0);
        let name = format!("{}/{number}", app.name);
        change.put_unit(Unit {
            name: name.clone(),
            application: app.name.clone(),
            machine: machine.id.clone(),
            node: machine.node.clone(),
            charm_url: app.charm_url.clone(),
            status: UnitStatus::Pending,
            status_info: String::new(),
            life: Life::Alive,
            ports: Vec::new(),
            failed_hook: None,
            last_hook_job: None,
            created_at: Utc::now(),
            agent_lost: false,
        });
        for kind in [HookKind::Install, HookKind::ConfigChanged, HookKind::Start] {
            change.hook(&name, Hook::plain(kind));
        }
        // The new unit joins the application's relations, and their units meet it.
        let relations = relations_of(&change.state, &app.name);
        for relation in relations {
            self.join(change, &relation, &name);
        }
        Ok(name)
    }

    /// Queues the joined and changed hooks between `unit` and every alive unit on the
    /// other side of `relation`.
    fn join(&self, change: &mut Change, relation: &Relation, unit: &str) {
        let Some(app) = unit.split('/').next() else {
            return;
        };
        let Some((local, remote_endpoint)) = sides(relation, app) else {
            return;
        };
        let remotes: Vec<String> = alive_units(&change.state, &remote_endpoint.application)
            .into_iter()
            .filter(|u| u != unit)
            .collect();
        for remote in remotes {
            for kind in [HookKind::Joined, HookKind::Changed] {
                change.hook(
                    unit,
                    relation_hook(kind, relation.id, local, remote_endpoint, Some(&remote)),
                );
                change.hook(
                    &remote,
                    relation_hook(kind, relation.id, remote_endpoint, local, Some(unit)),
                );
            }
        }
    }

    /// A new machine on the least busy connected node that has the `tags` constraint's
    /// labels (the server's own node when none is connected).
    async fn new_machine(
        &self,
        change: &mut Change,
        constraints: &BTreeMap<String, Value>,
    ) -> CoreResult<Machine> {
        let tags: Vec<String> = match constraints.get("tags") {
            Some(Value::String(s)) => s
                .split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let nodes = self.inner.nodes.list().await?;
        let mut candidates: Vec<(usize, String)> = nodes
            .iter()
            .filter(|n| n.connected && !n.blacklisted && n.slots > 0)
            .filter(|n| tags.iter().all(|t| n.labels.contains(t)))
            .map(|n| {
                let load = change
                    .state
                    .machines
                    .values()
                    .filter(|m| m.node == n.id && m.id != "0")
                    .count();
                (load, n.id.clone())
            })
            .collect();
        candidates.sort();
        let node = match candidates.into_iter().next() {
            Some((_, node)) => node,
            None if tags.is_empty() => self.inner.nodes.local_id().to_owned(),
            None => {
                return Err(CoreError::Invalid(format!(
                    "no connected node has the labels {} (constraint tags): see opsbox nodes list",
                    tags.join(",")
                )))
            }
        };
        let id = change.next("machine", 1).to_string();
        let machine = Machine {
            id,
            node,
            status: "pending".into(),
            series: self.inner.config.default_series.clone(),
            life: Life::Alive,
            jobs: vec!["JobHostUnits".into()],
            constraints: constraints.clone(),
            agent_lost: false,
        };
        change.put_machine(machine.clone());
        Ok(machine)
    }

    /// Destroys an application: its units stop and go, then it and its relations.
    pub async fn destroy_application(&self, name: &str) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let mut app = app_of(&state, name)?.clone();
        if app.life != Life::Alive {
            return Ok(());
        }
        let mut change = Change::new(&state);
        app.life = Life::Dying;
        change.put_app(app);
        let units = alive_units(&change.state, name);
        if units.is_empty() {
            self.finish_application(&mut change, name);
        }
        for unit in units {
            self.destroy_unit(&mut change, &unit);
        }
        self.commit(&mut state, change).await
    }

    /// Removes a dying application with no units left, with its relations.
    fn finish_application(&self, change: &mut Change, name: &str) {
        let relations = relations_of(&change.state, name);
        for relation in relations {
            // The other side learns that the relation is gone.
            for endpoint in relation.endpoints.iter().filter(|e| e.application != name) {
                let Some((endpoint, remote)) = sides(&relation, &endpoint.application) else {
                    continue;
                };
                for unit in alive_units(&change.state, &endpoint.application) {
                    change.hook(
                        &unit,
                        relation_hook(HookKind::Broken, relation.id, endpoint, remote, None),
                    );
                }
            }
            change.remove_relation(relation.id);
        }
        change.remove_app(name);
    }

    pub async fn expose(&self, name: &str, exposed: bool) -> CoreResult<()> {
        self.update_app(name, |app| app.exposed = exposed).await
    }

    /// Changes an alive application; writes (and tells watchers) only if it changed.
    async fn update_app(&self, name: &str, edit: impl FnOnce(&mut Application)) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let mut app = alive_app(&state, name)?.clone();
        edit(&mut app);
        if state.apps.get(name) == Some(&app) {
            return Ok(());
        }
        let mut change = Change::new(&state);
        change.put_app(app);
        self.commit(&mut state, change).await
    }

    /// Sets and resets config options; units run config-changed when anything changed.
    pub async fn set_config(&self, name: &str, config: ConfigChange) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let mut app = alive_app(&state, name)?.clone();
        let charm = self.inner.charms.get(&app.charm)?;
        for key in &config.unset {
            if !charm.config.contains_key(key) {
                return Err(unknown_option(key, &charm));
            }
        }
        let mut merged = app.config.clone();
        for key in &config.unset {
            merged.remove(key);
        }
        merged = check_config(&charm, &config.set, &merged)?;
        if merged == app.config {
            return Ok(());
        }
        app.config = merged;
        let mut change = Change::new(&state);
        change.put_app(app);
        for unit in alive_units(&change.state, name) {
            change.hook(&unit, Hook::plain(HookKind::ConfigChanged));
        }
        self.commit(&mut state, change).await
    }

    pub async fn set_constraints(
        &self,
        name: &str,
        constraints: BTreeMap<String, Value>,
    ) -> CoreResult<()> {
        let constraints = normal_constraints(constraints)?;
        self.update_app(name, |app| app.constraints = constraints)
            .await
    }

    /// Sets how many units an application keeps at least (Juju's MinUnits): it gets
    /// new units at once up to that number, and a new one whenever a destroy leaves
    /// fewer alive, as Juju's min-units worker does.
    pub async fn set_min_units(&self, name: &str, min_units: u32) -> CoreResult<()> {
        check_unit_count(min_units)?;
        let mut state = self.inner.state.lock().await;
        let mut app = alive_app(&state, name)?.clone();
        if app.min_units == min_units {
            return Ok(());
        }
        app.min_units = min_units;
        let mut change = Change::new(&state);
        change.put_app(app);
        self.ensure_min_units(&mut change, name).await?;
        self.commit(&mut state, change).await
    }

    /// Adds units to an alive application until it has its minimum alive.
    async fn ensure_min_units(&self, change: &mut Change, name: &str) -> CoreResult<()> {
        let Some(app) = change
            .state
            .apps
            .get(name)
            .filter(|a| a.life == Life::Alive)
            .cloned()
        else {
            return Ok(());
        };
        let alive = alive_units(&change.state, name).len();
        for _ in alive..app.min_units as usize {
            self.add_unit(change, &app, None).await?;
        }
        Ok(())
    }

    /// Switches an application to another URL of its charm; each of its units runs
    /// upgrade-charm then config-changed, on its node, as Juju's do. The URL it
    /// already has changes nothing.
    pub async fn set_charm(&self, name: &str, url: &str) -> CoreResult<()> {
        let charm = self.inner.charms.resolve(url)?;
        let mut state = self.inner.state.lock().await;
        let mut app = alive_app(&state, name)?.clone();
        if charm.name != app.charm {
            return Err(CoreError::Invalid(format!(
                "cannot upgrade \"{name}\" from charm \"{}\" to a different charm \"{}\"",
                app.charm, charm.name
            )));
        }
        if app.charm_url == url {
            return Ok(());
        }
        app.charm_url = url.to_owned();
        let mut change = Change::new(&state);
        change.put_app(app);
        for unit in alive_units(&change.state, name) {
            if let Some(mut u) = change.state.units.get(&unit).cloned() {
                u.charm_url = url.to_owned();
                change.put_unit(u);
            }
            change.hook(&unit, Hook::plain(HookKind::UpgradeCharm));
            change.hook(&unit, Hook::plain(HookKind::ConfigChanged));
        }
        self.commit(&mut state, change).await
    }

    // -----------------------------------------------------------------------------------
    // Units and machines
    // -----------------------------------------------------------------------------------

    /// Destroys units: each leaves its relations, runs its stop hook and goes. Units
    /// that do not exist are named in the error; the others are destroyed anyway.
    pub async fn destroy_units(&self, names: &[String]) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let mut change = Change::new(&state);
        let mut missing = Vec::new();
        let mut apps = BTreeSet::new();
        for name in names {
            match change.state.units.get(name) {
                Some(unit) if unit.life == Life::Alive => {
                    apps.insert(unit.application.clone());
                    self.destroy_unit(&mut change, name);
                }
                Some(_) => {}
                None => missing.push(format!("unit \"{name}\" does not exist")),
            }
        }
        for app in &apps {
            self.ensure_min_units(&mut change, app).await?;
        }
        let destroyed = missing.len() < names.len();
        self.commit(&mut state, change).await?;
        if missing.is_empty() {
            Ok(())
        } else if destroyed {
            Err(CoreError::Invalid(format!(
                "some units were not destroyed: {}",
                missing.join("; ")
            )))
        } else {
            Err(CoreError::Invalid(format!(
                "no units were destroyed: {}",
                missing.join("; ")
            )))
        }
    }

    /// Marks a unit dying and queues its way out: departed hooks on both sides of each
    /// relation, broken, stop, then its removal.
    fn destroy_unit(&self, change: &mut Change, name: &str) {
        let Some(mut unit) = change.state.units.get(name).cloned() else {
            return;
        };
        unit.life = Life::Dying;
        let app = unit.application.clone();
        change.put_unit(unit);
        let relations = relations_of(&change.state, &app);
        for relation in relations {
            let Some((local, remote)) = sides(&relation, &app) else {
                continue;
            };
            for other in alive_units(&change.state, &remote.application) {
                if other == name {
                    continue;
                }
                change.hook(
                    &other,
                    relation_hook(HookKind::Departed, relation.id, remote, local, Some(name)),
                );
                change.hook(
                    name,
                    relation_hook(HookKind::Departed, relation.id, local, remote, Some(&other)),
                );
            }
            change.hook(
                name,
                relation_hook(HookKind::Broken, relation.id, local, remote, None),
            );
        }
        change.hook(name, Hook::plain(HookKind::Stop));
        change.hook(name, Hook::plain(HookKind::Remove));
    }

    /// Takes a unit out of `error`: with `retry` the failed hook runs again, without it
    /// the unit goes on as if the hook had worked.
    pub async fn resolved(&self, name: &str, retry: bool) -> CoreResult<()> {
        let unit = self.unit(name).await?;
        if unit.status != UnitStatus::Error {
            return Err(CoreError::Invalid(format!(
                "unit \"{name}\" is not in an error state"
            )));
        }
        let mut state = self.inner.state.lock().await;
        let Some(mut unit) = state.units.get(name).cloned() else {
            return Err(CoreError::NotFound(format!("unit \"{name}\"")));
        };
        let mut change = Change::new(&state);
        let failed = change
            .state
            .hooks
            .get(name)
            .and_then(|q| q.front())
            .map(|h| h.kind);
        // Go on as if the failed hook had worked; but the removal step is the model's own
        // (it fails only when the store does) and skipping it would leave the unit dying
        // for ever, so it is always run again.
        if !retry && failed != Some(HookKind::Remove) {
            if let Some(queue) = change.state.hooks.get_mut(name) {
                queue.pop_front();
            }
        }
        // A dying unit is on its way out: it stops rather than starts again.
        let going_on = if unit.life == Life::Alive {
            UnitStatus::Started
        } else {
            UnitStatus::Stopping
        };
        unit.status = match (retry, failed) {
            (false, Some(kind)) => status_after(kind).unwrap_or(going_on),
            (true, Some(HookKind::Install)) => UnitStatus::Installing,
            _ => going_on,
        };
        unit.status_info.clear();
        unit.failed_hook = None;
        change.put_unit(unit);
        change.queues.insert(name.to_owned());
        self.commit(&mut state, change).await
    }

    /// Adds empty machines (on nodes chosen like a unit's).
    pub async fn add_machines(
        &self,
        constraints: Vec<BTreeMap<String, Value>>,
    ) -> CoreResult<Vec<String>> {
        let constraints = constraints
            .into_iter()
            .map(normal_constraints)
            .collect::<CoreResult<Vec<_>>>()?;
        let mut state = self.inner.state.lock().await;
        let mut change = Change::new(&state);
        let mut ids = Vec::new();
        for c in constraints {
            let mut machine = self.new_machine(&mut change, &c).await?;
            machine.status = "started".into();
            ids.push(machine.id.clone());
            change.put_machine(machine);
        }
        self.commit(&mut state, change).await?;
        Ok(ids)
    }

    /// Removes machines that host no units (not machine 0). A unit on the way out
    /// (dying, its stop hook still to run or failed) is still on its machine, as in
    /// Juju. With `force` the machine's units are destroyed and the machine goes with
    /// the last of them; it takes no new units meanwhile.
    pub async fn destroy_machines(&self, ids: &[String], force: bool) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let mut change = Change::new(&state);
        for id in ids {
            if id == "0" {
                return Err(CoreError::Invalid(
                    "machine 0 is the server itself and cannot be destroyed".into(),
                ));
            }
            let Some(mut machine) = change.state.machines.get(id).cloned() else {
                return Err(CoreError::NotFound(format!("machine {id}")));
            };
            let units: Vec<Unit> = sorted_units(
                change
                    .state
                    .units
                    .values()
                    .filter(|u| &u.machine == id)
                    .cloned()
                    .collect(),
            );
            if let (Some(unit), false) = (units.first(), force) {
                return Err(CoreError::Invalid(format!(
                    "machine {id} has unit \"{}\" assigned",
                    unit.name
                )));
            }
            if units.is_empty() {
                change.remove_machine(id);
                continue;
            }
            if machine.life == Life::Alive {
                machine.life = Life::Dying;
                change.put_machine(machine);
            }
            for unit in units.iter().filter(|u| u.life == Life::Alive) {
                self.destroy_unit(&mut change, &unit.name);
            }
            let apps: BTreeSet<String> = units.into_iter().map(|u| u.application).collect();
            for app in &apps {
                self.ensure_min_units(&mut change, app).await?;
            }
        }
        self.commit(&mut state, change).await
    }

    // -----------------------------------------------------------------------------------
    // Relations
    // -----------------------------------------------------------------------------------

    /// Relates two applications; each endpoint is `app` or `app:relation`. The pair of
    /// charm relations must be the only provider/requirer pair with one interface.
    pub async fn relate(&self, endpoints: &[String]) -> CoreResult<Relation> {
        let mut state = self.inner.state.lock().await;
        let (a, b) = self.infer(&state, endpoints)?;
        let key = relation_key(&[a.clone(), b.clone()]);
        if state.relations.values().any(|r| r.key == key) {
            return Err(CoreError::Conflict(format!(
                "cannot add relation \"{key}\": relation"
            )));
        }
        let mut change = Change::new(&state);
        let id = change.next("relation", 0);
        let mut ends = vec![a.clone(), b.clone()];
        ends.sort_by_key(|e| (role_rank(e.role), format!("{}:{}", e.application, e.name)));
        let relation = Relation {
            id,
            key,
            interface: a.interface.clone(),
            scope: a.scope.clone(),
            endpoints: ends,
            settings: BTreeMap::new(),
            life: Life::Alive,
        };
        change.put_relation(relation.clone());
        for unit in alive_units(&change.state, &a.application) {
            for remote in alive_units(&change.state, &b.application) {
                for kind in [HookKind::Joined, HookKind::Changed] {
                    change.hook(&unit, relation_hook(kind, id, &a, &b, Some(&remote)));
                    change.hook(&remote, relation_hook(kind, id, &b, &a, Some(&unit)));
                }
            }
        }
        self.commit(&mut state, change).await?;
        Ok(relation)
    }

    /// Removes the relation between two endpoints; units of both sides depart.
    pub async fn destroy_relation(&self, endpoints: &[String]) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let (a, b) = self.infer_existing(&state, endpoints)?;
        let key = relation_key(&[a.clone(), b.clone()]);
        let relation = state
            .relations
            .values()
            .find(|r| r.key == key)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("relation \"{key}\"")))?;
        let mut change = Change::new(&state);
        for (local, remote) in [(&a, &b), (&b, &a)] {
            for unit in alive_units(&change.state, &local.application) {
                for other in alive_units(&change.state, &remote.application) {
                    change.hook(
                        &unit,
                        relation_hook(HookKind::Departed, relation.id, local, remote, Some(&other)),
                    );
                }
                change.hook(
                    &unit,
                    relation_hook(HookKind::Broken, relation.id, local, remote, None),
                );
            }
        }
        change.remove_relation(relation.id);
        self.commit(&mut state, change).await
    }

    /// The relation names of an application's charm.
    pub async fn charm_relations(&self, application: &str) -> CoreResult<Vec<String>> {
        let charm = self.charm_of(application).await?;
        let mut names: Vec<String> = charm
            .provides
            .keys()
            .chain(charm.requires.keys())
            .chain(charm.peers.keys())
            .cloned()
            .collect();
        names.sort();
        Ok(names)
    }

    /// The two endpoints a pair of `app[:relation]` names can only mean.
    fn infer(&self, state: &State, names: &[String]) -> CoreResult<(Endpoint, Endpoint)> {
        let (first, second) = two(names)?;
        let candidates = |name: &str| -> CoreResult<Vec<Endpoint>> {
            let (app_name, relation) = match name.split_once(':') {
                Some((a, r)) => (a, Some(r)),
                None => (name, None),
            };
            let app = alive_app(state, app_name)?;
            let charm = self.inner.charms.get(&app.charm)?;
            let mut all = Vec::new();
            for (role, map) in [
                (Role::Provider, &charm.provides),
                (Role::Requirer, &charm.requires),
            ] {
                for (rel, meta) in map {
                    if relation.is_none_or(|r| r == rel) {
                        all.push(endpoint(app_name, rel, role, meta));
                    }
                }
            }
            if let (Some(r), true) = (relation, all.is_empty()) {
                return Err(CoreError::Invalid(format!(
                    "application \"{app_name}\" has no \"{r}\" relation"
                )));
            }
            Ok(all)
        };
        let left = candidates(first)?;
        let right = candidates(second)?;
        let mut pairs = Vec::new();
        for a in &left {
            for b in &right {
                let roles = matches!(
                    (a.role, b.role),
                    (Role::Provider, Role::Requirer) | (Role::Requirer, Role::Provider)
                );
                if roles && a.interface == b.interface && a.application != b.application {
                    pairs.push((a.clone(), b.clone()));
                }
            }
        }
        match pairs.len() {
            0 => Err(CoreError::Invalid(format!(
                "no relations found between \"{first}\" and \"{second}\": their charms share no interface with one side providing and the other requiring it"
            ))),
            1 => Ok(pairs.remove(0)),
            _ => Err(CoreError::Invalid(format!(
                "ambiguous relation: \"{first} {second}\" could refer to {}; name the relations as app:relation",
                pairs
                    .iter()
                    .map(|(a, b)| format!("\"{}\"", relation_key(&[a.clone(), b.clone()])))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    /// Like [`Self::infer`], but for relations that exist (their applications may be
    /// dying).
    fn infer_existing(&self, state: &State, names: &[String]) -> CoreResult<(Endpoint, Endpoint)> {
        let (first, second) = two(names)?;
        let matches = |name: &str, e: &Endpoint| match name.split_once(':') {
            Some((a, r)) => e.application == a && e.name == r,
            None => e.application == name,
        };
        for relation in state.relations.values() {
            if let [a, b] = relation.endpoints.as_slice() {
                if matches(first, a) && matches(second, b)
                    || matches(first, b) && matches(second, a)
                {
                    return Ok((a.clone(), b.clone()));
                }
            }
        }
        for name in [first, second] {
            let app = name.split(':').next().unwrap_or(name);
            app_of(state, app)?;
        }
        Err(CoreError::NotFound(format!(
            "relation between \"{first}\" and \"{second}\""
        )))
    }

    // -----------------------------------------------------------------------------------
    // Annotations
    // -----------------------------------------------------------------------------------

    /// The annotations of an entity (by tag: `service-blog`, `unit-blog-0` or
    /// `unit-blog/0`, `machine-1`, `environment-<uuid>`, `charm-<url>`), which must
    /// exist.
    pub async fn annotations(&self, tag: &str) -> CoreResult<BTreeMap<String, String>> {
        let state = self.inner.state.lock().await;
        let tag = self.entity_tag(&state, tag)?;
        Ok(state.annotations.get(&tag).cloned().unwrap_or_default())
    }

    /// Sets annotations of an entity, which must exist; an empty value removes the
    /// key. They go with the entity.
    pub async fn set_annotations(
        &self,
        tag: &str,
        pairs: BTreeMap<String, String>,
    ) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let tag = self.entity_tag(&state, tag)?;
        let tag = tag.as_str();
        let mut current = state.annotations.get(tag).cloned().unwrap_or_default();
        for (key, value) in pairs {
            if value.is_empty() {
                current.remove(&key);
            } else {
                current.insert(key, value);
            }
        }
        if state.annotations.get(tag).cloned().unwrap_or_default() == current {
            return Ok(());
        }
        let mut change = Change::new(&state);
        change.record(
            "annotation",
            tag,
            &serde_json::json!({ "tag": tag, "annotations": current }),
        );
        change.state.annotations.insert(tag.to_owned(), current);
        self.commit(&mut state, change).await
    }

    /// The tag an existing entity's annotations are kept under (`unit-blog-0` for
    /// `unit-blog/0` too), or Juju's not-found error for an entity there is not.
    fn entity_tag(&self, state: &State, tag: &str) -> CoreResult<String> {
        let invalid = || {
            CoreError::Invalid(format!(
                "\"{tag}\" is not a valid tag: use service-NAME, unit-NAME-N, machine-N, environment-UUID or charm-URL"
            ))
        };
        let (kind, id) = tag
            .split_once('-')
            .filter(|(_, id)| !id.is_empty())
            .ok_or_else(invalid)?;
        match kind {
            "service" => app_of(state, id).map(|_| tag.to_owned()),
            "unit" => {
                let name = unit_of_tag(id).ok_or_else(invalid)?;
                if !state.units.contains_key(&name) {
                    return Err(CoreError::NotFound(format!("unit \"{name}\"")));
                }
                Ok(unit_tag(&name))
            }
            "machine" if state.machines.contains_key(id) => Ok(tag.to_owned()),
            "machine" => Err(CoreError::NotFound(format!("machine {id}"))),
            "environment" if id == self.inner.uuid => Ok(tag.to_owned()),
            "environment" => Err(CoreError::NotFound(format!("environment \"{id}\""))),
            "charm" => self.inner.charms.resolve(id).map(|_| tag.to_owned()),
            _ => Err(invalid()),
        }
    }

    // -----------------------------------------------------------------------------------
    // Actions
    // -----------------------------------------------------------------------------------

    /// Runs a charm's action on a unit, as a job on the unit's node with the hook
    /// environment plus `JUJU_ACTION_NAME` and `ACTION_<PARAM>`. The job's name
    /// (`action-<unit>-<action>@...`) is the action's id.
    pub async fn run_action(
        &self,
        unit: &str,
        action: &str,
        params: BTreeMap<String, Value>,
        by: Option<String>,
    ) -> CoreResult<Job> {
        let (unit, mut env, charm) = {
            let state = self.inner.state.lock().await;
            let u = state
                .units
                .get(unit)
                .cloned()
                .ok_or_else(|| CoreError::NotFound(format!("unit \"{unit}\"")))?;
            if u.life != Life::Alive {
                return Err(CoreError::Invalid(format!(
                    "unit \"{unit}\" is being destroyed"
                )));
            }
            let app = app_of(&state, &u.application)?.clone();
            let env = self.hook_env(&state, &u, &app, &Hook::plain(HookKind::Start))?;
            (u, env, app.charm)
        };
        let path = self.inner.charms.action_path(&charm, action)?;
        env.remove("JUJU_HOOK_NAME");
        env.insert("JUJU_ACTION_NAME".into(), action.to_owned());
        for (key, value) in params {
            let text = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            env.insert(format!("ACTION_{}", env_key(&key)), text);
        }
        let program = Program {
            name: action_prefix(&unit.name) + action,
            path,
            env,
            timeout_secs: Some(self.inner.config.hook_timeout.as_secs().max(1)),
        };
        self.inner
            .nodes
            .run_program(program, Some(unit.node.clone()), by)
            .await
    }

    /// The jobs of a unit's actions, newest first.
    pub async fn actions(&self, unit: &str) -> CoreResult<Vec<Job>> {
        let app = unit.split('/').next().unwrap_or_default();
        let charm = self.application(app).await?.charm;
        let names = self.inner.charms.get(&charm)?.actions;
        let prefix = action_prefix(unit);
        let jobs = self
            .inner
            .jobs
            .list(&crate::store::JobFilter {
                limit: Some(10_000),
                ..Default::default()
            })
            .await?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                j.script
                    .strip_prefix(&prefix)
                    .is_some_and(|name| names.contains_key(name))
            })
            .collect())
    }

    /// The unit and action an action's job ran, or `None` for any other job.
    pub async fn action_of(&self, job: &Job) -> Option<(String, String)> {
        let rest = job.script.strip_prefix("action-")?;
        let state = self.inner.state.lock().await;
        let units: Vec<String> = state.units.keys().cloned().collect();
        let apps: BTreeMap<String, String> = state
            .apps
            .values()
            .map(|a| (a.name.clone(), a.charm.clone()))
            .collect();
        drop(state);
        // `action-<app>-<n>-<action>`: the unit is the one whose prefix this is and whose
        // charm has the rest as an action (names may hold dashes).
        units.into_iter().find_map(|unit| {
            let action = job.script.strip_prefix(&action_prefix(&unit))?;
            let app = unit.split('/').next()?;
            let charm = self.inner.charms.get(apps.get(app)?).ok()?;
            (charm.actions.contains_key(action) && rest.ends_with(action))
                .then(|| (unit.clone(), action.to_owned()))
        })
    }

    /// What an action reported with `action-set key=value` lines on its stdout.
    pub async fn action_output(&self, job: &str) -> CoreResult<BTreeMap<String, String>> {
        let output = self.inner.jobs.output(job).await?;
        let mut values = BTreeMap::new();
        for line in &output.stdout {
            if let Some(rest) = line.strip_prefix("action-set ") {
                for pair in rest.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        values.insert(k.to_owned(), v.to_owned());
                    }
                }
            }
        }
        Ok(values)
    }

    // -----------------------------------------------------------------------------------
    // Uniters
    // -----------------------------------------------------------------------------------

    /// Runs a unit's queued hooks in order, each until it worked. After a failed hook
    /// the unit waits in `error` for `resolved`, but a destroy still gets through (its
    /// departed, broken, stop and removal); a failed hook of that way out waits for
    /// `resolved` too (see [`Self::next_hook`]).
    async fn uniter(self, unit: String, wake: Arc<Notify>) {
        loop {
            let next = match self.next_hook(&unit).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(%unit, error = %e, "uniter cannot read its queue");
                    None
                }
            };
            let Some(hook) = next else {
                let gone = !self.inner.state.lock().await.units.contains_key(&unit);
                if gone {
                    self.inner
                        .uniters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&unit);
                    return;
                }
                wake.notified().await;
                continue;
            };
            match self.run_hook(&unit, &hook).await {
                Outcome::Done => {
                    if let Err(e) = self.hook_done(&unit, &hook).await {
                        tracing::error!(%unit, error = %e, "cannot dequeue a hook that ran");
                        wake.notified().await;
                    }
                }
                // Stays first in the queue: `resolved --retry` runs it again. (The pause
                // keeps a store that refuses writes from being hammered.)
                Outcome::Failed => tokio::time::sleep(Duration::from_millis(100)).await,
                Outcome::Gone => {
                    self.inner
                        .uniters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&unit);
                    return;
                }
                Outcome::Interrupted => return,
            }
        }
    }

    /// The hook to run next, if any: none while the unit is in error (it waits for
    /// `resolved`), unless the hook that failed came before a destroy that is queued:
    /// then the unit leaves that hook and the rest behind and takes only the way out. A
    /// hook of the way out itself (departed, broken, stop) that failed waits for
    /// `resolved` like any other; running it again unasked would only fail again.
    async fn next_hook(&self, name: &str) -> CoreResult<Option<Hook>> {
        let mut state = self.inner.state.lock().await;
        let Some(unit) = state.units.get(name).cloned() else {
            return Ok(None);
        };
        let Some(queue) = state.hooks.get(name) else {
            return Ok(None);
        };
        if unit.status != UnitStatus::Error {
            return Ok(queue.front().cloned());
        }
        let failed_on_the_way_out = queue.front().is_some_and(|h| h.kind.is_way_out());
        if failed_on_the_way_out || !queue.iter().any(|h| h.kind == HookKind::Stop) {
            return Ok(None);
        }
        let mut change = Change::new(&state);
        if let Some(queue) = change.state.hooks.get_mut(name) {
            queue.retain(|h| h.kind.is_way_out());
        }
        change.queues.insert(name.to_owned());
        let mut unit = unit;
        unit.status = UnitStatus::Stopping;
        unit.status_info.clear();
        unit.failed_hook = None;
        change.put_unit(unit);
        let next = change
            .state
            .hooks
            .get(name)
            .and_then(|q| q.front().cloned());
        self.commit(&mut state, change).await?;
        Ok(next)
    }

    /// Takes a hook that ran off the front of its unit's queue.
    async fn hook_done(&self, name: &str, hook: &Hook) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        if state.hooks.get(name).and_then(|q| q.front()) != Some(hook) {
            return Ok(());
        }
        let mut change = Change::new(&state);
        if let Some(queue) = change.state.hooks.get_mut(name) {
            queue.pop_front();
        }
        change.queues.insert(name.to_owned());
        self.commit(&mut state, change).await
    }

    async fn run_hook(&self, name: &str, hook: &Hook) -> Outcome {
        if self.stopping() {
            return Outcome::Interrupted;
        }
        match self.try_run_hook(name, hook).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(unit = %name, hook = %hook.file(), error = %e, "hook could not run");
                let _ = self
                    .hook_ended(name, hook, false, None, &[], Some(e.to_string()))
                    .await;
                Outcome::Failed
            }
        }
    }

    async fn try_run_hook(&self, name: &str, hook: &Hook) -> CoreResult<Outcome> {
        if hook.kind == HookKind::Remove {
            self.remove_unit(name).await?;
            return Ok(Outcome::Gone);
        }
        // Before: the status it runs under, the machine up, and its environment.
        let (unit, app, env) = {
            let mut state = self.inner.state.lock().await;
            let Some(mut unit) = state.units.get(name).cloned() else {
                return Ok(Outcome::Gone);
            };
            if let Some(relation) = &hook.relation {
                let exists = state.relations.contains_key(&relation.id);
                if !exists && matches!(hook.kind, HookKind::Joined | HookKind::Changed) {
                    return Ok(Outcome::Done);
                }
            }
            let Some(app) = state.apps.get(&unit.application).cloned() else {
                return Ok(Outcome::Gone);
            };
            let mut change = Change::new(&state);
            if let Some(mut machine) = change.state.machines.get(&unit.machine).cloned() {
                if machine.status == "pending" {
                    machine.status = "started".into();
                    change.put_machine(machine);
                }
            }
            let during = match hook.kind {
                HookKind::Install => Some(UnitStatus::Installing),
                HookKind::Stop => Some(UnitStatus::Stopping),
                _ => None,
            };
            if let Some(status) = during {
                if unit.status != status {
                    unit.status = status;
                    unit.status_info = format!("running {} hook", hook.file());
                    change.put_unit(unit.clone());
                }
            }
            self.commit(&mut state, change).await?;
            let env = self.hook_env(&state, &unit, &app, hook)?;
            (unit, app, env)
        };
        let path = self
            .inner
            .charms
            .hook_path(&app.charm, &hook.file())
            .or_else(|| {
                hook.relation
                    .as_ref()
                    .and_then(|_| self.inner.charms.hook_path(&app.charm, hook.kind.word()))
            });
        let Some(path) = path else {
            // No such hook: nothing to do, and it worked.
            self.hook_ended(name, hook, true, None, &[], None).await?;
            return Ok(Outcome::Done);
        };
        let program = Program {
            name: format!("hook-{}-{}", unit.name.replace('/', "-"), hook.file()),
            path,
            env,
            timeout_secs: Some(self.inner.config.hook_timeout.as_secs().max(1)),
        };
        let job = self
            .inner
            .nodes
            .run_program(program, Some(unit.node.clone()), Some(name.to_owned()))
            .await?;
        let (ended, job) = self
            .inner
            .jobs
            .wait(
                &job.name,
                self.inner.config.hook_timeout * 2 + Duration::from_secs(60),
            )
            .await?;
        if self.stopping() && !(ended && job.state == JobState::Succeeded) {
            return Ok(Outcome::Interrupted);
        }
        let success = ended && job.state == JobState::Succeeded;
        let stdout = match self.inner.jobs.output(&job.name).await {
            Ok(output) => output.stdout,
            Err(_) => Vec::new(),
        };
        let reason = (!success).then(|| {
            job.reason
                .clone()
                .unwrap_or_else(|| format!("the hook job ended {}", job.state.as_str()))
        });
        let success = self
            .hook_ended(name, hook, success, Some(job.name), &stdout, reason)
            .await?;
        Ok(if success {
            Outcome::Done
        } else {
            Outcome::Failed
        })
    }

    /// The environment of a hook (see examples/charms/README.md).
    fn hook_env(
        &self,
        state: &State,
        unit: &Unit,
        app: &Application,
        hook: &Hook,
    ) -> CoreResult<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        env.insert("JUJU_UNIT_NAME".into(), unit.name.clone());
        env.insert("JUJU_HOOK_NAME".into(), hook.file());
        env.insert("JUJU_MACHINE_ID".into(), unit.machine.clone());
        env.insert("JUJU_ENV_NAME".into(), self.inner.config.name.clone());
        env.insert("JUJU_ENV_UUID".into(), self.inner.uuid.clone());
        env.insert("JUJU_CHARM".into(), app.charm.clone());
        let charm = self.inner.charms.get(&app.charm)?;
        let mut config = serde_json::Map::new();
        for (key, option) in &charm.config {
            let value = app
                .config
                .get(key)
                .and_then(|raw| typed(&option.kind, raw).ok())
                .or_else(|| option.default.clone());
            let text = match &value {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            env.insert(format!("CONFIG_{}", env_key(key)), text);
            config.insert(key.clone(), value.unwrap_or(Value::Null));
        }
        env.insert("JUJU_CONFIG".into(), Value::Object(config).to_string());
        if let Some(relation) = &hook.relation {
            env.insert("JUJU_RELATION".into(), relation.name.clone());
            env.insert(
                "JUJU_RELATION_ID".into(),
                format!("{}:{}", relation.name, relation.id),
            );
            env.insert("JUJU_REMOTE_SERVICE".into(), relation.remote_app.clone());
            if let Some(remote) = &relation.remote_unit {
                env.insert("JUJU_REMOTE_UNIT".into(), remote.clone());
                if let Some(settings) = state
                    .relations
                    .get(&relation.id)
                    .and_then(|r| r.settings.get(remote))
                {
                    for (key, value) in settings {
                        env.insert(format!("RELATION_{}", env_key(key)), value.clone());
                    }
                }
            }
        }
        Ok(env)
    }

    /// Records a hook's end: the unit's status, its ports and relation settings from
    /// the hook's output, and the changed hooks that new settings call for. A bad
    /// `open-port` or `close-port` line fails the hook, as Juju's hook tool failing
    /// would (the lines before it count). Returns whether the hook worked after all.
    async fn hook_ended(
        &self,
        name: &str,
        hook: &Hook,
        mut success: bool,
        job: Option<String>,
        stdout: &[String],
        mut reason: Option<String>,
    ) -> CoreResult<bool> {
        let mut state = self.inner.state.lock().await;
        let Some(mut unit) = state.units.get(name).cloned() else {
            return Ok(success);
        };
        let before = unit.clone();
        let mut change = Change::new(&state);
        let mut settings: BTreeMap<String, String> = BTreeMap::new();
        let mut set_any = false;
        for line in stdout {
            let mut words = line.split_whitespace();
            let command = words.next();
            if command == Some("relation-set") {
                set_any = true;
                for pair in words {
                    if let Some((k, v)) = pair.split_once('=') {
                        settings.insert(k.to_owned(), v.to_owned());
                    }
                }
                continue;
            }
            if !matches!(command, Some("open-port" | "close-port")) {
                continue;
            }
            let port = match port_of(words.next()) {
                Ok(port) => port,
                Err(why) => {
                    success = false;
                    reason = Some(format!("{}: {why}", line.trim()));
                    break;
                }
            };
            if command == Some("close-port") {
                unit.ports.retain(|p| p != &port);
            } else if !unit.ports.contains(&port) {
                unit.ports.push(port);
            }
        }
        if success {
            if let Some(status) = status_after(hook.kind) {
                unit.status = status;
            } else if unit.status == UnitStatus::Error {
                // A retried hook worked: the unit is back to running (or to leaving).
                unit.status = if unit.life == Life::Alive {
                    UnitStatus::Started
                } else {
                    UnitStatus::Stopping
                };
            }
            unit.status_info.clear();
        } else {
            unit.status = UnitStatus::Error;
            unit.status_info = format!("hook failed: \"{}\"", hook.file());
            unit.failed_hook = Some(hook.file());
            unit.last_hook_job = job;
            if let Some(reason) = reason {
                tracing::warn!(unit = %name, hook = %hook.file(), %reason, "hook failed");
            }
        }
        if success && unit.failed_hook.is_some() {
            unit.failed_hook = None;
        }
        if unit != before {
            change.put_unit(unit);
        }
        if let (true, Some(context)) = (set_any && success, &hook.relation) {
            if let Some(mut relation) = change.state.relations.get(&context.id).cloned() {
                let entry = relation.settings.entry(name.to_owned()).or_default();
                let mut merged = entry.clone();
                merged.extend(settings);
                if &merged != entry {
                    *entry = merged;
                    let app = name.split('/').next().unwrap_or_default().to_owned();
                    if let Some((local, remote)) =
                        sides(&relation, &app).map(|(l, r)| (l.clone(), r.clone()))
                    {
                        let others = alive_units(&change.state, &remote.application);
                        for other in others.into_iter().filter(|o| o != name) {
                            change.hook(
                                &other,
                                relation_hook(
                                    HookKind::Changed,
                                    relation.id,
                                    &remote,
                                    &local,
                                    Some(name),
                                ),
                            );
                        }
                    }
                    change.put_relation(relation);
                }
            }
        }
        self.commit(&mut state, change).await?;
        Ok(success)
    }

    /// A unit's end: it goes, with its settings in relations, its machine if nothing
    /// else is on it, and its application if that was dying and this was its last unit.
    async fn remove_unit(&self, name: &str) -> CoreResult<()> {
        let mut state = self.inner.state.lock().await;
        let Some(unit) = state.units.get(name).cloned() else {
            return Ok(());
        };
        let mut change = Change::new(&state);
        change.remove_unit(name);
        change.state.hooks.remove(name);
        change.queues.insert(name.to_owned());
        let with_settings: Vec<Relation> = change
            .state
            .relations
            .values()
            .filter(|r| r.settings.contains_key(name))
            .cloned()
            .collect();
        for mut relation in with_settings {
            relation.settings.remove(name);
            change.put_relation(relation);
        }
        let shared = change
            .state
            .units
            .values()
            .any(|u| u.machine == unit.machine);
        if unit.machine != "0" && !shared {
            change.remove_machine(&unit.machine);
        }
        let app_dying = change
            .state
            .apps
            .get(&unit.application)
            .is_some_and(|a| a.life != Life::Alive);
        let units_left = change
            .state
            .units
            .values()
            .any(|u| u.application == unit.application);
        if app_dying && !units_left {
            self.finish_application(&mut change, &unit.application);
        }
        self.commit(&mut state, change).await
    }

    // -----------------------------------------------------------------------------------
    // Watching
    // -----------------------------------------------------------------------------------

    /// A watcher whose first [`ModelWatcher::next`] is the whole model.
    pub fn watcher(&self) -> ModelWatcher {
        ModelWatcher {
            model: self.clone(),
            revision: 0,
            seen: HashSet::new(),
            started: false,
        }
    }
}

/// One entity's change or removal, with its whole latest record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta {
    /// `application`, `unit`, `machine` or `relation`.
    pub kind: String,
    pub removed: bool,
    pub data: Value,
}

impl Delta {
    /// The entity's id within its kind.
    pub fn id(&self) -> String {
        let field = match self.kind.as_str() {
            "machine" => "id",
            "relation" => "key",
            "annotation" => "tag",
            _ => "name",
        };
        match self.data.get(field) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

/// Juju's AllWatcher semantics over the event log: the first `next` is the whole
/// model, each later one the entities changed since, each once with its latest record,
/// oldest change first; an entity that came and went in between is not reported.
pub struct ModelWatcher {
    model: Model,
    revision: u64,
    /// Entities this watcher has reported and not yet reported removed.
    seen: HashSet<(String, String)>,
    started: bool,
}

impl ModelWatcher {
    /// The revision the watcher has seen up to.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Waits until there is at least one delta and returns them.
    pub async fn next(&mut self) -> CoreResult<Vec<Delta>> {
        let mut changes = self.model.inner.store.changes();
        if !self.started {
            self.started = true;
            let deltas = self.snapshot().await;
            if !deltas.is_empty() {
                return Ok(deltas);
            }
        }
        loop {
            changes.borrow_and_update();
            let deltas = self.since().await?;
            if !deltas.is_empty() {
                return Ok(deltas);
            }
            if changes.changed().await.is_err() {
                return Err(CoreError::Store(crate::store::StoreError::Closed));
            }
        }
    }

    /// Everything now, as changes; entities seen before and gone now as removals.
    async fn snapshot(&mut self) -> Vec<Delta> {
        let lost = self.model.lost_nodes().await;
        let state = self.model.inner.state.lock().await;
        let mut deltas = Vec::new();
        let mut now = HashSet::new();
        let mut add = |kind: &str, data: Value| {
            let delta = Delta {
                kind: kind.into(),
                removed: false,
                data,
            };
            now.insert((delta.kind.clone(), delta.id()));
            deltas.push(delta);
        };
        for app in state.apps.values() {
            add("application", serde_json::to_value(app).unwrap_or_default());
        }
        for mut machine in sorted_machines(state.machines.values().cloned().collect()) {
            mark_lost(&mut machine, &lost);
            add("machine", serde_json::to_value(machine).unwrap_or_default());
        }
        for mut unit in sorted_units(state.units.values().cloned().collect()) {
            unit.agent_lost = lost.contains(&unit.node);
            add("unit", serde_json::to_value(unit).unwrap_or_default());
        }
        for relation in state.relations.values() {
            add(
                "relation",
                serde_json::to_value(relation).unwrap_or_default(),
            );
        }
        for (tag, pairs) in &state.annotations {
            add(
                "annotation",
                serde_json::json!({ "tag": tag, "annotations": pairs }),
            );
        }
        for (kind, id) in self.seen.difference(&now) {
            let field = match kind.as_str() {
                "machine" => "id",
                "relation" => "key",
                "annotation" => "tag",
                _ => "name",
            };
            deltas.push(Delta {
                kind: kind.clone(),
                removed: true,
                data: serde_json::json!({ field: id }),
            });
        }
        self.seen = now;
        self.revision = state.revision;
        deltas
    }

    /// The model events after the watcher's revision, folded per entity. A node that
    /// came or went changes how its machines and units read (`agent_lost`), so they
    /// are reported again.
    async fn since(&mut self) -> CoreResult<Vec<Delta>> {
        // (kind, id) → (revision of the latest event, removed, data)
        type Latest = ((String, String), (u64, bool, Value));
        let mut latest: BTreeMap<(String, String), (u64, bool, Value)> = BTreeMap::new();
        // Nodes that connected or disconnected → the revision of the latest such event.
        let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            let store = &self.model.inner.store;
            match store.events_since(self.revision, 1000).await? {
                EventsSince::Gone { .. } => return Ok(self.snapshot().await),
                EventsSince::Events(events) => {
                    let count = events.len();
                    for event in events {
                        self.revision = event.rev;
                        if matches!(event.kind.as_str(), "node.connected" | "node.disconnected") {
                            nodes.insert(event.subject.clone(), event.rev);
                            continue;
                        }
                        let Some(rest) = event.kind.strip_prefix("model.") else {
                            continue;
                        };
                        let Some((kind, action)) = rest.split_once('.') else {
                            continue;
                        };
                        latest.insert(
                            (kind.to_owned(), event.subject.clone()),
                            (event.rev, action == "remove", event.data),
                        );
                    }
                    if count < 1000 {
                        break;
                    }
                }
            }
        }
        if !nodes.is_empty() {
            let state = self.model.inner.state.lock().await;
            let on_nodes = state
                .machines
                .values()
                .filter_map(|m| {
                    let rev = nodes.get(&m.node)?;
                    Some((("machine", m.id.clone()), *rev, serde_json::to_value(m)))
                })
                .chain(state.units.values().filter_map(|u| {
                    let rev = nodes.get(&u.node)?;
                    Some((("unit", u.name.clone()), *rev, serde_json::to_value(u)))
                }));
            for ((kind, id), rev, data) in on_nodes {
                latest
                    .entry((kind.to_owned(), id))
                    .and_modify(|(last, removed, _)| {
                        if !*removed && *last < rev {
                            *last = rev;
                        }
                    })
                    .or_insert((rev, false, data.unwrap_or_default()));
            }
        }
        let lost = if latest
            .iter()
            .any(|((kind, _), (_, removed, _))| !removed && (kind == "unit" || kind == "machine"))
        {
            self.model.lost_nodes().await
        } else {
            HashSet::new()
        };
        let mut ordered: Vec<Latest> = latest.into_iter().collect();
        ordered.sort_by_key(|(_, (rev, _, _))| *rev);
        let mut deltas = Vec::new();
        for ((kind, _), (_, removed, mut data)) in ordered {
            if !removed {
                mark_lost_data(&kind, &mut data, &lost);
            }
            let delta = Delta {
                kind: kind.clone(),
                removed,
                data,
            };
            let key = (kind, delta.id());
            if removed {
                if !self.seen.remove(&key) {
                    continue;
                }
            } else {
                self.seen.insert(key);
            }
            deltas.push(delta);
        }
        Ok(deltas)
    }
}

// ---------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------

fn app_of<'a>(state: &'a State, name: &str) -> CoreResult<&'a Application> {
    state
        .apps
        .get(name)
        .ok_or_else(|| CoreError::NotFound(format!("application \"{name}\"")))
}

fn alive_app<'a>(state: &'a State, name: &str) -> CoreResult<&'a Application> {
    let app = app_of(state, name)?;
    if app.life != Life::Alive {
        return Err(CoreError::Invalid(format!(
            "application \"{name}\" is being destroyed"
        )));
    }
    Ok(app)
}

/// The relations an application is in.
fn relations_of(state: &State, app: &str) -> Vec<Relation> {
    state
        .relations
        .values()
        .filter(|r| r.endpoints.iter().any(|e| e.application == app))
        .cloned()
        .collect()
}

fn alive_units(state: &State, app: &str) -> Vec<String> {
    sorted_units(
        state
            .units
            .values()
            .filter(|u| u.application == app && u.life == Life::Alive)
            .cloned()
            .collect(),
    )
    .into_iter()
    .map(|u| u.name)
    .collect()
}

/// Units by application, then number (`blog/10` after `blog/9`).
fn sorted_units(mut units: Vec<Unit>) -> Vec<Unit> {
    units.sort_by_key(|u| {
        let (app, n) = u.name.split_once('/').unwrap_or((&u.name, "0"));
        (app.to_owned(), n.parse::<u64>().unwrap_or(0))
    });
    units
}

/// See [`Model::status_matching`].
fn filter_status(mut status: ModelStatus, patterns: &[String]) -> ModelStatus {
    let named = |name: &str| patterns.iter().any(|p| glob(p, name));
    let units: Vec<Unit> = status
        .units
        .into_iter()
        .filter(|u| named(&u.name) || named(&u.application) || named(&u.machine))
        .collect();
    let apps: HashSet<String> = units.iter().map(|u| u.application.clone()).collect();
    let machines: HashSet<String> = units.iter().map(|u| u.machine.clone()).collect();
    status
        .applications
        .retain(|a| apps.contains(&a.name) || named(&a.name));
    status
        .machines
        .retain(|m| machines.contains(&m.id) || named(&m.id));
    let kept: HashSet<&str> = status
        .applications
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    status.relations.retain(|r| {
        r.endpoints
            .iter()
            .any(|e| kept.contains(e.application.as_str()))
    });
    status.units = units;
    status
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters and
/// `?` for any one (a unit's `/` included, so `blog*` matches `blog/0`).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point for the last `*` seen.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// A machine whose node is gone reads `down`.
fn mark_lost(machine: &mut Machine, lost: &HashSet<String>) {
    if lost.contains(&machine.node) {
        machine.agent_lost = true;
        machine.status = "down".into();
    }
}

/// [`mark_lost`] for a unit or machine record of the event log.
fn mark_lost_data(kind: &str, data: &mut Value, lost: &HashSet<String>) {
    let node = data.get("node").and_then(Value::as_str).unwrap_or_default();
    if !lost.contains(node) {
        return;
    }
    match kind {
        "unit" => data["agent_lost"] = Value::Bool(true),
        "machine" => {
            data["agent_lost"] = Value::Bool(true);
            data["status"] = Value::from("down");
        }
        _ => {}
    }
}

fn sorted_machines(mut machines: Vec<Machine>) -> Vec<Machine> {
    machines.sort_by_key(|m| m.id.parse::<u64>().unwrap_or(u64::MAX));
    machines
}

fn endpoint(app: &str, name: &str, role: Role, meta: &CharmRelation) -> Endpoint {
    Endpoint {
        application: app.to_owned(),
        name: name.to_owned(),
        role,
        interface: meta.interface.clone(),
        optional: meta.optional,
        limit: meta.limit,
        scope: meta.scope.clone(),
    }
}

fn role_rank(role: Role) -> u8 {
    match role {
        Role::Requirer => 0,
        Role::Provider => 1,
        Role::Peer => 2,
    }
}

/// `blog:db db:db`: requirer first, then provider, then peer; ties by name.
fn relation_key(endpoints: &[Endpoint]) -> String {
    let mut parts: Vec<(u8, String)> = endpoints
        .iter()
        .map(|e| (role_rank(e.role), format!("{}:{}", e.application, e.name)))
        .collect();
    parts.sort();
    parts
        .into_iter()
        .map(|(_, s)| s)
        .collect::<Vec<_>>()
        .join(" ")
}

/// An application's endpoint in a relation and the other side's (the same endpoint for
/// a peer relation); `None` when the application is not in it.
fn sides<'a>(relation: &'a Relation, app: &str) -> Option<(&'a Endpoint, &'a Endpoint)> {
    let local = relation.endpoints.iter().find(|e| e.application == app)?;
    let remote = relation
        .endpoints
        .iter()
        .find(|e| e.application != app)
        .unwrap_or(local);
    Some((local, remote))
}

/// The two endpoint names of a relation request.
fn two(names: &[String]) -> CoreResult<(&String, &String)> {
    match names {
        [first, second] => Ok((first, second)),
        _ => Err(CoreError::Invalid(format!(
            "a relation needs two endpoints, not {}",
            names.len()
        ))),
    }
}

/// The start of the job names of a unit's actions: `action-blog-0-`.
fn action_prefix(unit: &str) -> String {
    format!("action-{}-", unit.replace('/', "-"))
}

fn relation_hook(
    kind: HookKind,
    id: u64,
    local: &Endpoint,
    remote: &Endpoint,
    remote_unit: Option<&str>,
) -> Hook {
    Hook {
        kind,
        relation: Some(RelationContext {
            id,
            name: local.name.clone(),
            remote_app: remote.application.clone(),
            remote_unit: remote_unit.map(str::to_owned),
        }),
    }
}

/// The status a successful hook leaves the unit in, if it changes it.
fn status_after(kind: HookKind) -> Option<UnitStatus> {
    match kind {
        HookKind::Install => Some(UnitStatus::Installed),
        HookKind::Start => Some(UnitStatus::Started),
        HookKind::Stop => Some(UnitStatus::Stopped),
        _ => None,
    }
}

/// Longest application name. Juju's rule sets no length, but the name ends up inside
/// single file names: a hook's job, whose results directory is one path component, is
/// named `hook-<app>-<unit number>-<hook>@<clock>`, and Linux refuses components over
/// 255 bytes (NAME_MAX), so an unbounded name deploys and then fails every hook. 63 is a
/// DNS label's limit (RFC 1035), which keeps names usable as host names too, and leaves
/// the rest of those 255 bytes to the unit number, the clock and relation hook names.
pub const MAX_APP_NAME_LEN: usize = 63;

/// Application names as Juju takes them: lower-case words of letters and digits joined
/// by dashes, starting with a letter, no word all digits; and at most
/// [`MAX_APP_NAME_LEN`] long.
fn check_app_name(name: &str) -> CoreResult<()> {
    let chars = name.chars().count();
    // Echoing all of a name that may be kilobytes long would bury the reason.
    let shown = if chars > MAX_APP_NAME_LEN {
        format!("{}…", name.chars().take(20).collect::<String>())
    } else {
        name.to_owned()
    };
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.split('-').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && !word.bytes().all(|b| b.is_ascii_digit())
        });
    if !valid {
        Err(CoreError::Invalid(format!(
            "invalid application name \"{shown}\": use lower-case letters, digits and dashes, starting with a letter, no part after a dash all digits"
        )))
    } else if chars > MAX_APP_NAME_LEN {
        Err(CoreError::Invalid(format!(
            "invalid application name \"{shown}\": {chars} characters long, at most {MAX_APP_NAME_LEN} are allowed"
        )))
    } else {
        Ok(())
    }
}

/// `blog-0` or `blog/0` (the id of a unit's tag) → `blog/0`.
fn unit_of_tag(id: &str) -> Option<String> {
    if id.contains('/') {
        return Some(id.to_owned());
    }
    let (app, n) = id.rsplit_once('-')?;
    (!app.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{app}/{n}"))
}

/// The tag of a unit's annotations: `unit-blog-0`.
fn unit_tag(name: &str) -> String {
    format!("unit-{}", name.replace('/', "-"))
}

fn check_unit_count(n: u32) -> CoreResult<()> {
    if n > MAX_UNITS_PER_REQUEST {
        return Err(CoreError::Invalid(format!(
            "at most {MAX_UNITS_PER_REQUEST} units per request, not {n}"
        )));
    }
    Ok(())
}

fn unknown_option(key: &str, charm: &Charm) -> CoreError {
    CoreError::Invalid(format!(
        "unknown option \"{key}\": charm \"{}\" has {}",
        charm.name,
        if charm.config.is_empty() {
            "no options".to_owned()
        } else {
            charm.config.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    ))
}

/// Checks `set` against the charm's options and merges it into `base`; values are kept
/// as text in a normal form (`True` becomes `true`).
fn check_config(
    charm: &Charm,
    set: &BTreeMap<String, String>,
    base: &BTreeMap<String, String>,
) -> CoreResult<BTreeMap<String, String>> {
    let mut merged = base.clone();
    for (key, raw) in set {
        let option = charm
            .config
            .get(key)
            .ok_or_else(|| unknown_option(key, charm))?;
        if raw.contains('\0') {
            return Err(CoreError::Invalid(format!(
                "option \"{key}\" holds a NUL byte, which a hook's environment cannot carry"
            )));
        }
        let value = typed(&option.kind, raw).map_err(|expected| {
            CoreError::Invalid(format!("option \"{key}\" expected {expected}, got {raw:?}"))
        })?;
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        merged.insert(key.clone(), text);
    }
    Ok(merged)
}

/// A config value as its option's type.
fn typed(kind: &str, raw: &str) -> Result<Value, &'static str> {
    match kind {
        "int" => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| "int"),
        "float" => raw
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or("float"),
        "boolean" => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(Value::Bool(true)),
            "false" | "no" | "0" => Ok(Value::Bool(false)),
            _ => Err("boolean"),
        },
        _ => Ok(Value::String(raw.to_owned())),
    }
}

/// Checks constraints against Juju's keys and values and puts them in the form Juju
/// reports them in (and the Juju face sends back): numeric keys as JSON integers, sizes
/// in megabytes, absent (`null`) keys dropped.
fn normal_constraints(constraints: BTreeMap<String, Value>) -> CoreResult<BTreeMap<String, Value>> {
    let mut normal = BTreeMap::new();
    for (key, value) in constraints {
        if !CONSTRAINTS.contains(&key.as_str()) {
            return Err(CoreError::Invalid(format!(
                "unknown constraint \"{key}\": known ones are {}",
                CONSTRAINTS.join(", ")
            )));
        }
        let value = if value.is_null() {
            continue;
        } else if SIZE_CONSTRAINTS.contains(&key.as_str()) {
            Value::from(megabytes(&value).ok_or_else(|| {
                CoreError::Invalid(format!(
                    "bad \"{key}\" constraint: expected a non-negative number with an optional \
                     M, G, T or P suffix (megabytes by default, 1G = 1024M), got {value}"
                ))
            })?)
        } else if COUNT_CONSTRAINTS.contains(&key.as_str()) {
            let count = match &value {
                Value::Number(n) => n.as_u64(),
                // Juju reads an empty value as 0, its "no constraint".
                Value::String(s) if s.trim().is_empty() => Some(0),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            Value::from(count.ok_or_else(|| {
                CoreError::Invalid(format!(
                    "bad \"{key}\" constraint: expected a non-negative integer, got {value}"
                ))
            })?)
        } else {
            check_text_constraint(&key, &value)?;
            value
        };
        normal.insert(key, value);
    }
    Ok(normal)
}

/// A constraint whose value is text: `arch` and `container` one of the words Juju
/// knows (empty for none), list ones text or a list of strings, the others text.
fn check_text_constraint(key: &str, value: &Value) -> CoreResult<()> {
    let bad = |expected: String| {
        CoreError::Invalid(format!(
            "bad \"{key}\" constraint: expected {expected}, got {value}"
        ))
    };
    let one_of = |words: &[&str]| format!("one of {}", words.join(", "));
    match (key, value) {
        ("arch", Value::String(s)) if s.is_empty() || ARCHES.contains(&s.as_str()) => Ok(()),
        ("arch", _) => Err(bad(one_of(ARCHES))),
        ("container", Value::String(s)) if s.is_empty() || CONTAINERS.contains(&s.as_str()) => {
            Ok(())
        }
        ("container", _) => Err(bad(one_of(CONTAINERS))),
        (_, Value::String(_)) => Ok(()),
        (_, Value::Array(items))
            if LIST_CONSTRAINTS.contains(&key) && items.iter().all(Value::is_string) =>
        {
            Ok(())
        }
        _ if LIST_CONSTRAINTS.contains(&key) => {
            Err(bad("comma-separated text or a list of strings".into()))
        }
        _ => Err(bad("text".into())),
    }
}

/// A size constraint in megabytes, by Juju's rule: a JSON integer is megabytes already;
/// text is a non-negative number, fractions allowed, with an optional suffix M, G, T or
/// P (powers of 1024 of a megabyte), rounded up to a whole megabyte.
fn megabytes(value: &Value) -> Option<u64> {
    let text = match value {
        // Juju's own JSON field is an unsigned integer: no fractions there.
        Value::Number(n) => return n.as_u64(),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    if text.is_empty() {
        // As for the counts: Juju's "no constraint".
        return Some(0);
    }
    let (number, scale) = match text.as_bytes()[text.len() - 1] {
        b'M' => (&text[..text.len() - 1], 1.0),
        b'G' => (&text[..text.len() - 1], 1024.0),
        b'T' => (&text[..text.len() - 1], 1024.0 * 1024.0),
        b'P' => (&text[..text.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (text, 1.0),
    };
    let number: f64 = number.parse().ok()?;
    // `parse` takes "inf" and "NaN", which are no sizes; -0 is a harmless 0.
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    let mb = (number * scale).ceil();
    // 2^64 and above do not fit (`as` would quietly saturate to u64::MAX).
    (mb < u64::MAX as f64).then_some(mb as u64)
}

fn env_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The port of an `open-port`/`close-port` line in its normal form, by Juju's rule: a
/// port or a range of ports (`80`, `8000-8080`, 1 to 65535, the range not reversed)
/// with an optional protocol, `tcp` (the default) or `udp`; or `icmp` alone.
fn port_of(word: Option<&str>) -> Result<String, String> {
    let Some(word) = word else {
        return Err("expected a port, like 80/tcp".into());
    };
    let lower = word.to_ascii_lowercase();
    if lower == "icmp" {
        return Ok(lower);
    }
    let (range, protocol) = lower.split_once('/').unwrap_or((&lower, "tcp"));
    if !matches!(protocol, "tcp" | "udp") {
        return Err(format!(
            "invalid protocol \"{protocol}\": expected tcp, udp or icmp"
        ));
    }
    let number = |text: &str| {
        text.parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("invalid port \"{text}\": expected a number from 1 to 65535"))
    };
    let (from, to) = match range.split_once('-') {
        Some((from, to)) => (number(from)?, number(to)?),
        None => {
            let n = number(range)?;
            (n, n)
        }
    };
    if from > to {
        return Err(format!(
            "invalid port range {from}-{to}: the first is the lowest"
        ));
    }
    Ok(if from == to {
        format!("{from}/{protocol}")
    } else {
        format!("{from}-{to}/{protocol}")
    })
}

/// A random UUID (version 4).
fn new_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_jujus_rule_and_are_kept_in_megabytes() {
        let mb = |text: &str| megabytes(&Value::from(text));
        assert_eq!(mb("512"), Some(512));
        assert_eq!(mb("512M"), Some(512));
        assert_eq!(mb("4G"), Some(4096));
        assert_eq!(mb("1.5G"), Some(1536));
        assert_eq!(mb("2T"), Some(2 * 1024 * 1024));
        assert_eq!(mb("1P"), Some(1024 * 1024 * 1024));
        assert_eq!(mb("0.3"), Some(1), "rounded up");
        assert_eq!(mb(".5G"), Some(512));
        assert_eq!(mb(""), Some(0));
        assert_eq!(megabytes(&Value::from(2048)), Some(2048));
        for bad in [
            "4g", "4GB", "4K", "G", "-1G", "-0.5", "four", "inf", "NaN", "1e30P", "4 G", "0x10",
        ] {
            assert_eq!(mb(bad), None, "{bad}");
        }
        assert_eq!(megabytes(&Value::from(1.5)), None);
        assert_eq!(megabytes(&Value::from(-1)), None);
        assert_eq!(megabytes(&Value::Bool(true)), None);

        let normal = normal_constraints(
            [
                ("mem".to_string(), Value::from("4G")),
                ("root-disk".to_string(), Value::from("1.5T")),
            ]
            .into(),
        )
        .unwrap();
        assert_eq!(normal["mem"], 4096);
        assert_eq!(normal["root-disk"], 1024 * 1024 + 512 * 1024);
        let err = normal_constraints([("mem".to_string(), Value::from("4X"))].into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad \"mem\" constraint"), "{err}");
        assert!(err.contains("M, G, T or P suffix"), "{err}");
    }

    #[test]
    fn status_patterns_are_globs() {
        assert!(glob("blog", "blog"));
        assert!(!glob("blog", "blog/0"));
        assert!(glob("blog/*", "blog/0"));
        assert!(glob("b*g", "blog"));
        assert!(glob("blog/?", "blog/1"));
        assert!(!glob("blog/?", "blog/10"));
        assert!(glob("*", "anything"));
        assert!(!glob("db", "blog"));
        assert!(!glob("", "blog"));
    }

    #[test]
    fn names_keys_and_values() {
        assert!(check_app_name("blog").is_ok());
        assert!(check_app_name("my-blog2").is_ok());
        assert!(check_app_name("mysql-b2").is_ok());
        assert!(check_app_name(&"a".repeat(MAX_APP_NAME_LEN)).is_ok());
        for bad in [
            "Blog", "2blog", "blog-", "blog-2", "mysql-2", "a_b", "a--b", "-a", "",
        ] {
            assert!(check_app_name(bad).is_err(), "{bad}");
        }
        let long = "a".repeat(5000);
        let err = check_app_name(&long).unwrap_err().to_string();
        assert!(err.contains("5000 characters long, at most 63"), "{err}");
        assert!(err.len() < 200, "the message repeats the whole name: {err}");
        let err = check_app_name(&"A".repeat(5000)).unwrap_err().to_string();
        assert!(err.contains("lower-case letters"), "{err}");
        assert!(err.len() < 250, "the message repeats the whole name: {err}");
        assert_eq!(typed("boolean", "True"), Ok(Value::Bool(true)));
        assert_eq!(typed("int", "4"), Ok(Value::from(4)));
        assert!(typed("int", "four").is_err());
        let port = |word: &str| port_of(Some(word));
        assert_eq!(port("80"), Ok("80/tcp".into()));
        assert_eq!(port("53/UDP"), Ok("53/udp".into()));
        assert_eq!(port("8000-8080/tcp"), Ok("8000-8080/tcp".into()));
        assert_eq!(port("8080-8080"), Ok("8080/tcp".into()));
        assert_eq!(port("icmp"), Ok("icmp".into()));
        for bad in [
            "0", "65536", "http", "80/sctp", "80/", "/tcp", "90-80", "-80", "80-", "1e3",
        ] {
            assert!(port(bad).is_err(), "{bad}");
        }
        assert!(port_of(None).is_err());
        assert_eq!(env_key("dataset-size"), "DATASET_SIZE");
        let one = |key: &str, value: Value| normal_constraints([(key.to_string(), value)].into());
        assert_eq!(one("cpu-cores", Value::from(4)).unwrap()["cpu-cores"], 4);
        assert_eq!(one("cpu-cores", Value::from("4")).unwrap()["cpu-cores"], 4);
        assert!(one("cpu-cores", Value::from(-1)).is_err());
        assert!(one("colour", Value::from("red")).is_err());
        assert!(one("mem", Value::Null).unwrap().is_empty());
        assert_eq!(one("arch", Value::from("amd64")).unwrap()["arch"], "amd64");
        let uuid = new_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
    }
}
