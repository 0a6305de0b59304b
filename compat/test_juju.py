"""The real jujuclient 0.54.0 (its juju1 dialect, the seed README's `Environment`) against
a started opsbox over TLS: the seed example end to end, the watcher's snapshot and
deltas, units reaching `started` because the example charms' hooks really ran, errors
with the connection still usable, facades, and `Environment.connect` with a jenv file
written by `opsbox model jenv`."""

import json
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
import urllib3
import websocket
from jujuclient import Environment
from jujuclient.exc import EnvError

from conftest import ROOT, opsbox_bin

urllib3.disable_warnings()
CHARMS = ROOT / "examples" / "charms"
PASSWORD = "s3cret-juju"


@pytest.fixture
def juju(make_opsbox):
    server = make_opsbox(tls=True, extra=["--charms", str(CHARMS)])
    response = requests.post(
        f"{server.url}/v1/users",
        json={"name": "admin", "password": PASSWORD, "role": "admin"},
        verify=False,
    )
    assert response.status_code in (200, 201), response.text
    server.wss = f"wss://127.0.0.1:{server.port}"
    server.auth = ("admin", PASSWORD)
    return server


def login(server):
    env = Environment(server.wss)
    env.login(PASSWORD)
    return env


def native(server, path):
    response = requests.get(f"{server.url}{path}", auth=server.auth, verify=False)
    assert response.status_code == 200, response.text
    return response


def drain(watcher, until, timeout=60):
    """Collects deltas from a watcher until `until(all_deltas)` holds."""
    seen = []
    deadline = time.time() + timeout
    for change_set in watcher:
        seen.extend(change_set)
        if until(seen):
            return seen
        assert time.time() < deadline, f"timed out; deltas so far: {seen}"
    raise AssertionError(f"watcher ended early; deltas: {seen}")


def latest(deltas, kind):
    """The last delta of each entity of `kind`, by its id."""
    key = {"machine": "Id", "relation": "Key"}.get(kind, "Name")
    out = {}
    for k, action, fields in deltas:
        if k == kind:
            out[fields[key]] = (action, fields)
    return out


