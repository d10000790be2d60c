#!/usr/bin/env bash
# FT with the papers' protocol on every task (or the tasks given): scripts/paper/ft.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" FT "${1:-vaihingen}" "${@:2}"
