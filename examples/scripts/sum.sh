#!/bin/sh
# Reduce step of the fan-out example: adds up the counts the map tasks wrote
# ($OPSBOX_INPUTS_DIR/map-N/count.txt) and writes the total as its result.
# -- jojo --
# description: add up the word counts of the map tasks (reduce step)
# tags: demo, fanout
# -- jojo --
total=0
tasks=0
for f in "$OPSBOX_INPUTS_DIR"/map-*/count.txt; do
    [ -f "$f" ] || continue
    read -r n _ < "$f"
    total=$((total + n))
    tasks=$((tasks + 1))
done
echo "$total words in $tasks inputs"
echo "$total" > "$OPSBOX_RESULTS/total.txt"