def test_seed_example_runs_unchanged_and_hooks_really_run(juju):
    env = Environment(juju.wss)
    env.login(PASSWORD)
    watcher = env.watch()
    env.deploy('loadbalancer', 'cs:precise/haproxy')
    env.deploy('db', 'cs:precise/mysql')
    env.deploy('blog', 'cs:precise/wordpress')
    env.add_relation('blog', 'db')
    env.add_relation('blog', 'loadbalancer')
    env.expose('loadbalancer')
    env.set_config('blog', {'engine': 'apache'})
    config = env.get_config('blog')
    assert config['engine']['value'] == 'apache'
    assert 'default' not in config['engine']
    assert config['tuning'] == {'description': 'tuning profile (single, optimized or bare)',
                                'type': 'string', 'value': 'single', 'default': True}
    env.set_constraints('blog', {'cpu-cores': 4})
    assert env.get_constraints('blog') == {'cpu-cores': 4}
    assert env.add_units('blog', 4) == {'Units': ['blog/1', 'blog/2', 'blog/3', 'blog/4']}
    env.remove_units(['blog/0'])

    # The watcher made before the deploys: its first answer is the whole model.
    first = next(watcher)
    services = latest(first, 'service')
    assert set(services) == {'loadbalancer', 'db', 'blog'}
    assert services['loadbalancer'][1]['Exposed'] is True
    assert services['db'][1]['CharmURL'] == 'cs:precise/mysql'
    assert services['blog'][1]['Constraints'] == {'cpu-cores': 4}
    assert services['blog'][1]['Config'] == {'engine': 'apache'}
    assert services['blog'][1]['OwnerTag'] == 'user-admin'
    machines = latest(first, 'machine')
    assert machines['0'][1]['Jobs'] == ['JobManageEnviron']
    units = latest(first, 'unit')
    assert {'db/0', 'loadbalancer/0', 'blog/1', 'blog/4'} <= set(units)
    for name, (_, fields) in units.items():
        assert fields['MachineId'] in machines, name
        assert fields['Status'] in ('pending', 'installed', 'started', 'stopped'), fields
    relations = latest(first, 'relation')
    assert set(relations) == {'blog:db db:db', 'loadbalancer:reverseproxy blog:website'}
    assert relations['blog:db db:db'][1]['Endpoints'][0]['Relation']['Interface'] == 'mysql'

    # Every unit gets to started because its install, config-changed and start hooks ran;
    # blog/0 leaves (remove delta with its name).
    def settled(deltas):
        state = latest(first + deltas, 'unit')
        gone = state.get('blog/0', ('change', {}))[0] == 'remove'
        up = all(state.get(u, ('', {}))[1].get('Status') == 'started'
                 for u in ('db/0', 'loadbalancer/0', 'blog/1', 'blog/2', 'blog/3', 'blog/4'))
        return gone and up
    later = drain(watcher, settled)
    removed = [d for d in later if d[0] == 'unit' and d[1] == 'remove']
    assert [d[2]['Name'] for d in removed] == ['blog/0']
    watcher.stop()

    # The hooks' work is there: wordpress wrote the credentials mysql set.
    jobs = native(juju, '/v1/jobs?limit=500').json()['jobs']
    changed = [j for j in jobs if j['script'] == 'hook-blog-1-db-relation-changed'
               and j['state'] == 'succeeded']
    assert changed, [j['script'] for j in jobs]
    wp_config = None
    deadline = time.time() + 30
    while wp_config is None or 'DB_NAME' not in wp_config:
        for job in native(juju, '/v1/jobs?limit=500').json()['jobs']:
            if job['script'] == 'hook-blog-1-db-relation-changed':
                response = requests.get(
                    f"{juju.url}/v1/jobs/{job['name']}/results/map-0/wp-config.php",
                    auth=juju.auth, verify=False)
                if response.status_code == 200 and 'DB_NAME' in response.text:
                    wp_config = response.text
        assert time.time() < deadline, "wordpress never wrote its database settings"
        time.sleep(0.2)
    assert "define('DB_NAME', 'blog');" in wp_config

    status = env.status()
    assert set(status['Services']) == {'loadbalancer', 'db', 'blog'}
    assert status['Services']['db']['Units']['db/0']['AgentState'] == 'started'
    assert status['Services']['db']['Units']['db/0']['OpenedPorts'] == ['3306/tcp']
    assert status['Services']['blog']['Relations'] == {'db': ['db'], 'website': ['loadbalancer']}
    assert '0' in status['Machines']
    assert env.info()['Name'] == 'opsbox'

    env.destroy_service('blog')
    watch = env.get_watch(timeout=60)
    gone = drain(watch, lambda ds: any(d[0] == 'service' and d[1] == 'remove' and d[2]['Name'] == 'blog'
                                       for d in ds))
    assert any(d[0] == 'relation' and d[1] == 'remove' for d in gone)
    assert 'blog' not in env.status()['Services']
    env.close()


def test_watcher_snapshot_then_each_change_once_in_order(juju):
    env = login(juju)
    env.deploy('db', 'cs:trusty/mysql-38', num_units=1)
    env.wait_for_units(timeout=60)
    watcher = env.watch()
    snapshot = next(watcher)
    kinds = [(d[0], d[1]) for d in snapshot]
    assert ('service', 'change') in kinds and ('unit', 'change') in kinds
    assert latest(snapshot, 'unit')['db/0'][1]['Status'] == 'started'
    # One change: exactly one delta, with the entity's latest fields.
    env.expose('db')
    assert next(watcher) == [['service', 'change', {**latest(snapshot, 'service')['db'][1], 'Exposed': True}]]
    # Two changes to one entity between two Nexts: one delta carrying the latest state.
    env.unexpose('db')
    env.set_config('db', {'dataset-size': '50%'})
    time.sleep(0.3)
    deltas = next(watcher)
    assert len(deltas) == 1, deltas
    assert deltas[0][2]['Exposed'] is False
    assert deltas[0][2]['Config'] == {'dataset-size': '50%'}
    # Annotations are watched too.
    env.set_annotation('db', 'service', {'owner': 'team-a'})
    assert env.get_annotation('db', 'service') == {'Annotations': {'owner': 'team-a'}}
    deltas = next(watcher)
    assert deltas[-1][0] == 'annotation' and deltas[-1][2]['Annotations'] == {'owner': 'team-a'}
    watcher.stop()


