#!/usr/bin/env bash
# Side-by-side benchmark: a trivial script run through opsbox's native API, through
# adnanh/webhook, and by a raw spawn loop (the physical limit), in one run on this machine.
# Extra arguments go to opsbox-bench (e.g. --concurrency 1,16,64 --duration 5).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v webhook >/dev/null 2>&1; then
    echo "run.sh: webhook is not installed; installing the Debian package 'webhook'" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y webhook; then
        $sudo apt-get update
        $sudo apt-get install -y webhook || {
            echo "run.sh: error: cannot install webhook (apt-get install -y webhook failed)" >&2
            exit 1
        }
    fi
    if ! command -v webhook >/dev/null 2>&1; then
        echo "run.sh: error: webhook is still not on PATH after installing it" >&2
        exit 1
    fi
fi

cargo build --release -p opsbox -p opsbox-bench
exec target/release/opsbox-bench --opsbox target/release/opsbox --webhook webhook "$@"
