#!/usr/bin/env bash
# User-space instructions per operation on the server, counted by valgrind's callgrind:
# a JSON-RPC `ping` (opsbox `POST /rpc` and the jsonrpsee peer of `target/release/rpc`),
# a waited script run (`POST /v1/scripts/trivial/run`) and a queue cycle (push, pull,
# ack). Instruction counts do not move with the machine's load the way seconds do on a
# shared 2-CPU VM, so an A/B of two builds (`--base`) shows a change of a few percent
# that the timed benches cannot. They leave out the kernel (syscalls, scheduling), so
# the timed benches stay the measure of the targets.
#
#   benches/instructions.sh                       # target/release/opsbox and rpc
#   benches/instructions.sh --base /tmp/opsbox-old --opsbox target/release/opsbox
#
# Needs valgrind (installed from Debian's packages when missing) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

opsbox=target/release/opsbox
rpc=target/release/rpc
base=""
while [ $# -gt 0 ]; do
    case "$1" in
        --opsbox) opsbox=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --rpc) rpc=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
if ! command -v valgrind > /dev/null; then
    apt-get install -y valgrind > /dev/null || { echo "valgrind is missing and could not be installed" >&2; exit 1; }
fi
for bin in "$opsbox" "$rpc" ${base:+"$base"}; do
    [ -x "$bin" ] || { echo "$bin is missing: cargo build --release -p opsbox -p opsbox-bench" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/client.py" <<'EOF'
import http.client, json, sys
port, n, kind, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
def post(path, body, ok=(200, 201)):
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse(); d = r.read()
    assert r.status in ok, (path, r.status, d)
    return d
for i in range(n):
    if kind == "rpc":
        post("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    elif kind == "jsonrpsee":
        post("/", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    elif kind == "run":
        post("/v1/scripts/trivial/run", {})
    else:
        post(f"/v1/queues/{tag}/messages", {"messages": [{"payload": {"n": i}}]})
        ids = [m["id"] for m in json.loads(post(f"/v1/queues/{tag}/pull", {"max": 1}))["messages"]]
        post(f"/v1/queues/{tag}/ack", {"ids": ids})
EOF

# count KIND N CLIENTS BIN: instructions per operation of BIN's server (`opsbox serve`
# on a fresh data directory, or the jsonrpsee peer for KIND jsonrpsee).
count() {
    local kind=$1 n=$2 clients=$3 bin=$4
    local port=$((20000 + RANDOM % 20000)) out="$work/cg.$RANDOM" dir="$work/data.$RANDOM"
    local command
    if [ "$kind" = jsonrpsee ]; then
        command=("$bin" --serve-jsonrpsee "$port")
    else
        mkdir -p "$dir/scripts"
        printf '#!/bin/sh\necho hello\n' > "$dir/scripts/trivial"
        chmod +x "$dir/scripts/trivial"
        command=("$bin" serve --listen "127.0.0.1:$port" --data "$dir/data" --scripts "$dir/scripts")
    fi
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "${command[@]}" > "$work/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 240); do
        python3 "$work/client.py" "$port" 1 "$kind" warm 2> /dev/null && break
        kill -0 $pid 2> /dev/null || { cat "$work/server.log" >&2; exit 1; }
        sleep 0.5
    done
    python3 "$work/client.py" "$port" 50 "$kind" warm
    callgrind_control -i on $pid > /dev/null 2>&1
    local clients_pids=()
    for k in $(seq 1 "$clients"); do
        python3 "$work/client.py" "$port" $((n / clients)) "$kind" "q$k" & clients_pids+=($!)
    done
    wait "${clients_pids[@]}"
    callgrind_control -i off $pid > /dev/null 2>&1
    callgrind_control -d $pid > /dev/null 2>&1
    sleep 1
    kill $pid; wait $pid 2> /dev/null || true
    local total
    total=$(cat "$out"* | awk '/^(summary|totals):/ {s += $2} END {print s}')
    echo $((total / n))
}

row() { # LABEL KIND N CLIENTS
    local label=$1 kind=$2 n=$3 clients=$4 ours theirs="" old=""
    ours=$(count "$kind" "$n" "$clients" "$opsbox")
    if [ -n "$base" ]; then old=$(count "$kind" "$n" "$clients" "$base"); fi
    if [ "$kind" = rpc ]; then theirs=$(count jsonrpsee "$n" "$clients" "$rpc"); fi
    printf '| %s | %s | %s | %s |\n' "$label" "$ours" "${old:--}" "${theirs:--}"
}

echo "| operation (clients) | opsbox Ir/op | base Ir/op | jsonrpsee Ir/op |"
echo "|---|--:|--:|--:|"
row "JSON-RPC ping (1)" rpc 2000 1
row "JSON-RPC ping (32)" rpc 6400 32
row "script run (8)" run 800 8
row "queue cycle (8)" queue 1600 8