def test_stop_while_next_waits_does_not_hang(juju):
    env = login(juju)
    # (The client arms SIGALRM with the whole seconds left, and alarm(0) arms nothing:
    # a timeout of 1 would make its second Next wait forever.)
    watcher = env.get_watch(timeout=3)
    for _ in watcher:          # the snapshot (machine 0), then a Next that times out
        pass
    started = time.time()
    watcher.stop()             # Stop sent while that Next is still pending on the server
    assert time.time() - started < 5


def test_errors_keep_the_connection_usable(juju):
    env = Environment(juju.wss)
    with pytest.raises(EnvError) as e:
        env.login('wrong')
    assert e.value.error['Error'] == 'invalid entity name or password'
    assert e.value.error['ErrorCode'] == 'unauthorized access'
    env.login(PASSWORD)        # the same socket, now right

    env.deploy('db', 'cs:precise/mysql', num_units=0)
    env.deploy('lb', 'cs:precise/haproxy', num_units=0)
    with pytest.raises(EnvError) as e:
        env.expose('nosuch')
    assert e.value.error['Error'] == 'service "nosuch" not found'
    assert e.value.error['ErrorCode'] == 'not found'
    with pytest.raises(EnvError) as e:
        env.add_relation('lb', 'db')
    assert 'no relations found' in e.value.message
    with pytest.raises(EnvError) as e:
        env.set_config('db', {'colour': 'blue'})
    assert 'unknown option "colour"' in e.value.message
    with pytest.raises(EnvError) as e:
        env.set_config('db', {'max-connections': 'many'})
    assert 'expected int' in e.value.message
    with pytest.raises(EnvError) as e:
        env.deploy('db', 'cs:precise/mysql')
    assert e.value.message == 'cannot add service "db": service already exists'
    with pytest.raises(EnvError) as e:
        env.deploy('x', 'cs:precise/nosuchcharm')
    assert 'not found' in e.value.message
    with pytest.raises(EnvError) as e:
        env.deploy('y', 'http://example.com/charm')
    assert 'unsupported schema' in e.value.message
    with pytest.raises(EnvError) as e:
        env.set_constraints('db', {'colour': 'blue'})
    assert 'unknown constraint' in e.value.message
    with pytest.raises(EnvError) as e:
        env.remove_units(['db/7'])
    assert e.value.message == 'no units were destroyed: unit "db/7" does not exist'
    with pytest.raises(EnvError) as e:
        env._rpc({'Type': 'Client', 'Request': 'NoSuchCall', 'Params': {}})
    assert e.value.error['ErrorCode'] == 'not found'
    with pytest.raises(EnvError) as e:
        env._rpc({'Type': 'Client', 'Request': 'FindTools', 'Params': {}})
    assert e.value.error['ErrorCode'] == 'not implemented'
    with pytest.raises(EnvError) as e:
        env._rpc({'Type': 'Client', 'Version': 3, 'Request': 'FullStatus', 'Params': {}})
    assert e.value.error['Error'] == 'unknown version (3) of interface "Client"'
    with pytest.raises(EnvError) as e:
        env._rpc({'Type': 'Uniter', 'Request': 'Life', 'Params': {}})
    assert e.value.error['ErrorCode'] == 'not implemented'
    with pytest.raises(EnvError) as e:
        env._rpc({'Type': 'Frobnicator', 'Request': 'Go', 'Params': {}})
    assert e.value.error['ErrorCode'] == 'not found'
    # Still the same, working connection.
    assert env.info()['UUID']
    assert env.get_env_config()['Config']['name'] == 'opsbox'   # sends a lower-case "request"
    assert env.valid_relation_names('db') == {'CharmRelations': ['db']}


