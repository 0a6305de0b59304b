#!/bin/bash
# -- jojo --
# description: greets someone; opsbox refuses a run without the name
# param: name - who to greet
# required: name
# -- jojo --
echo "hello, $NAME"
