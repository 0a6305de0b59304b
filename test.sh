#!/usr/bin/env bash
# The one test command: lints, every Rust test (unit, integration over real sockets,
# doctests), then the compat tests that drive the older clients, installed from the
# package index into a venv, against a started opsbox. Anything missing fails loudly.
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "test.sh: $*" >&2; exit 1; }
command -v cargo >/dev/null || fail "cargo is required (https://rustup.rs)"
command -v python3 >/dev/null || fail "python3 (3.9 or newer) is required for the compat tests"
command -v openssl >/dev/null || fail "openssl is required (a test makes an Apache MD5 hash with it)"

echo "== formatting and lints"
cargo fmt --all --check || fail "cargo fmt --all --check failed: run cargo fmt --all"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== Rust tests"
cargo test --workspace

echo "== compat tests (older clients against a started opsbox)"
cargo build --quiet -p opsbox
venv=compat/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || fail "cannot create a venv: install python3-venv (apt-get install python3-venv)"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r compat/requirements.txt \
    || fail "cannot install compat/requirements.txt from the package index"
OPSBOX_BIN="$PWD/target/debug/opsbox" "$venv/bin/python" -m pytest compat -q -p no:cacheprovider
