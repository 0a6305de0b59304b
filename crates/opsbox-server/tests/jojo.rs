//! The Jojo face over a real socket: the wire of `shared/protocols/jojo.md` as PyMoJo
//! and curl see it (status codes, headers, exact JSON shapes), against a real store.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{client, write_script, TestServer};

async fn jojo_server() -> TestServer {
    let server = TestServer::start().await;
    write_script(
        &server.scripts,
        "getter.sh",
        "# description: a GET script: with colons: 10:00\n# http_method: GET\n# tags: a, b",
        "echo got",
    );
    write_script(
        &server.scripts,
        "putter.sh",
        "# http_method: put\n# tags: b",
        "echo put",
    );
    write_script(
        &server.scripts,
        "combo.sh",
        "# output: combined\n# param: text - some-thing - with dashes",
        "echo \"2 + 7 = 9\"; echo err >&2; echo \"jojo_return_value sum=9\"; echo \"[$TEXT]\"",
    );
    write_script(
        &server.scripts,
        "locked.sh",
        "# lock: True",
        "date +%s.%N >> \"$OPSBOX_RESULTS/../lock.log\"; sleep 1; date +%s.%N >> \"$OPSBOX_RESULTS/../lock.log\"",
    );
    write_script(
        &server.scripts,
        "noext",
        "# description: no extension",
        "echo reachable",
    );
    let reload = client().post(server.url("/reload")).send().await.unwrap();
    assert_eq!(reload.status().as_u16(), 200);
    server
}

async fn send(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = client()
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            server.url(path),
        )
        .header("Content-Type", "application/json");
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value, headers)
}

