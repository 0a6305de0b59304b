"""Makes scirocco-pyclient 2.1.3 importable on Python 3.7+ by renaming its `async`
parameter (a keyword since 3.7) to `async_` in the installed copy of this venv. Run by
../../test.sh after installing the client; the package itself is never vendored."""

import importlib.util
import pathlib
import re
import sys

spec = importlib.util.find_spec("sciroccoclient")
if spec is None or not spec.submodule_search_locations:
    sys.exit("sciroccoclient is not installed in this venv")
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "client.py"
text = path.read_text()
fixed = re.sub(r"\basync\b", "async_", text)
if fixed != text:
    path.write_text(fixed)
import sciroccoclient.client  # noqa: E402,F401  (proves the fix)
print(f"scirocco-pyclient async fix applied to {path}")
