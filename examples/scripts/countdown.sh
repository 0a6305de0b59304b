#!/bin/sh
# A long runner to follow live, wait for, or kill: prints one line a second.
# -- jojo --
# description: count down from N, one line a second (follow it with --follow)
# param: count - how many seconds to run (default 10)
# tags: demo
# timeout: 10m
# -- jojo --
n="${COUNT:-10}"
case "$n" in ''|*[!0-9]*) echo "count must be a whole number, not '$n'" >&2; exit 2;; esac
while [ "$n" -gt 0 ]; do
    echo "$n..."
    sleep 1
    n=$((n - 1))
done
echo "liftoff"
echo "jojo_return_value finished=yes"
