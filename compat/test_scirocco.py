"""scirocco-pyclient 1.0.0 (the seed README's client) and 2.1.3 against a started
opsbox, each from the package index in its own venv (both are the module
`sciroccoclient`), made by ../test.sh: compat/.venv-scirocco-1.0.0 and
compat/.venv-scirocco-2.1.3 (or $SCIROCCO_V1_PYTHON / $SCIROCCO_V2_PYTHON).

Each scenario runs the real client in a subprocess of its venv (scirocco/*.py); a
failed assertion there fails the test here with the client's traceback."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Opsbox

HERE = Path(__file__).resolve().parent
TOKEN = "DEFAULT_TOKEN"


def venv_python(version, env):
    path = os.environ.get(env, str(HERE / f".venv-scirocco-{version}" / "bin" / "python"))
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no venv with scirocco-pyclient {version} at {path}: run ../test.sh (or set {env})")
    return path


V1 = ("1.0.0", "SCIROCCO_V1_PYTHON", "v1_scenarios.py")
V2 = ("2.1.3", "SCIROCCO_V2_PYTHON", "v2_scenarios.py")


def start(client, scenario, url):
    version, env, script = client
    return subprocess.Popen(
        [venv_python(version, env), "-W", "ignore", str(HERE / "scirocco" / script), scenario, url, TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, what):
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and out.strip().endswith("ok"), f"{what} failed:\n{out}"


def run(client, scenario, url):
    finish(start(client, scenario, url), f"{client[0]} {scenario}")


@pytest.fixture(scope="module")
def server():
    config = HERE / ".scirocco-test.toml"
    config.write_text(f'[scirocco]\nshared_token = "{TOKEN}"\n')
    s = Opsbox(extra=["--config", str(config)])
    yield s
    s.stop()
    config.unlink()


@pytest.mark.parametrize("scenario", ["readme", "payloads", "two_nodes", "auth", "crud"])
def test_client_1_0_0(server, scenario):
    run(V1, scenario, server.url)


@pytest.mark.parametrize("scenario", ["payloads", "scheduled", "auth", "crud", "on_receive"])
def test_client_2_1_3(server, scenario):
    run(V2, scenario, server.url)


def test_both_clients_at_once_v1_producer_v2_consumer(server):
    consumer = start(V2, "consumer", server.url)
    producer = start(V1, "producer", server.url)
    finish(producer, "1.0.0 producer")
    finish(consumer, "2.1.3 consumer")


def test_the_readme_example_on_a_fresh_server_with_no_credentials(make_opsbox):
    # No shared token and no identity: the face is open, as the rest of opsbox.
    run(V1, "readme", make_opsbox().url)
