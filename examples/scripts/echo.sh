#!/bin/sh
# Echoes its text back: the smallest script with a parameter.
# -- jojo --
# description: echo the text back
# param: text - the text to echo
# required: text
# tags: demo
# -- jojo --
printf '%s\n' "$TEXT"
