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

# PostgreSQL (the scale-out store): the server on loopback of this machine kind, or
# OPSBOX_TEST_PG. A fresh database each run; no PostgreSQL, no green run.
pg="${OPSBOX_TEST_PG:-postgres://postgres@127.0.0.1:5432/opsbox_test}"
pg_admin="${pg%/*}/postgres"
pg_db="${pg##*/}"; pg_db="${pg_db%%\?*}"
command -v psql >/dev/null || fail "psql is required to set up the PostgreSQL test database (apt-get install postgresql-client)"
psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" -c "CREATE DATABASE $pg_db" >/dev/null \
    || fail "cannot reach PostgreSQL at $pg_admin to create $pg_db (set OPSBOX_TEST_PG)"
export OPSBOX_TEST_PG="$pg"

echo "== Rust tests (SQLite store; the scale-out tests use PostgreSQL)"
cargo test --workspace

echo "== core tests again on the PostgreSQL store"
OPSBOX_TEST_STORE="$pg" cargo test -p opsbox-core

echo "== compat tests (older clients against a started opsbox)"
cargo build --quiet -p opsbox
venv=compat/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || fail "cannot create a venv: install python3-venv (apt-get install python3-venv)"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r compat/requirements.txt \
    || fail "cannot install compat/requirements.txt from the package index"
# scirocco-pyclient 1.0.0 and 2.1.3 are both the module `sciroccoclient`: one venv each
# (urllib3 below 2, which both need); compat/test_scirocco.py runs them as subprocesses.
for version in 1.0.0 2.1.3; do
    sv="compat/.venv-scirocco-$version"
    if [ ! -x "$sv/bin/python" ]; then
        python3 -m venv "$sv" || fail "cannot create the venv $sv"
    fi
    "$sv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "scirocco-pyclient==$version" "urllib3<2" \
        || fail "cannot install scirocco-pyclient $version from the package index"
done
# 2.1.3 names a parameter `async` (a keyword since Python 3.7): rename it in the
# installed copy, at test time.
compat/.venv-scirocco-2.1.3/bin/python compat/scirocco/async_fix.py \
    || fail "cannot apply the async fix to scirocco-pyclient 2.1.3"
OPSBOX_BIN="$PWD/target/debug/opsbox" "$venv/bin/python" -m pytest compat -q -p no:cacheprovider
