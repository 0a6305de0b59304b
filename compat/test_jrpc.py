"""py-jrpc compatibility: the real py-jrpc 2.1.1 client (SimpleTCPClient, from the
package index, patched for Python 3 at test time: jrpc_py311.py) and the README's curl
lines against opsbox, on the main listener, on a dedicated jrpc listener and over TLS.
The raw response strings are the ones py-jrpc returned (wire reference jrpc.md)."""

import base64
import hashlib
import json
import os
import socket
import subprocess

import pytest

import jrpc_py311

jrpc_py311.apply()
import jrpc  # noqa: E402  (importable only once patched)

for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ.pop(var, None)
os.environ["no_proxy"] = "*"


def client(server, port=None, ssl=False):
    return jrpc.SimpleTCPClient("127.0.0.1", port or server.port, ssl=ssl)


def curl(*args):
    out = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_session(opsbox):
    conn = client(opsbox)
    assert conn.geturl() == f"http://127.0.0.1:{opsbox.port}"
    for name in ["check_process", "cpuinfo", "disk_usage", "get_env", "ifconfig", "iostat",
                 "list_methods", "meminfo", "method_help", "method_signature", "mount", "ping",
                 "running_process", "uptime", "echo", "math"]:
        assert name in conn.methods, name
    assert conn.methods == sorted(conn.methods)
    assert {"get", "post", "geturl", "ping", "echo"} <= set(dir(conn))
    assert conn.ping() == '{"ping": "pong"}'
    assert conn.method_help("ping") == '{"method_help": ":return: response to ping"}'
    assert conn.method_help("nope") == '{"method_help": "Method [nope] not found"}'
    assert conn.method_signature("check_process") == '{"method_signature": {"check_process": ["process"]}}'
    assert conn.method_signature("ping") == '{"method_signature": {"ping": []}}'
    assert conn.method_signature("nope") == '{"method_signature": {"nope": "method/function not found"}}'
    assert conn.get("ping") == '{"ping": "pong"}'
    assert conn.get("method_help;ping") == '{"method_help": ":return: response to ping"}'
    assert conn.post({"ping": ""}) == '{"ping": "pong"}'
    assert json.loads(conn.list_methods())["list_methods"] == conn.methods


def test_host_methods_have_the_example_server_fields(opsbox):
    conn = client(opsbox)
    meminfo = json.loads(conn.meminfo())["meminfo"]
    assert meminfo["error"] == ""
    assert set(meminfo["output"]["memory"]) == {"total", "available", "percent", "used", "free",
                                                "active", "inactive", "buffers", "cached"}
    assert set(meminfo["output"]["swap"]) == {"total", "used", "free", "percent", "sin", "sout"}
    cpu = json.loads(conn.cpuinfo())["cpuinfo"]["output"]
    assert set(cpu) == {"no_of_cpu", "cpu_percent", "percent_per_cpu", "cputimes"}
    assert set(cpu["cputimes"]) == {"user", "nice", "system", "idle", "iowait", "irq", "softirq"}
    for item in json.loads(conn.ifconfig())["ifconfig"]["output"]:
        (nic,) = item.values()
        assert set(nic) == {"bytes_sent", "bytes_recv", "packets_sent", "packets_recv",
                            "errin", "errout", "dropin", "dropout"}
    for item in json.loads(conn.iostat())["iostat"]["output"]:
        (disk,) = item.values()
        assert set(disk) == {"read_count", "write_count", "read_bytes", "write_bytes",
                             "read_time", "write_time"}
    for item in json.loads(conn.disk_usage())["disk_usage"]["output"]:
        (usage,) = item.values()
        assert set(usage) == {"total", "used", "free", "percent"}
    for m in json.loads(conn.mount())["mount"]["output"]:
        assert set(m) == {"device", "mountpoint", "fstype", "opts"}
    uptime = json.loads(conn.uptime())["uptime"]
    assert " up " in uptime["output"] and uptime["output"].endswith("\n")
    ps = json.loads(conn.running_process())["running_process"]["output"]
    assert ps[0] == "COMMAND"
    # check_process: literal, case-insensitive, all strings; the server itself matches.
    found = json.loads(conn.check_process("OPSBOX SERVE"))["check_process"]["output"]
    assert any(p["pid"] == str(opsbox.process.pid) for p in found), found
    for p in found:
        assert set(p) == {"user", "pid", "pcpu", "pmem", "starttime", "args", "threadcount"}
        assert all(isinstance(v, str) for v in p.values())
    # Shell text is just text: nothing is run, nothing matches.
    assert conn.check_process("x; touch /tmp/opsbox-pwned") == '{"check_process": {"error": "", "output": []}}'
    assert not os.path.exists("/tmp/opsbox-pwned")
    env = json.loads(conn.get_env())["get_env"]["output"]
    assert env.startswith("{'") and env.endswith("'}")


