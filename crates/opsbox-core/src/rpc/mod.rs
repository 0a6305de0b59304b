//! The RPC registry: named functions with a doc, declared parameters and a handler,
//! callable from every face (py-jrpc's `POST /` and `GET /{name}`, JSON-RPC 2.0 over
//! HTTP and WebSocket, the CLI and the SDK). One name means one function everywhere.
//!
//! Sources, in the order a name is looked up:
//! - functions registered in the registry: the built-ins ([`builtins`]: `ping`,
//!   `list_methods`, `method_help`, `method_signature`, `rpc.discover`), host
//!   introspection ([`host`]) and functions a Rust program registers when it embeds the
//!   server. The first registration of a name wins (as py-jrpc's `register_function`),
//!   so built-ins cannot be replaced;
//! - every script of the catalog, its params becoming named string arguments; a call is
//!   a job like any other run ([`crate::jobs::Jobs::run`]).
//!
//! [`Rpc::call`] is the one place where a call is resolved: lookup, role check, binding
//! of positional or named params to the declared ones (defaults, types, arity), then the
//! handler. Faces only translate their wire form into [`Params`] and render the answer.

pub mod builtins;
pub mod host;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};

use opsbox_api::{Role, RpcMethod, RpcParam, RpcSource, RpcType};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::identities::Identity;
use crate::jobs::Jobs;
use crate::scripts::Scripts;

/// Why a call did not produce a result. Faces map each to their own answer
/// (py-jrpc: 405, 400, 403, 500; JSON-RPC: -32601, -32602, -32001, -32000).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RpcError {
    /// No function has this name.
    #[error("method [{0}] is not supported")]
    MethodNotFound(String),
    /// Wrong count, unknown or missing names, wrong types.
    #[error("{0}")]
    InvalidParams(String),
    /// The caller's role is below the function's.
    #[error("{0}")]
    Forbidden(String),
    /// The function ran and failed; `data` may say more (a failed script's job).
    #[error("{message}")]
    Failed {
        message: String,
        data: Option<Value>,
    },
}

impl RpcError {
    pub fn failed(message: impl Into<String>) -> Self {
        RpcError::Failed {
            message: message.into(),
            data: None,
        }
    }
}

/// The params of a call as the wire carried them.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Params {
    /// No arguments.
    #[default]
    None,
    /// By position, in declaration order.
    Positional(Vec<Value>),
    /// By name, matching declared names exactly.
    Named(serde_json::Map<String, Value>),
}

/// The arguments a handler receives: one value per declared parameter, in declaration
/// order, defaults filled in (`null` for an optional parameter without default).
#[derive(Debug, Clone)]
pub struct Args {
    /// The function whose declared parameters name the values (shared, not copied:
    /// a call is on the hot path of every face).
    function: Arc<Function>,
    values: Vec<Value>,
}

/// Equal when they bind the same values to the same names.
impl PartialEq for Args {
    fn eq(&self, other: &Args) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Args {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.function
            .params
            .iter()
            .position(|p| p.name == name)
            .and_then(|i| self.values.get(i))
    }

    pub fn values(&self) -> &[Value] {
        &self.values
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.function
            .params
            .iter()
            .map(|p| p.name.as_str())
            .zip(self.values.iter())
    }
}

