//! JSON-RPC 2.0 at `/rpc` over a real socket: the test vectors of the wire reference
//! §11 byte for byte, the HTTP rules of §12 (always 200, empty body for
//! notifications, any Content-Type, POST only), batches, auth per method, and the
//! WebSocket with subscriptions to the watch stream.

mod common;

use common::TestServer;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn rpc(server: &TestServer, body: &str) -> (u16, String) {
    rpc_with(server, body, "application/json").await
}

async fn rpc_with(server: &TestServer, body: &str, content_type: &str) -> (u16, String) {
    let response = common::client()
        .post(server.url("/rpc"))
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn spec_test_vectors() {
    let server = TestServer::start().await;
    let vectors: &[(&str, &str)] = &[
        (
            r#"{"jsonrpc":"2.0","method":"method_help","params":["ping"],"id":7}"#,
            r#"{"jsonrpc":"2.0","result":":return: response to ping","id":7}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"method_signature","params":{"method_name":"check_process"},"id":"s1"}"#,
            r#"{"jsonrpc":"2.0","result":{"check_process":["process"]},"id":"s1"}"#,
        ),
        (r#"{"jsonrpc":"2.0","method":"ping"}"#, ""),
        (
            r#"{"jsonrpc":"2.0","method":"ping","id":null}"#,
            r#"{"jsonrpc":"2.0","result":"pong","id":null}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"no_such","id":8}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":8}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"ping","params":"x","id":10}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":10}"#,
        ),
        (
            r#"{"jsonrpc":"1.0","method":"ping","id":11}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":11}"#,
        ),
        (
            r#"{"jsonrpc":2.0,"method":"ping","id":12}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":12}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"ping","id":[1]}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"ping","#,
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}"#,
        ),
        (
            "17",
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}"#,
        ),
        (
            "{}",
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}"#,
        ),
        (
            "[]",
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}"#,
        ),
        (
            r#"[3, "x"]"#,
            r#"[{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null},{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}]"#,
        ),
        (
            r#"[{"jsonrpc":"2.0","method":"ping","id":"a"},{"jsonrpc":"2.0","method":"ping"},{"bogus":true},{"jsonrpc":"2.0","method":"no_such","id":"b"}]"#,
            r#"[{"jsonrpc":"2.0","result":"pong","id":"a"},{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null},{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":"b"}]"#,
        ),
        (
            r#"[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"uptime"}]"#,
            "",
        ),
        (
            r#"[{"jsonrpc":"2.0","method":"ping","id":1},{"jsonrpc":"2.0","method""#,
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}"#,
        ),
        // A method that is not a string, params that are neither array nor object
        // (null included), an id of the wrong type: Invalid Request, with the id when
        // it is one.
        (
            r#"{"jsonrpc":"2.0","method":1,"id":13}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":13}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"ping","params":null,"id":14}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":14}"#,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"ping","id":true}"#,
            r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}"#,
        ),
        // Members in any order, unknown members ignored, a repeated member counts
        // the last time, escapes in names and values read as JSON.
        (
            r#"{"id":15,"x":{"deep":[1,{"a":2}]},"method":"no_such","params":[],"jsonrpc":"2.0","method":"ping"}"#,
            r#"{"jsonrpc":"2.0","result":"pong","id":15}"#,
        ),
        (
            r#"{"jsonrpc":"2\u002e0","\u006dethod":"p\u0069ng","id":16}"#,
            r#"{"jsonrpc":"2.0","result":"pong","id":16}"#,
        ),
    ];
    for (request, expected) in vectors {
        let (status, body) = rpc(&server, request).await;
        assert_eq!(status, 200, "{request}");
        assert_eq!(&body, expected, "{request}");
    }
    // Ids are echoed exactly.
    for id in ["-5", "1.5", r#""""#, "18446744073709551615"] {
        let (_, body) = rpc(
            &server,
            &format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{id}}}"#),
        )
        .await;
        assert_eq!(
            body,
            format!(r#"{{"jsonrpc":"2.0","result":"pong","id":{id}}}"#)
        );
    }
    // Invalid params carry the reason in data.
    let (_, body) = rpc(
        &server,
        r#"{"jsonrpc":"2.0","method":"method_help","params":[],"id":9}"#,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32602);
    assert_eq!(v["error"]["message"], "Invalid params");
    assert_eq!(
        v["error"]["data"],
        "method_help() missing required argument 'method_name'"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn http_rules() {
    let server = TestServer::start_with(|c| c.rpc.max_batch = 3).await;
    for ct in [
        "application/json-rpc",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "application/jsonrequest",
    ] {
        let (status, body) =
            rpc_with(&server, r#"{"jsonrpc":"2.0","method":"ping","id":1}"#, ct).await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"jsonrpc":"2.0","result":"pong","id":1}"#),
            "{ct}"
        );
    }
    let big = format!(
        r#"{{"jsonrpc":"2.0","method":"ping","params":["{}"],"id":1}}"#,
        "x".repeat(2 << 20)
    );
    let (status, body) = rpc(&server, &big).await;
    assert_eq!(status, 413);
    assert!(
        body.starts_with(r#"{"jsonrpc":"2.0","error":{"code":-32007,"#),
        "{body}"
    );
    let response = common::client()
        .get(server.url("/rpc"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let call = r#"{"jsonrpc":"2.0","method":"ping","id":1}"#;
    let (status, body) = rpc(&server, &format!("[{call},{call},{call},{call}]")).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32010, "{body}");
    // Batches run concurrently but answer in request order.
    let (_, body) = rpc(
        &server,
        r#"[{"jsonrpc":"2.0","method":"echo","params":{"text":"slow"},"id":1},{"jsonrpc":"2.0","method":"ping","id":2},{"jsonrpc":"2.0","method":"add","id":3}]"#,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["result"]["stdout"], "slow");
    assert_eq!(v[1]["result"], "pong");
    assert_eq!(v[2]["error"]["code"], -32601);
    // Subscriptions need the WebSocket.
    let (_, body) = rpc(
        &server,
        r#"{"jsonrpc":"2.0","method":"watch_subscribe","id":1}"#,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32603);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("WebSocket"));
    // A failed script is a call error with the job in data.
    let (_, body) = rpc(&server, r#"{"jsonrpc":"2.0","method":"report","id":1}"#).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], -32000);
    assert_eq!(v["error"]["data"]["exit_code"], 3);
    let (_, body) = rpc(
        &server,
        r#"{"jsonrpc":"2.0","method":"rpc.discover","id":1}"#,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["result"]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "echo"));
    server.shutdown().await;
}

#[tokio::test]
async fn auth_per_method() {
    let server = TestServer::start().await;
    let client = common::client();
    for (name, role) in [("admin", "admin"), ("rita", "reader")] {
        let r = client
            .post(server.url("/v1/users"))
            .basic_auth("admin", Some("pw"))
            .json(&json!({"name": name, "password": "pw", "role": role}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let call = |user: Option<&'static str>, method: &'static str| {
        let mut request = client
            .post(server.url("/rpc"))
            .body(format!(r#"{{"jsonrpc":"2.0","method":"{method}","id":1}}"#));
        if let Some(user) = user {
            request = request.basic_auth(user, Some("pw"));
        }
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, body) = call(None, "ping").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = call(Some("rita"), "ping").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"jsonrpc":"2.0","result":"pong","id":1}"#)
    );
    let (_, body) = call(Some("rita"), "get_env").await;
    assert!(body.contains(r#""code":-32001"#), "{body}");
    let (_, body) = call(Some("admin"), "get_env").await;
    assert!(body.contains(r#""result":{"#), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_calls_batches_and_subscriptions() {
    let server = TestServer::start().await;
    let url = server.url("/rpc").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let next = async move |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no message: {other:?}"),
            }
        }
    };
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"ping","id":1}"#.into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut ws).await,
        json!({"jsonrpc":"2.0","result":"pong","id":1})
    );
    let batch: Vec<Value> = (0..100)
        .map(|i| json!({"jsonrpc":"2.0","method":"ping","id":i}))
        .collect();
    ws.send(Message::Text(serde_json::to_string(&batch).unwrap()))
        .await
        .unwrap();
    let answers = next(&mut ws).await;
    assert_eq!(answers.as_array().unwrap().len(), 100);
    assert_eq!(answers[99]["id"], 99);

    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"watch_subscribe","id":"s"}"#.into(),
    ))
    .await
    .unwrap();
    let subscribed = next(&mut ws).await;
    let id = subscribed["result"].clone();
    assert!(id.is_u64(), "{subscribed}");
    // A run makes events; they arrive as notifications of the subscription.
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"echo","params":["hi"],"id":2}"#.into(),
    ))
    .await
    .unwrap();
    let mut saw_event = false;
    let mut saw_answer = false;
    while !(saw_event && saw_answer) {
        let m = next(&mut ws).await;
        if m["method"] == "watch" {
            assert_eq!(m["params"]["subscription"], id);
            assert!(m["params"]["result"]["rev"].is_u64(), "{m}");
            saw_event = true;
        } else {
            assert_eq!(m["id"], 2);
            saw_answer = true;
        }
    }
    ws.send(Message::Text(format!(
        r#"{{"jsonrpc":"2.0","method":"watch_unsubscribe","params":[{id}],"id":3}}"#
    )))
    .await
    .unwrap();
    loop {
        let m = next(&mut ws).await;
        if m["id"] == 3 {
            assert_eq!(m["result"], true);
            break;
        }
    }
    ws.send(Message::Text(format!(
        r#"{{"jsonrpc":"2.0","method":"watch_unsubscribe","params":[{id}],"id":4}}"#
    )))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await["result"], false);
    // Resume from revision 0 replays the log from the start.
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"watch_subscribe","params":{"since":0},"id":5}"#.into(),
    ))
    .await
    .unwrap();
    assert!(next(&mut ws).await["result"].is_u64());
    let first = next(&mut ws).await;
    assert_eq!(first["params"]["result"]["rev"], 1, "{first}");
    server.shutdown().await;
}

