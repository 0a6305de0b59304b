//! `opsbox rpc call|list|help` end to end: a real `opsbox serve` on a free loopback
//! port, the CLI as a subprocess.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_opsbox");

struct Server {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        let script = scripts.join("greet.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n# -- jojo --\n# description: says hello\n# param: who - whom\n# required: who\n# -- jojo --\nprintf 'hello %s' \"$WHO\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(dir.path().join("data"))
            .arg("--scripts")
            .arg(&scripts)
            .env_remove("OPSBOX_CONFIG")
            .env_remove("OPSBOX_LISTEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "opsbox serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Runs `opsbox --server URL ARGS…`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let home: &Path = self.dir.path();
        let mut command = Command::new(BIN);
        for name in [
            "OPSBOX_SERVER",
            "OPSBOX_USER",
            "OPSBOX_PASSWORD",
            "OPSBOX_TOKEN",
            "OPSBOX_CLIENT_CONFIG",
        ] {
            command.env_remove(name);
        }
        let out = command
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rpc_call_list_help() {
    let server = Server::start();
    assert_eq!(
        server.cli(&["rpc", "call", "ping"]),
        (0, "pong\n".into(), String::new())
    );
    let (code, out, _) = server.cli(&["rpc", "call", "method_signature", "check_process"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"check_process": ["process"]})
    );
    let (code, out, err) = server.cli(&["rpc", "call", "greet", "who=Ada"]);
    assert_eq!(code, 0, "{err}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["stdout"], "hello Ada");
    let (code, out, _) = server.cli(&["rpc", "call", "greet", "--params", r#"["Bob"]"#]);
    assert_eq!(code, 0);
    assert!(out.contains("hello Bob"), "{out}");
    let (code, _, err) = server.cli(&["rpc", "call", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no function is named 'nope'"), "{err}");
    // Command lines that make no sense exit 2, as the README's table says.
    let (code, _, err) = server.cli(&["rpc", "call", "greet", "Ada", "times=2"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = server.cli(&["rpc", "call", "greet", "--params", "5"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--params must be a JSON array or object"),
        "{err}"
    );
    let (code, _, err) = server.cli(&["rpc", "call", "greet"]);
    assert_eq!(code, 1);
    assert!(err.contains("missing required argument 'who'"), "{err}");

    let (code, out, _) = server.cli(&["rpc", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("check_process(process: string)"), "{out}");
    assert!(out.contains("greet(who: any)"), "{out}");
    let (code, out, _) = server.cli(&["rpc", "help", "get_env"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("get_env(reveal: boolean = false)\nsource: host, role: admin"),
        "{out}"
    );
    let (code, out, _) = server.cli(&["--json", "rpc", "help", "ping"]);
    assert_eq!(code, 0);
    let method: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(method["doc"], ":return: response to ping");
}