/// Who calls, and with what.
#[derive(Debug, Clone)]
pub struct Call {
    pub args: Args,
    pub caller: Identity,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Handler = Arc<dyn Fn(Call) -> BoxFuture<Result<Value, RpcError>> + Send + Sync>;

/// A function ready to register: doc, parameters, role and handler.
///
/// ```
/// use opsbox_core::rpc::{Function, RpcError};
/// use opsbox_api::RpcType;
/// let add = Function::new(|(a, b): (i64, i64)| async move { Ok::<_, RpcError>(a + b) })
///     .doc("Adds two integers.")
///     .param("a", RpcType::Integer)
///     .param_default("b", RpcType::Integer, 2);
/// ```
#[derive(Clone)]
pub struct Function {
    doc: String,
    params: Vec<RpcParam>,
    role: Role,
    source: RpcSource,
    handler: Handler,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("params", &self.params)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Reads the bound arguments into a handler's typed parameters: a tuple or struct from
/// the array of values in declaration order, `()` when none are declared.
fn typed<T: DeserializeOwned>(args: &Args) -> Result<T, RpcError> {
    let value = if args.values.is_empty() {
        Value::Null
    } else {
        Value::Array(args.values.clone())
    };
    serde_json::from_value(value)
        .map_err(|e| RpcError::InvalidParams(format!("invalid params: {e}")))
}

fn to_value<R: Serialize>(result: R) -> Result<Value, RpcError> {
    serde_json::to_value(result)
        .map_err(|e| RpcError::failed(format!("cannot render the result: {e}")))
}

impl Function {
    /// An async function of typed parameters (a tuple in declaration order, or `()`).
    /// Declare each parameter with [`Function::param`] or [`Function::param_default`].
    pub fn new<T, R, F, Fut>(f: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let f = Arc::new(f);
        Self::raw(move |call| {
            let f = f.clone();
            async move { to_value(f(typed(&call.args)?).await?) }
        })
    }

    /// A synchronous function that returns quickly (runs on the calling task).
    pub fn sync<T, R, F>(f: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(T) -> Result<R, RpcError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        Self::raw(move |call| {
            let result = typed(&call.args).and_then(|args| to_value(f(args)?));
            async move { result }
        })
    }

    /// A function that blocks (disk, CPU-heavy work): run on tokio's blocking pool.
    pub fn blocking<T, R, F>(f: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(T) -> Result<R, RpcError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        Self::raw(move |call| {
            let f = f.clone();
            async move {
                let args = typed(&call.args)?;
                tokio::task::spawn_blocking(move || to_value(f(args)?))
                    .await
                    .map_err(|e| RpcError::failed(format!("the function panicked: {e}")))?
            }
        })
    }

