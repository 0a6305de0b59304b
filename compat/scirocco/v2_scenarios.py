"""Scenarios for scirocco-pyclient 2.1.3, run in its own venv (with the async fix)
by test_scirocco.py: `python v2_scenarios.py SCENARIO URL TOKEN`."""

import base64
import datetime
import sys
import time

from sciroccoclient.clientfactory import ClientFactory
from sciroccoclient.exceptions import SciroccoHTTPDAOError, SciroccoInterruptOnReceiveCallbackError
from sciroccoclient.messages import SciroccoMessage


def client(url, node, token):
    return ClientFactory().get_http_client(url, node, token)


def message(dest, payload, payload_type=None):
    m = SciroccoMessage()
    m.node_destination = dest
    m.payload = payload
    if payload_type:
        m.payload_type = payload_type
    return m


def refused(call, code):
    try:
        call()
    except SciroccoHTTPDAOError as e:
        assert str(code) in str(e), e
    else:
        raise AssertionError(f'expected {code}')


def payloads(url, token):
    a, b = client(url, 'af123', token), client(url, 'bf456', token)
    pushed = a.push(message('bf456', {'t': 21.5}))
    assert pushed.payload == {'t': 21.5}
    assert pushed.metadata.node_source == 'af123' and pushed.metadata.node_destination == 'bf456'
    assert pushed.metadata.status == 'pending' and pushed.metadata.tries == '0'
    assert pushed.metadata.payload_type == 'application/json'
    assert pushed.metadata.update_time is None
    text = a.push(message('bf456', 'hello world'))
    assert text.payload == 'hello world' and text.metadata.payload_type == 'text/plain'
    pdf = b'%PDF-1.4\n%\xe4\xfc\xf6\xdf\n' + bytes(range(256))
    binary = a.push(message('bf456', pdf, 'application/pdf'))
    assert binary.payload == pdf
    got = b.pull()
    assert got.payload == {'t': 21.5} and got.metadata.status == 'processing'
    assert got.metadata.tries == '1' and got.metadata.processing_time and got.metadata.update_time
    acked = b.ack(got.metadata.id)
    assert acked.metadata.status == 'processed' and acked.metadata.processed_time
    assert b.pull().payload == 'hello world'
    raw = b.pull()
    assert base64.b64decode(raw.payload) == pdf and raw.metadata.payload_type == 'application/pdf'
    assert b.pull() is None
    refused(lambda: b.ack(got.metadata.id), 404)
    refused(lambda: a.ack(raw.metadata.id), 404)


def scheduled(url, token):
    a, b = client(url, 'af1', token), client(url, 'bf2', token)
    later = message('bf2', 'later')
    later.scheduled_time = datetime.datetime.utcnow() + datetime.timedelta(seconds=2)
    pushed = a.push(later)
    assert pushed.metadata.status == 'scheduled' and pushed.metadata.scheduled_time
    a.push(message('bf2', 'now'))
    assert b.pull().payload == 'now'
    assert b.pull() is None
    time.sleep(2.3)
    got = b.pull()
    assert got.payload == 'later' and got.metadata.status == 'processing'
    past = message('bf2', 'past')
    past.scheduled_time = datetime.datetime.utcnow() - datetime.timedelta(minutes=19)
    refused(lambda: a.push(past), 400)


def auth(url, token):
    refused(lambda: client(url, 'af1', 'WRONG').push(message('af1', {'x': 1})), 403)
    refused(lambda: client(url, 'af1', 'WRONG').pull(), 403)


def crud(url, token):
    a, b = client(url, 'ee01', token), client(url, 'ff02', token)
    one = a.push(message('ff02', {'v': 1}))
    a.push(message('ff02', 'two'))
    b.push(message('ee01', 'incoming'))
    assert a.get(one.metadata.id).payload == {'v': 1}
    assert [m.payload for m in a.get_all()] == [{'v': 1}, 'two', 'incoming']
    updated = a.update_one(one.metadata.id, b'\x00\x01binary')
    assert base64.b64decode(updated.payload) == b'\x00\x01binary'
    assert updated.metadata.payload_type == 'application/json'
    refused(lambda: b.update_one(one.metadata.id, 'not mine'), 404)
    assert a.delete_one(one.metadata.id).payload == {'n': 1, 'ok': 1}
    # v2 delete_all: only my undelivered sent messages, not the incoming one.
    assert a.delete_all().payload == {'n': 1, 'ok': 1}
    assert [m.payload for m in a.get_all()] == ['incoming']


def on_receive(url, token):
    a, b = client(url, 'ab01', token), client(url, 'cd02', token)
    for i in range(3):
        a.push(message('cd02', {'i': i}))
    seen = []

    def callback(c, msg):
        c.ack(msg.metadata.id)
        seen.append(msg.payload['i'])
        if len(seen) == 3:
            raise SciroccoInterruptOnReceiveCallbackError('done')

    thread = b.on_receive(callback, async_=True, request_interval=0.05)
    thread.join(timeout=20)
    assert seen == [0, 1, 2], seen
    assert all(m.metadata.status == 'processed' for m in b.get_all())


def consumer(url, token):
    c = client(url, 'bb20', token)
    seen = []
    deadline = time.time() + 60
    while len(seen) < 30 and time.time() < deadline:
        got = c.pull()
        if got is None:
            time.sleep(0.02)
            continue
        assert got.metadata.node_source == 'aa10', got.metadata.node_source
        c.ack(got.metadata.id)
        seen.append(got.payload['i'])
    assert seen == list(range(30)), seen


SCENARIOS = {f.__name__: f for f in [payloads, scheduled, auth, crud, on_receive, consumer]}

if __name__ == '__main__':
    SCENARIOS[sys.argv[1]](sys.argv[2], sys.argv[3])
    print('ok')
