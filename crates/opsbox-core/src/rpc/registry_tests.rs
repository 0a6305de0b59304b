//! The registry against a real core (SQLite in a temp dir, a scripts directory).

use std::os::unix::fs::PermissionsExt;

use opsbox_api::{Role, RpcSource, RpcType};
use serde_json::{json, Value};

use super::{Function, Params, Registered, RpcError};
use crate::identities::Identity;
use crate::{Core, CoreConfig};

async fn core() -> (tempfile::TempDir, Core) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let write = |file: &str, text: &str| {
        let path = scripts.join(file);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write(
        "greet.sh",
        "#!/bin/sh\n# -- jojo --\n# description: says hello\n# param: who - whom to greet\n# param: times\n# required: who\n# -- jojo --\nprintf 'hello %s' \"$WHO\"\n",
    );
    write("fail.sh", "#!/bin/sh\necho broken >&2\nexit 4\n");
    let core = Core::open(CoreConfig::new(dir.path().join("data"), scripts))
        .await
        .unwrap();
    (dir, core)
}

fn who(role: Role) -> Identity {
    Identity {
        name: "tester".into(),
        role,
        nodes: Vec::new(),
    }
}

fn pos(values: Vec<Value>) -> Params {
    Params::Positional(values)
}

fn named(value: Value) -> Params {
    Params::Named(value.as_object().unwrap().clone())
}

#[tokio::test]
async fn builtins_describe_every_function() {
    let (_dir, core) = core().await;
    let admin = who(Role::Admin);
    let rpc = &core.rpc;
    assert_eq!(
        rpc.call("ping", Params::None, &admin).await,
        Ok(json!("pong"))
    );
    let names = rpc
        .call("list_methods", Params::None, &admin)
        .await
        .unwrap();
    let names: Vec<String> = serde_json::from_value(names).unwrap();
    for expected in [
        "check_process",
        "cpuinfo",
        "disk_usage",
        "fail",
        "get_env",
        "greet",
        "ifconfig",
        "iostat",
        "list_methods",
        "meminfo",
        "method_help",
        "method_signature",
        "mount",
        "ping",
        "running_process",
        "uptime",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} missing from {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "list_methods is sorted");
    assert!(!names.iter().any(|n| n.starts_with("rpc.")));

    assert_eq!(
        rpc.call(
            "method_signature",
            pos(vec!["check_process".into()]),
            &admin
        )
        .await,
        Ok(json!({"check_process": ["process"]}))
    );
    assert_eq!(
        rpc.call("method_signature", pos(vec!["ping".into()]), &admin)
            .await,
        Ok(json!({"ping": []}))
    );
    assert_eq!(
        rpc.call("method_signature", pos(vec!["nope".into()]), &admin)
            .await,
        Ok(json!({"nope": "method/function not found"}))
    );
    assert_eq!(
        rpc.call(
            "method_signature",
            named(json!({"method_name": "greet"})),
            &admin
        )
        .await,
        Ok(json!({"greet": ["who", "times"]}))
    );
    assert_eq!(
        rpc.call("method_help", pos(vec!["ping".into()]), &admin)
            .await,
        Ok(json!(":return: response to ping"))
    );
    assert_eq!(
        rpc.call("method_help", pos(vec!["nope".into()]), &admin)
            .await,
        Ok(json!("Method [nope] not found"))
    );
    assert!(matches!(
        rpc.call("method_help", Params::None, &admin).await,
        Err(RpcError::InvalidParams(_))
    ));
    let doc = rpc
        .call("rpc.discover", Params::None, &admin)
        .await
        .unwrap();
    assert_eq!(doc["openrpc"], "1.2.6");
    let methods = doc["methods"].as_array().unwrap();
    assert_eq!(
        methods.len(),
        names.len(),
        "rpc.discover lists what list_methods lists"
    );
    let greet = methods.iter().find(|m| m["name"] == "greet").unwrap();
    assert_eq!(greet["params"][0]["name"], "who");
    assert_eq!(greet["params"][0]["required"], true);
    assert_eq!(
        rpc.call("no_such", Params::None, &admin).await,
        Err(RpcError::MethodNotFound("no_such".into()))
    );
}

