#!/bin/sh
# Shows return values and result files: usage of a directory, as values and a CSV file.
# -- jojo --
# description: report disk usage of a directory, as return values and a CSV result file
# param: dir - directory to measure (default /)
# tags: demo, ops
# http_method: get
# -- jojo --
dir="${DIR:-/}"
[ -n "$DIR" ] || dir=/
if ! df -P "$dir" > /dev/null 2>&1; then
    echo "no such directory: $dir" >&2
    exit 2
fi
df -P "$dir" | awk 'NR == 2 { print "jojo_return_value used_percent=" $5; print "jojo_return_value mount=" $6 }'
echo "filesystem,blocks,used,available,capacity,mount" > "$OPSBOX_RESULTS/usage.csv"
df -P "$dir" | awk 'NR == 2 { print $1 "," $2 "," $3 "," $4 "," $5 "," $6 }' >> "$OPSBOX_RESULTS/usage.csv"
echo "wrote usage.csv"
