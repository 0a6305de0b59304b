#!/bin/sh
# Always fails: shows how a failure looks (stderr, exit code, job state failed).
# -- jojo --
# description: fail on purpose with the given exit code
# param: code - exit code (default 3)
# tags: demo
# -- jojo --
echo "about to fail" 
echo "something went wrong" >&2
exit "${CODE:-3}"
