#!/usr/bin/env bash
# RW with the papers' protocol on every task (or the tasks given): scripts/paper/rw.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" RW "${1:-vaihingen}" "${@:2}"
