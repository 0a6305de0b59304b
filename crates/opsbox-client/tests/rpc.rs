//! The SDK's RPC calls against an in-process server that embeds a function of its own:
//! typed `call`, raw values, errors by JSON-RPC code, descriptions, and the blocking
//! wrapper.

use opsbox_client::{Client, ClientError};
use opsbox_server::rpc::{Function, RpcError, RpcType};
use opsbox_server::{Server, ServerConfig};

async fn start() -> (tempfile::TempDir, String, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: vec!["127.0.0.1:0".into()],
        data: dir.path().join("data"),
        scripts: dir.path().join("scripts"),
        ..ServerConfig::default()
    };
    let server = Server::builder()
        .config(config)
        .register(
            "add",
            Function::new(|(a, b): (i64, i64)| async move { Ok::<_, RpcError>(a + b) })
                .doc(":return: a + b")
                .param("a", RpcType::Integer)
                .param_default("b", RpcType::Integer, 2),
        )
        .bind()
        .await
        .unwrap();
    let url = server.local_addrs()[0].to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        stopped.await.ok();
    }));
    (dir, url, stop)
}

#[tokio::test]
async fn typed_calls_errors_and_descriptions() {
    let (_dir, url, _stop) = start().await;
    let client = Client::builder(&url).build().unwrap();
    let sum: i64 = client.call("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    let sum: i64 = client.call("add", [5]).await.unwrap();
    assert_eq!(sum, 7);
    let sum: i64 = client
        .call("add", serde_json::json!({"a": 1, "b": 10}))
        .await
        .unwrap();
    assert_eq!(sum, 11);
    let pong: String = client.call("ping", ()).await.unwrap();
    assert_eq!(pong, "pong");
    match client.call::<_, i64>("add", ["x"]).await {
        Err(ClientError::Rpc { code, data, .. }) => {
            assert_eq!(code, -32602);
            assert_eq!(data.unwrap(), "argument 'a' of add() must be an integer");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.call::<_, i64>("nope", ()).await,
        Err(ClientError::Rpc { code: -32601, .. })
    ));
    let add = client.rpc_method("add").await.unwrap().unwrap();
    assert_eq!(add.doc, ":return: a + b");
    assert_eq!(add.params.len(), 2);
    assert!(!add.params[1].required);
    assert_eq!(add.params[1].default, Some(serde_json::json!(2)));
    let names: Vec<String> = client.call("list_methods", ()).await.unwrap();
    let described: Vec<String> = client
        .rpc_methods()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, described);

    let blocking = std::thread::spawn(move || {
        let client = opsbox_client::blocking::Client::builder(&url)
            .build()
            .unwrap();
        client.call::<_, i64>("add", (2, 2)).unwrap()
    });
    assert_eq!(
        tokio::task::spawn_blocking(move || blocking.join().unwrap())
            .await
            .unwrap(),
        4
    );
}
