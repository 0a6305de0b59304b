#!/bin/bash
# -- jojo --
# description: prints the date, for GET callers like Rundeck
# http_method: get
# tags: time, readonly
# -- jojo --
date +%Y-%m-%d
echo "jojo_return_value year=$(date +%Y)"