    /// A function that sees the whole [`Call`], caller included.
    pub fn raw<F, Fut>(f: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
    {
        Function {
            doc: String::new(),
            params: Vec::new(),
            role: Role::Operator,
            source: RpcSource::Registered,
            handler: Arc::new(move |call| Box::pin(f(call))),
        }
    }

    /// The help text (`method_help`); common indentation and blank edges are removed.
    pub fn doc(mut self, doc: &str) -> Self {
        self.doc = clean_doc(doc);
        self
    }

    /// A required parameter.
    pub fn param(mut self, name: &str, kind: RpcType) -> Self {
        self.params.push(RpcParam {
            name: name.to_owned(),
            kind,
            required: true,
            default: None,
            description: None,
        });
        self
    }

    /// An optional parameter that takes `default` when omitted.
    pub fn param_default(mut self, name: &str, kind: RpcType, default: impl Serialize) -> Self {
        self.params.push(RpcParam {
            name: name.to_owned(),
            kind,
            required: false,
            default: serde_json::to_value(default).ok(),
            description: None,
        });
        self
    }

    /// An optional parameter that is `null` when omitted.
    pub fn param_optional(mut self, name: &str, kind: RpcType) -> Self {
        self.params.push(RpcParam {
            name: name.to_owned(),
            kind,
            required: false,
            default: None,
            description: None,
        });
        self
    }

    /// The least role that may call it (operator unless set).
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    pub(crate) fn source(mut self, source: RpcSource) -> Self {
        self.source = source;
        self
    }

    fn describe(&self, name: &str) -> RpcMethod {
        RpcMethod {
            name: name.to_owned(),
            doc: self.doc.clone(),
            params: self.params.clone(),
            role: self.role,
            source: self.source,
        }
    }

    /// Binds the wire params to the declared ones.
    fn bind(self: &Arc<Self>, name: &str, params: Params) -> Result<Args, RpcError> {
        let declared = &self.params;
        let mut values: Vec<Option<Value>> = vec![None; declared.len()];
        match params {
            Params::None => {}
            Params::Positional(given) => {
                if given.len() > declared.len() {
                    return Err(RpcError::InvalidParams(format!(
                        "{name}() takes at most {} argument{} ({} given)",
                        declared.len(),
                        if declared.len() == 1 { "" } else { "s" },
                        given.len()
                    )));
                }
                for (slot, value) in values.iter_mut().zip(given) {
                    *slot = Some(value);
                }
            }
            Params::Named(given) => {
                for (key, value) in given {
                    let Some(i) = declared.iter().position(|p| p.name == key) else {
                        return Err(RpcError::InvalidParams(format!(
                            "{name}() got an unexpected keyword argument '{key}'"
                        )));
                    };
                    values[i] = Some(value);
                }
            }
        }
        let mut bound = Vec::with_capacity(declared.len());
        for (param, value) in declared.iter().zip(values) {
            let value = match value {
                // An explicit null on an optional parameter means "use the default".
                Some(Value::Null) if !param.required => {
                    param.default.clone().unwrap_or(Value::Null)
                }
                Some(v) => v,
                None if param.required => {
                    return Err(RpcError::InvalidParams(format!(
                        "{name}() missing required argument '{}'",
                        param.name
                    )))
                }
                None => param.default.clone().unwrap_or(Value::Null),
            };
            if (param.required || !value.is_null()) && !fits(param.kind, &value) {
                return Err(RpcError::InvalidParams(format!(
                    "argument '{}' of {name}() must be {}",
                    param.name,
                    match param.kind {
                        RpcType::Integer => "an integer",
                        RpcType::Array => "an array",
                        RpcType::Object => "an object",
                        other => other.as_str(),
                    }
                )));
            }
            bound.push(value);
        }
        Ok(Args {
            function: self.clone(),
            values: bound,
        })
    }
}

fn fits(kind: RpcType, value: &Value) -> bool {
    match kind {
        RpcType::Any => true,
        RpcType::String => value.is_string(),
        RpcType::Integer => value.is_i64() || value.is_u64(),
        RpcType::Number => value.is_number(),
        RpcType::Boolean => value.is_boolean(),
        RpcType::Array => value.is_array(),
        RpcType::Object => value.is_object(),
    }
}

/// pydoc.getdoc's cleaning: blank lines at both ends dropped, common indentation removed.
pub fn clean_doc(doc: &str) -> String {
    let lines: Vec<&str> = doc.lines().collect();
    let indent = lines
        .iter()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.trim_start().to_owned()
            } else {
                l.get(indent..).unwrap_or("").trim_end().to_owned()
            }
        })
        .collect();
    while out.first().is_some_and(|l| l.trim().is_empty()) {
        out.remove(0);
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.join("\n")
}

/// The registry. Cheap to clone; registration works while serving.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

struct Inner {
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
    scripts: Arc<Scripts>,
    jobs: Jobs,
}

/// What [`Rpc::register`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Added,
    /// The name was taken: the first registration stays (py-jrpc's rule).
    Ignored,
}

impl Rpc {
    /// A registry with the built-ins and host functions, over the script catalog.
    pub fn new(scripts: Arc<Scripts>, jobs: Jobs) -> Self {
        let rpc = Rpc {
            inner: Arc::new(Inner {
                functions: RwLock::new(BTreeMap::new()),
                scripts,
                jobs,
            }),
        };
        builtins::register(&rpc);
        host::register(&rpc);
        rpc
    }

    fn weak(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    fn from_weak(weak: &Weak<Inner>) -> Option<Rpc> {
        weak.upgrade().map(|inner| Rpc { inner })
    }

    /// Adds a function under `name`. A name already registered keeps its first function.
    pub fn register(&self, name: &str, function: Function) -> Registered {
        let mut functions = self
            .inner
            .functions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if functions.contains_key(name) {
            tracing::warn!(
                name,
                "an RPC function with this name exists; kept the first"
            );
            return Registered::Ignored;
        }
        functions.insert(name.to_owned(), Arc::new(function));
        Registered::Added
    }

    /// The function of a name: a registered one, else a script.
    pub fn lookup(&self, name: &str) -> Option<Arc<Function>> {
        if let Some(f) = self
            .inner
            .functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(f.clone());
        }
        let script = self.inner.scripts.catalog().get(name)?;
        Some(Arc::new(builtins::script_function(
            &script,
            self.inner.jobs.clone(),
        )))
    }