def test_scripts_are_functions_and_runs_are_jobs(opsbox):
    conn = client(opsbox)
    out = json.loads(conn.echo("hello"))["echo"]
    assert out["state"] == "succeeded"
    assert out["stdout"] == "echo'd text: hello"
    assert conn.method_signature("echo") == '{"method_signature": {"echo": ["text"]}}'
    jobs = json.loads(curl(f"{opsbox.url}/v1/jobs"))["jobs"]
    assert any(j["name"] == out["job"] for j in jobs)


def test_answers_over_64_kib_reach_the_client(opsbox):
    # py-jrpc put the body in the reason phrase, so its own client could not read
    # answers over 64 KiB (LineTooLong); opsbox answers `200 OK`.
    conn = client(opsbox)
    out = json.loads(conn.echo("x" * 70000))["echo"]
    assert out["stdout"] == "echo'd text: " + "x" * 70000


def test_errors_are_http_errors_never_dropped_connections(opsbox):
    conn = client(opsbox)
    with pytest.raises(jrpc.HTTPError) as e:
        conn.nope()
    assert e.value.args[0].code == 405
    assert e.value.args[0].msg == "method [nope] is not supported"
    with pytest.raises(jrpc.HTTPError) as e:
        conn.method_help()
    assert e.value.args[0].code == 400
    assert e.value.args[0].msg == "method_help() missing required argument 'method_name'"
    with pytest.raises(jrpc.HTTPError) as e:
        conn.ping(1, 2)
    assert e.value.args[0].code == 400
    with pytest.raises(jrpc.HTTPError) as e:
        conn.post({})
    assert e.value.args[0].code == 400
    with pytest.raises(jrpc.HTTPError) as e:
        conn.post({"ping": "", "blah": "x"})
    assert e.value.args[0].code == 400


def test_readme_curl_lines(opsbox):
    url = opsbox.url
    assert curl(f"{url}/ping") == '{"ping": "pong"}'
    assert curl(f"{url}/list_methods").startswith('{"list_methods": ["check_process", "cpuinfo", ')
    assert curl(f"{url}/method_help;ping") == '{"method_help": ":return: response to ping"}'
    assert curl("-X", "POST", url, "-d", '{"ping": ""}') == '{"ping": "pong"}'
    for body in (
        '{"check_process": "no-such-thing-here"}',
        '{"check_process": ["no-such-thing-here"]}',
        '{"check_process": {"process": "no-such-thing-here"}}',
    ):
        answer = curl("-X", "POST", url, "-d", body)
        assert answer.startswith('{"check_process": {"error": "", "output": ['), answer
        # As with py-jrpc's `ps | grep`, the only match is the curl that carries the name.
        found = json.loads(answer)["check_process"]["output"]
        assert found and all(p["args"].startswith("curl ") for p in found), found
    status = curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url, "-d", "not json")
    assert status == "500"
    status = curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", f"{url}/ping")
    assert status == "501"
    # Other faces keep their routes on the shared listener.
    assert json.loads(curl(f"{url}/scripts"))


def test_dedicated_listener(make_opsbox):
    port = free_port()
    server = make_opsbox(extra=["--jrpc-listen", f"127.0.0.1:{port}"])
    conn = client(server, port=port)
    assert conn.ping() == '{"ping": "pong"}'
    base = f"http://127.0.0.1:{port}"
    assert curl(f"{base}/ping/extra") == '{"ping": "pong"}'
    status = curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/scripts")
    assert status == "405"
    assert curl("-X", "POST", f"{base}/anything", "-d", '{"ping": ""}') == '{"ping": "pong"}'


def test_tls(make_opsbox):
    server = make_opsbox(tls=True)
    cert = server.data / "tls" / "cert.pem"
    os.environ["SSL_CERT_FILE"] = str(cert)
    try:
        conn = client(server, ssl=True)
        assert conn.geturl().startswith("https://")
        assert conn.ping() == '{"ping": "pong"}'
    finally:
        del os.environ["SSL_CERT_FILE"]
    assert curl("--insecure", f"{server.url}/ping") == '{"ping": "pong"}'


def sha_htpasswd(user, password):
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}\n"


def test_anonymous_only_by_policy(make_opsbox):
    closed = make_opsbox(htpasswd=sha_htpasswd("ops", "secret"))
    with pytest.raises(jrpc.HTTPError) as e:
        client(closed)
    assert e.value.args[0].code == 401
    assert curl("-u", "ops:secret", f"{closed.url}/ping") == '{"ping": "pong"}'

    reader = make_opsbox(htpasswd=sha_htpasswd("ops", "secret"), extra=["--jrpc-anonymous", "reader"])
    conn = client(reader)
    assert conn.ping() == '{"ping": "pong"}'
    with pytest.raises(jrpc.HTTPError) as e:
        conn.echo("x")
    assert e.value.args[0].code == 403
    with pytest.raises(jrpc.HTTPError) as e:
        conn.get_env()
    assert e.value.args[0].code == 403
