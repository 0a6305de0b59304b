//! The Disco master face over a real socket: every endpoint with the shapes of the wire
//! reference (E4 plus the E1 shims), against jobs that really run on the local node.

mod common;

use std::time::Duration;

use common::{client, write_script, TestServer};
use serde_json::{json, Value};

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let r = client().get(server.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(server.url(path))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn server() -> TestServer {
    let server = TestServer::start().await;
    write_script(
        &server.scripts,
        "words.sh",
        "# description: count words",
        "n=$(printf '%s\\n' \"$INPUT\" | wc -w)\necho \"$n\" > \"$OPSBOX_RESULTS/n\"\necho $n",
    );
    write_script(
        &server.scripts,
        "total.sh",
        "# description: add counts",
        "t=0\nfor f in \"$OPSBOX_INPUTS_DIR\"/map-*/n; do read -r n < \"$f\"; t=$((t + n)); done\necho $t > \"$OPSBOX_RESULTS/total\"",
    );
    client()
        .post(server.url("/v1/reload"))
        .send()
        .await
        .unwrap();
    server
}

async fn fan_out(server: &TestServer) -> String {
    let (status, job) = post(
        server,
        "/v1/jobs",
        json!({"map": "words", "inputs": ["a b", "c d e"], "reduce": "total"}),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    job["name"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn jobs_are_listed_described_and_their_results_long_polled() {
    let server = server().await;
    let name = fan_out(&server).await;
    assert!(name.starts_with("words@"), "{name}");

    // Long-poll: returns once the active job ends (or at the timeout).
    let mut answer = Value::Null;
    for _ in 0..20 {
        let (status, a) = post(
            &server,
            "/disco/ctrl/get_results",
            json!([2000, [name, "nosuch@1"]]),
        )
        .await;
        assert_eq!(status, 200);
        answer = a;
        if answer[0][1][0] == "ready" {
            break;
        }
    }
    assert_eq!(answer[0][0], name);
    assert_eq!(answer[0][1][0], "ready", "{answer}");
    let results = answer[0][1][1].as_array().unwrap();
    assert_eq!(results.len(), 1, "{answer}");
    // E4: a list of replica lists, each an http URL the client can fetch as it is.
    let url = results[0][0].as_str().unwrap();
    let job_segment = name.replace('@', "%40").replace(':', "%3A");
    assert!(
        url.ends_with(&format!("/disco/results/{job_segment}/reduce-0/total")),
        "{url}"
    );
    let total = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(total.trim(), "5");
    // Clients read large results in ranges.
    let r = client()
        .get(url)
        .header("Range", "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.text().await.unwrap(), "5");
    assert_eq!(answer[1], json!(["nosuch@1", ["unknown job", []]]));

    // 0.5: the results of each stage; 0.3–0.4: the map stage's, flat.
    let (status, stage) = get(
        &server,
        &format!("/disco/ctrl/get_stageresults?name={name}&stage=map"),
    )
    .await;
    assert_eq!(status, 200, "{stage}");
    let maps = stage.as_array().unwrap();
    assert_eq!(maps.len(), 2, "{stage}");
    assert!(maps.iter().all(|m| m[0]
        .as_str()
        .unwrap()
        .contains(&format!("{job_segment}/map-"))));
    let (_, stage) = get(
        &server,
        &format!("/disco/ctrl/get_stageresults?name={name}&stage=reduce"),
    )
    .await;
    assert_eq!(stage[0][0], results[0][0]);
    let (status, flat) = get(&server, &format!("/disco/ctrl/get_mapresults?name={name}")).await;
    assert_eq!(status, 200);
    assert_eq!(flat[0], maps[0][0]);
    let (status, _) = get(
        &server,
        &format!("/disco/ctrl/get_stageresults?name={name}&stage=shuffle"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(
        &server,
        "/disco/ctrl/get_stageresults?name=nosuch@1&stage=map",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        get(&server, "/disco/ctrl/get_gc_blacklist").await,
        (200, json!([]))
    );

    // E1 form: GET with the name unescaped in the query.
    let r = client()
        .get(format!(
            "{}/disco/ctrl/get_results?name={name}",
            server.base
        ))
        .send()
        .await
        .unwrap();
    let e1: Value = r.json().await.unwrap();
    assert_eq!(e1[0], "ready");
    assert!(e1[1][0].as_str().unwrap().ends_with("/reduce-0/total"));

    let (_, list) = get(&server, "/disco/ctrl/joblist").await;
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[2] == name)
        .unwrap();
    assert_eq!(row[1], "ready");
    assert!(row[0].as_i64().unwrap() > 1_700_000_000);
    let (_, v1) = get(&server, "/disco/ctrl/joblist?format=v1").await;
    assert!(v1.as_array().unwrap().iter().any(|r| r[1] == "job_ready"));

    let (status, info) = get(&server, &format!("/disco/ctrl/jobinfo?name={name}")).await;
    assert_eq!(status, 200);
    assert_eq!(info["active"], "ready");
    assert_eq!(info["mapi"], json!([0, 0, 2, 0]));
    assert_eq!(info["redi"], json!([0, 0, 1, 0]));
    assert_eq!(info["reduce"], true);
    assert_eq!(info["inputs"], json!(["a b", "c d e"]));
    assert_eq!(info["pipeline"][0], json!(["map", 0, 0, 0, 2, 0]));
    assert_eq!(info["worker"], "words");
    let timestamp = info["timestamp"].as_str().unwrap();
    assert_eq!(timestamp.len(), 19, "{timestamp}");
    assert_eq!(&timestamp[4..5], "/");

    let (status, missing) = get(&server, "/disco/ctrl/jobinfo?name=nosuch@1").await;
    assert_eq!((status, missing), (404, json!("unknown job")));
    server.shutdown().await;
}

#[tokio::test]
async fn events_parameters_kill_clean_and_submission() {
    let server = server().await;
    let name = fan_out(&server).await;
    post(&server, "/disco/ctrl/get_results", json!([10000, [name]])).await;
    for _ in 0..50 {
        let (_, info) = get(&server, &format!("/disco/ctrl/jobinfo?name={name}")).await;
        if info["active"] != "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // rawevents: one JSON array per line; a range at the end gets the whole log.
    let url = format!("{}/disco/ctrl/rawevents?name={name}", server.base);
    let full = client().get(&url).send().await.unwrap();
    assert_eq!(full.status().as_u16(), 200);
    let body = full.text().await.unwrap();
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0][2], "New job initialized!");
    assert!(lines.last().unwrap()[2]
        .as_str()
        .unwrap()
        .starts_with("READY: Job finished in"));
    assert!(lines.iter().any(|l| l[2] == "map:1 done on local"));
    let at_end = client()
        .get(&url)
        .header("Range", format!("bytes={}-", body.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(at_end.status().as_u16(), 200);
    assert_eq!(at_end.text().await.unwrap(), body);
    let tail = client()
        .get(&url)
        .header("Range", "bytes=5-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status().as_u16(), 206);
    assert_eq!(tail.text().await.unwrap(), body[5..]);
    let (_, newest) = get(&server, &format!("/disco/ctrl/jobevents?name={name}&num=1")).await;
    assert_eq!(newest.as_array().unwrap().len(), 1);
    assert!(newest[0][2].as_str().unwrap().starts_with("READY"));
    let (_, filtered) = get(
        &server,
        &format!("/disco/ctrl/jobevents?name={name}&filter=ASSIGNED"),
    )
    .await;
    assert_eq!(filtered.as_array().unwrap().len(), 3);

    // parameters: a version 1 job pack whose dict describes the job.
    let pack = client()
        .get(format!("{}/disco/ctrl/parameters?name={name}", server.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let word = |i: usize| u32::from_be_bytes(pack[i..i + 4].try_into().unwrap()) as usize;
    assert_eq!(word(0), 0xd5c0_0001);
    assert_eq!(word(4), 128);
    let dict: Value = serde_json::from_slice(&pack[word(4)..word(8)]).unwrap();
    assert_eq!(dict["prefix"], "words");
    assert_eq!(dict["input"], json!(["a b", "c d e"]));
    assert_eq!(dict["reduce?"], true);
    assert_eq!(&pack[word(12)..word(12) + 4], b"PK\x05\x06");

    // Control: "" for everything, unknown names included; clean forgets the job.
    assert_eq!(
        post(&server, "/disco/ctrl/kill_job", json!("nosuch@1")).await,
        (200, json!(""))
    );
    assert_eq!(
        post(&server, "/disco/ctrl/clean_job", json!(name)).await,
        (200, json!(""))
    );
    let (_, after) = post(&server, "/disco/ctrl/get_results", json!([0, [name]])).await;
    assert_eq!(after[0][1][0], "unknown job");
    let (status, _) = post(&server, "/disco/ctrl/kill_job", json!(["not a string"])).await;
    assert_eq!(status, 400);

    // Submissions: a job pack gets the E3+ JSON error, a netstring the E1 text one;
    // both name the opsbox way.
    let r = client()
        .post(server.url("/disco/job/new"))
        .body(vec![0xd5, 0xc0, 0, 1])
        .send()
        .await
        .unwrap();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer[0], "error");
    assert!(answer[1].as_str().unwrap().contains("opsbox jobs submit"));
    let r = client()
        .post(server.url("/disco/job/new"))
        .body("12\n4 name 3 x@1\n")
        .send()
        .await
        .unwrap();
    assert!(r
        .text()
        .await
        .unwrap()
        .starts_with("ERROR: opsbox runs scripts"));

    // A running job: killed, then dead with its record kept.
    let (_, job) = post(
        &server,
        "/v1/jobs",
        json!({"map": "sleepy", "inputs": ["x"], "params": {"secs": "30"}}),
    )
    .await;
    let sleepy = job["name"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        let (_, info) = get(&server, &format!("/disco/ctrl/jobinfo?name={sleepy}")).await;
        if info["mapi"][1] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        post(&server, "/disco/ctrl/kill_job", json!(sleepy)).await,
        (200, json!(""))
    );
    let (_, dead) = post(&server, "/disco/ctrl/get_results", json!([0, [sleepy]])).await;
    assert_eq!(dead[0][1], json!(["dead", []]));
    let (_, events) = get(&server, &format!("/disco/ctrl/jobevents?name={sleepy}")).await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e[2] == "WARN: Job killed"),
        "{events}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn nodes_blacklist_config_and_settings() {
    let server = server().await;
    let (_, version) = get(&server, "/disco/version").await;
    assert_eq!(version, "0.5.4");
    let (_, info) = get(&server, "/disco/ctrl/nodeinfo").await;
    assert_eq!(info["local"]["connected"], true);
    assert_eq!(info["local"]["blacklisted"], false);
    assert!(info["local"]["max_workers"].as_u64().unwrap() >= 2);
    let (_, v1) = get(&server, "/disco/ctrl/nodeinfo?format=v1").await;
    assert_eq!(v1["available"][0]["node"], "local");
    assert!(v1["active"].as_array().unwrap().is_empty());

    assert_eq!(
        post(&server, "/disco/ctrl/blacklist", json!("local")).await,
        (200, json!(""))
    );
    assert_eq!(
        get(&server, "/disco/ctrl/get_blacklist").await.1,
        json!(["local"])
    );
    assert_eq!(
        get(&server, "/disco/ctrl/nodeinfo").await.1["local"]["blacklisted"],
        true
    );
    assert_eq!(
        post(&server, "/disco/ctrl/whitelist", json!("local")).await,
        (200, json!(""))
    );
    assert_eq!(get(&server, "/disco/ctrl/get_blacklist").await.1, json!([]));
    assert_eq!(
        post(&server, "/disco/ctrl/blacklist", json!("nosuch")).await,
        (200, json!(""))
    );

    assert_eq!(
        post(
            &server,
            "/disco/ctrl/save_config_table",
            json!([["local", "3"]])
        )
        .await,
        (200, json!("table saved!"))
    );
    assert_eq!(
        get(&server, "/disco/ctrl/load_config_table").await.1,
        json!([["local", "3"]])
    );
    assert_eq!(
        post(
            &server,
            "/disco/ctrl/save_config_table",
            json!([["local", "3"], ["local", "4"]])
        )
        .await,
        (400, json!("duplicate nodes"))
    );
    let (status, unknown) = post(
        &server,
        "/disco/ctrl/save_config_table",
        json!([["ghost", "1"]]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(unknown.as_str().unwrap().contains("opsbox agent"));

    assert_eq!(
        get(&server, "/disco/ctrl/get_settings").await.1["max_failure_rate"],
        3
    );
    let (status, _) = post(
        &server,
        "/disco/ctrl/save_settings",
        json!({"max_failure_rate": "10"}),
    )
    .await;
    assert_eq!(status, 400);
    server.shutdown().await;
}

/// Disco's clients send no credentials: once the server requires them, only the
/// `[disco] anonymous_role` policy lets such a client in, and only as far as its role.
#[tokio::test]
async fn clients_without_credentials_only_by_policy() {
    let closed = TestServer::start().await;
    closed.add_admin().await;
    let r = client()
        .get(closed.url("/disco/ctrl/joblist"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let body: Value = r.json().await.unwrap();
    assert!(
        body.as_str().unwrap().contains("--disco-anonymous"),
        "{body}"
    );
    let r = client()
        .get(closed.url("/disco/ctrl/joblist"))
        .basic_auth("admin", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    closed.shutdown().await;

    let open =
        TestServer::start_with(|c| c.disco.anonymous_role = Some(opsbox_api::Role::Reader)).await;
    open.add_admin().await;
    assert_eq!(get(&open, "/disco/ctrl/joblist").await, (200, json!([])));
    assert_eq!(get(&open, "/disco/version").await, (200, json!("0.5.4")));
    // A reader may look, not kill; wrong credentials are refused, not made anonymous.
    let (status, _) = post(&open, "/disco/ctrl/kill_job", json!("x@1")).await;
    assert_eq!(status, 403);
    let r = client()
        .get(open.url("/disco/ctrl/joblist"))
        .basic_auth("admin", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // The policy is the Disco face's only.
    let r = client().get(open.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    open.shutdown().await;
}

/// A body over `max_body_bytes` gets Disco's 413 with a JSON string, declared or
/// chunked.
#[tokio::test]
async fn bodies_over_the_limit_get_a_disco_413() {
    let server = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let big = json!("x".repeat(4096));
    for path in ["/disco/ctrl/kill_job", "/disco/job/new"] {
        let (status, body) = post(&server, path, big.clone()).await;
        assert_eq!(
            (status, body),
            (413, json!("Job packet too large")),
            "{path}"
        );
        let (status, headers, body) =
            common::raw_http(&server.base, &common::chunked_post(path, "", 4096)).await;
        assert_eq!(status, 413, "{path}");
        assert!(headers.contains("application/json"), "{headers}");
        assert_eq!(body, r#""Job packet too large""#, "{path}");
    }
    server.shutdown().await;
}

/// A chunked body that breaks its framing is a bad request: 400 with a JSON string.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let server = TestServer::start().await;
    let (status, headers, body) = common::raw_http(
        &server.base,
        &common::malformed_chunked_post("/disco/ctrl/kill_job", ""),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(headers.contains("application/json"), "{headers}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body.as_str().unwrap().contains("could not be read"),
        "{body}"
    );
    server.shutdown().await;
}

/// QA: a query string (or path) that does not decode is a Disco error (400 with a JSON string
/// saying why, `application/json`), not a plain-text rejection.
#[tokio::test]
async fn undecodable_query_strings_get_a_disco_error() {
    let server = server().await;
    for path in [
        "/disco/ctrl/jobevents?name=x@1&num=many",
        "/disco/ctrl/jobevents?name=x@1&num=-1",
        "/disco/ctrl/get_stageresults?name=x@1",
        "/disco/ctrl/rawevents?name=x@1&num=1.5",
        // Path parameters too: a result path that is not UTF-8.
        "/disco/results/x@1/%FF",
    ] {
        let r = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let content_type = r.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "application/json", "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body.as_str().is_some_and(|why| !why.is_empty()),
            "{path}: the body is a JSON string with the reason: {body}"
        );
    }
    server.shutdown().await;
}

/// QA: `rawevents` honours a single byte range as a file server does (206 with exactly
/// the bytes asked for and their `Content-Range`), while a range at or past the end
/// still gets the whole log with 200 (Addendum 1), and what it cannot honour is ignored.
#[tokio::test]
async fn rawevents_serves_the_byte_range_asked_for() {
    let server = server().await;
    let name = fan_out(&server).await;
    post(&server, "/disco/ctrl/get_results", json!([10000, [name]])).await;
    // The log stays the same between requests only once the job has ended.
    for _ in 0..50 {
        let (_, info) = get(&server, &format!("/disco/ctrl/jobinfo?name={name}")).await;
        if info["active"] != "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("{}/disco/ctrl/rawevents?name={name}", server.base);
    let whole = client().get(&url).send().await.unwrap();
    assert_eq!(whole.status().as_u16(), 200);
    assert_eq!(whole.headers()[reqwest::header::ACCEPT_RANGES], "bytes");
    let whole = whole.bytes().await.unwrap();
    let total = whole.len();
    assert!(total > 20, "{whole:?}");
    let ranged = |range: String| {
        let url = url.clone();
        async move {
            let r = client()
                .get(&url)
                .header("Range", &range)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let content_range = r
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .map(|v| v.to_str().unwrap().to_owned());
            (status, content_range, r.bytes().await.unwrap())
        }
    };
    let cases = [
        ("bytes=5-9".to_owned(), 5, 9),
        ("bytes=0-".to_owned(), 0, total - 1),
        ("bytes=3-".to_owned(), 3, total - 1),
        ("bytes=-10".to_owned(), total - 10, total - 1),
        (format!("bytes=2-{}", total + 100), 2, total - 1),
    ];
    for (range, first, last) in cases {
        let (status, content_range, body) = ranged(range.clone()).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(
            content_range.as_deref(),
            Some(format!("bytes {first}-{last}/{total}").as_str()),
            "{range}"
        );
        assert_eq!(body, whole[first..=last], "{range}");
    }
    for range in [
        format!("bytes={total}-"),
        format!("bytes={}-{}", total + 5, total + 9),
        "bytes=9-5".to_owned(),
        "bytes=0-1,4-5".to_owned(),
        "lines=1-".to_owned(),
    ] {
        let (status, content_range, body) = ranged(range.clone()).await;
        assert_eq!(status, 200, "{range}: served whole");
        assert_eq!(content_range, None, "{range}");
        assert_eq!(body, whole, "{range}");
    }
    server.shutdown().await;
}
