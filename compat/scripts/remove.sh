#!/bin/bash
# -- jojo --
# description: a DELETE script
# param: name
# http_method: DELETE
# -- jojo --
echo "removed $NAME"