    /// Every callable name, sorted by code point. Reserved `rpc.*` names are left out,
    /// as `list_methods` shows them.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|n| !n.starts_with("rpc."))
            .cloned()
            .collect();
        names.extend(self.inner.scripts.catalog().scripts.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Doc, parameters, role and source of one function.
    pub fn describe(&self, name: &str) -> Option<RpcMethod> {
        self.lookup(name).map(|f| f.describe(name))
    }

    /// Every listed function, described.
    pub fn describe_all(&self) -> Vec<RpcMethod> {
        self.names()
            .iter()
            .filter_map(|n| self.describe(n))
            .collect()
    }

    /// Resolves and runs one call: lookup, role, binding, handler.
    pub async fn call(
        &self,
        name: &str,
        params: Params,
        caller: &Identity,
    ) -> Result<Value, RpcError> {
        let function = self
            .lookup(name)
            .ok_or_else(|| RpcError::MethodNotFound(name.to_owned()))?;
        if !caller.role.allows(function.role) {
            return Err(RpcError::Forbidden(format!(
                "{} has role {}, {name} needs {}",
                caller.name, caller.role, function.role
            )));
        }
        let args = function.bind(name, params)?;
        let span = tracing::debug_span!("rpc", method = name, caller = %caller.name);
        // A function that panics (a bug in a program embedding opsbox) fails its own
        // call, not the connection with every other call of a batch: whether it panics
        // making its future (a sync handler runs there) or while it runs.
        let panicked = || {
            tracing::error!(method = name, "an rpc function panicked");
            RpcError::failed(format!("{name} panicked (a bug in the function)"))
        };
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (function.handler)(Call {
                args,
                caller: caller.clone(),
            })
        }));
        let result = match made {
            Ok(future) => {
                use futures::FutureExt;
                std::panic::AssertUnwindSafe(tracing::Instrument::instrument(future, span))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(panicked()))
            }
            Err(_) => Err(panicked()),
        };
        if let Err(e) = &result {
            tracing::debug!(method = name, error = %e, "rpc call failed");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_doc_like_pydoc() {
        assert_eq!(
            clean_doc("\n    :param a: x\n      more\n    "),
            ":param a: x\n  more"
        );
        assert_eq!(clean_doc("one line"), "one line");
        assert_eq!(clean_doc(""), "");
    }

    #[test]
    fn binding() {
        let f = Arc::new(
            Function::sync(|(a, b): (i64, i64)| Ok(a + b))
                .param("a", RpcType::Integer)
                .param_default("b", RpcType::Integer, 2),
        );
        let args = f.bind("add", Params::Positional(vec![1.into()])).unwrap();
        assert_eq!(args.values(), &[Value::from(1), Value::from(2)]);
        let mut named = serde_json::Map::new();
        named.insert("b".into(), 5.into());
        named.insert("a".into(), 1.into());
        let args = f.bind("add", Params::Named(named)).unwrap();
        assert_eq!(args.get("b"), Some(&Value::from(5)));
        assert!(matches!(
            f.bind("add", Params::Positional(vec![1.into(), 2.into(), 3.into()])),
            Err(RpcError::InvalidParams(m)) if m == "add() takes at most 2 arguments (3 given)"
        ));
        assert!(matches!(
            f.bind("add", Params::None),
            Err(RpcError::InvalidParams(m)) if m == "add() missing required argument 'a'"
        ));
        assert!(matches!(
            f.bind("add", Params::Positional(vec!["1".into()])),
            Err(RpcError::InvalidParams(m)) if m == "argument 'a' of add() must be an integer"
        ));
    }
}

#[cfg(test)]
mod registry_tests;
