#!/usr/bin/env bash
# Queue benchmark (issue #5): durable push→pull→ack cycles/s, opsbox vs beanstalkd
# (binlog, fsync on every write) vs NATS JetStream (on 127.0.0.1:4222), in one run.
# Extra arguments go to target/release/queues (e.g. --duration 5 --backlog 1000,1000000).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

if ! command -v beanstalkd >/dev/null 2>&1; then
    echo "run-queues.sh: beanstalkd is not installed; installing the Debian package" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y beanstalkd; then
        $sudo apt-get update
        $sudo apt-get install -y beanstalkd || {
            echo "run-queues.sh: error: cannot install beanstalkd (apt-get install -y beanstalkd failed)" >&2
            exit 1
        }
    fi
    command -v beanstalkd >/dev/null 2>&1 || {
        echo "run-queues.sh: error: beanstalkd is still not on PATH after installing it" >&2
        exit 1
    }
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    echo "run-queues.sh: no NATS server on 127.0.0.1:4222; starting one with JetStream" >&2
    $sudo start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
    sleep 1
fi

cargo build --release -p opsbox -p opsbox-bench
exec target/release/queues --opsbox target/release/opsbox --beanstalkd beanstalkd "$@"
