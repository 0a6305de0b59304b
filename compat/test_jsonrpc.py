"""JSON-RPC 2.0 compatibility: third-party clients (jsonrpclib-pelix 1.2.0, jsonrpcclient
4.0.3 with requests, websocket-client) and curl against /rpc, through the spec examples
of the wire reference §11, batches with mixed errors and notifications, and
subscriptions to the watch stream over WebSocket."""

import json
import subprocess
import time

import jsonrpclib
import pytest
import requests
import websocket
from jsonrpcclient import Error, Ok, parse, request


def curl_rpc(url, body):
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-X", "POST", url, "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text, status = out.stdout.rsplit("\n", 1)
    return int(status), text


def test_jsonrpclib_pelix(opsbox):
    proxy = jsonrpclib.ServerProxy(f"{opsbox.url}/rpc")
    assert proxy.ping() == "pong"
    assert proxy.method_signature("check_process") == {"check_process": ["process"]}
    assert proxy.method_help(method_name="ping") == ":return: response to ping"
    assert proxy.echo(text="hi")["stdout"] == "echo'd text: hi"
    with pytest.raises(jsonrpclib.jsonrpc.ProtocolError) as e:
        proxy.no_such()
    assert e.value.args[0][0] == -32601
    with pytest.raises(jsonrpclib.jsonrpc.ProtocolError) as e:
        proxy.method_help()
    assert e.value.args[0][0] == -32602
    # Notifications: 200 with an empty body, which jsonrpclib accepts (it refuses 204).
    assert proxy._notify.ping() is None
    batch = jsonrpclib.MultiCall(proxy)
    batch.ping()
    batch.method_signature("ping")
    batch.echo(text="b")
    results = list(batch())
    assert results[0] == "pong"
    assert results[1] == {"ping": []}
    assert results[2]["stdout"] == "echo'd text: b"
    # Pointed at the root, JSON-RPC requests are recognised too (§10).
    assert jsonrpclib.ServerProxy(opsbox.url + "/").ping() == "pong"


def test_jsonrpcclient(opsbox):
    url = f"{opsbox.url}/rpc"
    answer = parse(requests.post(url, json=request("ping")).json())
    assert isinstance(answer, Ok) and answer.result == "pong"
    answer = parse(requests.post(url, json=request("method_help", params=["ping"])).json())
    assert isinstance(answer, Ok) and answer.result == ":return: response to ping"
    answer = parse(requests.post(url, json=request("no_such")).json())
    assert isinstance(answer, Error) and answer.code == -32601
    batch = [request("ping"), request("no_such"), {"jsonrpc": "2.0", "method": "ping"},
             request("method_signature", params={"method_name": "echo"})]
    answers = list(parse(requests.post(url, json=batch).json()))
    assert [type(a).__name__ for a in answers] == ["Ok", "Error", "Ok"]
    assert answers[2].result == {"echo": ["text"]}


def test_spec_examples_with_curl(opsbox):
    url = f"{opsbox.url}/rpc"
    vectors = [
        ('{"jsonrpc":"2.0","method":"ping","id":null}', '{"jsonrpc":"2.0","result":"pong","id":null}'),
        ('{"jsonrpc":"2.0","method":"ping"}', ''),
        ('{"jsonrpc":"2.0","method":"no_such","id":8}',
         '{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":8}'),
        ('{"jsonrpc":"2.0","method":"ping","params":"x","id":10}',
         '{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":10}'),
        ('{"jsonrpc":"2.0","method":"ping","id":[1]}',
         '{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}'),
        ('{"jsonrpc":"2.0","method":"ping",',
         '{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}'),
        ('[]', '{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}'),
        ('[3, "x"]', '[{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null},'
                     '{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}]'),
        ('[{"jsonrpc":"2.0","method":"ping","id":"a"},{"jsonrpc":"2.0","method":"ping"},'
         '{"bogus":true},{"jsonrpc":"2.0","method":"no_such","id":"b"}]',
         '[{"jsonrpc":"2.0","result":"pong","id":"a"},'
         '{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null},'
         '{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":"b"}]'),
        ('[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"uptime"}]', ''),
        ('{"jsonrpc":"2.0","method":"ping","id":-5}', '{"jsonrpc":"2.0","result":"pong","id":-5}'),
        ('{"jsonrpc":"2.0","method":"ping","id":1.5}', '{"jsonrpc":"2.0","result":"pong","id":1.5}'),
        ('{"jsonrpc":"2.0","method":"ping","id":18446744073709551615}',
         '{"jsonrpc":"2.0","result":"pong","id":18446744073709551615}'),
    ]
    for body, expected in vectors:
        assert curl_rpc(url, body) == (200, expected), body
    status = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
                            capture_output=True, text=True, timeout=60).stdout
    assert status == "405"


def test_websocket_calls_and_subscriptions(opsbox):
    ws = websocket.create_connection(opsbox.url.replace("http://", "ws://") + "/rpc", timeout=20)
    try:
        ws.send('{"jsonrpc":"2.0","method":"ping","id":1}')
        assert json.loads(ws.recv()) == {"jsonrpc": "2.0", "result": "pong", "id": 1}
        ws.send(json.dumps([{"jsonrpc": "2.0", "method": "ping", "id": i} for i in range(100)]))
        answers = json.loads(ws.recv())
        assert [a["id"] for a in answers] == list(range(100))
        ws.send('{"jsonrpc":"2.0","method":"watch_subscribe","id":"sub"}')
        subscribed = json.loads(ws.recv())
        assert subscribed["id"] == "sub"
        sub = subscribed["result"]
        requests.post(f"{opsbox.url}/rpc", json={"jsonrpc": "2.0", "method": "echo", "params": ["x"], "id": 1})
        kinds = set()
        deadline = time.time() + 20
        while "job.finished" not in kinds and time.time() < deadline:
            note = json.loads(ws.recv())
            assert note["method"] == "watch" and note["params"]["subscription"] == sub
            kinds.add(note["params"]["result"]["kind"])
        assert "job.created" in kinds and "job.finished" in kinds, kinds
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "watch_unsubscribe", "params": [sub], "id": 2}))
        while True:
            answer = json.loads(ws.recv())
            if answer.get("id") == 2:
                assert answer["result"] is True
                break
    finally:
        ws.close()
