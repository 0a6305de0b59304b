//! The model over real sockets: the native `/v1/model` API (statuses and error codes)
//! and the Juju face's WebSocket envelope (login, case-insensitive keys, one reply per
//! request, a `Stop` answered while a `Next` waits). The real jujuclient drives the
//! same face in `compat/test_juju.py`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{client, TestServer};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn start() -> TestServer {
    TestServer::start_with(|c| {
        c.charms = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/charms");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_model_api_deploys_relates_and_refuses_bad_requests() {
    let server = start().await;
    let http = client();
    let post = |path: &str, body: Value| http.post(server.url(path)).json(&body).send();
    let deployed = post(
        "/v1/model/applications",
        json!({"name": "db", "charm": "cs:precise/mysql", "num_units": 1}),
    )
    .await
    .unwrap();
    assert_eq!(deployed.status(), 201);
    let app: Value = deployed.json().await.unwrap();
    assert_eq!(app["charm"], "mysql");
    let r = post(
        "/v1/model/applications",
        json!({"name": "blog", "charm": "wordpress", "config": {"engine": "apache"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    // Refusals: a taken name 409, an unknown charm 404, a bad option or JSON 400.
    let again = post(
        "/v1/model/applications",
        json!({"name": "db", "charm": "mysql"}),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 409);
    let unknown = post(
        "/v1/model/applications",
        json!({"name": "x", "charm": "cs:nosuch"}),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = post(
        "/v1/model/applications",
        json!({"name": "y", "charm": "mysql", "config": {"colour": "red"}}),
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("unknown option"));
    let garbage = http
        .post(server.url("/v1/model/applications"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);

    let related = post("/v1/model/relations", json!({"endpoints": ["blog", "db"]}))
        .await
        .unwrap();
    assert_eq!(related.status(), 201);
    let relation: Value = related.json().await.unwrap();
    assert_eq!(relation["key"], "blog:db db:db");
    let constraints = http
        .put(server.url("/v1/model/applications/blog/constraints"))
        .json(&json!({"cpu-cores": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(constraints.status(), 200);
    let missing = http
        .get(server.url("/v1/model/applications/nosuch"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The hooks run: every unit gets to started.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = server.get_json("/v1/model").await;
        let units = status["units"].as_array().unwrap();
        if units.len() == 2 && units.iter().all(|u| u["status"] == "started") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config: Value = server.get_json("/v1/model/applications/blog/config").await;
    assert_eq!(config["config"]["engine"]["value"], "apache");
    assert_eq!(config["constraints"]["cpu-cores"], 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_api_refuses_bad_names_and_keeps_sizes_in_megabytes() {
    let server = start().await;
    let http = client();
    let post = |body: Value| {
        http.post(server.url("/v1/model/applications"))
            .json(&body)
            .send()
    };
    // A name that could not fit in the hooks' paths, and one Juju would not take.
    let long = "a".repeat(5000);
    for (name, why) in [
        (long.as_str(), "at most 63"),
        ("mysql-2", "invalid application name"),
    ] {
        let r = post(json!({"name": name, "charm": "cs:precise/mysql", "num_units": 1}))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{name:.20}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "bad_request");
        assert!(body["message"].as_str().unwrap().contains(why), "{body}");
    }
    let status: Value = server.get_json("/v1/model").await;
    assert_eq!(status["applications"], json!([]));

    let r = post(json!({"name": "blog", "charm": "wordpress", "num_units": 0,
                        "constraints": {"mem": "4G"}}))
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let app: Value = r.json().await.unwrap();
    assert_eq!(app["constraints"], json!({"mem": 4096}));
    let put = |body: Value| {
        http.put(server.url("/v1/model/applications/blog/constraints"))
            .json(&body)
            .send()
    };
    let r = put(json!({"mem": "1.5G", "root-disk": "2T", "cpu-cores": 2}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let kept = json!({"mem": 1536, "root-disk": 2 * 1024 * 1024, "cpu-cores": 2});
    assert_eq!(r.json::<Value>().await.unwrap(), kept);
    let config: Value = server.get_json("/v1/model/applications/blog/config").await;
    assert_eq!(config["constraints"], kept);
    let r = put(json!({"mem": "4GB"})).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("bad \"mem\" constraint"), "{body}");
    server.shutdown().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn call(ws: &mut Socket, request: Value) -> Value {
    ws.send(Message::Text(request.to_string())).await.unwrap();
    reply(ws).await
}

async fn reply(ws: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no reply within 10 s")
        {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_envelope_login_errors_and_stop_while_next_waits() {
    let server = start().await;
    let url = server.url("/").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();

    // Before login: refused, connection kept.
    let early = call(
        &mut ws,
        json!({"Type": "Client", "Request": "FullStatus", "Version": 0, "RequestId": 1, "Params": {}}),
    )
    .await;
    assert_eq!(early["ErrorCode"], "unauthorized access");
    assert_eq!(early["Response"], json!({}));
    // Keys in any case; RequestId echoed as given.
    let login = call(
        &mut ws,
        json!({"type": "Admin", "REQUEST": "Login", "version": 0, "requestid": 7,
               "params": {"AuthTag": "user-admin", "Password": "any"}}),
    )
    .await;
    assert_eq!(login["RequestId"], 7);
    let facades = login["Response"]["Facades"].as_array().unwrap();
    assert!(facades.contains(&json!({"Name": "Client", "Versions": [0]})));
    let missing = call(
        &mut ws,
        json!({"Type": "Client", "Request": "ServiceGet", "RequestId": 8,
               "Params": {"ServiceName": "nosuch"}}),
    )
    .await;
    assert_eq!(missing["Error"], "service \"nosuch\" not found");
    assert_eq!(missing["ErrorCode"], "not found");
    let bad = call(
        &mut ws,
        json!({"Type": "Client", "Request": "ServiceDeploy", "RequestId": 9,
               "Params": {"ServiceName": 5}}),
    )
    .await;
    assert_eq!(bad["ErrorCode"], "bad request");

    // A watcher: the snapshot, then a Next that waits; a Stop sent meanwhile is answered
    // and the waiting Next ends with "watcher was stopped".
    let watch = call(
        &mut ws,
        json!({"Type": "Client", "Request": "WatchAll", "RequestId": 1, "Params": {}}),
    )
    .await;
    let id = watch["Response"]["AllWatcherId"]
        .as_str()
        .unwrap()
        .to_owned();
    let snapshot = call(
        &mut ws,
        json!({"Type": "AllWatcher", "Request": "Next", "Id": id, "RequestId": 2, "Params": {}}),
    )
    .await;
    let deltas = snapshot["Response"]["Deltas"].as_array().unwrap();
    assert!(deltas.contains(&json!(["machine", "change", deltas[0][2].clone()])));
    assert_eq!(deltas[0][2]["Id"], "0");
    ws.send(Message::Text(
        json!({"Type": "AllWatcher", "Request": "Next", "Id": id, "RequestId": 3, "Params": {}})
            .to_string(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::Text(
        json!({"Type": "AllWatcher", "Request": "Stop", "Id": id, "RequestId": 4, "Params": {}})
            .to_string(),
    ))
    .await
    .unwrap();
    let mut answers = [reply(&mut ws).await, reply(&mut ws).await];
    answers.sort_by_key(|a| a["RequestId"].as_u64());
    assert_eq!(answers[0]["Error"], "watcher was stopped");
    assert_eq!(answers[1]["Response"], json!({}));
    let gone = call(
        &mut ws,
        json!({"Type": "AllWatcher", "Request": "Next", "Id": id, "RequestId": 5, "Params": {}}),
    )
    .await;
    assert_eq!(gone["Error"], "unknown watcher id");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_face_refuses_bad_service_names_and_reports_sizes_in_megabytes() {
    let server = start().await;
    let url = server.url("/").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let login = call(
        &mut ws,
        json!({"Type": "Admin", "Request": "Login", "Version": 0, "RequestId": 1,
               "Params": {"AuthTag": "user-admin", "Password": "any"}}),
    )
    .await;
    assert!(login.get("Error").is_none(), "{login}");
    let mut id = 1;
    let mut client = |request: &str, params: Value| {
        id += 1;
        json!({"Type": "Client", "Request": request, "Version": 0, "RequestId": id,
               "Params": params})
    };

    let long = "a".repeat(5000);
    for (name, why) in [
        (long.as_str(), "at most 63"),
        ("mysql-2", "invalid service name"),
    ] {
        let refused = call(
            &mut ws,
            client(
                "ServiceDeploy",
                json!({"ServiceName": name, "CharmURL": "cs:precise/mysql", "NumUnits": 1,
                       "Config": {}, "Constraints": {}, "ToMachineSpec": null}),
            ),
        )
        .await;
        let error = refused["Error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{refused:.300}");
        assert_eq!(refused["ErrorCode"], "bad request");
        assert_eq!(refused["Response"], json!({}));
    }

    // jujuclient sends mem as an int but root-disk as given ("8G"); both come back as
    // megabytes, the form of Juju's own answers.
    let deployed = call(
        &mut ws,
        client(
            "ServiceDeploy",
            json!({"ServiceName": "blog", "CharmURL": "cs:precise/wordpress", "NumUnits": 0,
                   "Config": {}, "Constraints": {"mem": 2048, "root-disk": "8G"},
                   "ToMachineSpec": null}),
        ),
    )
    .await;
    assert_eq!(deployed["Response"], json!({}), "{deployed}");
    let got = call(
        &mut ws,
        client("GetServiceConstraints", json!({"ServiceName": "blog"})),
    )
    .await;
    assert_eq!(
        got["Response"]["Constraints"],
        json!({"mem": 2048, "root-disk": 8192})
    );
    let set = call(
        &mut ws,
        client(
            "SetServiceConstraints",
            json!({"ServiceName": "blog", "Constraints": {"mem": "4G", "root-disk": "1.5G"}}),
        ),
    )
    .await;
    assert_eq!(set["Response"], json!({}), "{set}");
    let kept = json!({"mem": 4096, "root-disk": 1536});
    let got = call(
        &mut ws,
        client("ServiceGet", json!({"ServiceName": "blog"})),
    )
    .await;
    assert_eq!(got["Response"]["Constraints"], kept);
    let watch = call(&mut ws, client("WatchAll", json!({}))).await;
    let watcher = watch["Response"]["AllWatcherId"].clone();
    let snapshot = call(
        &mut ws,
        json!({"Type": "AllWatcher", "Request": "Next", "Id": watcher, "RequestId": 99,
               "Params": {}}),
    )
    .await;
    let blog = snapshot["Response"]["Deltas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d[0] == "service" && d[2]["Name"] == "blog")
        .cloned()
        .unwrap();
    assert_eq!(blog[2]["Constraints"], kept);
    let bad = call(
        &mut ws,
        client(
            "SetServiceConstraints",
            json!({"ServiceName": "blog", "Constraints": {"mem": "4g"}}),
        ),
    )
    .await;
    let error = bad["Error"].as_str().unwrap_or_default();
    assert!(error.contains("bad \"mem\" constraint"), "{bad}");
    assert_eq!(bad["ErrorCode"], "bad request");
    server.shutdown().await;
}

/// A Juju API socket, logged in as `user` with `password`.
async fn juju_login(server: &TestServer, user: &str, password: &str) -> (Socket, Value) {
    let url = server.url("/").replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let login = call(
        &mut ws,
        json!({"Type": "Admin", "Request": "Login", "Version": 0, "RequestId": 1,
               "Params": {"AuthTag": format!("user-{user}"), "Password": password}}),
    )
    .await;
    (ws, login)
}

fn client_call(request: &str, params: Value) -> Value {
    json!({"Type": "Client", "Request": request, "Version": 0, "RequestId": 2, "Params": params})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_face_shows_units_and_machines_of_a_gone_node_down() {
    let server = start().await;
    let core = &server.core;
    let far = core
        .nodes
        .connect(opsbox_api::AgentMessage::Hello {
            node_id: "far".into(),
            labels: vec!["far".into()],
            slots: 1,
            hostname: None,
            version: None,
            running: vec![],
            instance: Some("far-agent".into()),
            prefetch: 0,
        })
        .await
        .unwrap();
    let (mut ws, login) = juju_login(&server, "admin", "any").await;
    assert!(login.get("Error").is_none(), "{login}");
    let added = call(
        &mut ws,
        client_call(
            "AddMachines",
            json!({"MachineParams": [{"Constraints": {"tags": "far"}, "Jobs": ["JobHostUnits"]}]}),
        ),
    )
    .await;
    let machine = added["Response"]["Machines"][0]["Machine"]
        .as_str()
        .unwrap()
        .to_owned();
    let deployed = call(
        &mut ws,
        client_call(
            "ServiceDeploy",
            json!({"ServiceName": "db", "CharmURL": "cs:precise/mysql", "NumUnits": 1,
                   "Config": {}, "Constraints": {}, "ToMachineSpec": machine}),
        ),
    )
    .await;
    assert_eq!(deployed["Response"], json!({}), "{deployed}");
    let watch = call(&mut ws, client_call("WatchAll", json!({}))).await;
    let watcher = watch["Response"]["AllWatcherId"].clone();
    let next = json!({"Type": "AllWatcher", "Request": "Next", "Id": watcher, "RequestId": 3,
                      "Params": {}});
    call(&mut ws, next.clone()).await;

    core.nodes.disconnect("far", far.session).await.unwrap();
    let status = call(&mut ws, client_call("FullStatus", json!({"Patterns": []}))).await;
    let unit = &status["Response"]["Services"]["db"]["Units"]["db/0"];
    assert_eq!(unit["AgentState"], "down", "{status:#}");
    assert_eq!(unit["UnitAgent"]["Status"], "lost");
    let m = &status["Response"]["Machines"][machine.as_str()];
    assert_eq!(m["AgentState"], "down", "{status:#}");
    assert_eq!(status["Response"]["Machines"]["0"]["AgentState"], "started");
    let deltas = call(&mut ws, next).await;
    let deltas = deltas["Response"]["Deltas"].as_array().unwrap();
    let unit = deltas
        .iter()
        .find(|d| d[0] == "unit" && d[2]["Name"] == "db/0")
        .unwrap_or_else(|| panic!("{deltas:?}"));
    assert_eq!(unit[2]["Status"], "down");
    let m = deltas
        .iter()
        .find(|d| d[0] == "machine" && d[2]["Id"] == machine.as_str())
        .unwrap_or_else(|| panic!("{deltas:?}"));
    assert_eq!(m[2]["Status"], "down");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_full_status_filters_by_unit_name_with_its_machine_and_relations() {
    let server = start().await;
    let (mut ws, _) = juju_login(&server, "admin", "any").await;
    for (name, charm, n) in [("db", "cs:precise/mysql", 1), ("blog", "wordpress", 2)] {
        let r = call(
            &mut ws,
            client_call(
                "ServiceDeploy",
                json!({"ServiceName": name, "CharmURL": charm, "NumUnits": n,
                       "Config": {}, "Constraints": {}, "ToMachineSpec": null}),
            ),
        )
        .await;
        assert_eq!(r["Response"], json!({}), "{r}");
    }
    let r = call(
        &mut ws,
        client_call("AddRelation", json!({"Endpoints": ["blog", "db"]})),
    )
    .await;
    assert!(r.get("Error").is_none(), "{r}");
    let status = call(
        &mut ws,
        client_call("FullStatus", json!({"Patterns": ["blog/1"]})),
    )
    .await;
    let status = &status["Response"];
    let services: Vec<&String> = status["Services"].as_object().unwrap().keys().collect();
    assert_eq!(services, ["blog"], "{status:#}");
    let units: Vec<&String> = status["Services"]["blog"]["Units"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(units, ["blog/1"]);
    let machine = status["Services"]["blog"]["Units"]["blog/1"]["Machine"].clone();
    let machines: Vec<&String> = status["Machines"].as_object().unwrap().keys().collect();
    assert_eq!(machines, [machine.as_str().unwrap()]);
    let relations = status["Relations"].as_array().unwrap();
    assert_eq!(relations.len(), 1, "{status:#}");
    assert_eq!(relations[0]["Key"], "blog:db db:db");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_annotations_of_unknown_entities_are_not_found() {
    let server = start().await;
    let (mut ws, _) = juju_login(&server, "admin", "any").await;
    let set = call(
        &mut ws,
        client_call(
            "SetAnnotations",
            json!({"Tag": "service-nosuch", "Pairs": {"owner": "me"}}),
        ),
    )
    .await;
    assert_eq!(set["Error"], "service \"nosuch\" not found", "{set}");
    assert_eq!(set["ErrorCode"], "not found");
    let get = call(
        &mut ws,
        client_call("GetAnnotations", json!({"Tag": "unit-nosuch-0"})),
    )
    .await;
    assert_eq!(get["Error"], "unit \"nosuch/0\" not found", "{get}");
    let bulk = call(
        &mut ws,
        json!({"Type": "Annotations", "Request": "Set", "Version": 1, "RequestId": 3,
               "Params": {"Annotations": [{"EntityTag": "machine-9", "Annotations": {"a": "b"}}]}}),
    )
    .await;
    assert_eq!(
        bulk["Response"]["Results"],
        json!([{"Message": "machine 9 not found", "Code": "not found"}])
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_backups_facade_is_for_admins_only() {
    let server = start().await;
    server.add_admin().await;
    let added = client()
        .post(server.url("/v1/users"))
        .basic_auth("admin", Some("pw"))
        .json(&json!({"name": "ops", "password": "opw", "role": "operator"}))
        .send()
        .await
        .unwrap();
    assert!(added.status().is_success(), "{}", added.status());
    let backups = |method: &str| {
        json!({"Type": "Backups", "Request": method, "Version": 0, "RequestId": 2,
               "Params": {}})
    };
    let has_backups = |login: &Value| {
        login["Response"]["Facades"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["Name"] == "Backups")
    };

    let (mut ws, login) = juju_login(&server, "ops", "opw").await;
    assert!(login.get("Error").is_none(), "{login}");
    assert!(!has_backups(&login), "{login}");
    for method in ["List", "Create", "Info"] {
        let refused = call(&mut ws, backups(method)).await;
        assert_eq!(refused["Error"], "permission denied", "{method}: {refused}");
        assert_eq!(refused["ErrorCode"], "unauthorized access");
    }
    // The rest of the connection still works.
    let info = call(&mut ws, client_call("EnvironmentInfo", json!({}))).await;
    assert!(info.get("Error").is_none(), "{info}");

    let (mut ws, login) = juju_login(&server, "admin", "pw").await;
    assert!(has_backups(&login), "{login}");
    let list = call(&mut ws, backups("List")).await;
    assert_eq!(list["Response"], json!({"List": []}), "{list}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn juju_service_update_sets_min_units() {
    let server = start().await;
    let (mut ws, _) = juju_login(&server, "admin", "any").await;
    let r = call(
        &mut ws,
        client_call(
            "ServiceDeploy",
            json!({"ServiceName": "db", "CharmURL": "mysql", "NumUnits": 0,
                   "Config": {}, "Constraints": {}, "ToMachineSpec": null}),
        ),
    )
    .await;
    assert_eq!(r["Response"], json!({}), "{r}");
    // What jujuclient's update_service sends.
    let r = call(
        &mut ws,
        client_call(
            "ServiceUpdate",
            json!({"ServiceName": "db", "CharmUrl": "", "MinUnits": 2,
                   "SettingsStrings": {}, "Constraints": {}}),
        ),
    )
    .await;
    assert_eq!(r["Response"], json!({}), "{r}");
    let status = call(&mut ws, client_call("FullStatus", json!({"Patterns": []}))).await;
    let units: Vec<&String> = status["Response"]["Services"]["db"]["Units"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(units, ["db/0", "db/1"], "{status:#}");
    let watch = call(&mut ws, client_call("WatchAll", json!({}))).await;
    let next = call(
        &mut ws,
        json!({"Type": "AllWatcher", "Request": "Next", "RequestId": 3, "Params": {},
               "Id": watch["Response"]["AllWatcherId"]}),
    )
    .await;
    let service = next["Response"]["Deltas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d[0] == "service")
        .cloned()
        .unwrap();
    assert_eq!(service[2]["MinUnits"], 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charm_upload_over_its_limit_gets_a_juju_error() {
    let server = TestServer::start_with(|c| {
        c.charms = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/charms");
        c.limits.max_body_bytes = 100;
        c.limits.max_charm_bytes = 2000;
    })
    .await;
    let upload = |bytes: usize| {
        client()
            .post(server.url("/charms?series=trusty"))
            .header("Content-Type", "application/zip")
            .body(vec![b'x'; bytes])
            .send()
    };
    let big = upload(3000).await.unwrap();
    assert_eq!(big.status(), 413);
    let body: Value = big.json().await.unwrap();
    let error = body["Error"].as_str().unwrap();
    assert!(error.contains("max_charm_bytes"), "{error}");
    // Over the API limit but within the charm limit: read, and refused as no zip.
    let not_zip = upload(1500).await.unwrap();
    assert_eq!(not_zip.status(), 400);
    let body: Value = not_zip.json().await.unwrap();
    assert!(body["Error"].is_string(), "{body}");
    server.shutdown().await;
}
