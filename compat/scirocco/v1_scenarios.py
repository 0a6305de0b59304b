"""Scenarios for scirocco-pyclient 1.0.0 (the seed README's client), run in its own
venv by test_scirocco.py: `python v1_scenarios.py SCENARIO URL TOKEN`."""

import base64
import sys

from sciroccoclient.exceptions import SciroccoHTTPDAOError
from sciroccoclient.httpclient import HTTPClient


def readme(url, token):
    # The seed README, word for word apart from the URL.
    c = HTTPClient(url, 'af123', token)
    c.message_queue_push('af123', {"type": "message"})
    c.message_queue_push('af123', 'message')
    c.message_queue_push('af123', open(__file__, 'rb').read())
    r = c.message_queue_pull()
    assert r.system_data.fromm == 'af123' and r.system_data.to == 'af123', r.system_data.__dict__
    assert r.system_data.status == 'processing' and r.system_data.tries == '1'
    assert r.system_data.data_type == 'application/json'
    assert r.message_data == {"type": "message"}
    a = c.message_queue_ack(r.system_data.id)
    assert a.system_data.status == 'processed' and a.system_data.processed_time
    assert c.message_queue_pull().message_data == 'message'
    raw = c.message_queue_pull().message_data
    assert base64.b64decode(raw) == open(__file__, 'rb').read()
    assert c.message_queue_pull() is None


def payloads(url, token):
    c = HTTPClient(url, 'af1', token)
    blob = bytes(range(256)) * 4
    pushed = c.message_queue_push('bf2', blob, '.bin')
    assert pushed.message_data == blob, 'push echoes the raw bytes'
    assert pushed.system_data.data_type == '.bin' and pushed.system_data.status == 'pending'
    assert pushed.system_data.created_time.endswith('GMT+0000 (UTC)')
    c.message_queue_push('bf2', 'hello text')
    c.message_queue_push('bf2', '{"as": "sd"}')
    receiver = HTTPClient(url, 'bf2', token)
    got = receiver.message_queue_pull()
    assert base64.b64decode(got.message_data) == blob
    assert got.system_data.data_type == '.bin'
    assert receiver.message_queue_pull().message_data == 'hello text'
    assert receiver.message_queue_pull().message_data == {"as": "sd"}
    for bad in ['123', 'x' * 200000]:
        try:
            c.message_queue_push('bf2', bad)
        except SciroccoHTTPDAOError:
            pass
        else:
            raise AssertionError(f'{bad[:10]!r} should be refused')
    try:
        c.message_queue_push('bf2', b'\0' * 1550000)
    except SciroccoHTTPDAOError:
        pass
    else:
        raise AssertionError('1,550,000 bytes should be refused')


def two_nodes(url, token):
    a, b = HTTPClient(url, 'aa01', token), HTTPClient(url, 'bb02', token)
    m = a.message_queue_push('bb02', {'n': 1})
    assert a.message_queue_pull() is None
    try:
        a.message_queue_ack(m.system_data.id)
    except SciroccoHTTPDAOError:
        pass
    else:
        raise AssertionError('only the destination acks')
    got = b.message_queue_pull()
    assert got.system_data.id == m.system_data.id and got.system_data.fromm == 'aa01'
    assert b.message_queue_ack(got.system_data.id).system_data.status == 'processed'
    try:
        b.message_queue_ack(got.system_data.id)
    except SciroccoHTTPDAOError:
        pass
    else:
        raise AssertionError('a second ack is a 404')


def auth(url, token):
    for wrong in ['WRONG', '']:
        c = HTTPClient(url, 'af1', wrong)
        try:
            c.message_queue_push('af1', {'x': 1})
        except SciroccoHTTPDAOError as e:
            assert '403' in str(e), e
        else:
            raise AssertionError('a wrong token must be refused')


def crud(url, token):
    c = HTTPClient(url, 'cc01', token)
    d = HTTPClient(url, 'dd02', token)
    c.message_delete_all()
    one = c.message_queue_push('dd02', {'v': 1})
    c.message_queue_push('dd02', 'two')
    d.message_queue_push('cc01', 'incoming')
    got = c.message_get(one.system_data.id)
    assert got.message_data == {'v': 1} and got.system_data.to == 'dd02'
    everything = c.message_get_all()
    assert [m.message_data for m in everything] == [{'v': 1}, 'two', 'incoming']
    assert everything[0].system_data.tries == 0 and everything[0].system_data.fromm == 'cc01'
    d.message_queue_pull()
    # v1 rules: the receiver may update, any status; the stored type is kept.
    updated = d.message_update_one(one.system_data.id, 'changed')
    assert updated.message_data == 'changed' and updated.system_data.data_type == 'application/json'
    deleted = c.message_delete_one(one.system_data.id)
    assert deleted.message_data == {'n': 1, 'ok': 1}, deleted.message_data
    assert c.message_delete_all().message_data == {'n': 2, 'ok': 1}
    assert c.message_get_all() is None


def producer(url, token):
    c = HTTPClient(url, 'aa10', token)
    for i in range(30):
        c.message_queue_push('bb20', {'i': i})


SCENARIOS = {f.__name__: f for f in [readme, payloads, two_nodes, auth, crud, producer]}

if __name__ == '__main__':
    SCENARIOS[sys.argv[1]](sys.argv[2], sys.argv[3])
    print('ok')