/// A WebSocket message is held to `max_body_bytes`, as an HTTP body is: a longer one is
/// refused (the connection closed) instead of buffered and answered.
#[tokio::test]
async fn websocket_messages_over_the_body_limit_are_refused() {
    let server = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let url = server.url("/rpc").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let call = |padding: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","method":"ping","id":1,"pad":"{}"}}"#,
            "x".repeat(padding)
        )
    };
    let wait = std::time::Duration::from_secs(10);
    ws.send(Message::Text(call(900))).await.unwrap();
    match tokio::time::timeout(wait, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert!(t.contains("pong"), "{t}"),
        other => panic!("a message under the limit is answered: {other:?}"),
    }
    // The server may close before the whole message is written.
    let _ = ws.send(Message::Text(call(64 * 1024))).await;
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(Message::Text(t)))) => panic!("an over-limit message was answered: {t}"),
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the connection is still open"),
        }
    }
    server.shutdown().await;
}

/// QA: `watch_subscribe` from a revision the log has not reached is the caller's
/// mistake: -32602 (invalid params) with a message that says why, not -32603.
#[tokio::test]
async fn subscribing_from_a_future_revision_is_invalid_params() {
    let server = TestServer::start().await;
    let url = server.url("/rpc").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"watch_subscribe","params":[1000000],"id":1}"#.into(),
    ))
    .await
    .unwrap();
    let answer: Value = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no answer: {other:?}"),
        }
    };
    assert_eq!(answer["id"], 1, "{answer}");
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    assert_eq!(answer["error"]["message"], "Invalid params", "{answer}");
    let why = answer["error"]["data"].as_str().unwrap_or_default();
    assert!(
        why.contains("1000000") && why.contains("ahead of the event log"),
        "the data says which revision is wrong and why: {answer}"
    );
    server.shutdown().await;
}
