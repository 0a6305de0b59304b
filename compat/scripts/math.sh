#!/bin/bash
# -- jojo --
# description: adds two numbers, output merged
# param: a - first number
# param: b - second number
# output: combined
# tags: math
# -- jojo --
echo "$A + $B = $((A + B))"
echo "warning: nothing" >&2
echo "jojo_return_value sum=$((A + B))"
