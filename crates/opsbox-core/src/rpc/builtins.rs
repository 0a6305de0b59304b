//! The built-in functions every opsbox serves (py-jrpc's `ping`, `list_methods`,
//! `method_help`, `method_signature`, plus OpenRPC's `rpc.discover`), and the function
//! that stands for a script of the catalog.

use std::collections::BTreeMap;

use opsbox_api::{JobState, Role, RpcSource, RpcType, Script};
use serde_json::{json, Value};

use super::{Function, Rpc, RpcError};
use crate::jobs::Jobs;
use crate::CoreError;

pub(super) fn register(rpc: &Rpc) {
    let builtin = |f: Function| f.role(Role::Reader).source(RpcSource::Builtin);
    rpc.register(
        "ping",
        builtin(Function::sync(|()| Ok("pong")).doc(":return: response to ping")),
    );

    let weak = rpc.weak();
    rpc.register(
        "list_methods",
        builtin(
            Function::sync(move |()| {
                Ok(Rpc::from_weak(&weak).map(|r| r.names()).unwrap_or_default())
            })
            .doc(":return: the names of every function this server serves, sorted"),
        ),
    );

    let weak = rpc.weak();
    rpc.register(
        "method_help",
        builtin(
            Function::sync(move |(method_name,): (String,)| {
                let found = Rpc::from_weak(&weak).and_then(|r| r.describe(&method_name));
                Ok(match found {
                    Some(method) => method.doc,
                    None => format!("Method [{method_name}] not found"),
                })
            })
            .doc(":param method_name: a function name\n:return: the help text of that function")
            .param("method_name", RpcType::String),
        ),
    );

    let weak = rpc.weak();
    rpc.register(
        "method_signature",
        builtin(
            Function::sync(move |(method_name,): (String,)| {
                let found = Rpc::from_weak(&weak).and_then(|r| r.describe(&method_name));
                let signature = match found {
                    Some(method) => json!(method
                        .params
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()),
                    None => json!("method/function not found"),
                };
                Ok(json!({ method_name: signature }))
            })
            .doc(
                ":param method_name: a function name\n\
                 :return: {method_name: [its parameter names, in order]}",
            )
            .param("method_name", RpcType::String),
        ),
    );

    let weak = rpc.weak();
    rpc.register(
        "rpc.discover",
        builtin(
            Function::sync(move |()| {
                Ok(Rpc::from_weak(&weak)
                    .map(|r| openrpc(&r))
                    .unwrap_or(Value::Null))
            })
            .doc(":return: the OpenRPC document of every function"),
        ),
    );
}

/// The OpenRPC 1.2 document of the registry, consistent with `list_methods` and
/// `method_signature` (same names, same parameter names and order).
pub fn openrpc(rpc: &Rpc) -> Value {
    let methods: Vec<Value> = rpc
        .describe_all()
        .into_iter()
        .map(|m| {
            let params: Vec<Value> = m
                .params
                .iter()
                .map(|p| {
                    let mut schema = match p.kind {
                        RpcType::Any => json!({}),
                        other => json!({ "type": other.as_str() }),
                    };
                    if let Some(default) = &p.default {
                        schema["default"] = default.clone();
                    }
                    let mut param = json!({
                        "name": p.name,
                        "required": p.required,
                        "schema": schema,
                    });
                    if let Some(d) = &p.description {
                        param["description"] = json!(d);
                    }
                    param
                })
                .collect();
            json!({
                "name": m.name,
                "description": m.doc,
                "paramStructure": "either",
                "params": params,
                "result": {"name": "result", "schema": {}},
                "x-opsbox-role": m.role,
                "x-opsbox-source": m.source,
            })
        })
        .collect();
    json!({
        "openrpc": "1.2.6",
        "info": {"title": "opsbox", "version": env!("CARGO_PKG_VERSION")},
        "methods": methods,
    })
}

/// A script as a function: its params are optional (or required) named string
/// arguments; numbers and booleans are passed as their JSON text, `null` omits the
/// param. A call runs the script as a job and waits for it. A job that does not
/// succeed is a [`RpcError::Failed`] whose data is the summary below.
pub(super) fn script_function(script: &Script, jobs: Jobs) -> Function {
    let name = script.name.clone();
    let mut doc = script.description.clone().unwrap_or_default();
    for p in &script.params {
        if !doc.is_empty() {
            doc.push('\n');
        }
        doc.push_str(&format!(
            ":param {}: {}",
            p.name,
            p.description.as_deref().unwrap_or("")
        ));
    }
    let mut function = Function::raw(move |call| {
        let jobs = jobs.clone();
        let name = name.clone();
        async move {
            let mut params = BTreeMap::new();
            for (key, value) in call.args.iter() {
                let text = match value {
                    Value::Null => continue,
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                params.insert(key.to_owned(), text);
            }
            let by = (call.caller.name != "anonymous").then(|| call.caller.name.clone());
            let (job, output) = jobs.run(&name, params, by).await.map_err(|e| match e {
                CoreError::Invalid(m) => RpcError::InvalidParams(m),
                CoreError::UnknownScript(s) => RpcError::MethodNotFound(s),
                other => RpcError::failed(other.to_string()),
            })?;
            let summary = json!({
                "job": job.name,
                "state": job.state,
                "exit_code": job.exit_code,
                "stdout": output.stdout.join("\n"),
                "stderr": output.stderr.join("\n"),
                "return_values": job.return_values,
            });
            if job.state == JobState::Succeeded {
                Ok(summary)
            } else {
                Err(RpcError::Failed {
                    message: format!(
                        "script {name} {}: job {}{}",
                        job.state,
                        job.name,
                        job.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    data: Some(summary),
                })
            }
        }
    })
    .doc(&doc)
    .role(Role::Operator)
    .source(RpcSource::Script);
    for p in &script.params {
        function = if p.required {
            function.param(&p.name, RpcType::Any)
        } else {
            function.param_optional(&p.name, RpcType::Any)
        };
        if let Some(last) = function.params.last_mut() {
            last.description = p.description.clone();
        }
    }
    function
}
