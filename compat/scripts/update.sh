#!/bin/bash
# -- jojo --
# description: a PUT script
# http_method: put
# tags: math, write
# -- jojo --
echo updated
exit 4