def test_calls_before_login_are_refused_on_the_wire(juju):
    ws = websocket.create_connection(juju.wss + "/", sslopt={"cert_reqs": ssl.CERT_NONE,
                                                              "ssl_version": ssl.PROTOCOL_TLSv1_2})
    ws.send(json.dumps({"Type": "Client", "Request": "FullStatus", "Version": 0,
                        "RequestId": 1, "Params": {}}))
    reply = json.loads(ws.recv())
    assert reply["RequestId"] == 1
    assert reply["ErrorCode"] == "unauthorized access"
    assert reply["Response"] == {}
    ws.send("not json")
    assert "Error" in json.loads(ws.recv())
    ws.send(json.dumps({"type": "admin", "request": "Login", "version": 0, "requestid": 2,
                        "params": {"authtag": "user-admin", "password": PASSWORD}}))
    reply = json.loads(ws.recv())
    # Keys are matched case-insensitively, but "admin" is not the facade "Admin".
    assert "Error" in reply
    ws.send(json.dumps({"Type": "Admin", "request": "Login", "version": 0, "RequestId": 3,
                        "params": {"authtag": "user-admin", "password": PASSWORD}}))
    reply = json.loads(ws.recv())
    assert reply["RequestId"] == 3 and "Facades" in reply["Response"], reply
    ws.close()


def test_facades_charms_users_and_machines(juju):
    env = login(juju)
    names = set(env.facades)
    assert {'Client', 'Charms', 'UserManager', 'KeyManager', 'Annotations', 'Action',
            'Backups', 'ImageManager', 'EnvironmentManager', 'HighAvailability'} <= names
    assert env.facades['Charms'] == {'attr': 'charms', 'version': 1}
    assert env.charms.list()['CharmURLs'] == [
        'local:trusty/haproxy-2', 'local:trusty/mysql-5', 'local:trusty/wordpress-3']
    users = env.users.list()['results']
    assert [u['result']['username'] for u in users] == ['admin']
    info = env.get_charm('cs:precise/wordpress')
    assert info['Meta']['Requires']['db']['Interface'] == 'mysql'
    assert env.resolve_charms(['wordpress'])['URLs'] == [{'URL': 'cs:trusty/wordpress'}]
    assert env.agent_version() == {'Version': '1.25.0'}
    assert env.keys.list(['admin'], 'full')['Results'][0]['Result'] == []
    added = env.add_machine()
    machine = added['Machine']
    assert machine in env.status()['Machines']
    env.destroy_machines([machine])
    assert env.mess.list('admin')['Environments'][0]['Name'] == 'opsbox'
    # Backups are real copies of the store, downloadable from the native API.
    backup = env.backups.create('before the upgrade')
    assert backup['Notes'] == 'before the upgrade' and backup['Size'] > 0
    assert [b['ID'] for b in env.backups.list()['List']] == [backup['ID']]
    assert env.backups.info(backup['ID'])['Checksum'] == backup['Checksum']
    copy = requests.get(f"{juju.url}/v1/backups/{backup['ID']}/file", auth=juju.auth, verify=False)
    assert copy.content.startswith(b'SQLite format 3\x00')
    env.backups.remove(backup['ID'])
    assert env.backups.list()['List'] == []


def test_actions_run_as_jobs_on_the_units_node(juju):
    env = login(juju)
    env.deploy('db', 'cs:precise/mysql')
    env.wait_for_units(timeout=60)
    specs = env.actions.service_actions(['db'])['results'][0]['actions']['ActionSpecs']
    assert specs['backup']['Params']['properties']['label']['type'] == 'string'
    # Client.CharmInfo describes the same actions.
    info = env.get_charm('cs:precise/mysql')
    assert info['Actions']['ActionSpecs']['backup'] == specs['backup']
    queued = env.actions.enqueue_units(['db/0'], 'backup', {'label': 'nightly'})['results'][0]
    tag = queued['action']['tag']
    assert tag.startswith('action-') and queued['action']['receiver'] == 'unit-db/0'
    deadline = time.time() + 30
    while True:
        result = env.actions.info([{'Tag': tag}])['results'][0]
        if result['status'] in ('completed', 'failed'):
            break
        assert time.time() < deadline, result
        time.sleep(0.2)
    assert result['status'] == 'completed', result
    assert result['output']['file'] == 'dump-nightly.sql'
    assert result['action']['name'] == 'backup'
    listed = env.actions.all(['db/0'])['actions'][0]['actions']
    assert [a['action']['tag'] for a in listed] == [tag]
    assert env.actions.completed(['db/0'])['actions'][0]['actions'][0]['status'] == 'completed'
    # The dump is a result file of the action's job.
    dump = requests.get(f"{juju.url}/v1/jobs/{tag}/results/map-0/dump-nightly.sql",
                        auth=juju.auth, verify=False)
    assert dump.status_code == 200 and 'dump of db/0' in dump.text
    refused = env.actions.enqueue_units(['db/0'], 'nosuch', {})['results'][0]
    assert 'has no action "nosuch"' in refused['error']['Message']


