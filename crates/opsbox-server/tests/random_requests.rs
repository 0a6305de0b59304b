//! Random requests to every face over a real socket: whatever arrives, the server
//! answers with a status its clients can act on (never a 5xx it did not mean, never a
//! dropped connection or a hang), and is still serving afterwards. The requests are
//! built from a fixed seed (`OPSBOX_FUZZ_SEED` picks another), so a failure repeats;
//! the API's documented shapes are checked by schemathesis-style tests elsewhere, this
//! one is about input nobody planned for.

mod common;

use std::time::Duration;

use common::TestServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Path templates of every face; `{s}` is a script name, `{x}` a random segment.
const PATHS: &[&str] = &[
    // Jojo
    "/scripts",
    "/scripts/",
    "/script_names",
    "/scripts/{s}",
    "/scripts/{s}/",
    "/reload",
    // Scirocco
    "/messageQueue",
    "/messageQueue/{x}/ack",
    "/messages",
    "/messages/{x}",
    "/globalDataSpace",
    // Disco
    "/disco/version",
    "/disco/job/new",
    "/disco/job/{x}",
    "/disco/ctrl/nodeinfo",
    "/disco/ctrl/joblist",
    "/disco/ctrl/jobinfo",
    "/disco/ctrl/get_results",
    "/disco/ctrl/kill_job",
    "/disco/ctrl/clean_job",
    "/disco/ctrl/parameters",
    "/disco/ctrl/rawevents",
    "/disco/ctrl/jobevents",
    "/disco/ctrl/save_config_table",
    "/disco/ctrl/blacklist",
    "/disco/ctrl/save_settings",
    "/disco/ctrl/gc_blacklist",
    "/disco/results/{x}/{x}",
    // py-jrpc and JSON-RPC
    "/",
    "/{x}",
    "/ping",
    "/check_process",
    "/rpc",
    // Juju and agents (without an upgrade)
    "/charms",
    "/model/{x}/api",
    "/v1/agent",
    // native
    "/v1/scripts/{s}/run",
    "/v1/jobs",
    "/v1/jobs/{x}",
    "/v1/queues/{x}/messages",
    "/v1/queues/{x}/pull",
    "/v1/queues/{x}/ack",
    "/v1/messages/{x}",
    "/v1/model/relations",
    "/v1/events",
];
const SCRIPTS: &[&str] = &["echo", "report", "nope", "echo.sh", ".."];
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"];
const KEYS: &[&str] = &[
    "id",
    "ids",
    "name",
    "params",
    "method",
    "jsonrpc",
    "args",
    "payload",
    "messages",
    "max",
    "wait",
    "lease",
    "status",
    "data",
    "type",
    "to",
    "from",
    "scheduled_time",
    "node",
    "script",
    "inputs",
    "since",
    "limit",
    "timeout",
    "endpoints",
    "text",
    "jobname",
    "worker",
    "Type",
    "Request",
    "Params",
    "RequestId",
];

fn text(rng: &mut StdRng) -> String {
    const POOLS: &[&str] = &[
        "abcXYZ",
        "0123456789",
        "%/.;:?&=+ -_",
        "αβγ☃𝄞\u{202e}",
        "\"\\'`$(){}[]<>|*",
    ];
    let len = [0, 1, 3, 8, 40, 300][rng.gen_range(0..6)];
    (0..len)
        .map(|_| {
            let pool: Vec<char> = POOLS[rng.gen_range(0..POOLS.len())].chars().collect();
            pool[rng.gen_range(0..pool.len())]
        })
        .collect()
}

fn json(rng: &mut StdRng, depth: u32) -> serde_json::Value {
    use serde_json::json;
    match rng.gen_range(0..if depth < 4 { 9 } else { 5 }) {
        0 => json!(null),
        1 => json!(rng.gen::<bool>()),
        2 => [
            json!(0),
            json!(-1),
            json!(2_147_483_648_u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1.5),
            json!(1e308),
        ][rng.gen_range(0..7)]
        .clone(),
        3 => json!(text(rng)),
        4 => json!(
            [
                "",
                "json",
                "binary",
                "pending",
                "2020-01-01T00:00:00Z",
                "$(id)",
                "../x"
            ][rng.gen_range(0..7)]
        ),
        5 | 6 => json!((0..rng.gen_range(0..4))
            .map(|_| json(rng, depth + 1))
            .collect::<Vec<_>>()),
        _ => serde_json::Value::Object(
            (0..rng.gen_range(0..5))
                .map(|_| {
                    let key = if rng.gen_bool(0.85) {
                        KEYS[rng.gen_range(0..KEYS.len())].to_owned()
                    } else {
                        text(rng)
                    };
                    (key, json(rng, depth + 1))
                })
                .collect(),
        ),
    }
}

