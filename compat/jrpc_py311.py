"""Makes the installed py-jrpc 2.1.1 client importable on Python 3 (wire reference
jrpc.md §9). py-jrpc is Python 2 only; the package index's copy is installed unchanged
by ../test.sh and patched here, in the venv, at test time: nothing of it is committed.
The patch is the one the reference was checked with (the wire bytes are the same as on
Python 2.7 apart from the User-Agent). Fails loudly when the files are not the ones
expected."""

import importlib.util
import sys
from pathlib import Path

EDITS = {
    "__init__.py": [
        (None, "from .jrpcClient.SimpleTCPClient import SimpleTCPClient\n"
               "from .jrpcClient.SimpleTCPClientException import HTTPError, URLError\n\n"
               "__all__ = ['HTTPError', 'URLError', 'SimpleTCPClient']\n"),
    ],
    "jrpcClient/__init__.py": [
        ("from SimpleTCPClient import", "from .SimpleTCPClient import"),
        ("from SimpleTCPClientException import", "from .SimpleTCPClientException import"),
    ],
    "jrpcClient/SimpleTCPClient.py": [
        ("import urllib2\n", "import urllib.request as urllib2\n"),
        ("import urlparse\n", "import urllib.parse as urlparse\n"),
        ("import SimpleTCPClientException\n", "from . import SimpleTCPClientException\n"),
        ("from Method import _Method", "from .Method import _Method"),
        ("except urllib2.HTTPError, e:", "except urllib2.HTTPError as e:"),
        ("except urllib2.URLError, e:", "except urllib2.URLError as e:"),
        ("_request.add_data(_data)", "_request.data = _data.encode('utf-8')"),
        ("return _output.read()", "return _output.read().decode('utf-8')"),
    ],
}

MARK = "# patched for Python 3 by opsbox compat/jrpc_py311.py\n"


def apply():
    spec = importlib.util.find_spec("jrpc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("py-jrpc is not installed: pip install -r compat/requirements.txt")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, edits in EDITS.items():
        path = root / name
        text = path.read_text()
        if text.startswith(MARK):
            continue
        for old, new in edits:
            if old is None:
                text = new
                continue
            if old not in text:
                raise RuntimeError(f"py-jrpc {path} is not the 2.1.1 file expected: no {old!r}")
            text = text.replace(old, new)
        path.write_text(MARK + text)
    for cached in root.rglob("__pycache__"):
        for pyc in cached.iterdir():
            pyc.unlink()
    sys.modules.pop("jrpc", None)
