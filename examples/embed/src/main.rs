//! A program with its own opsbox: the built-ins, host introspection and the scripts
//! directory, plus functions of its own, callable by py-jrpc's client, curl, any
//! JSON-RPC 2.0 client and `opsbox rpc call`:
//!
//! ```text
//! cargo run -p opsbox-embed-example -- 127.0.0.1:9999
//! curl -X POST localhost:9999 -d '{"add": [1, 2]}'         → {"add": 3}
//! curl localhost:9999/method_signature;add                  → {"method_signature": {"add": ["a", "b"]}}
//! curl localhost:9999/rpc -d '{"jsonrpc":"2.0","method":"greet","params":{"name":"Ada"},"id":1}'
//! ```

use opsbox_server::rpc::{Function, Role, RpcError, RpcType};
use opsbox_server::{Server, ServerBuilder, ServerConfig};
use serde::Serialize;

#[derive(Serialize)]
struct Greeting {
    text: String,
    length: usize,
}

/// The functions this program adds to its opsbox.
pub fn builder(config: ServerConfig) -> ServerBuilder {
    Server::builder()
        .config(config)
        // async, typed parameters, a default: add(a, b=2)
        .register(
            "add",
            Function::new(|(a, b): (i64, i64)| async move {
                a.checked_add(b)
                    .ok_or_else(|| RpcError::InvalidParams("a + b overflows".into()))
            })
            .doc(":param a: a number\n:param b: another one (default 2)\n:return: a + b")
            .param("a", RpcType::Integer)
            .param_default("b", RpcType::Integer, 2)
            .role(Role::Reader),
        )
        // sync, returns a struct
        .register(
            "greet",
            Function::sync(|(name,): (String,)| {
                if name.is_empty() {
                    return Err(RpcError::InvalidParams("name must not be empty".into()));
                }
                let text = format!("Hello, {name}!");
                Ok(Greeting {
                    length: text.len(),
                    text,
                })
            })
            .doc(":param name: whom to greet\n:return: {text, length}")
            .param("name", RpcType::String)
            .role(Role::Reader),
        )
        // blocking work runs on tokio's blocking pool
        .register(
            "count_lines",
            Function::blocking(|(path,): (String,)| {
                std::fs::read_to_string(&path)
                    .map(|t| t.lines().count())
                    .map_err(|e| RpcError::failed(format!("cannot read {path}: {e}")))
            })
            .doc(":param path: a file on the server\n:return: its number of lines")
            .param("path", RpcType::String)
            .role(Role::Operator),
        )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ServerConfig::default();
    if let Some(address) = std::env::args().nth(1) {
        config.listen = vec![address];
    }
    let server = builder(config).bind().await?;
    for address in server.local_addrs() {
        eprintln!("embedded opsbox listening on {address}");
    }
    server
        .run(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registered_functions_are_served_by_every_face() {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            listen: vec!["127.0.0.1:0".into()],
            data: dir.path().join("data"),
            scripts: dir.path().join("scripts"),
            ..ServerConfig::default()
        };
        let server = builder(config).bind().await.unwrap();
        let base = format!(
            "http://{}",
            server.local_addrs()[0]
                .to_string()
                .trim_start_matches("http://")
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            stopped.await.ok();
        }));
        let http = reqwest::Client::new();
        let jrpc = http
            .post(&base)
            .body(r#"{"add": [1]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(jrpc.text().await.unwrap(), r#"{"add": 3}"#);
        let sig = http
            .get(format!("{base}/method_signature;add"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            sig.text().await.unwrap(),
            r#"{"method_signature": {"add": ["a", "b"]}}"#
        );
        let rpc = http
            .post(format!("{base}/rpc"))
            .body(r#"{"jsonrpc":"2.0","method":"greet","params":{"name":"Ada"},"id":1}"#)
            .send()
            .await
            .unwrap();
        let answer: serde_json::Value = rpc.json().await.unwrap();
        assert_eq!(answer["result"]["text"], "Hello, Ada!");
        let list = http
            .get(format!("{base}/list_methods"))
            .send()
            .await
            .unwrap();
        let text = list.text().await.unwrap();
        assert!(
            text.contains(r#""add", "check_process", "count_lines""#),
            "{text}"
        );
        // A taken name is refused at bind.
        let taken = Server::builder()
            .listen("127.0.0.1:0")
            .config(ServerConfig {
                listen: vec!["127.0.0.1:0".into()],
                data: dir.path().join("data2"),
                scripts: dir.path().join("scripts"),
                ..ServerConfig::default()
            })
            .register("ping", Function::sync(|()| Ok("mine")))
            .bind()
            .await;
        assert!(taken.is_err());
        stop.send(()).ok();
        task.await.unwrap().unwrap();
    }
}
