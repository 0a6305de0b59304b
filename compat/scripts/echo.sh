#!/bin/bash
# -- jojo --
# description: echo's text
# param: text - text to echo
# -- jojo --
echo "echo'd text: $TEXT"
