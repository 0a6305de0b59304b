"""Starts a real `opsbox serve` (the binary built by ../test.sh, or $OPSBOX_BIN) on a free
loopback port with its own data and scripts directories, for the compat tests to drive
with the older clients. Missing pieces fail loudly: nothing here skips."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def opsbox_bin() -> str:
    path = os.environ.get("OPSBOX_BIN", str(ROOT / "target" / "debug" / "opsbox"))
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no opsbox binary at {path}: build it (cargo build -p opsbox) or set OPSBOX_BIN")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Opsbox:
    """One running server."""

    def __init__(self, tls=False, htpasswd=None, extra=()):
        self.dir = Path(tempfile.mkdtemp(prefix="opsbox-compat-"))
        self.scripts = self.dir / "scripts"
        shutil.copytree(SCRIPTS, self.scripts)
        for script in self.scripts.iterdir():
            script.chmod(0o755)
        self.data = self.dir / "data"
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        args = [opsbox_bin(), "serve", "--listen", self.url, "--data", str(self.data), "--scripts", str(self.scripts)]
        if tls:
            args += ["--tls", "self-signed"]
        if htpasswd:
            path = self.dir / "passfile"
            path.write_text(htpasswd)
            args += ["--htpasswd", str(path)]
        args += list(extra)
        self.log = open(self.dir / "server.log", "w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"opsbox exited early:\n{(self.dir / 'server.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("opsbox did not start listening within 30 s")
                time.sleep(0.05)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def opsbox():
    server = Opsbox()
    yield server
    server.stop()


@pytest.fixture
def make_opsbox():
    started = []

    def make(**kwargs):
        server = Opsbox(**kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