#[tokio::test]
async fn a_script_call_is_a_job() {
    let (_dir, core) = core().await;
    let operator = who(Role::Operator);
    let result = core
        .rpc
        .call(
            "greet",
            named(json!({"who": "world", "times": 2})),
            &operator,
        )
        .await
        .unwrap();
    assert_eq!(result["state"], "succeeded");
    assert_eq!(result["stdout"], "hello world");
    let job = core
        .jobs
        .get(result["job"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(job.script, "greet");
    assert_eq!(job.params["times"], "2");
    assert_eq!(job.submitted_by.as_deref(), Some("tester"));
    // Positional binding follows the declared order.
    let result = core
        .rpc
        .call("greet", pos(vec!["you".into()]), &operator)
        .await
        .unwrap();
    assert_eq!(result["stdout"], "hello you");
    assert!(matches!(
        core.rpc.call("greet", Params::None, &operator).await,
        Err(RpcError::InvalidParams(m)) if m.contains("'who'")
    ));
    match core.rpc.call("fail", Params::None, &operator).await {
        Err(RpcError::Failed { message, data }) => {
            assert!(message.contains("failed"), "{message}");
            let data = data.unwrap();
            assert_eq!(data["exit_code"], 4);
            assert_eq!(data["stderr"], "broken");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // A reader may describe a script but not run it.
    assert!(matches!(
        core.rpc
            .call("greet", pos(vec!["x".into()]), &who(Role::Reader))
            .await,
        Err(RpcError::Forbidden(_))
    ));
}

#[tokio::test]
async fn registered_functions_sync_async_blocking() {
    let (_dir, core) = core().await;
    let rpc = &core.rpc;
    assert_eq!(
        rpc.register(
            "add",
            Function::new(|(a, b): (i64, i64)| async move { Ok::<_, RpcError>(a + b) })
                .doc("\n    Adds.\n    :param a: first\n")
                .param("a", RpcType::Integer)
                .param_default("b", RpcType::Integer, 2),
        ),
        Registered::Added
    );
    rpc.register(
        "shout",
        Function::sync(|(s,): (String,)| Ok(s.to_uppercase()))
            .param("s", RpcType::String)
            .role(Role::Reader),
    );
    rpc.register(
        "sum",
        Function::blocking(|(v,): (Vec<f64>,)| Ok(v.iter().sum::<f64>()))
            .param("v", RpcType::Array),
    );
    // The first registration wins: built-ins cannot be replaced.
    assert_eq!(
        rpc.register("ping", Function::sync(|()| Ok("hijacked"))),
        Registered::Ignored
    );
    let op = who(Role::Operator);
    assert_eq!(
        rpc.call("add", pos(vec![1.into()]), &op).await,
        Ok(json!(3))
    );
    assert_eq!(
        rpc.call("add", named(json!({"b": 5, "a": 1})), &op).await,
        Ok(json!(6))
    );
    assert_eq!(
        rpc.call("shout", pos(vec!["hi".into()]), &who(Role::Reader))
            .await,
        Ok(json!("HI"))
    );
    assert_eq!(
        rpc.call("sum", pos(vec![json!([1, 2.5])]), &op).await,
        Ok(json!(3.5))
    );
    assert_eq!(rpc.call("ping", Params::None, &op).await, Ok(json!("pong")));
    assert!(matches!(
        rpc.call("add", named(json!({"a": 1, "c": 2})), &op).await,
        Err(RpcError::InvalidParams(m)) if m == "add() got an unexpected keyword argument 'c'"
    ));
    assert!(matches!(
        rpc.call("add", pos(vec![1.into()]), &who(Role::Reader))
            .await,
        Err(RpcError::Forbidden(_))
    ));
    let add = rpc.describe("add").unwrap();
    assert_eq!(add.doc, "Adds.\n:param a: first");
    assert_eq!(add.source, RpcSource::Registered);
    assert_eq!(add.params[1].default, Some(json!(2)));
}

#[tokio::test]
async fn host_functions_answer_the_envelope() {
    let (_dir, core) = core().await;
    let admin = who(Role::Admin);
    for name in [
        "uptime",
        "mount",
        "disk_usage",
        "iostat",
        "ifconfig",
        "cpuinfo",
        "meminfo",
        "running_process",
    ] {
        let out = core.rpc.call(name, Params::None, &admin).await.unwrap();
        assert_eq!(out["error"], "", "{name}: {out}");
        assert!(out.get("output").is_some(), "{name}: {out}");
    }
    let up = core.rpc.call("uptime", Params::None, &admin).await.unwrap();
    let line = up["output"].as_str().unwrap();
    assert!(
        line.contains(" up ") && line.contains("load average: ") && line.ends_with('\n'),
        "{line}"
    );
    let mem = core
        .rpc
        .call("meminfo", Params::None, &admin)
        .await
        .unwrap();
    assert!(mem["output"]["memory"]["total"].as_u64().unwrap() > 0);
    assert!(mem["output"]["swap"].get("sin").is_some());
    let cpu = core
        .rpc
        .call("cpuinfo", Params::None, &admin)
        .await
        .unwrap();
    assert!(cpu["output"]["no_of_cpu"].as_u64().unwrap() >= 1);
    assert!(cpu["output"]["cputimes"]["user"].is_number());
    let ps = core
        .rpc
        .call("running_process", Params::None, &admin)
        .await
        .unwrap();
    assert_eq!(ps["output"][0], "COMMAND");
    let me = std::process::id().to_string();
    let found = core
        .rpc
        .call("check_process", pos(vec![me.clone().into()]), &admin)
        .await
        .unwrap();
    let mine = found["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == me.as_str())
        .unwrap();
    for field in [
        "user",
        "pid",
        "pcpu",
        "pmem",
        "starttime",
        "args",
        "threadcount",
    ] {
        assert!(mine[field].is_string(), "{field} is a string: {mine}");
    }
    // get_env: admin only, secrets redacted unless revealed.
    std::env::set_var("OPSBOX_TEST_API_TOKEN", "hunter2");
    assert!(matches!(
        core.rpc
            .call("get_env", Params::None, &who(Role::Operator))
            .await,
        Err(RpcError::Forbidden(_))
    ));
    let env = core
        .rpc
        .call("get_env", Params::None, &admin)
        .await
        .unwrap();
    let text = env["output"].as_str().unwrap();
    assert!(
        text.starts_with('{') && text.contains("'OPSBOX_TEST_API_TOKEN': '<redacted>'"),
        "{text}"
    );
    let env = core
        .rpc
        .call("get_env", pos(vec![true.into()]), &admin)
        .await
        .unwrap();
    assert!(env["output"].as_str().unwrap().contains("'hunter2'"));
}

#[tokio::test]
async fn a_function_that_panics_fails_its_own_call() {
    let (_dir, core) = core().await;
    let rpc = &core.rpc;
    rpc.register(
        "boom_sync",
        Function::sync(|(): ()| -> Result<i64, RpcError> { panic!("bug") }),
    );
    rpc.register(
        "boom_async",
        Function::new(|(): ()| async move {
            tokio::task::yield_now().await;
            if true {
                panic!("bug");
            }
            Ok::<_, RpcError>(1)
        }),
    );
    let op = who(Role::Operator);
    for name in ["boom_sync", "boom_async"] {
        match rpc.call(name, Params::None, &op).await {
            Err(RpcError::Failed { message, .. }) => assert!(message.contains("panicked")),
            other => panic!("{name}: {other:?}"),
        }
    }
    // The registry goes on.
    assert_eq!(rpc.call("ping", Params::None, &op).await, Ok(json!("pong")));
}
