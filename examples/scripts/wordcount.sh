#!/bin/sh
# Map step of the fan-out example: counts the words of its input ($INPUT) and writes
# "<count> <input>" to its result file, which the reduce step reads.
# -- jojo --
# description: count the words of $INPUT (map step of `opsbox jobs submit`)
# tags: demo, fanout
# -- jojo --
count=$(printf '%s\n' "$INPUT" | wc -w)
echo "$count words on $OPSBOX_NODE: $INPUT"
printf '%s %s\n' "$count" "$INPUT" > "$OPSBOX_RESULTS/count.txt"
