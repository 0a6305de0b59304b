//! `opsbox rpc call|list|help`: the functions of the RPC registry (built-ins, host
//! introspection, scripts, embedded functions) through the SDK's JSON-RPC calls.

use anyhow::Context as _;
use clap::Subcommand;
use opsbox_api::RpcMethod;
use serde_json::{Map, Value};

use super::{output, Ctx};

#[derive(Subcommand, Debug)]
#[command(disable_help_subcommand = true)]
pub enum RpcCommand {
    /// Call a function: `opsbox rpc call add 1 2`, `opsbox rpc call greet name=Ada`,
    /// `opsbox rpc call add --params '{"a": 1}'`. A script call waits for its job.
    Call {
        /// Function name.
        name: String,
        /// Arguments: `VALUE` by position or `NAME=VALUE` by name (not both). A value
        /// that parses as JSON (`1`, `true`, `[1,2]`) is sent as that JSON, any other
        /// as a string.
        args: Vec<String>,
        /// All params as one JSON array or object, instead of ARGS.
        #[arg(long = "params", value_name = "JSON", conflicts_with = "args")]
        params: Option<String>,
    },
    /// List every function with its parameters.
    List,
    /// Show a function's signature and help text.
    Help {
        /// Function name.
        name: String,
    },
}

pub async fn run(ctx: &Ctx, command: RpcCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        RpcCommand::Call { name, args, params } => {
            let params = match params {
                Some(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(value @ (Value::Array(_) | Value::Object(_))) => value,
                    _ => {
                        return Err(super::UsageError(format!(
                            "--params must be a JSON array or object, not {text}"
                        ))
                        .into())
                    }
                },
                None => params_of(&args)?,
            };
            let result = match client.rpc_call_value(&name, params).await {
                Err(opsbox_client::ClientError::Rpc { code: -32601, .. }) => {
                    anyhow::bail!("no function is named '{name}' here (opsbox rpc list shows them)")
                }
                other => other?,
            };
            match (&result, ctx.json) {
                (Value::String(text), false) => println!("{text}"),
                _ => output::json(&result)?,
            }
            Ok(0)
        }
        RpcCommand::List => {
            let methods = client.rpc_methods().await?;
            if ctx.json {
                output::json(&methods)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = methods
                .iter()
                .map(|m| {
                    vec![
                        signature(m),
                        format!("{:?}", m.source).to_lowercase(),
                        m.role.to_string(),
                        m.doc.lines().next().unwrap_or("").to_owned(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["FUNCTION", "SOURCE", "ROLE", "HELP"], &rows)
            );
            Ok(0)
        }
        RpcCommand::Help { name } => {
            let method = client
                .rpc_method(&name)
                .await?
                .with_context(|| format!("the server has no function named '{name}'"))?;
            if ctx.json {
                output::json(&method)?;
                return Ok(0);
            }
            println!("{}", signature(&method));
            println!(
                "source: {}, role: {}",
                format!("{:?}", method.source).to_lowercase(),
                method.role
            );
            if !method.doc.is_empty() {
                println!("\n{}", method.doc);
            }
            Ok(0)
        }
    }
}

/// `name(a: integer, b: integer = 2)`.
fn signature(m: &RpcMethod) -> String {
    let params: Vec<String> = m
        .params
        .iter()
        .map(|p| {
            let mut text = format!("{}: {}", p.name, p.kind.as_str());
            match (&p.default, p.required) {
                (Some(d), _) => text.push_str(&format!(" = {d}")),
                (None, false) => text.push_str(" = null"),
                _ => {}
            }
            text
        })
        .collect();
    format!("{}({})", m.name, params.join(", "))
}

/// `NAME=VALUE` split, when NAME looks like a parameter name.
fn named(arg: &str) -> Option<(&str, &str)> {
    arg.split_once('=').filter(|(k, _)| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
    })
}

/// ARGS → positional array or named object.
pub fn params_of(args: &[String]) -> anyhow::Result<Value> {
    if args.is_empty() {
        return Ok(Value::Null);
    }
    let value =
        |text: &str| serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()));
    if args.iter().all(|a| named(a).is_some()) {
        let mut map = Map::new();
        for a in args {
            let (k, v) = named(a).unwrap_or_default();
            map.insert(k.to_owned(), value(v));
        }
        return Ok(Value::Object(map));
    }
    if let Some(a) = args.iter().find(|a| named(a).is_some()) {
        return Err(super::UsageError(format!(
            "'{a}' is by name but other arguments are by position: use one form, or --params JSON"
        ))
        .into());
    }
    Ok(Value::Array(args.iter().map(|a| value(a)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_to_params() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(params_of(&[]).unwrap(), Value::Null);
        assert_eq!(
            params_of(&s(&["1", "x", "[1]"])).unwrap(),
            json!([1, "x", [1]])
        );
        assert_eq!(
            params_of(&s(&["a=1", "b=hi"])).unwrap(),
            json!({"a": 1, "b": "hi"})
        );
        assert!(params_of(&s(&["a=1", "x"])).is_err());
    }
}