/// Percent-encodes what may not stand in a request target.
fn encoded(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_graphic() && b != b'#' && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Random {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn request(rng: &mut StdRng) -> Random {
    let mut path = PATHS[rng.gen_range(0..PATHS.len())]
        .replace("{s}", SCRIPTS[rng.gen_range(0..SCRIPTS.len())]);
    while path.contains("{x}") {
        let segment = match rng.gen_range(0..6) {
            0 => "a".repeat(24),
            1 => "x;y=1;z".into(),
            2 => "%2e%2e".into(),
            3 => "%00".into(),
            _ => encoded(&text(rng)),
        };
        path = path.replacen("{x}", &segment, 1);
    }
    if rng.gen_bool(0.4) {
        let pairs: Vec<String> = (0..rng.gen_range(1..4))
            .map(|_| {
                let key = [
                    "timeout", "name", "limit", "since", "wait", "follow", "offset",
                ][rng.gen_range(0..7)];
                let value =
                    ["-1", "0", "1e9", "x", "99999999999999999999", "true"][rng.gen_range(0..6)];
                format!("{key}={value}")
            })
            .collect();
        path = format!("{path}?{}", pairs.join("&"));
    }
    let method = METHODS[rng.gen_range(0..METHODS.len())];
    let mut headers = Vec::new();
    if rng.gen_bool(0.7) {
        let kinds = [
            "application/json",
            "text/plain",
            "application/octet-stream",
            "multipart/form-data; boundary=x",
            "x/y",
        ];
        headers.push((
            "Content-Type",
            kinds[rng.gen_range(0..kinds.len())].to_owned(),
        ));
    }
    for name in [
        "Scirocco-Node-Source",
        "Scirocco-Node-Destination",
        "Scirocco-Status",
        "Scirocco-Scheduled-Time",
        "Scirocco-Data-Type",
        "Authorization",
    ] {
        if rng.gen_bool(0.15) {
            let values = [
                "af123",
                "DEFAULT_TOKEN",
                "Basic !!!",
                "Bearer x",
                "-1",
                "1999-13-40",
            ];
            headers.push((name, values[rng.gen_range(0..values.len())].to_owned()));
        }
    }
    let body = match rng.gen_range(0..6) {
        0 => Vec::new(),
        1 => serde_json::to_vec(&json(rng, 0)).unwrap(),
        2 => {
            let whole = serde_json::to_vec(&json(rng, 0)).unwrap();
            let cut = rng.gen_range(0..=whole.len());
            whole[..cut].to_vec()
        }
        3 => (0..rng.gen_range(0..100))
            .map(|_| rng.gen::<u8>())
            .collect(),
        4 => {
            let depth = [10, 200, 5000][rng.gen_range(0..3)];
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        _ => text(rng).into_bytes(),
    };
    Random {
        method,
        path,
        headers,
        body,
    }
}

/// A 5xx the face means: py-jrpc answers 500 when a function fails or a body is not
/// JSON, and 501 for a method it does not serve (wire reference, D8 and §8); those
/// requests go to `/` or a one-segment path outside every other face.
fn meant(status: u16, path: &str) -> bool {
    let jrpc = path == "/" || (path.matches('/').count() == 1 && path != "/rpc");
    jrpc && (status == 500 || status == 501)
}

#[tokio::test]
async fn random_requests_get_answers_and_leave_the_server_serving() {
    let seed = std::env::var("OPSBOX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let server = TestServer::start().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut wrong = Vec::new();
    for _ in 0..4000 {
        let r = request(&mut rng);
        let mut builder = http.request(
            reqwest::Method::from_bytes(r.method.as_bytes()).unwrap(),
            server.url(&r.path),
        );
        for (name, value) in &r.headers {
            builder = builder.header(*name, value);
        }
        if !r.body.is_empty() {
            builder = builder.body(r.body.clone());
        }
        let shown = String::from_utf8_lossy(&r.body[..r.body.len().min(120)]).to_string();
        match builder.send().await {
            Ok(answer) => {
                let status = answer.status().as_u16();
                // The path as sent: the client resolves `%2e%2e` segments.
                let sent = reqwest::Url::parse(&server.url(&r.path)).unwrap();
                if status >= 500 && !meant(status, sent.path()) {
                    let text = answer.text().await.unwrap_or_default();
                    wrong.push(format!(
                        "{} {} {shown:?} → {status} {text}",
                        r.method, r.path
                    ));
                }
            }
            Err(e) => wrong.push(format!("{} {} {shown:?} → {e}", r.method, r.path)),
        }
    }
    assert!(wrong.is_empty(), "seed {seed}: {wrong:#?}");
    let info = http.get(server.url("/v1/info")).send().await.unwrap();
    assert_eq!(info.status().as_u16(), 200);
    server.shutdown().await;
}