#[tokio::test]
async fn listings_and_details_have_pyjojo_shapes() {
    let server = jojo_server().await;
    let (status, body, headers) = send(&server, "GET", "/scripts", None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json; charset=UTF-8");
    let echo = &body["scripts"]["echo"];
    assert_eq!(echo["name"], "echo");
    assert!(echo["filename"]
        .as_str()
        .unwrap()
        .ends_with("/scripts/echo.sh"));
    assert_eq!(echo["http_method"], "post");
    assert_eq!(
        echo["params"],
        json!([{"name": "text", "description": "what to echo"}])
    );
    assert_eq!(echo["output"], "split");
    assert_eq!(echo["lock"], false);
    assert_eq!(echo["description"], Value::Null);
    let keys: Vec<&String> = echo.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 9, "exactly Pyjojo's keys: {keys:?}");
    assert_eq!(
        body["scripts"]["getter"]["description"],
        "a GET script: with colons: 10:00"
    );
    assert_eq!(body["scripts"]["getter"]["http_method"], "get");
    assert_eq!(
        body["scripts"]["combo"]["params"][0]["description"],
        "some-thing - with dashes"
    );
    assert_eq!(body["scripts"]["noext"]["name"], "noext");
    assert_eq!(body["scripts"]["locked"]["lock"], true);

    let (_, trailing, _) = send(&server, "GET", "/scripts/", None).await;
    assert_eq!(trailing, body);

    let (status, names, _) = send(&server, "GET", "/script_names?tags=b", None).await;
    assert_eq!(status, 200);
    let mut names: Vec<String> = serde_json::from_value(names["script_names"].clone()).unwrap();
    names.sort();
    assert_eq!(names, vec!["getter", "putter"]);
    let (_, all_of, _) = send(&server, "GET", "/scripts?tags=a,b", None).await;
    assert_eq!(all_of["scripts"].as_object().unwrap().len(), 1);
    let (_, none_of, _) = send(&server, "GET", "/script_names?not_tags=b", None).await;
    assert!(!none_of["script_names"]
        .as_array()
        .unwrap()
        .contains(&json!("getter")));

    let (status, details, _) = send(&server, "OPTIONS", "/scripts/echo", None).await;
    assert_eq!(status, 200);
    assert_eq!(details["script"], *echo);
    // Era A: GET on a script not declared get gives its details.
    let (status, era_a, _) = send(&server, "GET", "/scripts/echo/", None).await;
    assert_eq!(status, 200);
    assert_eq!(era_a["script"], *echo);

    let (status, missing, _) = send(&server, "OPTIONS", "/scripts/nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(
        missing,
        json!({"error": {"code": 404, "type": "Not Found", "message": "Script with name 'nope' not found"}})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn runs_follow_the_declared_method_and_accept_post() {
    let server = jojo_server().await;
    let (status, result, _) = send(
        &server,
        "POST",
        "/scripts/echo",
        Some(r#"{"text": "a b 'c' $(id)", "ignored": [1]}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        result,
        json!({"retcode": 0, "stdout": ["a b 'c' $(id)"], "stderr": [], "return_values": {}})
    );

    // A GET script runs on GET, with a JSON body allowed.
    let (status, result, _) = send(&server, "GET", "/scripts/getter", Some("{}")).await;
    assert_eq!(status, 200);
    assert_eq!(result["stdout"], json!(["got"]));
    // Declared put: PUT and (for old clients) POST run it; DELETE is refused.
    let (status, result, _) = send(&server, "PUT", "/scripts/putter", None).await;
    assert_eq!((status, result["retcode"].clone()), (200, json!(0)));
    let (status, _, _) = send(&server, "POST", "/scripts/putter", None).await;
    assert_eq!(status, 200);
    let (status, refused, _) = send(&server, "DELETE", "/scripts/putter", None).await;
    assert_eq!(status, 405);
    assert_eq!(
        refused["error"]["message"],
        "Wrong HTTP method for script 'putter'. Use 'PUT'"
    );
    assert_eq!(refused["error"]["type"], "Method Not Allowed");

    // A failing script is still a 200 with its code.
    write_script(
        &server.scripts,
        "bad.sh",
        "",
        "echo out; echo err >&2; exit 7",
    );
    send(&server, "POST", "/reload", None).await;
    let (status, result, _) = send(&server, "POST", "/scripts/bad", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        result,
        json!({"retcode": 7, "stdout": ["out"], "stderr": ["err"], "return_values": {}})
    );

    // Combined: lines, not words; no stderr key; return values work.
    let (_, result, _) = send(&server, "POST", "/scripts/combo", Some(r#"{"text": 5}"#)).await;
    assert_eq!(
        result["stdout"],
        json!(["2 + 7 = 9", "err", "jojo_return_value sum=9", "[5]"])
    );
    assert!(result.get("stderr").is_none());
    assert_eq!(result["return_values"], json!({"sum": "9"}));

    // A file without an extension is reachable by its name.
    let (_, result, _) = send(&server, "POST", "/scripts/noext", None).await;
    assert_eq!(result["stdout"], json!(["reachable"]));

    // The runs are ordinary jobs.
    let jobs: Value = client()
        .get(server.url("/v1/jobs?script=echo"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_requests_get_pyjojo_statuses() {
    let server = jojo_server().await;
    for (method, path) in [
        ("POST", "/scripts"),
        ("OPTIONS", "/scripts"),
        ("GET", "/reload"),
        ("PATCH", "/scripts/echo"),
        ("DELETE", "/script_names"),
    ] {
        let (status, body, _) = send(&server, method, path, None).await;
        assert_eq!(status, 405, "{method} {path}");
        assert_eq!(
            body,
            json!({"error": {"code": 405, "type": "Method Not Allowed", "message": null}})
        );
    }
    let head = client()
        .head(server.url("/scripts/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 405);
    assert_eq!(head.content_length(), Some(0));

    let dotted = client()
        .get(server.url("/scripts/a.b"))
        .send()
        .await
        .unwrap();
    assert_eq!(dotted.status().as_u16(), 404);
    assert!(dotted.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    let form = client()
        .post(server.url("/scripts/echo"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("text=x")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 400);
    let no_type = client()
        .post(server.url("/scripts/echo"))
        .body(r#"{"text": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_type.status().as_u16(),
        200,
        "a missing Content-Type counts as JSON"
    );
    let (status, body, _) = send(&server, "POST", "/scripts/echo", Some("{broken")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 400);
    let (status, _, _) = send(&server, "POST", "/scripts/echo", Some("[1]")).await;
    assert_eq!(status, 400);
    let (status, _, _) = send(
        &server,
        "POST",
        "/scripts/echo",
        Some(r#"{"text": {"a": 1}}"#),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) = send(&server, "GET", "/scripts?tags=x", Some("{broken")).await;
    assert_eq!(status, 400, "bodies are checked on every method");
    server.shutdown().await;
}

#[tokio::test]
async fn force_json_accepts_any_content_type() {
    let server = TestServer::start_with(|c| c.jojo.force_json = true).await;
    let response = client()
        .post(server.url("/scripts/echo"))
        .header("Content-Type", "text/plain")
        .body(r#"{"text": "hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["stdout"], json!(["hi"]));
    server.shutdown().await;
}

#[tokio::test]
async fn lock_serialises_runs() {
    let server = jojo_server().await;
    let start = Instant::now();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let url = server.url("/scripts/locked");
            tokio::spawn(async move { client().post(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for run in runs {
        assert_eq!(run.await.unwrap(), 200);
    }
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "two locked 1 s runs overlapped"
    );
    let log = std::fs::read_to_string(server.data.join("results/lock.log")).unwrap();
    let times: Vec<f64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(times.len(), 4);
    assert!(
        times[2] >= times[1],
        "the second run started before the first ended: {times:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn basic_auth_from_an_htpasswd_file_is_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("passfile");
    let apr1 = apr1_hash("A good: password");
    std::fs::write(
        &htpasswd,
        format!("username:{apr1}\nsha:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nbcrypt:$2y$05$bvIG6Nmid91Mu9RcmmWZfO5HJIMCT8riNW0hEp8f6/FuA2/mHZFpe\ndes:aZGJuE6EXrjEE\n"),
    )
    .unwrap();
    let path = htpasswd.clone();
    let server = TestServer::start_with(move |c| c.htpasswd = Some(path)).await;
    let http = client();
    // No credentials: 401 with an empty body, whatever else is wrong with the request.
    for content_type in ["application/json", "text/plain"] {
        let response = http
            .post(server.url("/scripts/echo"))
            .header("Content-Type", content_type)
            .body("{broken")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Basic realm=pyjojo");
        assert_eq!(response.text().await.unwrap(), "");
    }
    let wrong = http
        .get(server.url("/scripts"))
        .basic_auth("username", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let junk = http
        .get(server.url("/scripts"))
        .header("Authorization", "Basic !!!")
        .send()
        .await
        .unwrap();
    assert_eq!(junk.status().as_u16(), 401);
    for (user, password) in [
        ("username", "A good: password"),
        ("sha", "password"),
        ("bcrypt", "password"),
        ("des", "test"),
    ] {
        let ok = http
            .get(server.url("/scripts"))
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status().as_u16(), 200, "{user}");
    }
    let run: Value = http
        .post(server.url("/scripts/echo"))
        .basic_auth("username", Some("A good: password"))
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["stdout"], json!(["hi"]));
    // Edits to the file take effect without a restart.
    std::fs::write(&htpasswd, "newbie:plainpass\n").unwrap();
    let mut accepted = false;
    for _ in 0..50 {
        let response = http
            .get(server.url("/script_names"))
            .basic_auth("newbie", Some("plainpass"))
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "a user added to the htpasswd file was not picked up"
    );
    server.shutdown().await;
}

/// An `$apr1$` hash, as `htpasswd -m` makes.
fn apr1_hash(password: &str) -> String {
    // Made by openssl, independently of the verifier under test.
    let line = std::process::Command::new("openssl")
        .args(["passwd", "-apr1", "-salt", "RandSalt", password])
        .output()
        .expect("openssl is needed to make an apr1 hash");
    String::from_utf8(line.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn unix_socket_listener() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("opsbox.sock");
    let path = socket.clone();
    let server = TestServer::start_with(move |c| {
        c.listen = vec!["127.0.0.1:0".into(), format!("unix:{}", path.display())]
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let body = r#"{"text": "via socket"}"#;
    let request = format!(
        "POST /scripts/echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(r#""stdout": ["via socket"]"#),
        "{response}"
    );
    server.shutdown().await;
}

/// A body over `max_body_bytes` gets Jojo's JSON error (§4.3) with 413, declared or
/// chunked; once the server needs credentials, a caller without them gets 401 first.
#[tokio::test]
async fn bodies_over_the_limit_get_a_jojo_413_after_auth() {
    let server = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let big = json!({"text": "x".repeat(4096)}).to_string();
    let (status, body, _) = send(&server, "POST", "/scripts/echo", Some(&big)).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], 413, "{body}");
    assert_eq!(body["error"]["type"], "Payload Too Large", "{body}");
    let (status, _, body) = common::raw_http(
        &server.base,
        &common::chunked_post("/scripts/echo", "Content-Type: application/json\r\n", 4096),
    )
    .await;
    assert_eq!(status, 413);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], 413, "{body}");

    server.add_admin().await;
    let (status, body, headers) = send(&server, "POST", "/scripts/echo", Some(&big)).await;
    assert_eq!(status, 401);
    assert_eq!(body, json!(""));
    assert_eq!(headers["www-authenticate"], "Basic realm=pyjojo");
    let response = client()
        .post(server.url("/scripts/echo"))
        .basic_auth("admin", Some("pw"))
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], 413, "{body}");
    server.shutdown().await;
}

/// A chunked body that breaks its framing is a bad request: 400 in Jojo's error form.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let server = TestServer::start().await;
    let (status, _, body) = common::raw_http(
        &server.base,
        &common::malformed_chunked_post("/scripts/echo", "Content-Type: application/json\r\n"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], 400, "{body}");
    assert_eq!(body["error"]["type"], "Bad Request", "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn params_that_are_not_strings_keep_their_json_text() {
    let server = jojo_server().await;
    // Numbers and booleans are their JSON text as sent, however big; null is empty
    // (an empty line, which Jojo's output lines drop).
    for (sent, seen) in [
        (
            "123000000000000000000000000000",
            json!(["123000000000000000000000000000"]),
        ),
        ("1.50", json!(["1.50"])),
        ("-2e3", json!(["-2e3"])),
        ("true", json!(["true"])),
        ("null", json!([])),
    ] {
        let (status, result, _) = send(
            &server,
            "POST",
            "/scripts/echo",
            Some(&format!(r#"{{"text": {sent}}}"#)),
        )
        .await;
        assert_eq!(status, 200, "{sent}: {result}");
        assert_eq!(result["stdout"], seen, "{sent}");
    }
    let (status, refused, _) =
        send(&server, "POST", "/scripts/echo", Some(r#"{"text": [1]}"#)).await;
    assert_eq!(status, 400);
    assert_eq!(
        refused["error"]["message"],
        "param 'text' must be a string, not an array"
    );

    server.shutdown().await;
}