def test_connect_by_name_with_a_jenv_written_by_opsbox(juju, tmp_path):
    home = tmp_path / "juju"
    env = dict(os.environ, JUJU_HOME=str(home), OPSBOX_USER="admin", OPSBOX_PASSWORD=PASSWORD)
    out = subprocess.run(
        [opsbox_bin(), "--server", juju.url, "--insecure", "model", "jenv", "demo"],
        env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    jenv = home / "environments" / "demo.jenv"
    assert jenv.exists(), out.stdout
    os.environ["JUJU_HOME"] = str(home)
    try:
        connected = Environment.connect('demo')
    finally:
        del os.environ["JUJU_HOME"]
    # connect() verified the server against the CA in the jenv, and used the
    # /environment/<uuid>/api path.
    assert '/environment/' in connected.endpoint
    assert connected.info()['UUID'] in connected.endpoint
    connected.deploy('db', 'cs:precise/mysql', num_units=0)
    assert 'db' in connected.status()['Services']


def test_a_local_charm_dir_is_uploaded_deployed_and_downloaded(juju, tmp_path):
    import io
    import zipfile
    charm = tmp_path / "hello"
    (charm / "hooks").mkdir(parents=True)
    (charm / "metadata.yaml").write_text(
        "name: hello\nsummary: says hello\nprovides:\n  web:\n    interface: http\n")
    (charm / "config.yaml").write_text(
        "options:\n  greeting:\n    type: string\n    default: hi\n")
    install = charm / "hooks" / "install"
    install.write_text('#!/bin/sh\necho "$CONFIG_GREETING from $JUJU_UNIT_NAME"\n')
    install.chmod(0o755)
    env = login(juju)
    # The HTTPS helpers verify the server like any Python HTTPS client: trust its cert.
    os.environ["SSL_CERT_FILE"] = str(juju.data / "tls" / "cert.pem")
    try:
        assert env.add_local_charm_dir(str(charm), 'trusty') == {'CharmURL': 'local:trusty/hello-0'}
        assert env.add_local_charm_dir(str(charm), 'trusty') == {'CharmURL': 'local:trusty/hello-1'}
        with pytest.raises(EnvError) as e:
            env.add_local_charm(io.BytesIO(b"not a zip"), 'trusty', 9)
        assert 'bad charm archive' in e.value.message
        env.deploy('greeter', 'local:trusty/hello-1')
        env.wait_for_units(timeout=60)
        size = env.download_charm('local:trusty/hello-1', str(tmp_path / 'hello.zip'))
    finally:
        del os.environ["SSL_CERT_FILE"]
    assert size > 0
    with zipfile.ZipFile(tmp_path / 'hello.zip') as z:
        assert 'metadata.yaml' in z.namelist()
        assert (z.getinfo('hooks/install').external_attr >> 16) & 0o111
    assert 'local:trusty/hello-1' in env.charms.list()['CharmURLs']
    jobs = native(juju, '/v1/jobs?limit=100').json()['jobs']
    install_job = next(j for j in jobs if j['script'] == 'hook-greeter-0-install')
    out = native(juju, f"/v1/jobs/{install_job['name']}/results/map-0.out").text
    assert out == 'hi from greeter/0\n'
